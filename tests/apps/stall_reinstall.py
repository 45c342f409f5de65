"""Installs loopwatch on a dump_dir (converting what a killed process left there) and exits."""

from __future__ import annotations

import asyncio

from stall_common import argv, install
from marker import emit_line


async def main() -> None:
    dump_dir, port, _, _ = argv()
    install(dump_dir, port)
    await asyncio.sleep(0.3)
    emit_line("BYE")


asyncio.run(main())

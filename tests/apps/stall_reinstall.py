"""Installs loopwatch on a dump_dir (converting what a killed process left there) and exits."""

from __future__ import annotations

import asyncio

from stall_common import argv, install


async def main() -> None:
    dump_dir, port, _, _ = argv()
    install(dump_dir, port)
    await asyncio.sleep(0.3)
    print("BYE", flush=True)


asyncio.run(main())

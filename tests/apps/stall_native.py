"""A sync call blocks the loop 2.5 s with ``native_stacks=True``: py-spy adds the native stack to the dump.

``python stall_native.py DUMP_DIR METRICS_PORT STOP_FILE``
"""

from __future__ import annotations

import asyncio
import time

from stall_common import argv, install, say, wait_for_stop


def fetch_quotes_sync() -> None:
    time.sleep(2.5)  # NATIVE-BLOCK: clock_nanosleep in libc, under time_sleep in libpython


async def main() -> None:
    dump_dir, port, stop, _ = argv()
    install(dump_dir, port, native_stacks=True)
    await asyncio.sleep(0.6)
    say("BLOCK-START")
    fetch_quotes_sync()
    say("BLOCK-END")
    await wait_for_stop(stop)


asyncio.run(main())

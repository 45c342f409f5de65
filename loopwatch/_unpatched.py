"""The functions loopwatch's own threads call, bound when loopwatch is imported.

Tests (and some applications) patch module attributes for a while -- ``mock.patch("os.read")``,
``mock.patch("os.fstat")``, ``mock.patch("asyncio.events.threading.current_thread")`` -- and check how
often their mock was called.  loopwatch's threads run during those tests: calling ``os.read`` through the
``os`` module there would both break loopwatch (it gets the mock's return value) and break the test (its
mock sees calls it never made).  So loopwatch calls these references instead, taken before anyone could
patch them.
"""

from __future__ import annotations

import os
import select
import threading
import time

close = os.close
fchmod = os.fchmod
fstat = os.fstat
ftruncate = os.ftruncate
open = os.open  # noqa: A001 - os.open, on purpose
pipe = os.pipe
pread = os.pread
read = os.read
set_blocking = os.set_blocking
strerror = os.strerror
write = os.write
poll = select.poll
POLLIN = select.POLLIN
current_thread = threading.current_thread
get_ident = threading.get_ident
main_thread = threading.main_thread
get_native_id = threading.get_native_id
sleep = time.sleep
monotonic = time.monotonic

"""Blocking stall with the GIL released: an async handler calls a sync "database driver" that does a
blocking socket read against a slow local server (~5 s), with a secret in a local variable."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

from stall_common import argv, install, say, wait_for_stop
from marker import emit_line

SERVER_DELAY = 5.0


def slow_server(listener: socket.socket) -> None:
    conn, _ = listener.accept()
    with conn:
        conn.recv(1024)
        time.sleep(SERVER_DELAY)
        conn.sendall(b"row-1\n")


def fetch_rows(port: int, password: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"SELECT * FROM accounts\n")
        return sock.recv(1024)  # STALL-LINE


async def wait_forever(event: asyncio.Event) -> None:
    await event.wait()  # IDLE-AWAIT


async def idle(event: asyncio.Event) -> None:
    await wait_forever(event)


async def handle_request(port: int) -> bytes:
    # Built at runtime, so the literal never appears in the source: only leaked locals could put
    # this string into a dump.
    password = "-".join(("hunter2", "SECRET"))
    await asyncio.sleep(0.5)  # a few healthy beats first
    say("STALL-START")
    rows = fetch_rows(port, password)
    say("STALL-END")
    return rows


async def main() -> None:
    dump_dir, port, stop, _ = argv()
    install(dump_dir, port)
    listener = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=slow_server, args=(listener,), name="slow-db", daemon=True).start()
    event = asyncio.Event()
    idler = asyncio.create_task(idle(event), name="idle-task")
    rows = await asyncio.create_task(handle_request(listener.getsockname()[1]), name="handler-task")
    emit_line(f"ROWS {rows!r}")
    await wait_for_stop(stop)
    event.set()
    await idler


asyncio.run(main())

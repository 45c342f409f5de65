"""A plain asyncio HTTP service that knows nothing of loopwatch (``loopwatch run -- python run_plain.py``).

    python run_plain.py --port 8000 [--install-at import|loop] [--service NAME]

``GET /`` answers ``{"pid": ...}``; ``GET /block?seconds=S`` runs ``time.sleep(S)`` on the event loop (the
blocking line is marked ``BLOCKS THE LOOP``).  ``--install-at`` makes it an app that calls
``loopwatch.install(service=NAME, lag_thresholds="0.3,5,20")`` itself: at import (before the loop) or
inside its running loop; ``/`` then also says which agent is running.  Prints ``listening <port>`` when
it accepts connections; SIGTERM stops it with exit status 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from urllib.parse import parse_qs, urlsplit

parser = argparse.ArgumentParser()
parser.add_argument("--port", type=int, required=True)
parser.add_argument("--install-at", choices=("import", "loop"))
parser.add_argument("--service", default="self-installed")
ARGS = parser.parse_args()

if ARGS.install_at == "import":
    import loopwatch

    loopwatch.install(service=ARGS.service, lag_thresholds="0.3,5,20")


def block(seconds: float) -> None:
    time.sleep(seconds)  # BLOCKS THE LOOP


def whoami() -> dict[str, object]:
    answer: dict[str, object] = {"pid": os.getpid()}
    agent = sys.modules["loopwatch"]._agent if "loopwatch" in sys.modules else None
    if agent is not None:
        answer.update(service=agent.options.service, metrics_url=agent.metrics_url,
                      lag_thresholds=list(agent.options.lag_thresholds), agent_id=id(agent),
                      loops=[loop.label for loop in agent.snapshot().loops])
    return answer


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        request = await reader.readuntil(b"\r\n\r\n")
        target = urlsplit(request.split(b" ", 2)[1].decode())
        if target.path == "/block":
            seconds = float(parse_qs(target.query).get("seconds", ["1"])[0])
            block(seconds)
            body = {"pid": os.getpid(), "blocked_seconds": seconds}
        else:
            body = whoami()
        data = json.dumps(body).encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
        await writer.drain()
    finally:
        writer.close()


async def main() -> None:
    if ARGS.install_at == "loop":  # as in a lifespan: after loopwatch run's bootstrap installed, in the loop
        await asyncio.sleep(0.2)
        import loopwatch

        loopwatch.install(service=ARGS.service, lag_thresholds="0.3,5,20")
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    server = await asyncio.start_server(handle, "127.0.0.1", ARGS.port)
    async with server:
        print(f"listening {ARGS.port}", flush=True)
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main())

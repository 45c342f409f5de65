"""The built-in ``/metrics`` endpoint: prometheus_client's WSGI app, served by one thread of ours.

It never touches the event loop, so it answers while the loop is stalled -- the moment it matters.
(Scrapes do wait while a C call holds the GIL: no Python thread can run then.)

The serving thread sleeps in ``epoll`` on the listening socket and a wake-up pipe: no periodic wake-ups
while nobody scrapes (prometheus_client's own ``start_http_server`` polls twice a second and starts a
thread per request), and ``close()`` returns at once instead of waiting for the next poll.  Requests are
answered one at a time in that thread -- a scrape takes milliseconds, and a client that connects and says
nothing is dropped after ``REQUEST_TIMEOUT`` seconds.

``metrics_port`` may be a range (``"9320-9329"``): the exporter binds the first free port in it, so
every worker of a pre-forking server (gunicorn) gets its own port -- its own scrape target.  Each
scrape collects under :attr:`Exporter.gate`, which the fork handler (``_fork``) holds across
``fork()``: a child never inherits a metric lock taken by a scrape that was running at that moment.
"""

from __future__ import annotations

import errno
import selectors
import socket
import threading
from collections.abc import Iterable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app

from . import _unpatched as _os

# Bind errors after which the next port of a range is tried; anything else (a bad address) stops.
_TRY_NEXT = {errno.EADDRINUSE, errno.EACCES}
REQUEST_TIMEOUT = 10.0  # seconds a client may take to send its request and read the answer


class _GatedRegistry:
    """What the WSGI app collects from: the registry, collected under the gate."""

    def __init__(self, registry: Any, gate: threading.Lock) -> None:
        self._registry = registry
        self._gate = gate

    def collect(self) -> Iterator[Any]:
        with self._gate:
            families = list(self._registry.collect())
        return iter(families)

    def restricted_registry(self, names: Iterable[str]) -> _GatedRegistry:
        return _GatedRegistry(self._registry.restricted_registry(names), self._gate)


class _Handler(WSGIRequestHandler):
    timeout = REQUEST_TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        """Scrapes are not logged."""


class _Server(WSGIServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away mid-answer is not an error of ours (the base class prints it)."""


def _server_class(addr: str, port: int) -> type[_Server]:
    """``_Server`` with the address family of ``addr`` (an IPv6 address needs ``AF_INET6``)."""
    try:
        infos = socket.getaddrinfo(addr or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family = infos[0][0]
    except (OSError, IndexError):
        family = socket.AF_INET
    return type("_Server", (_Server,), {"address_family": family})


class Exporter:
    def __init__(self, addr: str, port: int | range, registry: Any) -> None:
        self.addr = addr
        self.ports = range(port, port + 1) if isinstance(port, int) else port
        self._registry = registry
        self.gate = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._wake: tuple[int, int] | None = None
        self.on_error: Any = None  # set by the agent: counts a failure of the serving thread

    def start(self) -> None:
        """Bind the first free port and serve; raises the last ``OSError`` if none could be bound
        (e.g. every port is taken), without leaving a thread or a descriptor behind."""
        app = make_wsgi_app(_GatedRegistry(self._registry, self.gate))  # type: ignore[arg-type]
        error: OSError | None = None
        for port in self.ports:
            try:
                server = make_server(self.addr, port, app, _server_class(self.addr, port), handler_class=_Handler)
            except OSError as exc:
                error = exc
                if exc.errno in _TRY_NEXT:
                    continue
                raise
            try:
                wake = _os.pipe()
            except OSError:
                server.server_close()
                raise
            self._server, self._wake = server, wake
            self._thread = threading.Thread(target=self._serve, args=(server, wake[0]), name="loopwatch-exporter",
                                            daemon=True)
            self._thread.start()
            return
        raise error if error is not None else OSError(errno.EINVAL, "no port to bind")

    def _serve(self, server: _Server, wake: int) -> None:
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(server.socket, selectors.EVENT_READ)
                selector.register(wake, selectors.EVENT_READ)
                while True:
                    ready = selector.select()
                    if any(key.fileobj == wake for key, _ in ready):
                        return
                    server._handle_request_noblock()  # accept, answer, close (socketserver's own step)
        except Exception as exc:  # noqa: BLE001 - never an unhandled exception in the host's threads
            if self._server is server and self.on_error is not None:
                self.on_error(exc)

    @property
    def port(self) -> int | None:
        """The port actually bound, or ``None``."""
        return None if self._server is None else int(self._server.server_address[1])

    @property
    def url(self) -> str | None:
        if self._server is None:
            return None
        host, port = self._server.server_address[:2]
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}/metrics"

    def close(self) -> None:
        server, thread, wake = self._server, self._thread, self._wake
        self._server = self._thread = self._wake = None
        if wake is not None:
            try:
                _os.write(wake[1], b"\0")
            except OSError:
                pass
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)
        if server is not None:
            server.server_close()
        for fd in wake or ():
            try:
                _os.close(fd)
            except OSError:
                pass

    def abandon(self) -> None:
        """In a forked child: close our copies of the parent's listening socket and wake-up pipe.

        The serving thread does not exist in the child; ``socket.shutdown`` would act on the socket the
        parent is still serving on, so only our descriptors are closed.
        """
        server, wake = self._server, self._wake
        self._server = self._thread = self._wake = None
        if server is not None:
            try:
                server.socket.close()
            except OSError:
                pass
        for fd in wake or ():
            try:
                _os.close(fd)
            except OSError:
                pass

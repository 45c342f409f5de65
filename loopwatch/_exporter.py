"""The built-in ``/metrics`` endpoint: prometheus_client's WSGI server on its own threads.

It never touches the event loop, so it answers while the loop is stalled -- the moment it matters.
(Scrapes do wait while a C call holds the GIL: no Python thread can run then.)

``metrics_port`` may be a range (``"9320-9329"``): the exporter binds the first free port in it, so
every worker of a pre-forking server (gunicorn) gets its own port -- its own scrape target.  Each
scrape collects under :attr:`Exporter.gate`, which the fork handler (``_fork``) holds across
``fork()``: a child never inherits a metric lock taken by a scrape that was running at that moment.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import start_http_server

# Bind errors after which the next port of a range is tried; anything else (a bad address) stops.
_TRY_NEXT = {errno.EADDRINUSE, errno.EACCES}


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


class Exporter:
    def __init__(self, addr: str, port: int | range, registry: Any) -> None:
        self.addr = addr
        self.ports = range(port, port + 1) if isinstance(port, int) else port
        self._registry = registry
        self.gate = threading.Lock()
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind the first free port and serve; raises the last ``OSError`` if none could be bound
        (e.g. every port is taken), without leaving a thread behind."""
        error: OSError | None = None
        for port in self.ports:
            try:
                self._server, self._thread = start_http_server(
                    port, addr=self.addr, registry=_GatedRegistry(self._registry, self.gate))
            except OSError as exc:
                error = exc
                if exc.errno in _TRY_NEXT:
                    continue
                raise
            self._thread.name = "loopwatch-exporter"
            return
        raise error if error is not None else OSError(errno.EINVAL, "no port to bind")

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
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(5)

    def abandon(self) -> None:
        """In a forked child: close our copy of the parent's listening socket and forget the server.

        Not ``shutdown()``: the serving thread does not exist in the child (it would wait for it
        forever), and ``socket.shutdown`` would act on the socket the parent is still serving on.
        """
        server = self._server
        self._server = self._thread = None
        if server is not None:
            try:
                server.socket.close()
            except OSError:
                pass

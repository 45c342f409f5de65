"""The built-in ``/metrics`` endpoint: prometheus_client's exposition, served by one thread of ours.

It never touches the event loop, so it answers while the loop is stalled -- the moment it matters.
(Scrapes do wait while a C call holds the GIL: no Python thread can run then.)

The serving thread sleeps in ``epoll`` on the listening socket and a wake-up pipe: no periodic wake-ups
while nobody scrapes (prometheus_client's own ``start_http_server`` polls twice a second and starts a
thread per request), and ``close()`` returns at once instead of waiting for the next poll.  Requests are
answered one at a time in that thread -- a scrape takes milliseconds, and a client that connects and says
nothing is dropped after ``REQUEST_TIMEOUT`` seconds.  The HTTP is minimal (a GET, its ``Accept`` and
``Accept-Encoding`` headers and ``name[]`` filters, then ``Connection: close``): the body is what
prometheus_client's own WSGI app would serve (its ``choose_encoder``: text or OpenMetrics; gzip when
accepted), without the ~0.8 ms per scrape that ``wsgiref`` and ``email`` header parsing cost here.

``metrics_port`` may be a range (``"9320-9329"``): the exporter binds the first free port in it, so
every worker of a pre-forking server (gunicorn) gets its own port -- its own scrape target.  Each
scrape collects under :attr:`Exporter.gate`, which the fork handler (``_fork``) holds across
``fork()``: a child never inherits a metric lock taken by a scrape that was running at that moment.
"""

from __future__ import annotations

import errno
import gzip
import select
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import parse_qs

from prometheus_client.exposition import choose_encoder, gzip_accepted

from . import _forksafe, _scrape
from . import _unpatched as _os
from ._component import Component, Degrade, Report
from ._iteration import _accel

# Bind errors after which the next port of a range is tried; anything else (a bad address) stops.
_TRY_NEXT = {errno.EADDRINUSE, errno.EACCES}
REQUEST_TIMEOUT = 10.0  # seconds a client may take to send its request and read the answer
MAX_HEAD = 65536  # bytes of request line and headers read at most
GZIP_HOLDING_GIL = 65536  # bytes of body at most compressed without releasing the GIL (~2 ms)


class _GatedRegistry:
    """What the WSGI app collects from: the registry, collected under the gate."""

    def __init__(self, registry: Any, gate: threading.Lock) -> None:
        self._registry = registry
        self._gate = gate

    def collect(self) -> Iterator[Any]:
        with self._gate:
            families = list(_scrape.collect(self._registry))
        return iter(families)

    def restricted_registry(self, names: Iterable[str]) -> _GatedRegistry:
        return _GatedRegistry(self._registry.restricted_registry(names), self._gate)


def _gzip(body: bytes) -> bytes:
    """gzip.compress(body); a body of up to ``GZIP_HOLDING_GIL`` bytes is compressed by ``_accel`` holding
    the GIL (~0.3 ms for a typical scrape), a larger one by zlib releasing it -- so that the event loop's
    thread is never held up for long by a compression."""
    if len(body) <= GZIP_HOLDING_GIL and hasattr(_accel, "gzip"):
        try:
            return _accel.gzip(body, 6)
        except OSError:  # libz.so.1 not loadable: zlib's own
            pass
    return gzip.compress(body)


def _respond(registry: Any, head: bytes) -> bytes:
    """The whole HTTP response to a request whose head (request line and headers) is ``head``."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    method, target = (parts[0], parts[1]) if len(parts) >= 2 else ("", "/")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    path, _, query = target.partition("?")
    status, extra, body = "200 OK", [], b""
    if method == "OPTIONS":
        extra = [("Allow", "OPTIONS,GET")]
    elif method not in ("GET", "HEAD"):
        status, extra = "405 Method Not Allowed", [("Allow", "OPTIONS,GET")]
        body = f"# HTTP {status}: {method}; use OPTIONS or GET\n".encode()
    elif path != "/favicon.ico":
        encoder, content_type = choose_encoder(headers.get("accept"))
        params = parse_qs(query)
        if "name[]" in params:
            registry = registry.restricted_registry(params["name[]"])
        body = encoder(registry)
        extra = [("Content-Type", content_type)]
        if gzip_accepted(headers.get("accept-encoding")):
            body = _gzip(body)
            extra.append(("Content-Encoding", "gzip"))
    fields = "".join(f"{k}: {v}\r\n" for k, v in [*extra, ("Content-Length", str(len(body))), ("Connection", "close")])
    return f"HTTP/1.1 {status}\r\n{fields}\r\n".encode("latin-1") + (b"" if method == "HEAD" else body)


def _family(addr: str, port: int) -> int:
    """The address family of ``addr`` (an IPv6 address needs ``AF_INET6``)."""
    try:
        return socket.getaddrinfo(addr or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    except (OSError, IndexError):
        return socket.AF_INET


def _listen(addr: str, port: int) -> socket.socket:
    sock = socket.socket(_family(addr, port), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((addr, port))
        sock.listen(16)
    except BaseException:
        sock.close()
        raise
    sock.set_inheritable(False)
    sock.setblocking(False)  # accept() after epoll never waits (a client that gave up meanwhile)
    return sock


def _wait(fd: int, event: int, deadline: float) -> bool:
    """Wait (releasing the GIL) until ``fd`` is ready for ``event``; False once ``deadline`` has passed."""
    poller = select.poll()
    poller.register(fd, event)
    return bool(poller.poll(max(0.0, deadline - time.monotonic()) * 1000))


def _exchange(fd: int, registry: Any) -> None:
    """Read a request on the non-blocking connection ``fd`` and send the answer, holding the GIL for
    every system call (``_accel``): waiting in ``poll()`` -- which releases it -- only when the client's
    data has not arrived yet or the socket's buffer is full."""
    deadline = time.monotonic() + REQUEST_TIMEOUT
    head = b""
    while b"\r\n\r\n" not in head and len(head) < MAX_HEAD:
        chunk = _accel.recv(fd, 4096)
        if chunk is None:
            if not _wait(fd, select.POLLIN, deadline):
                return
            continue
        if not chunk:
            return
        head += chunk
    data = memoryview(_respond(registry, head.split(b"\r\n\r\n", 1)[0]))
    while data:
        sent = _accel.send(fd, data)
        if not sent and not _wait(fd, select.POLLOUT, deadline):
            return
        data = data[sent:]


class Exporter:
    def __init__(self, addr: str, port: int | range, registry: Any, tls: ssl.SSLContext | None = None) -> None:
        self.addr = addr
        self.tls = tls  # serve HTTPS (metrics_certfile / metrics_keyfile, see _config.tls_context)
        self.ports = range(port, port + 1) if isinstance(port, int) else port
        self._registry = registry
        self.gate = _forksafe.lock()
        self._server: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._wake: tuple[int, int] | None = None
        self.on_error: Any = None  # set by the agent: counts a failure of the serving thread

    def start(self) -> None:
        """Bind the first free port and serve; raises the last ``OSError`` if none could be bound
        (e.g. every port is taken), without leaving a thread or a descriptor behind."""
        error: OSError | None = None
        for port in self.ports:
            try:
                server = _listen(self.addr, port)
            except OSError as exc:
                error = exc
                if exc.errno in _TRY_NEXT:
                    continue
                raise
            try:
                wake = _os.pipe()
            except OSError:
                server.close()
                raise
            self._server, self._wake = server, wake
            self._thread = threading.Thread(target=self._serve, args=(server, wake[0]), name="loopwatch-exporter",
                                            daemon=True)
            self._thread.start()
            return
        raise error if error is not None else OSError(errno.EINVAL, "no port to bind")

    def _serve(self, server: socket.socket, wake: int) -> None:
        registry = _GatedRegistry(self._registry, self.gate)
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(server, selectors.EVENT_READ)
                selector.register(wake, selectors.EVENT_READ)
                while True:
                    ready = selector.select()
                    if any(key.fileobj == wake for key, _ in ready):
                        return
                    if self.tls is None and hasattr(_accel, "accept"):
                        self._answer_fast(server.fileno(), registry)
                        continue
                    try:
                        conn, _ = server.accept()
                    except OSError:  # the client gave up already
                        continue
                    with conn:
                        self._answer(conn, registry, self.tls)
        except Exception as exc:  # noqa: BLE001 - never an unhandled exception in the host's threads
            if self._server is server and self.on_error is not None:
                self.on_error(exc)

    @staticmethod
    def _answer_fast(server: int, registry: Any) -> None:
        """Plain HTTP, every system call holding the GIL (see ``_exchange``)."""
        try:
            fd = _accel.accept(server)
        except OSError:
            return
        if fd is None:  # the client gave up already
            return
        try:
            _exchange(fd, registry)
        except OSError:  # a client that went away: not an error of ours
            pass
        finally:
            _accel.close(fd)

    @staticmethod
    def _answer(conn: socket.socket, registry: Any, tls: ssl.SSLContext | None = None) -> None:
        try:
            conn.settimeout(REQUEST_TIMEOUT)
            if tls is not None:  # the handshake, within the same timeout; a failed one is the client's
                with tls.wrap_socket(conn, server_side=True) as secure:
                    Exporter._answer(secure, registry)  # type: ignore[arg-type]
                return
            head = b""
            while b"\r\n\r\n" not in head and len(head) < MAX_HEAD:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                head += chunk
            conn.sendall(_respond(registry, head.split(b"\r\n\r\n", 1)[0]))
        except OSError:  # a client that went away, or said nothing in time: not an error of ours
            pass

    @property
    def serving(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    @property
    def port(self) -> int | None:
        """The port actually bound, or ``None``."""
        return None if self._server is None else int(self._server.getsockname()[1])

    @property
    def url(self) -> str | None:
        if self._server is None:
            return None
        host, port = self._server.getsockname()[:2]
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"{'https' if self.tls is not None else 'http'}://{host}:{port}/metrics"

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
            server.close()
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
                server.close()
            except OSError:
                pass
        for fd in wake or ():
            try:
                _os.close(fd)
            except OSError:
                pass


class MetricsEndpoint(Component):
    """The exporter as a component: serves ``/metrics`` on the first free port of ``ports`` from
    ``start()``; a port it cannot bind degrades it (the series are still collected in the registry)."""

    component = "exporter"

    def __init__(self, addr: str, ports: range, port_text: str, registry: Any, *, report: Report,
                 count: Callable[[str], None], degrade: Degrade, tls: ssl.SSLContext | None = None) -> None:
        super().__init__(report=report)
        self._tls = tls
        self._count = count
        self.addr, self.ports, self.port_text = addr, ports, port_text
        self._registry = registry
        self._degrade = degrade
        self.server: Exporter | None = None

    @property
    def url(self) -> str | None:
        return self.server.url if self.server is not None else None

    def up(self) -> bool:
        server = self.server
        return server is not None and server.serving

    def start(self) -> None:
        if self.server is not None:
            return
        server = Exporter(self.addr, self.ports, self._registry, self._tls)
        server.on_error = lambda exc: self.report("exporter", exc)
        try:
            server.start()
        except OSError as exc:
            self._count("exporter")  # the reason is logged once, as loopwatch.degraded
            where = f"{self.addr}:{self.port_text}"
            if len(self.ports) > 1 and exc.errno == errno.EADDRINUSE:
                why = f"no free port in the range {self.port_text} ({exc.strerror or exc})"
            else:
                why = str(exc.strerror or exc)
            self._degrade("exporter", f"cannot serve /metrics on {where}: {why}; metrics are "
                                      f"still collected in the registry")
            return
        self.server = server

    def stop(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            server.close()

    def after_fork(self) -> None:
        """The child binds its own port when it resumes (``start()``); the parent's socket is the parent's."""
        server, self.server = self.server, None
        if server is not None:
            server.abandon()

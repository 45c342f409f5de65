"""The aiomonitor console, with loopwatch's commands (``console=True`` or a port; off by default).

aiomonitor (the ``[aiomonitor]`` extra) serves a telnet console -- ``telnet 127.0.0.1 20101``, ``nc``, or
``python -m aiomonitor.cli -p 20101`` -- from its own thread and event loop, so it answers while the
application's loop is stalled (as long as the stall lets the GIL go: in a C call that holds the GIL no
Python thread runs, this one included, and the console answers once it is released).  loopwatch starts it
for the first loop it watches and adds these commands to aiomonitor's own (``ps``, ``where``, ``cancel``...):

* ``lw-lag`` -- each watched loop: how long it has been stuck right now, and its last probe delay;
* ``lw-stalls [-n N]`` -- the stalls going on (culprit, dump, request) and the last ones that ended: duration,
  kind, culprit, dump path and the blocked request's route (a ring of the last 32, kept by the watchdog);
* ``lw-dump`` -- write a dump now (``reason: "requested"``), and print its path and culprit;
* ``lw-threads`` -- threads, their CPU, and the GIL figures; ``lw-executors`` and ``lw-pools`` -- the watched
  executors' and pools' figures.  The same values a scrape gets, read from the same components.

**Secure defaults.**  Off unless asked for.  Bound to ``console_addr`` -- 127.0.0.1 unless another address is
given explicitly, which is logged as a warning (``loopwatch.console_exposed``): anyone who can reach the
port can cancel the application's tasks and send it signals.  aiomonitor's web UI is bound to the same
address, on a free port of its own (logged); its Python REPL (``console`` command), which would run any code
as the application, is not enabled.  aiomonitor's task factory -- which records every task's creation
stack, about 190 µs per task -- stays off unless ``console_task_factory=True``.

With a port range (``console="20101-20110"``) each process takes the first free port: one console per
worker of a pre-forking server.  Without aiomonitor installed the console is off with a logged reason
(``loopwatch.degraded``, ``feature=console``); everything else runs.
"""

from __future__ import annotations

import datetime as _dt
import importlib.util
import ipaddress
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any

from . import _forksafe
from . import _unpatched as _os
from ._component import Component, Degrade, Report
from ._log import emit

STOP_TIMEOUT = 5.0  # seconds uninstall() waits for the console's thread
START_TIMEOUT = 30.0  # seconds the starting thread waits for aiomonitor's (then: degraded)


class ConsoleView:
    """What the console's commands read: callables into the agent's components, none holding the agent."""

    def __init__(self, *, snapshot: Callable[[], Any], threshold: float, in_progress: Callable[[float], list[dict]],
                 recent: Callable[[], Iterable[dict]], dump_now: Callable[[], Any],
                 figures: Callable[[str], list[Any]], clock: Callable[[], float] = time.monotonic) -> None:
        self.snapshot = snapshot
        self.threshold = threshold
        self.in_progress = in_progress
        self.recent = recent
        self.dump_now = dump_now  # -> (path, dump dict)
        self.figures = figures  # "threads" | "executors" | "pools" -> metric families, or [] if switched off
        self.clock = clock


def is_loopback(addr: str) -> bool:
    try:
        return ipaddress.IPv4Address(addr).is_loopback
    except ValueError:
        return False


def _port_free(addr: str, port: int) -> bool:
    """Whether ``addr:port`` can be listened on now (the way prompt_toolkit's telnet server binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((addr, port))
            sock.listen(1)
        except OSError:
            return False
    return True


def _free_port(addr: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((addr, 0))
        return int(sock.getsockname()[1])


class Console(Component):
    """The console as a component: aiomonitor's ``Monitor`` for the first watched loop, started (and
    stopped) from a short-lived thread of its own, never from the loop's."""

    component = "console"

    def __init__(self, *, ports: range, addr: str, task_factory: bool, view: ConsoleView, report: Report,
                 degrade: Degrade) -> None:
        super().__init__(report=report)
        self._ports = ports
        self._addr = addr
        self._task_factory = task_factory
        self._view = view
        self._degrade = degrade
        self._available = False
        self._lock = _forksafe.lock()  # the monitor and the starter (never held across a start or a close)
        self._monitor: Any = None
        self._probe: Any = None  # the loop the monitor watches
        self._starter: threading.Thread | None = None
        self._closer: threading.Thread | None = None
        self._threads: weakref.WeakSet[threading.Thread] = weakref.WeakSet()  # aiomonitor's, for our consoles
        self._stopping = False
        self.port: int | None = None
        self.webui_port: int | None = None
        self.failed: str | None = None

    def start(self) -> None:
        self._stopping = False
        try:
            found = importlib.util.find_spec("aiomonitor") is not None
        except (ImportError, ValueError):  # a broken install, or sys.modules["aiomonitor"] = None
            found = False
        if not found:
            self.failed = "aiomonitor is not installed: pip install 'loopwatch[aiomonitor]'"
            self._degrade("console", self.failed)
            return
        self._available = True
        if not is_loopback(self._addr):
            emit("warning", "loopwatch.console_exposed", addr=self._addr,
                 note="the console is reachable from other hosts: whoever reaches it can cancel tasks and send "
                      "signals to this process")

    def up(self) -> bool | None:
        if not self._available:
            return False if self.failed is not None else None
        monitor = self._monitor
        if monitor is None:  # could not start (0), or not started yet / no loop (no series)
            return False if self.failed is not None else None
        thread = getattr(monitor, "_ui_thread", None)
        return bool(thread is not None and thread.is_alive())

    def owns_current_thread(self) -> bool:
        """Whether this is the thread of a console's own loop (the agent does not watch that loop)."""
        return threading.current_thread() in self._threads

    # -- loops -----------------------------------------------------------------------------------
    def attach(self, probe: Any) -> None:
        """A loop is watched (in its thread): the first one gets the console."""
        if not self._available or self._stopping:
            return
        with self._lock:
            if self._probe is not None and not self._probe.closed:
                return
            if self._starter is not None and self._starter.is_alive():
                return
            self._probe = probe
            self._starter = threading.Thread(target=self._open, args=(probe,), name="loopwatch-console-start",
                                             daemon=True)
            self._starter.start()

    def detach(self, probe: Any) -> None:
        """A loop is no longer watched: if it had the console, close it (the next loop gets one)."""
        with self._lock:
            if probe is not self._probe:
                return
            self._probe = None
            monitor, self._monitor = self._monitor, None
            self.port = self.webui_port = None
            if monitor is not None:  # closed off this thread; the next console waits for it (same port)
                self._closer = threading.Thread(target=self._close, args=(monitor,), name="loopwatch-console-stop",
                                                daemon=True)
                self._closer.start()

    # -- starting and stopping ---------------------------------------------------------------------
    def _open(self, probe: Any) -> None:
        closer = self._closer
        if closer is not None:
            closer.join(STOP_TIMEOUT)  # the previous loop's console lets its port go first
        try:
            monitor = self._new_monitor(probe)
        except Exception as exc:  # noqa: BLE001 - the console is optional: degrade, never raise
            self.failed = str(exc)
            self._degrade("console", f"cannot start the aiomonitor console: {exc}")
            return
        if monitor is None:
            return
        with self._lock:
            current = self._probe is probe and not self._stopping
            if current:
                self._monitor = monitor
        if not current:  # detached or stopped while starting
            self._close(monitor)
            return
        emit("info", "loopwatch.console", telnet=f"{self._addr}:{self.port}",
             webui=f"http://{self._addr}:{self.webui_port}", loop=probe.label, task_factory=self._task_factory)

    def _new_monitor(self, probe: Any) -> Any:
        loop = probe.loop
        if loop is None or loop.is_closed():
            return None
        port = next((p for p in self._ports if _port_free(self._addr, p)), None)
        if port is None:
            first, last = self._ports[0], self._ports[-1]
            where = f"port {first}" if first == last else f"ports {first}-{last}"
            raise OSError(f"{where} on {self._addr} already in use")
        webui = _free_port(self._addr)
        monitor_class = _monitor_class()
        monitor = monitor_class(loop, host=self._addr, termui_port=port, webui_port=webui, console_port=0,
                                console_enabled=False, hook_task_factory=self._task_factory)
        monitor.loopwatch = self._view
        monitor._ui_thread.name = "loopwatch-console"  # its own thread and loop; named for thread metrics
        self._threads.add(monitor._ui_thread)
        started = threading.Event()

        def run() -> None:
            monitor.start()
            started.set()

        # Monitor.start() waits for its thread without a timeout: a failure there (its web UI's port taken
        # meanwhile) would never return -- so wait here, bounded.
        runner = threading.Thread(target=run, name="loopwatch-console-start", daemon=True)
        runner.start()
        if not started.wait(START_TIMEOUT):
            raise TimeoutError(f"aiomonitor did not start within {START_TIMEOUT:g} s")
        monitor._event_loop_thread_id = probe.thread_ident  # its `stacktrace` command: the loop's thread, not ours
        if _port_free(self._addr, port):  # its telnet server failed in a task of its own, silently
            self._close(monitor)
            raise OSError(f"aiomonitor's telnet server did not listen on {self._addr}:{port}")
        self.port, self.webui_port = port, webui
        return monitor

    def _close(self, monitor: Any) -> None:
        loop = getattr(monitor, "_monitored_loop", None)
        factory = loop.get_task_factory() if loop is not None else None
        try:
            monitor.close()
        except Exception as exc:  # noqa: BLE001
            self.report("console", exc)
        if not self._task_factory and loop is not None and not loop.is_closed():
            # close() puts back the factory it saw at start: keep one the application set since.
            loop.set_task_factory(factory)

    def stop(self) -> None:
        self._stopping = True
        with self._lock:
            starter, self._starter = self._starter, None
            self._probe = None
        if starter is not None and starter is not threading.current_thread():
            starter.join(STOP_TIMEOUT)
        with self._lock:
            monitor, self._monitor = self._monitor, None
        if monitor is not None:
            closer = threading.Thread(target=self._close, args=(monitor,), name="loopwatch-console-stop",
                                      daemon=True)
            closer.start()
            closer.join(STOP_TIMEOUT)
        self.port = self.webui_port = None

    def after_fork(self) -> None:
        """The monitor's thread is the parent's; its listening sockets are copies: closed here, so the
        parent's ports are not held by the child.  The child starts its own console when its loop starts."""
        monitor, self._monitor = self._monitor, None
        self._probe = None
        self._starter = self._closer = None
        self.port = self.webui_port = None
        if monitor is None:
            return
        ui_loop = getattr(monitor, "_ui_loop", None)
        selector = getattr(ui_loop, "_selector", None)
        try:
            fds = {key.fd for key in selector.get_map().values()} if selector is not None else set()
            inner = getattr(selector, "_selector", None)
            if inner is not None and hasattr(inner, "fileno"):
                fds.add(inner.fileno())
        except Exception:  # noqa: BLE001 - best effort in a child
            fds = set()
        for fd in fds:
            try:
                _os.close(fd)
            except OSError:
                pass


# -- aiomonitor: the Monitor class and loopwatch's commands (imported only when a console starts) ---------

_monitor_cls: Any = None


def _monitor_class() -> Any:
    global _monitor_cls
    if _monitor_cls is None:
        import aiomonitor

        class LoopwatchMonitor(aiomonitor.Monitor):  # type: ignore[misc, name-defined]
            """aiomonitor's Monitor, with loopwatch's view for the ``lw-*`` commands."""

            loopwatch: ConsoleView | None = None

        _register_commands()
        _monitor_cls = LoopwatchMonitor
    return _monitor_cls


def _view_of(ctx: Any) -> ConsoleView | None:
    return getattr(ctx.obj, "loopwatch", None)


def _register_commands() -> None:
    import click
    from aiomonitor.termui.commands import auto_command_done, custom_help_option, monitor_cli, print_fail

    if "lw-lag" in monitor_cli.commands:
        return

    def command(name: str) -> Callable[[Callable[..., None]], Any]:
        def wrap(fn: Callable[..., None]) -> Any:
            def run(ctx: Any, *args: Any, **kwargs: Any) -> None:
                view = _view_of(ctx)
                if view is None:
                    print_fail("loopwatch is not running in this process (or this console is not loopwatch's)")
                    return
                try:
                    fn(view, *args, **kwargs)
                except Exception as exc:  # noqa: BLE001 - a console command never takes the console down
                    print_fail(f"{name} failed: {exc!r}")

            run.__name__, run.__doc__ = fn.__name__, fn.__doc__
            run.__click_params__ = getattr(fn, "__click_params__", [])  # type: ignore[attr-defined]
            return monitor_cli.command(name=name)(custom_help_option(auto_command_done(run)))
        return wrap

    echo = click.echo

    @command("lw-lag")
    def lw_lag(view: ConsoleView) -> None:
        """Live event-loop lag of each loop loopwatch watches"""
        snapshot = view.snapshot()
        if snapshot is None:
            echo("loopwatch is not installed")
            return
        rows = [("loop", "thread", "running", "lag now (s)", "last probe delay (s)", "")]
        for loop in snapshot.loops:
            state = "STALLED" if loop.running and loop.lag_seconds >= view.threshold else ""
            rows.append((loop.label, loop.thread_name, "yes" if loop.running else "no", f"{loop.lag_seconds:.3f}",
                         f"{loop.last_delay_seconds:.3f}", state))
        echo(_table(rows))
        echo(f"pid {snapshot.pid}; a stall is a lag of {view.threshold:g} s or more (the first lag threshold)")

    @command("lw-stalls")
    @click.option("-n", "count", type=int, default=10, show_default=True, help="how many ended stalls to list")
    def lw_stalls(view: ConsoleView, count: int) -> None:
        """Stalls going on now and the last ones that ended: culprit, kind, dump"""
        now = view.clock()
        live = view.in_progress(now)
        echo(f"stalls going on now: {len(live)}")
        for stall in live:
            echo(f"  loop {stall['loop']}: stuck for {stall['duration']:.3f} s, kind {stall['kind'] or 'not judged yet'}")
            echo(f"    culprit: {stall['culprit'] or 'not captured'}")
            echo(f"    dump:    {stall['dump'] or '-'}")
            if stall.get("trace_id") or stall.get("route"):
                echo(f"    request: {stall.get('route') or '-'}  trace_id {stall.get('trace_id') or '-'}")
            if stall.get("note"):
                echo(f"    note:    {stall['note']}")
        recent = list(view.recent())[-max(0, count):][::-1]
        echo(f"last {len(recent)} ended stalls, newest first:")
        rows = [("ended (UTC)", "loop", "seconds", "kind", "culprit", "dump", "request")]
        for stall in recent:
            when = _dt.datetime.fromtimestamp(stall["ended_at"], _dt.timezone.utc).strftime("%H:%M:%S")
            rows.append((when, stall["loop"], f"{stall['duration']:.3f}", stall["kind"] or "?",
                         stall["culprit"] or "-", stall["dump"] or _no_dump(stall.get("note")),
                         stall.get("route") or stall.get("trace_id") or "-"))
        if recent:
            echo(_table(rows))

    @command("lw-dump")
    def lw_dump(view: ConsoleView) -> None:
        """Write a loopwatch dump now (stacks of the loop, threads, tasks)"""
        path, dump = view.dump_now()
        culprit = dump.get("culprit")
        echo(f"dump written: {path}")
        echo(f"  culprit: {culprit['filename']}:{culprit['lineno']} in {culprit['function']}" if culprit
             else "  culprit: none found in application code")
        if culprit and culprit.get("line"):
            echo(f"      {culprit['line']}")
        stall = dump.get("stall_seconds")
        if isinstance(stall, (int, float)) and stall > 0.01:
            echo(f"  loop {dump.get('loop')!r} stuck for {stall:.3f} s (kind {dump.get('kind') or 'unknown'})")
        else:
            echo(f"  loop {dump.get('loop')!r} not stalled")

    def figures(name: str, title: str) -> Callable[[ConsoleView], None]:
        def show(view: ConsoleView) -> None:
            rows = [("metric", "labels", "value")]
            for family in view.figures(name):
                for sample in family.samples:
                    if sample.name.endswith(("_bucket", "_created")):
                        continue
                    labels = ",".join(f"{k}={v}" for k, v in sample.labels.items() if k != "service")
                    rows.append((sample.name, labels, f"{sample.value:g}"))
            if len(rows) == 1:
                echo(f"no {title} figures: none watched yet, or the feature is switched off (disable=)")
                return
            echo(_table(rows))
        return show

    threads_show = figures("threads", "thread or GIL")
    executors_show = figures("executors", "executor")
    pools_show = figures("pools", "pool")

    @command("lw-threads")
    def lw_threads(view: ConsoleView) -> None:
        """Threads, their CPU, and the GIL figures (as scraped)"""
        threads_show(view)

    @command("lw-executors")
    def lw_executors(view: ConsoleView) -> None:
        """Executors: queue depth, threads, limit, queue wait (as scraped)"""
        executors_show(view)

    @command("lw-pools")
    def lw_pools(view: ConsoleView) -> None:
        """Database and cache pools: connections, waiters, timeouts (as scraped)"""
        pools_show(view)


def _no_dump(note: str | None) -> str:
    """The dump column of a stall without a dump: why (cooldown, not seen live, dumps off)."""
    if not note:
        return "-"
    return f"- ({note if len(note) <= 72 else note[:71] + '…'})"


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)

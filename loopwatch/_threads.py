"""Per-thread CPU, thread count and process CPU, read at scrape time in the scraping thread (psutil).

Nothing runs periodically for these: each scrape reads ``/proc/self/task/*/stat`` in the exporter thread,
never on the loop -- with the C accelerator in one call that holds the GIL throughout (~0.1 ms for 20
threads: under GIL contention a read per thread from Python would wait for the GIL again after every
open, read and close), else through psutil; the process's CPU is ``time.process_time()`` (one system call).

* ``thread_cpu_seconds_total{thread_name, native_id}``: one series per *kind* of thread.  Python threads
  are named through ``threading``; threads Python does not know (a C library's) get the kernel's name
  (``/proc/self/task/<tid>/comm``).  Names are normalised (``_labels.name_pattern``: every run of digits
  becomes ``N``), so ``worker-1`` ... ``worker-999``, ``ThreadPoolExecutor-0_3`` or a server's thread per
  request are one series each kind, not one per thread; loopwatch's own threads are ``loopwatch-*``.
  A series is the CPU of the live threads of its kind plus what the ended ones used: a counter that never
  goes down, and never disappears.  The first ``TOP`` kinds seen get their own series (``native_id``: the
  first such thread's); later kinds add to ``thread_name="other"``.  So the set of series only grows, up
  to ``TOP + 1``: churn creates none.
* ``threads_total``: threads in the process, Python's and native ones.
* ``cpu_process_cores``: process CPU seconds per second over the window since the previous reading
  (at least ``MIN_WINDOW`` seconds; the first scrape measures from ``install()``).
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable

import psutil
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from . import _forksafe
from ._component import Component, Naming, Report, ignore_error
from ._iteration import _accel
from ._labels import name_pattern

TOP = 20
MIN_WINDOW = 1.0
OTHER = "other"


def python_thread_names() -> dict[int, str]:
    """``{native_id: name}`` of the threads ``threading`` knows."""
    names = {}
    for thread in threading.enumerate():
        native_id = getattr(thread, "native_id", None)
        if native_id is not None:
            names[native_id] = thread.name
    return names


def kernel_thread_name(tid: int) -> str:
    try:
        with open(f"/proc/self/task/{tid}/comm", encoding="utf-8", errors="replace") as f:
            return f.read().strip() or f"thread-{tid}"
    except OSError:
        return f"thread-{tid}"


@dataclasses.dataclass
class _Kind:
    native_id: str  # the first thread of this kind seen (label value; fixed, so the series never changes)
    ended: float = 0.0  # CPU seconds of its threads that have ended


class ThreadCpu(Component):
    """The thread/CPU component (see the module docstring)."""

    component = "threads"

    def __init__(self, naming: Naming, *, process: psutil.Process | None = None, top: int = TOP,
                 clock: Callable[[], float] = time.monotonic,
                 names: Callable[[], dict[int, str]] = python_thread_names,
                 kernel_name: Callable[[int], str] = kernel_thread_name, report: Report = ignore_error) -> None:
        super().__init__(naming, report=report)
        self._own = process is None  # this process: read it the fast way (see the module docstring)
        self._process = process or psutil.Process()
        self._top = top
        self._clock = clock
        self._names = names
        self._kernel_name = kernel_name
        self._lock = _forksafe.lock()
        self.reset()

    def reset(self) -> None:
        """Start from now (also in a forked child: another process, other threads)."""
        self._pid = os.getpid()
        self._process = psutil.Process() if self._process.pid != self._pid else self._process
        self._kinds: dict[str, _Kind] = {}
        self._threads: dict[int, tuple[str, float]] = {}  # tid -> (its kind, its CPU at the last scrape)
        self._cores: float | None = None
        self._window_start = (self._clock(), self._process_cpu())

    def after_fork(self) -> None:
        self.reset()

    def _process_cpu(self) -> float:
        if self._own:
            return time.process_time()
        try:
            times = self._process.cpu_times()
            return float(times.user + times.system)
        except psutil.Error:
            return 0.0

    def families(self) -> list[Metric]:
        with self._lock:
            return self._collect()

    def _kind_of(self, tid: int, names: dict[int, str]) -> str:
        kind = name_pattern(names.get(tid) or self._kernel_name(tid))
        if kind not in self._kinds:
            if len(self._kinds) - (OTHER in self._kinds) >= self._top:
                kind = OTHER
            if kind not in self._kinds:
                self._kinds[kind] = _Kind("" if kind == OTHER else str(tid))
        return kind

    def _collect(self) -> list[Metric]:
        family = self.naming.family
        service = self.naming.service
        if self._own and _accel is not None:
            cpu: dict[int, float] = _accel.thread_cpu()
        else:
            cpu = {t.id: float(t.user_time + t.system_time) for t in self._process.threads()}
        names: dict[int, str] | None = None
        threads, kinds = self._threads, self._kinds
        for tid, (kind, last) in list(threads.items()):
            if tid not in cpu or cpu[tid] < last:  # ended (or its id reused by a new thread)
                kinds[kind].ended += last
                del threads[tid]
        live: dict[str, float] = {}
        for tid, used in cpu.items():
            entry = threads.get(tid)
            if entry is None:
                if names is None:
                    names = self._names()
                entry = (self._kind_of(tid, names), used)
            threads[tid] = (entry[0], used)
            live[entry[0]] = live.get(entry[0], 0.0) + used

        per_thread = family(CounterMetricFamily, "thread_cpu_seconds",
                            f"CPU seconds (user + system) per kind of thread (names with their digits as N), "
                            f"ended threads included; the first {self._top} kinds, the rest in "
                            f"thread_name=\"other\".", ["thread_name", "native_id"])
        for kind in sorted(kinds):
            per_thread.add_metric([service, kind, kinds[kind].native_id], kinds[kind].ended + live.get(kind, 0.0))

        count = family(GaugeMetricFamily, "threads_total", "Threads in the process (Python and native).")
        count.add_metric([service], float(len(cpu)))

        now, total = self._clock(), self._process_cpu()
        start, start_cpu = self._window_start
        if now - start >= MIN_WINDOW or self._cores is None:
            if now > start:
                self._cores = max(0.0, (total - start_cpu) / (now - start))
                self._window_start = (now, total)
        cores = family(GaugeMetricFamily, "cpu_process_cores",
                       "Process CPU use in cores (CPU seconds per second) since the previous reading.")
        cores.add_metric([service], self._cores or 0.0)
        return [per_thread, count, cores]

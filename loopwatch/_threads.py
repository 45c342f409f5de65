"""Per-thread CPU, thread count and process CPU, read at scrape time in the scraping thread (psutil).

Nothing runs periodically for these: each scrape reads ``/proc/self/task/*/stat`` through psutil
(~0.5 ms for 20 threads, in the exporter thread, never on the loop).

* ``thread_cpu_seconds_total{thread_name, native_id}``: Python threads are named through
  ``threading`` (their ``native_id``); threads Python does not know (a C library's) get the kernel's
  name (``/proc/self/task/<tid>/comm``).  The ``TOP`` threads with the most CPU keep their own series;
  the CPU of the others goes to ``thread_name="other"``, which only ever grows (each folded thread
  adds what it used since the previous scrape).  A thread that ended disappears.  A thread promoted
  from ``other`` to its own series exports what it used since it was folded, so the series still add
  up to the CPU of the process's live threads plus what ``other`` accumulated.
* ``threads_total``: threads in the process, Python's and native ones.
* ``cpu_process_cores``: process CPU seconds per second over the window since the previous reading
  (at least ``MIN_WINDOW`` seconds; the first scrape measures from ``install()``).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import psutil
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from . import _forksafe
from ._component import Component, Naming, Report, ignore_error

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


class ThreadCpu(Component):
    """The thread/CPU component (see the module docstring)."""

    component = "threads"

    def __init__(self, naming: Naming, *, process: psutil.Process | None = None, top: int = TOP,
                 clock: Callable[[], float] = time.monotonic,
                 names: Callable[[], dict[int, str]] = python_thread_names,
                 kernel_name: Callable[[int], str] = kernel_thread_name, report: Report = ignore_error) -> None:
        super().__init__(naming, report=report)
        self._process = process or psutil.Process()
        self._top = top
        self._clock = clock
        self._names = names
        self._kernel_name = kernel_name
        self._lock = _forksafe.lock()
        self.reset()

    def reset(self) -> None:
        """Start from now (also in a forked child: another process, other threads)."""
        self._lock = _forksafe.lock()
        self._pid = os.getpid()
        self._process = psutil.Process() if self._process.pid != self._pid else self._process
        self._last_cpu: dict[int, float] = {}  # tid -> its CPU at the previous scrape
        self._folded: dict[int, float] = {}  # tid -> CPU it added to "other" so far
        self._other = 0.0
        self._cores: float | None = None
        self._window_start = (self._clock(), self._process_cpu())

    def _process_cpu(self) -> float:
        try:
            times = self._process.cpu_times()
            return float(times.user + times.system)
        except psutil.Error:
            return 0.0

    def after_fork(self) -> None:
        self.reset()

    def families(self) -> list[Metric]:
        with self._lock:
            return self._collect()

    def _collect(self) -> list[Metric]:
        family = self.naming.family
        service = self.naming.service
        threads = self._process.threads()
        cpu = {t.id: float(t.user_time + t.system_time) for t in threads}
        names = self._names()

        # The busiest threads (CPU so far) keep their own series.
        ranked = sorted(cpu, key=lambda tid: (-cpu[tid], tid))
        own = set(ranked[: self._top])
        for tid in ranked[self._top:]:
            delta = cpu[tid] - self._last_cpu.get(tid, 0.0)
            if delta > 0:
                self._other += delta
                self._folded[tid] = self._folded.get(tid, 0.0) + delta
        self._last_cpu = cpu
        self._folded = {tid: v for tid, v in self._folded.items() if tid in cpu}

        per_thread = family(CounterMetricFamily, "thread_cpu_seconds",
                            f"CPU seconds per thread (user + system); the {self._top} busiest threads, the "
                            f"rest summed in thread_name=\"other\".", ["thread_name", "native_id"])
        for tid in sorted(own):
            name = names.get(tid) or self._kernel_name(tid)
            per_thread.add_metric([service, name, str(tid)], max(0.0, cpu[tid] - self._folded.get(tid, 0.0)))
        if self._other > 0 or len(cpu) > self._top:
            per_thread.add_metric([service, OTHER, ""], self._other)

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

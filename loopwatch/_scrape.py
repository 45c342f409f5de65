"""What the exporter collects, without handing the GIL over (issue 12: a scrape of a busy service is fast).

Under GIL contention every system call that releases the GIL costs a wait to get it back: up to a switch
interval (5 ms) per busy thread.  prometheus_client's :class:`~prometheus_client.ProcessCollector`
(``process_*`` in the default registry) reads ``/proc/self/stat`` and ``/proc/self/limits`` through
Python file objects and lists ``/proc/self/fd``: some twenty hand-overs, plus one per open descriptor
(``os.listdir`` releases the GIL for every entry) -- seconds for a service with thousands of sockets and
three busy threads.

:func:`collect` is the registry's own ``collect()`` with one difference: a ``ProcessCollector`` reading
this process's ``/proc`` is replaced by :class:`FastProcess`, which produces the same families from the
same files, read by ``_accel`` holding the GIL.  Everything else -- the app's own collectors, loopwatch's
-- is collected as the registry would.  Where any of this cannot be recognised (another registry type,
another prometheus_client layout, no ``_accel``), the registry's ``collect()`` is used unchanged.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector

from ._iteration import _accel

STAT_LIMIT = 4096  # /proc/<pid>/stat is ~300 bytes
LIMITS_LIMIT = 8192  # /proc/<pid>/limits is ~1.4 kB
_PROCESS_FIELDS = ("_proc", "_pid", "_prefix", "_ticks", "_pagesize", "_btime")


class FastProcess:
    """``ProcessCollector.collect()`` for ``collector``, its files read holding the GIL: same names, help,
    types and values (``tests/test_scrape.py`` compares the two)."""

    def __init__(self, collector: ProcessCollector) -> None:
        self._c = collector

    def collect(self) -> list[Any]:
        c = self._c
        if not c._btime:
            return []
        pid = os.path.join(c._proc, str(c._pid()).strip())
        prefix, result = c._prefix, []
        try:
            parts = _accel.read_file(os.path.join(pid, "stat"), STAT_LIMIT).split(b")")[-1].split()
            utime, stime = float(parts[11]) / c._ticks, float(parts[12]) / c._ticks
            result += [
                GaugeMetricFamily(prefix + "virtual_memory_bytes", "Virtual memory size in bytes.",
                                  value=float(parts[20])),
                GaugeMetricFamily(prefix + "resident_memory_bytes", "Resident memory size in bytes.",
                                  value=float(parts[21]) * c._pagesize),
                GaugeMetricFamily(prefix + "start_time_seconds",
                                  "Start time of the process since unix epoch in seconds.",
                                  value=float(parts[19]) / c._ticks + c._btime),
                CounterMetricFamily(prefix + "cpu_seconds_total", "Total user and system CPU time spent in seconds.",
                                    value=utime + stime),
            ]
        except OSError:
            pass
        try:
            max_fds = None
            for line in _accel.read_file(os.path.join(pid, "limits"), LIMITS_LIMIT).splitlines():
                if line.startswith(b"Max open file"):
                    max_fds = GaugeMetricFamily(prefix + "max_fds", "Maximum number of open file descriptors.",
                                                value=float(line.split()[3]))
                    break
            open_fds = GaugeMetricFamily(prefix + "open_fds", "Number of open file descriptors.",
                                         _accel.count_dir(os.path.join(pid, "fd")))
            result += [open_fds] if max_fds is None else [open_fds, max_fds]
        except OSError:
            pass
        return result


def _fast(collector: Any) -> Any:
    if type(collector) is ProcessCollector and all(hasattr(collector, f) for f in _PROCESS_FIELDS):
        return FastProcess(collector)
    return collector


def supported(registry: Any) -> bool:
    """The registry's collection can be done here (a plain ``CollectorRegistry`` of a known layout)."""
    return (_accel is not None and hasattr(_accel, "read_file") and type(registry) is CollectorRegistry
            and all(hasattr(registry, f) for f in ("_lock", "_collector_to_names", "_target_info",
                                                   "_target_info_metric")))


def collect(registry: Any) -> Iterable[Any]:
    """What ``registry.collect()`` yields, process metrics read holding the GIL where possible."""
    if not supported(registry):
        return registry.collect()
    return _collect(registry)


def _collect(registry: CollectorRegistry) -> Iterator[Any]:
    # CollectorRegistry.collect(), prometheus_client 0.17 to 0.26, with _fast() around each collector.
    with registry._lock:
        collectors = copy.copy(registry._collector_to_names)
        target_info = registry._target_info_metric() if registry._target_info else None
    if target_info:
        yield target_info
    for collector in collectors:
        yield from _fast(collector).collect()

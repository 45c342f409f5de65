"""GIL contention, measured directly: how long a thread that wakes up waits before it runs again.

A probe thread (``loopwatch-gil``) sleeps ``gil_probe_interval`` seconds with the GIL released, then
measures how late it runs again.  That lateness is the kernel's wake-up (tens of µs) plus the wait for
the GIL.  CPython hands the GIL over every ``sys.getswitchinterval()`` (5 ms) when a thread asks for it:

* nobody else wants the GIL (idle app, or a loop waiting for I/O): the probe runs again at once;
* one thread holds it running Python (a CPU-bound loop, a ``json.dumps``): the probe waits one switch
  interval, asks, and gets it -- no contention, just one busy thread;
* N threads run Python: they take turns, and a thread that wakes up waits behind the others, about
  ``N - 1`` switch intervals more.

So ``gil_wait_seconds`` (histogram) is the raw wait, and ``gil_contention`` is
``max(0, wait / switch_interval - 1)`` averaged over the last ``WINDOW`` samples: about the number of
*other* threads a thread that becomes ready has to wait behind; ~0 with one busy thread, ~1 with two,
~3 with four.  On a free-threaded build with the GIL disabled there is nothing to wait for: the probe
does not run and ``gil_enabled`` is 0.

What a sample costs: a loop waiting in ``select()`` gives the probe the GIL at once; a loop busy running
Python hands it over after one switch interval and waits to get it back, which cost a callback-heavy loop
~1.5 ms per sample on our loaded 2-core machines (+15% at 100 samples/s, measured in one process, probe
on/off alternating).  Hence one sample per second by default (``gil_probe_interval=1.0``, ~0.15%), a
one-minute window for ``gil_contention``, and ``gil_wait_seconds`` for any other window in PromQL.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from collections.abc import Callable

from prometheus_client.core import GaugeMetricFamily, Metric

from . import _forksafe
from . import _unpatched as _os
from ._component import Component, Naming, Report, ignore_error
from ._series import Histogram

WINDOW = 60  # samples averaged by gil_contention (a minute at the default interval)
BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


def gil_enabled() -> bool:
    """False on a free-threaded build running without the GIL (``python3.13t``)."""
    probe = getattr(sys, "_is_gil_enabled", None)
    return True if probe is None else bool(probe())


class GilContention(Component):
    """The GIL component: the samples and their series, fed by its :class:`GilProbe` thread every
    ``interval`` seconds (0: no thread; a test feeds it its own numbers)."""

    component = "gil"

    def __init__(self, naming: Naming, *, interval: float = 0.0,
                 switch_interval: Callable[[], float] = sys.getswitchinterval, enabled: bool | None = None,
                 report: Report = ignore_error) -> None:
        super().__init__(naming, report=report)
        self._switch_interval = switch_interval
        self.enabled = gil_enabled() if enabled is None else enabled
        self._window: deque[float] = deque(maxlen=WINDOW)
        self._lock = _forksafe.lock()
        self.histogram = self._new_histogram()
        self.probe = GilProbe(self, interval, on_error=lambda exc: self.report("gil", exc))

    def start(self) -> None:
        self.probe.start()

    def stop(self) -> None:
        self.probe.stop()

    def up(self) -> bool | None:
        return self.probe.running if self.enabled and self.probe.interval > 0 else None

    def _new_histogram(self) -> Histogram:
        metrics = self.naming
        histogram = Histogram(
            "gil_wait_seconds", "How late the GIL probe thread ran again after each sleep: the wait for the "
            "GIL (one switch interval when one thread runs Python, more when several compete).",
            ["service"], namespace=metrics.namespace, buckets=BUCKETS)
        histogram.labels(metrics.service)
        return histogram

    def after_fork(self) -> None:
        """A forked child: the probe thread is the parent's; fresh lock and histogram, no samples."""
        self.probe.abandon()
        self._lock = _forksafe.lock()
        self._window = deque(maxlen=WINDOW)
        self.histogram = self._new_histogram()

    def record(self, wait: float) -> None:
        wait = max(0.0, wait)
        interval = self._switch_interval() or 0.005
        self.histogram.labels(self.naming.service).observe(wait)
        with self._lock:
            self._window.append(max(0.0, wait / interval - 1.0))

    def contention(self) -> float | None:
        with self._lock:
            if not self._window:
                return None
            return sum(self._window) / len(self._window)

    def families(self) -> list[Metric]:
        metrics = self.naming
        family = metrics.family
        enabled = family(GaugeMetricFamily, "gil_enabled",
                         "1 if this interpreter has a GIL, 0 on a free-threaded build running without it.")
        enabled.add_metric([metrics.service], 1.0 if self.enabled else 0.0)
        if not self.enabled:
            return [enabled]
        out: list[Metric] = [enabled]
        value = self.contention()
        if value is not None:
            gauge = family(GaugeMetricFamily, "gil_contention",
                           f"About how many other threads a thread that wakes up waits behind for the GIL "
                           f"(mean of max(0, wait / switch interval - 1) over the last {WINDOW} probes); "
                           f"0 with one busy thread.")
            gauge.add_metric([metrics.service], value)
            out.append(gauge)
        switch = family(GaugeMetricFamily, "gil_switch_interval_seconds", "sys.getswitchinterval().")
        switch.add_metric([metrics.service], self._switch_interval())
        out.append(switch)
        out.extend(self.histogram.collect())
        return out


class GilProbe:
    """The ``loopwatch-gil`` thread: sleep, measure how late it runs again, record."""

    def __init__(self, contention: GilContention, interval: float, *,
                 on_error: Callable[[BaseException], None]) -> None:
        self._contention = contention
        self.interval = interval
        self._on_error = on_error
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self.running or not self._contention.enabled or self.interval <= 0:
            return
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loopwatch-gil", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not _os.current_thread():
            thread.join(timeout)

    def abandon(self) -> None:
        """A forked child: the thread does not exist there; forget it without joining."""
        self._thread = None
        self._stop = threading.Event()

    def _run(self) -> None:
        stop, interval, clock = self._stop, self.interval, time.perf_counter
        failures = 0
        while True:
            due = clock() + interval
            if stop.wait(interval):  # the lock's timed wait releases the GIL, like any sleep
                return
            try:
                self._contention.record(clock() - due)
            except Exception as exc:  # noqa: BLE001 - never let the thread die silently
                failures += 1
                self._on_error(exc)
                if failures >= 3:
                    return

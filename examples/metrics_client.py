"""What the examples share: read loopwatch's /metrics from outside the event loop, as Prometheus would.

Not an example itself; the example scripts import it (their directory is on ``sys.path``).
"""

from __future__ import annotations

import socket
import threading
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    """``{(sample name, sorted labels): value}`` of one scrape."""
    body = urllib.request.urlopen(url, timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples named ``name`` whose labels include ``labels`` (0 if none)."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Scraper(threading.Thread):
    """Scrapes /metrics every 100 ms, like an impatient Prometheus, and keeps the main loop's lag."""

    def __init__(self, url: str, namespace: str = "loopwatch") -> None:
        super().__init__(name="scraper", daemon=True)
        self.url = url
        self.metric = f"{namespace}_event_loop_lag_seconds"
        self.samples: list[tuple[float, float]] = []  # (monotonic time the answer arrived, lag)
        self.errors: list[str] = []
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.1):
            try:
                lag = value(scrape(self.url), self.metric, loop="main")
            except OSError as exc:
                self.errors.append(repr(exc))
                continue
            self.samples.append((time.monotonic(), lag))

    def stop(self) -> None:
        self._done.set()
        self.join(10)

    def max_lag(self, start: float = 0.0, end: float = float("inf")) -> tuple[float, int]:
        """The highest lag seen between ``start`` and ``end`` (monotonic), and how many scrapes that was."""
        during = [lag for at, lag in self.samples if start < at < end]
        return max(during, default=0.0), len(during)

"""Measuring inside a child process: latency summaries, peak RSS, HTTP requests, queue depth.

Nothing here imports mlflow or rlm_mlflow at import time (the construction check needs a clean
interpreter).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any


def percentile(values: Sequence[int], q: float) -> int | None:
    """Nearest-rank percentile of the sorted ``values``."""
    if not values:
        return None
    rank = max(0, min(len(values) - 1, math.ceil(q * len(values)) - 1))
    return values[rank]


def summarize(ns: Sequence[int]) -> dict[str, Any]:
    """n, p50, p99, p99.9, max and mean of a list of nanosecond timings, in microseconds."""
    ordered = sorted(ns)
    if not ordered:
        return {"n": 0}

    def at(q: float) -> float:
        return (percentile(ordered, q) or 0) / 1000

    return {
        "n": len(ordered),
        "p50_us": at(0.50),
        "p99_us": at(0.99),
        "p999_us": at(0.999),
        "max_us": ordered[-1] / 1000,
        "mean_us": sum(ordered) / len(ordered) / 1000,
    }


def timer_overhead_ns() -> int:
    """Median cost of two back-to-back ``perf_counter_ns`` calls: included in every timing."""
    pc = time.perf_counter_ns
    samples = []
    for _ in range(10_000):
        t0 = pc()
        samples.append(pc() - t0)
    samples.sort()
    return samples[len(samples) // 2]


class HttpCounter:
    """Counts HTTP requests made through ``requests`` in this process, and the time inside them.

    mlflow's client uses ``requests``; so does rlm_mlflow's transport today. A cross-check of the
    proxy's count, and the only count where there is no proxy. Reads 0 for a client that does not
    use ``requests``: callers fall back to the sink's own ``status()["requests"]``.
    """

    def __init__(self) -> None:
        self.count = 0
        self.seconds = 0.0  # summed over requests: overlapping ones add up
        self._lock = threading.Lock()

    def install(self) -> None:
        import requests.adapters

        original = requests.adapters.HTTPAdapter.send
        counter = self

        def send(adapter: Any, *args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return original(adapter, *args, **kwargs)
            finally:
                with counter._lock:
                    counter.count += 1
                    counter.seconds += time.perf_counter() - t0

        requests.adapters.HTTPAdapter.send = send  # type: ignore[method-assign,assignment]


HTTP = HttpCounter()


class RssPeak:
    """Peak resident set size above a baseline, sampled every 25 ms on a thread."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.baseline = 0
        self.peak = 0
        self._read: Callable[[], int]
        try:
            import psutil

            process = psutil.Process()
            self._read = lambda: int(process.memory_info().rss)
        except ImportError:  # the kernel's high-water mark: coarser (the process's lifetime)
            import resource

            self._read = lambda: int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024

    def __enter__(self) -> RssPeak:
        self.baseline = self.peak = self._read()
        self._thread = threading.Thread(target=self._sample, name="rss-peak", daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.025):
            self.peak = max(self.peak, self._read())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, self._read())

    @property
    def delta_mb(self) -> float:
        return (self.peak - self.baseline) / 1e6


class QueueSampler:
    """The deepest ``status()["queue_depth"]`` seen, sampled every ``interval`` seconds.

    ``status()`` reports the depth now, not its peak, so a sampler thread polls it. A poll takes
    the sink's queue lock for a moment: its cost is inside the hook timings it runs beside.
    """

    def __init__(self, sink: Any, interval: float = 0.005) -> None:
        self._sink = sink
        self._interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.peak = 0
        self.samples = 0

    def sample(self) -> None:
        depth = self._sink.status().get("queue_depth")
        if isinstance(depth, int):
            self.peak = max(self.peak, depth)
        self.samples += 1

    def __enter__(self) -> QueueSampler:
        self._thread = threading.Thread(target=self._run, name="queue-sampler", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.sample()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()

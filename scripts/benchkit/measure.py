"""Measuring inside a child process: latency summaries, peak RSS, HTTP requests, queue depth.

Nothing here imports mlflow or rlm_mlflow at import time (the construction check needs a clean
interpreter).
"""

from __future__ import annotations

import math
import sqlite3
import threading
import time
from collections import Counter
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
        self.paths: Counter[str] = Counter()  # "METHOD /path" (no query string) -> requests
        self.path_seconds: dict[str, float] = {}  # the same -> seconds inside them
        self._lock = threading.Lock()

    def snapshot(self) -> Counter[str]:
        with self._lock:
            return Counter(self.paths)

    def seconds_snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self.path_seconds)

    def install(self) -> None:
        import requests.adapters

        original = requests.adapters.HTTPAdapter.send
        counter = self

        def send(adapter: Any, *args: Any, **kwargs: Any) -> Any:
            request = args[0] if args else kwargs.get("request")
            path = str(getattr(request, "path_url", "") or "").split("?", 1)[0]
            key = f"{getattr(request, 'method', '?')} {path}"
            t0 = time.perf_counter()
            try:
                return original(adapter, *args, **kwargs)
            finally:
                elapsed = time.perf_counter() - t0
                with counter._lock:
                    counter.count += 1
                    counter.seconds += elapsed
                    counter.paths[key] += 1
                    counter.path_seconds[key] = counter.path_seconds.get(key, 0.0) + elapsed

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


def store_counts(db: str, experiment: str) -> tuple[int, int]:
    """``(traces, spans)`` of ``experiment`` in the server's sqlite store, read directly (MLflow's
    tables ``experiments``, ``trace_info``, ``spans``): a cheap "is it readable yet" check."""
    connection = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        row = connection.execute(
            "SELECT experiment_id FROM experiments WHERE name = ?", (experiment,)
        ).fetchone()
        if row is None:
            return 0, 0
        traces = connection.execute(
            "SELECT COUNT(*) FROM trace_info WHERE experiment_id = ?", (row[0],)
        ).fetchone()[0]
        spans = connection.execute(
            "SELECT COUNT(*) FROM spans WHERE experiment_id = ?", (row[0],)
        ).fetchone()[0]
        return int(traces), int(spans)
    except sqlite3.OperationalError:  # the tables do not exist yet (no trace written)
        return 0, 0
    finally:
        connection.close()


def wait_readable(db: str, experiment: str, spans: int, timeout: float) -> tuple[bool, int, int]:
    """Poll the store every 20 ms until ``spans`` spans of ``experiment`` are there (or the
    timeout): ``(all there, traces, spans)`` at the last look."""
    deadline = time.monotonic() + timeout
    while True:
        found_traces, found_spans = store_counts(db, experiment)
        if found_spans >= spans:
            return True, found_traces, found_spans
        if time.monotonic() >= deadline:
            return False, found_traces, found_spans
        time.sleep(0.02)


def span_path(span: Any, by_id: dict[str, Any]) -> tuple[str, ...]:
    """A span's name and its ancestors' names, root first: unique in a trace whose siblings
    have distinct names (a step's number, a child run's id). Where an ancestor is missing (a
    trace half exported), the path starts with the missing parent's id instead."""
    names = []
    seen = set()
    while span.span_id not in seen:
        seen.add(span.span_id)
        names.append(str(span.name))
        if not span.parent_id:
            break
        parent = by_id.get(span.parent_id)
        if parent is None:
            names.append(f"<missing {span.parent_id}>")
            break
        span = parent
    return tuple(reversed(names))


def summarize_traces(traces: Sequence[Any], spans_per_trace: int, skip: str) -> dict[str, Any]:
    """What ``MlflowClient.search_traces`` returned, against what was sent: traces, spans, spans
    seen twice (same id, or the same place in the tree under another id), traces whose span
    count is not ``spans_per_trace``, states. A trace tagged ``run_id=skip`` is left out (the
    warm-up run)."""
    counted = [t for t in traces if t.info.tags.get("run_id") != skip]
    states: Counter[str] = Counter()
    spans = duplicates = incomplete = 0
    per_trace = []
    for trace in counted:
        state = getattr(trace.info.state, "value", trace.info.state)
        states[str(state)] += 1
        found = list(trace.data.spans)
        by_id = {span.span_id: span for span in found}
        paths = Counter(span_path(span, by_id) for span in by_id.values())
        duplicates += len(found) - len(by_id) + sum(n - 1 for n in paths.values())
        spans += len(found)
        per_trace.append(len(found))
        if len(found) != spans_per_trace:
            incomplete += 1
    return {
        "traces": len(counted),
        "spans": spans,
        "duplicates": duplicates,
        "incomplete_traces": incomplete,
        "spans_per_trace_min": min(per_trace, default=0),
        "spans_per_trace_max": max(per_trace, default=0),
        "states": dict(states),
        "skipped": len(traces) - len(counted),
    }

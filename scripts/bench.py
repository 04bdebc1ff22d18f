#!/usr/bin/env python3
"""Benchmark rlm_mlflow's MLflowSink against what users would pick instead.

Three sinks are driven through the same simulated RLM workload, each in a fresh subprocess, against
a real local ``mlflow server`` with a ``FaultProxy`` in pass mode in front of it (the proxy counts
the HTTP requests of every sink the same way, and adds latency for the latency sweep):

- ``sync``: the seed, RLM Code's synchronous fluent-API sink (``mlflow.start_run``, ``log_params``,
  ``set_tags``, ``log_metric`` x2 per step, ``log_metrics``, ``log_artifact``, ``end_run``);
- ``async``: the same sink with MLflow's own async logging (``synchronous=False``);
- ``ours``: ``rlm_mlflow.MLflowSink``.

Usage: ``scripts/bench`` (full run, writes docs/performance.md and docs/performance-latency.png)
or ``scripts/bench --quick --output /tmp/perf.md`` (under a minute on an idle machine).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
if SRC.is_dir() and str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))  # run from a checkout without installing

RESULT_PREFIX = "BENCH-RESULT "
SINKS = ("sync", "async", "ours")
LABELS = {
    "none": "no sink (reference)",
    "sync": "seed: fluent API, synchronous",
    "async": "MLflow async logging (synchronous=False)",
    "ours": "rlm_mlflow.MLflowSink",
    "ours_nojournal": "rlm_mlflow.MLflowSink, journal=False",
}
SHORT = {"sync": "sync (seed)", "async": "MLflow async", "ours": "rlm_mlflow"}
HOOKS = ("on_run_start", "on_step", "on_run_end")
STEP_KEYS = ("step_reward", "cumulative_reward")
SUMMARY_KEYS = ("completed", "steps", "total_reward")
TASK = "Write a function that returns the n-th prime, then test it on n = 1..50. " * 4
# Logged params per run: these 15 keys plus environment and task_chars, as RLM Code does.
PARAMS_PER_RUN = 17

TARGET_HOOK_P99_US = 20.0
TARGET_CONSTRUCT_MS = 5.0
TARGET_DRAIN_FRACTION = 0.90
TARGET_REQUESTS_PER_1000 = 5.0
TARGET_CLOSE_S = 3.0


# ---------------------------------------------------------------------------------------------
# The workload (runs inside a child process)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """``runs`` parent runs on a pool of ``threads`` threads; each has ``steps`` steps and, half
    way, one nested child run of ``child_steps`` steps started and ended on the same thread while
    the parent is open (RLM Code's recursive sub-task). ``think_ms`` is the agent's own work per
    step (a sleep, as an LLM call would be)."""

    runs: int
    threads: int
    steps: int
    child_steps: int
    think_ms: float

    @property
    def total_runs(self) -> int:
        return self.runs * (2 if self.child_steps else 1)

    @property
    def total_steps(self) -> int:
        return self.runs * (self.steps + self.child_steps)

    @property
    def expected_points(self) -> int:
        return 2 * self.total_steps + 3 * self.total_runs

    def describe(self) -> str:
        child = ""
        if self.child_steps:
            child = f", each with a nested child run of {self.child_steps} steps"
        return (
            f"{self.runs} runs x {self.steps} steps{child} on {self.threads} threads, "
            f"{self.think_ms:g} ms agent work per step ({self.total_steps} steps, "
            f"{self.expected_points} metric points, {self.total_runs} runs)"
        )


@dataclass(frozen=True)
class RunResult:
    """What RLM Code passes as ``result`` to ``on_run_end``."""

    completed: bool
    steps: int
    total_reward: float


def rlm_params(run_id: str, parent: str | None, depth: int, steps: int) -> dict[str, Any]:
    """The params RLM Code's runner passes to ``on_run_start`` (15 keys)."""
    return {
        "max_steps": steps,
        "exec_timeout": 60,
        "branch_width": 1,
        "framework": "native",
        "model": "gpt-4o",
        "sub_model": "gpt-4o-mini",
        "sub_provider": "openai",
        "max_depth": 2,
        "effective_max_depth": 2,
        "depth": depth,
        "parallelism": 1,
        "max_children_per_step": 2,
        "parent_run_id": parent,
        "pure_rlm_backend": "exec",
        "pure_rlm_strict": False,
    }


class SeedFluentSink:
    """The seed's sink as its documentation describes it, with ``synchronous`` passed through.

    ``synchronous=True`` is the seed itself; ``synchronous=False`` is what a user of the seed would
    switch to: MLflow's own async logging. Both keep the fluent API's per-thread active run, so a
    nested run started on the thread of its open parent fails (``start_run`` raises) and every event
    of that child is skipped: counted here in ``lost`` instead of logged as a warning.
    """

    name = "mlflow"

    def __init__(self, *, experiment: str, tracking_uri: str, synchronous: bool) -> None:
        import mlflow

        self._mlflow = mlflow
        self._sync = synchronous
        self._active_runs: set[str] = set()
        self.lost: Counter[str] = Counter()
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_experiment(experiment)

    def on_run_start(
        self, run_id: str, *, task: str, environment: str, params: dict[str, Any]
    ) -> None:
        try:
            self._mlflow.start_run(run_name=run_id)
            self._active_runs.add(run_id)
            safe = {
                key: value
                for key, value in params.items()
                if value is None or isinstance(value, str | int | float | bool)
            }
            safe["environment"] = environment
            safe["task_chars"] = len(task)
            self._mlflow.log_params(safe, synchronous=self._sync)
            self._mlflow.set_tags(
                {"run_id": run_id, "component": "rlm-code-rlm"}, synchronous=self._sync
            )
        except Exception:
            self.lost["on_run_start failed (run not tracked)"] += 1

    def on_step(self, run_id: str, *, event: dict[str, Any], cumulative_reward: float) -> None:
        if run_id not in self._active_runs:
            self.lost["on_step skipped (run not tracked)"] += 1
            return
        try:
            step = int(event.get("step") or 0)
            reward = float(event.get("reward") or 0.0)
            self._mlflow.log_metric("step_reward", reward, step=step, synchronous=self._sync)
            self._mlflow.log_metric(
                "cumulative_reward", cumulative_reward, step=step, synchronous=self._sync
            )
        except Exception:
            self.lost["on_step failed"] += 1

    def on_run_end(self, run_id: str, *, result: Any, run_path: Path) -> None:
        try:
            if run_id in self._active_runs:
                self._mlflow.log_metrics(
                    {
                        "completed": 1.0 if bool(getattr(result, "completed", False)) else 0.0,
                        "steps": float(getattr(result, "steps", 0)),
                        "total_reward": float(getattr(result, "total_reward", 0.0)),
                    },
                    synchronous=self._sync,
                )
                if run_path.exists():
                    self._mlflow.log_artifact(str(run_path))
                self._mlflow.end_run()
                self._active_runs.remove(run_id)
            else:
                self.lost["on_run_end skipped (run not tracked)"] += 1
        except Exception:
            self.lost["on_run_end failed"] += 1
            with contextlib.suppress(Exception):
                self._mlflow.end_run()
            self._active_runs.discard(run_id)

    def flush(self) -> None:
        if not self._sync:
            self._mlflow.flush_async_logging()


class NullSink:
    """No logging at all: the workload's own wall time, for reference."""

    def on_run_start(self, run_id: str, **kwargs: Any) -> None:
        pass

    def on_step(self, run_id: str, **kwargs: Any) -> None:
        pass

    def on_run_end(self, run_id: str, **kwargs: Any) -> None:
        pass


def drive(sink: Any, workload: Workload, folder: Path, prefix: str) -> dict[str, list[int]]:
    """Run the workload through ``sink``; the nanoseconds spent inside each hook call."""
    think = workload.think_ms / 1000.0
    pc = time.perf_counter_ns

    def run(
        run_id: str, parent: str | None, steps: int, child_steps: int, timings: dict[str, list[int]]
    ) -> None:
        depth = 0 if parent is None else 1
        params = rlm_params(run_id, parent, depth, steps)
        t0 = pc()
        sink.on_run_start(run_id, task=TASK, environment="pure_rlm", params=params)
        timings["on_run_start"].append(pc() - t0)
        cumulative = 0.0
        child_at = steps // 2 if child_steps else -1
        trajectory = []
        for step in range(1, steps + 1):
            if think:
                time.sleep(think)
            reward = ((step * 7) % 11) / 10.0
            cumulative += reward
            event = {"step": step, "reward": reward, "action": "run_python", "done": step == steps}
            t0 = pc()
            sink.on_step(run_id, event=event, cumulative_reward=cumulative)
            timings["on_step"].append(pc() - t0)
            trajectory.append(json.dumps(event))
            if step == child_at:
                run(f"{run_id}.sub1", run_id, child_steps, 0, timings)
        path = folder / f"{run_id}.jsonl"
        path.write_text("\n".join(trajectory) + "\n", encoding="utf-8")
        result = RunResult(completed=True, steps=steps, total_reward=cumulative)
        t0 = pc()
        sink.on_run_end(run_id, result=result, run_path=path)
        timings["on_run_end"].append(pc() - t0)

    def one(index: int) -> dict[str, list[int]]:
        timings: dict[str, list[int]] = {hook: [] for hook in HOOKS}
        run(f"{prefix}-{index:04d}", None, workload.steps, workload.child_steps, timings)
        return timings

    merged: dict[str, list[int]] = {hook: [] for hook in HOOKS}
    with ThreadPoolExecutor(max_workers=workload.threads) as pool:
        for timings in pool.map(one, range(workload.runs)):
            for hook in HOOKS:
                merged[hook].extend(timings[hook])
    return merged


# ---------------------------------------------------------------------------------------------
# Child-side helpers
# ---------------------------------------------------------------------------------------------


class HttpCounter:
    """Counts HTTP requests made through ``requests`` in this process (mlflow and our transport
    both use it): a cross-check of the proxy's count, and the count where there is no proxy."""

    def __init__(self) -> None:
        self.count = 0
        self.seconds = 0.0  # summed time inside requests (overlapping ones add up)
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

        requests.adapters.HTTPAdapter.send = send  # type: ignore[method-assign]


HTTP = HttpCounter()


class RssPeak:
    """Peak resident set size above a baseline, sampled every 25 ms on a thread."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.baseline = 0
        self.peak = 0
        try:
            import psutil

            process = psutil.Process()
            self._read: Callable[[], int] = lambda: int(process.memory_info().rss)
        except ImportError:  # no psutil: the kernel's high-water mark (coarser: process lifetime)
            import resource

            self._read = lambda: int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024

    def __enter__(self) -> RssPeak:
        self.baseline = self.peak = self._read()
        self._thread = threading.Thread(target=self._sample, daemon=True)
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


def percentile(values: list[int], q: float) -> int | None:
    """Nearest-rank percentile of sorted ``values``."""
    if not values:
        return None
    rank = max(0, min(len(values) - 1, math.ceil(q * len(values)) - 1))
    return values[rank]


def summarize(ns: list[int]) -> dict[str, Any]:
    ns = sorted(ns)
    if not ns:
        return {"n": 0}
    return {
        "n": len(ns),
        "p50_us": percentile(ns, 0.50) / 1000,  # type: ignore[operator]
        "p99_us": percentile(ns, 0.99) / 1000,  # type: ignore[operator]
        "p999_us": percentile(ns, 0.999) / 1000,  # type: ignore[operator]
        "max_us": ns[-1] / 1000,
        "mean_us": sum(ns) / len(ns) / 1000,
    }


def timer_overhead_ns() -> int:
    pc = time.perf_counter_ns
    samples = []
    for _ in range(10_000):
        t0 = pc()
        samples.append(pc() - t0)
    samples.sort()
    return samples[len(samples) // 2]


def make_sink(kind: str, uri: str, experiment: str, options: dict[str, Any]) -> Any:
    if kind == "none":
        return NullSink()
    if kind in ("sync", "async"):
        return SeedFluentSink(experiment=experiment, tracking_uri=uri, synchronous=kind == "sync")
    from rlm_mlflow import MLflowSink

    return MLflowSink(enabled=True, experiment=experiment, tracking_uri=uri, **options)


# ---------------------------------------------------------------------------------------------
# Child tasks: each prints one JSON result line
# ---------------------------------------------------------------------------------------------


def task_workload(spec: dict[str, Any]) -> dict[str, Any]:
    kind = spec["sink"]
    workload = Workload(**spec["workload"])
    folder = Path(spec["folder"])
    folder.mkdir(parents=True, exist_ok=True)
    pc = time.perf_counter
    t0 = pc()
    sink = make_sink(kind, spec["uri"], spec["experiment"], spec.get("options", {}))
    construct_s = pc() - t0
    result: dict[str, Any] = {"construct_s": construct_s, "timer_overhead_ns": timer_overhead_ns()}
    with RssPeak() as rss:
        start = pc()
        timings = drive(sink, workload, folder, spec["prefix"])
        wall = pc() - start
        flushed = True
        if kind == "ours":
            flushed = sink.flush(spec.get("flush_timeout", 300.0))
        elif kind in ("sync", "async"):
            sink.flush()
        to_data = pc() - start
        close_s = 0.0
        if kind == "ours":
            t1 = pc()
            sink.close(spec.get("close_timeout", 10.0))
            close_s = pc() - t1
    result.update(
        {
            "hooks": {hook: summarize(timings[hook]) for hook in HOOKS},
            "all_hooks": summarize([t for hook in HOOKS for t in timings[hook]]),
            "wall_s": wall,
            "to_data_s": to_data,
            "flush_s": to_data - wall,
            "flushed": flushed,
            "close_s": close_s,
            "rss_delta_mb": rss.delta_mb,
            "http_inproc": HTTP.count,
        }
    )
    if kind == "ours":
        status = sink.status()
        result["status"] = {
            k: status.get(k)
            for k in (
                "accepted",
                "sent",
                "dropped",
                "rejected",
                "requests",
                "retries",
                "runs_created",
                "runs_ended",
                "pending",
            )
        }
    if isinstance(sink, SeedFluentSink):
        result["lost"] = dict(sink.lost)
    return result


def task_construct(spec: dict[str, Any]) -> dict[str, Any]:
    """Construction cost and where mlflow gets imported, in a fresh interpreter."""
    pc = time.perf_counter
    t0 = pc()
    from rlm_mlflow import MLflowSink

    import_s = pc() - t0
    t0 = pc()
    sink = MLflowSink(enabled=True, experiment=spec["experiment"], tracking_uri=spec["uri"])
    construct_s = pc() - t0
    after_construct = "mlflow" in sys.modules
    warm = []
    for _ in range(50):
        t0 = pc()
        other = MLflowSink(enabled=True, experiment=spec["experiment"], tracking_uri=spec["uri"])
        warm.append(pc() - t0)
        other.close()
    warm.sort()
    caller = threading.get_ident()
    t0 = pc()
    sink.on_run_start(
        "construct-check",
        task=TASK,
        environment="pure_rlm",
        params=rlm_params("construct-check", None, 0, 10),
    )
    first_hook_s = pc() - t0
    for step in range(10):
        sink.on_step(
            "construct-check", event={"step": step, "reward": 0.5}, cumulative_reward=0.5 * step
        )
    sink.on_run_end("construct-check", result=RunResult(True, 10, 5.0), run_path=None)
    after_hooks = "mlflow" in sys.modules
    flushed = sink.flush(60)
    after_flush = "mlflow" in sys.modules
    sink.close(10)
    return {
        "import_s": import_s,
        "construct_s": construct_s,
        "construct_warm_median_s": warm[len(warm) // 2],
        "first_hook_s": first_hook_s,
        "mlflow_after_construct": after_construct,
        "mlflow_after_hooks": after_hooks,
        "mlflow_after_flush": after_flush,
        "flushed": flushed,
        "caller_thread": caller,
    }


def task_ceiling(spec: dict[str, Any]) -> dict[str, Any]:
    """The best points/s a plain ``MlflowClient.log_batch`` loop of 1000 metrics reaches."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from rlm_mlflow._rest import RestTransport
    from rlm_mlflow._transport import Metric as OurMetric

    client = MlflowClient(tracking_uri=spec["uri"])
    experiment_id = client.create_experiment(spec["experiment"])
    run_id = client.create_run(experiment_id).info.run_id
    batches, reps = spec["batches"], spec["reps"]
    step = 0
    now = int(time.time() * 1000)

    def batch() -> list[tuple[str, float, int, int]]:
        nonlocal step
        out = []
        for _ in range(500):
            out.append(("step_reward", 0.5, now, step))
            out.append(("cumulative_reward", step * 0.5, now, step))
            step += 1
        return out

    client.log_batch(run_id, metrics=[Metric(k, v, t, s) for k, v, t, s in batch()])  # warm-up
    client_rates, rest_rates = [], []
    for _ in range(reps):
        prepared = [[Metric(k, v, t, s) for k, v, t, s in batch()] for _ in range(batches)]
        t0 = time.perf_counter()
        for metrics in prepared:
            client.log_batch(run_id, metrics=metrics)
        client_rates.append(1000 * batches / (time.perf_counter() - t0))
    if not spec.get("extras", True):
        return {
            "client_rates": client_rates,
            "client_best": max(client_rates),
            "batches": batches,
            "reps": reps,
        }
    transport = RestTransport(spec["uri"])
    for _ in range(reps):
        ours = [[OurMetric(k, v, t, s) for k, v, t, s in batch()] for _ in range(batches)]
        t0 = time.perf_counter()
        for metrics in ours:
            transport.log_batch(run_id, metrics=metrics)
        rest_rates.append(1000 * batches / (time.perf_counter() - t0))
    transport.close()

    def loop(metrics_batches: list[list[Any]]) -> None:
        for metrics in metrics_batches:
            client.log_batch(run_id, metrics=metrics)

    parallel_rates = []
    for _ in range(reps):
        halves = [
            [[Metric(k, v, t, s) for k, v, t, s in batch()] for _ in range(max(1, batches // 2))]
            for _ in range(2)
        ]
        t0 = time.perf_counter()
        threads = [threading.Thread(target=loop, args=(half,)) for half in halves]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        total = sum(len(half) for half in halves) * 1000
        parallel_rates.append(total / (time.perf_counter() - t0))
    return {
        "parallel_rates": parallel_rates,
        "parallel_best": max(parallel_rates),
        "client_rates": client_rates,
        "client_best": max(client_rates),
        "rest_rates": rest_rates,
        "rest_best": max(rest_rates),
        "batches": batches,
        "reps": reps,
    }


def task_burst(spec: dict[str, Any]) -> dict[str, Any]:
    """A burst of steps into a sink with a queue big enough for all of them; time until flushed."""
    from rlm_mlflow import MLflowSink

    steps, runs = spec["steps"], spec["runs"]
    sink = MLflowSink(
        enabled=True,
        experiment=spec["experiment"],
        tracking_uri=spec["uri"],
        queue_size=steps + 1000,
    )
    pc = time.perf_counter
    t0 = pc()
    ids = [f"burst-{i}" for i in range(runs)]
    for run_id in ids:
        sink.on_run_start(
            run_id, task=TASK, environment="pure_rlm", params=rlm_params(run_id, None, 0, steps)
        )
    cumulative = 0.0
    for step in range(steps):
        cumulative += 0.5
        sink.on_step(
            ids[step % runs],
            event={"step": step // runs, "reward": 0.5},
            cumulative_reward=cumulative,
        )
    for run_id in ids:
        sink.on_run_end(run_id, result=RunResult(True, steps // runs, cumulative), run_path=None)
    burst_s = pc() - t0
    flushed = sink.flush(spec["timeout"])
    total_s = pc() - t0
    http_s, http_n = HTTP.seconds, HTTP.count
    status = sink.status()
    sink.close(10)
    points = 2 * steps + 3 * runs
    return {
        "burst_s": burst_s,
        "total_s": total_s,
        "flushed": flushed,
        "points": points,
        "rate": points / total_s,
        "http_s": http_s,
        "http_n": http_n,
        "requests": status.get("requests"),
        "sent": status.get("sent"),
        "dropped": status.get("dropped"),
    }


def task_steady(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs stepping at a fixed rate; requests per 1,000 steps in a window after a warm-up."""
    from rlm_mlflow import MLflowSink

    runs, rate = spec["runs"], spec["rate_per_run"]
    sink = MLflowSink(enabled=True, experiment=spec["experiment"], tracking_uri=spec["uri"])
    stop = threading.Event()
    counts = [0] * runs

    def agent(index: int) -> None:
        run_id = f"steady-{index}"
        sink.on_run_start(
            run_id, task=TASK, environment="pure_rlm", params=rlm_params(run_id, None, 0, 10**6)
        )
        begin = time.monotonic()
        step = 0
        while not stop.is_set():
            step += 1
            sink.on_step(run_id, event={"step": step, "reward": 0.5}, cumulative_reward=step * 0.5)
            counts[index] = step
            delay = begin + step / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        sink.on_run_end(run_id, result=RunResult(True, step, step * 0.5), run_path=None)

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(runs)]
    for thread in threads:
        thread.start()
    time.sleep(spec["warmup"])
    steps0, requests0, http0 = sum(counts), sink.status().get("requests", 0), HTTP.count
    time.sleep(spec["window"])
    steps1, requests1, http1 = sum(counts), sink.status().get("requests", 0), HTTP.count
    stop.set()
    for thread in threads:
        thread.join()
    sink.flush(60)
    status = sink.status()
    sink.close(10)
    steps = steps1 - steps0
    return {
        "steps": steps,
        "requests": requests1 - requests0,
        "http": http1 - http0,
        "per_1000": 1000 * (http1 - http0) / max(1, steps),
        "steps_per_s": steps / spec["window"],
        "window": spec["window"],
        "warmup": spec["warmup"],
        "dropped": status.get("dropped"),
    }


def task_memory(spec: dict[str, Any]) -> dict[str, Any]:
    """tracemalloc over many steps with the server unreachable: bounded by the queue size?"""
    import tracemalloc

    from rlm_mlflow import MLflowSink

    steps = spec["steps"]
    sink = MLflowSink(
        enabled=True, experiment=spec["experiment"], tracking_uri=spec["uri"], shutdown_timeout=2.0
    )
    capacity = sink.config.queue_size
    sink.on_run_start(
        "memory", task=TASK, environment="pure_rlm", params=rlm_params("memory", None, 0, steps)
    )
    time.sleep(0.2)  # the worker is up and retrying its first request
    checkpoints = sorted({capacity, 2 * capacity, min(steps, 100_000), steps})
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    marks = []
    t0 = time.perf_counter()
    done = 0
    for mark in checkpoints:
        for step in range(done, mark):
            sink.on_step("memory", event={"step": step, "reward": 0.5}, cumulative_reward=0.5)
        done = mark
        current, peak = tracemalloc.get_traced_memory()
        marks.append(
            {"steps": mark, "current_mb": (current - base) / 1e6, "peak_mb": (peak - base) / 1e6}
        )
    elapsed = time.perf_counter() - t0
    tracemalloc.stop()
    status = sink.status()
    journal = os.environ.get("RLM_MLFLOW_JOURNAL_DIR")
    disk = 0
    if journal and Path(journal).is_dir():
        disk = sum(p.stat().st_size for p in Path(journal).rglob("*") if p.is_file())
    sink.close(2)
    return {
        "journal_disk_mb": disk / 1e6,
        "capacity": capacity,
        "marks": marks,
        "elapsed_s": elapsed,
        "queue_depth": status.get("queue_depth"),
        "dropped": status.get("dropped"),
        "accepted": status.get("accepted"),
    }


def task_close(spec: dict[str, Any]) -> dict[str, Any]:
    """close() with ``pending`` step events queued and the server up."""
    from rlm_mlflow import MLflowSink

    pending, runs = spec["pending"], spec["runs"]
    folder = Path(spec["folder"])
    folder.mkdir(parents=True, exist_ok=True)
    sink = MLflowSink(
        enabled=True,
        experiment=spec["experiment"],
        tracking_uri=spec["uri"],
        queue_size=2 * pending,
        flush_interval=3600.0,
        batch_trigger=10**9,
    )
    ids = [f"close-{i}" for i in range(runs)]
    for run_id in ids:
        sink.on_run_start(
            run_id,
            task=TASK,
            environment="pure_rlm",
            params=rlm_params(run_id, None, 0, pending // runs),
        )
    created = sink.flush(60)  # the runs exist, as they would after a while of running
    for step in range(pending):
        run_id = ids[step % runs]
        sink.on_step(
            run_id,
            event={"step": step // runs, "reward": 0.5},
            cumulative_reward=0.5 * (step // runs),
        )
    for run_id in ids:
        path = folder / f"{run_id}.jsonl"
        path.write_text('{"step": 0}\n', encoding="utf-8")
        sink.on_run_end(run_id, result=RunResult(True, pending // runs, 1.0), run_path=path)
    before = sink.status()
    t0 = time.perf_counter()
    sink.close()  # the default shutdown_timeout
    close_s = time.perf_counter() - t0
    after = sink.status()
    return {
        "created": created,
        "pending_before": before.get("pending"),
        "close_s": close_s,
        "timeout_s": sink.config.shutdown_timeout,
        "sent": after.get("sent"),
        "dropped": after.get("dropped"),
        "runs_ended": after.get("runs_ended"),
        "requests": (after.get("requests") or 0) - (before.get("requests") or 0),
    }


def task_hooks(spec: dict[str, Any]) -> dict[str, Any]:
    """Each hook's cost in isolation: one thread, no agent work, the worker idle in its backoff
    (the server is unreachable), a queue big enough that nothing is dropped."""
    from rlm_mlflow import MLflowSink

    runs = spec["runs"]
    pc = time.perf_counter_ns
    out: dict[str, Any] = {}
    result = RunResult(True, 10, 5.0)
    for variant, given in spec["variants"].items():
        options = dict(given)
        think = options.pop("_think_ms", 0.0) / 1000.0
        runs = options.pop("_runs", spec["runs"])
        sink = MLflowSink(
            enabled=True,
            experiment=spec["experiment"],
            tracking_uri=spec["uri"],
            queue_size=20 * runs,
            shutdown_timeout=0.5,
            **options,
        )
        sink.on_run_start("warm-up", task=TASK, environment="pure_rlm", params={})
        timings: dict[str, list[int]] = {hook: [] for hook in HOOKS}
        for index in range(runs):
            run_id = f"{variant}-{index}"
            params = rlm_params(run_id, None, 0, 10)
            t0 = pc()
            sink.on_run_start(run_id, task=TASK, environment="pure_rlm", params=params)
            timings["on_run_start"].append(pc() - t0)
            for step in range(10):
                if think:
                    time.sleep(think)
                event = {"step": step, "reward": 0.5, "action": "run_python"}
                t0 = pc()
                sink.on_step(run_id, event=event, cumulative_reward=0.5 * step)
                timings["on_step"].append(pc() - t0)
            t0 = pc()
            sink.on_run_end(run_id, result=result, run_path=None)
            timings["on_run_end"].append(pc() - t0)
        sink.close(0.5)
        out[variant] = {hook: summarize(timings[hook]) for hook in HOOKS}
    return out


CHILD_TASKS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "hooks": task_hooks,
    "workload": task_workload,
    "construct": task_construct,
    "ceiling": task_ceiling,
    "burst": task_burst,
    "steady": task_steady,
    "memory": task_memory,
    "close": task_close,
}


def child_main(raw: str) -> int:
    spec = json.loads(raw)
    if spec["task"] != "construct":  # that one must not import anything before the sink does
        HTTP.install()
    result = CHILD_TASKS[spec["task"]](spec)
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# The harness (parent process)
# ---------------------------------------------------------------------------------------------


@dataclass
class Plan:
    main: Workload
    small: Workload  # the sync baseline in the latency sweep (each step costs 2 round trips)
    sweep: Workload  # the other two sinks in the latency sweep
    latencies: list[float]
    hook_runs: int  # runs of 1 start, 10 steps, 1 end in the hook micro-benchmark
    ceiling_batches: int
    ceiling_reps: int
    burst_steps: int
    steady: list[tuple[int, float]]  # (runs, steps per second per run)
    steady_warmup: float  # seconds, plus one flush_interval
    steady_window: float  # in flush intervals
    memory_steps: int
    close_pending: int
    concurrency: list[int]
    concurrency_steps: int


def make_plan(quick: bool, burst_steps: int | None) -> Plan:
    if quick:
        return Plan(
            main=Workload(runs=4, threads=2, steps=10, child_steps=3, think_ms=1.0),
            small=Workload(runs=2, threads=2, steps=5, child_steps=2, think_ms=1.0),
            sweep=Workload(runs=2, threads=2, steps=5, child_steps=2, think_ms=1.0),
            latencies=[0.0, 0.2],
            hook_runs=500,
            ceiling_batches=2,
            ceiling_reps=1,
            burst_steps=burst_steps or 5_000,
            steady=[(4, 100.0)],
            steady_warmup=0.5,
            steady_window=1.5,
            memory_steps=30_000,
            close_pending=2_000,
            concurrency=[1, 10],
            concurrency_steps=20,
        )
    return Plan(
        main=Workload(runs=8, threads=4, steps=100, child_steps=20, think_ms=1.0),
        small=Workload(runs=2, threads=2, steps=10, child_steps=4, think_ms=1.0),
        sweep=Workload(runs=4, threads=2, steps=50, child_steps=10, think_ms=1.0),
        latencies=[0.0, 0.05, 0.2, 1.0],
        hook_runs=2_000,
        ceiling_batches=8,
        ceiling_reps=3,
        burst_steps=burst_steps or 200_000,
        steady=[(1, 400.0), (4, 100.0), (16, 25.0)],
        steady_warmup=1.0,
        steady_window=4.0,
        memory_steps=1_000_000,
        close_pending=10_000,
        concurrency=[1, 10, 100],
        concurrency_steps=50,
    )


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def closed_port() -> int:
    """A loopback port nobody listens on: connects are refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Harness:
    workdir: Path
    server: Any
    proxy: Any
    logs: Path = field(init=False)

    def __post_init__(self) -> None:
        self.logs = self.workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    @property
    def has_journal_option(self) -> bool:
        """Whether this version of the sink has a write-ahead journal that can be turned off."""
        import inspect

        from rlm_mlflow import MLflowSink

        return "journal" in inspect.signature(MLflowSink).parameters

    # -- child processes --------------------------------------------------------------------

    def child(self, spec: dict[str, Any], timeout: float = 900.0) -> dict[str, Any]:
        env = dict(os.environ)
        env.pop("MLFLOW_TRACKING_URI", None)
        env.pop("MLFLOW_ENABLE_ASYNC_LOGGING", None)
        env["MLFLOW_DISABLE_TELEMETRY"] = "true"
        env["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
        name = f"{spec['task']}-{spec.get('sink', '')}-{uuid.uuid4().hex[:6]}"
        log_path = self.logs / f"{name}.log"
        # Our sink's write-ahead journal (if this version has one) goes under the work folder.
        env["RLM_MLFLOW_JOURNAL_DIR"] = str(self.workdir / "journal" / name)
        command = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
        started = time.monotonic()
        with log_path.open("w", encoding="utf-8") as errors:
            process = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=errors, text=True, env=env, cwd=self.workdir
            )
            try:
                out, _ = process.communicate(timeout=timeout)
            finally:
                if process.poll() is None:  # timeout or Ctrl-C: never leave it behind
                    process.kill()
                    process.wait()
        for line in out.splitlines():
            if line.startswith(RESULT_PREFIX):
                result = dict(json.loads(line[len(RESULT_PREFIX) :]))
                result["child_s"] = time.monotonic() - started
                failures = [
                    line
                    for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines()
                    if "Failed to log run data" in line
                ]
                result["logged_failures"] = len(failures)
                if failures:
                    result["failure_sample"] = failures[0].split("Failed to log run data: ")[-1][
                        :160
                    ]
                log(f"    ({spec['task']} child: {result['child_s']:.1f} s)")
                return result
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise RuntimeError(f"child {name} failed (exit {process.returncode}):\n{tail}")

    def experiment(self, label: str) -> str:
        return f"bench-{label}-{uuid.uuid4().hex[:8]}"

    def set_latency(self, seconds: float) -> None:
        if self.proxy is not None:
            self.proxy.set(latency=seconds)

    @property
    def uri(self) -> str:
        """Where sinks send: through the proxy (it counts requests), else straight to the server."""
        return str(self.proxy.uri if self.proxy is not None else self.server.uri)

    # -- one sink through one workload -------------------------------------------------------

    def run_sink(
        self,
        kind: str,
        workload: Workload,
        *,
        latency: float = 0.0,
        uri: str | None = None,
        options: dict[str, Any] | None = None,
        label: str = "main",
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        experiment = self.experiment(f"{label}-{kind}")
        self.set_latency(latency)
        before = self.proxy.requests if self.proxy is not None else 0
        target = uri or self.uri
        spec = {
            "task": "workload",
            "sink": kind,
            "uri": target,
            "experiment": experiment,
            "workload": asdict(workload),
            "folder": str(self.workdir / "runs" / experiment),
            "prefix": f"{label}-{kind}",
            "options": options or {},
            **(extra or {}),
        }
        try:
            result = self.child(spec)
        finally:
            self.set_latency(0.0)
        through_proxy = self.proxy is not None and target == self.proxy.uri
        result["requests"] = (
            (self.proxy.requests - before) if through_proxy else result["http_inproc"]
        )
        result["requests_counted_by"] = "proxy" if through_proxy else "in-process"
        result["workload"] = asdict(workload)
        result["latency"] = latency
        if kind != "none" and uri is None:
            result["readback"] = read_back(self.server.root, experiment)
            points = result["readback"]["step_points"] + result["readback"]["summary_points"]
            result["points_per_s"] = points / result["to_data_s"] if result["to_data_s"] else 0.0
        return result


def read_back(root: Path, experiment: str) -> dict[str, Any]:
    """What actually reached MLflow, read from the server's sqlite store and artifact folder."""
    db = sqlite3.connect(f"file:{root / 'mlflow.db'}?mode=ro", uri=True, timeout=60)
    try:
        row = db.execute(
            "SELECT experiment_id FROM experiments WHERE name = ?", (experiment,)
        ).fetchone()
        if row is None:
            return {
                "runs": 0,
                "finished": 0,
                "nested": 0,
                "step_points": 0,
                "summary_points": 0,
                "params": 0,
                "artifacts": 0,
            }
        exp_id = row[0]
        runs = "SELECT run_uuid FROM runs WHERE experiment_id = ?"

        def count(sql: str, *args: Any) -> int:
            return int(db.execute(sql, (exp_id, *args)).fetchone()[0])

        result = {
            "runs": count("SELECT COUNT(*) FROM runs WHERE experiment_id = ?"),
            "finished": count(
                "SELECT COUNT(*) FROM runs WHERE experiment_id = ? AND status = 'FINISHED'"
            ),
            "nested": count(
                f"SELECT COUNT(*) FROM tags WHERE run_uuid IN ({runs}) "
                "AND key = 'mlflow.parentRunId'"
            ),
            "step_points": count(
                f"SELECT COUNT(*) FROM metrics WHERE run_uuid IN ({runs}) AND key IN (?, ?)",
                *STEP_KEYS,
            ),
            "summary_points": count(
                f"SELECT COUNT(*) FROM metrics WHERE run_uuid IN ({runs}) AND key IN (?, ?, ?)",
                *SUMMARY_KEYS,
            ),
            "params": count(f"SELECT COUNT(*) FROM params WHERE run_uuid IN ({runs})"),
        }
    finally:
        db.close()
    folder = root / "artifacts" / str(exp_id)
    result["artifacts"] = sum(1 for p in folder.rglob("*.jsonl")) if folder.is_dir() else 0
    return result


# ---------------------------------------------------------------------------------------------
# Running everything
# ---------------------------------------------------------------------------------------------


def run_all(plan: Plan, harness: Harness, quick: bool) -> dict[str, Any]:
    from rlm_mlflow import SinkConfig

    defaults = SinkConfig()
    results: dict[str, Any] = {
        "config": {
            name: getattr(defaults, name, None)
            for name in ("flush_interval", "batch_trigger", "queue_size", "shutdown_timeout")
        }
    }
    server_uri = harness.server.uri

    log("construction and imports (fresh interpreter)")
    results["construct"] = harness.child(
        {"task": "construct", "uri": server_uri, "experiment": harness.experiment("construct")}
    )

    log("hook micro-benchmark: one thread, no agent work, worker idle (unreachable server)")
    variants: dict[str, dict[str, Any]] = {"default": {}}
    if harness.has_journal_option:
        variants["journal=False"] = {"journal": False}
    if not quick:  # an agent that works between steps, as real ones do: 2 ms here
        slow = {"_think_ms": 2.0, "_runs": max(1, plan.hook_runs // 10)}
        variants["default, 2 ms agent work per step"] = slow
        if harness.has_journal_option:
            variants["journal=False, 2 ms agent work per step"] = {**slow, "journal": False}
    results["hooks_runs"] = plan.hook_runs
    results["hooks"] = harness.child(
        {
            "task": "hooks",
            "uri": f"http://127.0.0.1:{closed_port()}",
            "experiment": harness.experiment("hooks"),
            "runs": plan.hook_runs,
            "variants": variants,
        }
    )

    log(f"main workload: {plan.main.describe()}")
    main: dict[str, Any] = {}
    for kind in ("none", *SINKS):
        log(f"  {kind}")
        main[kind] = harness.run_sink(kind, plan.main)
    if harness.has_journal_option and not quick:
        log("  ours, journal=False")
        main["ours_nojournal"] = harness.run_sink(
            "ours", plan.main, options={"journal": False}, label="main-nojournal"
        )
    results["main"] = main

    sweep: dict[str, dict[str, Any]] = {kind: {} for kind in SINKS}
    if quick:  # fewer runs: the main workload stands for 0 ms
        sweep = {kind: {"0.0": main[kind]} for kind in SINKS}
    if harness.proxy is not None:
        for latency in plan.latencies:
            if str(latency) in sweep["ours"]:
                continue
            for kind in SINKS:
                workload = plan.small if kind == "sync" else plan.sweep
                log(f"latency {latency * 1000:.0f} ms: {kind} ({workload.total_steps} steps)")
                sweep[kind][str(latency)] = harness.run_sink(
                    kind, workload, latency=latency, label=f"lat{int(latency * 1000)}"
                )
    results["sweep"] = sweep

    if harness.proxy is not None and not quick:
        log("our sink, main workload, 200 ms latency per request")
        results["slow"] = harness.run_sink("ours", plan.main, latency=0.2, label="slow")
    elif "0.2" in sweep["ours"]:
        results["slow"] = sweep["ours"]["0.2"]

    log("our sink with the server unreachable (a closed port)")
    results["unreachable"] = harness.run_sink(
        "ours",
        plan.main,
        uri=f"http://127.0.0.1:{closed_port()}",
        options={"shutdown_timeout": 1.0},
        label="unreachable",
        extra={"flush_timeout": 1.0, "close_timeout": 1.0},
    )

    def ceiling(when: str) -> dict[str, Any]:
        log(f"raw ceiling ({when} the burst): MlflowClient.log_batch loops of 1000 metrics")
        return harness.child(
            {
                "task": "ceiling",
                "uri": server_uri,
                "experiment": harness.experiment("ceiling"),
                "batches": plan.ceiling_batches,
                "reps": plan.ceiling_reps,
                "extras": not quick,
            }
        )

    # The server's speed drifts with the machine's load: measure the ceiling right before and
    # right after the burst and hold the drain to the better of the two.
    before = None if quick else ceiling("before")
    log(f"drain: a burst of {plan.burst_steps} steps through our sink, straight to the server")
    results["burst"] = harness.child(
        {
            "task": "burst",
            "uri": server_uri,
            "experiment": harness.experiment("burst"),
            "steps": plan.burst_steps,
            "runs": 4,
            "timeout": 1200.0,
        },
        timeout=1500.0,
    )
    after = ceiling("after")
    measured = [c for c in (before, after) if c is not None]
    results["ceiling"] = max(measured, key=lambda c: c["client_best"])
    results["ceiling"]["client_best_before_after"] = [c["client_best"] for c in measured]

    steady = []
    interval = float(results["config"].get("flush_interval") or 1.0)
    for runs, rate in plan.steady:
        log(f"steady state: {runs} runs x {rate:g} steps/s")
        result = harness.child(
            {
                "task": "steady",
                "uri": server_uri,
                "experiment": harness.experiment("steady"),
                "runs": runs,
                "rate_per_run": rate,
                "warmup": plan.steady_warmup + interval,
                "window": plan.steady_window * interval,
            }
        )
        result.update({"runs": runs, "rate_per_run": rate})
        steady.append(result)
    results["steady"] = steady

    log(f"memory: {plan.memory_steps} steps with the server unreachable (tracemalloc)")
    results["memory"] = harness.child(
        {
            "task": "memory",
            "uri": f"http://127.0.0.1:{closed_port()}",
            "experiment": harness.experiment("memory"),
            "steps": plan.memory_steps,
        }
    )

    log(f"close() with {plan.close_pending} step events pending, server up")
    experiment = harness.experiment("close")
    results["close"] = harness.child(
        {
            "task": "close",
            "uri": server_uri,
            "experiment": experiment,
            "pending": plan.close_pending,
            "runs": 10,
            "folder": str(harness.workdir / "runs" / experiment),
        }
    )
    results["close"]["readback"] = read_back(harness.server.root, experiment)

    concurrency = {}
    for runs in plan.concurrency:
        workload = Workload(
            runs=runs,
            threads=runs,
            steps=plan.concurrency_steps,
            child_steps=plan.concurrency_steps // 5,
            think_ms=1.0,
        )
        log(f"concurrency: {runs} concurrent runs")
        concurrency[str(runs)] = harness.run_sink("ours", workload, label=f"conc{runs}")
        if harness.has_journal_option and not quick:
            log(f"concurrency: {runs} concurrent runs, journal=False")
            concurrency[f"{runs}, journal=False"] = harness.run_sink(
                "ours", workload, options={"journal": False}, label=f"conc{runs}-nojournal"
            )
    results["concurrency"] = concurrency
    return results


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


def us(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 100_000:
        return f"{value / 1000:,.0f} ms"
    if value >= 1000:
        return f"{value / 1000:,.1f} ms"
    return f"{value:.1f} us" if value < 100 else f"{value:.0f} us"


def secs(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def ratio(value: float | None, ours: float | None) -> str:
    if value is None or ours is None or ours == 0:
        return "-"
    r = value / ours
    return f"{r:,.0f}x" if r >= 100 else f"{r:,.1f}x"


def hook(result: dict[str, Any], name: str, stat: str) -> float | None:
    value = result["hooks"][name].get(stat)
    return float(value) if value is not None else None


def delivered(result: dict[str, Any]) -> str:
    rb = result.get("readback")
    if rb is None:
        return "-"
    wl = Workload(**result["workload"])
    points = rb["step_points"] + rb["summary_points"]
    return (
        f"{rb['runs']}/{wl.total_runs} runs, {points}/{wl.expected_points} points, "
        f"{rb['nested']}/{wl.runs if wl.child_steps else 0} nested, "
        f"{rb['artifacts']}/{wl.total_runs} artifacts"
    )


def main_table(main: dict[str, Any]) -> list[str]:
    lines = [
        "| sink | on_run_start p50 / p99 | on_step p50 / p99 | on_run_end p50 / p99 "
        "| agent wall time | time until data is in MLflow | HTTP requests | points/s "
        "| peak RSS growth | delivered to MLflow |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for kind in ("none", *SINKS, "ours_nojournal"):
        r = main.get(kind)
        if r is None:
            continue
        if kind == "none":
            lines.append(
                f"| {LABELS[kind]} | - | - | - | {secs(r['wall_s'])} | - | 0 | - | "
                f"{r['rss_delta_mb']:.1f} MB | - |"
            )
            continue
        cells = [f"{us(hook(r, h, 'p50_us'))} / {us(hook(r, h, 'p99_us'))}" for h in HOOKS]
        lines.append(
            f"| {LABELS[kind]} | {' | '.join(cells)} | {secs(r['wall_s'])} | "
            f"{secs(r['to_data_s'])} | {r['requests']} | {r['points_per_s']:,.0f} | "
            f"{r['rss_delta_mb']:.1f} MB | {delivered(r)} |"
        )
    return lines


def ratio_table(main: dict[str, Any]) -> list[str]:
    ours = main["ours"]
    lines = [
        "| sink | on_step p50 | on_step p99 | agent wall time | time until data is in MLflow "
        "| HTTP requests | points/s | peak RSS growth |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for kind in ("sync", "async"):
        r = main[kind]
        p50 = ratio(hook(r, "on_step", "p50_us"), hook(ours, "on_step", "p50_us"))
        p99 = ratio(hook(r, "on_step", "p99_us"), hook(ours, "on_step", "p99_us"))
        lines.append(
            f"| {LABELS[kind]} | {p50} | {p99} "
            f"| {ratio(r['wall_s'], ours['wall_s'])} | {ratio(r['to_data_s'], ours['to_data_s'])} "
            f"| {ratio(r['requests'], ours['requests'])} "
            f"| {ratio(r['points_per_s'], ours['points_per_s'])} "
            f"| {ratio(max(r['rss_delta_mb'], 0.1), max(ours['rss_delta_mb'], 0.1))} |"
        )
    return lines


def sweep_table(sweep: dict[str, dict[str, Any]]) -> list[str]:
    latencies = sorted({float(k) for kind in SINKS for k in sweep[kind]})
    lines = [
        "| latency added per request | "
        + " | ".join(f"{SHORT[k]}: on_step p50 / p99" for k in SINKS)
        + " | "
        + " | ".join(f"{SHORT[k]}: wall / data in" for k in SINKS)
        + " |",
        "| --- |" + " --- |" * (2 * len(SINKS)),
    ]
    for latency in latencies:
        cells, walls = [], []
        for kind in SINKS:
            r = sweep[kind].get(str(latency))
            if r is None:
                cells.append("not run")
                walls.append("-")
                continue
            n = r["hooks"]["on_step"]["n"]
            cells.append(
                f"{us(hook(r, 'on_step', 'p50_us'))} / {us(hook(r, 'on_step', 'p99_us'))} (n={n})"
            )
            walls.append(f"{secs(r['wall_s'])} / {secs(r['to_data_s'])}")
        lines.append(
            f"| {latency * 1000:.0f} ms | " + " | ".join(cells) + " | " + " | ".join(walls) + " |"
        )
    return lines


def concurrency_table(concurrency: dict[str, Any]) -> list[str]:
    lines = [
        "| concurrent runs | runs (with children) | steps | on_step p50 / p99 | all hooks p99 "
        "| agent wall time | time until data is in MLflow | HTTP requests | requests per run "
        "| points/s | delivered to MLflow |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for runs, r in concurrency.items():
        wl = Workload(**r["workload"])
        lines.append(
            f"| {runs} | {wl.total_runs} | {wl.total_steps} | "
            f"{us(hook(r, 'on_step', 'p50_us'))} / {us(hook(r, 'on_step', 'p99_us'))} | "
            f"{us(r['all_hooks']['p99_us'])} | {secs(r['wall_s'])} | {secs(r['to_data_s'])} | "
            f"{r['requests']} | {r['requests'] / wl.total_runs:.1f} | "
            f"{r['points_per_s']:,.0f} | {delivered(r)} |"
        )
    return lines


def hooks_table(hooks: dict[str, Any]) -> list[str]:
    lines = [
        "| variant | on_run_start p50 / p99 / max | on_step p50 / p99 / p99.9 | "
        "on_run_end p50 / p99 / max |",
        "| --- | --- | --- | --- |",
    ]
    for variant, stats in hooks.items():
        if not isinstance(stats, dict):
            continue
        start, step, end = (stats[h] for h in HOOKS)
        lines.append(
            f"| {variant} | {us(start['p50_us'])} / {us(start['p99_us'])} / {us(start['max_us'])} "
            f"| {us(step['p50_us'])} / {us(step['p99_us'])} / {us(step['p999_us'])} "
            f"| {us(end['p50_us'])} / {us(end['p99_us'])} / {us(end['max_us'])} |"
        )
    return lines


def percent(value: float, target: float) -> str:
    """A percentage, with two decimals when whole percents would hide which side of the
    target it falls on."""
    return f"{value:.2%}" if abs(value - target) < 0.01 else f"{value:.0%}"


def verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def targets(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    # Hook p99 whatever the server does: every hook, in the agent's own workload.
    conditions = [("server up", results["main"]["ours"])]
    if "slow" in results:
        conditions.append(("200 ms latency", results["slow"]))
    conditions.append(("server unreachable", results["unreachable"]))
    parts, steps_ok, all_ok = [], True, True
    for name, r in conditions:
        p99 = {h: float(r["hooks"][h]["p99_us"]) for h in HOOKS}
        steps_ok = steps_ok and p99["on_step"] <= TARGET_HOOK_P99_US
        all_ok = all_ok and max(p99.values()) <= TARGET_HOOK_P99_US
        parts.append(
            f"{name}: on_step {us(p99['on_step'])} (n={r['hooks']['on_step']['n']}), "
            f"on_run_start {us(p99['on_run_start'])}, on_run_end {us(p99['on_run_end'])} "
            f"(n={r['hooks']['on_run_start']['n']} each)"
        )
    hook_verdict = "met" if all_ok else ("met for on_step only" if steps_ok else "NOT met")
    rows.append(
        (
            f"hook p99 <= {TARGET_HOOK_P99_US:.0f} us whatever the server does",
            "; ".join(parts),
            hook_verdict,
        )
    )

    c = results["construct"]
    clean = not (c["mlflow_after_construct"] or c["mlflow_after_hooks"])
    rows.append(
        (
            f"construction < {TARGET_CONSTRUCT_MS:.0f} ms, mlflow not imported by the caller",
            f"{c['construct_s'] * 1000:.2f} ms first (fresh interpreter, after "
            f"`import rlm_mlflow` {c['import_s'] * 1000:.0f} ms), "
            f"{c['construct_warm_median_s'] * 1000:.2f} ms median after; 'mlflow' in "
            f"sys.modules after construction: {c['mlflow_after_construct']}, after hooks: "
            f"{c['mlflow_after_hooks']}, after flush: {c['mlflow_after_flush']}",
            verdict(c["construct_s"] * 1000 < TARGET_CONSTRUCT_MS and clean),
        )
    )

    ceiling = results["ceiling"]["client_best"]
    burst = results["burst"]
    fraction = burst["rate"] / ceiling
    rows.append(
        (
            f"drain >= {TARGET_DRAIN_FRACTION:.0%} of the raw log_batch ceiling",
            f"{burst['rate']:,.0f} points/s ({burst['points']:,} points in "
            f"{secs(burst['total_s'])}) = {percent(fraction, TARGET_DRAIN_FRACTION)} of "
            f"{ceiling:,.0f} points/s "
            "(best MlflowClient.log_batch loop of 1000)",
            verdict(fraction >= TARGET_DRAIN_FRACTION),
        )
    )

    parts, met_count = [], 0
    for s in results["steady"]:
        ok = s["per_1000"] <= TARGET_REQUESTS_PER_1000
        met_count += ok
        parts.append(
            f"{s['runs']} run(s) x {s['rate_per_run']:g} steps/s: {s['per_1000']:.1f}"
            + ("" if ok else " (over)")
        )
    missed = [
        f"{x['runs']} run(s)" for x in results["steady"] if x["per_1000"] > TARGET_REQUESTS_PER_1000
    ]
    steady_verdict = (
        "met"
        if not missed
        else ("NOT met" if met_count == 0 else f"NOT met for {', '.join(missed)}; met otherwise")
    )
    rows.append(
        (
            f"<= {TARGET_REQUESTS_PER_1000:.0f} HTTP requests per 1,000 steps at steady state",
            "; ".join(parts),
            steady_verdict,
        )
    )

    m = results["memory"]
    at_capacity = next(x for x in m["marks"] if x["steps"] >= 2 * m["capacity"])
    last = m["marks"][-1]
    bounded = last["peak_mb"] <= 1.2 * at_capacity["peak_mb"] + 0.5
    disk = m.get("journal_disk_mb", 0.0)
    rows.append(
        (
            f"memory bounded by queue size over {last['steps']:,} steps (server unreachable)",
            f"tracemalloc peak {at_capacity['peak_mb']:.1f} MB after "
            f"{at_capacity['steps']:,} steps, {last['peak_mb']:.1f} MB after {last['steps']:,} "
            f"(queue_size {m['capacity']:,}; "
            f"{last['current_mb'] * 1e6 / max(1, m['queue_depth']):,.0f} B per queued step); "
            f"dropped from the queue: {m['dropped'] or 'none'}"
            + (f"; journal on disk: {disk:.1f} MB" if disk else ""),
            verdict(bounded),
        )
    )

    cl = results["close"]
    rows.append(
        (
            f"close() with {cl['pending_before']:,} events pending, server up: "
            f"< {TARGET_CLOSE_S:.0f} s",
            f"{cl['close_s']:.2f} s; sent {cl['sent']:,}, dropped {cl['dropped'] or 'none'}, "
            f"{cl['runs_ended']} runs ended, {cl['readback']['step_points']:,} step points "
            "in MLflow",
            verdict(cl["close_s"] < TARGET_CLOSE_S),
        )
    )
    return rows


def plot(sweep: dict[str, dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plot (pip install -e '.[bench]')")
        return False
    latencies = sorted({float(k) for kind in SINKS for k in sweep[kind]})
    if not latencies:
        return False
    xs = list(range(len(latencies)))
    fig, ax = plt.subplots(figsize=(8, 4.8))
    colors = {"sync": "tab:red", "async": "tab:orange", "ours": "tab:green"}
    for kind in SINKS:
        points = [(i, sweep[kind].get(str(lat))) for i, lat in zip(xs, latencies, strict=True)]
        present = [(i, r) for i, r in points if r is not None]
        for stat, style in (("p50_us", "-o"), ("p99_us", "--s")):
            ax.plot(
                [i for i, _ in present],
                [r["hooks"]["on_step"][stat] for _, r in present],
                style,
                color=colors[kind],
                label=f"{SHORT[kind]} {stat[:3]}",
            )
    ax.axhline(TARGET_HOOK_P99_US, color="grey", linewidth=0.8, linestyle=":")
    ax.text(0, TARGET_HOOK_P99_US * 1.2, "20 us target", color="grey", fontsize=8)
    ax.set_yscale("log")
    ax.set_xticks(xs, [f"{lat * 1000:.0f} ms" for lat in latencies])
    ax.set_xlabel("latency added to every HTTP request (FaultProxy in front of mlflow server)")
    ax.set_ylabel("agent time inside on_step (us, log scale)")
    ax.set_title("Agent time per step vs tracking-server latency")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU-seconds the whole machine has been busy, and those this benchmark has used."""

    when: float
    machine: float
    ours: float


def cpu_snapshot() -> CpuSnapshot | None:
    """Busy CPU time from /proc/stat, and ours: this process, its reaped children, and every
    live descendant (the mlflow server and what it started). None where that cannot be read."""
    try:
        import psutil

        with open("/proc/stat", encoding="ascii") as stat:
            fields = [int(x) for x in stat.readline().split()[1:9]]
    except (ImportError, OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    machine = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    mine = os.times()
    ours = mine.user + mine.system + mine.children_user + mine.children_system
    for process in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            t = process.cpu_times()
            ours += t.user + t.system + t.children_user + t.children_system
    return CpuSnapshot(time.monotonic(), machine, ours)


def machine_note(
    load: tuple[tuple[float, ...], tuple[float, ...]],
    cpu: tuple[CpuSnapshot | None, CpuSnapshot | None],
) -> str:
    cores = os.cpu_count() or 1
    text = f"{cores} cores, load average {load[0][0]:.2f} when the run began"
    start, end = cpu
    if start is None or end is None:
        text += f" and {load[1][0]:.2f} at its end (1 min, this run included)"
        busy = load[0][0] > 0.5 * cores
    else:
        available = (end.when - start.when) * cores
        other = max(0.0, (end.machine - start.machine) - (end.ours - start.ours))
        share = other / available if available > 0 else 0.0
        busy = share > 0.15
        text += (
            f"; other processes used {share:.0%} of the machine's CPU during the run "
            f"({other:.0f} of {available:.0f} CPU-seconds; /proc/stat minus this benchmark's "
            "own processes), this benchmark "
            f"{(end.ours - start.ours) / available if available > 0 else 0.0:.0%}"
        )
    if busy:
        text += (
            ". The machine was busy with other work: timings are pessimistic and the tails "
            "(p99) carry scheduling noise"
        )
    return text


def report(
    plan: Plan,
    results: dict[str, Any],
    *,
    command: str,
    quick: bool,
    plot_path: Path | None,
    load: tuple[tuple[float, ...], tuple[float, ...]],
    cpu: tuple[CpuSnapshot | None, CpuSnapshot | None],
    elapsed: float,
    proxy: bool,
) -> str:
    from importlib.metadata import version

    main = results["main"]
    out = [
        "# Performance: rlm_mlflow against what users would pick instead",
        "",
        f"Produced by `{command}` on {time.strftime('%Y-%m-%d %H:%M %Z')} in {elapsed:.0f} s "
        f"({'quick' if quick else 'full'} mode). Python {platform.python_version()}, "
        f"mlflow {version('mlflow')}, {machine_note(load, cpu)}.",
        "",
        *(
            [
                "Quick mode: small samples (a p99 over a few dozen calls is close to the maximum) "
                "and a short ceiling loop; the figures are indicative only. The full run is "
                "`scripts/bench`.",
                "",
            ]
            if quick
            else []
        ),
        "A real `mlflow server` (sqlite backend, one worker, job execution off) runs on "
        "loopback; "
        + (
            "a `FaultProxy` in pass mode sits in front of it and counts every HTTP request of "
            "every sink the same way, and adds latency for the latency sweep. "
            if proxy
            else "no FaultProxy was available: requests are counted in-process. "
        )
        + "Each sink runs in a fresh interpreter. Agent time is `perf_counter_ns` around each "
        f"hook call (timer overhead about {main['ours']['timer_overhead_ns']} ns, included). "
        "What reached MLflow is read back from the server's store afterwards.",
        "",
        f"Workload: {plan.main.describe()}. Params: RLM Code's 15 keys plus environment and "
        "task_chars (17 params per run); two metrics per step; three summary metrics and the "
        "trajectory file as an artifact per run.",
        "",
        "## The three sinks on the same workload",
        "",
        *main_table(main),
        "",
        "Each sink's figure divided by ours, measured in the same run (for points/s, below 1x "
        "means ours moved more points per second):",
        "",
        *ratio_table(main),
        "",
    ]
    lost = {k: main[k].get("lost", {}) for k in ("sync", "async")}
    out += [
        "What the fluent-API sinks lose: `mlflow.start_run()` keeps one active run per thread, "
        "so the nested child run, started on its parent's thread while the parent is open, "
        "raises, and the seed skips every event of that child ("
        + "; ".join(
            f"{k}: " + (", ".join(f"{n} {what}" for what, n in v.items()) or "nothing")
            for k, v in lost.items()
        )
        + "). The child runs, their steps and their artifacts never reach MLflow, and no "
        "parent link exists (see 'delivered').",
        "",
    ]
    for kind in ("sync", "async", "ours"):
        r = main[kind]
        if r.get("logged_failures"):
            rb, wl = r["readback"], Workload(**r["workload"])
            tracked = 2 * wl.runs * wl.steps + 3 * wl.runs  # what the seed even tries to send
            points = rb["step_points"] + rb["summary_points"]
            out += [
                f"In this run {LABELS[kind]} also logged {r['logged_failures']} failed writes "
                f"(first: `{r['failure_sample']}`): {max(0, tracked - points)} of the "
                f"{tracked} points of the parent runs it tracks never reached MLflow, and "
                "nothing but a log line says so.",
                "",
            ]
    out += ["## Targets", "", "| target | measured | met? |", "| --- | --- | --- |"]
    out += [f"| {t} | {m} | {v} |" for t, m, v in targets(results)]
    out += ["", *bounds_notes(results), ""]

    out += [
        "## Hook cost in isolation",
        "",
        f"One thread, {results['hooks_runs']:,} runs of on_run_start, 10 on_step, on_run_end "
        "(a tenth of that for the variants with agent work); no agent work unless stated; the "
        "worker idle in its retry backoff (server unreachable), so this is the hooks' own cost.",
        "",
        *hooks_table(results["hooks"]),
        "",
    ]

    out += ["## Latency sweep: agent time per step", ""]
    if plot_path is not None:
        out += [f"![on_step time vs latency]({plot_path.name})", ""]
    out += [
        f"sync runs {plan.small.describe()}; async and ours run {plan.sweep.describe()}. "
        "The sync baseline pays two round trips per step, hence its smaller workload"
        + (" (in quick mode the 0 ms row is the main workload for all three)" if quick else "")
        + ". n is the number of on_step calls measured.",
        "",
        *sweep_table(results["sweep"]),
        "",
        "## Concurrency sweep (our sink)",
        "",
        f"Each run on its own thread with a nested child run, {plan.concurrency_steps} steps per "
        "run and 1 ms agent work per step, through the proxy at 0 ms"
        + ("." if quick else "; each level also with `journal=False`."),
        "",
        *concurrency_table(results["concurrency"]),
        "",
        "## Other figures",
        "",
        *other_figures(results),
        "",
    ]
    return "\n".join(out)


def steady_floor(runs: int, rate: float, interval: float, trigger: int) -> float:
    """Fewest requests per 1,000 steps a drain every ``interval`` s (or every ``trigger`` queued
    events) can make for ``runs`` runs stepping at ``rate`` steps/s each."""
    per_cycle = min(runs * rate * interval, float(trigger))
    per_run = per_cycle / runs
    return 1000 * runs * math.ceil(2 * per_run / 1000) / per_cycle


def bounds_notes(results: dict[str, Any]) -> list[str]:
    notes = []
    main = results["main"]
    hooks = results["hooks"]
    if "ours_nojournal" in main and "journal=False" in hooks:
        on, off = main["ours"], main["ours_nojournal"]
        iso_on, iso_off = hooks["default"]["on_step"], hooks["journal=False"]["on_step"]
        notes.append(
            "- Hook tails: on the main workload on_step p99 is "
            f"{us(hook(on, 'on_step', 'p99_us'))} with the write-ahead journal (the default) and "
            f"{us(hook(off, 'on_step', 'p99_us'))} with `journal=False`; on one thread in "
            f"isolation {us(iso_on['p99_us'])} against {us(iso_off['p99_us'])} (p50 "
            f"{us(iso_on['p50_us'])} against {us(iso_off['p50_us'])}): the difference is what "
            "the write-ahead journal costs the agent (see also the concurrency sweep)."
        )
        slow_on = hooks.get("default, 2 ms agent work per step")
        slow_off = hooks.get("journal=False, 2 ms agent work per step")
        if isinstance(slow_on, dict) and isinstance(slow_off, dict):
            notes.append(
                "- An agent that works between steps (2 ms here; an LLM call in practice) pays "
                "more per hook than a tight loop: on_step p50 / p99 "
                f"{us(slow_on['on_step']['p50_us'])} / {us(slow_on['on_step']['p99_us'])} with "
                f"the journal, {us(slow_off['on_step']['p50_us'])} / "
                f"{us(slow_off['on_step']['p99_us'])} without. Part of it is a cold CPU after "
                "the pause (the journal=False figure); the rest is the journal's cost when "
                "records come one at a time."
            )
    c = results["construct"]
    notes.append(
        f"- on_run_start's p99 includes the first hook call, which starts the worker thread "
        f"({c['first_hook_s'] * 1000:.2f} ms in a fresh interpreter; more when other threads "
        "hold the GIL): with 16 calls, p99 is that first call."
    )
    ceiling = results["ceiling"]
    burst = results["burst"]
    notes.append(
        f"- Raw ceiling: the best of {ceiling['reps']} loops of {ceiling['batches']} "
        f"`MlflowClient.log_batch` calls of 1000 metrics (after one warm-up call), measured "
        "right before (full mode) and right after the burst (best of each: "
        + ", ".join(f"{r:,.0f}" for r in ceiling["client_best_before_after"])
        + f" points/s; the better one is used), reached {ceiling['client_best']:,.0f} points/s "
        f"(all loops: {', '.join(f'{r:,.0f}' for r in ceiling['client_rates'])}; the drain is "
        f"{burst['rate'] / sorted(ceiling['client_rates'])[len(ceiling['client_rates']) // 2]:.0%} "
        "of their median)"
        + (
            f"; the same loop over our RestTransport {ceiling['rest_best']:,.0f} points/s; two "
            f"such loops in parallel {ceiling['parallel_best']:,.0f} points/s together"
            if "rest_best" in ceiling
            else ""
        )
        + ". The server (sqlite, one worker) is the bottleneck: every drain figure is bounded "
        "by it."
    )
    notes.append(
        f"- Drain burst: {burst['points']:,} points ({(burst['points'] - 12) // 2:,} steps over "
        f"4 runs) queued in {secs(burst['burst_s'])}, all in MLflow after "
        f"{secs(burst['total_s'])} in {burst['requests']} requests (flushed: {burst['flushed']}, "
        f"dropped: {burst['dropped'] or 'none'}). Time inside HTTP requests, summed over "
        f"requests, was {burst['http_s'] / burst['total_s']:.0%} of the wall time (over 100% "
        "means requests overlapped), "
        f"{burst['http_s'] / max(1, burst['http_n']) * 1000:.0f} ms per request on average "
        f"({burst['points'] / max(1, burst['http_n']):.0f} points per request), against "
        f"{1000 / ceiling['client_best'] * 1000:.0f} ms per 1000-point request in the best "
        "ceiling loop."
    )
    for s in results["steady"]:
        notes.append(
            f"- Steady state, {s['runs']} run(s) x {s['rate_per_run']:g} steps/s "
            f"({s['steps_per_s']:.0f} steps/s measured), over a {s['window']:g} s window after "
            f"a {s['warmup']:g} s warm-up: {s['http']} HTTP requests for {s['steps']} steps = "
            f"{s['per_1000']:.1f} per 1,000 steps."
        )
    config = results.get("config", {})
    interval, trigger = config.get("flush_interval"), config.get("batch_trigger")
    if interval and trigger:
        floors = ", ".join(
            f"{x['runs']} run(s): "
            f"{steady_floor(x['runs'], x['rate_per_run'], interval, trigger):.1f}"
            for x in results["steady"]
        )
        notes.append(
            "- What bounds requests per 1,000 steps: `log_batch` takes one run and at most 1000 "
            "metrics, so each drain cycle sends at least ceil(2 x steps / 1000) requests per run "
            f"with new data; a cycle runs every `flush_interval` ({interval:g} s by default) or "
            f"when `batch_trigger` ({trigger:,}) events are queued. A drain exactly every "
            f"{interval:g} s would make, for the scenarios above: {floors}. The measured "
            "figures differ because a cycle lasts the interval plus the drain itself (fewer "
            "cycles), and a run just past 1000 metrics in a cycle costs a second, nearly empty "
            "request. Many runs each stepping slowly is what needs a longer interval."
        )
    cl = results["close"]
    ceiling_best = ceiling["client_best"]
    points = 2 * cl["pending_before"]
    notes.append(
        f"- close(): {cl['pending_before']:,} pending events are ~{points:,} metric points; at "
        f"the raw ceiling of {ceiling_best:,.0f} points/s the server alone needs "
        f"{points / ceiling_best:.1f} s for them: close() cannot be faster than that here."
    )
    return notes


def other_figures(results: dict[str, Any]) -> list[str]:
    c = results["construct"]
    u = results["unreachable"]
    m = results["memory"]
    main = results["main"]
    lines = [
        f"- `import rlm_mlflow`: {c['import_s'] * 1000:.0f} ms; first `MLflowSink(...)`: "
        f"{c['construct_s'] * 1000:.2f} ms; first hook call (starts the worker thread): "
        f"{c['first_hook_s'] * 1000:.2f} ms.",
        f"- Construction of the seed sinks (imports mlflow, `set_experiment` over HTTP): sync "
        f"{secs(main['sync']['construct_s'])}, async {secs(main['async']['construct_s'])}; "
        f"ours in the same position {secs(main['ours']['construct_s'])}.",
        f"- Server unreachable (closed port): on_step p50 {us(hook(u, 'on_step', 'p50_us'))}, "
        f"p99 {us(hook(u, 'on_step', 'p99_us'))}, p99.9 {us(hook(u, 'on_step', 'p999_us'))}; "
        f"agent wall {secs(u['wall_s'])} (server up: {secs(main['ours']['wall_s'])}); close() "
        f"returned in {secs(u['close_s'])}.",
        "- Memory with the server unreachable (tracemalloc, above the state after the first "
        "hook): "
        + ", ".join(
            f"{x['steps']:,} steps: {x['current_mb']:.1f} MB now / {x['peak_mb']:.1f} MB peak"
            for x in m["marks"]
        )
        + f" ({m['elapsed_s']:.1f} s under tracemalloc).",
    ]
    if "slow" in results:
        s = results["slow"]
        serial = s["requests"] * s["latency"]
        lines.append(
            f"- Our sink, main workload, {s['latency'] * 1000:.0f} ms per request: agent wall "
            f"{secs(s['wall_s'])}, data in MLflow after {secs(s['to_data_s'])}, "
            f"{s['requests']} requests ({secs(serial)} if sent one at a time, so "
            f"{serial / max(1e-9, s['to_data_s']):.1f} requests in flight on average)."
        )
    for name in ("sync", "async", "ours", "ours_nojournal"):
        r = main.get(name)
        if r is None:
            continue
        lines.append(
            f"- {LABELS[name]}: HTTP requests counted by the {r['requests_counted_by']}: "
            f"{r['requests']}, in-process count {r['http_inproc']}; on_step p99.9 "
            f"{us(hook(r, 'on_step', 'p999_us'))}, max {us(hook(r, 'on_step', 'max_us'))}."
        )
    return lines


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smaller workload and fewer sweep points (under a minute)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="write the markdown report here (full mode default: "
        "docs/performance.md; quick mode default: print only); the latency plot "
        "goes beside it as <name>-latency.png",
    )
    parser.add_argument(
        "--burst-steps",
        type=int,
        default=None,
        help="steps in the drain burst (default 200000, quick 10000)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the work folder (server data, logs)"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.child:
        return child_main(args.child)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # The server's job runner (huey consumers) serves none of the sinks: keep its CPU out.
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    signal.signal(signal.SIGTERM, _interrupt)
    output: Path | None = args.output
    if output is None and not args.quick:
        output = ROOT / "docs" / "performance.md"
    plan = make_plan(args.quick, args.burst_steps)
    command = "scripts/bench" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])
    load_before = os.getloadavg()
    cpu_before = cpu_snapshot()
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="rlm-mlflow-bench-"))
    try:
        from rlm_mlflow.testing import local_server

        try:
            from rlm_mlflow.testing import FaultProxy
        except ImportError:
            FaultProxy = None
        log(f"starting mlflow server (work folder {workdir})")
        with local_server(workdir / "server") as server, proxy_for(FaultProxy, server) as proxy:
            harness = Harness(workdir, server, proxy)
            results = run_all(plan, harness, args.quick)
            cpu_after = cpu_snapshot()  # while the server still runs: its CPU counts as ours
            load_after = os.getloadavg()
        elapsed = time.monotonic() - started
        plot_path = output.with_name(output.stem + "-latency.png") if output else None
        if plot_path is not None and not plot(results["sweep"], plot_path):
            plot_path = None
        text = report(
            plan,
            results,
            command=command,
            quick=args.quick,
            plot_path=plot_path,
            load=(load_before, load_after),
            cpu=(cpu_before, cpu_after),
            elapsed=elapsed,
            proxy=FaultProxy is not None,
        )
        print(text)
        if output is not None:
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(text, encoding="utf-8")
            (workdir / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
            log(f"wrote {output}" + (f" and {plot_path}" if plot_path else ""))
        return 0
    except KeyboardInterrupt:
        log("interrupted; servers and children stopped")
        return 130
    finally:
        if args.keep:
            log(f"work folder kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def proxy_for(factory: Any, server: Any) -> Iterator[Any]:
    if factory is None:
        yield None
        return
    proxy = factory(server.port)
    try:
        proxy.start()
        yield proxy
    finally:
        proxy.stop()


if __name__ == "__main__":
    sys.exit(main())

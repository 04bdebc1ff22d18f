"""What runs inside each child process: one function per kind of measurement.

Each task takes the JSON spec the harness sent and returns a JSON-able dict. Our sink is used
through its public API only: ``MLflowSink(**keywords)``, the hooks, ``flush()``, ``close()`` and
``status()``. Tasks record ``status()`` whole, so the report can read keys a newer core adds.
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .baselines import MlflowTracingSink, SeedFluentSink, make_sink
from .measure import HTTP, QueueSampler, RssPeak, summarize, timer_overhead_ns, wait_readable
from .plan import WORKER_READING_BACK, WORKER_SENDING
from .workloads import (
    HOOKS,
    WARM_UP,
    Call,
    Progress,
    RlmWorkload,
    RunResult,
    Timings,
    TraceWorkload,
    drive,
    end_call,
    replay,
    start_call,
    step_call,
    trace_workload_from_spec,
    workload_from_spec,
)

Spec = dict[str, Any]


def hook_stats(timings: Timings) -> dict[str, Any]:
    return {hook: summarize(timings.ns.get(hook, [])) for hook in HOOKS}


def requests_made(sink: Any) -> int:
    """HTTP requests this process made: counted under ``requests``, else the sink's own count."""
    if HTTP.count:
        return HTTP.count
    status = sink.status() if hasattr(sink, "status") else {}
    return int(status.get("requests") or 0)


def warm_up(sink: Any) -> None:
    """One untimed run start and end: the first hook call starts the worker thread."""
    replay(sink, [start_call(WARM_UP), end_call(WARM_UP, RunResult(True, 0, 0.0), None)])


def journal_disk_mb() -> float:
    """Bytes under the journal folder the harness gave this child (``RLM_MLFLOW_JOURNAL_DIR``)."""
    folder = os.environ.get("RLM_MLFLOW_JOURNAL_DIR")
    if not folder or not Path(folder).is_dir():
        return 0.0
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) / 1e6


def task_workload(spec: Spec) -> dict[str, Any]:
    """One sink through one workload: hook timings, wall time, time until flushed, RSS."""
    kind = spec["sink"]
    workload = workload_from_spec(spec["workload"])
    pc = time.perf_counter
    t0 = pc()
    sink = make_sink(kind, spec["uri"], spec["experiment"], spec.get("options"))
    construct_s = pc() - t0
    overhead = timer_overhead_ns()
    with RssPeak() as rss:
        start = pc()
        timings = drive(sink, workload, Path(spec["folder"]), spec["prefix"])
        wall = pc() - start
        flushed = sink.flush(spec.get("flush_timeout", 300.0))
        to_data = pc() - start
        t1 = pc()
        sink.close(spec.get("close_timeout", 10.0))
        close_s = pc() - t1
    result: dict[str, Any] = {
        "construct_s": construct_s,
        "timer_overhead_ns": overhead,
        "hooks": hook_stats(timings),
        "all_hooks": summarize(timings.all()),
        "wall_s": wall,
        "to_data_s": to_data,
        "flushed": flushed,
        "close_s": close_s,
        "rss_delta_mb": rss.delta_mb,
        "http_inproc": HTTP.count,
    }
    if kind == "ours":
        result["status"] = sink.status()
    if isinstance(sink, SeedFluentSink):
        result["lost"] = dict(sink.lost)
    return result


def task_construct(spec: Spec) -> dict[str, Any]:
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
    script = RlmWorkload(runs=1, threads=1, steps=10, artifacts=False).scripts(Path(), "check")[0]
    first = next(script)
    t0 = pc()
    replay(sink, [first])
    first_hook_s = pc() - t0
    replay(sink, script)
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
    }


def task_hooks(spec: Spec) -> dict[str, Any]:
    """Each hook's cost in isolation: one thread, the worker idle in its retry backoff (the
    server is unreachable), a queue big enough that nothing is dropped or spilled."""
    out: dict[str, Any] = {}
    for variant in spec["variants"]:
        runs = variant["runs"]
        workload: RlmWorkload | TraceWorkload
        if variant.get("rich"):
            workload = TraceWorkload(
                runs=runs, threads=1, steps=10, delegations=0, think_ms=variant["think_ms"]
            )
        else:
            workload = RlmWorkload(
                runs=runs, threads=1, steps=10, think_ms=variant["think_ms"], artifacts=False
            )
        sink = make_sink(
            "ours",
            spec["uri"],
            spec["experiment"],
            {"queue_size": 20 * runs, "shutdown_timeout": 0.5, **variant["options"]},
        )
        warm_up(sink)
        timings = drive(sink, workload, Path(), variant["label"])
        status = sink.status()
        sink.close(0.5)
        out[variant["label"]] = {**hook_stats(timings), "runs": runs, "status": status}
    return {"variants": out}


def task_ceiling(spec: Spec) -> dict[str, Any]:
    """The best points/s plain ``MlflowClient.log_batch`` loops of 1000 metrics reach."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(tracking_uri=spec["uri"])
    experiment_id = client.create_experiment(spec["experiment"])
    run_id = client.create_run(experiment_id).info.run_id
    batches, reps = spec["batches"], spec["reps"]
    steps = itertools.count()
    now = int(time.time() * 1000)

    def batch() -> list[Any]:
        out = []
        for _ in range(500):
            step = next(steps)
            out.append(Metric("step_reward", 0.5, now, step))
            out.append(Metric("cumulative_reward", step * 0.5, now, step))
        return out

    def loop(prepared: list[list[Any]]) -> None:
        for metrics in prepared:
            client.log_batch(run_id, metrics=metrics)

    loop([batch()])  # warm-up
    client_rates = []
    for _ in range(reps):
        prepared = [batch() for _ in range(batches)]
        t0 = time.perf_counter()
        loop(prepared)
        client_rates.append(1000 * batches / (time.perf_counter() - t0))
    result: dict[str, Any] = {
        "client_rates": client_rates,
        "client_best": max(client_rates),
        "batches": batches,
        "reps": reps,
    }
    if spec.get("parallel", False):
        parallel_rates = []
        for _ in range(reps):
            halves = [[batch() for _ in range(max(1, batches // 2))] for _ in range(2)]
            t0 = time.perf_counter()
            threads = [threading.Thread(target=loop, args=(half,)) for half in halves]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            total = sum(len(half) for half in halves) * 1000
            parallel_rates.append(total / (time.perf_counter() - t0))
        result["parallel_rates"] = parallel_rates
        result["parallel_best"] = max(parallel_rates)
    return result


def dropped_sum(status: dict[str, Any]) -> int:
    dropped = status.get("dropped") or {}
    return int(sum(dropped.values())) if isinstance(dropped, dict) else int(dropped)


#: Runs the untimed producer steps to fill the queue before a regime's timed hooks.
BACKLOG_RUNS = 2


def under_pressure(status: dict[str, Any]) -> bool:
    """The queue is full: at capacity, or events went to the journal only, or were dropped."""
    capacity = int(status.get("queue_capacity") or 0)
    depth = int(status.get("queue_depth") or 0)
    return depth >= capacity or bool(status.get("spilled")) or dropped_sum(status) > 0


def fill_queue(sink: Any, runs: int, backlog: int, ready_when: str, timeout: float) -> Spec:
    """Untimed: step ``runs`` backlog runs round robin until the queue is full and at least
    ``backlog`` steps are queued; then wait until ``ready_when`` holds:

    - ``queue full``: nothing more;
    - ``worker sending``: the worker has sent step events (it is draining the backlog);
    - ``worker reading back``: it has sent more events than the queue can hold, so what it
      sends from then on came back from the journal.
    """
    pc = time.perf_counter
    t0 = pc()
    ids = [f"backlog-{i}" for i in range(runs)]
    replay(sink, [start_call(run_id) for run_id in ids])
    capacity = int(sink.status()["queue_capacity"])
    chunk = min(250, capacity)
    steps = 0
    full = False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        first = steps
        replay(
            sink,
            (step_call(ids[n % runs], n, 0.5, 0.5 * n) for n in range(first, first + chunk)),
        )
        steps += chunk
        full = under_pressure(sink.status())
        if full and steps >= backlog:
            break
    filled_s = pc() - t0
    # The worker takes what waits in one go and reports events sent once a run's whole batch
    # has landed (``sent`` jumps), so "sending" is read from its requests: it has made one since
    # the fill, and events are still pending. "Reading back": the memory queue was taken (depth
    # below capacity) while spilled events are still pending, so they come from the journal.
    before = sink.status()
    made = int(before.get("requests") or 0)
    ready = full
    if full and ready_when in (WORKER_SENDING, WORKER_READING_BACK):
        ready = False
        while time.monotonic() < deadline:
            status = sink.status()
            sending = int(status.get("requests") or 0) > made and int(status["pending"]) > 0
            if ready_when == WORKER_READING_BACK:
                sending = (
                    sending
                    and int(status.get("spilled") or 0) > 0
                    and int(status["queue_depth"]) < capacity
                )
            if sending:
                ready = True
                break
            time.sleep(0.001)
    return {
        "steps": steps,
        "full": full,
        "ready_when": ready_when,
        "ready": ready,
        "filled_s": filled_s,
        "waited_s": pc() - t0 - filled_s,
    }


def window(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    """What changed in ``status()`` between two snapshots."""

    def delta(key: str) -> int:
        return int(after.get(key) or 0) - int(before.get(key) or 0)

    return {
        "accepted": delta("accepted"),
        "sent": delta("sent"),
        "spilled": delta("spilled"),
        "dropped": dropped_sum(after) - dropped_sum(before),
        "requests": delta("requests"),
    }


def task_regime(spec: Spec) -> dict[str, Any]:
    """Agent threads with no work between steps, timed on a sink already in the regime.

    An untimed producer first fills the queue (see :func:`fill_queue`); then the agent threads
    make their hook calls, every one timed. ``status()`` is recorded when the timed hooks begin
    and end, so the report can show what happened while they ran; the queue depth is sampled
    meanwhile. Then either ``flush()`` until all is sent, or ``close()`` at once.
    """
    workload = workload_from_spec(spec["workload"])
    sink = make_sink("ours", spec["uri"], spec["experiment"], spec["options"])
    warm_up(sink)  # the first hook call starts the worker thread: not timed
    fill = fill_queue(
        sink, workload.runs, spec["backlog"], spec["ready_when"], spec["fill_timeout"]
    )
    pc = time.perf_counter
    before = sink.status()
    with QueueSampler(sink, spec["sample_s"]) as sampler:
        t0 = pc()
        timings = drive(sink, workload, Path(spec["folder"]), spec["prefix"])
        produce_s = pc() - t0
        after = sink.status()
    flushed = sink.flush(spec["flush_timeout"]) if spec["flush_timeout"] > 0 else False
    to_data_s = pc() - t0
    t1 = pc()
    sink.close(spec["close_timeout"])
    close_s = pc() - t1
    return {
        "hooks": hook_stats(timings),
        "all_hooks": summarize(timings.all()),
        "fill": {**fill, "runs": BACKLOG_RUNS},
        "produce_s": produce_s,
        "flushed": flushed,
        "to_data_s": to_data_s,
        "close_s": close_s,
        "queue_peak_sampled": sampler.peak,
        "queue_samples": sampler.samples,
        "status_before": before,
        "status_after": after,
        "window": window(before, after),
        "status": sink.status(),
        "switch_interval_s": sys.getswitchinterval(),
    }


def task_drain(spec: Spec) -> dict[str, Any]:
    """Runs stepped as fast as one thread can; time until ``flush()`` says all is in MLflow."""
    workload = workload_from_spec(spec["workload"])
    sink = make_sink("ours", spec["uri"], spec["experiment"], spec.get("options"))
    pc = time.perf_counter
    t0 = pc()
    drive(sink, workload, Path(spec["folder"]), spec["prefix"])
    produce_s = pc() - t0
    at_hooks_end = sink.status()
    flushed = sink.flush(spec["timeout"])
    total_s = pc() - t0
    http_s, http_n = HTTP.seconds, HTTP.count
    status = sink.status()
    sink.close(10)
    points = workload.expected().points
    return {
        "produce_s": produce_s,
        "total_s": total_s,
        "flushed": flushed,
        "points": points,
        "rate": points / total_s,
        "http_s": http_s,
        "http_n": http_n,
        "status_at_hooks_end": at_hooks_end,
        "status": status,
    }


def task_steady(spec: Spec) -> dict[str, Any]:
    """Runs stepping at a fixed rate; requests per 1,000 steps in a window after a warm-up."""
    workload = workload_from_spec(spec["workload"])
    sink = make_sink("ours", spec["uri"], spec["experiment"])
    progress = Progress([])
    errors: list[BaseException] = []

    def agents() -> None:
        try:
            drive(sink, workload, Path(), "steady", progress)
        except BaseException as exc:
            errors.append(exc)

    driver = threading.Thread(target=agents, name="steady-driver")
    driver.start()
    time.sleep(spec["warmup"])
    steps0, requests0 = progress.steps, requests_made(sink)
    time.sleep(spec["window"])
    steps1, requests1 = progress.steps, requests_made(sink)
    driver.join()
    if errors:
        raise errors[0]
    sink.flush(60)
    status = sink.status()
    sink.close(10)
    steps = steps1 - steps0
    requests = requests1 - requests0
    return {
        "steps": steps,
        "requests": requests,
        "counted_by": "requests library" if HTTP.count else "status()",
        "per_1000": 1000 * requests / max(1, steps),
        "steps_per_s": steps / spec["window"],
        "window": spec["window"],
        "warmup": spec["warmup"],
        "status": status,
    }


def task_memory(spec: Spec) -> dict[str, Any]:
    """tracemalloc over many steps with the server unreachable: bounded by the queue size?"""
    import tracemalloc

    steps = spec["steps"]
    sink = make_sink("ours", spec["uri"], spec["experiment"], {"shutdown_timeout": 2.0})
    capacity = int(sink.status()["queue_capacity"])
    script = RlmWorkload(runs=1, threads=1, steps=steps, artifacts=False).scripts(Path(), "mem")[0]
    replay(sink, [next(script)])  # the run start: the worker comes up and retries
    time.sleep(0.2)
    checkpoints = sorted({capacity, 2 * capacity, min(steps, 100_000), steps})
    marks: list[dict[str, Any]] = []
    done = 0

    def checkpoint(call: Call) -> None:
        nonlocal done
        if call.hook != "on_step":
            return
        done += 1
        if done in checkpoints:
            current, peak = tracemalloc.get_traced_memory()
            marks.append(
                {
                    "steps": done,
                    "current_mb": (current - base) / 1e6,
                    "peak_mb": (peak - base) / 1e6,
                }
            )

    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    t0 = time.perf_counter()
    replay(sink, (call for call in script if call.hook == "on_step"), on_call=checkpoint)
    elapsed = time.perf_counter() - t0
    tracemalloc.stop()
    status = sink.status()
    disk = journal_disk_mb()
    sink.close(2)
    return {
        "journal_disk_mb": disk,
        "capacity": capacity,
        "marks": marks,
        "elapsed_s": elapsed,
        "status": status,
    }


def task_close(spec: Spec) -> dict[str, Any]:
    """close() with ``pending`` step events queued and the server up."""
    pending, runs = spec["pending"], spec["runs"]
    sink = make_sink(
        "ours",
        spec["uri"],
        spec["experiment"],
        {
            "queue_size": 2 * pending,
            "flush_interval": 3600.0,
            "batch_trigger": 10**9,
            **spec.get("options", {}),
        },
    )
    workload = RlmWorkload(runs=runs, threads=1, steps=pending // runs, interleave=True)
    calls = workload.scripts(Path(spec["folder"]), "close")[0]
    replay(sink, itertools.islice(calls, runs))  # round robin: the run starts come first
    created = sink.flush(60)  # the runs exist, as they would after a while of running
    replay(sink, calls)
    before = sink.status()
    t0 = time.perf_counter()
    sink.close()  # the default shutdown_timeout
    close_s = time.perf_counter() - t0
    return {
        "created": created,
        "close_s": close_s,
        "status_before": before,
        "status": sink.status(),
    }


def lost_by(sink: Any) -> dict[str, int]:
    """What a baseline skipped or failed to do, by reason (ours: nothing, it never raises)."""
    return dict(sink.lost) if isinstance(sink, SeedFluentSink | MlflowTracingSink) else {}


def task_traces(spec: Spec) -> dict[str, Any]:
    """One sink through trace workloads (one fresh sink and experiment per variant): every hook
    timed; then ``flush()``, and the server's store polled until every span is there.

    Before the timed hooks, untimed: one run start and end (``warm-up``: the first hook call
    starts our worker thread, MLflow's tracer provider), flushed; its trace (one span) is
    counted in the store and left out of the read-back. HTTP requests are counted in-process by
    path, from the first timed hook until the spans are readable.
    """
    pc = time.perf_counter
    variants = []
    for variant in spec["variants"]:
        workload = trace_workload_from_spec(variant["workload"])
        experiment = variant["experiment"]
        t0 = pc()
        sink = make_sink(spec["sink"], spec["uri"], experiment, spec.get("options"))
        construct_s = pc() - t0
        warm_up(sink)
        warmed = sink.flush(60)
        before, seconds_before = HTTP.snapshot(), HTTP.seconds_snapshot()
        start = pc()
        timings = drive(sink, workload, Path(), variant["prefix"])
        hooks_s = pc() - start
        flushed = sink.flush(spec["flush_timeout"])
        flush_s = pc() - start
        readable, traces, spans = wait_readable(
            spec["db"], experiment, workload.spans + 1, spec["readable_timeout"]
        )
        readable_s = pc() - start
        requests, seconds = HTTP.snapshot(), HTTP.seconds_snapshot()
        requests.subtract(before)
        status = sink.status() if spec["sink"] == "ours" else {}
        sink.close(10)
        hooks_ns = sum(timings.all())
        variants.append(
            {
                "label": variant["label"],
                "experiment": experiment,
                "workload": variant["workload"],
                "construct_s": construct_s,
                "warmed": warmed,
                "hooks": hook_stats(timings),
                "all_hooks": summarize(timings.all()),
                "hooks_s": hooks_s,
                "hook_time_s": hooks_ns / 1e9,
                "per_span_us": hooks_ns / 1000 / workload.spans,
                "flushed": flushed,
                "flush_s": flush_s,
                "readable": readable,
                "readable_s": readable_s,
                "store": {"traces": traces - 1, "spans": spans - 1},  # the warm-up's left out
                "requests": {path: n for path, n in requests.items() if n},
                "request_seconds": {
                    path: seconds.get(path, 0.0) - seconds_before.get(path, 0.0)
                    for path, n in requests.items()
                    if n
                },
                "status": status,
                "lost": lost_by(sink),
                # The baseline's own count of the spans it started (the warm-up's one included).
                "spans_made": getattr(sink, "spans_started", None),
            }
        )
    return {"variants": variants, "requests_total": HTTP.count}


#: Sinks kept alive until the interpreter exits, as a program's global sink would be.
_KEEP: list[Any] = []


def task_trace_exit(spec: Spec) -> dict[str, Any]:
    """A trace workload, then the process ends right after the last hook: no flush, no close.

    The result line is printed as soon as the hooks are done; with ``ending`` "exit" the
    process then exits normally (exit hooks run), with "sigterm" it waits for the parent's
    SIGTERM. The sink is kept alive until then, as a program's global sink would be.
    """
    workload = trace_workload_from_spec(spec["workload"])
    sink = make_sink(spec["sink"], spec["uri"], spec["experiment"], spec.get("options"))
    _KEEP.append(sink)
    start = time.perf_counter()
    timings = drive(sink, workload, Path(), spec["prefix"])
    result: dict[str, Any] = {
        "hooks_s": time.perf_counter() - start,
        "hooks": hook_stats(timings),
        "status": sink.status() if spec["sink"] == "ours" else {},
        "lost": lost_by(sink),
    }
    if spec["ending"] == "sigterm":
        result[LINGER_KEY] = spec.get("linger_s", 120.0)
    return result


#: A task result with this key makes the child wait that many seconds after printing it.
LINGER_KEY = "_linger_s"


TASKS: dict[str, Callable[[Spec], dict[str, Any]]] = {
    "workload": task_workload,
    "construct": task_construct,
    "hooks": task_hooks,
    "ceiling": task_ceiling,
    "regime": task_regime,
    "drain": task_drain,
    "steady": task_steady,
    "memory": task_memory,
    "close": task_close,
    "traces": task_traces,
    "trace_exit": task_trace_exit,
}

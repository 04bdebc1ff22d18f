"""What runs inside each child process of ``scripts/bench_scale.py``: the workloads long-running
services produce (one very long run, many runs at once, many sinks, rich step events).

Like ``tasks.py``, each task takes the JSON spec the parent sent and returns a JSON-able dict, and
uses our sink through its public API only. Read-back polls the server's sqlite store directly
(MLflow's tables ``experiments``, ``runs``, ``metrics``, ``trace_info``, ``spans``).
"""

from __future__ import annotations

import atexit
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .baselines import make_sink
from .measure import RssPeak, summarize
from .tasks import LINGER_KEY, hook_stats
from .workloads import (
    PARAMS_PER_RUN,
    STEP_KEYS,
    SUMMARY_KEYS,
    RlmWorkload,
    drive,
    rlm_params,
    trace_workload_from_spec,
)

Spec = dict[str, Any]
POINT_KEYS = (*STEP_KEYS, *SUMMARY_KEYS)


def _connect(db: str) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=60)


def _experiment_id(connection: sqlite3.Connection, experiment: str) -> int | None:
    row = connection.execute(
        "SELECT experiment_id FROM experiments WHERE name = ?", (experiment,)
    ).fetchone()
    return None if row is None else int(row[0])


def count_points(db: str, experiment: str) -> int:
    """Step and summary metric points of ``experiment``'s runs in the store."""
    connection = _connect(db)
    try:
        exp_id = _experiment_id(connection, experiment)
        if exp_id is None:
            return 0
        marks = ", ".join("?" for _ in POINT_KEYS)
        row = connection.execute(
            "SELECT COUNT(*) FROM metrics WHERE run_uuid IN "
            f"(SELECT run_uuid FROM runs WHERE experiment_id = ?) AND key IN ({marks})",
            (exp_id, *POINT_KEYS),
        ).fetchone()
        return int(row[0])
    except sqlite3.OperationalError:  # locked past the timeout: read again next time
        return -1
    finally:
        connection.close()


def run_statuses(db: str, experiment: str) -> dict[str, int]:
    """``experiment``'s runs by status (FINISHED, RUNNING, FAILED, KILLED, ...)."""
    connection = _connect(db)
    try:
        exp_id = _experiment_id(connection, experiment)
        if exp_id is None:
            return {}
        rows = connection.execute(
            "SELECT status, COUNT(*) FROM runs WHERE experiment_id = ? GROUP BY status", (exp_id,)
        ).fetchall()
        return {str(status): int(n) for status, n in rows}
    finally:
        connection.close()


def traces_of(db: str, experiment: str) -> list[tuple[str, str, int]]:
    """``(trace id, state, spans stored)`` of each of ``experiment``'s traces."""
    connection = _connect(db)
    try:
        exp_id = _experiment_id(connection, experiment)
        if exp_id is None:
            return []
        rows = connection.execute(
            "SELECT t.request_id, t.status, (SELECT COUNT(*) FROM spans s "
            "WHERE s.trace_id = t.request_id) FROM trace_info t WHERE t.experiment_id = ?",
            (exp_id,),
        ).fetchall()
        return [(str(a), str(b), int(c)) for a, b, c in rows]
    except sqlite3.OperationalError:  # no trace written yet (no tables), or locked
        return []
    finally:
        connection.close()


def wait_for(check: Callable[[], bool], timeout: float, every: float) -> bool:
    """Poll ``check`` every ``every`` seconds until it holds or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(every)


def get_trace(server_uri: str, trace_id: str, timeout: float) -> dict[str, Any]:
    """One REST ``GetTrace`` (what the UI asks when a trace is opened), timed."""
    import requests

    url = f"{server_uri.rstrip('/')}/api/3.0/mlflow/traces/get"
    t0 = time.perf_counter()
    try:
        answer = requests.get(url, params={"trace_id": trace_id}, timeout=timeout)
    except requests.RequestException as exc:
        return {"ok": False, "seconds": time.perf_counter() - t0, "error": type(exc).__name__}
    seconds = time.perf_counter() - t0
    spans = None
    if answer.ok:
        spans = len(answer.json().get("trace", {}).get("spans", []))
    return {
        "ok": answer.ok,
        "status_code": answer.status_code,
        "seconds": seconds,
        "bytes": len(answer.content),
        "spans": spans,
    }


def task_long(spec: Spec) -> dict[str, Any]:
    """One run of ``steps`` steps, traces on (the default), as fast as one thread hooks: hook
    latency; time from the first hook until every point is in the store; the trace's spans and
    one REST ``GetTrace`` of it once it is ended; ``close()``."""
    workload = RlmWorkload(runs=1, threads=1, steps=spec["steps"], artifacts=False)
    expected = workload.expected().points
    sink = make_sink("ours", spec["uri"], spec["experiment"], spec.get("options"))
    pc = time.perf_counter
    landed: list[int] = [0]

    def all_points() -> bool:
        landed[0] = max(landed[0], count_points(spec["db"], spec["experiment"]))
        return landed[0] >= expected

    with RssPeak() as rss:
        t0 = pc()
        timings = drive(sink, workload, Path(), spec["prefix"])
        hooks_s = pc() - t0
        status_at_hooks_end = sink.status()
        points_ok = wait_for(all_points, spec["timeout"], spec["poll"])
        points_s = pc() - t0
        status_at_points = sink.status()
        found: list[tuple[str, str, int]] = []

        def trace_ended() -> bool:
            found[:] = traces_of(spec["db"], spec["experiment"])
            return bool(found) and all(state != "IN_PROGRESS" for _, state, _ in found)

        trace_ok = wait_for(trace_ended, spec["trace_timeout"], spec["poll"])
        trace_s = pc() - t0
    get = (
        get_trace(spec["server_uri"], found[0][0], spec["get_timeout"])
        if found
        else {"ok": False, "error": "no trace stored"}
    )
    t1 = pc()
    sink.close()  # the default shutdown_timeout
    close_s = pc() - t1
    return {
        "steps": spec["steps"],
        "expected_points": expected,
        "hooks": hook_stats(timings),
        "hooks_s": hooks_s,
        "points_landed": landed[0],
        "points_ok": points_ok,
        "points_s": points_s,
        "trace_ended": trace_ok,
        "trace_s": trace_s,
        "traces": [{"id": t, "state": s, "spans": n} for t, s, n in found],
        "get_trace": get,
        "close_s": close_s,
        "rss_delta_mb": rss.delta_mb,
        "status_at_hooks_end": status_at_hooks_end,
        "status_at_points": status_at_points,
        "status": sink.status(),
    }


def task_journaled(spec: Spec) -> dict[str, Any]:
    """Runs stepped by one thread with the server unreachable: everything goes to the journal.
    The result is printed at the last hook; the parent then kills the process (SIGKILL)."""
    workload = RlmWorkload(
        runs=spec["runs"], threads=1, steps=spec["steps"], artifacts=False, interleave=False
    )
    sink = make_sink("ours", spec["uri"], spec["experiment"], spec.get("options"))
    t0 = time.perf_counter()
    timings = drive(sink, workload, Path(), spec["prefix"])
    return {
        "hooks_s": time.perf_counter() - t0,
        "hooks": hook_stats(timings),
        "status": sink.status(),
        "expected": workload.expected().__dict__,
        LINGER_KEY: spec.get("linger_s", 600.0),
    }


def task_client_loop(spec: Spec) -> dict[str, Any]:
    """The minimal ``MlflowClient`` loop a user could write for the same runs: on ``threads``
    threads, per run ``create_run``, one ``log_batch`` with its params, tags and metrics, and
    ``set_terminated``. With ``spec["within_s"]``, also how many runs it had ended that many
    seconds after it began."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    client = MlflowClient(tracking_uri=spec["uri"])
    experiment_id = client.create_experiment(spec["experiment"])
    runs, steps, threads = spec["runs"], spec["steps"], spec["threads"]
    next_run = iter(range(runs))
    take = threading.Lock()
    errors: list[BaseException] = []
    ended: list[float] = []

    def one(index: int) -> None:
        run_id = f"loop-{index:05d}"
        now = int(time.time() * 1000)
        params = rlm_params(None, 0, steps)
        batch_params = [Param(k, str(v)) for k, v in params.items()]
        batch_params += [Param("environment", "pure_rlm"), Param("task_chars", "300")]
        tags = [RunTag("run_id", run_id), RunTag("component", "rlm-code-rlm")]
        metrics = []
        cumulative = 0.0
        for step in range(1, steps + 1):
            reward = ((step * 7) % 11) / 10.0
            cumulative += reward
            metrics.append(Metric("step_reward", reward, now, step))
            metrics.append(Metric("cumulative_reward", cumulative, now, step))
        metrics += [
            Metric("completed", 1.0, now, 0),
            Metric("steps", float(steps), now, 0),
            Metric("total_reward", cumulative, now, 0),
        ]
        created = client.create_run(experiment_id, run_name=run_id)
        client.log_batch(
            created.info.run_id, metrics=metrics, params=batch_params[:PARAMS_PER_RUN], tags=tags
        )
        client.set_terminated(created.info.run_id, "FINISHED")
        ended.append(time.perf_counter())

    # Counting the deadline, a run the server refuses is counted and the loop goes on (a loop
    # this wide can outgrow the server's database pool); otherwise the first error ends it.
    keep_going = spec.get("within_s") is not None

    def worker() -> None:
        while True:
            with take:
                index = next(next_run, None)
            if index is None:
                return
            try:
                one(index)
            except Exception as exc:  # re-raised below, or counted
                errors.append(exc)
                if not keep_going:
                    return

    pool = [threading.Thread(target=worker, name=f"loop-{i}") for i in range(threads)]
    t0 = time.perf_counter()
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    seconds = time.perf_counter() - t0
    if errors and not keep_going:
        raise errors[0]
    out: dict[str, Any] = {"seconds": seconds, "runs": runs, "threads": threads}
    if keep_going:
        out["ended_within"] = sum(1 for at in ended if at - t0 <= spec["within_s"])
        out["failed"] = len(errors)
        out["first_error"] = str(errors[0])[:200] if errors else None
    return out


def _open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1


def task_many_sinks(spec: Spec) -> dict[str, Any]:
    """``sinks`` sinks made one after another in one process (as a program that builds a sink per
    runner does), each taking one run of ``steps`` steps, then dropped without ``close()``. The
    result is printed at the last hook; the process then exits on its own. Just before it is
    gone (an exit handler that runs after the sinks' own), the count of its open file
    descriptors is written to ``spec["fd_file"]``."""
    fd_file = Path(spec["fd_file"])
    # Registered before rlm_mlflow is imported: exit handlers run latest first, so this one runs
    # after the sinks' exit hook.
    atexit.register(lambda: fd_file.write_text(str(_open_fds()), encoding="utf-8"))
    workload = RlmWorkload(runs=1, threads=1, steps=spec["steps"], artifacts=False)
    t0 = time.perf_counter()
    for index in range(spec["sinks"]):
        sink = make_sink("ours", spec["uri"], spec["experiment"], spec.get("options"))
        drive(sink, workload, Path(), f"{spec['prefix']}-{index:04d}")
        del sink  # dropped: no flush, no close
    return {"hooks_s": time.perf_counter() - t0, "fds_at_last_hook": _open_fds()}


def task_rich(spec: Spec) -> dict[str, Any]:
    """RLM Code-shaped step events (code, rationale, stdout, usage) on ``threads`` threads, the
    journal on (the default): every hook timed. The result is printed at the last hook; the
    parent then kills the process (SIGKILL) and replays its journal."""
    workload = trace_workload_from_spec(spec["workload"])
    sink = make_sink("ours", spec["uri"], spec["experiment"], spec.get("options"))
    t0 = time.perf_counter()
    timings = drive(sink, workload, Path(), spec["prefix"])
    return {
        "hooks_s": time.perf_counter() - t0,
        "hooks": hook_stats(timings),
        "all_hooks": summarize(timings.all()),
        "status": sink.status(),
        LINGER_KEY: spec.get("linger_s", 600.0),
    }


def task_visibility(spec: Spec) -> dict[str, Any]:
    """``scripts/visibility.py``'s measurement at each count of concurrent runs, the sink's and
    then the minimal ``MlflowClient`` loop's (the server's own pace at that many runs)."""
    import visibility

    results = [
        visibility.measure(
            spec["uri"], runs, spec["seconds"], spec["step_every"], spec["poll"], baseline=baseline
        )
        for runs in spec["runs"]
        for baseline in (False, True)
    ]
    return {"results": results, "within_s": visibility.WITHIN}


SCALE_TASKS: dict[str, Callable[[Spec], dict[str, Any]]] = {
    "long": task_long,
    "journaled": task_journaled,
    "client_loop": task_client_loop,
    "many_sinks": task_many_sinks,
    "rich": task_rich,
    "visibility": task_visibility,
}

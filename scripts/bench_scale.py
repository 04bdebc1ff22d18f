"""The sink at the sizes long-running services reach, each figure a ratio measured in the same run.

    .venv/bin/python scripts/bench_scale.py                  # full plan: writes docs/performance.md
    .venv/bin/python scripts/bench_scale.py --quick          # smaller sizes; prints the section
    .venv/bin/python scripts/bench_scale.py --quick --only long,sinks --output /tmp/perf.md
    .venv/bin/python scripts/bench_scale.py --report-from /tmp/bench_scale-full.json

One local ``mlflow server`` (sqlite) with a pass-through FaultProxy before it (it counts requests
and adds latency); every measurement runs in a fresh interpreter (``python -m benchkit.child``)
with the sink's default settings. Sections (``long`` runs last):

- ``long``: one run of 100,000 steps, traces on: time until every point is in MLflow against
  the raw ``log_batch`` ceiling's time for as many points, ``GetTrace`` of its trace, its spans,
  hook latency against a 2,000-step run;
- ``replay``: 500 runs x 200 steps journaled while the server was down (the process killed),
  then ``rlm-mlflow replay``: points/s against the ceiling, requests per run, exactly once,
  invocations needed;
- ``many_runs``: 2,000 runs x 5 steps from 8 threads against a minimal ``MlflowClient`` loop at
  the same concurrency;
- ``sinks``: 300 sinks dropped without ``close()``, the server at 200 ms per request: exit time,
  file descriptors, runs left RUNNING;
- ``rich``: ``on_step`` latency with 10 KB RLM Code-shaped events on 1 and 4 threads, then
  ``kill -9`` and replay: exactly once;
- ``visibility``: hook-to-read-back time at 1, 16 and 200 concurrent runs
  (``scripts/visibility.py``).

The results go between this section's markers in the report file (replaced on a rerun, added at
the end otherwise) and, whole, to a JSON file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from importlib.metadata import version
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchkit.fmt import secs, table, us
from benchkit.harness import (
    ROOT,
    Harness,
    Machine,
    closed_port_uri,
    log,
    server_and_proxy,
)
from benchkit.scale import run_statuses
from benchkit.workloads import RlmWorkload, TraceWorkload, workload_spec

from rlm_mlflow._transports.http import CLOSING_IN_FLIGHT

MARK_BEGIN = "<!-- scale:begin -->"
MARK_END = "<!-- scale:end -->"
HEADING = "## At the sizes services reach"
DOC = ROOT / "docs" / "performance.md"


@dataclass(frozen=True)
class ScalePlan:
    name: str
    long_steps: int
    base_steps: int
    ceiling_batches: int
    points_timeout: float
    replay_runs: int
    replay_steps: int
    replay_timeout: float
    many_runs: int
    sinks: int
    rich_runs: int
    rich_steps: int
    visibility_runs: tuple[int, ...]
    visibility_seconds: float
    # Fixed by the targets, the same in every plan.
    many_steps: int = 5
    many_threads: int = 8
    sink_steps: int = 5
    sink_latency_s: float = 0.2
    # The minimal loop the sinks row is compared with: at the sink's closing bound of requests
    # in flight (CLOSING_IN_FLIGHT), and at what 300 runs x 3 requests within 5 s would need at
    # 200 ms a request if the server kept up (36).
    sink_loop_threads: tuple[int, ...] = (CLOSING_IN_FLIGHT, 36)
    shutdown_timeout: float = 5.0
    rich_threads: tuple[int, ...] = (1, 4)
    max_invocations: int = 3


PLANS = {
    "full": ScalePlan(
        name="full",
        long_steps=100_000,
        base_steps=2_000,
        ceiling_batches=40,
        points_timeout=1800.0,
        replay_runs=500,
        replay_steps=200,
        replay_timeout=3600.0,
        many_runs=2_000,
        sinks=300,
        rich_runs=40,
        rich_steps=50,
        visibility_runs=(1, 16, 200),
        visibility_seconds=30.0,
    ),
    "quick": ScalePlan(
        name="quick",
        long_steps=10_000,
        base_steps=2_000,
        ceiling_batches=10,
        points_timeout=600.0,
        replay_runs=20,
        replay_steps=200,
        replay_timeout=900.0,
        many_runs=200,
        sinks=30,
        rich_runs=20,
        rich_steps=50,
        visibility_runs=(1, 16, 200),
        visibility_seconds=8.0,
    ),
    "smoke": ScalePlan(
        name="smoke",
        long_steps=300,
        base_steps=100,
        ceiling_batches=2,
        points_timeout=180.0,
        replay_runs=3,
        replay_steps=10,
        replay_timeout=180.0,
        many_runs=16,
        sinks=3,
        rich_runs=2,
        rich_steps=4,
        visibility_runs=(2,),
        visibility_seconds=3.0,
    ),
}

#: Targets (what each row asks).
LONG_RATIO = 2.0
GET_TRACE_S = 3.0
HOOK_NOISE = 1.10  # two runs on a shared machine: a p99 within 10% counts as no worse
REPLAY_SHARE = 0.70
REPLAY_REQUESTS_PER_RUN = 4.0
MANY_RATIO = 1.5
EXIT_MARGIN_S = 1.0
RICH_P99_US = 30.0
#: The texts of the reference burst beside the 10 KB one (characters of code and of stdout).
SMALL_TEXT = 20


@dataclass
class Context:
    harness: Harness
    plan: ScalePlan


def ceiling(ctx: Context, label: str) -> dict[str, Any]:
    """The raw ``MlflowClient.log_batch`` ceiling (1000 metrics a request, one run), through the
    proxy as the sink's requests go."""
    h = ctx.harness
    return h.child(
        {
            "task": "ceiling",
            "uri": h.uri,
            "experiment": h.experiment(f"ceiling-{label}"),
            "batches": ctx.plan.ceiling_batches,
            "reps": 2,
        }
    )


def run_long(ctx: Context) -> dict[str, Any]:
    h, plan = ctx.harness, ctx.plan
    log(
        f"long: the raw log_batch ceiling, then runs of {plan.base_steps:,} and "
        f"{plan.long_steps:,} steps"
    )
    out: dict[str, Any] = {"ceiling": ceiling(ctx, "long")}
    for key, steps in (("base", plan.base_steps), ("long", plan.long_steps)):
        experiment = h.experiment(f"long{steps}")
        before, paths = h.proxy_requests, h.proxy_paths
        spec = {
            "task": "long",
            "uri": h.uri,
            "server_uri": h.server_uri,
            "db": str(h.db_path),
            "experiment": experiment,
            "prefix": f"long{steps}",
            "steps": steps,
            "timeout": plan.points_timeout,
            "trace_timeout": plan.points_timeout / 2,
            "get_timeout": 120.0,
            "poll": 0.25,
        }
        result = h.child(spec, timeout=plan.points_timeout * 1.5 + 900)
        result["requests"] = h.proxy_requests - before
        result["paths"] = dict(h.proxy_paths - paths)
        out[key] = result
    return out


def _invoke_replay(
    h: Harness, journal_dir: str, timeout: float, watch: tuple[str, int] | None = None
) -> dict[str, Any]:
    try:
        return h.replay(journal_dir, uri=h.uri, timeout=timeout, watch=watch)
    except subprocess.TimeoutExpired:
        return {"returncode": None, "seconds": timeout, "report": {}, "timed_out": True}


def _complete(readback: dict[str, Any], expected: dict[str, Any]) -> bool:
    return bool(
        readback["runs"] == expected["runs"]
        and readback["finished"] == expected["runs"]
        and readback["step_points"] == expected["step_points"]
        and readback["summary_points"] == expected["summary_points"]
    )


def _replay_until_done(
    ctx: Context, journal_dir: str, experiment: str, expected: dict[str, Any]
) -> dict[str, Any]:
    """``rlm-mlflow replay`` through the proxy until everything is read back (or the plan's
    limit of invocations): each invocation's time, exit code and report, requests by path."""
    h = ctx.harness
    before, paths = h.proxy_requests, h.proxy_paths
    invocations = []
    readback: dict[str, Any] = {}
    points = int(expected["step_points"]) + int(expected["summary_points"])
    for _ in range(ctx.plan.max_invocations):
        done = _invoke_replay(h, journal_dir, ctx.plan.replay_timeout, (experiment, points))
        h.settle(120)
        readback = h.read_back(experiment)
        invocations.append({**done, "readback": readback})
        log(
            f"    (replay: exit {done['returncode']} after {done['seconds']:.1f} s, "
            f"{readback['step_points'] + readback['summary_points']:,} points read back)"
        )
        if done["returncode"] == 0 and _complete(readback, expected):
            break
    return {
        "invocations": invocations,
        "seconds": sum(i["seconds"] for i in invocations),
        "requests": h.proxy_requests - before,
        "paths": dict(h.proxy_paths - paths),
        "readback": readback,
        "exactly_once": _complete(readback, expected),
    }


def startup_seconds(h: Harness) -> float:
    """What a replay invocation pays before it sends anything: a fresh interpreter importing
    mlflow and the replay module (the ceiling, measured inside a running process, does not)."""
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", "import mlflow, rlm_mlflow._replay"],
        env=h._environment("startup"),
        cwd=h.workdir,
        capture_output=True,
        timeout=300,
        check=True,
    )
    return time.perf_counter() - t0


def run_replay(ctx: Context) -> dict[str, Any]:
    h, plan = ctx.harness, ctx.plan
    log(
        f"replay: {plan.replay_runs:,} runs x {plan.replay_steps:,} steps journaled with the "
        "server unreachable, the process killed, then rlm-mlflow replay"
    )
    out: dict[str, Any] = {"ceiling": ceiling(ctx, "replay")}
    experiment = h.experiment("replay")
    journaled = h.ending_child(
        {
            "task": "journaled",
            "ending": "kill",
            "uri": closed_port_uri(),
            "experiment": experiment,
            "prefix": "replay",
            "runs": plan.replay_runs,
            "steps": plan.replay_steps,
        },
        timeout=600,
    )
    expected = journaled["expected"]
    out["journaled"] = journaled
    out["startup_s"] = startup_seconds(h)
    out["expected"] = expected
    out.update(_replay_until_done(ctx, journaled["journal_dir"], experiment, expected))
    return out


def run_many_runs(ctx: Context) -> dict[str, Any]:
    h, plan = ctx.harness, ctx.plan
    log(
        f"many runs: {plan.many_runs:,} runs x {plan.many_steps} steps from "
        f"{plan.many_threads} threads, ours and a minimal MlflowClient loop"
    )
    workload = RlmWorkload(
        runs=plan.many_runs, threads=plan.many_threads, steps=plan.many_steps, artifacts=False
    )
    ours = h.run_workload(
        "ours", workload, label="many", flush_timeout=plan.points_timeout, close_timeout=120.0
    )
    before = h.proxy_requests
    loop = h.child(
        {
            "task": "client_loop",
            "uri": h.uri,
            "experiment": h.experiment("loop"),
            "runs": plan.many_runs,
            "steps": plan.many_steps,
            "threads": plan.many_threads,
        }
    )
    loop["requests"] = h.proxy_requests - before
    return {"ours": ours, "loop": loop, "expected": asdict(workload.expected())}


def run_sinks(ctx: Context) -> dict[str, Any]:
    h, plan = ctx.harness, ctx.plan
    log(
        f"sinks: {plan.sinks} sinks dropped without close(), {plan.sink_latency_s * 1000:.0f} ms "
        f"per request, shutdown_timeout={plan.shutdown_timeout:g}"
    )
    experiment = h.experiment("sinks")
    fd_file = h.workdir / f"fds-{uuid.uuid4().hex[:6]}"
    with h.latency(plan.sink_latency_s):
        result = h.ending_child(
            {
                "task": "many_sinks",
                "ending": "exit",
                "uri": h.uri,
                "experiment": experiment,
                "prefix": "sink",
                "sinks": plan.sinks,
                "steps": plan.sink_steps,
                "options": {"shutdown_timeout": plan.shutdown_timeout},
                "fd_file": str(fd_file),
            },
            timeout=600,
        )
        h.settle(300)
        # The same runs from a minimal MlflowClient loop through the same slow way: how many of
        # them it ends within the same deadline (the server's pace, not the sink's).
        result["loops"] = [
            h.child(
                {
                    "task": "client_loop",
                    "uri": h.uri,
                    "experiment": h.experiment(f"sinks-loop{threads}"),
                    "runs": plan.sinks,
                    "steps": plan.sink_steps,
                    "threads": threads,
                    "within_s": plan.shutdown_timeout,
                }
            )
            for threads in plan.sink_loop_threads
        ]
    result["fds_at_exit"] = int(fd_file.read_text()) if fd_file.is_file() else None
    result["statuses"] = run_statuses(str(h.db_path), experiment)
    journal = Path(result["journal_dir"])
    result["journal_files"] = (
        sum(1 for p in journal.rglob("*") if p.is_file()) if journal.is_dir() else 0
    )
    return result


def cold_cpu() -> dict[str, float]:
    """p50 of one fixed piece of Python (50 dict stores, no I/O) run in a tight loop and after
    pauses like an agent's: what this machine adds to any short call after a pause, hooks
    included (a vCPU's caches and clocks go cold while it waits)."""

    def work() -> dict[int, int]:
        return {i: i * 2 for i in range(50)}

    out: dict[str, float] = {}
    for pause in (0.0, 0.002, 0.02):
        times = []
        for _ in range(200):
            if pause:
                time.sleep(pause)
            start = time.perf_counter_ns()
            work()
            times.append(time.perf_counter_ns() - start)
        out[f"{pause:g}"] = statistics.median(times) / 1000
    return out


def run_rich(ctx: Context) -> dict[str, Any]:
    h, plan = ctx.harness, ctx.plan
    out: dict[str, Any] = {"cold_cpu": cold_cpu()}

    def burst(workload: TraceWorkload, name: str) -> tuple[str, dict[str, Any]]:
        """The workload's hooks, every one timed, in a child killed after its last hook."""
        experiment = h.experiment(name)
        hooked = h.ending_child(
            {
                "task": "rich",
                "ending": "kill",
                "uri": h.uri,
                "experiment": experiment,
                "prefix": name,
                "workload": workload_spec(workload),
            },
            timeout=600,
        )
        h.settle(120)
        return experiment, hooked

    for threads in plan.rich_threads:
        workload = TraceWorkload(runs=plan.rich_runs, threads=threads, steps=plan.rich_steps)
        log(f"rich events on {threads} thread(s): {workload.describe()}; kill -9, replay")
        experiment, hooked = burst(workload, f"rich{threads}")
        expected = asdict(workload.expected())
        replayed = _replay_until_done(ctx, hooked["journal_dir"], experiment, expected)
        traces = h.read_traces(experiment, workload.spans_per_trace)
        spans_once = (
            traces["traces"] == workload.runs
            and traces["spans"] == workload.spans
            and traces["duplicates"] == 0
        )
        # The same burst with texts of 20 characters: what the hook costs here whatever the
        # event's size (the row asks a 10 KB step to cost about what a small one does).
        small = replace(workload, code_chars=SMALL_TEXT, stdout_chars=SMALL_TEXT)
        _, small_hooked = burst(small, f"small{threads}")
        out[str(threads)] = {
            "workload": workload_spec(workload),
            "describe": workload.describe(),
            "hooked": hooked,
            "small_hooked": small_hooked,
            "replay": replayed,
            "traces": traces,
            "expected_spans": workload.spans,
            "exactly_once": replayed["exactly_once"] and spans_once,
        }
    return out


def run_visibility(ctx: Context) -> dict[str, Any]:
    h, plan = ctx.harness, ctx.plan
    log(f"visibility: {', '.join(map(str, plan.visibility_runs))} concurrent runs")
    return h.child(
        {
            "task": "visibility",
            "uri": h.server_uri,
            "runs": list(plan.visibility_runs),
            "seconds": plan.visibility_seconds,
            "step_every": 1.0,
            "poll": 0.25,
        },
        timeout=plan.visibility_seconds * len(plan.visibility_runs) + 900,
    )


#: In the order they run: the long run last, since reading its trace back can keep the server's
#: worker busy for minutes after the request timed out, which would colour what comes after.
SECTIONS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "replay": run_replay,
    "many_runs": run_many_runs,
    "sinks": run_sinks,
    "rich": run_rich,
    "visibility": run_visibility,
    "long": run_long,
}


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


def _n(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else str(value)


def _ok(met: bool | None) -> str:
    return "-" if met is None else ("yes" if met else "**no**")


def _p99(result: dict[str, Any], hook: str = "on_step", key: str = "p99_us") -> float | None:
    value = result.get("hooks", {}).get(hook, {}).get(key)
    return float(value) if value is not None else None


def by_endpoint(paths: dict[str, int]) -> Counter[str]:
    """Requests by path, a trace's id in a path replaced by ``{trace_id}``."""
    out: Counter[str] = Counter()
    for path, n in paths.items():
        out[re.sub(r"/tr-[0-9a-f]+", "/{trace_id}", path)] += n
    return out


#: Requests shared by many runs: OTLP batches of many traces' spans, searches for a page of
#: runs, the experiment's lookup, the server's version.
_SHARED_PATHS = frozenset({"/v1/traces", "/version", "/api/2.0/mlflow/runs/search"})


def _trace_paths(paths: dict[str, int]) -> int:
    """Requests shared by many runs (see :data:`_SHARED_PATHS`): not one trace's own requests
    (its info, its assessments), which count as their run's."""
    return sum(
        n
        for path, n in by_endpoint(paths).items()
        if path in _SHARED_PATHS or path.startswith("/api/2.0/mlflow/experiments/")
    )


def targets(results: dict[str, Any], plan: ScalePlan) -> list[list[str]]:
    """``[target, measured, met?]`` rows: what each section asked and what it found."""
    rows: list[list[str]] = []

    def missing(section: str, what: str) -> None:
        error = results.get(section, {}).get("error")
        rows.append([what, f"not measured ({error})" if error else "not run", "-"])

    long = results.get("long", {})
    if "long" in long:
        r, base, ceil = long["long"], long["base"], long["ceiling"]
        raw_s = r["expected_points"] / ceil["client_best"]
        ratio = r["points_s"] / raw_s
        landed = r["points_ok"]
        rows.append(
            [
                f"{plan.long_steps:,}-step run, traces on: every point in MLflow within "
                f"{LONG_RATIO:g}x the raw `log_batch` ceiling's time",
                f"{secs(r['points_s'])} vs {secs(raw_s)} raw: {ratio:.1f}x"
                + (
                    ""
                    if landed
                    else f" (only {r['points_landed']:,} of {r['expected_points']:,} points)"
                ),
                _ok(landed and ratio <= LONG_RATIO),
            ]
        )
        get = r["get_trace"]
        spans = sum(t["spans"] for t in r["traces"])
        got = f"{secs(get.get('seconds'))}" + (
            f", {get.get('bytes', 0) / 1e6:.1f} MB"
            if get.get("ok")
            else f" ({get.get('error') or get.get('status_code')})"
        )
        rows.append(
            [
                f"its trace opens: REST `GetTrace` under {GET_TRACE_S:g} s",
                f"{got}; {spans:,} spans stored",
                _ok(bool(get.get("ok")) and float(get["seconds"]) < GET_TRACE_S),
            ]
        )
        p99, p99_base = _p99(r), _p99(base)
        rows.append(
            [
                f"hook p99 no worse than a {plan.base_steps:,}-step run's (within 10%)",
                f"`on_step` p99 {us(p99)} vs {us(p99_base)}",
                _ok(p99 is not None and p99_base is not None and p99 <= p99_base * HOOK_NOISE),
            ]
        )
    else:
        missing("long", f"{plan.long_steps:,}-step run, traces on")

    replay = results.get("replay", {})
    if "invocations" in replay:
        expected = replay["expected"]
        points = expected["step_points"] + expected["summary_points"]
        first = replay["invocations"][0]
        startup = float(replay.get("startup_s", 0.0))
        gross = points / first["seconds"] if first["seconds"] else 0.0
        rate = points / max(first["seconds"] - startup, 1e-3)
        share = rate / replay["ceiling"]["client_best"]
        once = (
            len(replay["invocations"]) == 1 and first["returncode"] == 0 and replay["exactly_once"]
        )
        runs = expected["runs"]
        trace_requests = _trace_paths(replay["paths"])
        per_run = (replay["requests"] - trace_requests) / runs
        rows.append(
            [
                f"replay of {plan.replay_runs:,} runs x {plan.replay_steps:,} steps: "
                "one invocation",
                f"{len(replay['invocations'])} invocation(s), "
                f"first exit code {first['returncode']}",
                _ok(once),
            ]
        )
        landed = first.get("points_landed_s")
        if landed is not None:
            # Spans follow every run's points (traces never hold metrics up): the points' rate
            # is theirs until the last one was stored; the invocation's, spans included, beside.
            landed_rate = points / max(landed - startup, 1e-3)
            landed_share = landed_rate / replay["ceiling"]["client_best"]
            rows.append(
                [
                    f"replay: >= {REPLAY_SHARE:.0%} of the raw `log_batch` ceiling in points/s "
                    "(until every point is stored)",
                    f"{landed_rate:,.0f} points/s: every point stored {secs(landed)} into the "
                    f"first invocation, net of its {secs(startup)} start-up, vs "
                    f"{replay['ceiling']['client_best']:,.0f}/s: {landed_share:.0%}; the whole "
                    f"invocation, spans included: {rate:,.0f}/s ({gross:,.0f}/s gross), "
                    f"{share:.0%}",
                    _ok(landed_share >= REPLAY_SHARE),
                ]
            )
        else:
            rows.append(
                [
                    f"replay: >= {REPLAY_SHARE:.0%} of the raw `log_batch` ceiling in points/s",
                    f"{rate:,.0f} points/s in the first invocation, net of its {secs(startup)} "
                    f"start-up ({gross:,.0f}/s gross), vs "
                    f"{replay['ceiling']['client_best']:,.0f}/s: {share:.0%}",
                    _ok(share >= REPLAY_SHARE),
                ]
            )
        rows.append(
            [
                f"replay: <= {REPLAY_REQUESTS_PER_RUN:g} requests per run plus shared trace "
                "requests",
                f"{per_run:.1f} per run ({replay['requests'] - trace_requests:,} for "
                f"{runs:,} runs, a trace's own requests included) "
                f"+ {trace_requests:,} shared requests (span batches, run searches, the "
                "experiment, the server's version)",
                _ok(per_run <= REPLAY_REQUESTS_PER_RUN),
            ]
        )
        rb = replay["readback"]
        rows.append(
            [
                "replay: exactly once",
                f"{rb['runs']:,} of {runs:,} runs ({rb['finished']:,} FINISHED), "
                f"{rb['step_points'] + rb['summary_points']:,} of {points:,} points",
                _ok(replay["exactly_once"]),
            ]
        )
    else:
        missing("replay", "replay of journaled runs")

    many = results.get("many_runs", {})
    if "ours" in many:
        ours, loop, expected = many["ours"], many["loop"], many["expected"]
        rb = ours["readback"]
        landed = (
            rb["runs"] == expected["runs"]
            and rb["finished"] == expected["runs"]
            and rb["step_points"] == expected["step_points"]
        )
        ratio = ours["to_data_s"] / loop["seconds"]
        rows.append(
            [
                f"{plan.many_runs:,} runs x {plan.many_steps} steps from {plan.many_threads} "
                f"threads: all landed within {MANY_RATIO:g}x a minimal `MlflowClient` loop",
                f"{secs(ours['to_data_s'])} vs {secs(loop['seconds'])}: {ratio:.1f}x"
                + (
                    ""
                    if landed
                    else f" (read back: {rb['runs']:,} runs, {rb['finished']:,} FINISHED)"
                ),
                _ok(landed and ratio <= MANY_RATIO),
            ]
        )
    else:
        missing("many_runs", f"{plan.many_runs:,} runs from {plan.many_threads} threads")

    sinks = results.get("sinks", {})
    if "statuses" in sinks:
        statuses = sinks["statuses"]
        created = sum(statuses.values())
        running = statuses.get("RUNNING", 0)
        limit = plan.shutdown_timeout + EXIT_MARGIN_S
        rows.append(
            [
                f"{plan.sinks} sinks dropped without `close()`, "
                f"{plan.sink_latency_s * 1000:.0f} ms per request: exit within "
                f"`shutdown_timeout` + 1 s ({limit:g} s)",
                f"{secs(sinks['exit_s'])} after the last hook (exit code {sinks['returncode']})",
                _ok(sinks["exit_s"] <= limit and sinks["returncode"] == 0),
            ]
        )
        rows.append(
            [
                "... every run ended in MLflow",
                f"{created:,} of {plan.sinks:,} runs created, {created - running:,} ended, "
                f"{running:,} RUNNING; a minimal `MlflowClient` loop ends "
                + ", ".join(
                    f"{loop['ended_within']:,} within {plan.shutdown_timeout:g} s on "
                    f"{loop['threads']} threads ({loop['runs'] - loop['failed']:,} in "
                    f"{secs(loop['seconds'])}"
                    + (f", {loop['failed']:,} refused by the server" if loop["failed"] else "")
                    + ")"
                    for loop in sinks.get("loops", [])
                ),
                _ok(created == plan.sinks and running == 0),
            ]
        )
    else:
        missing("sinks", f"{plan.sinks} sinks dropped without close()")

    rich = results.get("rich", {})
    for threads in plan.rich_threads:
        r = rich.get(str(threads))
        if r is None:
            missing("rich", f"`on_step` with 10 KB events on {threads} thread(s)")
            continue
        p50 = _p99(r["hooked"], key="p50_us")
        p99 = _p99(r["hooked"])
        small = r.get("small_hooked")
        beside = (
            f"; the same burst with {SMALL_TEXT}-character texts: p50 "
            f"{us(_p99(small, key='p50_us'))}, p99 {us(_p99(small))}"
            if small
            else ""
        )
        rows.append(
            [
                f"`on_step` p99 <= {RICH_P99_US:g} us with 10 KB RLM Code-shaped events, "
                f"{threads} thread(s), journal on",
                f"p50 {us(p50)}, p99 {us(p99)}{beside}",
                _ok(p99 is not None and p99 <= RICH_P99_US),
            ]
        )
        traces = r["traces"]
        rb = r["replay"]["readback"]
        rows.append(
            [
                f"... exactly once after `kill -9` + replay ({threads} thread(s))",
                f"{rb['runs']:,} runs, {rb['step_points']:,} step points, "
                f"{traces['spans']:,} of {r['expected_spans']:,} spans, "
                f"{traces['duplicates']} repeated; {len(r['replay']['invocations'])} invocation(s)",
                _ok(r["exactly_once"]),
            ]
        )

    vis = results.get("visibility", {})
    if "results" in vis:
        within = float(vis["within_s"])
        loops = {v["runs"]: v for v in vis["results"] if v.get("sender") == "loop"}
        for v in vis["results"]:
            if v.get("sender") == "loop":
                continue
            loop = loops.get(v["runs"])
            rows.append(
                [
                    f"time to visibility at {v['runs']} concurrent run(s): p99 within "
                    f"`flush_interval` + 1 s ({within:g} s)",
                    f"p50 {secs(v['p50'])}, p99 {secs(v['p99'])} "
                    f"({v['seen']:,} of {v['steps']:,} steps seen)"
                    + (
                        f"; a minimal `MlflowClient` loop sending the same on the same interval: "
                        f"p50 {secs(loop['p50'])}, p99 {secs(loop['p99'])}"
                        if loop
                        else ""
                    ),
                    _ok(v["seen"] == v["steps"] and v["p99"] <= within),
                ]
            )
    else:
        missing("visibility", "time to visibility")
    return rows


def details(results: dict[str, Any]) -> list[str]:
    """A few lines of what each section saw besides its targets."""
    lines: list[str] = []
    long = results.get("long", {})
    if "long" in long:
        rows = []
        for key in ("base", "long"):
            r = long[key]
            h = r["hooks"]["on_step"]
            status = r.get("status_at_points", {})
            rows.append(
                [
                    f"{r['steps']:,}",
                    f"{us(h.get('p50_us'))} / {us(h.get('p99_us'))} / {us(h.get('p999_us'))}",
                    secs(r["points_s"]),
                    f"{r['points_landed']:,} of {r['expected_points']:,}",
                    ", ".join(f"{t['spans']:,} ({t['state']})" for t in r["traces"]) or "none",
                    secs(r["close_s"]),
                    f"{r['requests']:,}",
                    f"{r['rss_delta_mb']:.0f} MB",
                    _n(status.get("pending", "-")),
                ]
            )
        lines += [
            "**One run, traces on** (raw ceiling "
            f"{long['ceiling']['client_best']:,.0f} points/s through the same proxy):",
            "",
            *table(
                [
                    "steps",
                    "`on_step` p50 / p99 / p99.9",
                    "first hook to all points",
                    "points",
                    "trace spans (state)",
                    "`close()`",
                    "requests",
                    "peak RSS",
                    "pending when all points landed",
                ],
                rows,
            ),
            "",
            f"Requests of the {long['long']['steps']:,}-step run by path: "
            + ", ".join(
                f"`{p}` {n:,}" for p, n in by_endpoint(long["long"]["paths"]).most_common(6)
            )
            + ".",
            "",
        ]
    replay = results.get("replay", {})
    if "invocations" in replay:
        paths = by_endpoint(replay["paths"])
        top = ", ".join(f"`{p}` {n:,}" for p, n in paths.most_common(6))
        lines += [
            f"**Replay**: journaled in {secs(replay['journaled']['hooks_s'])} with the server "
            f"unreachable; replay invocations "
            + ", ".join(
                f"{secs(i['seconds'])} (exit {i['returncode']}, sent now "
                f"{i['report'].get('sent now', '-')})"
                for i in replay["invocations"]
            )
            + f"; requests by path: {top}.",
            "",
        ]
    many = results.get("many_runs", {})
    if "ours" in many:
        ours, loop = many["ours"], many["loop"]
        runs = many["expected"]["runs"]
        lines += [
            f"**Many runs**: ours made {ours['requests']:,} requests "
            f"({ours['requests'] / runs:.1f} per run), `on_step` p50 / p99 "
            f"{us(_p99(ours, key='p50_us'))} / {us(_p99(ours))}; "
            f"the loop {loop['requests']:,} ({loop['requests'] / runs:.1f} per run).",
            "",
        ]
    sinks = results.get("sinks", {})
    if "statuses" in sinks:
        lines += [
            f"**Many sinks**: file descriptors {_n(sinks.get('fds_at_last_hook'))} at the last "
            f"hook, {_n(sinks.get('fds_at_exit'))} just before exit; runs by status "
            f"{sinks['statuses']}; {sinks['journal_files']} journal file(s) kept for replay.",
            "",
        ]
    rich = results.get("rich", {})
    cold = rich.get("cold_cpu")
    if cold:
        lines += [
            "**What a pause costs any call on this machine**: one fixed piece of Python (50 dict "
            f"stores) takes p50 {us(cold['0'])} in a tight loop, {us(cold['0.002'])} after a 2 ms "
            f"pause and {us(cold['0.02'])} after a 20 ms pause (an agent waiting for its model): "
            "hooks called between an agent's waits pay the same factor.",
            "",
        ]
    for threads, r in rich.items():
        if not isinstance(r, dict) or "hooked" not in r:
            continue
        lines += [
            f"**Rich events, {threads} thread(s)**: {r['describe']}; replay "
            + ", ".join(
                f"{secs(i['seconds'])} (exit {i['returncode']})" for i in r["replay"]["invocations"]
            )
            + ".",
            "",
        ]
    return lines


def render(results: dict[str, Any]) -> str:
    meta = results["meta"]
    plan = PLANS[meta["plan"]]
    lines = [
        MARK_BEGIN,
        HEADING,
        "",
        f"`{meta['command']}`, {meta['when']}, plan `{plan.name}`, mlflow {meta['mlflow']}, "
        f"Python {meta['python']}; {meta.get('machine', '')}. One local `mlflow server` "
        "(sqlite) behind a pass-through FaultProxy; each figure from a fresh interpreter, the "
        "sink on its default settings; every ratio is against a baseline measured in the same "
        "run on the same server.",
        "",
        *table(["target", "measured", "met?"], targets(results, plan)),
        "",
        *details(results),
        MARK_END,
    ]
    return "\n".join(lines).rstrip("\n") + "\n"


def write_section(document: str, section: str) -> str:
    """``document`` with its marked section replaced by ``section``, or ``section`` added at
    its end."""
    pattern = re.compile(re.escape(MARK_BEGIN) + ".*?" + re.escape(MARK_END) + "\n?", re.S)
    if pattern.search(document):
        return pattern.sub(lambda _: section, document, count=1)
    return document.rstrip("\n") + "\n\n" + section


def publish(results: dict[str, Any], output: Path | None) -> None:
    text = render(results)
    print(text)
    if output is not None:
        existing = output.read_text(encoding="utf-8") if output.is_file() else ""
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(write_section(existing, text), encoding="utf-8")
        log(f"wrote the section to {output}")


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench_scale.py",
        description=(__doc__ or "").split("\n\n")[0],
        epilog="sections (for --only): " + ", ".join(SECTIONS),
    )
    parser.add_argument(
        "--quick", action="store_true", help="the quick plan (same as --plan quick)"
    )
    parser.add_argument("--plan", choices=sorted(PLANS), default=None, help="default: full")
    parser.add_argument("--only", action="append", metavar="SECTION[,SECTION]")
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="the markdown file whose marked section to write (default for the full plan of "
        "every section: docs/performance.md; otherwise print only)",
    )
    parser.add_argument(
        "--json", type=Path, default=None, help="raw results (default /tmp/bench_scale-PLAN.json)"
    )
    parser.add_argument("--report-from", type=Path, default=None, metavar="JSON")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)
    if args.quick and args.plan not in (None, "quick"):
        parser.error("--quick and --plan disagree")
    args.plan = "quick" if args.quick else (args.plan or "full")
    args.only = [n.strip() for v in args.only or [] for n in v.split(",") if n.strip()]
    unknown = [n for n in args.only if n not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.report_from is not None:
        publish(json.loads(args.report_from.read_text(encoding="utf-8")), args.output)
        return 0
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    signal.signal(signal.SIGTERM, _interrupt)
    plan = PLANS[args.plan]
    selected = [name for name in SECTIONS if not args.only or name in args.only]
    output = args.output
    if output is None and plan.name == "full" and len(selected) == len(SECTIONS):
        output = DOC
    json_path = args.json or Path(tempfile.gettempdir()) / f"bench_scale-{plan.name}.json"
    machine = Machine.now()
    results: dict[str, Any] = {
        "meta": {
            "command": "scripts/bench_scale.py" + "".join(f" {a}" for a in (argv or sys.argv[1:])),
            "when": time.strftime("%Y-%m-%d %H:%M %Z"),
            "plan": plan.name,
            "sections": selected,
            "python": sys.version.split()[0],
            "mlflow": version("mlflow"),
        }
    }
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="rlm-mlflow-scale-"))
    try:
        with contextlib.ExitStack() as stack:
            log(f"starting mlflow server (work folder {workdir})")
            server, proxy = stack.enter_context(server_and_proxy(workdir))
            context = Context(Harness(workdir, server, proxy), plan)
            for name in selected:
                section_started = time.monotonic()
                try:
                    results[name] = SECTIONS[name](context)
                except (RuntimeError, OSError, KeyError, ValueError, subprocess.SubprocessError):
                    log(f"section {name} failed:\n{traceback.format_exc()}")
                    results[name] = {"error": traceback.format_exc().strip().splitlines()[-1]}
                results[name]["section_s"] = time.monotonic() - section_started
            machine.finish()
        results["meta"]["elapsed_s"] = time.monotonic() - started
        results["meta"]["machine"] = machine.describe()
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=1), encoding="utf-8")
        log(f"wrote {json_path}")
        publish(results, output)
        return 0
    except KeyboardInterrupt:
        log("interrupted; server and children stopped")
        return 130
    finally:
        if args.keep:
            log(f"work folder kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

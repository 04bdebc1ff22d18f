"""The benchmark's sections: what each one runs, in which children, against which endpoint.

Each section takes the run's :class:`Context` and returns a JSON-able dict stored under its name
in the results; ``report.py`` renders it. ``--only NAME`` runs one section (or a few).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from .baselines import COMPARED, TRACE_COMPARED
from .harness import Harness, closed_port_uri, log
from .plan import (
    DEFAULT_QUEUE_SIZE,
    QUEUE_FULL,
    REGIMES,
    WORKER_READING_BACK,
    Plan,
    Regime,
)
from .workloads import (
    RlmWorkload,
    TraceWorkload,
    plural,
    steps_for,
    trace_workload_from_spec,
    workload_spec,
)


@dataclass
class Context:
    harness: Harness
    plan: Plan
    results: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Section:
    name: str
    summary: str
    run: Callable[[Context], dict[str, Any]]
    needs_server: bool = True


def run_construct(ctx: Context) -> dict[str, Any]:
    log("construction and imports (fresh interpreter)")
    return ctx.harness.child(
        {
            "task": "construct",
            "uri": ctx.harness.server_uri,
            "experiment": ctx.harness.experiment("construct"),
        }
    )


def run_hooks(ctx: Context) -> dict[str, Any]:
    log("hook micro-benchmark: one thread, no agent work, worker idle (unreachable server)")
    runs = ctx.plan.hook_runs
    base: list[tuple[str, dict[str, Any]]] = [
        ("default", {}),
        ("journal=False", {"journal": False}),
    ]
    variants = [{"label": label, "options": o, "think_ms": 0.0, "runs": runs} for label, o in base]
    # RLM Code's steps (2 KB of code, 8 KB of output): what a hook pays for a 10 KB event.
    variants += [
        {
            "label": f"{label}, 10 KB steps",
            "options": o,
            "think_ms": 0.0,
            "runs": max(1, runs // 4),
            "rich": True,
        }
        for label, o in base
    ]
    if ctx.plan.hook_think_variants:  # an agent that works between steps, as real ones do
        variants += [
            {
                "label": f"{label}, 2 ms agent work per step",
                "options": o,
                "think_ms": 2.0,
                "runs": max(1, runs // 10),
            }
            for label, o in base
        ]
    result = ctx.harness.child(
        {
            "task": "hooks",
            "uri": closed_port_uri(),
            "experiment": ctx.harness.experiment("hooks"),
            "variants": variants,
        }
    )
    return {"runs": runs, "variants": result["variants"]}


def run_main(ctx: Context) -> dict[str, Any]:
    workload = ctx.plan.main
    log(f"main workload: {workload.describe()}")
    main: dict[str, Any] = {}
    for kind in ("none", *COMPARED):
        log(f"  {kind}")
        main[kind] = ctx.harness.run_workload(kind, workload, label="main")
    if ctx.plan.main_nojournal:
        log("  ours, journal=False")
        main["ours_nojournal"] = ctx.harness.run_workload(
            "ours", workload, label="main-nojournal", options={"journal": False}
        )
    return {"workload": workload_spec(workload), "sinks": main}


def run_sweep(ctx: Context) -> dict[str, Any]:
    plan = ctx.plan
    rows: dict[str, dict[str, Any]] = {kind: {} for kind in COMPARED}
    main = ctx.results.get("main")
    if plan.sweep_reuses_main and main is not None:  # fewer runs: main stands for 0 ms
        rows = {kind: {"0.0": main["sinks"][kind]} for kind in COMPARED}
    for latency in plan.latencies:
        for kind in COMPARED:
            if str(latency) in rows[kind]:
                continue
            workload = plan.sweep_sync if kind == "sync" else plan.sweep
            log(f"latency {latency * 1000:.0f} ms: {kind} ({workload.total_steps} steps)")
            with ctx.harness.latency(latency):
                result = ctx.harness.run_workload(kind, workload, label=f"lat{int(latency * 1000)}")
            result["latency"] = latency
            rows[kind][str(latency)] = result
    return {
        "sync_workload": workload_spec(plan.sweep_sync),
        "workload": workload_spec(plan.sweep),
        "reused_main": plan.sweep_reuses_main and main is not None,
        "rows": rows,
    }


def regime_workload(plan: Plan) -> RlmWorkload:
    return RlmWorkload(
        runs=plan.regime_threads,
        threads=plan.regime_threads,
        steps=plan.regime_steps,
        artifacts=False,
    )


def run_regime(
    ctx: Context, regime: Regime, workload: RlmWorkload, journal: bool
) -> dict[str, Any]:
    harness, plan = ctx.harness, ctx.plan
    label = regime.name if journal else f"{regime.name}, journal=False"
    log(f"regime {label}: {workload.describe()}")
    options: dict[str, Any] = {}
    if regime.queue_size is not None:
        options["queue_size"] = regime.queue_size
    if not journal:
        options["journal"] = False
    uri = closed_port_uri() if regime.unreachable else harness.uri
    experiment = harness.experiment("regime")
    capacity = regime.queue_size or DEFAULT_QUEUE_SIZE
    ready_when = regime.ready_when
    if ready_when == WORKER_READING_BACK and not journal:
        # Nothing to read back without a journal: the small queue is simply full.
        ready_when = QUEUE_FULL
    drain = plan.regime_drain and not regime.unreachable
    with harness.latency(regime.latency_s):
        result = harness.child(
            {
                "task": "regime",
                "uri": uri,
                "experiment": experiment,
                "workload": workload_spec(workload),
                "folder": str(harness.folder(experiment)),
                "prefix": "agent",
                "options": options,
                "ready_when": ready_when,
                "backlog": regime.backlog_factor * capacity,
                "fill_timeout": 60.0,
                "sample_s": 0.005,
                "flush_timeout": 120.0 if drain else 0.0,
                # What is not sent by then stays in the journal (deferred) or is dropped.
                "close_timeout": 10.0 if drain else 0.5,
            }
        )
    result.update(
        {
            "label": label,
            "regime": regime.name,
            "journal": journal,
            "latency_s": regime.latency_s,
            "unreachable": regime.unreachable,
            "drained": drain,
        }
    )
    if not regime.unreachable:
        result["readback"] = harness.read_back(experiment)
    return result


def run_regimes(ctx: Context) -> dict[str, Any]:
    workload = regime_workload(ctx.plan)
    rows = []
    for regime in REGIMES:
        if regime.name not in ctx.plan.regimes:
            continue
        for journal in (True, False) if ctx.plan.regime_reference else (True,):
            rows.append(run_regime(ctx, regime, workload, journal))
    return {"workload": workload_spec(workload), "rows": rows}


def run_ceiling(ctx: Context, when: str) -> dict[str, Any]:
    log(f"raw ceiling ({when} the drain): MlflowClient.log_batch loops of 1000 metrics")
    result = ctx.harness.child(
        {
            "task": "ceiling",
            "uri": ctx.harness.server_uri,
            "experiment": ctx.harness.experiment("ceiling"),
            "batches": ctx.plan.ceiling_batches,
            "reps": ctx.plan.ceiling_reps,
            "parallel": ctx.plan.ceiling_parallel,
        }
    )
    result["when"] = when
    return result


def run_drain(ctx: Context) -> dict[str, Any]:
    harness, plan = ctx.harness, ctx.plan
    workload = RlmWorkload(
        runs=plan.drain_runs,
        threads=1,
        steps=plan.drain_steps,
        interleave=True,
        artifacts=False,
    )
    # The server's speed drifts with the machine's load: measure the ceiling right before and
    # right after the drains, and hold the drain to the better of the two.
    ceilings = [run_ceiling(ctx, "before")] if plan.ceiling_before else []
    rows = []
    big = workload.total_steps + 1_000
    variants = (
        ("spilling", None, "off"),
        ("not spilling", big, "off"),
        ("spilling, traces on", None, "full"),
    )
    for variant, queue_size, traces in variants:
        log(f"drain, {variant}: {workload.describe()}, straight to the server")
        experiment = harness.experiment("drain")
        # The raw ceiling is metric points: the target rows send runs only; the last row is the
        # default settings (every step also a span), reported beside them.
        options: dict[str, Any] = {"traces": traces}
        if queue_size is not None:
            options["queue_size"] = queue_size
        result = harness.child(
            {
                "task": "drain",
                "uri": harness.server_uri,
                "experiment": experiment,
                "workload": workload_spec(workload),
                "folder": str(harness.folder(experiment)),
                "prefix": "drain",
                "options": options,
                "timeout": 1200.0,
            },
            timeout=1500.0,
        )
        result.update({"variant": variant, "queue_size": queue_size, "traces": traces})
        result["readback"] = harness.read_back(experiment)
        rows.append(result)
    ceilings.append(run_ceiling(ctx, "after"))
    best = max(ceilings, key=lambda c: c["client_best"])
    return {
        "workload": workload_spec(workload),
        "rows": rows,
        "ceiling": best,
        "ceilings": [{"when": c["when"], "best": c["client_best"]} for c in ceilings],
    }


def run_steady(ctx: Context) -> dict[str, Any]:
    plan = ctx.plan
    rows = []
    for runs, rate in plan.steady:
        log(f"steady state: {runs} runs x {rate:g} steps/s")
        duration = plan.steady_warmup_s + plan.steady_window_s + 0.5
        workload = RlmWorkload(
            runs=runs,
            threads=runs,
            steps=steps_for(duration, rate),
            steps_per_s=rate,
            artifacts=False,
        )
        result = ctx.harness.child(
            {
                "task": "steady",
                "uri": ctx.harness.server_uri,
                "experiment": ctx.harness.experiment("steady"),
                "workload": workload_spec(workload),
                "warmup": plan.steady_warmup_s,
                "window": plan.steady_window_s,
            }
        )
        result.update({"runs": runs, "rate_per_run": rate})
        rows.append(result)
    return {"rows": rows}


def run_memory(ctx: Context) -> dict[str, Any]:
    log(f"memory: {ctx.plan.memory_steps} steps with the server unreachable (tracemalloc)")
    return ctx.harness.child(
        {
            "task": "memory",
            "uri": closed_port_uri(),
            "experiment": ctx.harness.experiment("memory"),
            "steps": ctx.plan.memory_steps,
        }
    )


def run_close(ctx: Context) -> dict[str, Any]:
    """Runs only (the target: the server's metric ceiling bounds it), then the default settings,
    where every pending step is a span too, reported beside it."""
    pending = ctx.plan.close_pending
    results = {}
    for traces in ("off", "full"):
        log(f"close() with {pending} step events pending, server up, traces={traces}")
        experiment = ctx.harness.experiment("close")
        result = ctx.harness.child(
            {
                "task": "close",
                "uri": ctx.harness.server_uri,
                "experiment": experiment,
                "pending": pending,
                "runs": 10,
                "folder": str(ctx.harness.folder(experiment)),
                "options": {"traces": traces},
            }
        )
        result["readback"] = ctx.harness.read_back(experiment)
        results[traces] = result
    return {**results["off"], "traces_on": results["full"]}


def run_concurrency(ctx: Context) -> dict[str, Any]:
    plan = ctx.plan
    rows: dict[str, Any] = {}
    for runs in plan.concurrency:
        workload = RlmWorkload(
            runs=runs,
            threads=runs,
            steps=plan.concurrency_steps,
            child_steps=plan.concurrency_steps // 5,
            think_ms=1.0,
        )
        log(f"concurrency: {runs} concurrent runs")
        rows[str(runs)] = ctx.harness.run_workload("ours", workload, label=f"conc{runs}")
        if plan.concurrency_nojournal:
            log(f"concurrency: {runs} concurrent runs, journal=False")
            rows[f"{runs}, journal=False"] = ctx.harness.run_workload(
                "ours", workload, label=f"conc{runs}-nojournal", options={"journal": False}
            )
    return {"rows": rows, "steps": plan.concurrency_steps}


def trace_variants(plan: Plan) -> list[tuple[str, TraceWorkload]]:
    """The trace workload on each number of agent threads, with agent work and without."""
    thinks = (plan.trace_think_ms, 0.0) if plan.trace_think_ms else (0.0,)
    out = []
    for threads, runs in plan.trace_sizes:
        for think in thinks:
            workload = replace(plan.trace, runs=runs, threads=threads, think_ms=think)
            work = f"{think:g} ms agent work" if think else "no agent work"
            out.append((f"{plural(threads, 'thread')}, {work}", workload))
    return out


def run_traces(ctx: Context) -> dict[str, Any]:
    harness, plan = ctx.harness, ctx.plan
    variants = trace_variants(plan)
    latency: dict[str, Any] = {}
    for kind in TRACE_COMPARED:
        log(f"traces, {kind}: {len(variants)} variants, one fresh sink each")
        specs = [
            {
                "label": label,
                "workload": workload_spec(workload),
                "experiment": harness.experiment(f"traces-{kind}"),
                "prefix": f"{kind}{index}",
            }
            for index, (label, workload) in enumerate(variants)
        ]
        before = harness.proxy_paths
        result = harness.child(
            {
                "task": "traces",
                "sink": kind,
                "uri": harness.uri,
                "db": str(harness.db_path),
                "variants": specs,
                "flush_timeout": 600.0,
                "readable_timeout": 60.0,
            },
            timeout=1800.0,
        )
        harness.settle()
        proxy = harness.proxy_paths
        proxy.subtract(before)
        result["proxy_paths"] = {path: n for path, n in proxy.items() if n}
        for row in result["variants"]:
            spans_per_trace = trace_workload_from_spec(row["workload"]).spans_per_trace
            row["readback"] = harness.read_traces(row["experiment"], spans_per_trace)
            if kind == "ours":
                row["runs_readback"] = harness.read_back(row["experiment"])
        latency[kind] = result
    exits = []
    workload = plan.trace_exit
    for ending in plan.trace_endings:
        for kind in TRACE_COMPARED:
            log(f"traces, {kind}: the process ends right after its last hook ({ending})")
            experiment = harness.experiment(f"exit-{kind}")
            result = harness.ending_child(
                {
                    "task": "trace_exit",
                    "sink": kind,
                    "ending": ending,
                    "uri": harness.uri,
                    "experiment": experiment,
                    "workload": workload_spec(workload),
                    "prefix": f"{kind}-{ending}",
                }
            )
            harness.settle()
            result.update({"sink": kind, "ending": ending, "experiment": experiment})
            result["readback"] = harness.read_traces(experiment, workload.spans_per_trace)
            if kind == "ours":  # its runs too; then whatever its journal still holds
                result["runs_readback"] = harness.read_back(experiment)
                log("    rlm-mlflow replay of its journal")
                result["replay"] = harness.replay(result["journal_dir"])
                result["after_replay"] = harness.read_traces(experiment, workload.spans_per_trace)
                result["runs_after_replay"] = harness.read_back(experiment)
            exits.append(result)
    return {
        "variants": [label for label, _ in variants],
        "think_ms": plan.trace_think_ms,
        "latency": latency,
        "exit_workload": workload_spec(workload),
        "exits": exits,
    }


SECTIONS = (
    Section("construct", "construction cost, and whether the caller imports mlflow", run_construct),
    Section("hooks", "each hook's cost in isolation, one thread", run_hooks, needs_server=False),
    Section("main", "the three sinks side by side on the main workload", run_main),
    Section("sweep", "agent time per step against added server latency", run_sweep),
    Section("regimes", "hook latency under pressure, by regime", run_regimes),
    Section("drain", "drain rate against the raw log_batch ceiling, spilling or not", run_drain),
    Section("steady", "HTTP requests per 1,000 steps at steady state", run_steady),
    Section("memory", "memory bound with the server unreachable", run_memory, needs_server=False),
    Section("close", "close() time with events pending", run_close),
    Section("concurrency", "our sink with 1 to 100 concurrent runs", run_concurrency),
    Section("traces", "rich step events as traces, against MLflow's own tracing", run_traces),
)
SECTION_NAMES = tuple(section.name for section in SECTIONS)


def scaled(
    plan: Plan,
    regimes: list[str] | None = None,
    regime_steps: int | None = None,
    drain_steps: int | None = None,
) -> Plan:
    """``plan`` with the command line's overrides."""
    changes: dict[str, Any] = {}
    if regimes:
        changes["regimes"] = tuple(regimes)
    if regime_steps:
        changes["regime_steps"] = regime_steps
    if drain_steps:
        changes["drain_steps"] = drain_steps
    return replace(plan, **changes) if changes else plan

"""The report: a markdown section for each section that ran, the targets, the latency plot.

Every renderer takes the results dict (as ``sections.py`` stored it, or as ``--json`` saved it)
and returns lines; a section that did not run renders nothing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .baselines import COMPARED, LABELS, SHORT, TRACE_COMPARED
from .fmt import (
    count,
    delivered,
    dropped_text,
    dropped_total,
    p50_p99,
    percent,
    ratio,
    secs,
    stat,
    table,
    tails,
    us,
)
from .harness import log
from .plan import REGIMES
from .targets import (
    TARGET_DRAIN_FRACTION,
    TARGET_HOOK_P99_US,
    Results,
    drain_spilled,
    regime_entered,
    targets_section,
)
from .workloads import HOOKS, PARAMS_PER_RUN, plural, trace_workload_from_spec, workload_from_spec

# ---------------------------------------------------------------------------------------------
# The three sinks
# ---------------------------------------------------------------------------------------------


def main_section(results: Results) -> list[str]:
    main = results.get("main")
    if main is None:
        return []
    sinks = main["sinks"]
    rows = []
    for kind in ("none", *COMPARED, "ours_nojournal"):
        r = sinks.get(kind)
        if r is None:
            continue
        rss = f"{r['rss_delta_mb']:.1f} MB"
        if kind == "none":
            rows.append([LABELS[kind], "-", "-", "-", secs(r["wall_s"]), "-", "0", "-", rss, "-"])
            continue
        rows.append(
            [
                LABELS[kind],
                *(p50_p99(r, h) for h in HOOKS),
                secs(r["wall_s"]),
                secs(r["to_data_s"]),
                str(r["requests"]),
                f"{r['points_per_s']:,.0f}",
                rss,
                delivered(r),
            ]
        )
    ours = sinks["ours"]
    ratios = []
    for kind in ("sync", "async"):
        r = sinks[kind]
        ratios.append(
            [
                LABELS[kind],
                ratio(stat(r, "on_step", "p50_us"), stat(ours, "on_step", "p50_us")),
                ratio(stat(r, "on_step", "p99_us"), stat(ours, "on_step", "p99_us")),
                ratio(r["wall_s"], ours["wall_s"]),
                ratio(r["to_data_s"], ours["to_data_s"]),
                ratio(r["requests"], ours["requests"]),
                ratio(r["points_per_s"], ours["points_per_s"]),
                ratio(max(r["rss_delta_mb"], 0.1), max(ours["rss_delta_mb"], 0.1)),
            ]
        )
    lost = {k: sinks[k].get("lost", {}) for k in ("sync", "async")}
    out = [
        "## The three sinks on the same workload",
        "",
        f"Workload: {workload_from_spec(main['workload']).describe()}. Params: RLM Code's 15 "
        f"keys plus environment and task_chars ({PARAMS_PER_RUN} params per run); two metrics "
        "per step; three summary metrics and the trajectory file as an artifact per run.",
        "",
        *table(
            [
                "sink",
                "on_run_start p50 / p99",
                "on_step p50 / p99",
                "on_run_end p50 / p99",
                "agent wall time",
                "time until data is in MLflow",
                "HTTP requests",
                "points/s",
                "peak RSS growth",
                "delivered to MLflow",
            ],
            rows,
        ),
        "",
        "Each sink's figure divided by ours, measured in the same run (for points/s, below 1x "
        "means ours moved more points per second):",
        "",
        *table(
            [
                "sink",
                "on_step p50",
                "on_step p99",
                "agent wall time",
                "time until data is in MLflow",
                "HTTP requests",
                "points/s",
                "peak RSS growth",
            ],
            ratios,
        ),
        "",
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
    for kind in COMPARED:
        r = sinks[kind]
        if r.get("logged_failures"):
            rb, wl = r["readback"], workload_from_spec(r["workload"])
            tracked = 2 * wl.runs * wl.steps + 3 * wl.runs  # what the seed even tries to send
            points = rb["step_points"] + rb["summary_points"]
            out += [
                f"In this run {LABELS[kind]} also logged {r['logged_failures']} failed writes "
                f"(first: `{r['failure_sample']}`): {max(0, tracked - points)} of the "
                f"{tracked} points of the parent runs it tracks never reached MLflow, and "
                "nothing but a log line says so.",
                "",
            ]
    return out


# ---------------------------------------------------------------------------------------------
# Regimes
# ---------------------------------------------------------------------------------------------


def regimes_section(results: Results) -> list[str]:
    section = results.get("regimes")
    if section is None or not section["rows"]:
        return []
    workload = workload_from_spec(section["workload"])
    rows = section["rows"]
    first = rows[0]
    latency_rows = []
    proof_rows = []
    flags = []
    for row in rows:
        hooks = row["hooks"]
        latency_rows.append(
            [row["label"], *(tails(hooks[h]) for h in HOOKS), secs(row["produce_s"])]
        )
        status, before, win, fill = row["status"], row["status_before"], row["window"], row["fill"]
        entered, evidence = regime_entered(row)
        if not entered:
            flags.append(row["label"])
        if row["flushed"]:
            # Two metric points per step kept: the producer's and the timed agents' steps.
            steps = fill["steps"] + workload.total_steps - dropped_total(status)
            readback = row.get("readback")
            points = (
                f", {readback['step_points']:,} of {2 * steps:,} step points in MLflow"
                if readback
                else ""
            )
            after = f"all sent after {secs(row['to_data_s'])}{points}"
        elif row["drained"]:
            after = f"NOT all sent within {secs(row['to_data_s'])}"
        else:
            after = f"closed at once ({secs(row['close_s'])})"
        proof_rows.append(
            [
                row["label"],
                count(status, "queue_capacity"),
                f"{fill['steps']:,} steps in {secs(fill['filled_s'])}, waited "
                f"{secs(fill['waited_s'])} for '{fill['ready_when']}'; depth "
                f"{count(before, 'queue_depth')}, {count(before, 'sent')} sent, "
                f"{count(before, 'pending')} pending",
                f"{row['queue_peak_sampled']:,}",
                f"{win['spilled']:,}",
                f"{win['dropped']:,}",
                f"{win['sent']:,}",
                after,
                f"{count(status, 'spilled')} / {dropped_text(status)} / "
                f"{count(status, 'deferred')}",
                evidence,
            ]
        )
    n = {h: first["hooks"][h]["n"] for h in HOOKS}
    out = [
        "## Hook latency under pressure, by regime",
        "",
        f"Timed: {workload.describe()}; every hook call is timed (n per row: "
        f"{n['on_step']:,} on_step, {n['on_run_start']} on_run_start, {n['on_run_end']} "
        "on_run_end). Before them, untimed: one run start and end (the first hook call starts "
        "the worker thread), then a producer steps "
        f"{first['fill']['runs']} other runs as fast as it can until the queue is full (depth at "
        "capacity, or events spilled or dropped), and waits until the worker is in the "
        "regime's state ('worker sending': it has made requests since the fill and events are "
        "pending, so it drains while the timed hooks come; 'worker reading back': besides, "
        "events were spilled and the memory queue was taken, so what it sends next comes back "
        "from the journal). "
        "The sink has its default settings unless the regime says otherwise. The regimes: "
        + "; ".join(regime_description(r.name) for r in REGIMES)
        + ". Each is run again with `journal=False` as a reference line (there a full queue "
        "drops step events instead of spilling them).",
        "",
        "Agent time inside each hook call, p50 / p99 / p99.9 / max:",
        "",
        *table(
            ["regime", "on_run_start", "on_step", "on_run_end", "timed hooks done in"], latency_rows
        ),
        "",
        "What the queue went through, from `status()`: before the timed hooks, while they ran "
        "(the difference between two snapshots; the depth peak from a 5 ms sampler), and at the "
        "end (totals after `close()`):",
        "",
        *table(
            [
                "regime",
                "queue_size",
                "untimed fill; then at the start",
                "depth peak",
                "spilled",
                "dropped",
                "sent",
                "afterwards",
                "total spilled / dropped / deferred",
                "regime entered?",
            ],
            proof_rows,
        ),
        "",
    ]
    if flags:
        out += [
            "**Not entered:** "
            + ", ".join(f"`{f}`" for f in flags)
            + ": these rows do not show hooks in their regime (see 'regime entered?').",
            "",
        ]
    switch = first.get("switch_interval_s", 0.005) * 1000
    out += [
        f"- With {workload.threads} agent threads busy on {results['meta']['cores']} cores, a "
        "hook call can be descheduled, or lose the GIL to another thread (switch interval "
        f"{switch:g} ms), in the middle; such calls are in the figures, as the agent sees them. "
        "The sampler's `status()` calls run beside the hooks too.",
        *(
            []
            if first["drained"]
            else [
                "- This plan does not wait for the regimes' data to be sent: each sink is "
                "closed with a 0.5 s deadline right after the timed hooks, so the journal keeps "
                "what was not sent (deferred) and `journal=False` drops it (shutdown). "
                "Delivery is measured in the drain section and in the full plan."
            ]
        ),
        *regime_notes(rows),
        "",
    ]
    return out


def regime_description(name: str) -> str:
    return {
        "server up": "`server up`: a healthy server behind the FaultProxy in pass mode",
        "200 ms latency": "`200 ms latency`: the FaultProxy adds 200 ms to every request",
        "unreachable": "`unreachable`: a closed port (connects refused); the timed hooks "
        "begin as soon as the queue is full",
        "queue spilling": "`queue spilling`: server up, `queue_size=1000`; the producer "
        "queues a backlog of 10 x queue_size steps and the timed hooks begin once the worker "
        "is reading back, so it sends what came back from the journal while the hooks keep "
        "coming",
    }.get(name, f"`{name}`")


def regime_notes(rows: list[Mapping[str, Any]]) -> list[str]:
    notes = []
    by_label = {row["label"]: row for row in rows}
    for row in rows:
        if not row["journal"]:
            continue
        off = by_label.get(f"{row['regime']}, journal=False")
        if off is None:
            continue
        notes.append(
            f"- `{row['regime']}`: on_step p99 {us(stat(row, 'on_step', 'p99_us'))} with the "
            f"journal, {us(stat(off, 'on_step', 'p99_us'))} without; p99.9 "
            f"{us(stat(row, 'on_step', 'p999_us'))} against "
            f"{us(stat(off, 'on_step', 'p999_us'))}."
        )
    return notes


# ---------------------------------------------------------------------------------------------
# Drain
# ---------------------------------------------------------------------------------------------


def drain_section(results: Results) -> list[str]:
    drain = results.get("drain")
    if drain is None:
        return []
    workload = workload_from_spec(drain["workload"])
    ceiling = drain["ceiling"]
    best = ceiling["client_best"]
    rows = []
    for row in drain["rows"]:
        status = row["status"]
        rb = row["readback"]
        spilled = drain_spilled(row)
        should = row["variant"].startswith("spilling")
        proof = "" if bool(spilled) == should else (" (regime NOT entered)" if should else "!")
        rows.append(
            [
                row["variant"],
                "on" if row.get("traces", "off") != "off" else "off",
                count(status, "queue_capacity"),
                f"{spilled:,}{proof}",
                secs(row["produce_s"]),
                secs(row["total_s"]) + ("" if row["flushed"] else " (flush timed out)"),
                f"{row['rate']:,.0f}",
                percent(row["rate"] / best, TARGET_DRAIN_FRACTION),
                count(status, "requests"),
                f"{dropped_text(status)} / {count(status, 'deferred')}",
                f"{rb['step_points'] + rb['summary_points']:,}/{row['points']:,}",
            ]
        )
    out = [
        "## Drain in the spilling regime",
        "",
        f"{workload.describe()}, produced as fast as one thread can, straight to the server; "
        "then `flush()` until everything is in MLflow. Once with the default `queue_size` "
        "(the queue spills to the journal and the worker reads back from it), once with a "
        'queue big enough for every event: these two send runs only (`traces="off"`), '
        "as the raw ceiling does. A third time with the default settings, where every step "
        "is also a span sent to `/v1/traces`: the server then stores a span per step besides "
        "its metric points, so that row is reported beside the target, not held to it. The "
        "rate is all metric points over the time from the first hook call until `flush()` "
        "returned; the raw ceiling is the best `MlflowClient.log_batch` loop of 1000 metrics "
        f"in the same run ({best:,.0f} points/s).",
        "",
        *table(
            [
                "variant",
                "traces",
                "queue_size",
                "spilled",
                "hooks done in",
                "all in MLflow after",
                "points/s",
                "of raw ceiling",
                "HTTP requests",
                "dropped / deferred",
                "points read back",
            ],
            rows,
        ),
        "",
        *drain_notes(drain),
        "",
    ]
    return out


def drain_notes(drain: Mapping[str, Any]) -> list[str]:
    ceiling = drain["ceiling"]
    rates = ceiling["client_rates"]
    median = sorted(rates)[len(rates) // 2]
    notes = [
        f"- Raw ceiling: the best of {ceiling['reps']} loops of {ceiling['batches']} "
        "`MlflowClient.log_batch` calls of 1000 metrics (after one warm-up call), measured "
        + " and ".join(
            f"{c['when']} the drains ({c['best']:,.0f} points/s)" for c in drain["ceilings"]
        )
        + f"; the better is used. All loops of that one: {', '.join(f'{r:,.0f}' for r in rates)}"
        + (
            f"; two such loops in parallel {ceiling['parallel_best']:,.0f} points/s together"
            if "parallel_best" in ceiling
            else ""
        )
        + ". The server (sqlite, one worker) is the bottleneck: every drain figure is bounded "
        "by it."
    ]
    for row in drain["rows"]:
        if not row["http_n"]:
            continue
        notes.append(
            f"- {row['variant']}: time inside HTTP requests, summed over requests, was "
            f"{row['http_s'] / row['total_s']:.0%} of the wall time (over 100% means requests "
            f"overlapped), {row['http_s'] / row['http_n'] * 1000:.0f} ms per request on average "
            f"({row['points'] / row['http_n']:.0f} points per request), against "
            f"{1000 / ceiling['client_best'] * 1000:.0f} ms per 1000-point request in the best "
            f"ceiling loop; {row['rate'] / median:.0%} of the ceiling loops' median."
        )
    return notes


# ---------------------------------------------------------------------------------------------
# Hooks in isolation, latency sweep, concurrency, other figures
# ---------------------------------------------------------------------------------------------


def hooks_section(results: Results) -> list[str]:
    hooks = results.get("hooks")
    if hooks is None:
        return []
    rows = []
    for variant, stats in hooks["variants"].items():
        start, step, end = (stats[h] for h in HOOKS)
        rows.append(
            [
                variant,
                f"{us(start['p50_us'])} / {us(start['p99_us'])} / {us(start['max_us'])}",
                f"{us(step['p50_us'])} / {us(step['p99_us'])} / {us(step['p999_us'])}",
                f"{us(end['p50_us'])} / {us(end['p99_us'])} / {us(end['max_us'])}",
            ]
        )
    fewer = []
    if any("10 KB" in variant for variant in hooks["variants"]):
        fewer.append("a quarter of that for 10 KB steps (RLM Code's: 2 KB of code, 8 KB of output)")
    if any("agent work" in variant for variant in hooks["variants"]):
        fewer.append("a tenth of that for the variants with agent work")
    slow = f" ({'; '.join(fewer)})" if fewer else ""
    return [
        "## Hook cost in isolation",
        "",
        f"One thread, {hooks['runs']:,} runs of on_run_start, 10 on_step, on_run_end{slow}; no "
        "agent work unless stated; the worker idle in its retry backoff (server unreachable), "
        "so this is the hooks' own cost.",
        "",
        *table(
            [
                "variant",
                "on_run_start p50 / p99 / max",
                "on_step p50 / p99 / p99.9",
                "on_run_end p50 / p99 / max",
            ],
            rows,
        ),
        "",
    ]


def sweep_latencies(sweep: Mapping[str, Any]) -> list[float]:
    return sorted({float(k) for kind in COMPARED for k in sweep["rows"][kind]})


def sweep_section(results: Results, plot_path: Path | None) -> list[str]:
    sweep = results.get("sweep")
    if sweep is None:
        return []
    rows = []
    for latency in sweep_latencies(sweep):
        cells, walls = [], []
        for kind in COMPARED:
            r = sweep["rows"][kind].get(str(latency))
            if r is None:
                cells.append("not run")
                walls.append("-")
                continue
            cells.append(f"{p50_p99(r, 'on_step')} (n={r['hooks']['on_step']['n']})")
            walls.append(f"{secs(r['wall_s'])} / {secs(r['to_data_s'])}")
        rows.append([f"{latency * 1000:.0f} ms", *cells, *walls])
    sync = workload_from_spec(sweep["sync_workload"]).describe()
    others = workload_from_spec(sweep["workload"]).describe()
    out = ["## Latency sweep: agent time per step", ""]
    if plot_path is not None:
        out += [f"![on_step time vs latency]({plot_path.name})", ""]
    return [
        *out,
        f"sync runs {sync}; async and ours run {others}. The sync baseline pays two round trips "
        "per step, hence its smaller workload"
        + (" (the 0 ms row is the main workload for all three)" if sweep["reused_main"] else "")
        + ". n is the number of on_step calls measured.",
        "",
        *table(
            [
                "latency added per request",
                *(f"{SHORT[k]}: on_step p50 / p99" for k in COMPARED),
                *(f"{SHORT[k]}: wall / data in" for k in COMPARED),
            ],
            rows,
        ),
        "",
    ]


def concurrency_section(results: Results) -> list[str]:
    concurrency = results.get("concurrency")
    if concurrency is None:
        return []
    rows = []
    for runs, r in concurrency["rows"].items():
        wl = workload_from_spec(r["workload"])
        rows.append(
            [
                runs,
                str(wl.total_runs),
                str(wl.total_steps),
                p50_p99(r, "on_step"),
                us(r["all_hooks"]["p99_us"]),
                secs(r["wall_s"]),
                secs(r["to_data_s"]),
                str(r["requests"]),
                f"{r['requests'] / wl.total_runs:.1f}",
                f"{r['points_per_s']:,.0f}",
                delivered(r),
            ]
        )
    nojournal = any("journal=False" in k for k in concurrency["rows"])
    return [
        "## Concurrency sweep (our sink)",
        "",
        f"Each run on its own thread with a nested child run, {concurrency['steps']} steps per "
        "run and 1 ms agent work per step, through the proxy at 0 ms"
        + ("; each level also with `journal=False`." if nojournal else "."),
        "",
        *table(
            [
                "concurrent runs",
                "runs (with children)",
                "steps",
                "on_step p50 / p99",
                "all hooks p99",
                "agent wall time",
                "time until data is in MLflow",
                "HTTP requests",
                "requests per run",
                "points/s",
                "delivered to MLflow",
            ],
            rows,
        ),
        "",
    ]


def other_figures(results: Results) -> list[str]:
    lines = []
    c = results.get("construct")
    if c is not None:
        lines.append(
            f"- `import rlm_mlflow`: {c['import_s'] * 1000:.0f} ms; first `MLflowSink(...)`: "
            f"{c['construct_s'] * 1000:.2f} ms; first hook call (starts the worker thread): "
            f"{c['first_hook_s'] * 1000:.2f} ms."
        )
    main = results.get("main")
    if main is not None:
        sinks = main["sinks"]
        lines.append(
            "- Construction of the seed sinks (imports mlflow, `set_experiment` over HTTP): "
            f"sync {secs(sinks['sync']['construct_s'])}, async "
            f"{secs(sinks['async']['construct_s'])}; ours in the same position "
            f"{secs(sinks['ours']['construct_s'])}."
        )
        for name in ("sync", "async", "ours", "ours_nojournal"):
            r = sinks.get(name)
            if r is None:
                continue
            lines.append(
                f"- {LABELS[name]}: HTTP requests counted by the {r['requests_counted_by']}: "
                f"{r['requests']}, in-process count {r['http_inproc']}; on_step p99.9 "
                f"{us(stat(r, 'on_step', 'p999_us'))}, max {us(stat(r, 'on_step', 'max_us'))}."
            )
    m = results.get("memory")
    if m is not None:
        lines.append(
            "- Memory with the server unreachable (tracemalloc, above the state after the first "
            "hook): "
            + ", ".join(
                f"{x['steps']:,} steps: {x['current_mb']:.1f} MB now / {x['peak_mb']:.1f} MB peak"
                for x in m["marks"]
            )
            + f" ({m['elapsed_s']:.1f} s under tracemalloc)."
        )
    if not lines:
        return []
    return ["## Other figures", "", *lines, ""]


# ---------------------------------------------------------------------------------------------
# Traces
# ---------------------------------------------------------------------------------------------


def _hook_cell(stats: Mapping[str, Any]) -> str:
    if not stats.get("n"):
        return "-"
    return (
        f"{us(stats['p50_us'])} / {us(stats['p99_us'])} / {us(stats['p999_us'])} (n={stats['n']:,})"
    )


def _readback_text(rb: Mapping[str, Any], traces: int, spans: int) -> str:
    text = f"{rb['traces']}/{traces} traces, {rb['spans']:,}/{spans:,} spans"
    extra = []
    if rb["duplicates"]:
        extra.append(f"{rb['duplicates']} duplicated")
    if rb["incomplete_traces"]:
        extra.append(f"{rb['incomplete_traces']} incomplete")
    states = rb.get("states") or {}
    if any(state != "OK" for state in states):
        extra.append(", ".join(f"{n} {state}" for state, n in sorted(states.items())))
    if extra:
        return f"{text} ({'; '.join(extra)})"
    return text + (", each once" if rb["spans"] else "")


def _runs_text(rb: Mapping[str, Any] | None, runs: int) -> str:
    if rb is None:
        return "-"
    return f"{rb['finished']}/{runs} runs FINISHED"


def trace_requests(row: Mapping[str, Any]) -> tuple[int, int]:
    """``(POST /v1/traces, every request)`` in a variant's window."""
    requests = row["requests"]
    return int(requests.get("POST /v1/traces", 0)), int(sum(requests.values()))


def _path_breakdown(row: Mapping[str, Any]) -> str:
    requests, seconds = row["requests"], row.get("request_seconds", {})
    return ", ".join(
        f"`{path}` {n:,}" + (f" ({seconds[path]:.2f} s)" if path in seconds else "")
        for path, n in sorted(requests.items(), key=lambda item: -item[1])
    )


def _path_group(path: str) -> str:
    """A request path with its ids left out, so that paths of one kind count together."""
    if "/artifacts/" in path:
        return path.split("/artifacts/", 1)[0] + "/artifacts/... (" + path.rsplit("/", 1)[-1] + ")"
    return path


def traces_section(results: Results) -> list[str]:
    section = results.get("traces")
    if section is None:
        return []
    latency = section["latency"]
    kinds = [kind for kind in TRACE_COMPARED if kind in latency]
    first = trace_workload_from_spec(latency[kinds[0]]["variants"][0]["workload"])
    hook_rows, drain_rows = [], []
    for index, label in enumerate(section["variants"]):
        for kind in kinds:
            row = latency[kind]["variants"][index]
            workload = trace_workload_from_spec(row["workload"])
            hooks = row["hooks"]
            hook_rows.append(
                [
                    label,
                    SHORT[kind],
                    *(_hook_cell(hooks[h]) for h in HOOKS),
                    us(row["per_span_us"]),
                    secs(row["hooks_s"]),
                ]
            )
            otlp, every = trace_requests(row)
            rate = workload.spans / row["readable_s"] if row["readable"] else None
            drain_rows.append(
                [
                    label,
                    SHORT[kind],
                    f"{workload.spans:,} in {workload.runs} traces",
                    secs(row["flush_s"]) + ("" if row["flushed"] else " (flush failed)"),
                    secs(row["readable_s"]) if row["readable"] else "NOT all readable",
                    f"{rate:,.0f}" if rate is not None else "-",
                    f"{otlp:,} ({otlp / workload.runs:.2f})",
                    f"{every:,} ({every / workload.runs:.1f})",
                    _readback_text(row["readback"], workload.runs, workload.spans),
                ]
            )
    exit_workload = trace_workload_from_spec(section["exit_workload"])
    exit_rows = []
    for row in section["exits"]:
        rb = row["readback"]
        kind = row["sink"]
        status = row.get("status") or {}
        pending = (
            f"{status['pending']:,} of {status['accepted']:,} events"
            if "pending" in status
            else "-"
        )
        replayed = "-"
        if "after_replay" in row:
            report = row["replay"]["report"]
            sent = report.get("sent now", "").split(" ")[0] or "?"
            replayed = (
                f"{_readback_text(row['after_replay'], exit_workload.runs, exit_workload.spans)}"
                f"; {_runs_text(row.get('runs_after_replay'), exit_workload.total_runs)}"
                f" (the replay sent {sent} events)"
            )
        lost_spans = exit_workload.spans - min(rb["spans"], exit_workload.spans)
        exit_rows.append(
            [
                SHORT[kind],
                "normal exit, no flush" if row["ending"] == "exit" else "SIGTERM",
                pending,
                secs(row["exit_s"]),
                str(row["returncode"]),
                _readback_text(rb, exit_workload.runs, exit_workload.spans),
                f"{lost_spans:,} ({lost_spans / exit_workload.spans:.0%})",
                _runs_text(row.get("runs_readback"), exit_workload.total_runs),
                replayed,
            ]
        )
    out = [
        "## Traces: RLM Code's step events as MLflow traces",
        "",
        "RLM Code's step events as it really sends them: every step but the delegating ones "
        f"carries {first.code_chars:,} characters of code (`action.code`) and a rationale, "
        f"{first.stdout_chars:,} characters of `observation.stdout`, `stderr`, `success`, "
        "`execution_time`, `usage` (`prompt_tokens`, `completion_tokens`, `total_calls`) and "
        f"`depth`. A root run has {first.steps} steps, {first.delegating} of them delegating "
        f"to {plural(first.children, 'child run')} of {plural(first.child_steps, 'step')} "
        "that start and end on the parent's thread before the delegating step is reported (its "
        "usage counting theirs), as RLM Code does. One trace per root run: its span, a span "
        "per step, and under each delegating step a model span (the step's own tokens) and "
        f"each child run's span with its steps' spans: {first.spans_per_trace} spans per "
        "trace. Two sinks make that same tree, span for span: ours (`traces='full'`, the "
        "default) and MLflow's own tracing (`MlflowClient.start_trace` at a root run's start, "
        "`start_span`/`end_span` per step and child run, `end_trace` at its end; "
        "`MLFLOW_ENABLE_ASYNC_TRACE_LOGGING=true`, MLflow's other settings at their defaults). "
        "Both send through the proxy to the same server; each variant uses a fresh sink and "
        "experiment in one process per sink.",
        "",
        "Agent time inside each hook call, p50 / p99 / p99.9 (n), and the agent's total time in "
        "hooks divided by the spans the workload makes:",
        "",
        *table(
            [
                "variant",
                "sink",
                "on_run_start",
                "on_step",
                "on_run_end",
                "hook time per span",
                "timed hooks done in",
            ],
            hook_rows,
        ),
        "",
        "From the first timed hook until every span is readable; HTTP requests in that window "
        "(per trace in brackets); what `MlflowClient.search_traces(locations=[experiment_id])` "
        "returns afterwards:",
        "",
        *table(
            [
                "variant",
                "sink",
                "spans",
                "flush() returned after",
                "all spans readable after",
                "spans/s",
                "`POST /v1/traces`",
                "every request",
                "read back",
            ],
            drain_rows,
        ),
        "",
        f"The process ends right after its last hook: {exit_workload.describe()}. No "
        "`flush()`, no `close()`; the sink stays referenced, as a program's global sink would. "
        "'normal exit' lets the interpreter exit (exit hooks run: ours closes its sinks within "
        "`shutdown_timeout`, MLflow flushes its export queue); 'SIGTERM' is sent by the "
        "harness as soon as the child says its last hook returned (ours handles it: it ends "
        "open runs KILLED, sends within `shutdown_timeout`, then dies of the signal; MLflow "
        "does not handle it). What reached the server is read back once the process is gone; "
        "ours' journal is then replayed with `rlm-mlflow replay` and read back again:",
        "",
        *table(
            [
                "sink",
                "ending",
                "not yet sent at the last hook",
                "process gone after",
                "exit code",
                "at the server once it is gone",
                "spans lost",
                "MLflow runs FINISHED (only ours logs runs)",
                "after `rlm-mlflow replay`",
            ],
            exit_rows,
        ),
        "",
        *traces_notes(section, kinds, results["meta"]["cores"]),
        "",
    ]
    return out


def traces_notes(section: Mapping[str, Any], kinds: list[str], cores: int) -> list[str]:
    latency = section["latency"]
    notes = [
        "- How each figure is measured. Hook latency: `perf_counter_ns` around each hook call, "
        "after an untimed warm-up run (started and ended, then flushed: the first hook call "
        "starts our worker thread and MLflow's tracer; its one-span trace is left out of every "
        "count). Hook time per span: the sum of every timed hook call over the spans made. "
        "'flush() returned after' and 'readable after' count from the first timed hook; "
        "readable means the server's store (its `spans` table, polled every 20 ms) holds every "
        "span; spans/s is the spans over that time. Requests are counted in the child by "
        "wrapping `requests`' `HTTPAdapter.send`, by path, over the same window; the proxy's "
        "`paths` counter over the whole child cross-checks them (below). Read back: "
        "`search_traces` after the child ended; a span is duplicated if its id, or its place "
        "in the tree (the names from the root down), is there twice."
    ]
    threads = max(
        trace_workload_from_spec(row["workload"]).threads
        for kind in kinds
        for row in latency[kind]["variants"]
    )
    work = (
        f"{section['think_ms']:g} ms slept before each step (a model call, in practice; the CPU "
        "idle and its caches cold when the hook runs), or none: the agent threads then only "
        "build events and call hooks"
        if section.get("think_ms")
        else "none: the agent threads only build events and call hooks"
    )
    notes.append(
        f"- Agent work: {work}. With {threads} agent threads on {cores} cores a hook call can be "
        "descheduled, or wait in the middle for the GIL held by another agent thread or by the "
        "sink's own thread: those waits are in the figures, as the agent sees them."
    )
    for kind in kinds:
        result = latency[kind]
        rows = result["variants"]
        largest = max(rows, key=lambda r: trace_workload_from_spec(r["workload"]).spans)
        counted = sum(sum(r["requests"].values()) for r in rows)
        proxy: Counter[str] = Counter()
        for path, n in result.get("proxy_paths", {}).items():
            proxy[_path_group(path)] += n
        by_path = ", ".join(f"`{path}` {n:,}" for path, n in proxy.most_common())
        notes.append(
            f"- {LABELS[kind]}, requests by path in the '{largest['label']}' window (time "
            f"inside them summed): {_path_breakdown(largest)}. Over the whole child (setup, "
            f"warm-ups and closes included) the proxy read {sum(proxy.values()):,} requests "
            f"({by_path}); the timed windows account for {counted:,} of them."
        )
        lost = [r["lost"] for r in rows if r.get("lost")]
        if lost:
            notes.append(f"- {LABELS[kind]}: hook calls that failed or were skipped: {lost}.")
        made = [
            f"{r['label']}: {r['spans_made'] - 1:,} made, "
            f"{trace_workload_from_spec(r['workload']).spans:,} expected"
            for r in rows
            if r.get("spans_made") is not None
            and r["spans_made"] - 1 != trace_workload_from_spec(r["workload"]).spans
        ]
        if made:
            notes.append(f"- {LABELS[kind]} did not make the tree it should: {'; '.join(made)}.")
    if "ours" in latency and "tracing" in latency:
        ours, theirs = latency["ours"]["variants"], latency["tracing"]["variants"]
        per_span = [
            ratio(t["per_span_us"], o["per_span_us"]) for o, t in zip(ours, theirs, strict=True)
        ]
        per_trace = []
        for o, t in zip(ours, theirs, strict=True):
            runs = trace_workload_from_spec(o["workload"]).runs
            _, mlflow_every = trace_requests(t)
            ours_otlp, _ = trace_requests(o)
            per_trace.append(f"{mlflow_every / runs:.1f} against {ours_otlp / runs:.2f}")
        notes.append(
            "- MLflow tracing against ours, variant by variant: hook time per span "
            + ", ".join(per_span)
            + " as much; trace requests per trace (all of MLflow tracing's requests, which are "
            "all about traces, against ours' `POST /v1/traces`) "
            + ", ".join(per_trace)
            + ". Ours also logs every run as an MLflow run (params, metrics, status): those "
            "requests are in its 'every request' column and in its time until readable; the "
            "tracing baseline logs no runs."
        )
    failures = [
        f"{SHORT[r['sink']]} ({r['ending']}): {r['logged_trace_failures']} log lines such as "
        f"`{r['trace_failure_sample']}`"
        for r in section["exits"]
        if r.get("logged_trace_failures")
    ]
    if failures:
        notes.append("- Export failures logged by the exiting processes: " + "; ".join(failures))
    return notes


# ---------------------------------------------------------------------------------------------
# The whole report
# ---------------------------------------------------------------------------------------------


def render(results: Results, plot_path: Path | None = None) -> str:
    """The whole report, from the results alone (``results["meta"]`` says how they were made)."""
    meta = results["meta"]
    main = results.get("main")
    overhead = main["sinks"]["ours"]["timer_overhead_ns"] if main is not None else None
    out = [
        "# Performance: rlm_mlflow against what users would pick instead",
        "",
        f"Produced by `{meta['command']}` on {meta['when']} in {meta['elapsed_s']:.0f} s "
        f"({meta['plan']} plan). Python {meta['python']}, mlflow {meta['mlflow']}, "
        f"{meta['machine']}.",
        "",
    ]
    if meta["plan"] != "full":
        out += [
            f"{meta['plan'].capitalize()} plan: small samples (a p99 over a few dozen calls is "
            "close to the maximum) and short ceiling loops; the figures are indicative only. "
            "The full run is `scripts/bench`.",
            "",
        ]
    if not meta["all_sections"]:
        out += [f"Only these sections ran: {', '.join(meta['sections'])}.", ""]
    out += [
        "A real `mlflow server` (sqlite backend, one worker, job execution off) runs on "
        "loopback; a `FaultProxy` in pass mode sits in front of it, counts every HTTP request "
        "of every sink the same way, and adds latency where a section says so (the drain, "
        "steady-state and close() measurements go straight to the server). Each measurement "
        "runs in a fresh interpreter. Agent time is `perf_counter_ns` around each hook call"
        + (f" (timer overhead about {overhead} ns, included)" if overhead is not None else "")
        + ". What reached MLflow is read back from the server's store afterwards.",
        "",
        *main_section(results),
        *targets_section(results),
        *regimes_section(results),
        *drain_section(results),
        *hooks_section(results),
        *sweep_section(results, plot_path),
        *concurrency_section(results),
        *traces_section(results),
        *other_figures(results),
    ]
    while out and out[-1] == "":
        out.pop()
    return "\n".join(out) + "\n"


def plot(results: Results, path: Path) -> bool:
    """on_step p50 and p99 against added latency, for the three sinks; False if not drawn."""
    sweep = results.get("sweep")
    if sweep is None:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plot (pip install -e '.[bench]')")
        return False
    latencies = sweep_latencies(sweep)
    if not latencies:
        return False
    xs = list(range(len(latencies)))
    fig, ax = plt.subplots(figsize=(8, 4.8))
    colors = {"sync": "tab:red", "async": "tab:orange", "ours": "tab:green"}
    for kind in COMPARED:
        points = [
            (i, sweep["rows"][kind].get(str(lat))) for i, lat in zip(xs, latencies, strict=True)
        ]
        present = [(i, r) for i, r in points if r is not None]
        for name, style in (("p50_us", "-o"), ("p99_us", "--s")):
            ax.plot(
                [i for i, _ in present],
                [r["hooks"]["on_step"][name] for _, r in present],
                style,
                color=colors[kind],
                label=f"{SHORT[kind]} {name[:3]}",
            )
    ax.axhline(TARGET_HOOK_P99_US, color="grey", linewidth=0.8, linestyle=":")
    ax.text(
        0, TARGET_HOOK_P99_US * 1.2, f"{TARGET_HOOK_P99_US:g} us target", color="grey", fontsize=8
    )
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

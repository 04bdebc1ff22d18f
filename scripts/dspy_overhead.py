"""What logging a ``dspy.RLM`` costs the caller: rlm-mlflow's RLMCallback against MLflow's own
``mlflow.dspy.autolog()``, and what each leaves in MLflow when the process ends right after a call.

    .venv/bin/python scripts/dspy_overhead.py              # a few minutes on 2 cores
    .venv/bin/python scripts/dspy_overhead.py --quick      # a smoke run

A local ``mlflow server`` (sqlite) is started. Each measurement runs in a fresh process, so that
autolog's patching never leaks into another: DSPy's real ``dspy.RLM`` with a scripted ``DummyLM``
(every iteration prints a number, the last one submits) and DSPy's ``LocalInterpreter``. A process
makes one warm-up call, then ``--calls`` RLM calls of ``--iterations`` iterations each, and reports
per iteration: the wall time, the time DSPy spent inside the callbacks' handlers, the CPU time of
the calling thread and that of the process's other threads (a sink's worker, autolog's exporter).
Rounds interleave the set-ups: no callback, an empty ``BaseCallback`` (what any callback costs:
DSPy then inspects the arguments of every call), ``RLMCallback`` with an ``MLflowSink``, and
``mlflow.dspy.autolog()``; the table gives the median of each figure per set-up.

Then the exit scenarios: a process makes ``--exit-calls`` calls and, at once, exits normally,
gets SIGTERM, or is SIGKILLed; the table says what MLflow holds afterwards (and, for rlm-mlflow
after SIGKILL, after ``rlm-mlflow replay``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODES = ("none", "empty-callback", "rlm-mlflow", "autolog")


# -- the child: one measured process ----------------------------------------------------------


def child(args: argparse.Namespace) -> None:
    import dspy
    from dspy.primitives.local_interpreter import LocalInterpreter
    from dspy.utils.dummies import DummyLM

    script = [{"reasoning": f"step {n}", "code": f"x = {n}\nprint(x)"} for n in range(1, 100_000)]

    def answers(iterations: int) -> Any:
        return iter(
            [*script[: iterations - 1], {"reasoning": "done", "code": "SUBMIT(answer='ok')"}]
        )

    lm = DummyLM([])
    callbacks: list[Any] = []
    if args.mode == "empty-callback":  # what any callback costs: DSPy's own bookkeeping
        from dspy.utils.callback import BaseCallback

        callbacks = [BaseCallback()]
    elif args.mode == "rlm-mlflow":
        from rlm_mlflow import MLflowSink
        from rlm_mlflow.dspy import RLMCallback

        sink = MLflowSink(enabled=True, experiment=args.experiment, tracking_uri=args.uri)
        callbacks = [RLMCallback(sink)]
    elif args.mode == "autolog":
        import mlflow

        mlflow.set_tracking_uri(args.uri)
        mlflow.set_experiment(args.experiment)
        mlflow.dspy.autolog()
    if callbacks:
        dspy.configure(lm=lm, callbacks=callbacks)
    else:
        dspy.configure(lm=lm)
    rlm = dspy.RLM(
        "query -> answer", max_iters=args.iterations, interpreter_factory=LocalInterpreter
    )

    def call(n: int) -> None:
        lm.answers = answers(args.iterations)
        assert rlm(query=f"task {n}").answer == "ok"

    spent = time_the_callbacks(dspy.settings.callbacks)
    call(-1)  # warm-up: imports, the first interpreter, the sink's first request
    spent[0] = 0
    iterations = args.calls * args.iterations
    started, cpu, own_cpu = time.perf_counter(), time.process_time(), time.thread_time()
    for n in range(args.calls):
        call(n)
    elapsed = time.perf_counter() - started
    own = time.thread_time() - own_cpu
    others = (time.process_time() - cpu) - own
    print(
        json.dumps(
            {
                "per_iteration_us": elapsed / iterations * 1e6,
                "in_callbacks_us": spent[0] / iterations / 1e3,
                "caller_cpu_us": own / iterations * 1e6,
                "other_threads_cpu_us": others / iterations * 1e6,
                "done_at": time.time(),
            }
        ),
        flush=True,
    )
    if args.end == "sigterm":
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)
    elif args.end == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)


def time_the_callbacks(callbacks: list[Any]) -> list[int]:
    """Wrap every handler of the configured callbacks: the time DSPy spends in them, in ns."""
    spent = [0]

    def timed(handler: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter_ns()
            try:
                return handler(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter_ns() - began

        return wrapper

    for callback in callbacks:
        for name in dir(callback):
            if name.startswith("on_") and callable(getattr(callback, name)):
                setattr(callback, name, timed(getattr(callback, name)))
    return spent


# -- the parent --------------------------------------------------------------------------------


def run_child(mode: str, uri: str, experiment: str, **options: Any) -> tuple[dict[str, Any], float]:
    """Run one child; what it printed, and how long it took to exit after its last call."""
    command = [sys.executable, __file__, "--child", "--mode", mode, "--uri", uri]
    command += ["--experiment", experiment]
    for key, value in options.items():
        command += [f"--{key}", str(value)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1200, check=False)
    ended = time.time()
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"{mode} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    report = json.loads(lines[-1])
    return report, ended - report["done_at"]


def landed(uri: str, experiment: str) -> dict[str, Any]:
    """What MLflow holds for an experiment: runs by status, traces, spans."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return {"runs": {}, "traces": 0, "spans": 0, "steps": 0}
    runs = client.search_runs([found.experiment_id], max_results=1000)
    statuses: dict[str, int] = {}
    for run in runs:
        statuses[run.info.status] = statuses.get(run.info.status, 0) + 1
    traces = client.search_traces(locations=[found.experiment_id], max_results=500)
    steps = sum(int(run.data.metrics.get("steps", 0)) for run in runs)
    spans = sum(len(trace.data.spans) for trace in traces)
    return {"runs": statuses, "traces": len(traces), "spans": spans, "steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, default="none")
    parser.add_argument("--uri", default="")
    parser.add_argument("--experiment", default="dspy-overhead")
    parser.add_argument("--end", choices=("exit", "sigterm", "sigkill"), default="exit")
    parser.add_argument("--calls", type=int, default=10, help="measured RLM calls per process")
    parser.add_argument("--iterations", type=int, default=30, help="iterations per RLM call")
    parser.add_argument("--rounds", type=int, default=3, help="processes per set-up")
    parser.add_argument("--exit-calls", type=int, default=2, help="calls before the exit")
    parser.add_argument("--exit-rounds", type=int, default=3, help="processes per exit case")
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    parser.add_argument("--only", choices=("all", "cost", "exits"), default="all")
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.quick:
        args.calls, args.iterations, args.rounds, args.exit_calls, args.exit_rounds = 2, 5, 1, 1, 1
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    from rlm_mlflow.testing import local_server

    with tempfile.TemporaryDirectory() as folder, local_server(Path(folder) / "server") as server:
        journal = Path(folder) / "journal"
        os.environ["RLM_MLFLOW_JOURNAL_DIR"] = str(journal)
        if args.only in ("all", "cost"):
            measure(server.uri, args)
        if args.only in ("all", "exits"):
            exits(server.uri, args, journal)


def measure(uri: str, args: argparse.Namespace) -> None:
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    inside: dict[str, list[float]] = {mode: [] for mode in MODES}
    caller: dict[str, list[float]] = {mode: [] for mode in MODES}
    others: dict[str, list[float]] = {mode: [] for mode in MODES}
    exit_times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for number in range(args.rounds):
        for mode in MODES:
            report, exit_s = run_child(
                mode,
                uri,
                f"bench-{mode}-{number}",
                calls=args.calls,
                iterations=args.iterations,
            )
            times[mode].append(report["per_iteration_us"])
            inside[mode].append(report["in_callbacks_us"])
            caller[mode].append(report["caller_cpu_us"])
            others[mode].append(report["other_threads_cpu_us"])
            exit_times[mode].append(exit_s)
    base = statistics.median(times["none"])
    base_exit = statistics.median(exit_times["none"])
    total = args.calls * args.iterations
    print(
        f"\n{args.rounds} processes per set-up, each {args.calls} calls x {args.iterations} "
        f"iterations ({total} iterations) after one warm-up call; medians:\n"
    )
    base_others = statistics.median(others["none"])
    base_caller = statistics.median(caller["none"])
    print(
        "| set-up | wall time per iteration (min-max) | in the callbacks, per iteration "
        "| CPU of the calling thread, per iteration "
        "| CPU of other threads, per iteration | exit after the last call |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for mode in MODES:
        value = statistics.median(times[mode])
        added = "" if mode == "none" else f", {value - base:+,.0f} µs"
        spread = f"{min(times[mode]):,.0f}-{max(times[mode]):,.0f}"
        callbacks = statistics.median(inside[mode])
        other = statistics.median(others[mode])
        mine = statistics.median(caller[mode])
        mine_more = "" if mode == "none" else f" ({mine - base_caller:+,.0f} µs)"
        more = "" if mode == "none" else f" ({other - base_others:+,.0f} µs)"
        exit_s = statistics.median(exit_times[mode])
        extra = "" if mode == "none" else f" ({exit_s - base_exit:+.2f} s)"
        print(
            f"| {mode} | {value:,.0f} µs ({spread}{added}) | {callbacks:,.1f} µs "
            f"| {mine:,.0f} µs{mine_more} | {other:,.0f} µs{more} | {exit_s:.2f} s{extra} |"
        )
    print("\nWhat the measured processes left in MLflow (last round):")
    for mode in MODES[2:]:
        print(f"- {mode}: {landed(uri, f'bench-{mode}-{args.rounds - 1}')}")


def exits(uri: str, args: argparse.Namespace, journal: Path) -> None:
    calls = args.exit_calls + 1  # the warm-up call too
    print(
        f"\nEnds right after {calls} calls of {args.iterations} iterations, "
        f"{args.exit_rounds} processes each (what MLflow holds after each):\n"
    )
    print("| set-up | how the process ends | what MLflow holds |")
    print("| --- | --- | --- |")
    for mode in MODES[2:]:
        for end in ("exit", "sigterm", "sigkill"):
            seen, replayed = [], []
            for number in range(args.exit_rounds):
                experiment = f"exit-{mode}-{end}-{number}"
                run_child(
                    mode,
                    uri,
                    experiment,
                    calls=args.exit_calls,
                    iterations=args.iterations,
                    end=end,
                )
                time.sleep(5)  # what is still in flight on the server's side lands
                seen.append(describe(landed(uri, experiment)))
                if mode == "rlm-mlflow" and end == "sigkill":
                    done = subprocess.run(
                        [sys.executable, "-m", "rlm_mlflow", "replay", str(journal)],
                        capture_output=True,
                        text=True,
                        timeout=600,
                        check=False,
                        env={**os.environ, "MLFLOW_TRACKING_URI": uri},
                    )
                    ok = done.returncode == 0
                    replayed.append(describe(landed(uri, experiment)) if ok else "replay failed")
            print(f"| {mode} | {end} | {' / '.join(seen)} |")
            if replayed:
                print(f"| {mode} | sigkill, then `rlm-mlflow replay` | {' / '.join(replayed)} |")


def describe(found: dict[str, Any]) -> str:
    runs = ", ".join(f"{count} {status}" for status, count in sorted(found["runs"].items()))
    return f"runs: {runs or 'none'}; {found['traces']} traces, {found['spans']} spans"


if __name__ == "__main__":
    main()

"""Replay at the server's pace: N runs x S steps journaled while the server was down (the
process killed with kill -9), then one replay against a healthy local server, through a
counting proxy. Prints points/s against a plain ``MlflowClient.log_batch`` loop on the same
server, requests per run, and whether everything landed exactly once.

Usage: python scripts/bench_replay.py [--runs 500] [--steps 200] [--traces off] [--profile FILE]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from pathlib import Path

CHILD = textwrap.dedent(
    """
    import sys
    from rlm_mlflow import MLflowSink
    uri, journal, runs, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    sink = MLflowSink(enabled=True, experiment="bench-replay", tracking_uri=uri,
                      journal_dir=journal, retry_initial=0.05, retry_max_wait=0.5,
                      traces=sys.argv[5])
    for r in range(runs):
        rid = f"run-{r}"
        sink.on_run_start(rid, task="bench task", environment="bench", params={"r": r})
        for i in range(steps):
            sink.on_step(rid, event={"step": i, "reward": 0.5}, cumulative_reward=0.5 * (i + 1))
        sink.on_run_end(rid, result={"completed": True, "steps": steps}, run_path=None)
    sys.stdout.write("READY\\n")
    sys.stdout.flush()
    import time
    time.sleep(600)
    """
)


def journal_killed(journal: Path, runs: int, steps: int, traces: str) -> None:
    from rlm_mlflow.testing import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", PYTHONUNBUFFERED="1")
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, dead, str(journal), str(runs), str(steps), traces],
        stdout=subprocess.PIPE,
        env=env,
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        if b"READY" not in line:
            raise SystemExit(f"child failed: {line!r}")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)


def ceiling(uri: str, points: int = 1000, batches: int = 10) -> float:
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.create_experiment(f"ceiling-{time.time_ns()}")
    run = client.create_run(exp)
    now = int(time.time() * 1000)
    began = time.perf_counter()
    for b in range(batches):
        client.log_batch(
            run.info.run_id,
            metrics=[Metric("m", float(i), now, b * points + i) for i in range(points)],
        )
    return points * batches / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--profile")
    parser.add_argument("--traces", default="full", help="the sink's traces setting")
    args = parser.parse_args()
    from mlflow.tracking import MlflowClient

    from rlm_mlflow import replay
    from rlm_mlflow.testing import FaultProxy, local_server

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        journal = root / "journal"
        began = time.perf_counter()
        journal_killed(journal, args.runs, args.steps, args.traces)
        print(f"journaled {args.runs} x {args.steps} in {time.perf_counter() - began:.1f} s")
        with local_server(root / "server") as server, FaultProxy(server.port) as proxy:
            raw = ceiling(server.uri)
            print(f"raw log_batch ceiling: {raw:.0f} points/s")
            before = proxy.requests
            # When the last run's end landed: its metrics had landed before it.
            from rlm_mlflow._exporters.runs import RunsExporter

            finish = RunsExporter._finish
            last_end = [0.0]

            async def timed_finish(self: RunsExporter, *a: object, **k: object) -> None:
                await finish(self, *a, **k)  # type: ignore[arg-type]
                last_end[0] = time.perf_counter()

            RunsExporter._finish = timed_finish  # type: ignore[method-assign]
            began = time.perf_counter()
            profiler = cProfile.Profile() if args.profile else None
            if profiler:
                profiler.enable()
            report = replay(journal, tracking_uri=proxy.uri)
            if profiler:
                profiler.disable()
                profiler.dump_stats(args.profile)
            took = time.perf_counter() - began
            landed = last_end[0] - began
            RunsExporter._finish = finish  # type: ignore[method-assign]
            requests = proxy.requests - before
            paths = Counter(proxy.paths)
            second = replay(journal, tracking_uri=proxy.uri)
            # Points per run: step_reward + cumulative_reward per step, 3 summary metrics.
            points = args.runs * (2 * args.steps + 3)
            client = MlflowClient(server.uri)
            exp = client.get_experiment_by_name("bench-replay")
            found = client.search_runs([exp.experiment_id], max_results=50000) if exp else []
            keys = Counter(r.data.tags.get("rlm_mlflow.key") for r in found)
            statuses = Counter(r.info.status for r in found)
            sample = found[: min(20, len(found))]
            bad = 0
            for run in sample:
                history = client.get_metric_history(run.info.run_id, "step_reward")
                bad += len(history) != args.steps or len({m.step for m in history}) != args.steps
            print(
                f"points and run ends landed after {landed:.1f} s: {points / landed:.0f} "
                f"points/s ({100 * points / landed / raw:.0f}% of the ceiling)"
            )
            print(
                f"replay: {took:.1f} s, {points / took:.0f} points/s "
                f"({100 * points / took / raw:.0f}% of the ceiling), ok={report.ok}, "
                f"sent={report.sent} of {report.events}, failed={report.failed}"
            )
            print(
                f"requests: {requests} ({requests / args.runs:.2f} per run); "
                + ", ".join(
                    f"{p.rsplit('/', 2)[-2]}/{p.rsplit('/', 1)[-1]}={n}"
                    for p, n in paths.most_common(12)
                )
            )
            print(
                f"runs in MLflow: {len(found)}, distinct keys {len(keys)}, statuses "
                f"{dict(statuses)}; sampled histories wrong: {bad}; "
                f"second replay: events {second.events} sent {second.sent} "
                f"journals {second.journals}"
            )


if __name__ == "__main__":
    main()

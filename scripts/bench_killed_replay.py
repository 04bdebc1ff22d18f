"""A long run killed with ``kill -9`` while its worker was sending it, then replayed: what
replay reads back to learn what the store holds (range reads of the steps in doubt, or whole
metric histories), how long it takes, and whether every step landed once.

One local ``mlflow server`` (sqlite) behind a FaultProxy adding 300 ms to each request: the
agent's hooks all return, its worker sends the steps in one long cycle, and the process is
killed once ``--sent`` batches went out (the steps of that cycle are then in doubt: sent, not
confirmed). ``rlm-mlflow replay`` then runs through a second, counting proxy.

Usage: python scripts/bench_killed_replay.py [--steps 100000] [--sent 40]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from pathlib import Path

CHILD = textwrap.dedent(
    """
    import sys, time
    from rlm_mlflow import MLflowSink
    uri, steps = sys.argv[1], int(sys.argv[2])
    sink = MLflowSink(enabled=True, experiment="bench-killed", tracking_uri=uri)
    sink.on_run_start("long", task="bench task", environment="bench", params={})
    for i in range(steps):
        sink.on_step("long", event={"step": i, "reward": 0.5}, cumulative_reward=0.5 * (i + 1))
    sys.stdout.write("HOOKED\\n")
    sys.stdout.flush()
    time.sleep(600)
    """
)
BATCH = "/api/2.0/mlflow/runs/log-batch"
WHOLE = "/api/2.0/mlflow/metrics/get-history"
RANGE = "/ajax-api/2.0/mlflow/metrics/get-history-bulk-interval"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--sent", type=int, default=40, help="batches sent before the kill")
    args = parser.parse_args()

    from mlflow import MlflowClient

    from rlm_mlflow import replay
    from rlm_mlflow.testing import FaultProxy, local_server

    work = Path(tempfile.mkdtemp(prefix="rlm-mlflow-killed-"))
    journal = work / "journal"
    env = dict(os.environ, RLM_MLFLOW_JOURNAL_DIR=str(journal), MLFLOW_DISABLE_TELEMETRY="true")
    with local_server(work / "server") as server:
        with FaultProxy(server.port) as proxy:
            proxy.set(latency=0.3)
            child = subprocess.Popen(
                [sys.executable, "-c", CHILD, proxy.uri, str(args.steps)],
                env=env,
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                assert child.stdout is not None
                if not child.stdout.readline().startswith("HOOKED"):
                    raise SystemExit("the agent did not start")
                if not proxy.wait_until(lambda p: p.paths[BATCH] >= args.sent, 300):
                    raise SystemExit(f"fewer than {args.sent} batches went out in 300 s")
            finally:
                child.kill()
                child.wait()
            sent = proxy.paths[BATCH]
        with FaultProxy(server.port) as counting:
            began = time.monotonic()
            report = replay(journal, tracking_uri=counting.uri)
            seconds = time.monotonic() - began
            paths = Counter(counting.paths)
        client = MlflowClient(server.uri)
        experiment = client.get_experiment_by_name("bench-killed")
        if experiment is None:
            raise SystemExit("the experiment was never created")
        (run,) = client.search_runs([experiment.experiment_id])
        once = {}
        for key in ("step_reward", "cumulative_reward"):
            steps = Counter(m.step for m in client.get_metric_history(run.info.run_id, key))
            once[key] = (len(steps), sum(n - 1 for n in steps.values()))
    print(f"{args.steps:,} steps, kill -9 after {sent} batches went out")
    print(f"replay: ok={report.ok}, {seconds:.1f} s, run {run.info.status}")
    print(f"range reads {paths[RANGE]}, whole-history reads {paths[WHOLE]}")
    for key, (distinct, repeated) in once.items():
        print(f"{key}: {distinct:,} of {args.steps:,} steps, {repeated} repeated")
    print("requests by path:", dict(paths.most_common()))


if __name__ == "__main__":
    main()

"""Time to visibility: how long after its hook a step's metric can be read back from MLflow.

    .venv/bin/python scripts/visibility.py                       # 1, 16 and 200 concurrent runs
    .venv/bin/python scripts/visibility.py --runs 1 --seconds 10 # a quick look
    .venv/bin/python scripts/visibility.py --output docs/performance.md   # update the docs' table

A local ``mlflow server`` (sqlite) is started in a temporary folder. For each count of concurrent
runs, one sink with the default settings (``flush_interval`` 5 s, traces on, journal on) takes
that many runs, each on a thread of its own stepping once every ``--step-every`` seconds for
``--seconds`` seconds (the agent's work between steps). Each step's ``cumulative_reward`` is its
number + 1, so the run's latest ``cumulative_reward`` says which steps MLflow holds. A reader
asks MLflow for the experiment's runs (one ``search_runs``, latest metrics included) every
``--poll`` seconds; a step is visible at the first answer that shows it, and its time to
visibility is that answer's arrival minus the step's hook. The figure is therefore an upper
bound, coarse by up to one poll period.

With ``--baseline``, each count of runs is measured a second time with the sink replaced by the
minimal ``MlflowClient`` program that sends the same (:class:`ClientLoop`): what the server
itself allows at that many runs.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

MARK_BEGIN = "<!-- visibility:begin -->"
MARK_END = "<!-- visibility:end -->"
#: The default flush_interval (5 s) + 1 s: when a step should be visible at steady state.
WITHIN = 6.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


class ClientLoop:
    """The minimal ``MlflowClient`` program sending what the sink sends here, with the sink's
    hooks: every ``interval`` seconds (the sink's ``flush_interval``), each run not yet created
    is created (tag ``run_id``) and gets one ``log_batch`` with its steps since the last, on
    ``threads`` threads (the sink's own bound on requests in flight); a run that ended is then
    terminated. No journal, no traces, no retries."""

    def __init__(self, uri: str, experiment: str, interval: float = 5.0, threads: int = 4) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from mlflow import MlflowClient

        self.client = MlflowClient(uri)
        self.experiment_id = self.client.create_experiment(experiment)
        self.interval = interval
        self.pool = ThreadPoolExecutor(threads)
        self.lock = threading.Lock()
        self.steps: dict[str, list[tuple[int, float, int]]] = {}
        self.ended: set[str] = set()
        self.ids: dict[str, str] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._flusher, name="client-loop")
        self.thread.start()

    def on_run_start(self, run_id: str, **_: Any) -> None:
        with self.lock:
            self.steps.setdefault(run_id, [])

    def on_step(self, run_id: str, event: dict[str, Any], cumulative_reward: float) -> None:
        with self.lock:
            self.steps[run_id].append((event["step"], cumulative_reward, int(time.time() * 1000)))

    def on_run_end(self, run_id: str, **_: Any) -> None:
        with self.lock:
            self.ended.add(run_id)

    def _send(self, run_id: str, points: list[tuple[int, float, int]], end: bool) -> None:
        from mlflow.entities import Metric

        if run_id not in self.ids:
            created = self.client.create_run(
                self.experiment_id, run_name=run_id, tags={"run_id": run_id}
            )
            self.ids[run_id] = created.info.run_id
        if points:
            metrics = [
                Metric(key, value, ms, step)
                for step, cumulative, ms in points
                for key, value in (("step_reward", 1.0), ("cumulative_reward", cumulative))
            ]
            self.client.log_batch(self.ids[run_id], metrics=metrics)
        if end:
            self.client.set_terminated(self.ids[run_id], "FINISHED")

    def _drain(self) -> None:
        with self.lock:
            taken = {run: points for run, points in self.steps.items()}
            self.steps = {run: [] for run in self.steps if run not in self.ended}
            ended, self.ended = self.ended, set()
        futures = [
            self.pool.submit(self._send, run, points, run in ended) for run, points in taken.items()
        ]
        for future in futures:
            future.result()

    def _flusher(self) -> None:
        next_at = time.monotonic() + self.interval
        while not self.stop.wait(max(0.0, next_at - time.monotonic())):
            next_at = time.monotonic() + self.interval  # from a drain's start, as the sink
            self._drain()

    def status(self) -> dict[str, Any]:
        return {"dropped": {}}

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self._drain()
        self.pool.shutdown()


def measure(
    uri: str, runs: int, seconds: float, step_every: float, poll: float, *, baseline: bool = False
) -> dict[str, Any]:
    from mlflow import MlflowClient

    from rlm_mlflow import MLflowSink

    experiment = f"visibility-{runs}-{'loop-' if baseline else ''}{int(time.time())}"
    sink: Any = (
        ClientLoop(uri, experiment)
        if baseline
        else MLflowSink(enabled=True, experiment=experiment, tracking_uri=uri)
    )
    client = MlflowClient(uri)
    hooked: dict[str, dict[int, float]] = {f"v{runs}-{n}": {} for n in range(runs)}
    seen: dict[str, int] = dict.fromkeys(hooked, -1)
    latencies: list[float] = []
    stop = threading.Event()
    stepping_done = threading.Event()

    def agent(run_id: str) -> None:
        sink.on_run_start(run_id, task=f"visibility probe {run_id}", environment="bench", params={})
        times = hooked[run_id]
        deadline = time.monotonic() + seconds
        step = 0
        while time.monotonic() < deadline:
            times[step] = time.time()
            sink.on_step(
                run_id, event={"step": step, "reward": 1.0}, cumulative_reward=float(step + 1)
            )
            step += 1
            stop.wait(step_every)
        sink.on_run_end(run_id, result={"completed": True, "steps": step}, run_path=None)

    def reader() -> None:
        experiment_id = None
        while not stop.is_set():
            if experiment_id is None:
                found = client.get_experiment_by_name(experiment)
                experiment_id = found.experiment_id if found else None
            if experiment_id is not None:
                answer = client.search_runs([experiment_id], max_results=1000)
                now = time.time()
                for run in answer:
                    run_id = run.data.tags.get("run_id")
                    value = run.data.metrics.get("cumulative_reward")
                    if run_id not in seen or value is None:
                        continue
                    last = int(value) - 1
                    for step in range(seen[run_id] + 1, last + 1):
                        at = hooked[run_id].get(step)
                        if at is not None:
                            latencies.append(now - at)
                    seen[run_id] = max(seen[run_id], last)
                if stepping_done.is_set() and all(
                    seen[r] >= max(hooked[r], default=-1) for r in hooked
                ):
                    return
            stop.wait(poll)

    watcher = threading.Thread(target=reader, name="reader")
    watcher.start()
    threads = [threading.Thread(target=agent, args=(r,)) for r in hooked]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stepping_done.set()
    watcher.join(120)
    stop.set()
    watcher.join()
    status = sink.status()
    sink.close()
    steps = sum(len(t) for t in hooked.values())
    return {
        "sender": "loop" if baseline else "sink",
        "runs": runs,
        "steps": steps,
        "seen": len(latencies),
        "p50": statistics.median(latencies) if latencies else float("nan"),
        "p99": percentile(latencies, 0.99) if latencies else float("nan"),
        "max": max(latencies, default=float("nan")),
        "within": sum(1 for x in latencies if x <= WITHIN) / len(latencies) if latencies else 0.0,
        "dropped": status["dropped"],
    }


def table(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        MARK_BEGIN,
        f"Default settings (`flush_interval` 5 s, traces and journal on); each run steps every "
        f"{args.step_every:g} s for {args.seconds:g} s; MLflow polled every {args.poll:g} s, so "
        f"each figure is an upper bound, coarse by up to {args.poll:g} s "
        f"(`scripts/visibility.py`, {os.cpu_count()} cores).",
        "",
        "| concurrent runs | steps | read back | hook to visible p50 | p99 | max "
        "| within `flush_interval` + 1 s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r['runs']} | {r['steps']:,} | {r['seen']:,} | {r['p50']:.2f} s | {r['p99']:.2f} s "
            f"| {r['max']:.2f} s | {r['within']:.1%} |"
        )
    lines.append(MARK_END)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="1,16,200", help="counts of concurrent runs")
    parser.add_argument("--seconds", type=float, default=30.0, help="how long each run steps")
    parser.add_argument("--step-every", type=float, default=1.0, help="seconds between steps")
    parser.add_argument("--poll", type=float, default=0.25, help="seconds between read-backs")
    parser.add_argument("--output", type=Path, help="a markdown file whose marked table to update")
    parser.add_argument(
        "--baseline", action="store_true", help="also measure the minimal MlflowClient loop"
    )
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    from rlm_mlflow.testing import local_server

    results = []
    with tempfile.TemporaryDirectory() as folder:
        os.environ["RLM_MLFLOW_JOURNAL_DIR"] = str(Path(folder) / "journal")
        with local_server(Path(folder) / "server") as server:
            for runs in (int(n) for n in args.runs.split(",")):
                for baseline in (False, True) if args.baseline else (False,):
                    result = measure(
                        server.uri,
                        runs,
                        args.seconds,
                        args.step_every,
                        args.poll,
                        baseline=baseline,
                    )
                    results.append(result)
                    sys.stderr.write(f"{result}\n")
    text = table(results, args)
    print(text)
    if args.output:
        doc = args.output.read_text()
        pattern = re.compile(re.escape(MARK_BEGIN) + ".*?" + re.escape(MARK_END), re.S)
        if pattern.search(doc):
            doc = pattern.sub(lambda _: text, doc)
        else:
            doc = doc.rstrip("\n") + "\n\n## Time to visibility\n\n" + text + "\n"
        args.output.write_text(doc)


if __name__ == "__main__":
    main()

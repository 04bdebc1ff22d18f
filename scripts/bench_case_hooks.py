"""The hook cost of a benchmark case: on_run_start and on_run_end inside and outside a benchmark.

One thread, 2,000 runs of on_run_start then on_run_end, the worker idle in its retry backoff (an
in-memory store that refuses everything), so this is the hooks' own cost, as in the "Hook cost in
isolation" table of docs/performance.md. Prints p50 and p99 of each hook, twice each way.
"""

from __future__ import annotations

import tempfile
import time

import rlm_mlflow
from rlm_mlflow import MLflowSink, TransientError
from rlm_mlflow.testing import MemoryTransport

RUNS = 2_000


def quantile(values: list[int], q: float) -> float:
    return sorted(values)[int(len(values) * q)] / 1000


def measure(in_benchmark: bool, journal_dir: str) -> str:
    transport = MemoryTransport()
    transport.fail = lambda call: TransientError("down")
    sink = MLflowSink(
        enabled=True,
        experiment="hooks",
        transport=transport,
        journal_dir=journal_dir,
        retry_initial=5,
        retry_max_wait=5,
    )
    sink.on_run_start("warm", task="t", environment="e", params={})  # starts the worker
    sink.on_run_end("warm", result={}, run_path=None)
    bench = rlm_mlflow.benchmark(sink, "bench") if in_benchmark else None
    if bench is not None:
        bench.__enter__()
    starts: list[int] = []
    ends: list[int] = []
    result = {"completed": True, "total_reward": 1.0, "steps": 0}
    for index in range(RUNS):
        run_id = f"r{index}"
        a = time.perf_counter_ns()
        sink.on_run_start(run_id, task="t", environment="e", params={"max_steps": 5})
        b = time.perf_counter_ns()
        sink.on_run_end(run_id, result=result, run_path=None)
        c = time.perf_counter_ns()
        starts.append(b - a)
        ends.append(c - b)
    if bench is not None:
        bench.__exit__(None, None, None)
    sink.close(1)
    return (
        f"on_run_start p50 {quantile(starts, 0.5):.1f} us p99 {quantile(starts, 0.99):.1f} us; "
        f"on_run_end p50 {quantile(ends, 0.5):.1f} us p99 {quantile(ends, 0.99):.1f} us"
    )


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="rlm-mlflow-hooks-") as folder:
        for in_benchmark in (False, True, False, True):
            label = "a benchmark case" if in_benchmark else "a plain run    "
            print(f"{label}: {measure(in_benchmark, folder)}")


if __name__ == "__main__":
    main()

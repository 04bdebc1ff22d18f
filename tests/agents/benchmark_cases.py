"""A benchmark of three cases whose assessments may not be written before a kill -9.

Usage: benchmark_cases.py TRACKING_URI EXPERIMENT [open]

Runs the benchmark ``bench`` (see ``tests/test_benchmark.py``: ``run_benchmark``), flushes:
``FLUSHED <status>``. Then waits to be killed. With ``open``, the benchmark's cases run and are
sent but the benchmark never ends: the kill comes inside it.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

from agentkit import make_sink, say

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import rlm_mlflow
from test_benchmark import ANSWERS, run_benchmark, run_case


def main() -> None:
    uri, experiment = sys.argv[1:3]
    sink = make_sink(uri, experiment, retry_deadline=1.0)
    if sys.argv[3:] == ["open"]:
        bench = rlm_mlflow.benchmark(sink, "bench", params={"model": "m1"})
        bench.__enter__()  # and never left
        for index, reward in enumerate([1.0, 0.0, 1.0]):
            run_case(sink, f"bench-{index}", reward)
            bench.record(f"bench-{index}", expected=ANSWERS[index], verdict=reward == 1.0)
    else:
        run_benchmark(sink, "bench", model="m1", rewards=[1.0, 0.0, 1.0])
    sink.flush(60)
    say("FLUSHED", json.dumps(sink.status()))
    threading.Event().wait(120)


if __name__ == "__main__":
    main()

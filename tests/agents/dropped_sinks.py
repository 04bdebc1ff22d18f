"""Many enabled sinks, each logging one run, dropped without close().

Usage: dropped_sinks.py TRACKING_URI EXPERIMENT SINKS

Prints ``BASELINE`` with the threads and file descriptors before the first sink. Once every sink
is dropped and collected it waits, up to a deadline, until the server holds every run FINISHED
(read with plain HTTP, not through the sink), then, up to another deadline, until the process is
back to at most two threads beyond its baseline and near its descriptors; it prints
``RESULT <json>`` with what it saw and exits normally.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import threading
import time
from collections.abc import Callable

import requests
from agentkit import make_sink, say, step

SENT_DEADLINE = 120.0
# Runs are FINISHED first; each sink then still sends its steps and its trace before it
# closes and lets its thread and files go.
RELEASE_DEADLINE = 60.0


def descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def finished_runs(uri: str, experiment: str) -> int:
    """FINISHED runs of the experiment, asked of the server directly."""
    try:
        found = requests.get(
            f"{uri}/api/2.0/mlflow/experiments/get-by-name",
            params={"experiment_name": experiment},
            timeout=5,
        )
        if found.status_code != 200:
            return 0
        experiment_id = found.json()["experiment"]["experiment_id"]
        runs = requests.post(
            f"{uri}/api/2.0/mlflow/runs/search",
            json={
                "experiment_ids": [experiment_id],
                "filter": "attributes.status = 'FINISHED'",
                "max_results": 1000,
            },
            timeout=5,
        )
        return len(runs.json().get("runs", [])) if runs.status_code == 200 else 0
    except requests.RequestException:
        return 0


def poll(predicate: Callable[[], bool], timeout: float, every: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(every)  # polling, bounded by the deadline
    return True


def main() -> None:
    uri, experiment, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    threads, fds = threading.active_count(), descriptors()
    say("BASELINE", threads, fds)
    for n in range(count):
        sink = make_sink(uri, experiment, flush_interval=1.0)
        sink.on_run_start(f"dropped-{n}", task="t", environment="e", params={})
        step(sink, f"dropped-{n}", 0)
        sink.on_run_end(f"dropped-{n}", result={"completed": True, "steps": 1}, run_path=None)
        del sink
    gc.collect()
    poll(lambda: finished_runs(uri, experiment) >= count, SENT_DEADLINE, 0.5)
    finished = finished_runs(uri, experiment)
    gc.collect()
    poll(
        lambda: threading.active_count() <= threads + 2 and descriptors() <= fds + 8,
        RELEASE_DEADLINE,
        0.1,
    )
    say(
        "RESULT",
        json.dumps(
            {
                "finished": finished,
                "threads_before": threads,
                "fds_before": fds,
                "threads": threading.active_count(),
                "fds": descriptors(),
                "thread_names": sorted({t.name for t in threading.enumerate()}),
            }
        ),
    )


if __name__ == "__main__":
    main()

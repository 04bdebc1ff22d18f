"""An agent whose journal disk fills up: every file it writes is limited to a few KiB.

Usage: disk_full.py TRACKING_URI EXPERIMENT QUEUE_SIZE STEPS

``ulimit -f``: past the limit, every write to a file fails (EFBIG; Python ignores SIGXFSZ). The
run ``full`` gets ten steps, which are flushed (the run exists in MLflow), then the rest of its
STEPS steps, during which the disk fills up, and its end; the sink is closed and the agent prints
``STATUS <json>`` with the sink's status after close.
"""

from __future__ import annotations

import json
import resource
import sys
import time

from agentkit import make_sink, say, step

LIMIT = 16 * 1024


def main() -> None:
    uri, experiment, queue_size, steps = sys.argv[1:5]
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, hard))
    sink = make_sink(uri, experiment, queue_size=int(queue_size), shutdown_timeout=30.0)
    sink.on_run_start("full", task="t", environment="e", params={})
    for number in range(10):
        step(sink, "full", number)
    if not sink.flush(60):  # the run exists in MLflow before the disk fills up
        raise SystemExit("the first steps were not sent")
    for number in range(10, int(steps)):
        step(sink, "full", number)
        if number % 100 == 0:
            time.sleep(0.001)  # the model thinking: the disk fills up while the run goes on
    sink.on_run_end("full", result={"completed": True, "steps": int(steps)}, run_path=None)
    sink.close()
    say("STATUS", json.dumps(sink.status(), default=str))


if __name__ == "__main__":
    main()

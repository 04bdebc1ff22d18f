"""A parent run the server could not create at first, then a child of it, then kill -9.

Usage: late_parent.py TRACKING_URI EXPERIMENT

Starts ``parent`` with two steps and flushes (the test makes the server refuse to create runs
meanwhile, so the parent is kept for replay): ``PARENT_TRIED <status>``. Waits for a line on
stdin (the server creates runs again), starts ``child`` with ``parent_run_id="parent"``, logs
three steps, ends it, flushes: ``CHILD_DONE <status>``. Then waits to be killed.
"""

from __future__ import annotations

import json
import sys
import threading

from agentkit import make_sink, say, step


def main() -> None:
    uri, experiment = sys.argv[1:3]
    sink = make_sink(uri, experiment, retry_deadline=1.0)
    sink.on_run_start("parent", task="t", environment="e", params={})
    for number in range(2):
        step(sink, "parent", number)
    sink.flush(60)
    say("PARENT_TRIED", json.dumps(sink.status()))
    sys.stdin.readline()
    sink.on_run_start(
        "child", task="t", environment="e", params={"parent_run_id": "parent", "depth": 1}
    )
    for number in range(3):
        step(sink, "child", number)
    sink.on_run_end("child", result={"completed": True, "steps": 3}, run_path=None)
    sink.flush(60)
    say("CHILD_DONE", json.dumps(sink.status()))
    threading.Event().wait(120)


if __name__ == "__main__":
    main()

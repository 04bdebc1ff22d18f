"""A parent run sent in full, then a child of it that never reaches the server, then kill -9.

Usage: parent_child.py TRACKING_URI EXPERIMENT

The parent gets 5,000 steps (more than a journal segment holds) and is flushed: ``PARENT_SENT``.
The agent then waits for a line on stdin (the test makes the server unreachable meanwhile),
starts ``child`` with ``parent_run_id="parent"``, logs three steps, tries to flush for a second
and prints ``CHILD_LOGGED``; then it waits to be killed.
"""

from __future__ import annotations

import sys
import threading

from agentkit import make_sink, say, step


def main() -> None:
    uri, experiment = sys.argv[1:3]
    sink = make_sink(uri, experiment)
    sink.on_run_start("parent", task="t", environment="e", params={})
    for number in range(5000):
        step(sink, "parent", number)
    if not sink.flush(120):
        raise SystemExit("the parent was not sent")
    say("PARENT_SENT")
    sys.stdin.readline()
    sink.on_run_start(
        "child", task="t", environment="e", params={"parent_run_id": "parent", "depth": 1}
    )
    for number in range(3):
        step(sink, "child", number)
    sink.flush(1.0)  # the server is unreachable: this cannot succeed, and must not hang
    say("CHILD_LOGGED")
    threading.Event().wait(120)


if __name__ == "__main__":
    main()

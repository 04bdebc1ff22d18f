"""A run whose create the server holds past the request timeout, then SIGTERM.

Usage: lost_create_sigterm.py TRACKING_URI EXPERIMENT SHUTDOWN_TIMEOUT

As ``lost_create.py``, with the sink's ``shutdown_timeout`` given: a first run is sent (the
experiment exists): ``READY``. On a line from stdin (the test has made the proxy hold the next
create), run ``held`` starts, takes five steps and ends FINISHED, and a flush is asked for without
waiting: ``LOGGED``. The create times out after 1 s and the sink looks for it by key; the agent
waits (in Python, so the sink's SIGTERM handler runs) for the signal the test sends meanwhile.
"""

from __future__ import annotations

import sys
import threading

from agentkit import make_sink, say, step


def main() -> None:
    uri, experiment, shutdown_timeout = sys.argv[1:4]
    sink = make_sink(uri, experiment, request_timeout=1.0, shutdown_timeout=float(shutdown_timeout))
    sink.on_run_start("warm", task="t", environment="e", params={})
    sink.on_run_end("warm", result={"completed": True, "steps": 0}, run_path=None)
    if not sink.flush(120):
        raise SystemExit("the first run was not sent")
    say("READY")
    sys.stdin.readline()
    sink.on_run_start("held", task="t", environment="e", params={"depth": 0})
    for number in range(5):
        step(sink, "held", number)
    sink.on_run_end("held", result={"completed": True, "steps": 5}, run_path=None)
    threading.Thread(target=sink.flush, args=(120,), daemon=True).start()
    say("LOGGED")
    threading.Event().wait(120)


if __name__ == "__main__":
    main()

"""A run whose create the server holds past the request timeout, then kill -9 or SIGTERM.

Usage: lost_create.py TRACKING_URI EXPERIMENT [SHUTDOWN_TIMEOUT]

A first run is sent (the experiment exists): ``READY``. On a line from stdin (the test has made
the proxy hold the next create), run ``held`` starts, takes five steps and ends FINISHED, and a
flush is asked for without waiting: ``LOGGED``. The create times out after 1 s and the sink
looks for it by key instead of sending another while the server may still commit it; the test
kills the process meanwhile, or sends it SIGTERM (the agent waits in Python, so that the
sink's handler runs).
"""

from __future__ import annotations

import sys
import threading

from agentkit import say, sink_with_a_first_run, step


def main() -> None:
    uri, experiment = sys.argv[1:3]
    settings = {"shutdown_timeout": float(sys.argv[3])} if len(sys.argv) > 3 else {}
    sink = sink_with_a_first_run(uri, experiment, request_timeout=1.0, **settings)
    sink.on_run_start("held", task="t", environment="e", params={"depth": 0})
    for number in range(5):
        step(sink, "held", number)
    sink.on_run_end("held", result={"completed": True, "steps": 5}, run_path=None)
    threading.Thread(target=sink.flush, args=(120,), daemon=True).start()
    say("LOGGED")
    threading.Event().wait(120)


if __name__ == "__main__":
    main()

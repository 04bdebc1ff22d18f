"""A process forks while its sink looks for a run whose create was lost; the child logs a run too.

Usage: fork_lost_create.py TRACKING_URI EXPERIMENT PARENT_RUN CHILD_ENDING

The sink has a 1 s request timeout. A first run is sent (the experiment exists): ``READY``. On a
line from stdin (the test has made the proxy hold the next create), run ``parent`` starts and
takes five steps; with PARENT_RUN ``ended`` it also ends FINISHED (``open``: it stays open); a
flush is asked for without waiting: ``LOGGED``. On the next line (the sink is looking for the run
by key) the process forks. The child starts run ``child``, takes three steps and prints
``CHILD_LOGGED <pid>``; then, with CHILD_ENDING:

- ``exit``: it ends its run FINISHED and exits normally (the exit hook closes its sink);
- ``sigterm``: it waits (in Python) for the SIGTERM the test sends it, and dies of it;
- ``sigterm-looking``: the test has the proxy hold the child's create too: the child waits until
  its sink saw that create fail (it then looks for it by key), prints ``CHILD_LOOKING``, and
  waits for the SIGTERM as above.

The parent waits for the child and prints ``CHILD_ENDED <how>`` (``exit N`` or ``signal N``),
ends its run FINISHED if it was open, closes its sink and prints ``STATUS <json>``.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback

from agentkit import say, sink_with_a_first_run, step

from rlm_mlflow import MLflowSink


def child(sink: MLflowSink, ending: str) -> None:
    sink.on_run_start("child", task="t", environment="e", params={})
    for number in range(3):
        step(sink, "child", number)
    say("CHILD_LOGGED", os.getpid())
    if ending == "sigterm-looking":
        deadline = time.monotonic() + 60.0
        while "runs/create" not in str(sink.status().get("last_error")):
            if time.monotonic() > deadline:
                os._exit(4)  # the create never failed: the test fails on the exit code
            time.sleep(0.01)
        say("CHILD_LOOKING")
    if ending.startswith("sigterm"):
        threading.Event().wait(60)
        os._exit(3)  # never signalled: the test fails on the exit code
    sink.on_run_end("child", result={"completed": True, "steps": 3}, run_path=None)


def main() -> None:
    uri, experiment, parent_run, ending = sys.argv[1:5]
    sink = sink_with_a_first_run(uri, experiment, request_timeout=1.0, shutdown_timeout=10.0)
    sink.on_run_start("parent", task="t", environment="e", params={"depth": 0})
    for number in range(5):
        step(sink, "parent", number)
    if parent_run == "ended":
        sink.on_run_end("parent", result={"completed": True, "steps": 5}, run_path=None)
    threading.Thread(target=sink.flush, args=(120,), daemon=True).start()
    say("LOGGED")
    sys.stdin.readline()
    pid = os.fork()
    if pid == 0:
        try:
            child(sink, ending)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        sys.exit(0)  # a normal exit: the exit hook closes the child's sink
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        say("CHILD_ENDED", "signal", os.WTERMSIG(status))
    else:
        say("CHILD_ENDED", "exit", os.WEXITSTATUS(status))
    if parent_run == "open":
        sink.on_run_end("parent", result={"completed": True, "steps": 5}, run_path=None)
    sink.close()
    say("STATUS", json.dumps(sink.status(), default=str))


if __name__ == "__main__":
    main()

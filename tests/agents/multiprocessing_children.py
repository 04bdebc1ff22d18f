"""Children started by multiprocessing's fork method, which end with ``os._exit()`` (no
``atexit``), each logging a run and returning without ``close()``.

Usage: multiprocessing_children.py TRACKING_URI EXPERIMENT [FORK_AT]

The parent makes a sink and logs a run ``parent`` (open). With FORK_AT ``flushed`` (the
default) it flushes it; with ``line`` it prints ``LOGGED`` and reads a line from stdin (the test
has seen the parent's worker send its first request, which the proxy holds). Then it forks two
children: one uses the sink it inherited (run ``inherited``), another makes a sink of its own
(run ``own``). Each child's run takes 300 steps and ends FINISHED; the child returns at once.
The parent joins them, prints ``JOINED <exit codes as JSON>``, ends its run and exits (its exit
hook closes its sink).
"""

from __future__ import annotations

import json
import multiprocessing
import sys

from agentkit import make_sink, say, step

URI, EXPERIMENT = sys.argv[1:3]
FORK_AT = sys.argv[3] if len(sys.argv) > 3 else "flushed"


def log(sink: object, run_id: str) -> None:
    sink.on_run_start(run_id, task="t", environment="e", params={})  # type: ignore[attr-defined]
    for number in range(300):
        step(sink, run_id, number)  # type: ignore[arg-type]
    result = {"completed": True, "steps": 300, "total_reward": 300.0}
    sink.on_run_end(run_id, result=result, run_path=None)  # type: ignore[attr-defined]


def inherited() -> None:
    log(SINK, "inherited")


def own() -> None:
    log(make_sink(URI, EXPERIMENT), "own")


SINK = make_sink(URI, EXPERIMENT)


def main() -> None:
    SINK.on_run_start("parent", task="t", environment="e", params={})
    if FORK_AT == "line":  # the parent's worker waits for an answer when the children are forked
        say("LOGGED")
        sys.stdin.readline()
    elif not SINK.flush(120):  # the parent's worker idle when the children are forked
        raise SystemExit("the parent's run was not sent")
    context = multiprocessing.get_context("fork")
    children = [context.Process(target=target) for target in (inherited, own)]
    for child in children:
        child.start()
    for child in children:
        child.join(120)
    say("JOINED", json.dumps([child.exitcode for child in children]))
    SINK.on_run_end("parent", result={"completed": True, "steps": 0}, run_path=None)


if __name__ == "__main__":
    main()

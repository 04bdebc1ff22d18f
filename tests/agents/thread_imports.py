"""The modules a sink's threads import: none, once the sink is built.

Usage: thread_imports.py TRACKING_URI EXPERIMENT

The sink is built, then every module imported on a thread other than the main one is noted (an
audit hook: ``import`` is raised only for a module not imported yet). A run of 300 steps is
logged, ended FINISHED and flushed; the process prints ``IMPORTED <(thread, module) as JSON>``
and exits (its exit hook closes the sink).
"""

from __future__ import annotations

import json
import sys
import threading

from agentkit import make_sink, say, step

imported: list[tuple[str, str]] = []


def note(event: str, args: tuple[object, ...]) -> None:
    if event == "import" and threading.current_thread() is not threading.main_thread():
        imported.append((threading.current_thread().name, str(args[0])))


def main() -> None:
    uri, experiment = sys.argv[1:3]
    sink = make_sink(uri, experiment)
    sys.addaudithook(note)
    sink.on_run_start("run", task="t", environment="e", params={})
    for number in range(300):
        step(sink, "run", number)
    sink.on_run_end("run", result={"completed": True, "steps": 300}, run_path=None)
    if not sink.flush(120):
        raise SystemExit("the run was not sent")
    say("IMPORTED", json.dumps(imported))


if __name__ == "__main__":
    main()

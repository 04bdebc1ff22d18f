"""A run whose create the server holds past the request timeout, while the journal's disk fills up.

Usage: disk_full_lost_create.py TRACKING_URI EXPERIMENT QUEUE_SIZE STEPS LIMIT_KIB

``ulimit -f`` as in ``disk_full.py``: past LIMIT_KIB KiB, every write to a file fails. The
journal allocates its first segment (256 KiB) in full, and the next one (1 MiB) once a quarter of
the first is used: with 16 KiB it has no journal from the start, with 512 KiB its disk fills up
mid-run. The sink has a 1 s request timeout. A first run is sent (the experiment exists):
``READY``. On a line from stdin (the test has made the proxy hold the next create), run ``full``
starts, takes ten steps and a flush is asked for without waiting: ``STARTED <json>`` (the sink's
journal problem so far, or null). On the next line (the sink is looking for the run by key), the
rest of its STEPS steps are taken, during which the disk fills up, and the agent prints ``FILLED
<json>`` (the journal problem, if any); the run ends FINISHED, the sink is closed and the agent
prints ``STATUS <json>`` (its status after close).
"""

from __future__ import annotations

import json
import resource
import sys
import threading
import time

from agentkit import say, sink_with_a_first_run, step


def main() -> None:
    uri, experiment, queue_size, steps, limit_kib = sys.argv[1:6]
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit_kib) * 1024, hard))
    sink = sink_with_a_first_run(
        uri, experiment, queue_size=int(queue_size), request_timeout=1.0, shutdown_timeout=30.0
    )
    sink.on_run_start("full", task="t", environment="e", params={})
    for number in range(10):
        step(sink, "full", number)
    threading.Thread(target=sink.flush, args=(120,), daemon=True).start()
    say("STARTED", json.dumps(sink.status().get("journal_problem")))
    sys.stdin.readline()
    for number in range(10, int(steps)):
        step(sink, "full", number)
        if number % 100 == 0:
            time.sleep(0.001)  # the model thinking: the disk fills up while the run goes on
    say("FILLED", json.dumps(sink.status().get("journal_problem")))
    sink.on_run_end("full", result={"completed": True, "steps": int(steps)}, run_path=None)
    sink.close()
    say("STATUS", json.dumps(sink.status(), default=str))


if __name__ == "__main__":
    main()

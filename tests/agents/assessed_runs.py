"""Root runs whose assessments may not be written before a kill -9.

Usage: assessed_runs.py TRACKING_URI EXPERIMENT COUNT

Runs ``scored-0`` .. ``scored-<COUNT-1>``, each with two steps, ending with
``total_reward = index`` and ``completed = index is even``; flushes: ``FLUSHED <status>``. Then
waits to be killed.
"""

from __future__ import annotations

import json
import sys
import threading

from agentkit import make_sink, say, step


def main() -> None:
    uri, experiment, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    sink = make_sink(uri, experiment, retry_deadline=1.0)
    for index in range(count):
        run_id = f"scored-{index}"
        sink.on_run_start(run_id, task="t", environment="e", params={})
        for number in range(2):
            step(sink, run_id, number)
        result = {"completed": index % 2 == 0, "steps": 2, "total_reward": float(index)}
        sink.on_run_end(run_id, result=result, run_path=None)
    sink.flush(60)
    say("FLUSHED", json.dumps(sink.status()))
    threading.Event().wait(120)


if __name__ == "__main__":
    main()

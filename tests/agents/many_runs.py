"""Many runs against a server that takes none of them, then killed.

Usage: many_runs.py TRACKING_URI EXPERIMENT RUNS STEPS OPEN

Runs ``run-0`` .. ``run-<RUNS-1>`` with STEPS steps each, ends all but the last OPEN of them,
says ``JOURNALED`` once every hook has returned, then waits to be killed.
"""

from __future__ import annotations

import sys
import threading

from agentkit import make_sink, say, step


def main() -> None:
    uri, experiment = sys.argv[1], sys.argv[2]
    runs, steps, left_open = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    sink = make_sink(uri, experiment, retry_deadline=2.0)
    for index in range(runs):
        run_id = f"run-{index}"
        sink.on_run_start(run_id, task="t", environment="e", params={"index": index})
        for number in range(steps):
            step(sink, run_id, number)
        if index < runs - left_open:
            result = {"completed": True, "steps": steps, "total_reward": float(index)}
            sink.on_run_end(run_id, result=result, run_path=None)
    say("JOURNALED")
    threading.Event().wait(300)


if __name__ == "__main__":
    main()

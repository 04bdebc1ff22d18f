"""An agent that steps every few milliseconds until it is killed.

Usage: crash_steps.py TRACKING_URI EXPERIMENT RUN_ID

After each ``on_step`` has returned it prints ``STEP n``: from then on step ``n`` is the sink's
responsibility, whatever happens to the process.
"""

from __future__ import annotations

import sys
import time

from agentkit import make_sink, say, step


def main() -> None:
    uri, experiment, run_id = sys.argv[1:4]
    sink = make_sink(uri, experiment)
    sink.on_run_start(run_id, task="crash", environment="e", params={})
    number = 0
    while True:
        step(sink, run_id, number)
        say("STEP", number)
        number += 1
        time.sleep(0.004)  # the model thinking


if __name__ == "__main__":
    main()

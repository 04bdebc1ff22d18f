"""An agent that goes on stepping for a while after SIGTERM (whose action is to die).

Usage: steps_through_sigterm.py TRACKING_URI EXPERIMENT RUN_ID STEPS

It steps every 4 ms and prints ``STEP n`` after each ``on_step`` has returned; the test sends
SIGTERM while it steps. After STEPS steps it prints ``DONE`` and waits, its run still open,
until the signal's default action ends the process.
"""

from __future__ import annotations

import sys
import threading
import time

from agentkit import make_sink, say, step


def main() -> None:
    uri, experiment, run_id, count = sys.argv[1:5]
    sink = make_sink(uri, experiment, shutdown_timeout=10.0)
    sink.on_run_start(run_id, task="through", environment="e", params={})
    for number in range(int(count)):
        step(sink, run_id, number)
        say("STEP", number)
        time.sleep(0.004)  # the model thinking
    say("DONE")
    threading.Event().wait(120)
    say("SURVIVED")


if __name__ == "__main__":
    main()

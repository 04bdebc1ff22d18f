"""An agent inside a session: one run that ends, then one that steps until it is killed.

Usage: session_turns.py TRACKING_URI EXPERIMENT

Prints ``STEP n`` after each step of the second run has returned from its hook.
"""

from __future__ import annotations

import sys
import time

from agentkit import make_sink, say, step

import rlm_mlflow


def main() -> None:
    uri, experiment = sys.argv[1:3]
    sink = make_sink(uri, experiment)
    with rlm_mlflow.session("night-shift", user="ada"):
        sink.on_run_start("ended", task="a turn that ends", environment="generic", params={})
        step(sink, "ended", 0)
        sink.on_run_end("ended", result={"completed": True}, run_path=None)
        sink.on_run_start("killed", task="a turn cut short", environment="generic", params={})
        number = 0
        while True:
            step(sink, "killed", number)
            say("STEP", number)
            number += 1
            time.sleep(0.01)  # the model thinking


if __name__ == "__main__":
    main()

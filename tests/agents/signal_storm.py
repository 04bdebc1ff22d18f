"""A program with its own SIGTERM handler that builds and closes sinks in a loop.

Usage: signal_storm.py TRACKING_URI EXPERIMENT ROUNDS

The test sends SIGTERM as fast as it can while this runs. The program's handler only counts: the
program must go on, and finish, printing ``DONE <signals counted>``; it then exits when a line
arrives on stdin.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType

from agentkit import make_sink, say, step

received = 0


def count(signum: int, frame: FrameType | None) -> None:
    global received
    received += 1


def main() -> None:
    uri, experiment, rounds = sys.argv[1:4]
    signal.signal(signal.SIGTERM, count)
    say("READY")
    for n in range(int(rounds)):
        sink = make_sink(uri, experiment, shutdown_timeout=5.0)
        if n % 10 == 0:  # every tenth sink logs a run, so its close has work to do
            sink.on_run_start(f"storm-{n}", task="t", environment="e", params={})
            step(sink, f"storm-{n}", 0)
            sink.on_run_end(f"storm-{n}", result={"completed": True}, run_path=None)
        sink.close()
        say("ROUND", n)
    say("DONE", received)
    # Exit only when told: a signal still on its way must reach our handler, not the default
    # action that interpreter shutdown puts back.
    sys.stdin.readline()


if __name__ == "__main__":
    main()

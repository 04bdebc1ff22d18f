"""A run that ends while another run, started beside it, goes on: the ended run's start stays
in a segment kept for the open run's start, its end in a later segment that is removed once
sent. Then it waits to be killed.

Usage: end_in_removed_segment.py TRACKING_URI EXPERIMENT

Prints ``READY`` once "done" is sent and ended, and the segment that held its end is gone.
"""

from __future__ import annotations

import sys
import time

from agentkit import make_sink, say, step

import rlm_mlflow._journal

DEADLINE = 120.0


def main() -> None:
    uri, experiment = sys.argv[1:3]
    rlm_mlflow._journal.FIRST_SEGMENT = 4096  # small segments: they fill after a few steps
    rlm_mlflow._journal.MAX_SEGMENT = 4096
    sink = make_sink(uri, experiment)
    sink.on_run_start("done", task="t", environment="e", params={})
    sink.on_run_start("open", task="t", environment="e", params={})
    for number in range(3):
        step(sink, "done", number)
    journal = sink._pipeline.journal
    assert journal is not None
    lane = journal._local.lane.lane
    number = 0
    while len(lane.segments) < 2:  # both starts stay behind, in the first segment
        step(sink, "open", number)
        number += 1
    sink.on_run_end("done", result={"completed": True, "steps": 3}, run_path=None)
    ended_in = lane.segment
    while len(lane.segments) < 3:  # the segment with the end is sealed
        step(sink, "open", number)
        number += 1
    deadline = time.monotonic() + DEADLINE
    while not (ended_in.removed and not ended_in.path.exists()):
        sink.flush(5.0)
        if time.monotonic() > deadline:
            raise SystemExit("the segment holding the end was never removed")
    say("READY", number)
    while True:
        time.sleep(1.0)


if __name__ == "__main__":
    main()

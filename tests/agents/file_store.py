"""Part of a run flushed to a file store, the rest only logged, then the test kills it.

Usage: file_store.py TRACKING_URI EXPERIMENT

Steps 0..19 are flushed (MLflow has them), steps 20..39 are logged after; then ``READY``.
"""

from __future__ import annotations

import sys
import threading

from agentkit import make_sink, say, step


def main() -> None:
    uri, experiment = sys.argv[1:3]
    sink = make_sink(uri, experiment, flush_interval=60.0)
    sink.on_run_start("filed", task="t", environment="e", params={})
    for number in range(20):
        step(sink, "filed", number)
    if not sink.flush(120):
        raise SystemExit("the first steps were not sent")
    for number in range(20, 40):
        step(sink, "filed", number)
    say("READY")
    threading.Event().wait(120)


if __name__ == "__main__":
    main()

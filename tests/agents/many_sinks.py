"""Several sinks in one process, each with a run left open, then the process ends.

Usage: many_sinks.py MODE TRACKING_URI EXPERIMENT SINKS SHUTDOWN_TIMEOUT

Each sink ``n`` opens run ``sink-n`` and logs steps 0..4, which are flushed, then steps 5..9,
which are not yet. The agent prints ``READY``, then with MODE ``exit`` returns from main (a normal
exit) and with MODE ``wait`` waits until a signal ends it.
"""

from __future__ import annotations

import sys
import threading

from agentkit import make_sink, say, step


def main() -> None:
    mode, uri, experiment, count, timeout = sys.argv[1:6]
    sinks = [
        make_sink(uri, experiment, shutdown_timeout=float(timeout), flush_interval=60.0)
        for _ in range(int(count))
    ]
    for n, sink in enumerate(sinks):
        sink.on_run_start(f"sink-{n}", task="t", environment="e", params={})
        for number in range(5):
            step(sink, f"sink-{n}", number)
    for sink in sinks:
        if not sink.flush(120):
            raise SystemExit("the first steps were not sent")
    for n, sink in enumerate(sinks):
        for number in range(5, 10):
            step(sink, f"sink-{n}", number)
    say("READY")
    if mode == "wait":
        threading.Event().wait(120)
        say("NOT STOPPED")


if __name__ == "__main__":
    main()

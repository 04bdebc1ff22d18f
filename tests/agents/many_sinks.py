"""Several sinks in one process, each with a run left open, then the process ends.

Usage: many_sinks.py MODE TRACKING_URI EXPERIMENT SINKS SHUTDOWN_TIMEOUT

Each sink ``n`` opens run ``sink-n`` and logs steps 0..4, which are flushed, then steps 5..9,
which are not yet. The agent prints ``READY``, then with MODE ``exit`` returns from main (a normal
exit), with MODE ``wait`` waits until a signal ends it, and with MODE ``hook`` logs step 10 of
``sink-0`` as an event that sends the process SIGTERM as the sink reads it (the signal arrives
inside the hook), then waits.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator, Mapping
from typing import Any

from agentkit import make_sink, say, step


class BombEvent(Mapping[str, Any]):
    """Step 10, whose first read by the sink sends SIGTERM to the process."""

    fired = False

    def __init__(self) -> None:
        self._data = {"step": 10, "reward": 1.0}

    def _fire(self) -> None:
        if not BombEvent.fired:
            BombEvent.fired = True
            os.kill(os.getpid(), signal.SIGTERM)

    def __getitem__(self, key: str) -> Any:
        self._fire()
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        self._fire()
        return iter(self._data)

    def __len__(self) -> int:
        self._fire()
        return len(self._data)


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
    if mode == "hook":
        event: Any = BombEvent()  # a Mapping, as RLM runtimes may hand over
        sinks[0].on_step("sink-0", event=event, cumulative_reward=11.0)
    if mode in ("wait", "hook"):
        threading.Event().wait(120)
        say("NOT STOPPED")


if __name__ == "__main__":
    main()

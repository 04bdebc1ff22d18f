"""An agent that receives SIGTERM (or SIGINT) while its main thread is inside a hook.

Usage: signal_in_hook.py TRACKING_URI EXPERIMENT KIND [SIGNAL]

The run ``hooked`` gets ten steps, which are flushed; the agent prints ``ARMED`` and calls one
more hook carrying a value that sends SIGTERM to the process the moment the sink touches it
(converts it, prints it, reads a key from it). KIND says where that value sits:

- ``reward``: the step's reward, ``step``: the step number, ``cumulative``: the cumulative reward,
- ``param``: a param of a new run's start, ``event``: the event itself (a Mapping whose reads
  send the signal).

SIGNAL is ``SIGTERM`` (the default) or ``SIGINT``; its action is Python's default: the process
must die of it (SIGINT: of the KeyboardInterrupt it raises), after the sink ended the run KILLED.
"""

from __future__ import annotations

import numbers
import os
import signal
import sys
import threading
from collections.abc import Iterator, Mapping
from typing import Any

from agentkit import make_sink, say, step

_fired = threading.Event()
_signal = signal.Signals[sys.argv[4]] if len(sys.argv) > 4 else signal.SIGTERM


def _fire() -> None:
    if not _fired.is_set():
        _fired.set()
        os.kill(os.getpid(), _signal)


class Bomb:
    """A number-like value that sends SIGTERM the first time anything converts it."""

    def __float__(self) -> float:
        _fire()
        return 10.0  # as a step: the next one, not a second step 1

    def __int__(self) -> int:
        _fire()
        return 10

    def __index__(self) -> int:
        _fire()
        return 10

    def __str__(self) -> str:
        _fire()
        return "bomb"

    def __repr__(self) -> str:
        _fire()
        return "Bomb()"

    def __format__(self, spec: str) -> str:
        _fire()
        return "bomb"


numbers.Real.register(Bomb)


class BombEvent(Mapping[str, Any]):
    """An event whose every read sends SIGTERM."""

    def __init__(self) -> None:
        self._data = {"step": 10, "reward": 1.0}

    def __getitem__(self, key: str) -> Any:
        _fire()
        return self._data[key]

    def get(self, key: str, default: Any = None) -> Any:
        _fire()
        return self._data.get(key, default)

    def __iter__(self) -> Iterator[str]:
        _fire()
        return iter(self._data)

    def __len__(self) -> int:
        _fire()
        return len(self._data)


def main() -> None:
    uri, experiment, kind = sys.argv[1:4]
    # SIGINT raises KeyboardInterrupt, as in a terminal, whatever this process inherited (a
    # program started in the background by a shell has SIGINT ignored, and so its children).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sink = make_sink(uri, experiment, shutdown_timeout=2.0)
    sink.on_run_start("hooked", task="t", environment="e", params={"kind": kind})
    for number in range(10):
        step(sink, "hooked", number)
    if not sink.flush(30):
        raise SystemExit("the first ten steps were not sent")
    say("ARMED")
    bomb: Any = Bomb()
    if kind == "reward":
        sink.on_step("hooked", event={"step": 10, "reward": bomb}, cumulative_reward=11.0)
    elif kind == "step":
        sink.on_step("hooked", event={"step": bomb, "reward": 1.0}, cumulative_reward=11.0)
    elif kind == "cumulative":
        sink.on_step("hooked", event={"step": 10, "reward": 1.0}, cumulative_reward=bomb)
    elif kind == "param":
        sink.on_run_start("other", task="t", environment="e", params={"x": bomb})
    elif kind == "event":
        event: Any = BombEvent()
        sink.on_step("hooked", event=event, cumulative_reward=11.0)
    else:
        raise SystemExit(f"unknown kind {kind}")
    say("RETURNED")  # the hook returned, whatever the signal did inside it
    # Still alive: the value was never touched on this thread, or the handler returned.
    # Touch it here, outside any hook, so the signal arrives in every case.
    _fire()
    say("SIGNALLED")
    threading.Event().wait(60)
    say("SURVIVED")


if __name__ == "__main__":
    main()

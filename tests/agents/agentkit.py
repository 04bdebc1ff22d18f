"""What every agent script shares: saying where it is on stdout, and a quick sink."""

from __future__ import annotations

import faulthandler
import signal
import sys
from typing import Any

from rlm_mlflow import MLflowSink

#: Every thread's stack on stderr when the test finds the agent hung (see ``Agent.wait``).
faulthandler.register(signal.SIGUSR2, all_threads=True)


def say(*words: object) -> None:
    """One line on stdout, flushed at once: the test waits for these with a deadline."""
    sys.stdout.write(" ".join(str(w) for w in words) + "\n")
    sys.stdout.flush()


def make_sink(uri: str, experiment: str, **kwargs: Any) -> MLflowSink:
    """An enabled sink with quick drains and retries; keyword arguments override."""
    settings: dict[str, Any] = {
        "flush_interval": 0.2,
        "retry_initial": 0.05,
        "retry_max_wait": 0.5,
        **kwargs,
    }
    return MLflowSink(enabled=True, experiment=experiment, tracking_uri=uri, **settings)


def sink_with_a_first_run(uri: str, experiment: str, **kwargs: Any) -> MLflowSink:
    """:func:`make_sink`, once a first run was sent (the experiment exists, the worker runs):
    then ``READY``, and on a line from stdin (the test has set its faults) the sink is returned."""
    sink = make_sink(uri, experiment, **kwargs)
    sink.on_run_start("warm", task="t", environment="e", params={})
    sink.on_run_end("warm", result={"completed": True, "steps": 0}, run_path=None)
    if not sink.flush(120):
        raise SystemExit("the first run was not sent")
    say("READY")
    sys.stdin.readline()
    return sink


def step(sink: MLflowSink, run_id: str, number: int) -> None:
    """A step whose reward is 1.0 and whose cumulative reward is ``number + 1``."""
    sink.on_step(run_id, event={"step": number, "reward": 1.0}, cumulative_reward=number + 1.0)

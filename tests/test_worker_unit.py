"""The worker's closing accounting against an in-memory MLflow: a store that answers on cue makes
the races of a close deterministic."""

from __future__ import annotations

import ast
import contextlib
import logging
import threading
import time
import types
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

import rlm_mlflow._worker
from rlm_mlflow import MLflowSink, TransientError, replay
from rlm_mlflow._transports.base import (
    Metric,
    RunRef,
    begin_only_if,
    current_call,
    may_begin,
)
from rlm_mlflow.testing import MemoryTransport, wait_for

FAST: dict[str, Any] = {"flush_interval": 0.05, "retry_initial": 0.01, "retry_max_wait": 0.05}
WAIT = 60.0


class Gated(MemoryTransport):
    """Holds the first ``log_batch`` until ``batch_gate`` opens, and the creation of run ``b``
    until ``create_gate`` opens."""

    def __init__(self) -> None:
        super().__init__()
        self.in_batch = threading.Event()
        self.batch_gate = threading.Event()
        self.create_gate = threading.Event()

    def log_batch(
        self,
        run_uuid: str,
        *,
        metrics: Sequence[Metric] = (),
        params: Sequence[tuple[str, str]] = (),
        tags: Sequence[tuple[str, str]] = (),
    ) -> None:
        if not self.in_batch.is_set():
            self.in_batch.set()
            self.batch_gate.wait(WAIT)
        super().log_batch(run_uuid, metrics=metrics, params=params, tags=tags)

    def create_run(
        self,
        experiment_id: str,
        *,
        run_name: str,
        start_time_ms: int,
        tags: Sequence[tuple[str, str]],
    ) -> RunRef:
        if dict(tags).get("run_id") == "b":
            self.create_gate.wait(WAIT)
        return super().create_run(
            experiment_id, run_name=run_name, start_time_ms=start_time_ms, tags=tags
        )


def step(sink: MLflowSink, run_id: str, number: int) -> None:
    sink.on_step(run_id, event={"step": number, "reward": 1.0}, cumulative_reward=1.0)


def test_a_close_deadline_during_the_ends_sent_first_counts_each_event_once(
    tmp_path: Path,
) -> None:
    """At a close, run starts and ends spilled to the journal are sent ahead of the steps. When
    the deadline comes while they are out, each of them is counted once (kept for replay), not
    once as unsettled and again as unread in the journal: accepted == sent + deferred +
    dropped, nothing pending."""
    memory = Gated()
    sink = MLflowSink(
        enabled=True,
        experiment="unit",
        transport=memory,
        queue_size=10,
        journal_dir=tmp_path,
        **FAST,
    )
    try:
        sink.on_run_start("a", task="t", environment="e", params={})
        step(sink, "a", 0)
        assert memory.in_batch.wait(WAIT)  # the worker is held in a request
        for number in range(1, 40):  # ten wait in memory, the rest spill to the journal
            step(sink, "a", number)
        sink.on_run_start("b", task="t", environment="e", params={})
        for number in range(5):
            step(sink, "b", number)
        sink.on_run_end("b", result={"completed": True}, run_path=None)
        assert sink.statistics().spilled > 0
        closer = threading.Thread(target=sink.close, args=(1.0,))
        closer.start()
        assert wait_for(lambda: sink._worker.close_requested, WAIT)
        memory.batch_gate.set()  # the close goes on: run b's creation never answers in time
        closer.join(WAIT)
        assert not closer.is_alive()
        assert wait_for(sink._worker.stopped.is_set, WAIT)
    finally:
        memory.batch_gate.set()
        memory.create_gate.set()
        sink.close(1.0)
    stats = sink.statistics()
    fates = stats.sent + stats.deferred + sum(stats.dropped.values())
    assert stats.accepted == 1 + 40 + 1 + 5 + 1
    assert fates == stats.accepted, stats
    assert stats.pending == 0


def test_closing_does_not_wait_for_hooks_turned_away(tmp_path: Path) -> None:
    """A hook that found the sink closed appends nothing: closing never waits for it, however
    many keep coming (threads hooking in a loop while close() runs)."""
    memory = MemoryTransport()
    sink = MLflowSink(
        enabled=True, experiment="unit", transport=memory, journal_dir=tmp_path, **FAST
    )
    sink.on_run_start("a", task="t", environment="e", params={})
    sink.close(WAIT)
    pipeline = sink._pipeline
    inside, leave = threading.Event(), threading.Event()
    warn = pipeline.warnings.warn

    def held_warn(*args: Any, **kwargs: Any) -> None:  # the refusal, paused half-way
        inside.set()
        leave.wait(WAIT)
        warn(*args, **kwargs)

    pipeline.warnings.warn = held_warn  # type: ignore[method-assign]
    late = threading.Thread(target=step, args=(sink, "a", 0))
    late.start()
    try:
        assert inside.wait(WAIT)
        assert pipeline.quiet()
    finally:
        leave.set()
        late.join(WAIT)
    assert sink.statistics().dropped == {"after_close": 1}


class SlowSteps(MemoryTransport):
    """Requests carrying many points never answer before ``gate`` opens; the rest do at once."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.held = threading.Event()  # a request is waiting for the gate

    def log_batch(
        self,
        run_uuid: str,
        *,
        metrics: Sequence[Metric] = (),
        params: Sequence[tuple[str, str]] = (),
        tags: Sequence[tuple[str, str]] = (),
    ) -> None:
        if len(metrics) > 20:
            self.held.set()
            self.gate.wait(WAIT)
        super().log_batch(run_uuid, metrics=metrics, params=params, tags=tags)


def asleep_until_closed(memory: MemoryTransport, journal_dir: Path) -> MLflowSink:
    """A sink whose worker sends only when flushed or closed, and retries quickly."""
    return MLflowSink(
        enabled=True,
        experiment="unit",
        transport=memory,
        journal_dir=journal_dir,
        flush_interval=60.0,
        batch_trigger=10**9,
        retry_initial=0.01,
        retry_max_wait=0.05,
    )


@contextlib.contextmanager
def closed_in_3_s(sink: MLflowSink, memory: SlowSteps) -> Iterator[None]:
    """Around a test's hooks: then ``close(3.0)``, waited for until the worker stops; whatever
    happens, the held requests are let go and the sink closed."""
    try:
        yield
        sink.close(3.0)
        assert wait_for(sink._worker.stopped.is_set, WAIT)
    finally:
        memory.gate.set()
        sink.close(1.0)


class SlowToStore(MemoryTransport):
    """Stores a batch of step points ``store_in`` seconds after it comes, or once ``gate``
    opens (a server slow to store points: its database lock held by a trace write); ``order``
    notes when each run's steps are stored and when it is ended."""

    def __init__(self, store_in: float) -> None:
        super().__init__()
        self.store_in = store_in
        self.gate = threading.Event()
        self.order: list[tuple[str, str]] = []

    def log_batch(
        self,
        run_uuid: str,
        *,
        metrics: Sequence[Metric] = (),
        params: Sequence[tuple[str, str]] = (),
        tags: Sequence[tuple[str, str]] = (),
    ) -> None:
        steps = any(m.key == "step_reward" for m in metrics)
        if steps:
            self.gate.wait(self.store_in)  # the server at work, not a wait of the test's
        super().log_batch(run_uuid, metrics=metrics, params=params, tags=tags)
        if steps:
            self.order.append(("stored", self.runs[run_uuid].tags["run_id"]))

    def set_terminated(self, run_uuid: str, *, status: str, end_time_ms: int) -> None:
        self.order.append(("end", self.runs[run_uuid].tags["run_id"]))
        super().set_terminated(run_uuid, status=status, end_time_ms=end_time_ms)


@pytest.mark.parametrize(
    ("store_in", "timeout", "end_after_steps"),
    [(1.0, 30.0, True), (WAIT, 2.0, False)],
    ids=["the deadline leaves time", "the deadline is too short"],
)
def test_a_close_ends_a_run_after_its_steps_unless_its_deadline_would_pass(
    tmp_path: Path, store_in: float, timeout: float, end_after_steps: bool
) -> None:
    """Closing against a deadline, a run's end goes after its last batch's answer (its steps
    and summary stored: a reader never sees it ended without them) while the deadline leaves
    time for the end after that; only when it does not does the end go beside the batch, so
    that the run still ends in MLflow (its points kept for replay if they miss the deadline).
    Before, every close against a deadline sent the end beside the batch."""
    memory = SlowToStore(store_in)
    sink = asleep_until_closed(memory, tmp_path)
    try:
        sink.on_run_start("warm", task="t", environment="e", params={})
        sink.on_run_end("warm", result={"completed": True, "steps": 0}, run_path=None)
        assert sink.flush(WAIT)
        sink.on_run_start("r", task="t", environment="e", params={})
        for number in range(5):
            step(sink, "r", number)
        sink.on_run_end("r", result={"completed": True, "steps": 5}, run_path=None)
        sink.close(timeout)
        assert wait_for(sink._worker.stopped.is_set, WAIT)
    finally:
        memory.gate.set()
        sink.close(1.0)
    assert memory.one("r").status == "FINISHED"
    order = [what for what in memory.order if what[1] == "r"]
    if end_after_steps:
        assert order == [("stored", "r"), ("end", "r")]
        assert len(memory.one("r").history("step_reward")) == 5
        assert sink.status()["deferred"] == 0
    else:
        assert order[0] == ("end", "r"), order  # in time, the batch still out
        stats = sink.statistics()
        assert stats.accepted == stats.sent + stats.deferred + sum(stats.dropped.values())
        assert stats.deferred >= 5


def test_a_close_too_short_for_many_runs_of_a_few_hundred_steps_ends_them_all_first(
    tmp_path: Path,
) -> None:
    """Three runs of 300 steps each wait when close() comes and the steps' requests do not
    answer in time: each run still ends (FINISHED) at the store, its steps kept for replay."""
    memory = SlowSteps()
    sink = asleep_until_closed(memory, tmp_path)
    with closed_in_3_s(sink, memory):
        sink.on_run_start("warm", task="t", environment="e", params={})
        assert sink.flush(WAIT)  # the worker is up, and asleep until close() wakes it
        for name in ("a", "b", "c"):
            sink.on_run_start(name, task="t", environment="e", params={})
            for number in range(300):
                step(sink, name, number)
            sink.on_run_end(name, result={"completed": True, "steps": 300}, run_path=None)
    for name in ("a", "b", "c"):
        assert memory.one(name).status == "FINISHED"
    stats = sink.statistics()
    assert stats.accepted == stats.sent + stats.deferred + sum(stats.dropped.values())
    assert stats.deferred >= 900


def test_a_cycle_taken_over_at_the_close_lets_the_ends_that_came_after_it_go_first(
    tmp_path: Path,
) -> None:
    """A cycle took run "a" whole and the first steps of "b", and waits on a server that holds
    their steps; "b"'s end and all of "c" come after it. The close takes the cycle over: every
    run's start and end go ahead of any step, so all three end FINISHED in time, the steps are
    kept for replay, and nothing is counted twice."""
    memory = SlowSteps()
    sink = asleep_until_closed(memory, tmp_path)
    with closed_in_3_s(sink, memory):
        sink.on_run_start("warm", task="t", environment="e", params={})
        assert sink.flush(WAIT)
        sink.on_run_start("a", task="t", environment="e", params={})
        for number in range(300):
            step(sink, "a", number)
        sink.on_run_end("a", result={"completed": True, "steps": 300}, run_path=None)
        sink.on_run_start("b", task="t", environment="e", params={})
        for number in range(100):
            step(sink, "b", number)
        sink._request_flush()  # a normal cycle takes them and waits for the slow requests
        assert memory.held.wait(WAIT)
        for number in range(100, 300):
            step(sink, "b", number)
        sink.on_run_end("b", result={"completed": True, "steps": 300}, run_path=None)
        sink.on_run_start("c", task="t", environment="e", params={})
        for number in range(300):
            step(sink, "c", number)
        sink.on_run_end("c", result={"completed": True, "steps": 300}, run_path=None)
    for name in ("a", "b", "c"):
        assert memory.one(name).status == "FINISHED", name
    stats = sink.statistics()
    assert stats.accepted == stats.sent + stats.deferred + sum(stats.dropped.values())


@pytest.mark.parametrize("steps", [600, 100], ids=["long cycle", "short cycle"])
def test_a_close_during_a_cycle_held_by_the_server_takes_it_over_and_ends_the_run_first(
    tmp_path: Path, steps: int
) -> None:
    """close() comes while the worker waits for the answer to a request carrying a run's steps
    and its end, which the server does not give before the close's deadline. A long cycle (600
    steps, more than one round of requests) is taken over at once, a short one (100 steps) once
    its time is up: either way the run's end goes first and reaches the store in time, the
    steps are kept for replay, and nothing is counted twice."""
    memory = SlowSteps()
    sink = asleep_until_closed(memory, tmp_path)
    with closed_in_3_s(sink, memory):
        sink.on_run_start("warm", task="t", environment="e", params={})
        assert sink.flush(WAIT)
        sink.on_run_start("held", task="t", environment="e", params={})
        for number in range(steps):
            step(sink, "held", number)
        sink.on_run_end("held", result={"completed": True, "steps": steps}, run_path=None)
        sink._request_flush()  # a normal cycle takes it all and waits for the slow request
        assert memory.held.wait(WAIT)
    assert memory.one("held").status == "FINISHED"
    stats = sink.statistics()
    assert stats.accepted == stats.sent + stats.deferred + sum(stats.dropped.values())
    assert stats.deferred >= steps


class HeldBatches(MemoryTransport):
    """Once ``hold`` is set, every ``log_batch`` waits for ``gate`` before it is stored: a
    server stuck writing points, that stores them after the client gave up on the answer."""

    def __init__(self) -> None:
        super().__init__()
        self.hold = threading.Event()
        self.gate = threading.Event()
        self.stored_late = threading.Event()
        self.steps_sent: list[int] = []  # the step of every step_reward point sent, stored or not

    def log_batch(
        self,
        run_uuid: str,
        *,
        metrics: Sequence[Metric] = (),
        params: Sequence[tuple[str, str]] = (),
        tags: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.steps_sent.extend(m.step for m in metrics if m.key == "step_reward")
        held = self.hold.is_set()
        if held:
            self.gate.wait(WAIT)
        super().log_batch(run_uuid, metrics=metrics, params=params, tags=tags)
        if held:
            self.stored_late.set()


def test_a_run_whose_batch_the_server_holds_at_a_close_is_ended_in_time_then_sent_once(
    tmp_path: Path,
) -> None:
    """close() against a deadline, while the server holds the run's one batch (its steps and
    summary) past it: the run's end does not wait for that batch's answer, so the run is ended
    FINISHED in time. The held batch is stored after the sink gave up on it; replay then
    finds its points stored and the run holds each once, still FINISHED."""
    memory = HeldBatches()
    sink = asleep_until_closed(memory, tmp_path)
    try:
        sink.on_run_start("warm", task="t", environment="e", params={})
        sink.on_run_end("warm", result={"completed": True, "steps": 0}, run_path=None)
        assert sink.flush(WAIT)
        memory.hold.set()
        sink.on_run_start("held", task="t", environment="e", params={"depth": 2})
        for number in range(5):
            step(sink, "held", number)
        sink.on_run_end("held", result={"completed": True, "steps": 5}, run_path=None)
        sink.close(2.0)
        assert wait_for(sink._worker.stopped.is_set, WAIT)
        run = memory.one("held")
        assert run.status == "FINISHED"
        assert run.history("step_reward") == []  # still held in the server
    finally:
        memory.gate.set()
        sink.close(1.0)
    stats = sink.statistics()
    assert stats.accepted == stats.sent + stats.deferred + sum(stats.dropped.values())
    assert stats.deferred >= 6  # the steps and the end (its summary is in the held batch)
    assert memory.stored_late.wait(WAIT)
    memory.hold.clear()
    report = replay(tmp_path, transport=memory)
    assert report.ok, report
    run = memory.one("held")
    assert run.status == "FINISHED"
    assert [s for s, _ in run.history("step_reward")] == list(range(5))
    assert sorted(memory.steps_sent) == list(range(5))  # none sent twice
    assert [value for _, value in run.history("steps")] == [5.0]  # the summary, once
    assert run.params["depth"] == "2"


def close_while_its_create_is_out(sink: MLflowSink, out: threading.Event, seconds: float) -> None:
    """Run ``held`` (one step, ended) taken by a cycle whose create the server holds (``out``
    is set once it is), then ``close(seconds)``."""
    sink.on_run_start("held", task="t", environment="e", params={})
    step(sink, "held", 0)
    sink.on_run_end("held", result={"completed": True}, run_path=None)
    threading.Thread(target=sink.flush, args=(WAIT,), daemon=True).start()
    assert out.wait(WAIT)  # the cycle's create is out
    sink.close(seconds)


class AnsweredAfterTheGiveUp(MemoryTransport):
    """The first create of run ``held`` goes out and waits in the server until the sink gives
    its call up (a close takes the cycle over), then is committed and answered after either
    a look for the run by key has found nothing or ``late`` s have passed, whichever first: a
    queue in front of the server that answers a little after the client stopped waiting."""

    late = 0.5

    def __init__(self) -> None:
        super().__init__()
        self.out = threading.Event()
        self.looked = threading.Event()
        self.creates = 0
        self.looks = 0  # looks for a run by key sent after the create went out

    def find_runs(self, experiment_id: str, key: str) -> list[RunRef]:
        call = current_call()
        if call is not None and call.given_up:  # as the HTTP transport: never sent
            raise TransientError("the caller gave this call up; not sent")
        found = super().find_runs(experiment_id, key)
        if self.out.is_set():
            self.looks += 1
            self.looked.set()
        return found

    def create_run(self, experiment_id: str, **run: Any) -> RunRef:
        if dict(run["tags"]).get("run_id") == "held":
            self.creates += 1
            if not self.out.is_set():
                may_begin("create run")
                self.out.set()
                call = current_call()
                assert call is not None
                given_up = threading.Event()
                assert call.on_give_up(given_up.set)
                given_up.wait(WAIT)
                self.looked.wait(self.late)
                with begin_only_if(lambda: True):  # committed whatever the sink thinks now
                    return super().create_run(experiment_id, **run)
        return super().create_run(experiment_id, **run)


def test_a_create_out_when_a_close_takes_its_cycle_over_is_waited_for_and_its_run_ended(
    tmp_path: Path,
) -> None:
    """A run's create is out, held by the server, when a close with 6 s left takes the cycle
    over; its answer comes a little later, well before the deadline. The close waits for that
    answer rather than look for the run (too early: not committed yet) and create it again,
    and uses it even though the look that follows a create after a lost one is never sent
    (its call was given up): one create, no look, one run, ended FINISHED by the close with
    its step, and nothing kept for replay to look for."""
    memory = AnsweredAfterTheGiveUp()
    sink = asleep_until_closed(memory, tmp_path)
    try:
        close_while_its_create_is_out(sink, memory.out, 6.0)
    finally:
        memory.looked.set()
    runs = memory.by_name("held")
    assert [run.status for run in runs] == ["FINISHED"]
    assert [s for s, _ in runs[0].history("step_reward")] == [0]
    assert memory.creates == 1
    assert memory.looks == 0  # its answer was used, not guessed at
    assert not list(tmp_path.glob("*/late-runs.json"))
    stats = sink.statistics()
    assert stats.sent == stats.accepted


def test_the_worker_imports_nothing_above_it() -> None:
    """The process side (runtime, sink) owns the worker and passes it what it needs: the worker
    never imports them, not even inside a function."""
    tree = ast.parse(Path(rlm_mlflow._worker.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    above = {"_runtime", "_sink", "rlm_mlflow._runtime", "rlm_mlflow._sink"}
    assert not imported & above, imported & above


def test_sinks_closed_together_say_what_they_left_in_one_line(
    journal_dir: Path, caplog: Any
) -> None:
    """Closed together (at exit, on a signal), sinks that could not send say so in one warning
    with their totals and where the journals are, not one warning per sink."""
    import logging

    from rlm_mlflow import TransientError
    from rlm_mlflow._runtime import close_all

    sinks = []
    for n in range(3):
        memory = MemoryTransport()
        memory.fail = lambda call: TransientError("down")
        sink = MLflowSink(enabled=True, transport=memory, flush_interval=0.05, retry_initial=0.05)
        sink.on_run_start(f"r{n}", task="t", environment="e", params={})
        for i in range(4):
            sink.on_step(f"r{n}", event={"step": i, "reward": 1.0}, cumulative_reward=1.0 + i)
        sinks.append(sink)
    with caplog.at_level(logging.WARNING, logger="rlm_mlflow"):
        close_all("KILLED", 1.0)
    said = [r.getMessage() for r in caplog.records if "not sent" in r.getMessage()]
    assert len(said) == 1, said
    assert said[0].startswith("rlm-mlflow: 3 sinks stopped with 15 events not sent"), said[0]
    assert f"kept in 3 journals under {journal_dir}" in said[0]
    assert "rlm-mlflow replay" in said[0]
    assert all(sink.status()["deferred"] == 5 for sink in sinks)


def test_the_one_line_counts_the_events_kept_before_the_close_too(
    journal_dir: Path, caplog: Any
) -> None:
    """Sinks whose steps were kept for replay while they ran (every ``log_batch`` refused past
    its retry deadline, the rest taken) and are then closed together: the one warning says
    every event they left, as their ``status()`` counts them, not only those the close itself
    found waiting (it said "0 events not sent (none left unsent)")."""
    import logging

    from rlm_mlflow import TransientError
    from rlm_mlflow._runtime import close_all

    sinks = []
    for n in range(3):
        memory = MemoryTransport()
        memory.fail = lambda call: TransientError("refused") if call == "log_batch" else None
        sink = MLflowSink(
            enabled=True,
            transport=memory,
            flush_interval=0.05,
            retry_initial=0.01,
            retry_max_wait=0.02,
            retry_deadline=0.1,
        )
        sink.on_run_start(f"r{n}", task="t", environment="e", params={})
        for i in range(4):
            sink.on_step(f"r{n}", event={"step": i, "reward": 1.0}, cumulative_reward=1.0 + i)
        sinks.append(sink)
    assert wait_for(lambda: all(sink.status()["deferred"] >= 4 for sink in sinks), 30.0)
    with caplog.at_level(logging.WARNING, logger="rlm_mlflow"):
        close_all("KILLED", 1.0)
    left = sum(sink.status()["deferred"] for sink in sinks)
    said = [r.getMessage() for r in caplog.records if "stopped with" in r.getMessage()]
    assert len(said) == 1, said
    assert said[0].startswith(f"rlm-mlflow: 3 sinks stopped with {left} events not sent ("), said
    assert "none left unsent" not in said[0]
    assert f"kept in 3 journals under {journal_dir}" in said[0]


def test_the_time_a_drain_spends_sending_counts_toward_the_next_interval(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Drains keep a pace: the interval runs from a drain's start. A drain that spent a whole
    interval sending (the worker's clock is moved on by one while the store holds it) is
    followed at once by the next, so a step waits at most an interval and one drain's sending,
    not the sending and another whole interval."""
    offset = [0.0]
    clock = types.SimpleNamespace(**{n: getattr(time, n) for n in dir(time) if n[0] != "_"})
    clock.monotonic = lambda: time.monotonic() + offset[0]
    monkeypatch.setattr(rlm_mlflow._worker, "time", clock)
    memory = MemoryTransport()
    held, release = threading.Event(), threading.Event()

    def hold(call: str) -> None:
        if call == "log_batch" and not release.is_set():
            held.set()
            release.wait(60)

    memory.fail = hold
    with MLflowSink(
        enabled=True, transport=memory, journal_dir=tmp_path, flush_interval=3600
    ) as sink:
        sink.on_run_start("r", task="t", environment="e", params={})
        sink.on_step("r", event={"step": 0, "reward": 1.0}, cumulative_reward=1.0)
        flushing = threading.Thread(target=sink.flush, args=(60,))
        flushing.start()  # a drain now, with step 0; its log_batch is held
        assert wait_for(held.is_set, 30), "no drain reached the store"
        offset[0] = 3600.0  # the drain has been sending for a whole interval
        sink.on_step("r", event={"step": 1, "reward": 1.0}, cumulative_reward=2.0)
        release.set()
        flushing.join(60)
        assert wait_for(lambda: len(memory.one("r").history("step_reward")) == 2, 30), (
            "the next drain waited another interval"
        )
        sink.on_run_end("r", result={"completed": True}, run_path=None)


def test_points_in_doubt_are_checked_over_the_steps_they_cover_in_bounded_windows() -> None:
    """What the store holds of a lost batch is read per metric over the steps the batch
    covers, in windows of at most RANGE_STEPS steps; points scattered over more windows than
    RANGE_WINDOWS, or a store that cannot read a range, read the whole history instead."""
    from rlm_mlflow._exporters.runs import RANGE_STEPS, RANGE_WINDOWS, stored_points
    from rlm_mlflow._transports.base import Metric

    memory = MemoryTransport()
    run = memory.create_run("1", run_name="r", start_time_ms=0, tags=[]).run_uuid
    held = [Metric("a", float(step), 1, step) for step in range(0, 10 * RANGE_STEPS, 2)]
    for first in range(0, len(held), 1000):
        memory.log_batch(run, metrics=held[first : first + 1000])
    memory.calls.clear()

    batch = [Metric("a", float(step), 1, step) for step in range(RANGE_STEPS, 3 * RANGE_STEPS)]
    assert stored_points(memory, run, batch) == {m for m in batch if m.step % 2 == 0}
    assert memory.calls == ["metric_history_range"] * 2  # two windows, no whole history

    memory.calls.clear()
    scattered = [Metric("a", 0.0, 1, RANGE_STEPS * n) for n in range(RANGE_WINDOWS + 1)]
    assert stored_points(memory, run, scattered) == {m for m in scattered if m in set(held)}
    assert memory.calls == ["metric_history"]

    class NoRanges(MemoryTransport):
        def metric_history_range(
            self, run_uuid: str, key: str, start_step: int, end_step: int
        ) -> list[Metric] | None:
            self.calls.append("metric_history_range")
            return None  # an older server: no range reads

    older = NoRanges()
    older.runs, older.calls = memory.runs, []
    assert stored_points(older, run, batch) == {m for m in batch if m.step % 2 == 0}
    assert older.calls == ["metric_history_range", "metric_history"]


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.anyio
async def test_the_closing_gate_begins_few_runs_until_it_knows_what_a_run_takes(
    anyio_backend: str,
) -> None:
    """Before any create of a close has been answered, as many runs begin as requests go out at
    once; a create's answer opens the gate to all and makes a run's time three times it, until
    a run has ended: then what runs took is what counts."""
    from rlm_mlflow._runtime import task_loop
    from rlm_mlflow._worker import CLOSING_FIRST, CLOSING_RUNS, CREATE_TO_END

    gate = task_loop().gates.of("http://a:5000")
    assert task_loop().gates.of("http://a:5000") is gate  # the sinks of one loop share it ...
    assert task_loop().gates.of("http://b:5000") is not gate  # ... per server
    limiter = gate.runs()
    assert (limiter.total_tokens, gate.took) == (CLOSING_FIRST, 0.0)
    gate.created_in(0.25)
    assert (limiter.total_tokens, gate.took) == (CLOSING_RUNS, CREATE_TO_END * 0.25)
    gate.created_in(0.1)  # a guess only grows
    assert gate.took == CREATE_TO_END * 0.25
    gate.ended_in(0.5)
    assert gate.took == 0.5
    gate.created_in(1.0)  # measured now: a create no longer counts
    assert gate.took == 0.5


def test_the_closing_gate_begins_no_more_runs_than_requests_go_out_while_closing() -> None:
    """A run being sent has one request out at a time: more runs at once than the transport's
    requests in flight would queue behind each other, each taking longer than it needs, and the
    close, allowing a new run what runs take, would stop creating them early."""
    from rlm_mlflow._transports.http import CLOSING_IN_FLIGHT, MAX_IN_FLIGHT
    from rlm_mlflow._worker import CLOSING_FIRST, CLOSING_RUNS

    assert CLOSING_RUNS == CLOSING_IN_FLIGHT
    assert CLOSING_FIRST == MAX_IN_FLIGHT


def test_a_close_guesses_a_new_runs_time_from_what_creates_take_now() -> None:
    """The first runs of a close wait behind the ends of runs created before it: with 300 sinks
    at exit against a server 0.2 s away, they took 1.6 to 2 s from create to end while creates
    were answered in 0.3 s and the runs after them took 0.7 s. Measured at their ends, that
    time lags: with 2.3 s left the close stopped creating runs. A new run is now given three
    times what creates take now to be answered, when that is less (its end still goes in time:
    beside its batch, if that is late)."""
    from rlm_mlflow._worker import ClosingGate, Worker

    gate = ClosingGate()
    gate.enter(object())
    gate.created_in(0.3)
    gate.ended_in(1.6)
    worker: Any = types.SimpleNamespace(
        close_deadline=time.monotonic() + 2.3,
        _loop_gate=lambda: gate,
        caller=types.SimpleNamespace(answered_in=0.3),
    )
    assert Worker._time_to_create(worker)  # 3 x 0.3 s, x 1.5: 1.35 s of the 2.3 s left
    worker.close_deadline = time.monotonic() + 1.2
    assert not Worker._time_to_create(worker)
    gate.created_in(0.9)  # creates slow down: so does the guess (the latest few count)
    worker.close_deadline = time.monotonic() + 2.3
    assert not Worker._time_to_create(worker)


def test_a_close_begun_while_none_is_learns_afresh() -> None:
    """What a close learnt of a slow server is not the next close's: a sink that begins to
    close while no other sink of its loop is closing starts from nothing; one that joins a
    close in progress shares what it learnt."""
    from rlm_mlflow._worker import ClosingGate

    gate = ClosingGate()
    first, second, later = object(), object(), object()
    gate.enter(first)
    gate.created_in(2.0)
    gate.ended_in(7.0)
    gate.enter(second)  # joins the close in progress
    assert (gate.took, gate.ended) == (7.0, True)
    gate.done(first)
    gate.done(second)
    assert not gate.pending
    assert not gate.closing
    gate.enter(later)  # a close of its own, later
    assert (gate.took, gate.ended) == (0.0, False)


def test_event_loops_do_not_share_a_closing_gate() -> None:
    import anyio

    from rlm_mlflow._runtime import task_loop

    async def gate() -> object:
        return task_loop().gates.of(None)

    assert anyio.run(gate) is not anyio.run(gate)


class FarAway(MemoryTransport):
    """Every call is carried out ``latency`` seconds after it is made: a server far away."""

    latency = 0.5

    def _enter(self, call: str) -> None:
        time.sleep(self.latency)
        super()._enter(call)


def test_a_close_too_short_for_a_new_run_against_a_slow_server_keeps_it_for_replay(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The sink has seen its server answer in 0.5 s; a run not created yet waits when close()
    comes with 1.2 s left, less than a create, a batch and an end take one after another. Its
    create does not go out (it would be left RUNNING): the run is kept for replay, the open run
    already created is ended in time, and every event is counted once. The warning names the
    time the close was given, not ``shutdown_timeout``."""
    memory = FarAway()
    sink = asleep_until_closed(memory, tmp_path)
    try:
        sink.on_run_start("warm", task="t", environment="e", params={})
        assert sink.flush(WAIT)  # answered in 0.5 s each: the sink knows its server is slow
        sink.on_run_start("late", task="t", environment="e", params={})
        step(sink, "late", 0)
        sink.on_run_end("late", result={"completed": True, "steps": 1}, run_path=None)
        with caplog.at_level(logging.WARNING, logger="rlm_mlflow"):
            sink.close(1.2)
        assert memory.by_name("late") == []
        assert memory.one("warm").status == "FAILED"  # open at the close: ended, in time
    finally:
        sink.close(1.0)
    stats = sink.statistics()
    assert stats.accepted == stats.sent + stats.deferred + sum(stats.dropped.values())
    assert stats.deferred >= 3  # the run's start, step and end
    said = [r.getMessage() for r in caplog.records if "not sent" in r.getMessage()]
    assert len(said) == 1, said
    assert "it was given 1.2 s; shutdown_timeout is 10 s" in said[0]


class SlowSpans(Gated):
    """:class:`Gated`, and every span request takes ``spans_take`` seconds."""

    spans_take = 3.0

    def export_spans(self, experiment_id: str, run_uuid: str | None, request: bytes) -> None:
        time.sleep(self.spans_take)
        super().export_spans(experiment_id, run_uuid, request)


def test_a_close_during_a_short_cycle_ends_the_open_run_before_the_cycle_s_spans(
    tmp_path: Path,
) -> None:
    """A close with 2 s left comes while a cycle of one round (a run's first steps, its run not
    ended) waits for its batch's answer; the server then takes 3 s per span request. The rest of
    that cycle goes in the close's order: the open run is ended (FAILED) before any span of the
    cycle goes, and the spans the deadline leaves are kept for replay, each event counted once."""
    memory = SlowSpans()
    sink = asleep_until_closed(memory, tmp_path)
    flushing = threading.Thread(target=sink.flush, args=(WAIT,), daemon=True)
    closing = threading.Thread(target=sink.close, args=(2.0,), daemon=True)
    try:
        sink.on_run_start("open", task="t", environment="e", params={})
        for number in range(3):
            step(sink, "open", number)
        flushing.start()
        assert memory.in_batch.wait(WAIT)  # the cycle is out, in its runs' part
        closing.start()
        assert wait_for(lambda: sink._worker.close_deadline is not None, WAIT)
        memory.batch_gate.set()  # the cycle goes on: its spans are next
        closing.join(WAIT)
        assert not closing.is_alive()
        assert memory.one("open").status == "FAILED"
        assert memory.one("open").history("step_reward") == [(0, 1.0), (1, 1.0), (2, 1.0)]
    finally:
        memory.batch_gate.set()
        sink.close(1.0)
    stats = sink.statistics()
    assert stats.accepted == stats.sent + stats.deferred + sum(stats.dropped.values())
    assert stats.deferred >= 1  # the spans the deadline left


class HeldFirstCreate(MemoryTransport):
    """The first create of run ``held`` waits in the server until ``gate`` opens, then is
    committed (a create the sink gave up on that a queue still holds)."""

    def __init__(self) -> None:
        super().__init__()
        self.out = threading.Event()
        self.gate = threading.Event()

    def create_run(self, experiment_id: str, **run: Any) -> RunRef:
        if dict(run["tags"]).get("run_id") == "held" and not self.out.is_set():
            may_begin("create run")  # the request goes out; its answer waits for the gate
            self.out.set()
            self.gate.wait(WAIT)
            with begin_only_if(lambda: True):  # committed whatever the sink thinks now
                return super().create_run(experiment_id, **run)
        return super().create_run(experiment_id, **run)


def test_a_create_out_when_a_close_takes_its_cycle_over_is_left_for_replay_to_find(
    tmp_path: Path,
) -> None:
    """A run's create is out, held by the server past the deadline, when a close with 3 s left
    takes the cycle over: the close waits for its answer and never sends a second create. The
    create is committed after the close; the run's events were kept, and replay finds that
    run by its key and ends it: one run, FINISHED, with its step."""

    memory = HeldFirstCreate()
    sink = asleep_until_closed(memory, tmp_path)
    try:
        close_while_its_create_is_out(sink, memory.out, 3.0)
        assert memory.by_name("held") == []
    finally:
        memory.gate.set()  # the held create is committed now
    assert wait_for(lambda: len(memory.by_name("held")) == 1, WAIT)
    assert sink.statistics().deferred == 3  # the run's start, step and end
    report = replay(tmp_path, transport=memory)
    assert report.ok, report
    runs = memory.by_name("held")
    assert [run.status for run in runs] == ["FINISHED"]
    assert [s for s, _ in runs[0].history("step_reward")] == [0]


class ExperimentAskWaits(MemoryTransport):
    """The first look for the experiment waits until its caller gives it up (a close takes
    its cycle over); spans wait until ``release`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.asking, self.release = threading.Event(), threading.Event()

    def get_or_create_experiment(self, name: str) -> str:
        call = current_call()
        if call is not None and not self.asking.is_set():
            self.asking.set()
            wait_for(lambda: call.given_up, WAIT)
        return super().get_or_create_experiment(name)

    def export_spans(self, experiment_id: str, run_uuid: str | None, request: bytes) -> None:
        self.release.wait(WAIT)
        super().export_spans(experiment_id, run_uuid, request)


def test_a_cycle_taken_over_before_its_runs_were_seen_has_them_ended_first() -> None:
    """A run open when a close comes, its first cycle still waiting for the experiment: the
    close takes the cycle over (stuck) before the runs exporter saw the run, then sends the
    run with its end (FAILED) in one go, ahead of the spans the server holds. Before, the end,
    whose start was in the cycle taken back and not yet known, was held apart until everything
    else was sent, and the run stayed RUNNING behind the spans."""
    memory = ExperimentAskWaits()
    # An experiment of its own: one another test looked up is known to the process already.
    experiment = f"asked-{uuid.uuid4().hex[:8]}"
    sink = MLflowSink(enabled=True, experiment=experiment, transport=memory, flush_interval=0.05)
    try:
        sink.on_run_start("open", task="t", environment="e", params={})
        sink.on_step("open", event={"step": 0, "reward": 1.0}, cumulative_reward=1.0)
        assert memory.asking.wait(WAIT)
        sink.close(3.0)
        assert memory.one("open").status == "FAILED"
        assert memory.one("open").history("step_reward") == [(0, 1.0)]
    finally:
        memory.release.set()
        sink.close(1.0)


class TurnWaiting(MemoryTransport):
    """Says when each call's request goes out (as it reaches the store); the first step batch
    waits for its turn, as behind other sinks' requests, until its caller gives it up."""

    announces_sends = True

    def __init__(self) -> None:
        super().__init__()
        self.waiting_now = threading.Event()

    def log_batch(
        self,
        run_uuid: str,
        *,
        metrics: Sequence[Metric] = (),
        params: Sequence[tuple[str, str]] = (),
        tags: Sequence[tuple[str, str]] = (),
    ) -> None:
        call = current_call()
        steps = any(m.key == "step_reward" for m in metrics)
        if call is not None and steps and not self.waiting_now.is_set():
            self.waiting_now.set()
            wait_for(lambda: call.given_up, WAIT)
        super().log_batch(run_uuid, metrics=metrics, params=params, tags=tags)


def test_a_close_takes_over_at_once_a_cycle_whose_requests_wait_for_their_turn() -> None:
    """A run open, its step's batch waiting for its turn (nothing of the cycle sent) when a
    close of 1 s comes: the close takes the cycle over at once and ends the run (FAILED, it
    never reached on_run_end) with its step, which it sends without reading back first:
    nothing of it went out. Before, a short cycle went on for half the time left and was taken
    over only once a request had waited 2 s (the run stayed RUNNING); and the points of a cycle
    taken over counted as possibly stored whether they had gone out or not, so they were read
    back, and sent after every closing sink's ends."""
    memory = TurnWaiting()
    sink = MLflowSink(enabled=True, experiment="e", transport=memory, flush_interval=0.05)
    try:
        sink.on_run_start("open", task="t", environment="e", params={})
        assert sink.flush(WAIT)  # the run exists
        sink.on_step("open", event={"step": 0, "reward": 1.0}, cumulative_reward=1.0)
        assert memory.waiting_now.wait(WAIT)
        sink.close(1.0)
        run = memory.one("open")
        assert run.status == "FAILED"
        assert run.history("step_reward") == [(0, 1.0)]
        assert not [call for call in memory.calls if call.startswith("metric_history")]
    finally:
        sink.close(1.0)

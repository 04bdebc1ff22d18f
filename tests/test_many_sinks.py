"""Many sinks in one process closing together: one deadline, every run ended first, a bounded
number of requests in flight to the server whatever the number of sinks."""

from __future__ import annotations

import contextlib
import functools
import json
import re
import threading
import time
import types
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest
import requests

from promises_support import (
    Agent,
    Store,
    asleep_until_woken,
    assert_each_once,
    patient,
    replay_cli,
)
from rlm_mlflow import MLflowSink, PermanentError, TransientError
from rlm_mlflow._runtime import close_all
from rlm_mlflow._transports.base import Call, Metric, calling, may_begin
from rlm_mlflow._transports.http import (
    CLOSING_IN_FLIGHT,
    CLOSING_START,
    MAX_IN_FLIGHT,
    InFlight,
    classify,
    rank,
)
from rlm_mlflow.testing import FaultProxy, MemoryTransport, local_server, wait_for
from rlm_mlflow.testing.server import MlflowServer, free_port

WAIT = 60.0
Spawn = Callable[..., Agent]


# -- what the server's overload looks like --------------------------------------------------------


def pool_exhausted() -> requests.Response:
    """MLflow's answer (sqlalchemy store) when no database connection freed up in 30 s."""
    response = requests.Response()
    response.status_code = 400
    response._content = json.dumps(
        {
            "error_code": "BAD_REQUEST",
            "message": "QueuePool limit of size 5 overflow 10 reached, connection timed out, "
            "timeout 30.00 (Background on this error at: https://sqlalche.me/e/21/3o7r)",
        }
    ).encode()
    return response


def test_a_server_out_of_database_connections_is_busy_not_refusing() -> None:
    """A server past its database pool says BAD_REQUEST: the request is retried, never dropped,
    and the in-flight bound takes it as overload."""
    with pytest.raises(TransientError):
        classify(pool_exhausted(), "POST /runs/create")
    slots = InFlight()
    slots.hurry(True)
    slots.answered(0.2)
    before = slots.limit
    from rlm_mlflow._transports.http import overloaded

    assert overloaded(pool_exhausted())
    slots.answered(0.2, overloaded=True)
    assert slots.limit < before


def test_the_closing_bound_grows_while_answers_stay_quick_and_shrinks_when_they_queue() -> None:
    """Nobody closing: MAX_IN_FLIGHT. Closing: quick answers (the time is the way to the server)
    raise the bound up to CLOSING_IN_FLIGHT; answers that queue at the server lower it, never
    below MAX_IN_FLIGHT; once the last closing sink is done, MAX_IN_FLIGHT again."""
    slots = InFlight()
    assert slots.limit == MAX_IN_FLIGHT
    slots.hurry(True)
    assert slots.limit == CLOSING_START
    for _ in range(200):
        slots.answered(0.2)
    assert slots.limit == CLOSING_IN_FLIGHT
    for _ in range(200):
        slots.answered(2.0)  # ten times the quickest: the server queues
    assert slots.limit == MAX_IN_FLIGHT
    slots.answered(0.21)
    assert slots.limit == MAX_IN_FLIGHT + 1
    slots.hurry(False)
    assert slots.limit == MAX_IN_FLIGHT


def test_requests_wait_for_a_slot_and_get_one_when_the_bound_grows() -> None:
    """With the bound taken, a request waits; a sink beginning to close lets it through."""
    slots = InFlight()
    taken = contextlib.ExitStack()
    for _ in range(MAX_IN_FLIGHT):
        taken.enter_context(slots.turn())
    through = threading.Event()

    def request() -> None:
        with slots.turn():
            through.set()

    thread = threading.Thread(target=request)
    thread.start()
    try:
        assert not through.wait(0.2)  # (cannot fail the other way: it only shows the wait)
        slots.hurry(True)
        assert through.wait(WAIT)
    finally:
        slots.hurry(True)
        thread.join(WAIT)
        taken.close()
    assert slots.busy == 0


def test_a_call_counts_as_sent_only_once_its_request_goes_out() -> None:
    """With a transport that says when it sends, a call waiting for its place in flight is not
    out (a close may take its cycle over: nothing of it is in doubt); once its request goes
    out it is, and what waits on that learns it. A call given up before its request goes is
    not sent, and nothing learns it went out. A transport that does not say when it sends
    makes calls out from their start."""
    slots = InFlight()
    taken = contextlib.ExitStack()
    for _ in range(MAX_IN_FLIGHT):
        taken.enter_context(slots.turn())
    call, marked = Call(announced=True), []
    call.when_out(lambda: marked.append("out"))

    def request() -> None:
        with calling(call), slots.turn():
            may_begin("log batch")

    thread = threading.Thread(target=request)
    thread.start()
    try:
        assert wait_for(lambda: len(slots._waiting) == 1, WAIT)
        out_while_waiting = call.out
        assert not out_while_waiting
        assert marked == []
        taken.close()  # the places free up
        thread.join(WAIT)
    finally:
        taken.close()
        thread.join(WAIT)
    assert call.out
    assert marked == ["out"]

    late = Call(announced=True)
    late.when_out(lambda: marked.append("late"))
    late.give_up()
    with calling(late), pytest.raises(TransientError) as raised:
        may_begin("log batch")
    assert not raised.value.maybe_committed
    assert not late.out

    unannounced = Call()
    unannounced.when_out(lambda: marked.append("unannounced"))
    assert unannounced.out
    assert marked == ["out", "unannounced"]


def test_a_request_given_up_leaves_its_place_and_one_given_up_while_waiting_is_never_sent() -> None:
    """Every place is held by requests whose answers never come; the caller gives one up (a
    close took its cycle over): a waiting request gets its place at once, while the thread of
    the one given up still waits. A request given up while it waits for a place is not sent."""
    slots = InFlight()
    calls = [Call() for _ in range(MAX_IN_FLIGHT)]
    answered = threading.Event()  # the server's answers, which never come before the end
    inside = threading.Semaphore(0)

    def held(call: Call) -> None:
        with calling(call), slots.turn():
            inside.release()
            answered.wait(WAIT)

    holders = [threading.Thread(target=held, args=(call,)) for call in calls]
    for thread in holders:
        thread.start()
    for _ in calls:
        assert inside.acquire(timeout=WAIT)
    waiting_call, outcome = Call(), []

    def waiting() -> None:
        with calling(waiting_call):
            try:
                with slots.turn():
                    outcome.append("sent")
            except TransientError as exc:
                outcome.append(f"not sent, maybe committed: {exc.maybe_committed}")

    through = threading.Event()

    def request() -> None:
        with slots.turn():
            through.set()

    try:
        waiter = threading.Thread(target=waiting)
        waiter.start()
        assert wait_for(lambda: len(slots._waiting) == 1, WAIT)
        waiting_call.give_up()
        waiter.join(WAIT)
        assert outcome == ["not sent, maybe committed: False"]
        assert slots._waiting == {}

        thread = threading.Thread(target=request)
        thread.start()
        assert wait_for(lambda: len(slots._waiting) == 1, WAIT)
        calls[0].give_up()
        assert through.wait(WAIT)
        thread.join(WAIT)
        assert holders[0].is_alive()  # its answer has not come: only its place was given back
    finally:
        answered.set()
        for thread in holders:
            thread.join(WAIT)
    assert slots.busy == 0  # the given-up request, answered at last, did not leave twice


@pytest.mark.parametrize("closing", [False, True])
def test_waiting_requests_go_in_arrival_order_and_ends_first_while_sinks_close(
    closing: bool,
) -> None:
    """A run's create, a batch, a span request and a run's end wait, in that order, for the one
    place in flight: they go in that order; while a sink closes against a deadline, the end
    first and the create last (every run created is ended before new runs take the time)."""
    slots = InFlight()
    if closing:
        slots.hurry(True)
    paths = [
        "/api/2.0/mlflow/runs/create",
        "/api/2.0/mlflow/runs/log-batch",
        "/v1/traces",
        "/api/2.0/mlflow/runs/update",
    ]
    others, last = contextlib.ExitStack(), contextlib.ExitStack()
    while slots.busy < slots.limit - 1:
        others.enter_context(slots.turn())
    last.enter_context(slots.turn())  # every place taken: the requests below wait
    went: list[str] = []
    threads = []

    def waiting(count: int) -> Callable[[], bool]:
        return lambda: len(slots._waiting) == count

    for path in paths:
        queued = len(slots._waiting) + 1

        def request(path: str = path) -> None:
            with slots.turn(rank(path)):
                went.append(path.rsplit("/", 1)[-1])

        thread = threading.Thread(target=request)
        thread.start()
        threads.append(thread)
        assert wait_for(waiting(queued), WAIT)
    last.close()  # one place: they go one after another
    for thread in threads:
        thread.join(WAIT)
    others.close()
    expected = (
        ["update", "log-batch", "traces", "create"]
        if closing
        else ["create", "log-batch", "traces", "update"]
    )
    assert went == expected
    assert slots.busy == 0


def test_a_request_begun_only_if_there_is_time_is_not_sent_when_there_is_none() -> None:
    """Closing against a deadline, a run's create goes out only if its end can still follow:
    asked right before the request would be sent (after its wait for a turn). When the answer
    is no, nothing reaches the server and Postponed (never retried, never a failure) says so."""
    from rlm_mlflow._exceptions import Postponed, TransportError
    from rlm_mlflow._transports.base import begin_only_if
    from rlm_mlflow._transports.http import HttpClient

    with FaultProxy(free_port()) as proxy:
        client = HttpClient(
            proxy.uri, timeout=(5.0, 5.0), headers={}, auth=None, verify=True, cert=None
        )
        asked: list[bool] = []

        def too_late() -> bool:
            asked.append(True)
            return False

        try:
            with begin_only_if(too_late), pytest.raises(Postponed):
                client.send("POST", "/api/2.0/mlflow/runs/create", data=b"{}")
        finally:
            client.close()
        assert asked == [True]
        assert proxy.requests == 0
        assert not issubclass(Postponed, TransientError | PermanentError)
        assert issubclass(Postponed, TransportError)


def test_a_run_created_long_before_a_close_leaves_later_runs_time_to_be_created(
    monkeypatch: pytest.MonkeyPatch, journal_dir: Path
) -> None:
    """A close learns how long a run takes from its create to its end from the runs created
    while closing, never from a run created an hour before (its end only comes at the close):
    that hour is not taken for the time a create needs, and a later close still creates and
    ends its runs."""
    import rlm_mlflow._exporters.identity
    import rlm_mlflow._exporters.runs

    offset = [0.0]
    clock = types.SimpleNamespace(**{n: getattr(time, n) for n in dir(time) if n[0] != "_"})
    clock.monotonic = lambda: time.monotonic() + offset[0]
    monkeypatch.setattr(rlm_mlflow._exporters.identity, "time", clock)
    monkeypatch.setattr(rlm_mlflow._exporters.runs, "time", clock)
    memory = MemoryTransport()
    first = MLflowSink(enabled=True, transport=memory, flush_interval=0.05)
    second = MLflowSink(enabled=True, transport=memory, flush_interval=0.05)
    try:
        first.on_run_start("old", task="t", environment="e", params={})
        first.on_step("old", event={"step": 0, "reward": 1.0}, cumulative_reward=1.0)
        assert first.flush(patient(10))
        assert memory.one("old").status == "RUNNING"
        offset[0] = 3600.0  # an hour on
        first.on_run_end("old", result={"completed": True, "steps": 1}, run_path=None)
        first.close(patient(10))
        second.on_run_start("new", task="t", environment="e", params={})
        second.on_run_end("new", result={"completed": True, "steps": 0}, run_path=None)
        second.close(patient(10))
    finally:
        first.close(1.0)
        second.close(1.0)
    assert memory.one("old").status == "FINISHED"
    assert memory.one("new").status == "FINISHED"


# -- ends first, across sinks ----------------------------------------------------------------------


class Ordered(MemoryTransport):
    """Records, in one order for every sink sharing it, each run's end, each batch of step
    points and each spans request; the end of run ``first`` waits until another sink sends
    steps or spans (which must not happen before every run is ended) or ``patience`` passes."""

    def __init__(self, held: str, patience: float) -> None:
        super().__init__()
        self.held = held
        self.patience = patience
        self.order: list[tuple[str, str]] = []
        self.too_early = threading.Event()

    def _note(self, kind: str, what: str) -> None:
        with self.lock:
            self.order.append((kind, what))
        if kind != "end":
            self.too_early.set()

    def _name(self, run_uuid: str) -> str:
        return self.runs[run_uuid].tags.get("run_id", run_uuid)

    def log_batch(
        self,
        run_uuid: str,
        *,
        metrics: Sequence[Metric] = (),
        params: Sequence[tuple[str, str]] = (),
        tags: Sequence[tuple[str, str]] = (),
    ) -> None:
        if any(m.key == "step_reward" for m in metrics) and not any(
            m.key == "total_reward" for m in metrics
        ):
            self._note("steps", self._name(run_uuid))
        super().log_batch(run_uuid, metrics=metrics, params=params, tags=tags)

    def set_terminated(self, run_uuid: str, *, status: str, end_time_ms: int) -> None:
        if self._name(run_uuid) == self.held:
            self.too_early.wait(self.patience)
        super().set_terminated(run_uuid, status=status, end_time_ms=end_time_ms)
        self._note("end", self._name(run_uuid))

    def export_spans(self, experiment_id: str, run_uuid: str | None, request: bytes) -> None:
        self._note("spans", "")
        super().export_spans(experiment_id, run_uuid, request)


@contextlib.contextmanager
def four_closing_sinks(
    memory: Ordered, tmp_path: Path, steps: int = 600, warm_open: bool = True
) -> Iterator[list[MLflowSink]]:
    """Four sinks sharing ``memory``, each with a run ``run-<n>`` of ``steps`` steps (600: more
    than one round of requests) ended and a run ``warm`` left open (or ended), their workers
    asleep: the block closes them (``memory.order`` records only what the close sends);
    afterwards each is closed anyway."""
    experiment = f"many-{uuid.uuid4().hex[:8]}"
    sinks: list[MLflowSink] = []
    settings: dict[str, Any] = {
        "flush_interval": 60.0,
        "batch_trigger": 10**9,
        "retry_initial": 0.01,
        "retry_max_wait": 0.05,
    }
    try:
        for n in range(4):
            sink = MLflowSink(
                enabled=True,
                experiment=experiment,
                transport=memory,
                journal_dir=tmp_path / f"j{n}",
                **settings,
            )
            sink.on_run_start("warm", task="t", environment="e", params={})
            if not warm_open:
                sink.on_run_end("warm", result={"completed": True, "steps": 0}, run_path=None)
            assert sink.flush(WAIT)
            # The worker is up, and asleep until the close wakes it.
            assert wait_for(functools.partial(asleep_until_woken, sink), WAIT)
            run = f"run-{n}"
            sink.on_run_start(run, task="t", environment="e", params={})
            for number in range(steps):
                sink.on_step(run, event={"step": number, "reward": 1.0}, cumulative_reward=1.0)
            sink.on_run_end(run, result={"completed": True, "steps": steps}, run_path=None)
            sinks.append(sink)
        del memory.order[:]
        memory.too_early.clear()
        yield sinks
    finally:
        memory.too_early.set()
        for sink in sinks:
            sink.close(1.0)


def assert_every_run_ended_first_then_everything_landed(
    memory: Ordered, after: tuple[str, ...] = ("steps", "spans"), steps: int = 600
) -> None:
    """Every ``run-<n>`` ended before any request of the kinds ``after``; each FINISHED with
    its ``steps`` steps."""
    order = memory.order
    ends = [i for i, (kind, what) in enumerate(order) if kind == "end" and what.startswith("run")]
    others = [i for i, (kind, _) in enumerate(order) if kind in after]
    assert len(ends) == 4, order
    assert others, order
    assert max(ends) < min(others), order
    for n in range(4):
        stored = memory.one(f"run-{n}")
        assert stored.status == "FINISHED"
        assert len(stored.history("step_reward")) == steps


def test_sinks_closing_together_end_every_run_before_anyone_sends_steps_or_spans(
    tmp_path: Path,
) -> None:
    """Four sinks close together against one deadline while one run's end is slow: no sink
    sends steps or spans before every run is ended; then everything lands."""
    memory = Ordered(held="run-0", patience=2.0)
    with four_closing_sinks(memory, tmp_path):
        close_all(None, WAIT)
    assert_every_run_ended_first_then_everything_landed(memory)


def test_the_sink_woken_first_to_close_waits_for_the_others_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first sink woken by a close of all sinks runs ahead of the others (here: the others
    are woken only once it has sent its ends and either waits for them or sent more): it still
    sends no steps or spans before every other sink has ended its runs."""
    import rlm_mlflow._runtime as runtime

    memory = Ordered(held="none", patience=0.0)
    woken: list[Any] = []
    request_close = runtime.request_close

    def one_then_the_rest(worker: Any, deadline: float | None) -> None:
        request_close(worker, deadline)
        if woken:
            return
        woken.append(worker)
        gate = worker._gate  # entered before any sink was woken

        def first_went_ahead() -> bool:
            waits = gate._clear is not None  # it waits at the gate for the others
            return waits or any(kind != "end" for kind, _ in memory.order)

        assert wait_for(first_went_ahead, WAIT)

    monkeypatch.setattr(runtime, "request_close", one_then_the_rest)
    with four_closing_sinks(memory, tmp_path):
        close_all(None, WAIT)
    assert woken
    assert_every_run_ended_first_then_everything_landed(memory)


class LiveEndHeld(Ordered):
    """:class:`Ordered`, where only spans release the end of run ``held`` (a run's steps go
    before its end), and the end of run ``live`` (sent by a cycle begun before the close) waits
    until ``release_live`` is set; ``live_out`` and ``held_out`` say the two ends are out."""

    def __init__(self, held: str, patience: float, live: str) -> None:
        super().__init__(held, patience)
        self.live = live
        self.live_out = threading.Event()
        self.release_live = threading.Event()
        self.held_out = threading.Event()

    def _note(self, kind: str, what: str) -> None:
        with self.lock:
            self.order.append((kind, what))
        if kind == "spans":
            self.too_early.set()

    def set_terminated(self, run_uuid: str, *, status: str, end_time_ms: int) -> None:
        name = self._name(run_uuid)
        if name == self.live:
            self.live_out.set()
            self.release_live.wait(WAIT)
        elif name == self.held:
            self.held_out.set()
        super().set_terminated(run_uuid, status=status, end_time_ms=end_time_ms)


def test_a_cycle_begun_before_a_close_sends_no_spans_before_the_other_sinks_end_their_runs(
    tmp_path: Path,
) -> None:
    """A sink's cycle was sending its ended run when a close of all sinks came: the cycle's
    spans wait until every other closing sink has ended its runs, as the closing sinks' own
    spans do (with hundreds of sinks at exit, the spans of the cycles out then took a third
    of the requests the runs' ends needed)."""
    memory = LiveEndHeld(held="run-1", patience=2.0, live="run-0")
    closing = threading.Thread(target=close_all, args=(None, WAIT))
    with four_closing_sinks(memory, tmp_path, steps=5, warm_open=False) as sinks:
        try:
            assert not sinks[0].flush(0.0)  # its cycle begins; its run's end waits
            assert memory.live_out.wait(WAIT)
            closing.start()
            assert wait_for(lambda: all(s._worker.close_requested for s in sinks), WAIT)
            assert memory.held_out.wait(WAIT)  # run-1's end is out, held until spans go
            memory.release_live.set()  # the first cycle goes on to its spans
        finally:
            memory.release_live.set()
            if closing.is_alive():
                closing.join(WAIT + 10)
        assert not closing.is_alive()
    assert_every_run_ended_first_then_everything_landed(memory, after=("spans",), steps=5)


# -- a process of many sinks, dropped without close(), against a slow server -----------------------


@contextlib.contextmanager
def dropped_sinks(
    agents: Spawn, tmp_path: Path, experiment: str, count: int, timeout: float, latency: float
) -> Iterator[tuple[MlflowServer, Agent, int]]:
    """``count`` sinks in one process, each logging one run of 3 steps (odd runs left open),
    dropped without close(); the process then exits at once, against a server of its own
    ``latency`` away (the burst must not slow the other tests). Yields the server, still up
    (without the proxy, once every request the process sent has reached the server), the
    agent and its exit code."""
    with local_server(tmp_path / "server") as server:
        with FaultProxy(server.port) as proxy:
            proxy.set(latency=latency)
            agent = agents(
                "dropped_then_exit.py", proxy.uri, experiment, str(count), str(timeout), "3"
            )
            agent.expect("HOOKED", 120)
            code = agent.wait(timeout + 30.0)  # a failure if it is still running by then
            # What the process sent before it died still reaches the server (a proxy forwards a
            # request whose client hung up): read the runs only once all of it has.
            assert proxy.wait_until(lambda p: p.handling == 0, 60.0), (
                "the proxy still forwards requests of a dead process"
            )
        yield server, agent, code


class HeldEnds(MemoryTransport):
    """A server whose run ends wait until ``release`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def set_terminated(self, run_uuid: str, *, status: str, end_time_ms: int) -> None:
        self.release.wait(WAIT)
        super().set_terminated(run_uuid, status=status, end_time_ms=end_time_ms)


def test_sinks_of_a_quick_server_do_not_wait_for_a_slow_servers_run_ends_to_send_steps(
    tmp_path: Path,
) -> None:
    """Two sinks of one process close together, each to its own server; the first server
    holds every run's end. The second sink's ends, steps and spans all land while the first
    server still holds its end: sinks wait for each other's run ends only when they share a
    server. Before, the second waited for the first's end until the deadline."""
    slow, quick = HeldEnds(), MemoryTransport()
    sinks: list[MLflowSink] = []
    try:
        for n, (uri, transport) in enumerate(
            [("http://slow:5000", slow), ("http://quick:5000", quick)]
        ):
            sink = MLflowSink(
                enabled=True,
                experiment="two-servers",
                tracking_uri=uri,
                transport=transport,
                journal_dir=tmp_path / f"j{n}",
                flush_interval=60.0,
                batch_trigger=10**9,
            )
            sinks.append(sink)
            sink.on_run_start("warm", task="t", environment="e", params={})
            assert sink.flush(WAIT)
            assert wait_for(functools.partial(asleep_until_woken, sink), WAIT)
            sink.on_run_start(f"run-{n}", task="t", environment="e", params={})
            for number in range(600):
                sink.on_step(
                    f"run-{n}", event={"step": number, "reward": 1.0}, cumulative_reward=1.0
                )
            sink.on_run_end(f"run-{n}", result={"completed": True, "steps": 600}, run_path=None)
        closing = threading.Thread(target=close_all, args=(None, WAIT))
        closing.start()

        def quick_done() -> bool:
            runs = quick.by_name("run-1")
            return (
                len(runs) == 1
                and runs[0].status == "FINISHED"
                and len(runs[0].history("step_reward")) == 600
                and sinks[1].status()["pending"] == 0
            )

        assert wait_for(quick_done, WAIT / 2), sinks[1].status()
        assert sinks[1].status()["deferred"] == 0
        assert closing.is_alive()  # the slow server still holds its end
        slow.release.set()
        closing.join(WAIT)
        assert slow.one("run-0").status == "FINISHED"
    finally:
        slow.release.set()
        for sink in sinks:
            sink.close(1.0)


@pytest.mark.slow
@pytest.mark.integration
def test_sinks_dropped_without_close_end_every_run_within_one_shutdown_timeout(
    agents: Spawn, tmp_path: Path, experiment_name: str, journal_dir: Path
) -> None:
    """Twenty sinks, each logging one run, dropped without close(), the process then exiting at
    once, against a server half a second away: the process exits, and the runs are ended in
    MLflow with their truthful status (FINISHED when the agent ended it, FAILED when the exit
    did), none wrongly; replay then sends what the deadline left, once, ends what it did not
    end, and changes no run it ended. (A server of
    its own: the burst must not slow the other tests.)"""
    # The deadline's expiry is what is checked: not stretched by the machine's load. Against
    # this server 4 requests at a time (0.5 s each) send 40 in 5 s; 20 runs need 60 to be ended.
    count, timeout = 20, 5.0
    with dropped_sinks(agents, tmp_path, experiment_name, count, timeout, 0.5) as (
        server,
        agent,
        code,
    ):
        store = Store(server.uri)
        runs = store.by_name(experiment_name)
        ended = {name: (run.info.status, run.info.end_time) for name, run in runs.items()}
        # What the deadline left goes with replay: once, and no run is ended again.
        replayed = replay_cli(journal_dir, tracking_uri=server.uri)
        after = store.by_name(experiment_name)
        every = store.client.search_runs([store.experiment_id(experiment_name)])
        landed = {name: store.steps(run) for name, run in after.items()}
    statuses = {name: status for name, (status, _) in ended.items()}
    expected = {f"dropped-{n}": "FINISHED" if n % 2 == 0 else "FAILED" for n in range(count)}
    problems = []
    if code != 0:
        problems.append(f"exit code {code}")
    # Ended within the deadline, each with its true status, or not created at all (no time was
    # left to end it: replay creates it ended); never left RUNNING, never wrongly ended.
    wrong = {k: statuses[k] for k in expected if statuses.get(k, expected[k]) != expected[k]}
    if wrong:
        problems.append(f"runs ended with a wrong status: {wrong}")
    on_time = [k for k in expected if statuses.get(k) == expected[k]]
    if len(on_time) <= count // 2:
        problems.append(f"only {len(on_time)} of {count} runs ended by the deadline: {statuses}")
    assert not problems, f"{problems}; stderr:\n{agent.stderr()[-2000:]}"
    assert replayed.returncode == 0, replayed.stderr[-2000:]
    assert len(every) == count  # no run created twice
    # After replay every run is ended, truthfully; what the deadline ended is left as it was.
    assert {name: run.info.status for name, run in after.items()} == expected
    for name, run in after.items():
        if name in on_time:
            assert (run.info.status, run.info.end_time) == ended[name]
        assert_each_once(landed[name], range(3))


@pytest.mark.slow
@pytest.mark.integration
def test_three_hundred_sinks_dropped_against_a_slow_server_leave_no_run_running(
    agents: Spawn, tmp_path: Path, experiment_name: str, journal_dir: Path
) -> None:
    """Three hundred sinks dropped without close() at once against a server 200 ms away: far
    more runs than the deadline can send (three requests each), their requests far more than
    the threads and places in flight. Every run the exit created is ended, with its true
    status, by the deadline: a run's end and batches never wait behind new runs' creates or
    traces. The rest are never created (kept in the journals for replay)."""
    count, timeout = 300, 5.0
    with dropped_sinks(agents, tmp_path, experiment_name, count, timeout, 0.2) as (
        server,
        agent,
        code,
    ):
        runs = Store(server.uri).by_name(experiment_name)
        statuses = {name: run.info.status for name, run in runs.items()}
    expected = {f"dropped-{n}": "FINISHED" if n % 2 == 0 else "FAILED" for n in range(count)}
    assert code == 0, agent.stderr()[-2000:]
    assert statuses, "no run was created at all"
    wrong = {k: v for k, v in statuses.items() if v != expected[k]}
    assert not wrong, f"{len(wrong)} of {len(statuses)} runs not ended truthfully: {wrong}"
    kept = [p for p in journal_dir.rglob("*") if p.is_file()]
    assert len(statuses) == count or kept, "runs neither created nor kept for replay"
    # The one line the exit prints says what did land, beside what is kept.
    said = re.search(r"; (\d+) runs? (?:were|was) ended in MLflow all the same", agent.stderr())
    assert said is not None, agent.stderr()[-2000:]
    assert 0 < int(said.group(1)) <= len(statuses)


def test_a_request_that_times_out_lowers_the_closing_bound() -> None:
    """A server that takes requests and never answers (its pool taken, its workers stuck): a
    closing sink's timed-out request counts as the server queueing, so fewer go at once."""
    import socket

    from rlm_mlflow import TransientError
    from rlm_mlflow._transports.http import HttpClient

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        client = HttpClient(
            f"http://127.0.0.1:{port}",
            timeout=(5.0, 0.3),
            headers={},
            auth=None,
            verify=True,
            cert=None,
        )
        try:
            client.slots.hurry(True)
            for _ in range(20):
                client.slots.answered(0.01)  # quick answers so far: the bound grew
            grown = client.slots.limit
            assert grown == CLOSING_IN_FLIGHT
            with pytest.raises(TransientError):
                client.send("POST", "/api/2.0/mlflow/runs/update", data=b"{}")
            assert client.slots.limit < grown
        finally:
            client.close()


@pytest.mark.slow
@pytest.mark.integration
def test_sinks_closed_together_while_their_batches_wait_on_a_late_server_end_every_run(
    mlflow_server: MlflowServer, experiment_name: str, journal_dir: Path
) -> None:
    """Twelve sinks of one process, each with a run whose steps and end went out in one cycle:
    the first batches take every place in flight and are committed only 10 s later, the other
    cycles wait for a place. Closed together with 4 s, every cycle is taken over in time, the
    places held by requests given up on are freed, and every run is ended FINISHED by the
    deadline. The late batches then land, and replay of what was kept adds no step twice."""
    count, batches = 12, "/api/2.0/mlflow/runs/log-batch"
    with FaultProxy(mlflow_server.port) as proxy:
        proxy.set(mode="late", latency=10.0, count=MAX_IN_FLIGHT, path="/runs/log-batch")
        sinks = [
            MLflowSink(
                enabled=True,
                experiment=experiment_name,
                tracking_uri=proxy.uri,
                flush_interval=60,
                batch_trigger=10**9,
            )
            for _ in range(count)
        ]
        for n, sink in enumerate(sinks):
            run = f"late-{n}"
            sink.on_run_start(run, task="t", environment="e", params={})
            for i in range(20):
                sink.on_step(run, event={"step": i, "reward": 1.0}, cumulative_reward=i + 1.0)
            sink.on_run_end(run, result={"completed": True, "steps": 20}, run_path=None)
            sink.flush(0.0)  # its cycle goes now, and waits on the late batch
        assert proxy.wait_until(lambda p: p.paths[batches] >= MAX_IN_FLIGHT, WAIT)
        close_all(None, 4.0)
        store = Store(mlflow_server.uri)
        statuses = {name: run.info.status for name, run in store.by_name(experiment_name).items()}
        assert statuses == {f"late-{n}": "FINISHED" for n in range(count)}
        for sink in sinks:
            status = sink.status()
            assert status["dropped"] == {}
            assert status["accepted"] == status["sent"] + status["deferred"] == 22
        # The late batches reach the server; replay sends what the deadline kept.
        assert proxy.wait_until(lambda p: p.forwarded == p.requests and not p.in_flight, WAIT)
        replayed = replay_cli(journal_dir, tracking_uri=mlflow_server.uri)
        assert replayed.returncode == 0, replayed.stderr[-2000:]
        for run in store.by_name(experiment_name).values():
            assert_each_once(store.steps(run), range(20))


@pytest.mark.slow
@pytest.mark.integration
def test_sinks_closed_together_while_a_queue_holds_every_create_make_each_run_once(
    mlflow_server: MlflowServer, experiment_name: str, journal_dir: Path
) -> None:
    """Twelve sinks of one process, each with a run whose create a queue in front of the server
    holds 2.5 s (the request timeout is 1 s) and then commits, after every sink gave up on its
    answer; they are closed together meanwhile. Each sink looks for its run rather than send a
    second create while the first may still commit, finds it, and ends it: one create per run,
    every run FINISHED with each step once, and nothing kept for replay."""
    count, creates = 12, "/api/2.0/mlflow/runs/create"
    Store(mlflow_server.uri).client.create_experiment(experiment_name)
    with FaultProxy(mlflow_server.port) as proxy:
        proxy.set(mode="late", latency=2.5, count=count, path="/runs/create")
        sinks = [
            MLflowSink(
                enabled=True,
                experiment=experiment_name,
                tracking_uri=proxy.uri,
                flush_interval=60,
                request_timeout=1.0,
            )
            for _ in range(count)
        ]
        for n, sink in enumerate(sinks):
            run = f"held-{n}"
            sink.on_run_start(run, task="t", environment="e", params={})
            for i in range(5):
                sink.on_step(run, event={"step": i, "reward": 1.0}, cumulative_reward=i + 1.0)
            sink.on_run_end(run, result={"completed": True, "steps": 5}, run_path=None)
            sink.flush(0.0)  # its cycle goes now; its create is held
        assert proxy.wait_until(lambda p: p.paths[creates] >= 1, WAIT)
        close_all(None, patient(20.0))
        assert proxy.wait_until(lambda p: p.forwarded == p.requests and not p.in_flight, WAIT)
        assert proxy.paths[creates] == count, "a second create was sent for some run"
    store = Store(mlflow_server.uri)
    runs = store.by_name(experiment_name)
    assert {name: run.info.status for name, run in runs.items()} == {
        f"held-{n}": "FINISHED" for n in range(count)
    }
    assert len(store.runs(experiment_name)) == count  # no duplicate under any name
    for run in runs.values():
        assert_each_once(store.steps(run), range(5))
    for sink in sinks:
        status = sink.status()
        assert status["accepted"] == status["sent"] == 7, status
    assert not list(journal_dir.glob("*")), list(journal_dir.rglob("*"))


# -- the sinks of one async service, closed together -----------------------------------------------


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.anyio
async def test_sinks_of_one_async_service_closed_together_leave_no_run_running(
    anyio_backend: str,
    mlflow_server: MlflowServer,
    experiment_name: str,
    journal_dir: Path,
    read_runs: Callable[[str], dict[str, Any]],
) -> None:
    """Forty sinks of one asyncio or trio service, each with a run nothing of which was sent
    yet (half ended by the agent, half still open), closed all at once with 1.5 s left against
    a server 200 ms away: far more runs than the deadline can create, send and end (four
    requests each, twelve at a time). They share one deadline as a process's sinks do: every
    run the close created is ended by then, with its true status; the others are never
    created, and replay creates them ended. Every step then lands once. (The service's
    experiment exists already, as a long-running service's does: the time goes to the runs.)"""
    count, timeout = 40, 1.5
    expected = {f"svc-{n}": "FINISHED" if n % 2 == 0 else "FAILED" for n in range(count)}
    await anyio.to_thread.run_sync(
        Store(mlflow_server.uri).client.create_experiment, experiment_name
    )
    with FaultProxy(mlflow_server.port) as proxy:
        proxy.set(latency=0.2)
        sinks = [
            MLflowSink(
                enabled=True, experiment=experiment_name, tracking_uri=proxy.uri, flush_interval=60
            )
            for _ in range(count)
        ]
        async with contextlib.AsyncExitStack() as stack:
            for sink in sinks:
                await stack.enter_async_context(sink)
            for n, sink in enumerate(sinks):
                run = f"svc-{n}"
                sink.on_run_start(run, task="t", environment="e", params={})
                for i in range(3):
                    sink.on_step(run, event={"step": i, "reward": 1.0}, cumulative_reward=i + 1.0)
                if n % 2 == 0:
                    sink.on_run_end(run, result={"completed": True, "steps": 3}, run_path=None)
            async with anyio.create_task_group() as tg:
                for sink in sinks:
                    tg.start_soon(sink.aclose, timeout)
        ended = {
            name: run.info.status
            for name, run in (await anyio.to_thread.run_sync(read_runs, experiment_name)).items()
        }
    assert ended, "no run was created at all"
    wrong = {name: status for name, status in ended.items() if status != expected[name]}
    assert not wrong, f"{len(wrong)} of {len(ended)} runs not ended truthfully: {wrong}"

    replayed = await anyio.to_thread.run_sync(
        functools.partial(replay_cli, journal_dir, tracking_uri=mlflow_server.uri)
    )
    assert replayed.returncode == 0, replayed.stderr[-2000:]
    store = Store(mlflow_server.uri)
    after = store.by_name(experiment_name)
    assert {name: run.info.status for name, run in after.items()} == expected
    for run in after.values():
        assert_each_once(store.steps(run), range(3))

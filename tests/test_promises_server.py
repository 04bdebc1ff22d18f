"""Promises that hold against a real ``mlflow server``, with faults injected in between.

A :class:`~rlm_mlflow.testing.FaultProxy` sits in front of the session's server (stalls, refusals,
odd answers); a server of the test's own is started only where the test must break the server
itself (a redeploy on an empty database, a write-locked database). What landed is read back from
the server, never through the proxy.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from promises_support import (
    GATEWAY_ANSWERS,
    HTML_401,
    WAIT,
    Store,
    assert_accounted,
    assert_each_once,
    close_within,
    end,
    eventually,
    patient,
    replay_cli,
    start,
    steps,
    wait_until,
)
from rlm_mlflow import MLflowSink, replay
from rlm_mlflow.testing import FaultProxy, MlflowServer, local_server

pytestmark = pytest.mark.integration

FAST: dict[str, Any] = {"flush_interval": 0.2, "retry_initial": 0.1, "retry_max_wait": 1.0}


@pytest.fixture
def proxy(mlflow_server: MlflowServer) -> Iterator[FaultProxy]:
    with FaultProxy(mlflow_server.port) as proxy:
        yield proxy


def make_sink(uri: str, experiment: str, **kwargs: Any) -> MLflowSink:
    return MLflowSink(enabled=True, experiment=experiment, tracking_uri=uri, **{**FAST, **kwargs})


# -- 1. the hot path never waits -------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("journal", "fault"),
    [(True, "stall"), (False, "refuse")],
    ids=["journal-server-stalled", "no-journal-server-unreachable"],
)
def test_hooks_never_wait_for_a_wedged_worker_and_every_step_lands_once(
    proxy: FaultProxy, store: Store, experiment_name: str, journal: bool, fault: str
) -> None:
    """8 threads x 2,000 steps with the worker wedged all return by a deadline; with the server
    back every step lands exactly once (no journal: drops counted exactly under ``queue_full``,
    and no run start or end is ever dropped)."""
    threads, count = 8, 2000
    proxy.set(mode=fault)
    sink = make_sink(
        proxy.uri, experiment_name, journal=journal, request_timeout=600.0, shutdown_timeout=30.0
    )
    start(sink, "warmup")  # wakes the worker, straight into the fault
    if fault == "stall":
        wait_until(lambda: proxy.requests >= 1, WAIT, "the worker's first request hangs")
    else:
        wait_until(lambda: sink.status()["retries"] >= 1, WAIT, "the worker retries")

    go = threading.Barrier(threads)

    def agent(n: int) -> None:
        go.wait(WAIT)
        start(sink, f"run-{n}")
        steps(sink, f"run-{n}", range(count))
        end(sink, f"run-{n}", count)

    agents = [threading.Thread(target=agent, args=(n,), daemon=True) for n in range(threads)]
    for thread in agents:
        thread.start()
    wait_until(
        lambda: not any(t.is_alive() for t in agents), WAIT, "every hook returned (none waited)"
    )
    end(sink, "warmup", 0)
    proxy.set(mode="pass")
    produced = 2 + threads * (count + 2)
    if journal:
        assert sink.flush(patient(180)), sink.status()
    else:
        wait_until(lambda: sink.status()["pending"] == 0, 180, "every event handled")
    close_within(sink, 30.0)

    status = sink.status()
    assert_accounted(status)
    assert status["pending"] == 0
    assert status["accepted"] == produced
    if journal:
        assert status["dropped"] == {}
        assert status["sent"] == produced
    else:
        assert set(status["dropped"]) <= {"queue_full"}
    runs = store.by_name(experiment_name)
    assert sorted(runs) == sorted(["warmup", *(f"run-{n}" for n in range(threads))])
    assert {run.info.status for run in runs.values()} == {"FINISHED"}
    landed = 0
    for n in range(threads):
        points = store.steps(runs[f"run-{n}"])
        if journal:
            assert_each_once(points, range(count))
        assert len(points) == len(set(points)), f"run-{n}: a step stored twice"
        landed += len(points)
    assert landed + status["dropped"].get("queue_full", 0) == threads * count


# -- 6. hooks racing close() -----------------------------------------------------------------------


@pytest.mark.slow
def test_hooks_racing_close_leave_every_event_accounted_and_no_run_running(
    mlflow_server: MlflowServer, store: Store, experiment_name: str
) -> None:
    """Six threads hook while another thread calls close(): every event has exactly one fate,
    nothing stays pending, hooks after close count as ``after_close``, no run is left RUNNING."""
    # On a machine running several suites at once, reaching the runs' ends behind tens of
    # thousands of events (some spilled) takes longer: the deadline stretches with the load.
    deadline = patient(20.0)
    sink = make_sink(mlflow_server.uri, experiment_name, shutdown_timeout=deadline)
    start(sink, "warm")
    end(sink, "warm", 0)
    assert sink.flush(WAIT)  # the worker is up: close() races the hooks, not a first connect
    stop = threading.Event()
    calls = [0] * 6

    def agent(n: int) -> None:
        k = 0
        while not stop.is_set():  # runs of 500 steps, one after the other
            run_id = f"t{n}-{k}"
            start(sink, run_id)
            calls[n] += 1
            for i in range(500):
                sink.on_step(run_id, event={"step": i, "reward": 1.0}, cumulative_reward=1.0)
                calls[n] += 1
            end(sink, run_id, 500)
            calls[n] += 1
            k += 1

    agents = [threading.Thread(target=agent, args=(n,), daemon=True) for n in range(6)]
    for thread in agents:
        thread.start()
    try:
        wait_until(lambda: min(calls) >= 300, WAIT, "every thread is hooking")
        closer = threading.Thread(target=sink.close, args=(deadline,), name="closer")
        closer.start()
        wait_until(
            lambda: sink.status()["dropped"].get("after_close", 0) >= 100,
            WAIT,
            "hooks called after close() are counted",
        )
    finally:
        stop.set()
        for thread in agents:
            thread.join(WAIT)
    closer.join(deadline + patient(10.0))
    assert not closer.is_alive(), "close() did not return"

    status = sink.status()
    made = sum(calls) + 2
    dropped = sum(status["dropped"].values())
    fates = status["sent"] + status["deferred"] + dropped + status["pending"]
    running = [
        r.data.tags["run_id"] for r in store.runs(experiment_name) if r.info.status == "RUNNING"
    ]
    problems = []
    if status["accepted"] != fates:
        problems.append(f"accepted {status['accepted']} but {fates} fates")
    if status["pending"] != 0:
        problems.append(f"{status['pending']} events pending after close")
    if not status["dropped"].get("after_close"):
        problems.append("no hook counted as after_close")
    # Every hook call is one accepted event; close() may add a FAILED end per run left open.
    if not made <= status["accepted"] <= made + 6:
        problems.append(f"{made} hook calls, {status['accepted']} accepted")
    if running:
        problems.append(f"runs left RUNNING: {running}")
    assert not problems, f"{problems}; status {status}"


@pytest.mark.slow
def test_a_close_too_short_for_the_steps_still_ends_the_run_and_keeps_the_rest(
    proxy: FaultProxy,
    mlflow_server: MlflowServer,
    experiment_name: str,
    journal_dir: Path,
) -> None:
    """1 s per request, 3,000 steps pending (six log_batch requests) and the run's end, then
    close(2.5): the end goes ahead of the steps, so the run is FINISHED at the server; the steps
    the deadline left are kept, and a replay lands every step once."""
    sink = make_sink(proxy.uri, experiment_name, flush_interval=60.0, batch_trigger=10**9)
    start(sink, "long")
    assert sink.flush(WAIT)  # the run exists, as after a while of running
    second = patient(1.0)  # a busy machine stretches the request and the deadline alike
    proxy.set(latency=second)
    steps(sink, "long", range(3000))
    end(sink, "long", 3000)
    close_within(sink, 2.5 * second)
    store = Store(mlflow_server.uri)
    run = store.by_name(experiment_name)["long"]
    assert run.info.status == "FINISHED"
    assert len(store.steps(run)) < 3000  # the deadline did cut the steps short
    assert sink.status()["deferred"] > 0
    proxy.set()
    report = replay(journal_dir, tracking_uri=mlflow_server.uri)
    assert report.failed == 0
    assert_each_once(store.steps(store.by_name(experiment_name)["long"]), range(3000))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("status", "retry_after"), [(429, "3600"), (503, None)], ids=["429-retry-after", "503"]
)
def test_a_close_while_the_steps_wait_out_a_refusal_ends_the_run_and_keeps_them(
    proxy: FaultProxy,
    mlflow_server: MlflowServer,
    experiment_name: str,
    journal_dir: Path,
    status: int,
    retry_after: str | None,
) -> None:
    """Every ``log-batch`` is answered at once with a 429 (``Retry-After: 3600``) or a 503,
    while the run's other requests pass: the cycle with the run's steps and its end waits in
    its retries, no request of it out. close(3) takes that cycle over as it would one stuck on
    an unanswered request: the run is FINISHED at the server (its end goes alone), its steps
    are kept, and replay lands each once. Before, the end waited behind the steps' retries
    until the deadline and the run stayed RUNNING."""
    sink = make_sink(proxy.uri, experiment_name, flush_interval=0.2)
    start(sink, "refused")
    assert sink.flush(WAIT)  # the run exists, as after a while of running
    proxy.set(mode="http", status=status, retry_after=retry_after, path="log-batch")
    steps(sink, "refused", range(20))
    end(sink, "refused", 20)
    wait_until(lambda: sink.status()["retries"] >= 1, WAIT, "the steps' batch retried")
    close_within(sink, 3.0)
    store = Store(mlflow_server.uri)
    assert store.by_name(experiment_name)["refused"].info.status == "FINISHED"
    assert sink.status()["deferred"] > 0
    proxy.set()
    report = replay(journal_dir, tracking_uri=mlflow_server.uri)
    assert report.failed == 0
    assert_each_once(store.steps(store.by_name(experiment_name)["refused"]), range(20))


def test_a_close_that_takes_over_a_cycle_ends_its_run_before_reading_what_it_stored(
    proxy: FaultProxy,
    mlflow_server: MlflowServer,
    experiment_name: str,
    journal_dir: Path,
) -> None:
    """A cycle of 3,000 steps and the run's end is sending its first batch (1 s per request)
    when close(2.5) comes: the close takes the cycle over, and what its unanswered batch stored
    must be read back before those points go again (a read per metric). The run's end does not
    wait for those reads, nor for the batches: the run is FINISHED at the server, and replay
    lands every step once."""
    sink = make_sink(proxy.uri, experiment_name, flush_interval=60.0, batch_trigger=10**9)
    start(sink, "taken")
    assert sink.flush(WAIT)  # the run exists, as after a while of running
    second = patient(1.0)
    proxy.set(latency=second)
    steps(sink, "taken", range(3000))
    end(sink, "taken", 3000)
    batches = proxy.paths["/api/2.0/mlflow/runs/log-batch"]
    assert not sink.flush(0.001)  # the cycle begins now
    wait_until(
        lambda: proxy.paths["/api/2.0/mlflow/runs/log-batch"] > batches,
        patient(30),
        "the cycle's first batch sent",
    )
    close_within(sink, 2.5 * second)
    store = Store(mlflow_server.uri)
    wait_until(  # the end was sent within the deadline; its answer may come just after it
        lambda: store.by_name(experiment_name)["taken"].info.status == "FINISHED",
        patient(10),
        "the run FINISHED at the server",
    )
    assert sink.status()["deferred"] > 0  # the deadline did cut the steps short
    proxy.set()
    report = replay(journal_dir, tracking_uri=mlflow_server.uri)
    assert report.failed == 0
    assert_each_once(store.steps(store.by_name(experiment_name)["taken"]), range(3000))


def test_a_close_while_a_cycle_sends_its_spans_ends_the_open_run_before_them(
    proxy: FaultProxy,
    mlflow_server: MlflowServer,
    experiment_name: str,
    journal_dir: Path,
) -> None:
    """A run is open, its steps sent; the cycle that sent them is sending their spans, which
    the server holds (every trace request stalls). close(6) takes that cycle over at once and
    ends the run first (FAILED: it never reached on_run_end); its spans are kept, and replay
    sends them. Before, the cycle went on for 4 s, then its spans went again ahead of the
    run's end, and the run stayed RUNNING."""
    sink = make_sink(proxy.uri, experiment_name, flush_interval=0.2)
    start(sink, "open")
    assert sink.flush(WAIT)  # the run exists, as after a while of running
    proxy.set(mode="stall", path="traces")

    def trace_requests() -> int:
        return sum(n for path, n in proxy.paths.items() if "traces" in path)

    held = trace_requests()
    steps(sink, "open", range(20))
    wait_until(lambda: trace_requests() > held, WAIT, "the cycle's spans sent")
    store = Store(mlflow_server.uri)
    assert len(store.steps(store.by_name(experiment_name)["open"])) == 20
    close_within(sink, 6.0)
    assert store.by_name(experiment_name)["open"].info.status == "FAILED"
    assert sink.status()["deferred"] > 0  # the spans
    proxy.set()
    report = replay(journal_dir, tracking_uri=mlflow_server.uri)
    assert report.failed == 0
    run = store.by_name(experiment_name)["open"]
    assert run.info.status == "FAILED"
    assert_each_once(store.steps(run), range(20))


# -- 13. run creation is exactly once ----------------------------------------------------------


@pytest.mark.slow
def test_a_run_is_created_exactly_once_while_the_store_is_slow_to_commit(
    tmp_path: Path, experiment_name: str
) -> None:
    """The server's database write-locked (about 3 s) while a run is created with 1 s request
    timeouts: afterwards exactly one active MLflow run carries that run, and it is not RUNNING.
    Four rounds, one run each: which waiting request gets the database first is up to sqlite."""
    rounds = 4
    with local_server(tmp_path / "server") as server, FaultProxy(server.port) as proxy:
        sink = make_sink(proxy.uri, experiment_name, request_timeout=1.0)
        start(sink, "warm")
        end(sink, "warm", 0)
        assert sink.flush(WAIT)  # the experiment exists; only the runs' creation is slow
        database = server.sqlite_path
        assert database is not None

        def attempts() -> int:
            paths = proxy.paths
            return paths["/api/2.0/mlflow/runs/create"] + paths["/api/2.0/mlflow/runs/search"]

        def retried(before: int) -> Callable[[], bool]:
            return lambda: attempts() - before >= 3

        for n in range(rounds):
            before = attempts()
            lock = sqlite3.connect(database, isolation_level=None, timeout=30.0)
            lock.execute("BEGIN EXCLUSIVE")
            try:
                start(sink, f"slow-{n}")
                steps(sink, f"slow-{n}", range(5))
                # Hold the lock until the sink has given up on two answers about this run's
                # creation and asked a third time.
                wait_until(retried(before), WAIT, "the sink retried the creation")
            finally:
                lock.execute("COMMIT")
                lock.close()
            end(sink, f"slow-{n}", 5)
            sink.flush(patient(120))
        close_within(sink, 20.0)
        # The server may still be committing what the sink gave up waiting for.
        wait_until(lambda: proxy.in_flight == 0, WAIT, "the server answered every request")

        reader = Store(server.uri)
        active = reader.runs(experiment_name)
        problems = []
        for n in range(rounds):
            slow = [r for r in active if r.data.tags.get("run_id") == f"slow-{n}"]
            described = [(r.info.status, r.data.tags.get("rlm_mlflow.key")) for r in slow]
            if len(slow) != 1 or slow[0].info.status != "FINISHED":
                problems.append(f"slow-{n}: active runs {described}")
            elif sorted(reader.steps(slow[0])) != list(range(5)):
                problems.append(f"slow-{n}: steps {reader.steps(slow[0])}")
        assert not problems, problems


def warm_up(sink: MLflowSink) -> None:
    """A first run sent and flushed: the experiment exists, the worker is up."""
    start(sink, "warm")
    end(sink, "warm", 0)
    assert sink.flush(WAIT)


def held_run(sink: MLflowSink) -> None:
    """Run ``held``: started, five steps, ended (its create is the one a test holds)."""
    start(sink, "held")
    steps(sink, "held", range(5))
    end(sink, "held", 5)


@pytest.mark.parametrize("close_at_once", [False, True], ids=["flushed", "closed-at-once"])
def test_a_create_a_queue_commits_after_the_sink_gave_up_on_it_is_the_run_and_never_sent_twice(
    proxy: FaultProxy, store: Store, experiment_name: str, close_at_once: bool, journal_dir: Path
) -> None:
    """A queue in front of the server holds the run's create past the 1 s request timeout and
    forwards it 2.5 s after it was sent, when the agent has long ended the run. The sink looks
    for that create rather than sending another: one create reaches the server, and the one
    MLflow run carries every step and ends FINISHED, flushed first or closed at once. Nothing
    is left for replay: no journal is kept."""
    sink = make_sink(proxy.uri, experiment_name, request_timeout=1.0)
    warm_up(sink)  # the experiment exists; only the run's create is held
    creates = "/api/2.0/mlflow/runs/create"
    before = proxy.paths[creates]
    proxy.set(mode="late", latency=2.5, count=1, path="/runs/create")
    held_run(sink)
    if not close_at_once:
        assert sink.flush(patient(60))
    close_within(sink, 20.0)
    wait_until(lambda: proxy.handling == 0, WAIT, "the proxy forwarded everything it held")
    held = [r for r in store.runs(experiment_name) if r.data.tags.get("run_id") == "held"]
    assert [r.info.status for r in held] == ["FINISHED"], [r.info.run_id for r in held]
    assert sorted(store.steps(held[0])) == list(range(5))
    assert proxy.paths[creates] - before == 1, "a second create went while the first was held"
    assert not list(journal_dir.glob("*")), list(journal_dir.rglob("*"))


def test_a_held_create_is_looked_for_and_ended_by_a_close_too_short_for_a_new_run(
    proxy: FaultProxy, store: Store, experiment_name: str, journal_dir: Path
) -> None:
    """The server answered slowly (1.5 s) a moment ago, so a close of 7 s guesses that a run
    created now could not be ended in time. A queue holds the run's create past the 2 s
    request timeout and commits it 3.5 s after it was sent. That run exists: the close looks
    for it rather than keep the run for replay without a look, finds it, and ends it. Left to
    replay, it would stay RUNNING in MLflow meanwhile."""
    sink = make_sink(proxy.uri, experiment_name, request_timeout=2.0)
    proxy.set(latency=1.5)
    warm_up(sink)
    creates = "/api/2.0/mlflow/runs/create"
    before = proxy.paths[creates]
    proxy.set(mode="late", latency=3.5, count=1, path="/runs/create")
    held_run(sink)
    sink.flush(0.0)  # its cycle goes now; its create is held
    wait_until(lambda: proxy.paths[creates] > before, WAIT, "the held run's create went out")
    close_within(sink, 7.0)
    wait_until(lambda: proxy.handling == 0, WAIT, "the proxy forwarded everything it held")
    held = [r for r in store.runs(experiment_name) if r.data.tags.get("run_id") == "held"]
    assert [r.info.status for r in held] == ["FINISHED"], held
    assert_each_once(store.steps(held[0]), range(5))
    assert proxy.paths[creates] - before == 1, "a second create went while the first was held"
    assert not list(journal_dir.glob("*")), list(journal_dir.rglob("*"))


def test_a_duplicate_a_queue_commits_after_a_short_close_is_deleted_by_replay(
    proxy: FaultProxy, store: Store, experiment_name: str, journal_dir: Path
) -> None:
    """The same queue, but the sink is closed with 1.5 s: too little to wait out the held
    create's late window, so the run is created again at once and ended FINISHED by the close.
    The held create commits 2.5 s after it was sent, after the close: a duplicate, RUNNING.
    The close kept the run's key beside its journal; replay finds the duplicate and deletes
    it: one MLflow run, FINISHED, with every step."""
    sink = make_sink(proxy.uri, experiment_name, request_timeout=1.0)
    warm_up(sink)
    proxy.set(mode="late", latency=2.5, count=1, path="/runs/create")
    held_run(sink)
    close_within(sink, 1.5)
    wait_until(lambda: proxy.handling == 0, WAIT, "the proxy forwarded everything it held")
    held = [r for r in store.runs(experiment_name) if r.data.tags.get("run_id") == "held"]
    assert sorted(r.info.status for r in held) == ["FINISHED", "RUNNING"], held
    kept = list(journal_dir.glob("*/late-runs.json"))
    assert len(kept) == 1, list(journal_dir.rglob("*"))

    done = replay_cli(journal_dir, tracking_uri=proxy.uri)
    assert done.returncode == 0, done.stderr[-2000:]
    held = [r for r in store.runs(experiment_name) if r.data.tags.get("run_id") == "held"]
    assert [r.info.status for r in held] == ["FINISHED"], held
    assert sorted(store.steps(held[0])) == list(range(5))
    assert not list(journal_dir.glob("*/late-runs.json"))


#: What stands between the sink and the look for its run by key: a login page, a gateway that
#: times out, a redirect to a login host, a body limit.
SEARCH_BLOCKED = GATEWAY_ANSWERS


@pytest.mark.parametrize("blocked", list(SEARCH_BLOCKED))
def test_a_lost_create_looked_for_behind_a_login_page_is_completed_by_replay_once(
    mlflow_server: MlflowServer, store: Store, experiment_name: str, journal_dir: Path, blocked: str
) -> None:
    """Two faults on one run: a queue holds its create past the 1 s request timeout and commits
    it 2.5 s later, and the look for it by key meets a proxy's HTML 401 login page (or a 504
    gateway page, or a redirect to a login host). The sink sends no second create and keeps
    the run for replay; the committed run stays RUNNING meanwhile. Replay, once the page is
    gone, finds that run by its key and completes it: one create in all, one run, FINISHED,
    every step once, no journal left."""
    with FaultProxy(mlflow_server.port) as inner, FaultProxy(inner.port) as outer:
        sink = make_sink(outer.uri, experiment_name, request_timeout=1.0, retry_deadline=2.0)
        warm_up(sink)
        creates = "/api/2.0/mlflow/runs/create"
        before = inner.paths[creates]
        inner.set(mode="late", latency=2.5, count=1, path="/runs/create")
        outer.set(mode="http", path="/runs/search", **SEARCH_BLOCKED[blocked])
        held_run(sink)
        assert sink.flush(5.0) is False
        close_within(sink, 10.0)
        status = sink.status()
        assert_accounted(status)
        assert status["dropped"] == {}, status
        assert status["deferred"] > 0, status
        wait_until(lambda: inner.handling == 0, WAIT, "the queue forwarded the create it held")
        held = [r for r in store.runs(experiment_name) if r.data.tags.get("run_id") == "held"]
        assert [r.info.status for r in held] == ["RUNNING"], held
        assert outer.paths["/api/2.0/mlflow/runs/search"] >= 1, outer.paths

        outer.set(mode="pass")
        report = replay(journal_dir, tracking_uri=outer.uri)
        assert report.ok, report
        held = [r for r in store.runs(experiment_name) if r.data.tags.get("run_id") == "held"]
        assert [r.info.status for r in held] == ["FINISHED"], held
        assert_each_once(store.steps(held[0]), range(5))
        assert inner.paths[creates] - before == 1, inner.paths
    assert not [p for p in journal_dir.rglob("*") if p.is_file()], list(journal_dir.rglob("*"))


def test_a_413_page_on_a_runs_create_keeps_its_events_for_replay(
    proxy: FaultProxy, store: Store, experiment_name: str, journal_dir: Path
) -> None:
    """A body limit on the way answers the run's create (a small request that cannot be split)
    with a 413 page. That says nothing about the run's data: nothing is dropped, the run is
    kept for replay, and replay, once the limit is gone, sends it once."""
    sink = make_sink(proxy.uri, experiment_name)
    warm_up(sink)
    proxy.set(
        mode="http",
        status=413,
        body=SEARCH_BLOCKED["413 page"]["body"],
        path="/runs/create",
    )
    start(sink, "limited")
    steps(sink, "limited", range(5))
    end(sink, "limited", 5)
    close_within(sink, 10.0)
    status = sink.status()
    assert_accounted(status)
    assert status["dropped"] == {}, status
    assert status["deferred"] > 0, status
    assert "limited" not in store.by_name(experiment_name)
    proxy.set()
    report = replay(journal_dir, tracking_uri=proxy.uri)
    assert report.ok, report
    limited = store.by_name(experiment_name)["limited"]
    assert limited.info.status == "FINISHED"
    assert_each_once(store.steps(limited), range(5))


# -- 16, 17. credentials refused -----------------------------------------------------------------


@pytest.mark.parametrize("code", [401, 403])
def test_a_credentials_refusal_keeps_every_event_for_replay(
    proxy: FaultProxy, store: Store, experiment_name: str, journal_dir: Path, code: int
) -> None:
    """A 401/403 (a one-item batch included) marks nothing done: every event not sent is
    deferred and kept in the journal, and a replay once the refusal is over sends each once."""
    sink = make_sink(proxy.uri, experiment_name, retry_deadline=2.0)
    start(sink, "refused")
    assert sink.flush(WAIT)
    proxy.set(mode="http", status=code)
    sink.on_step("refused", event={"step": 0}, cumulative_reward=1.0)  # one metric: one item
    assert sink.flush(5.0) is False
    steps(sink, "refused", range(1, 11))
    end(sink, "refused", 11)
    assert sink.flush(5.0) is False
    close_within(sink, 5.0)

    status = sink.status()
    assert_accounted(status)
    assert status["dropped"] == {}
    assert status["deferred"] == status["accepted"] - status["sent"] == 12
    assert status["journal_backlog"] == status["deferred"]

    proxy.set(mode="pass")
    report = replay(journal_dir, tracking_uri=proxy.uri)
    assert report.ok, report
    run = store.run(experiment_name, "refused")
    assert_each_once(store.steps(run, "cumulative_reward"), range(11))
    assert_each_once(store.steps(run, "step_reward"), range(1, 11))
    assert run.info.status == "FINISHED"


@pytest.mark.slow
def test_an_html_401_mid_run_blocks_sending_without_a_request_or_a_log_line_per_event(
    proxy: FaultProxy,
    store: Store,
    experiment_name: str,
    journal_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A proxy answering every request with an HTML 401 page: the sink stops sending (a bounded
    number of requests, not one per event), says so a bounded number of times, reports
    health "blocked", and loses nothing: a later replay lands every step once."""
    caplog.set_level(logging.DEBUG, logger="rlm_mlflow")
    sink = make_sink(proxy.uri, experiment_name, retry_deadline=5.0)
    start(sink, "html")
    steps(sink, "html", range(10))
    assert sink.flush(WAIT)
    proxy.set(mode="http", status=401, body=HTML_401)
    before = proxy.requests
    caplog.clear()
    for burst in range(4):
        steps(sink, "html", range(10 + 100 * burst, 110 + 100 * burst))
        assert sink.flush(2.0) is False
    end(sink, "html", 410)
    sink.flush(2.0)
    during = sink.status()
    requests = proxy.requests - before
    refusals = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    close_within(sink, 5.0)
    after = sink.status()

    proxy.set(mode="pass")
    report = replay(journal_dir, tracking_uri=proxy.uri)
    run = store.run(experiment_name, "html")
    problems = []
    if not report.ok:
        problems.append(f"replay: {report}")
    if sorted(set(store.steps(run))) != list(range(410)) or len(store.steps(run)) != 410:
        problems.append(f"{len(store.steps(run))} step points after replay, expected 410 once")
    if run.info.status != "FINISHED":
        problems.append(f"run is {run.info.status}")
    if requests > 20:
        problems.append(f"{requests} requests while refused (for 401 events)")
    if len(refusals) > 5:
        problems.append(f"{len(refusals)} warnings while refused: {refusals[:3]}")
    if after["dropped"]:
        problems.append(f"dropped {after['dropped']}")
    if during.get("health") != "blocked":
        problems.append(f"health {during.get('health')!r} while refused, not 'blocked'")
    elif not re.search(r"401|credential", during["detail"]):
        problems.append(f"detail {during['detail']!r} says nothing of the refusal")
    assert not problems, problems


# -- 19, 20, 21, 22. odd answers and changes of the store -------------------------------------


def test_an_empty_200_answer_is_not_success_and_the_sink_recovers_once_answers_are_normal(
    proxy: FaultProxy, store: Store, experiment_name: str
) -> None:
    """Empty 200 answers to calls that need a body: flush() says False and last_error says why;
    once the server answers normally again the sink sends everything (it does not give up on the
    store for the rest of the process)."""
    proxy.set(mode="http", status=200, body=b"", content_type="application/json")
    sink = make_sink(proxy.uri, experiment_name)
    start(sink, "empty")
    steps(sink, "empty", range(5))
    flushed_while_empty = sink.flush(3.0)
    while_empty = sink.status()
    proxy.set(mode="pass")
    steps(sink, "empty", range(5, 10))
    end(sink, "empty", 10)
    recovered = sink.flush(WAIT)
    status = sink.status()
    close_within(sink, 10.0)

    run = store.by_name(experiment_name, missing_ok=True).get("empty")
    problems = []
    if flushed_while_empty:
        problems.append("flush() said True while nothing could be sent")
    if not while_empty["last_error"]:
        problems.append("no last_error while the answers were empty")
    if not recovered:
        problems.append(f"flush() still False after the answers were normal again: {status}")
    if run is None:
        problems.append("the run was never created")
    else:
        if sorted(set(store.steps(run))) != list(range(10)):
            problems.append(f"steps landed: {store.steps(run)}")
        if run.info.status != "FINISHED":
            problems.append(f"run is {run.info.status}")
    if status["available"] is not True or status.get("health") != "ok":
        problems.append(f"available {status['available']}, health {status.get('health')!r}")
    assert not problems, problems


@pytest.mark.slow
def test_a_server_redeployed_on_an_empty_database_gets_the_experiment_and_runs_back(
    tmp_path: Path, experiment_name: str
) -> None:
    """The server restarted on a fresh database mid-run: the live sink re-creates the experiment
    and the run, the steps logged since land, and status() showed the trouble while it lasted."""
    with local_server(tmp_path / "server") as server:
        sink = make_sink(server.uri, experiment_name)
        start(sink, "a")
        steps(sink, "a", range(10))
        assert sink.flush(WAIT)
        server.stop()
        steps(sink, "a", range(10, 20))

        def troubled() -> bool:
            status = sink.status()
            return status["available"] is False or status.get("health") not in (None, "ok")

        saw_trouble = eventually(troubled, 15.0)
        server.restart(fresh=True)
        steps(sink, "a", range(20, 30))
        start(sink, "b")
        steps(sink, "b", range(10))
        end(sink, "b", 10)
        end(sink, "a", 30)
        recovered = sink.flush(patient(120))
        status = sink.status()
        close_within(sink, 20.0)

        reader = Store(server.uri)
        runs = reader.by_name(experiment_name, missing_ok=True)
        problems = []
        if not recovered:
            problems.append(f"flush() never succeeded after the redeploy: {status}")
        for name, expected in (("a", range(10, 30)), ("b", range(10))):
            run = runs.get(name)
            if run is None:
                problems.append(f"run {name} is not in the new database")
                continue
            missing = sorted(set(expected) - set(reader.steps(run)))
            if missing:
                problems.append(f"run {name}: steps {missing} never landed")
            if run.info.status != "FINISHED":
                problems.append(f"run {name} is {run.info.status}")
        if not saw_trouble:
            problems.append("status() showed no trouble while the server was down")
        assert not problems, problems


def test_a_server_that_never_answers_shows_in_status_within_seconds(
    proxy: FaultProxy, experiment_name: str
) -> None:
    """Connections accepted, no answer ever: within seconds status() says data is not moving
    (health "stalled" or not available) and its detail says it is waiting, and for how long."""
    proxy.set(mode="stall")
    sink = make_sink(proxy.uri, experiment_name, request_timeout=120.0)
    start(sink, "stalled")
    steps(sink, "stalled", range(5))
    wait_until(lambda: proxy.requests >= 1, WAIT, "the worker's request hangs")

    def stalled() -> bool:
        status = sink.status()
        return status.get("health") == "stalled" or status["available"] is False

    noticed = eventually(stalled, 15.0)
    status = sink.status()
    proxy.set(mode="pass")
    close_within(sink, 10.0)
    assert noticed, status
    assert "waiting" in status["detail"], status["detail"]
    assert re.search(r"\d", status["detail"]), status["detail"]  # for how long


def test_a_deleted_experiment_blocks_the_sink_and_counts_each_event_once(
    mlflow_server: MlflowServer, store: Store, experiment_name: str
) -> None:
    """The experiment deleted mid-run: nothing more is sent, every event not sent is kept
    (deferred, never also counted refused), health "blocked", and detail says it was deleted."""
    sink = make_sink(mlflow_server.uri, experiment_name, retry_deadline=5.0)
    start(sink, "orphan")
    steps(sink, "orphan", range(5))
    assert sink.flush(WAIT)
    store.client.delete_experiment(store.experiment_id(experiment_name))
    steps(sink, "orphan", range(5, 10))
    start(sink, "late")  # a run that can no longer be created
    steps(sink, "late", range(5))
    end(sink, "late", 5)
    sink.flush(3.0)
    blocked = eventually(lambda: sink.status().get("health") == "blocked", 10.0)
    during = sink.status()
    end(sink, "orphan", 10)
    close_within(sink, 10.0)

    status = sink.status()
    assert_accounted(status)
    problems = []
    kept = status["accepted"] - status["sent"]
    if status["pending"] != 0 or status["dropped"]:
        problems.append(f"pending {status['pending']}, dropped {status['dropped']}")
    if status["deferred"] != kept or kept < 7:
        problems.append(f"{kept} events not sent, {status['deferred']} of them kept (deferred)")
    if status["journal_backlog"] != status["deferred"]:
        problems.append(f"journal backlog {status['journal_backlog']} != {status['deferred']}")
    if status.get("refused") != 0:
        problems.append(f"refused {status.get('refused')} besides deferred")
    if not blocked:
        problems.append(f"health {during.get('health')!r}, not 'blocked'")
    elif "deleted" not in during["detail"]:
        problems.append(f"detail {during['detail']!r} does not say the experiment was deleted")
    assert not problems, f"{problems}; status {status}"


# -- 23. the worker keeps up with busy agents --------------------------------------------------


@pytest.mark.slow
def test_the_worker_sends_while_four_threads_hook_without_pause(
    mlflow_server: MlflowServer, experiment_name: str
) -> None:
    """Four threads calling hooks as fast as they can: the worker still sends (status()["sent"]
    grows) while they are hooking, with the default settings."""
    sink = MLflowSink(enabled=True, experiment=experiment_name, tracking_uri=mlflow_server.uri)
    stop = threading.Event()

    def agent(n: int) -> None:
        start(sink, f"busy-{n}")
        i = 0
        while not stop.is_set():
            sink.on_step(f"busy-{n}", event={"step": i, "reward": 1.0}, cumulative_reward=1.0)
            i += 1
        end(sink, f"busy-{n}", i)

    agents = [threading.Thread(target=agent, args=(n,), daemon=True) for n in range(4)]
    for thread in agents:
        thread.start()
    try:
        progressed = eventually(lambda: sink.status()["sent"] > 0, 20.0)
        hooking = all(thread.is_alive() for thread in agents)
        status = sink.status()
    finally:
        stop.set()
        for thread in agents:
            thread.join(WAIT)
    close_within(sink, 5.0)
    assert hooking
    assert progressed, status

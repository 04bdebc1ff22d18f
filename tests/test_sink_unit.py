"""The sink against an in-memory MLflow: fast, no network, no server."""

from __future__ import annotations

import functools
import logging
import math
import threading
from pathlib import Path
from typing import Any

import pytest

from promises_support import asleep_until_woken, patient
from rlm_mlflow import MLflowSink, PermanentError, TransientError
from rlm_mlflow.testing import MemoryTransport, wait_for

FAST = {"flush_interval": 0.05, "retry_initial": 0.01, "retry_max_wait": 0.05}


def make_sink(memory: MemoryTransport, **kwargs: Any) -> MLflowSink:
    options: dict[str, Any] = {"enabled": True, "experiment": "unit", **FAST, **kwargs}
    return MLflowSink(transport=memory, **options)


def run_one(sink: MLflowSink, run_id: str, steps: int = 3, **params: Any) -> None:
    sink.on_run_start(run_id, task="solve it", environment="pure", params=params)
    for i in range(steps):
        sink.on_step(run_id, event={"step": i, "reward": 0.5}, cumulative_reward=0.5 * (i + 1))
    result = {"completed": True, "steps": steps, "total_reward": 0.5 * steps}
    sink.on_run_end(run_id, result=result, run_path=None)


def test_logs_what_the_seed_documents(tmp_path: Path) -> None:
    """Params, tags, per-step metrics, summary metrics, artifact and status, for one run."""
    memory = MemoryTransport()
    path = tmp_path / "r1.jsonl"
    path.write_text("{}\n")
    with make_sink(memory) as sink:
        sink.on_run_start(
            "r1",
            task="abcdef",
            environment="pure",
            params={"max_steps": 4, "model": "m", "skip": [1, 2], "none": None},
        )
        sink.on_step("r1", event={"step": 0, "reward": 0.25}, cumulative_reward=0.25)
        sink.on_step("r1", event={"step": 1, "reward": 1.0}, cumulative_reward=1.25)
        sink.on_run_end(
            "r1", result={"completed": True, "steps": 2, "total_reward": 1.25}, run_path=path
        )
        assert sink.flush(patient(10))
    run = memory.one("r1")
    assert run.params == {
        "environment": "pure",
        "task_chars": "6",
        "max_steps": "4",
        "model": "m",
        "none": "None",
    }
    assert run.tags["run_id"] == "r1"
    assert run.tags["component"] == "rlm-code-rlm"
    assert run.history("step_reward") == [(0, 0.25), (1, 1.0)]
    assert run.history("cumulative_reward") == [(0, 0.25), (1, 1.25)]
    assert run.history("completed") == [(0, 1.0)]
    assert run.history("steps") == [(0, 2.0)]
    assert run.history("total_reward") == [(0, 1.25)]
    assert run.artifacts == ["r1.jsonl"]
    assert run.status == "FINISHED"
    assert "abcdef" not in str(run.params)


def test_result_read_from_attributes_and_directory_artifact(tmp_path: Path) -> None:
    """A result object with attributes; a run_path directory uploads every file in it."""

    class Result:
        completed = False
        steps = 1
        total_reward = -1.0

    folder = tmp_path / "run"
    (folder / "code").mkdir(parents=True)
    (folder / "trajectory.jsonl").write_text("{}\n")
    (folder / "code" / "main.py").write_text("print(1)\n")
    memory = MemoryTransport()
    with make_sink(memory) as sink:
        sink.on_run_start("r", task="t", environment="e", params={})
        sink.on_step("r", event={"step": 0, "reward": -1.0}, cumulative_reward=-1.0)
        sink.on_run_end("r", result=Result(), run_path=folder)
    run = memory.one("r")
    assert run.history("completed") == [(0, 0.0)]
    assert run.history("total_reward") == [(0, -1.0)]
    assert sorted(run.artifacts) == ["code/main.py", "trajectory.jsonl"]


def test_disabled_sink_does_nothing() -> None:
    memory = MemoryTransport()
    sink = MLflowSink(enabled=False, transport=memory)
    run_one(sink, "r")
    assert sink.flush(patient(1))
    sink.close()
    assert memory.calls == []
    status = sink.status()
    assert status["enabled"] is False
    assert status["name"] == "mlflow"
    assert status["state"] == "idle" or status["state"] == "closed"


def test_runs_that_never_end_are_failed_on_close() -> None:
    memory = MemoryTransport()
    sink = make_sink(memory)
    sink.on_run_start("open", task="t", environment="e", params={})
    sink.on_step("open", event={"step": 0, "reward": 1.0}, cumulative_reward=1.0)
    run_one(sink, "done")
    sink.close()
    assert memory.one("open").status == "FAILED"
    assert memory.one("open").end_time_ms is not None
    assert memory.one("open").history("step_reward") == [(0, 1.0)]
    assert memory.one("done").status == "FINISHED"
    assert sink.status()["runs_open"] == 0


def test_nested_runs_on_one_thread_link_to_their_parent() -> None:
    memory = MemoryTransport()
    with make_sink(memory) as sink:
        sink.on_run_start("parent", task="t", environment="e", params={"depth": 0})
        sink.on_run_start(
            "child", task="t", environment="e", params={"depth": 1, "parent_run_id": "parent"}
        )
        sink.on_step("child", event={"step": 0, "reward": 1.0}, cumulative_reward=1.0)
        sink.on_run_end("child", result={"completed": True}, run_path=None)
        sink.on_step("parent", event={"step": 0, "reward": 2.0}, cumulative_reward=2.0)
        sink.on_run_end("parent", result={"completed": True}, run_path=None)
    parent, child = memory.one("parent"), memory.one("child")
    assert child.tags["mlflow.parentRunId"] == parent.run_uuid
    assert "mlflow.parentRunId" not in parent.tags
    assert child.history("step_reward") == [(0, 1.0)]
    assert parent.history("step_reward") == [(0, 2.0)]


def test_same_run_id_on_two_threads_gives_two_runs() -> None:
    """Run ids are microsecond timestamps: two threads can start the same id at once."""
    memory = MemoryTransport()
    barrier = threading.Barrier(2)
    with make_sink(memory) as sink:

        def agent(reward: float) -> None:
            sink.on_run_start("same", task="t", environment="e", params={})
            barrier.wait(5)  # both runs open at the same time
            for i in range(3):
                sink.on_step("same", event={"step": i, "reward": reward}, cumulative_reward=0.0)
            barrier.wait(5)
            sink.on_run_end("same", result={"completed": True}, run_path=None)

        threads = [threading.Thread(target=agent, args=(r,)) for r in (1.0, 2.0)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
    runs = memory.by_name("same")
    assert len(runs) == 2
    assert sorted(tuple(v for _, v in r.history("step_reward")) for r in runs) == [
        (1.0, 1.0, 1.0),
        (2.0, 2.0, 2.0),
    ]
    assert all(r.status == "FINISHED" for r in runs)
    assert sink.status()["rejected"]["duplicate_run_id"] == 1


def test_many_threads_many_runs_all_land_in_order() -> None:
    memory = MemoryTransport()
    with make_sink(memory, batch_trigger=50) as sink:

        def agent(n: int) -> None:
            run_id = f"run-{n}"
            sink.on_run_start(run_id, task="t", environment="e", params={"n": n})
            for i in range(200):
                sink.on_step(
                    run_id,
                    event={"step": i, "reward": float(n)},
                    cumulative_reward=float(n * (i + 1)),
                )
            sink.on_run_end(run_id, result={"completed": True, "steps": 200}, run_path=None)

        threads = [threading.Thread(target=agent, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sink.flush(patient(30))
    for n in range(8):
        run = memory.one(f"run-{n}")
        assert [s for s, _ in run.history("cumulative_reward")] == list(range(200))
        assert [v for _, v in run.history("cumulative_reward")] == [
            float(n * (i + 1)) for i in range(200)
        ]
        assert run.status == "FINISHED"
    assert sink.status()["sent"] == 8 * 202


def test_batches_stay_within_mlflow_limits() -> None:
    """1,500 steps (3,000 metrics) and 250 params go out in valid requests only."""
    memory = MemoryTransport()
    params = {f"p{i}": i for i in range(250)}
    with make_sink(memory, flush_interval=30, batch_trigger=100_000) as sink:
        # The worker up and asleep first: its first cycle comes as soon as it is set up, and
        # could take the run's start alone; here only the flush below sends the big run.
        run_one(sink, "warm", steps=1)
        assert sink.flush(patient(10))
        assert wait_for(functools.partial(asleep_until_woken, sink), patient(10))
        before = memory.calls.count("log_batch")
        sink.on_run_start("big", task="t", environment="e", params=params)
        for i in range(1500):
            sink.on_step("big", event={"step": i, "reward": 1.0}, cumulative_reward=float(i))
        sink.on_run_end("big", result={"completed": True}, run_path=None)
        assert sink.flush(patient(10))
    run = memory.one("big")
    assert len(run.params) == 252
    assert len(run.history("step_reward")) == 1500
    # 252 params need 3 requests; the 3,000 metrics ride along and add one more at most.
    assert memory.calls.count("log_batch") - before <= 5


def test_transient_errors_are_retried_until_data_lands() -> None:
    memory = MemoryTransport()
    failures = {"log_batch": 3, "create_run": 2}

    def fail(call: str) -> Exception | None:
        if failures.get(call, 0) > 0:
            failures[call] -= 1
            return TransientError(f"{call}: HTTP 503", retry_after=0.01)
        return None

    memory.fail = fail
    with make_sink(memory) as sink:
        run_one(sink, "r", steps=5)
        assert sink.flush(patient(10))
    run = memory.one("r")
    assert len(run.history("step_reward")) == 5
    assert sink.status()["retries"] == 5
    assert sink.status()["dropped"] == {}


def test_create_retried_after_lost_answer_makes_one_run() -> None:
    """A create that landed but whose answer was lost is found by its key, not created twice."""
    memory = MemoryTransport()
    lost = {"count": 1}
    real_create = memory.create_run

    def create_then_lose(*args: Any, **kwargs: Any) -> Any:
        ref = real_create(*args, **kwargs)
        if lost["count"]:
            lost["count"] -= 1
            raise TransientError("read timeout")
        return ref

    memory.create_run = create_then_lose  # type: ignore[method-assign]
    with make_sink(memory) as sink:
        run_one(sink, "r")
    assert len(memory.by_name("r")) == 1
    assert "find_runs" in memory.calls


def test_a_create_whose_answer_was_lost_is_not_sent_again_while_it_may_still_commit() -> None:
    """The first create waits in a busy server and its answer is lost: the look for it right
    after finds nothing, and the server commits it just then. No second create goes while the
    lost one's late window lasts: the run is found by its key, and no duplicate ever exists."""
    memory = MemoryTransport()
    held: list[dict[str, Any]] = []  # the create the server holds, committed after a look
    real_create, real_find = memory.create_run, memory.find_runs

    def held_create(experiment_id: str, **kwargs: Any) -> Any:
        if not held:
            held.append({"experiment_id": experiment_id, **kwargs})
            raise TransientError("read timeout", unanswered=True)  # committed later
        return real_create(experiment_id, **kwargs)

    def find_then_commit(experiment_id: str, key: str) -> Any:
        found = real_find(experiment_id, key)
        if held and held[0] and not found:
            late = held[0]
            held[0] = {}
            real_create(late.pop("experiment_id"), **late)
        return found

    memory.create_run = held_create  # type: ignore[method-assign]
    memory.find_runs = find_then_commit  # type: ignore[method-assign]
    with make_sink(memory, request_timeout=0.5) as sink:
        run_one(sink, "r", steps=3)
        assert sink.flush(patient(20))
    run = memory.one("r")
    assert run.status == "FINISHED"
    assert len(run.history("step_reward")) == 3
    assert len(memory.runs) == 1, "a second create went while the first could still commit"
    assert "delete_run" not in memory.calls


def test_runs_looking_for_their_lost_creates_leave_their_places_to_the_other_runs() -> None:
    """Four runs' creates have no answer (and are never committed), as many as runs are sent
    at a time: while they are looked for, a fifth run is created, sent and ended; each of the
    four is created again only once its late window is over, and exists once."""
    memory = MemoryTransport()
    lost = {f"a{n}" for n in range(4)}
    order: list[tuple[str, str]] = []
    real_create, real_end = memory.create_run, memory.set_terminated

    def create(experiment_id: str, **kwargs: Any) -> Any:
        run_id = dict(kwargs["tags"])["run_id"]
        order.append(("create", run_id))
        if run_id in lost:
            lost.discard(run_id)
            raise TransientError("read timeout", unanswered=True)  # never committed
        return real_create(experiment_id, **kwargs)

    def end(run_uuid: str, **kwargs: Any) -> None:
        order.append(("end", memory.runs[run_uuid].tags["run_id"]))
        real_end(run_uuid, **kwargs)

    memory.create_run = create  # type: ignore[method-assign]
    memory.set_terminated = end  # type: ignore[method-assign]
    with make_sink(memory, request_timeout=0.5) as sink:  # late window: 2 s
        for n in range(4):
            run_one(sink, f"a{n}")
        run_one(sink, "b")
        assert sink.flush(patient(20))
    assert all(memory.one(name).status == "FINISHED" for name in ("a0", "a1", "a2", "a3", "b"))
    created: set[str] = set()
    again = []  # where each of the four was created again
    for i, (what, name) in enumerate(order):
        if what == "create":
            if name in created:
                again.append(i)
            created.add(name)
    assert len(again) == 4, order
    assert order.index(("end", "b")) < min(again), order


@pytest.mark.parametrize("seen_at", ["later", "close"])
def test_a_create_committed_after_the_run_ended_is_deleted(seen_at: str) -> None:
    """A create whose answer was lost is still waiting in the server; the run is created again,
    logged and ended. The late create commits after all that: the sink deletes it once its late
    window is over, while running or, at the latest, at close."""
    memory = MemoryTransport()
    lost = {"count": 1}

    def lose_first_create(call: str) -> Exception | None:
        if call == "create_run" and lost["count"]:
            lost["count"] -= 1
            return TransientError("read timeout")  # never reached the store, here
        return None

    memory.fail = lose_first_create
    sink = make_sink(memory, request_timeout=0.2, shutdown_timeout=10.0)
    run_one(sink, "r")
    assert sink.flush(patient(20))
    kept = memory.one("r")
    assert kept.status == "FINISHED"
    # The lost create commits now: a second active run with the same key, empty and RUNNING.
    memory.fail = None
    memory.create_run(
        kept.experiment_id,
        run_name="r",
        start_time_ms=kept.start_time_ms,
        tags=list(kept.tags.items()),
    )
    assert len(memory.by_name("r")) == 2
    if seen_at == "close":
        sink.close()
    else:
        assert wait_for(lambda: len(memory.by_name("r")) == 1, 20)
    assert [run.run_uuid for run in memory.by_name("r")] == [kept.run_uuid]
    sink.close()


def test_a_refused_item_does_not_sink_the_batch() -> None:
    """MLflow refuses one param: it is isolated and counted, every other item lands."""
    memory = MemoryTransport()
    real = memory.log_batch

    def picky(run_uuid: str, **kwargs: Any) -> None:
        if any(k == "poison" for k, _ in kwargs.get("params", ())):
            raise PermanentError(
                "Changing param values is not allowed", code="INVALID_PARAMETER_VALUE"
            )
        real(run_uuid, **kwargs)

    memory.log_batch = picky  # type: ignore[method-assign]
    with make_sink(memory) as sink:
        run_one(sink, "r", steps=10, a=1, poison="x", b=2)
        sink.flush(10)
    run = memory.one("r")
    assert "poison" not in run.params
    assert {"a", "b", "environment", "task_chars"} <= set(run.params)
    assert len(run.history("step_reward")) == 10
    assert sink.status()["refused"] == 1
    assert run.status == "FINISHED"


@pytest.mark.parametrize("journal", [True, False])
def test_retry_budget_exhausted_is_counted_not_raised(journal: bool, journal_dir: Path) -> None:
    """Past the retry budget data is kept in the journal for replay, or counted lost without."""
    memory = MemoryTransport()
    memory.fail = lambda call: TransientError("HTTP 500") if call == "log_batch" else None
    with make_sink(memory, retry_deadline=0.2, journal=journal) as sink:
        run_one(sink, "r", steps=3)
        assert not sink.flush(10)
    status = sink.status()
    # The run was created, but its params and metrics never landed: all 5 events count.
    if journal:
        assert status["deferred"] == 5
        assert status["dropped"] == {}
        assert len(list(journal_dir.iterdir())) == 1  # kept for replay
    else:
        assert status["dropped"] == {"send_failed": 5}
        assert status["deferred"] == 0
    assert "HTTP 500" in status["last_error"]


@pytest.mark.parametrize("overflow", ["drop_newest", "drop_oldest"])
def test_full_queue_drops_steps_but_never_starts_or_ends(overflow: str) -> None:
    memory = MemoryTransport()
    gate = threading.Event()
    memory.fail = lambda call: None if gate.wait(10) else TransientError("gate")
    sink = make_sink(memory, queue_size=10, overflow=overflow, batch_trigger=10_000, journal=False)
    sink.on_run_start("r", task="t", environment="e", params={})
    for i in range(50):
        sink.on_step("r", event={"step": i, "reward": 1.0}, cumulative_reward=float(i))
    sink.on_run_end("r", result={"completed": True}, run_path=None)
    gate.set()
    sink.close(10)
    run = memory.one("r")
    status = sink.status()
    steps = [s for s, _ in run.history("step_reward")]
    assert status["dropped"]["queue_full"] == 50 - len(steps)
    assert len(steps) >= 10
    # The worker drains the queue while the hooks run, so room comes and goes; what is kept is
    # always in order, each step once, and the side the policy keeps is there.
    assert steps == sorted(set(steps))
    if overflow == "drop_newest":
        assert steps[:9] == list(range(9))  # the start and steps 0-8 filled the queue first
    else:
        assert steps[-1] == 49
    assert run.status == "FINISHED"
    assert run.history("completed") == [(0, 1.0)]


def test_full_queue_spills_to_the_journal_and_loses_nothing(
    journal_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the journal on, a full memory queue spills to disk; the worker reads it back in
    order once it catches up, across journal segments, and removes what it sent."""
    import rlm_mlflow._journal

    monkeypatch.setattr(rlm_mlflow._journal, "FIRST_SEGMENT", 2048)  # several segments
    monkeypatch.setattr(rlm_mlflow._journal, "MAX_SEGMENT", 4096)
    memory = MemoryTransport()
    gate = threading.Event()
    memory.fail = lambda call: None if gate.wait(10) else TransientError("gate")
    sink = make_sink(memory, queue_size=10, batch_trigger=10_000)
    for run in ("a", "b"):
        sink.on_run_start(run, task="t", environment="e", params={})
    for i in range(300):
        for run in ("a", "b"):
            sink.on_step(run, event={"step": i, "reward": 1.0}, cumulative_reward=float(i))
    for run in ("a", "b"):
        sink.on_run_end(run, result={"completed": True}, run_path=None)
    assert sink.status()["spilled"] > 500
    gate.set()
    assert sink.flush(patient(20))
    sink.close(10)
    status = sink.status()
    assert status["dropped"] == {}
    assert status["sent"] == status["accepted"] == 604
    for run in ("a", "b"):
        assert [s for s, _ in memory.one(run).history("step_reward")] == list(range(300))
        assert memory.one(run).status == "FINISHED"
    assert list(journal_dir.iterdir()) == []  # all sent: the journal is gone


def test_bad_input_is_counted_and_the_rest_lands(caplog: pytest.LogCaptureFixture) -> None:
    memory = MemoryTransport()
    caplog.set_level(logging.WARNING, logger="rlm_mlflow")
    with make_sink(memory) as sink:
        sink.on_run_start(
            "r",
            task=None,  # type: ignore[arg-type]
            environment="e",
            params={"ok": 1, "bad key!": 2, "nested": {"a": 1}, "long": "x" * 7000},
        )
        sink.on_step("r", event={"step": 0, "reward": math.nan}, cumulative_reward=1.0)
        sink.on_step("r", event={"step": 1, "reward": "high"}, cumulative_reward=math.inf)
        sink.on_step("r", event={"step": "two", "reward": 1.0}, cumulative_reward=2.0)
        sink.on_step("r", event=["not", "a", "dict"], cumulative_reward=3.0)  # type: ignore[arg-type]
        sink.on_step("r", event={"step": 4, "reward": 10**400}, cumulative_reward=4.0)
        sink.on_run_end("r", result=None, run_path="/does/not/exist.jsonl")
    run = memory.one("r")
    assert run.params["ok"] == "1"
    assert len(run.params["long"]) == 6000
    assert "bad key!" not in run.params
    assert "nested" not in run.params
    assert run.history("step_reward") == [(2, 1.0)]
    assert run.history("cumulative_reward") == [(0, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]
    assert run.status == "FINISHED"
    rejected = sink.status()["rejected"]
    for reason in (
        "param_bad_key",
        "param_not_scalar",
        "param_truncated",
        "bad_metric",
        "bad_step",
        "event_not_mapping",
        "artifact",
    ):
        assert rejected.get(reason, 0) >= 1, reason
    assert "rlm-mlflow run r" in caplog.text


def test_hooks_without_start_and_after_close() -> None:
    memory = MemoryTransport()
    sink = make_sink(memory)
    sink.on_step("orphan", event={"step": 0, "reward": 1.0}, cumulative_reward=1.0)
    sink.on_run_end("never-started", result={"completed": True}, run_path=None)
    sink.close()
    sink.on_run_start("late", task="t", environment="e", params={})
    sink.on_step("late", event={"step": 0, "reward": 1.0}, cumulative_reward=1.0)
    assert memory.one("orphan").history("step_reward") == [(0, 1.0)]
    assert memory.one("orphan").status == "FAILED"
    assert memory.one("never-started").status == "FINISHED"
    assert memory.by_name("late") == []
    status = sink.status()
    assert status["rejected"]["not_started"] == 2
    assert status["dropped"]["after_close"] == 2


def test_hooks_after_a_runs_end_are_dropped_not_taken_for_a_new_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A straggler step after ``on_run_end``, and a second ``on_run_end`` (from a ``finally:``)
    beside a good run: each is dropped and counted (``after_end``), with a warning naming the
    run (the first of them); no second MLflow run is made for either id, the ended runs keep
    what they had, and the run between them lands whole. Starting the id again is a new run,
    as before."""
    memory = MemoryTransport()
    sink = make_sink(memory)
    for run_id in ("straggler", "twice", "good"):
        sink.on_run_start(run_id, task="t", environment="e", params={})
        sink.on_step(run_id, event={"step": 0, "reward": 1.0}, cumulative_reward=1.0)
    sink.on_run_end("straggler", result={"completed": True, "steps": 1}, run_path=None)
    sink.on_run_end("twice", result={"completed": True, "steps": 1}, run_path=None)
    with caplog.at_level(logging.WARNING, logger="rlm_mlflow"):
        sink.on_step("straggler", event={"step": 1, "reward": 1.0}, cumulative_reward=2.0)
        sink.on_run_end("twice", result={"completed": False}, run_path=None)
    sink.on_step("good", event={"step": 1, "reward": 1.0}, cumulative_reward=2.0)
    sink.on_run_end("good", result={"completed": True, "steps": 2}, run_path=None)
    sink.on_run_start("twice", task="t", environment="e", params={})  # again: a new run
    sink.on_run_end("twice", result={"completed": True, "steps": 0}, run_path=None)
    sink.close()
    assert [run.status for run in memory.by_name("straggler")] == ["FINISHED"]
    assert memory.one("straggler").history("step_reward") == [(0, 1.0)]
    assert [run.status for run in memory.by_name("twice")] == ["FINISHED", "FINISHED"]
    assert memory.by_name("twice")[0].history("completed") == [(0, 1.0)]
    assert memory.one("good").history("step_reward") == [(0, 1.0), (1, 1.0)]
    status = sink.status()
    assert status["dropped"]["after_end"] == 2
    assert "not_started" not in status["rejected"]
    # The first of a kind is logged (the rest are counted: warnings are rate-limited).
    assert "rlm-mlflow run straggler: hook called after its on_run_end" in caplog.text


def test_close_is_idempotent_and_bounded_when_mlflow_hangs() -> None:
    memory = MemoryTransport()
    release = threading.Event()
    memory.fail = lambda call: None if release.wait(60) else TransientError("never released")
    sink = make_sink(memory)
    run_one(sink, "r")
    closer = threading.Thread(target=sink.close, args=(0.5,))
    closer.start()
    closer.join(20)
    assert not closer.is_alive()
    assert sink._worker.stopped.wait(20)
    sink.close()
    release.set()
    status = sink.status()
    assert status["deferred"] == status["accepted"] == 5  # kept in the journal for replay
    assert status["journal_backlog"] == 5
    assert status["state"] == "closed"


def test_a_close_that_leaves_events_says_why_and_what_to_do(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The store fails every request: the close's one warning names the cause (the store's
    state and its last error) and the command that sends what was kept."""
    caplog.set_level(logging.WARNING, logger="rlm_mlflow")
    memory = MemoryTransport()
    memory.fail = lambda call: TransientError("HTTP 503 from the proxy")
    sink = make_sink(memory)
    run_one(sink, "r")
    sink.close(0.5)
    assert sink._worker.stopped.wait(20)
    (line,) = [r.getMessage() for r in caplog.records if "stopped with" in r.getMessage()]
    assert "HTTP 503 from the proxy" in line
    assert "kept in" in line
    assert "rlm-mlflow replay" in line


def test_a_close_whose_deadline_comes_mid_request_still_ends_open_runs(journal_dir: Path) -> None:
    """The store hangs on the first request: the close deadline cuts it before the close began.
    The run left open is ended FAILED in the journal all the same, so a replay writes FAILED
    (the process did not die: not KILLED)."""
    from rlm_mlflow import replay

    memory = MemoryTransport()
    release = threading.Event()
    entered = threading.Event()

    def hang(call: str) -> None:
        entered.set()
        release.wait(60)

    memory.fail = hang
    sink = make_sink(memory, journal_dir=journal_dir)
    sink.on_run_start("open", task="t", environment="e", params={})
    sink.on_step("open", event={"step": 0, "reward": 1.0}, cumulative_reward=1.0)
    assert entered.wait(20)
    sink.close(0.5)
    assert sink._worker.stopped.wait(20)
    release.set()

    store = MemoryTransport()
    report = replay(journal_dir, transport=store)
    assert report.runs_killed == 0
    assert [run.status for run in store.by_name("open")] == ["FAILED"]


def test_status_reports_live_figures_and_redacts_credentials() -> None:
    sink = MLflowSink(
        enabled=True,
        tracking_uri="https://alice:s3cret@mlflow.example:5000/?token=abc123",
        transport=MemoryTransport(),
    )
    status = sink.status()
    assert "s3cret" not in str(status)
    assert "abc123" not in str(status)
    assert "s3cret" not in repr(sink)
    for key in (
        "name",
        "enabled",
        "available",
        "detail",
        "experiment",
        "queue_depth",
        "queue_capacity",
        "accepted",
        "sent",
        "dropped",
        "retries",
        "refused",
        "runs_open",
        "last_error",
    ):
        assert key in status
    sink.close()


def test_mlflow_missing_makes_sink_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a)
    )
    sink = MLflowSink(enabled=True)
    run_one(sink, "r")
    status = sink.status()
    assert status["available"] is False
    assert "mlflow" in status["detail"]
    assert status["accepted"] == 0
    sink.close()


def test_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from rlm_mlflow import create_mlflow_sink_from_env

    monkeypatch.setenv("DSPY_RLM_MLFLOW_ENABLED", "yes")
    monkeypatch.setenv("DSPY_RLM_MLFLOW_EXPERIMENT", "from-env")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.setenv("RLM_MLFLOW_QUEUE_SIZE", "123")
    sink = create_mlflow_sink_from_env(transport=MemoryTransport())
    assert sink.config.enabled
    assert sink.config.experiment == "from-env"
    assert sink.config.tracking_uri == "http://127.0.0.1:9"
    assert sink.status()["queue_capacity"] == 123
    sink.close()
    monkeypatch.setenv("DSPY_RLM_MLFLOW_ENABLED", "off")
    monkeypatch.delenv("DSPY_RLM_MLFLOW_EXPERIMENT")
    other = MLflowSink.from_env()
    assert not other.config.enabled
    assert other.config.experiment == "rlm-code-rlm"


@pytest.mark.parametrize(
    ("step", "reward", "total"),
    [
        (3, 0.5, 1.5),
        (3, 1e300, -2.5e-300),
        (3, 1, 1.5),
        (True, 0.5, 1.0),
        (3, math.nan, 1.0),
        (2**70, 0.5, 1.0),
        (None, "x", 1.0),
    ],
)
def test_step_records_round_trip(step: Any, reward: Any, total: Any) -> None:
    """The fixed layout and the JSON fallback decode to the same values (huge ints described)."""
    from rlm_mlflow._codec import decode, plain, step_parts
    from rlm_mlflow._events import Step

    got = decode(b"".join(step_parts(7, 1234, step, reward, total)))
    assert isinstance(got, Step)
    assert (got.run_no, got.timestamp_ns) == (7, 1234)
    assert got.step == plain(step)
    assert got.cumulative_reward == total
    assert got.reward == plain(reward) or (math.isnan(got.reward) and math.isnan(reward))


def test_a_sink_never_used_makes_no_journal_and_no_thread(journal_dir: Path) -> None:
    """Files and threads are made on first use: a sink constructed and closed unused has none."""
    threads = threading.active_count()
    sink = MLflowSink(enabled=True, transport=MemoryTransport())
    assert not journal_dir.exists()
    assert threading.active_count() == threads
    sink.close()
    assert not journal_dir.exists()


def test_an_idle_sink_lets_go_of_its_journal(
    journal_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once everything is sent and nothing happens, the journal folder and its files go; a
    fresh, empty one the worker made takes its place, and the next event writes there."""
    import rlm_mlflow._worker

    monkeypatch.setattr(rlm_mlflow._worker, "JOURNAL_IDLE", 0.0)
    memory = MemoryTransport()
    sink = make_sink(memory)
    sink.on_run_start("first", task="solve it", environment="pure", params={})
    # Read while the run is open (an open run keeps its journal): once it has ended and been
    # sent, the worker may swap the journal before the test reads the sink's status.
    first = Path(str(sink.status()["journal"]))
    sink.on_step("first", event={"step": 0, "reward": 0.5}, cumulative_reward=0.5)
    sink.on_run_end("first", result={"completed": True, "steps": 1}, run_path=None)
    assert sink.flush(patient(10))
    assert wait_for(lambda: not first.exists())
    fresh = sink.status()["journal"]
    assert fresh is not None
    assert [p.name for p in journal_dir.iterdir()] == [Path(fresh).name]
    run_one(sink, "second")
    assert sink.flush(patient(10))
    sink.close()
    assert [r.status for r in memory.runs.values()] == ["FINISHED", "FINISHED"]
    assert list(journal_dir.iterdir()) == []


class _RefusingParent(MemoryTransport):
    """Creates every run but ``parent`` while ``refuse`` is set (a transient failure)."""

    refuse = True

    def create_run(self, experiment_id: str, *, run_name: str, **kwargs: Any) -> Any:
        if self.refuse and dict(kwargs["tags"]).get("run_id") == "parent":
            raise TransientError("the server could not create it this time")
        return super().create_run(experiment_id, run_name=run_name, **kwargs)


def test_a_child_whose_parent_failed_in_its_cycle_is_kept_and_replay_links_it(
    journal_dir: Path,
) -> None:
    """The parent's create fails in the same cycle as its child's start and end: the child is
    not created without its link (kept with its parent); replay creates the parent, then the
    child under it, FINISHED."""
    from rlm_mlflow import replay

    memory = _RefusingParent()
    gate = threading.Event()

    def hold_first_cycle(call: str) -> None:
        if call == "get_or_create_experiment":
            gate.wait(30)

    memory.fail = hold_first_cycle
    sink = make_sink(memory, journal_dir=journal_dir, retry_deadline=0.2)
    sink.on_run_start("parent", task="t", environment="e", params={})
    run_one(sink, "child", steps=2, parent_run_id="parent", depth=1)
    gate.set()  # one cycle holds the parent's start and the whole child
    sink.close(1.0)
    assert memory.by_name("child") == []
    assert sink.status()["deferred"] == 5, sink.status()

    memory.refuse = False
    report = replay(journal_dir, transport=memory)
    assert report.ok, report
    (parent,) = memory.by_name("parent")
    (child,) = memory.by_name("child")
    assert child.tags.get("mlflow.parentRunId") == parent.run_uuid, child.tags
    assert child.status == "FINISHED"
    assert [m.step for m in child.metrics if m.key == "step_reward"] == [0, 1]

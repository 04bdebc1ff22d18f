"""Promises about hostile values and odd call orders, checked in a real store.

A bad value costs only itself: it is rejected and counted, the run it belongs to still lands
everything else and ends as it should, and other runs never notice.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from promises_support import (
    WAIT,
    Store,
    assert_accounted,
    assert_each_once,
    close_within,
    end,
    journal_folders,
)
from rlm_mlflow import MLflowSink
from rlm_mlflow.testing import MlflowServer, free_port

pytestmark = pytest.mark.integration

FAST: dict[str, Any] = {"flush_interval": 0.2, "retry_initial": 0.1, "retry_max_wait": 1.0}


def make_sink(uri: str, experiment: str, **kwargs: Any) -> MLflowSink:
    return MLflowSink(enabled=True, experiment=experiment, tracking_uri=uri, **{**FAST, **kwargs})


def step(sink: MLflowSink, run_id: str, number: Any) -> None:
    sink.on_step(run_id, event={"step": number, "reward": 1.0}, cumulative_reward=2.0)


def rejected(sink: MLflowSink) -> int:
    return sum(sink.status()["rejected"].values())


# -- 8. one run's bad values cost the other run nothing -------------------------------------------


def test_a_bad_value_in_one_run_costs_another_run_of_the_same_drain_nothing(
    mlflow_server: MlflowServer, store: Store, experiment_name: str
) -> None:
    """Run A has a param 10**5000 (its str() raises) and a step 2**70 (beyond int64); run B,
    logged at the same time, lands completely; A is created, its good data lands, it ends
    FINISHED, and the two bad values are counted in ``rejected``."""
    sink = make_sink(mlflow_server.uri, experiment_name, flush_interval=1.0)
    sink.on_run_start("a", task="t", environment="pure_rlm", params={"huge": 10**5000, "good": 1})
    sink.on_run_start("b", task="t", environment="pure_rlm", params={"good": 2})
    for i in range(10):
        step(sink, "a", 2**70 if i == 5 else i)
        step(sink, "b", i)
    end(sink, "a", 10)
    end(sink, "b", 10)
    close_within(sink, 20.0)

    status = sink.status()
    runs = store.by_name(experiment_name)
    problems = []
    b = runs.get("b")
    if b is None:
        problems.append("run b was never created")
    else:
        if b.data.params != {"environment": "pure_rlm", "task_chars": "1", "good": "2"}:
            problems.append(f"run b params {b.data.params}")
        if store.steps(b) != list(range(10)):
            problems.append(f"run b steps {store.steps(b)}")
        if [value for _, value in store.points(b, "steps")] != [10.0]:
            problems.append("run b has no summary")
        if b.info.status != "FINISHED":
            problems.append(f"run b is {b.info.status}")
    a = runs.get("a")
    if a is None:
        problems.append("run a was never created")
    else:
        if a.data.params.get("good") != "1" or a.data.params.get("environment") != "pure_rlm":
            problems.append(f"run a params {a.data.params}")
        if store.steps(a) != [0, 1, 2, 3, 4, 6, 7, 8, 9]:
            problems.append(f"run a steps {store.steps(a)}")
        if a.info.status != "FINISHED":
            problems.append(f"run a is {a.info.status}")
    if sum(status["rejected"].values()) < 2:
        problems.append(f"rejected {status['rejected']}")
    assert not problems, problems
    assert_accounted(status)
    assert status["pending"] == 0


# -- 9. a result object that breaks ------------------------------------------------------------


class BrokenResult:
    """A runtime's result whose ``completed`` property fails with something not AttributeError."""

    steps = 3
    total_reward = 3.0

    @property
    def completed(self) -> bool:
        raise RuntimeError("the runtime's result object broke")


def test_a_result_whose_attribute_raises_still_ends_the_run_finished(
    mlflow_server: MlflowServer, store: Store, experiment_name: str, journal_dir: Path
) -> None:
    """``result.completed`` raising RuntimeError: the run still ends FINISHED with what could be
    read (steps, total_reward), and nothing is left in the journal."""
    sink = make_sink(mlflow_server.uri, experiment_name)
    sink.on_run_start("broken", task="t", environment="e", params={})
    for i in range(3):
        step(sink, "broken", i)
    sink.on_run_end("broken", result=BrokenResult(), run_path=None)
    close_within(sink, 20.0)

    run = store.run(experiment_name, "broken")
    assert run.info.status == "FINISHED"
    assert [value for _, value in store.points(run, "steps")] == [3.0]
    assert [value for _, value in store.points(run, "total_reward")] == [3.0]
    assert_each_once(store.steps(run), range(3))
    assert journal_folders(journal_dir) == []
    status = sink.status()
    assert_accounted(status)
    assert status["deferred"] == 0


# -- 10. step numbers beyond int64 ---------------------------------------------------------------


@pytest.mark.parametrize("where", ["server", "sqlite"])
def test_steps_beyond_int64_are_rejected_and_counted_and_the_rest_lands(
    mlflow_server: MlflowServer, tmp_path: Path, experiment_name: str, where: str
) -> None:
    """Steps 2**63 and -2**63 - 1 do not fit MLflow's int64: both are rejected and counted, and
    every other step of the run lands (through a server, and into a ``sqlite:///`` store)."""
    uri = mlflow_server.uri if where == "server" else f"sqlite:///{tmp_path / 'mlflow.db'}"
    sink = make_sink(uri, experiment_name)
    sink.on_run_start("wide", task="t", environment="e", params={})
    for i in range(5):
        step(sink, "wide", i)
    step(sink, "wide", 2**63)
    step(sink, "wide", -(2**63) - 1)
    for i in range(5, 10):
        step(sink, "wide", i)
    end(sink, "wide", 10)
    close_within(sink, 30.0)

    reader = Store(uri)
    run = reader.run(experiment_name, "wide")
    assert reader.steps(run) == list(range(10))
    assert run.info.status == "FINISHED"
    status = sink.status()
    assert rejected(sink) >= 2, status["rejected"]
    assert_accounted(status)
    assert status["pending"] == 0
    assert status["deferred"] == 0


# -- 11. a step before its run's start -----------------------------------------------------------


@pytest.mark.parametrize("drained", [False, True], ids=["same-drain", "start-after-a-drain"])
def test_a_step_before_its_run_start_keeps_the_start_environment(
    mlflow_server: MlflowServer, store: Store, experiment_name: str, drained: bool
) -> None:
    """A step logged before on_run_start (the run opened implicitly), then the start with
    environment="pure_rlm": the MLflow run's environment param is "pure_rlm", nothing refused."""
    sink = make_sink(mlflow_server.uri, experiment_name)
    step(sink, "early", 0)
    if drained:
        sink.flush(WAIT)
    sink.on_run_start("early", task="abc", environment="pure_rlm", params={"max_steps": 3})
    step(sink, "early", 1)
    step(sink, "early", 2)
    end(sink, "early", 3)
    close_within(sink, 20.0)

    run = store.run(experiment_name, "early")
    assert run.data.params.get("environment") == "pure_rlm", run.data.params
    assert run.data.params.get("max_steps") == "3", run.data.params
    assert_each_once(store.steps(run), range(3))
    assert run.info.status == "FINISHED"
    status = sink.status()
    assert_accounted(status)
    assert status["dropped"] == {}
    assert status["refused"] == 0
    assert status["sent"] == status["accepted"]


# -- 12. status() under concurrent hooks ---------------------------------------------------------


def test_status_never_raises_while_threads_hook(experiment_name: str) -> None:
    """Four threads opening and ending runs while the main thread calls status() 20,000
    times: status() never raises."""
    dead = f"http://127.0.0.1:{free_port()}"  # where data goes does not matter here
    sink = make_sink(dead, experiment_name, journal=False, queue_size=1000)
    stop = threading.Event()

    def agent(n: int) -> None:
        k = 0
        while not stop.is_set():  # five hundred runs open at a time, then ended, again and again
            run_ids = [f"s{n}-{k}-{i}" for i in range(500)]
            for run_id in run_ids:
                sink.on_run_start(run_id, task="t", environment="e", params={})
                step(sink, run_id, 0)
            for run_id in run_ids:
                end(sink, run_id, 1)
            k += 1

    agents = [threading.Thread(target=agent, args=(n,), daemon=True) for n in range(4)]
    for thread in agents:
        thread.start()
    errors: list[str] = []
    # Hand the GIL over every 10 microseconds instead of every 5 ms, so that the threads
    # interleave inside status() as they would on a busy machine, not once in a while.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        for _ in range(20_000):
            try:
                sink.status()
            except Exception as exc:  # the promise under test: collected, reported below
                errors.append(repr(exc))
    finally:
        sys.setswitchinterval(interval)
        stop.set()
        for thread in agents:
            thread.join(WAIT)
    close_within(sink, 2.0)
    assert errors == [], f"{len(errors)} status() calls raised, e.g. {errors[:3]}"

"""Values the hooks are given, checked where they enter: a user's object is never asked for its
truth value, one bad field of a step is left out on its own (counted, said once) while the step's
rewards and its other fields land, and texts and names MLflow would lose are made valid."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import pytest

from rlm_mlflow import MLflowSink
from rlm_mlflow.testing import MemoryTransport, MlflowServer


class Unconvertible:
    def __float__(self) -> float:
        raise RuntimeError("no float")

    def __str__(self) -> str:
        raise RuntimeError("no str")


class Unreadable(dict[str, Any]):
    """A mapping whose every read raises (a lazy proxy whose backend is gone)."""

    def get(self, key: str, default: Any = None) -> Any:
        raise RuntimeError(f"cannot read {key}")


USAGE = {"prompt_tokens": 7, "completion_tokens": 3}

# (name, the step's event beside step/reward/usage, problems that must be counted)
STEP_FIELDS: list[tuple[str, dict[str, Any], bool]] = [
    ("execution-time-huge-int", {"observation": {"execution_time": 10**400}}, True),
    ("execution-time-nan", {"observation": {"execution_time": math.nan}}, False),
    ("execution-time-inf", {"observation": {"execution_time": -math.inf}}, False),
    ("execution-time-object", {"observation": {"execution_time": Unconvertible()}}, False),
    ("observation-unreadable", {"observation": Unreadable(stdout="x")}, True),
    ("action-unreadable", {"action": Unreadable(code="x")}, True),
    ("texts-unprintable", {"action": {"code": Unconvertible()}}, False),
    ("model-call-unreadable", {"llm_calls": [Unreadable(model="m")]}, True),
    ("model-call-usage-unreadable", {"llm_calls": [{"model": "m", "usage": Unreadable()}]}, True),
    ("depth-huge", {"depth": 10**400}, False),
]


@pytest.mark.parametrize(
    ("name", "fields", "counted"), STEP_FIELDS, ids=[case[0] for case in STEP_FIELDS]
)
def test_a_bad_field_of_a_step_is_left_out_and_the_step_lands(
    name: str, fields: dict[str, Any], counted: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="rlm_mlflow")
    memory = MemoryTransport()
    with MLflowSink(enabled=True, experiment="x", transport=memory, flush_interval=0.05) as sink:
        sink.on_run_start(name, task="t", environment="e", params={})
        sink.on_step(name, event={"step": 0, "reward": 1.0}, cumulative_reward=1.0)
        for n in (1, 2):  # twice: said once, counted each time
            event = {"step": n, "reward": 2.0, "usage": USAGE, **fields}
            sink.on_step(name, event=event, cumulative_reward=1.0 + 2.0 * n)
        sink.on_run_end(name, result={"completed": True}, run_path=None)
        assert sink.flush(30)
    status = sink.status()
    run = memory.one(name)
    assert run.status == "FINISHED"
    assert run.history("step_reward") == [(0, 1.0), (1, 2.0), (2, 2.0)]
    assert run.history("step_input_tokens") == [(1, 7.0), (2, 7.0)]  # the good field beside
    assert "hook_error" not in status["rejected"]
    assert status["dropped"] == {}
    if counted:
        assert status["rejected"].get("bad_step_field", 0) >= 2, status["rejected"]
        said = [r.getMessage() for r in caplog.records if "left out of the step" in r.getMessage()]
        assert len(said) == 1, said
        assert name in said[0]


def test_a_mapping_event_with_an_unreadable_field_keeps_its_rewards() -> None:
    class Event(dict[str, Any]):
        pass

    memory = MemoryTransport()
    event = Event(step=1, reward=2.0, observation=Unreadable(), usage=USAGE)
    with MLflowSink(enabled=True, experiment="x", transport=memory, flush_interval=0.05) as sink:
        sink.on_run_start("mapping", task="t", environment="e", params={})
        sink.on_step("mapping", event=event, cumulative_reward=2.0)
        sink.on_run_end("mapping", result={"completed": True}, run_path=None)
        assert sink.flush(30)
    run = memory.one("mapping")
    assert run.history("step_reward") == [(1, 2.0)]
    assert run.history("step_input_tokens") == [(1, 7.0)]
    assert "hook_error" not in sink.status()["rejected"]


def test_an_array_as_parent_run_id_is_an_unknown_parent_not_a_lost_run() -> None:
    np = pytest.importorskip("numpy")
    memory = MemoryTransport()
    with MLflowSink(enabled=True, experiment="x", transport=memory, flush_interval=0.05) as sink:
        sink.on_run_start("child", task="t", environment="e", params={"parent_run_id": np.ones(3)})
        sink.on_step("child", event={"step": 0, "reward": 1.0}, cumulative_reward=1.0)
        sink.on_run_end("child", result={"completed": True}, run_path=None)
        assert sink.flush(30)
    assert memory.one("child").history("step_reward") == [(0, 1.0)]
    assert sink.status()["rejected"]["parent_unknown"] == 1


def final_responses() -> list[tuple[str, Callable[[], Any]]]:
    np = pytest.importorskip("numpy")
    pd = pytest.importorskip("pandas")
    return [
        ("numpy-array", lambda: np.arange(6).reshape(2, 3)),
        ("numpy-empty", lambda: np.array([])),
        ("dataframe", lambda: pd.DataFrame({"answer": [1, 2], "score": [0.5, 0.7]})),
        ("series", lambda: pd.Series([1.0, 2.0])),
    ]


@pytest.mark.integration
def test_an_array_or_dataframe_final_response_ends_the_run_finished_with_its_summary(
    mlflow_server: MlflowServer,
    experiment_name: str,
    read_runs: Callable[[str], dict[str, Any]],
) -> None:
    """Asking an array or a DataFrame for its truth value raises: the run's end must not."""
    cases = final_responses()
    with MLflowSink(
        enabled=True, experiment=experiment_name, tracking_uri=mlflow_server.uri, flush_interval=0.1
    ) as sink:
        for name, make in cases:
            sink.on_run_start(name, task="t", environment="e", params={})
            sink.on_step(name, event={"step": 0, "reward": 1.0}, cumulative_reward=1.0)
            result = {"completed": True, "steps": 1, "total_reward": 1.0, "final_response": make()}
            sink.on_run_end(name, result=result, run_path=None)
        assert sink.flush(120)
        status = sink.status()
    assert "hook_error" not in status["rejected"], status["rejected"]
    runs = read_runs(experiment_name)
    for name, _ in cases:
        run = runs[name]
        assert run.info.status == "FINISHED", name
        assert run.data.metrics["completed"] == 1.0, name
        assert run.data.metrics["total_reward"] == 1.0, name
        assert run.data.metrics["steps"] == 1.0, name

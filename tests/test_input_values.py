"""Values the hooks are given, checked where they enter: a user's object is never asked for its
truth value, one bad field of a step is left out on its own (counted, said once) while the step's
rewards and its other fields land, and texts and names MLflow would lose are made valid."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import pytest

from promises_support import Store, patient
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
    ("execution-time-object", {"observation": {"execution_time": Unconvertible()}}, True),
    ("success-not-a-bool", {"observation": {"success": "yes"}}, True),
    ("observation-unreadable", {"observation": Unreadable(stdout="x")}, True),
    ("action-unreadable", {"action": Unreadable(code="x")}, True),
    ("texts-unprintable", {"action": {"code": Unconvertible()}}, False),
    ("model-call-unreadable", {"llm_calls": [Unreadable(model="m")]}, True),
    ("model-call-usage-unreadable", {"llm_calls": [{"model": "m", "usage": Unreadable()}]}, True),
    ("depth-huge", {"depth": 10**400}, True),
    (
        "usage-one-count-bad",
        {"usage": {"input_tokens": 7, "output_tokens": 10**400, "total_tokens": math.nan}},
        True,
    ),
    ("model-call-time-huge", {"llm_calls": [{"model": "m", "start_ns": 10**400}]}, True),
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
        assert sink.flush(patient(30))
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
        assert sink.flush(patient(30))
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
        assert sink.flush(patient(30))
    assert memory.one("child").history("step_reward") == [(0, 1.0)]
    assert sink.status()["rejected"]["parent_unknown"] == 1


def traces_of(store: Store, experiment: str) -> list[Any]:
    experiment_id = store.experiment_id(experiment)
    assert experiment_id is not None
    found: list[Any] = store.client.search_traces(locations=[experiment_id])
    return found


def test_numpy_counts_and_times_are_kept_not_dropped() -> None:
    """Counts from numpy (an int64 is not an int) used to become 0 without a word."""
    np = pytest.importorskip("numpy")
    memory = MemoryTransport()
    event = {
        "step": 1,
        "reward": 2.0,
        "usage": {"prompt_tokens": np.int64(7), "completion_tokens": np.int32(3)},
        "observation": {"execution_time": np.float64(0.5), "success": True},
        "depth": np.int16(0),
    }
    with MLflowSink(enabled=True, experiment="x", transport=memory, flush_interval=0.05) as sink:
        sink.on_run_start("numpy", task="t", environment="e", params={})
        sink.on_step("numpy", event=event, cumulative_reward=2.0)
        sink.on_run_end("numpy", result={"completed": True}, run_path=None)
        assert sink.flush(patient(30))
    run = memory.one("numpy")
    assert run.history("step_input_tokens") == [(1, 7.0)]
    assert run.history("step_output_tokens") == [(1, 3.0)]
    assert sink.status()["rejected"] == {}


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
        assert sink.flush(patient(120))
        status = sink.status()
    assert "hook_error" not in status["rejected"], status["rejected"]
    runs = read_runs(experiment_name)
    for name, _ in cases:
        run = runs[name]
        assert run.info.status == "FINISHED", name
        assert run.data.metrics["completed"] == 1.0, name
        assert run.data.metrics["total_reward"] == 1.0, name
        assert run.data.metrics["steps"] == 1.0, name


@pytest.mark.integration
def test_a_lone_surrogate_in_a_param_is_replaced_and_every_param_beside_it_lands(
    mlflow_server: MlflowServer,
    experiment_name: str,
    store: Store,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """MLflow answers 200 to a param value holding a lone surrogate, stores '' and loses every
    param after it in the request: the value is sent with U+FFFD instead, counted, said once."""
    caplog.set_level(logging.WARNING, logger="rlm_mlflow")
    params: dict[str, Any] = {f"a{n:02}": n for n in range(10)}
    params["hostile"] = "x\ud800y"
    params.update({f"z{n:02}": f"v{n}" for n in range(10)})
    with MLflowSink(
        enabled=True, experiment=experiment_name, tracking_uri=mlflow_server.uri, flush_interval=0.1
    ) as sink:
        for run_id in ("first", "second"):
            sink.on_run_start(run_id, task="t", environment="e", params=params)
            sink.on_step(run_id, event={"step": 0, "reward": 1.0}, cumulative_reward=1.0)
            sink.on_run_end(run_id, result={"completed": True}, run_path=None)
        assert sink.flush(patient(60))
        status = sink.status()
    assert status["rejected"].get("text_replaced", 0) >= 2, status["rejected"]
    said = [r.getMessage() for r in caplog.records if "surrogate" in r.getMessage()]
    assert len(said) == 1, said
    for run_id in ("first", "second"):
        stored = store.run(experiment_name, run_id).data.params
        for key, value in params.items():
            if key != "hostile":
                assert stored[key] == str(value), (run_id, key)
        assert stored["hostile"] == "x\ufffdy"


@pytest.mark.integration
def test_a_run_id_with_a_lone_surrogate_names_its_run_and_its_run_id_tag(
    mlflow_server: MlflowServer, experiment_name: str, store: Store
) -> None:
    run_id = "run-\udc80-surrogate"
    clean = "run-\ufffd-surrogate"
    with MLflowSink(
        enabled=True, experiment=experiment_name, tracking_uri=mlflow_server.uri, flush_interval=0.1
    ) as sink:
        sink.on_run_start(run_id, task="t", environment="e", params={"good": 1})
        sink.on_step(run_id, event={"step": 0, "reward": 1.0}, cumulative_reward=1.0)
        sink.on_run_end(run_id, result={"completed": True}, run_path=None)
        assert sink.flush(patient(60))
        status = sink.status()
    assert status["rejected"].get("text_replaced", 0) >= 1, status["rejected"]
    (run,) = store.runs(experiment_name)
    assert run.info.run_name == "t · rogate"  # its task, then the end of its id
    assert run.data.tags["run_id"] == clean
    assert run.data.params["good"] == "1"
    assert run.info.status == "FINISHED"
    (trace,) = traces_of(store, experiment_name)
    assert trace.info.tags["run_id"] == clean


@pytest.mark.integration
def test_a_very_long_run_id_is_cut_to_mlflow_s_limits_and_its_spans_land(
    mlflow_server: MlflowServer,
    experiment_name: str,
    store: Store,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """MLflow refused every span of a run whose id was 10,000 characters long (a trace name is
    at most 4,096): names are cut, counted once, and logs show a short form of the id."""
    caplog.set_level(logging.WARNING, logger="rlm_mlflow")
    run_id = "r" * 10_000
    with MLflowSink(
        enabled=True, experiment=experiment_name, tracking_uri=mlflow_server.uri, flush_interval=0.1
    ) as sink:
        sink.on_run_start(run_id, task="t", environment="e", params={})
        sink.on_step(run_id, event={"step": 0, "reward": 1.0}, cumulative_reward=1.0)
        sink.on_run_end(run_id, result={"completed": True}, run_path=None)
        assert sink.flush(patient(60))
        status = sink.status()
    assert status["dropped"] == {}, status
    assert status["rejected"].get("name_cut") == 1, status["rejected"]
    (run,) = store.runs(experiment_name)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "t · rrrrrr"  # its task, then the end of its id
    (trace,) = traces_of(store, experiment_name)
    assert len(trace.data.spans) == 2  # the run and its step
    assert trace.info.tags["mlflow.traceName"] == "t · rrrrrr"  # named as its run
    (agent,) = [span for span in trace.data.spans if span.span_type == "AGENT"]
    assert run_id.startswith(agent.attributes["rlm.run_id"])
    assert all(len(r.getMessage()) < 1000 for r in caplog.records)


def test_every_text_a_record_gives_the_worker_is_valid_utf8() -> None:
    """Hooks keep a lone surrogate as it came (no cost on their path); the worker's decoding is
    the one door to MLflow, live or replayed: there it becomes U+FFFD and the event says so."""
    from rlm_mlflow import _codec
    from rlm_mlflow._events import RunEnd, RunStart, Step

    start = _codec.decode(
        _codec.encode_start(
            1,
            1,
            run_id="r\ud800",
            environment="e\udfff",
            task_chars=1,
            params={"k": "v\udc80"},
            parent_no=None,
            task=_codec.text_document("t\ud800", "task", True),
        )
    )
    assert isinstance(start, RunStart)
    assert (start.run_id, start.environment, start.params) == (
        "r\ufffd",
        "e\ufffd",
        {"k": "v\ufffd"},
    )
    assert start.task is not None
    assert start.task.text == "t\ufffd"
    assert start.replaced
    end = _codec.decode(
        _codec.encode_end(1, 2, run_id="r\ud800", status="FINISHED", final=["f\ud800", 2, False])
    )
    assert isinstance(end, RunEnd)
    assert end.run_id == "r\ufffd"
    assert end.final is not None
    assert end.final.text == "f\ufffd"
    assert end.replaced
    plain_start = _codec.decode(
        _codec.encode_start(
            1, 1, run_id="r", environment="e", task_chars=1, params={}, parent_no=None
        )
    )
    assert isinstance(plain_start, RunStart)
    assert not plain_start.replaced
    event = {
        "step": 1,
        "reward": 1.0,
        "action": {"code": "c\ud800"},
        "llm_calls": [{"model": "m\ud800", "input": "i\udfff"}],
    }
    detail, _ = _codec.step_detail(event, True)
    step = _codec.decode(b"".join(_codec.step_parts(1, 3, "s\ud800", 1.0, 1.0, detail=detail)))
    assert isinstance(step, Step)
    assert step.step == "s\ufffd"
    assert step.detail is not None
    assert step.detail.code is not None
    assert step.detail.code.text == "c\ufffd"
    (call,) = step.detail.calls
    assert call.model == "m\ufffd"
    assert call.input is not None
    assert call.input.text == "i\ufffd"

"""A root run still running is on MLflow's Traces page, with the steps it has finished so far."""

from __future__ import annotations

import pytest

from promises_support import Store, patient, span_label
from rlm_mlflow import MLflowSink
from rlm_mlflow.testing import MlflowServer
from test_traces import FAST, rich, traces_of

pytestmark = pytest.mark.integration


def test_a_running_root_run_is_on_the_traces_page_with_its_steps_so_far(
    mlflow_server: MlflowServer, store: Store, experiment_name: str
) -> None:
    """MLflow stores spans whose trace has no root span yet as a trace IN_PROGRESS (its
    ``log_spans`` takes the trace's state from the root span when there is one): after a
    drain, the open run's trace is listed with its finished steps; at the run's end the same
    trace gets its root span and its final state."""
    with MLflowSink(
        enabled=True, experiment=experiment_name, tracking_uri=mlflow_server.uri, **FAST
    ) as sink:
        sink.on_run_start("live", task="still thinking", environment="e", params={})
        sink.on_step("live", event=rich(1, (10, 2)), cumulative_reward=0.5)
        sink.on_step("live", event=rich(2, (10, 2)), cumulative_reward=1.0)
        assert sink.flush(patient(60))
        (running,) = traces_of(store, experiment_name)
        assert running.info.state == "IN_PROGRESS"
        assert sorted(span.name for span in running.data.spans) == [
            "step 1: run_python",
            "step 2: run_python",
        ]
        assert store.run(experiment_name, "live").info.status == "RUNNING"
        sink.on_step("live", event=rich(3, (10, 2)), cumulative_reward=1.5)
        sink.on_run_end("live", result={"completed": True}, run_path=None)
    (ended,) = traces_of(store, experiment_name)
    assert ended.info.trace_id == running.info.trace_id
    assert ended.info.state == "OK"
    assert sorted(span_label(span) for span in ended.data.spans) == [
        "live",
        "step 1: run_python",
        "step 2: run_python",
        "step 3: run_python",
    ]

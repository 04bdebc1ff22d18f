"""Tokens counted once: RLM Code's real runner, a scripted model that reports what each call
used, a run that delegates to children (on a thread pool or nested on one thread) and one that
runs out of steps (its closing summary is a model call outside any step). The trace's token
total in MLflow is exactly what the model reported spending, in all."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from rlm_mlflow import MLflowSink
from rlm_mlflow.testing import MlflowServer
from test_rlm_code import FAST, FakeExecutionEngine, ScriptedModel, rlm_code  # noqa: F401

pytestmark = [
    pytest.mark.integration,
    # RLM Code warns that its pure_rlm environment falls back to exec(); we never use it.
    pytest.mark.filterwarnings("ignore:PureRLMEnvironment is using exec:UserWarning"),
]


class CountingModel(ScriptedModel):
    """The scripted model, keeping count of what each call used the way RLM Code's connectors
    do (``usage_snapshot``, read by the runner before and after each step and run)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.calls = 0

    def generate_response(
        self, prompt: str, system_prompt: str | None = None, context: Any = None
    ) -> str:
        if "Step: " in prompt:
            answer = super().generate_response(prompt, system_prompt, context)
        else:  # the summary a run that did not finish asks for at its end
            answer = "a summary of what was done"
        with self.lock:  # counts that differ from call to call
            self.calls += 1
            self.prompt_tokens += 7 + len(prompt) % 50
            self.completion_tokens += 3 + len(answer) % 20
        return answer

    def usage_snapshot(self) -> dict[str, int]:
        with self.lock:
            return {
                "total_calls": self.calls,
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
            }


@pytest.mark.parametrize("max_steps", [5, 2], ids=["completed", "out-of-steps"])
@pytest.mark.parametrize("parallelism", [2, 1], ids=["children-in-parallel", "nested-one-thread"])
def test_the_trace_total_is_what_the_model_spent(
    rlm_code: Any,  # noqa: F811
    mlflow_server: MlflowServer,
    experiment_name: str,
    tmp_path: Path,
    parallelism: int,
    max_steps: int,
) -> None:
    from mlflow import MlflowClient
    from rlm_code.rlm.observability import RLMObservability

    model = CountingModel()
    workdir = tmp_path / "work"
    workdir.mkdir()
    sink = MLflowSink(
        enabled=True, experiment=experiment_name, tracking_uri=mlflow_server.uri, **FAST
    )
    try:
        runner = rlm_code.RLMRunner(
            llm_connector=model,
            execution_engine=FakeExecutionEngine(),
            run_dir=tmp_path / "runs",
            workdir=workdir,
            observability=RLMObservability(sinks=[sink]),
        )
        result = runner.run_task(
            "root: split the work",
            max_steps=max_steps,
            environment="generic",
            parallelism=parallelism,
        )
        assert sink.flush(60)
    finally:
        sink.close()
    assert result.completed is (max_steps == 5)
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    experiment = client.get_experiment_by_name(experiment_name)
    assert experiment is not None
    (found,) = client.search_traces(locations=[experiment.experiment_id])
    trace = client.get_trace(found.info.trace_id)
    runs = [span for span in trace.data.spans if span.span_type == "AGENT"]
    assert len(runs) == 4  # the root, two children and a grandchild
    spent = model.usage_snapshot()
    assert spent["total_calls"] > 4
    assert trace.info.token_usage == {
        "input_tokens": spent["prompt_tokens"],
        "output_tokens": spent["completion_tokens"],
        "total_tokens": spent["prompt_tokens"] + spent["completion_tokens"],
    }
    # Each step span still shows the usage its runtime reported for it.
    steps = [span for span in trace.data.spans if span.name.startswith("step ")]
    assert steps
    assert all(
        span.attributes["mlflow.chat.tokenUsage"] == span.attributes["rlm.usage"] for span in steps
    )


class Hostile:
    """A ``usage_summary`` that raises on every read."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError("no")


class HostileMapping(dict[str, Any]):
    def get(self, key: str, default: Any = None) -> Any:
        raise RuntimeError("no")


@pytest.mark.parametrize(
    ("summary", "expected"),
    [
        ({"prompt_tokens": 50, "completion_tokens": 9, "total_calls": 3}, 59.0),  # more: taken
        ({"prompt_tokens": 5, "completion_tokens": 1}, 24.0),  # less than the steps: not
        ({"prompt_tokens": -5, "completion_tokens": 1}, 24.0),
        ({"prompt_tokens": "lots"}, 24.0),
        (HostileMapping(), 24.0),
        (Hostile(), 24.0),
        ("not a mapping", 24.0),
    ],
    ids=["more", "less", "negative", "text", "mapping-raises", "object-raises", "a-string"],
)
def test_a_runs_usage_summary_counts_when_it_holds_more(summary: Any, expected: float) -> None:
    """A run's total is what the runtime reports for it when that holds more than its steps
    (calls outside any step); a bad one is ignored, the steps' sum kept, the hook never raises."""
    from types import SimpleNamespace

    from rlm_mlflow.testing import MemoryTransport

    memory = MemoryTransport()
    sink = MLflowSink(enabled=True, experiment="unit", transport=memory, **FAST)
    try:
        sink.on_run_start("r", task="t", environment="generic", params={})
        for number in (1, 2):
            usage = {"prompt_tokens": 10, "completion_tokens": 2}
            sink.on_step("r", event={"step": number, "usage": usage}, cumulative_reward=0.0)
        result = SimpleNamespace(completed=True, steps=2, total_reward=0.0, usage_summary=summary)
        sink.on_run_end("r", result=result, run_path=None)
        assert sink.flush(30)
    finally:
        sink.close()
    assert memory.one("r").history("total_tokens") == [(0, expected)]
    assert sink.status()["dropped"] == {}

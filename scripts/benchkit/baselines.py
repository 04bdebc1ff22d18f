"""The sinks ours is compared with, and one factory for every sink a benchmark can drive.

- ``none``: no logging at all, the workload's own cost;
- ``sync``: the seed, RLM Code's synchronous fluent-API sink (``mlflow.start_run``,
  ``log_params``, ``set_tags``, ``log_metric`` x2 per step, ``log_metrics``, ``log_artifact``,
  ``end_run``);
- ``async``: the same sink with MLflow's own async logging (``synchronous=False``);
- ``tracing``: every run tree as an MLflow trace through MLflow's own tracing API
  (``MlflowClient.start_trace`` / ``start_span`` / ``end_span`` / ``end_trace``, async export);
- ``ours``: ``rlm_mlflow.MLflowSink``, with keyword arguments from the spec.

Every sink here has the three hooks plus ``flush(timeout) -> bool`` and ``close(timeout)``, so
drivers and tasks treat them alike. mlflow and rlm_mlflow are imported only when a sink is made.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LABELS = {
    "none": "no sink (reference)",
    "sync": "seed: fluent API, synchronous",
    "async": "MLflow async logging (synchronous=False)",
    "tracing": "MLflow tracing (MlflowClient spans, async export)",
    "ours": "rlm_mlflow.MLflowSink",
    "ours_nojournal": "rlm_mlflow.MLflowSink, journal=False",
}
SHORT = {
    "sync": "sync (seed)",
    "async": "MLflow async",
    "tracing": "MLflow tracing",
    "ours": "rlm_mlflow",
}
#: The sinks compared side by side, in the order of the tables.
COMPARED = ("sync", "async", "ours")
#: The sinks compared on traces.
TRACE_COMPARED = ("tracing", "ours")


class NullSink:
    """No logging at all: the workload's own wall time, for reference."""

    def on_run_start(self, run_id: str, **kwargs: Any) -> None:
        pass

    def on_step(self, run_id: str, **kwargs: Any) -> None:
        pass

    def on_run_end(self, run_id: str, **kwargs: Any) -> None:
        pass

    def flush(self, timeout: float | None = None) -> bool:
        return True

    def close(self, timeout: float | None = None) -> None:
        pass


class SeedFluentSink:
    """The seed's sink as its documentation describes it, with ``synchronous`` passed through.

    ``synchronous=True`` is the seed itself; ``synchronous=False`` is what a user of the seed would
    switch to: MLflow's own async logging. Both keep the fluent API's per-thread active run, so a
    nested run started on the thread of its open parent fails (``start_run`` raises) and every
    event of that child is skipped: counted here in ``lost`` instead of logged as a warning.
    """

    name = "mlflow"

    def __init__(self, *, experiment: str, tracking_uri: str, synchronous: bool) -> None:
        import mlflow

        self._mlflow = mlflow
        self._sync = synchronous
        self._active_runs: set[str] = set()
        self.lost: Counter[str] = Counter()
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_experiment(experiment)

    def on_run_start(
        self, run_id: str, *, task: str, environment: str, params: dict[str, Any]
    ) -> None:
        try:
            self._mlflow.start_run(run_name=run_id)
            self._active_runs.add(run_id)
            safe = {
                key: value
                for key, value in params.items()
                if value is None or isinstance(value, str | int | float | bool)
            }
            safe["environment"] = environment
            safe["task_chars"] = len(task)
            self._mlflow.log_params(safe, synchronous=self._sync)
            self._mlflow.set_tags(
                {"run_id": run_id, "component": "rlm-code-rlm"}, synchronous=self._sync
            )
        except Exception:
            self.lost["on_run_start failed (run not tracked)"] += 1

    def on_step(self, run_id: str, *, event: dict[str, Any], cumulative_reward: float) -> None:
        if run_id not in self._active_runs:
            self.lost["on_step skipped (run not tracked)"] += 1
            return
        try:
            step = int(event.get("step") or 0)
            reward = float(event.get("reward") or 0.0)
            self._mlflow.log_metric("step_reward", reward, step=step, synchronous=self._sync)
            self._mlflow.log_metric(
                "cumulative_reward", cumulative_reward, step=step, synchronous=self._sync
            )
        except Exception:
            self.lost["on_step failed"] += 1

    def on_run_end(self, run_id: str, *, result: Any, run_path: Path | None) -> None:
        try:
            if run_id not in self._active_runs:
                self.lost["on_run_end skipped (run not tracked)"] += 1
                return
            self._mlflow.log_metrics(
                {
                    "completed": 1.0 if bool(getattr(result, "completed", False)) else 0.0,
                    "steps": float(getattr(result, "steps", 0)),
                    "total_reward": float(getattr(result, "total_reward", 0.0)),
                },
                synchronous=self._sync,
            )
            if run_path is not None and run_path.exists():
                self._mlflow.log_artifact(str(run_path))
            self._mlflow.end_run()
            self._active_runs.remove(run_id)
        except Exception:
            self.lost["on_run_end failed"] += 1
            with contextlib.suppress(Exception):
                self._mlflow.end_run()
            self._active_runs.discard(run_id)

    def flush(self, timeout: float | None = None) -> bool:
        if not self._sync:
            self._mlflow.flush_async_logging()
        return True

    def close(self, timeout: float | None = None) -> None:
        pass


#: MLflow's switch for exporting traces off the caller's thread (on by default in mlflow 3.x);
#: the tracing baseline sets it explicitly, before mlflow is imported.
ASYNC_TRACE_ENV = "MLFLOW_ENABLE_ASYNC_TRACE_LOGGING"


@dataclass
class _OpenRun:
    """A run the tracing baseline has a span open for."""

    trace_id: str
    span_id: str
    root: bool
    depth: int
    last_ns: int
    parent: _OpenRun | None = None
    steps: int = 0
    pending: Any = None  # the span of a step whose child runs started before it was reported
    tokens: list[int] = field(default_factory=lambda: [0, 0])  # its steps' usage, summed
    children_usage: list[int] = field(default_factory=lambda: [0, 0])


def _tokens(usage: object) -> tuple[int, int]:
    if not isinstance(usage, Mapping):
        return 0, 0
    return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)


def _token_usage(tokens_in: int, tokens_out: int) -> dict[str, int]:
    return {
        "input_tokens": tokens_in,
        "output_tokens": tokens_out,
        "total_tokens": tokens_in + tokens_out,
    }


class MlflowTracingSink:
    """RLM Code's hooks turned into MLflow traces with MLflow's own client tracing API.

    The same tree as ours, span for span: one trace per root run (``start_trace`` at its start,
    ``end_trace`` at its end), a span per step (``start_span`` and ``end_span`` in ``on_step``,
    started when the run's previous step ended), and under a step that delegated a child run
    span per child and a model span with the step's own tokens. A child run starts before its
    parent's step is reported, so that step's span is opened when the first child starts and
    ended when the step arrives. The same content: code and rationale as inputs, stdout, stderr
    and success as outputs, token usage, reward, depth, status.

    Export is MLflow's: a batch span processor and an async export queue (``MLFLOW_ENABLE_ASYNC_
    TRACE_LOGGING=true``), spans sent incrementally over OTLP, the trace's info at its end.
    Hook failures are counted in ``lost`` (RLM Code's coordinator would log them and go on).
    """

    name = "mlflow-tracing"

    def __init__(self, *, experiment: str, tracking_uri: str) -> None:
        os.environ[ASYNC_TRACE_ENV] = "true"
        import mlflow
        from mlflow import MlflowClient

        self._mlflow = mlflow
        mlflow.set_tracking_uri(tracking_uri)
        self._experiment_id = mlflow.set_experiment(experiment).experiment_id
        self._client = MlflowClient(tracking_uri)
        self._runs: dict[str, _OpenRun] = {}
        self._lock = threading.Lock()
        self.lost: Counter[str] = Counter()
        self.spans_started = 0

    def on_run_start(
        self, run_id: str, *, task: str, environment: str, params: dict[str, Any]
    ) -> None:
        try:
            now = time.time_ns()
            parent_id = params.get("parent_run_id")
            depth = int(params.get("depth") or 0)
            parent = self._runs.get(parent_id) if isinstance(parent_id, str) else None
            attributes: dict[str, Any] = {
                "rlm.run_id": run_id,
                "rlm.environment": environment,
                "rlm.depth": depth,
            }
            client = self._client
            if parent is None:
                span = client.start_trace(
                    name=run_id,
                    span_type="AGENT",
                    inputs={"task": task},
                    attributes=attributes,
                    tags={"run_id": run_id, "component": "rlm-code-rlm"},
                    experiment_id=self._experiment_id,
                    start_time_ns=now,
                )
            else:
                if parent.pending is None:  # the parent's current step delegates
                    parent.pending = client.start_span(
                        name=f"step {parent.steps + 1}",
                        trace_id=parent.trace_id,
                        parent_id=parent.span_id,
                        span_type="CHAIN",
                        start_time_ns=parent.last_ns,
                    )
                    self.spans_started += 1
                span = client.start_span(
                    name=run_id,
                    trace_id=parent.trace_id,
                    parent_id=parent.pending.span_id,
                    span_type="AGENT",
                    inputs={"task": task},
                    attributes=attributes,
                    start_time_ns=now,
                )
            self.spans_started += 1
            with self._lock:
                self._runs[run_id] = _OpenRun(
                    span.trace_id, span.span_id, parent is None, depth, now, parent
                )
        except Exception:
            self.lost["on_run_start failed"] += 1

    def on_step(self, run_id: str, *, event: dict[str, Any], cumulative_reward: float) -> None:
        run = self._runs.get(run_id)
        if run is None:
            self.lost["on_step skipped (run not traced)"] += 1
            return
        try:
            self._step(run, event, cumulative_reward)
        except Exception:
            self.lost["on_step failed"] += 1

    def _step(self, run: _OpenRun, event: dict[str, Any], cumulative_reward: float) -> None:
        now = time.time_ns()
        client = self._client
        action = event.get("action")
        action = action if isinstance(action, Mapping) else {"action": action}
        observation = event.get("observation")
        observation = observation if isinstance(observation, Mapping) else {}
        number = event.get("step")
        label = f"step {number}: {action.get('action')}"
        inputs = {k: action[k] for k in ("code", "rationale") if action.get(k) is not None}
        outputs = {
            k: observation[k]
            for k in ("stdout", "stderr", "success")
            if observation.get(k) is not None
        }
        tokens_in, tokens_out = _tokens(event.get("usage"))
        run.tokens[0] += tokens_in
        run.tokens[1] += tokens_out
        attributes: dict[str, Any] = {
            "rlm.step": number,
            "rlm.reward": event.get("reward"),
            "rlm.cumulative_reward": cumulative_reward,
            "rlm.depth": event.get("depth", run.depth),
            "rlm.execution_time": observation.get("execution_time"),
        }
        span = run.pending
        run.pending = None
        if span is None:
            span = client.start_span(
                name=label,
                trace_id=run.trace_id,
                parent_id=run.span_id,
                span_type="TOOL" if "code" in action else "CHAIN",
                inputs=inputs or None,
                start_time_ns=run.last_ns,
            )
            self.spans_started += 1
            attributes["mlflow.chat.tokenUsage"] = _token_usage(tokens_in, tokens_out)
        else:  # it delegated: its own tokens (minus its children's) on a model span of its own
            with contextlib.suppress(Exception):
                span._span.update_name(label)
            if inputs:
                span.set_inputs(inputs)
            own_in = tokens_in - run.children_usage[0]
            own_out = tokens_out - run.children_usage[1]
            run.children_usage = [0, 0]
            model = client.start_span(
                name="model",
                trace_id=run.trace_id,
                parent_id=span.span_id,
                span_type="LLM",
                attributes={"mlflow.chat.tokenUsage": _token_usage(own_in, own_out)},
                start_time_ns=span.start_time_ns,
            )
            self.spans_started += 1
            client.end_span(run.trace_id, model.span_id, end_time_ns=now)
        success = observation.get("success")
        client.end_span(
            run.trace_id,
            span.span_id,
            outputs=outputs or None,
            attributes=attributes,
            status="ERROR" if success is False else "OK",
            end_time_ns=now,
        )
        run.steps += 1
        run.last_ns = now

    def on_run_end(self, run_id: str, *, result: Any, run_path: Path | None) -> None:
        with self._lock:
            run = self._runs.pop(run_id, None)
        if run is None:
            self.lost["on_run_end skipped (run not traced)"] += 1
            return
        try:
            now = time.time_ns()
            completed = bool(getattr(result, "completed", False))
            outputs = {
                "completed": completed,
                "steps": getattr(result, "steps", None),
                "total_reward": getattr(result, "total_reward", None),
            }
            status = "OK" if completed else "ERROR"
            if run.root:
                self._client.end_trace(
                    run.trace_id, outputs=outputs, status=status, end_time_ns=now
                )
                return
            self._client.end_span(
                run.trace_id, run.span_id, outputs=outputs, status=status, end_time_ns=now
            )
            if run.parent is not None:  # counted again in the parent's next step: subtracted
                run.parent.children_usage[0] += run.tokens[0]
                run.parent.children_usage[1] += run.tokens[1]
        except Exception:
            self.lost["on_run_end failed"] += 1

    def flush(self, timeout: float | None = None) -> bool:
        self._mlflow.flush_trace_async_logging()
        return True

    def close(self, timeout: float | None = None) -> None:
        pass


def make_sink(kind: str, uri: str, experiment: str, options: dict[str, Any] | None = None) -> Any:
    """A sink of ``kind`` sending to ``uri``; ``options`` are ``MLflowSink`` keyword arguments."""
    if kind == "none":
        return NullSink()
    if kind in ("sync", "async"):
        return SeedFluentSink(experiment=experiment, tracking_uri=uri, synchronous=kind == "sync")
    if kind == "tracing":
        return MlflowTracingSink(experiment=experiment, tracking_uri=uri)
    if kind == "ours":
        from rlm_mlflow import MLflowSink

        return MLflowSink(enabled=True, experiment=experiment, tracking_uri=uri, **(options or {}))
    raise ValueError(f"unknown sink {kind!r}")

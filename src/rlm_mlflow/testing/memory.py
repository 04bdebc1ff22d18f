"""An in-memory MLflow for fast unit tests: no network, no server, no mlflow import.

``MemoryTransport`` is a :class:`rlm_mlflow.Transport` that keeps what a sink sends in
dictionaries a test reads back (``one(name)``, ``by_name(name)``, ``spans``); ``wait_for`` polls
a condition with a deadline instead of sleeping a fixed time.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._exceptions import PermanentError
from .._transports.base import (
    KEY_TAG,
    Assessment,
    Dataset,
    Metric,
    RunRef,
    TraceEnd,
    may_begin,
    parse_spans_request,
)

__all__ = ["MemoryRun", "MemoryTransport", "wait_for"]


@dataclass
class MemoryRun:
    """A run as :class:`MemoryTransport` stores it."""

    run_uuid: str
    experiment_id: str
    name: str
    start_time_ms: int
    tags: dict[str, str]
    params: dict[str, str] = field(default_factory=dict)
    metrics: list[Metric] = field(default_factory=list)
    artifacts: list[str] = field(default_factory=list)
    status: str = "RUNNING"
    end_time_ms: int | None = None
    deleted: bool = False

    def history(self, key: str) -> list[tuple[int, float]]:
        """``(step, value)`` of one metric, in the order it was logged."""
        return [(m.step, m.value) for m in self.metrics if m.key == key]


class MemoryTransport:
    """An in-memory MLflow with MLflow's rules that matter here: params are immutable, identical
    metric points are stored once. ``fail`` lets a test make any call fail before it runs."""

    #: Each call counts as sent from its start (a subclass that holds a call before it reaches
    #: the store, as behind other requests, sets this: the call is sent at ``_enter``).
    announces_sends = False

    def __init__(self, *, trace_upserts: bool = False) -> None:
        self.lock = threading.Lock()
        # Whether it writes a trace's info with its assessments in one call (as MLflow 3.13+).
        self.trace_upserts = trace_upserts
        self.trace_ends: dict[str, TraceEnd] = {}  # MLflow trace id -> its info as written
        self.experiments: dict[str, str] = {}
        self.runs: dict[str, MemoryRun] = {}
        self.calls: list[str] = []
        self.spans: dict[tuple[bytes, bytes], Any] = {}  # (trace id, span id) -> OTLP span
        self.trace_links: dict[bytes, str] = {}  # trace id -> MLflow run
        # MLflow trace id ("tr-" + hex) -> its assessments, and the other runs it is linked to
        self.assessments: dict[str, list[tuple[str, Assessment]]] = {}
        self.run_links: dict[str, set[str]] = {}
        self.datasets: dict[str, list[Dataset]] = {}  # run -> its inputs
        self.fail: Callable[[str], Exception | None] | None = None
        self._ids = itertools.count(1)

    def _enter(self, call: str) -> None:
        with self.lock:
            self.calls.append(call)
        may_begin(call.replace("_", " "))  # the request goes out now (see announces_sends)
        fail = self.fail
        error = fail(call) if fail is not None else None
        if error is not None:
            raise error

    def describe(self) -> str:
        return "memory"

    def get_or_create_experiment(self, name: str) -> str:
        self._enter("get_or_create_experiment")
        with self.lock:
            return self.experiments.setdefault(name, str(len(self.experiments) + 1))

    def check_experiment(self, experiment_id: str) -> None:
        self._enter("check_experiment")

    def _ref(self, run: MemoryRun) -> RunRef:
        latest: dict[str, Metric] = {}  # as MLflow ranks points: step, then time, then value
        for m in run.metrics:
            now = latest.get(m.key)
            if now is None or (m.step, m.timestamp_ms, m.value) > (
                now.step,
                now.timestamp_ms,
                now.value,
            ):
                latest[m.key] = m
        return RunRef(
            run.run_uuid,
            f"memory:/{run.run_uuid}",
            key=run.tags.get(KEY_TAG, ""),
            status=run.status,
            start_time_ms=run.start_time_ms,
            has_data=bool(run.params or run.metrics),
            latest=tuple((m.key, m.step, m.timestamp_ms) for m in latest.values()),
        )

    def find_runs(self, experiment_id: str, key: str) -> list[RunRef]:
        self._enter("find_runs")
        with self.lock:
            return [
                self._ref(run)
                for run in self.runs.values()
                if run.experiment_id == experiment_id
                and run.tags.get(KEY_TAG) == key
                and not run.deleted
            ]

    def find_runs_by_prefix(self, experiment_id: str, prefix: str) -> list[RunRef]:
        self._enter("find_runs_by_prefix")
        with self.lock:
            return [
                self._ref(run)
                for run in self.runs.values()
                if run.experiment_id == experiment_id
                and run.tags.get(KEY_TAG, "").startswith(prefix + "-")
                and not run.deleted
            ]

    def delete_run(self, run_uuid: str) -> None:
        self._enter("delete_run")
        with self.lock:
            self.runs[run_uuid].deleted = True

    def run_status(self, run_uuid: str) -> str | None:
        self._enter("run_status")
        with self.lock:
            run = self.runs.get(run_uuid)
            return None if run is None or run.deleted else run.status

    def metric_history(self, run_uuid: str, key: str) -> list[Metric]:
        self._enter("metric_history")
        with self.lock:
            return [m for m in self.runs[run_uuid].metrics if m.key == key]

    def metric_history_range(
        self, run_uuid: str, key: str, start_step: int, end_step: int
    ) -> list[Metric] | None:
        self._enter("metric_history_range")
        with self.lock:
            return [
                m
                for m in self.runs[run_uuid].metrics
                if m.key == key and start_step <= m.step <= end_step
            ]

    def create_run(
        self,
        experiment_id: str,
        *,
        run_name: str,
        start_time_ms: int,
        tags: Sequence[tuple[str, str]],
    ) -> RunRef:
        self._enter("create_run")
        with self.lock:
            uuid = f"run{next(self._ids)}"
            run = self.runs[uuid] = MemoryRun(
                uuid, experiment_id, run_name, start_time_ms, dict(tags)
            )
            return self._ref(run)

    def log_batch(
        self,
        run_uuid: str,
        *,
        metrics: Sequence[Metric] = (),
        params: Sequence[tuple[str, str]] = (),
        tags: Sequence[tuple[str, str]] = (),
    ) -> None:
        self._enter("log_batch")
        if len(metrics) > 1000 or len(params) > 100 or len(tags) > 100:
            raise PermanentError("batch over MLflow's limits", code="INVALID_PARAMETER_VALUE")
        with self.lock:
            run = self.runs[run_uuid]
            for key, value in params:
                if key in run.params and run.params[key] != value:
                    raise PermanentError(
                        f"Changing param values is not allowed. Param with key='{key}'",
                        code="INVALID_PARAMETER_VALUE",
                        status=400,
                    )
            run.params.update(params)
            run.tags.update(tags)
            seen = set(run.metrics)
            run.metrics.extend(m for m in metrics if m not in seen)

    def set_terminated(self, run_uuid: str, *, status: str, end_time_ms: int) -> None:
        self._enter("set_terminated")
        with self.lock:
            run = self.runs[run_uuid]
            run.status, run.end_time_ms = status, end_time_ms

    def log_artifact(self, run: RunRef, local_path: str) -> None:
        self._enter("log_artifact")
        path = Path(local_path)
        if not path.exists():
            raise PermanentError(f"{local_path} no longer exists", code="ARTIFACT_MISSING")
        names = (
            sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
            if path.is_dir()
            else [path.name]
        )
        with self.lock:
            self.runs[run.run_uuid].artifacts.extend(names)

    def export_spans(self, experiment_id: str, run_uuid: str | None, request: bytes) -> None:
        self._enter("export_spans")
        parsed = parse_spans_request(request)
        with self.lock:
            for resource in parsed.resource_spans:
                for scope in resource.scope_spans:
                    for span in scope.spans:
                        self.spans[(bytes(span.trace_id), bytes(span.span_id))] = span
                        if not span.parent_span_id and run_uuid:
                            self.trace_links[bytes(span.trace_id)] = run_uuid

    def assessment_keys(self, trace_id: str) -> set[str]:
        self._enter("assessment_keys")
        with self.lock:
            if bytes.fromhex(trace_id.removeprefix("tr-")) not in self.trace_links:
                raise PermanentError(f"no trace {trace_id}", code="RESOURCE_DOES_NOT_EXIST")
            return {key for key, _ in self.assessments.get(trace_id, [])}

    def create_assessment(self, trace_id: str, assessment: Assessment) -> None:
        self._enter("create_assessment")
        with self.lock:  # like MLflow: every create is a new assessment
            self.assessments.setdefault(trace_id, []).append((assessment.key, assessment))

    def upserts_traces(self) -> bool | None:
        return self.trace_upserts

    def finish_trace(self, experiment_id: str, end: TraceEnd) -> None:
        self._enter("finish_trace")
        with self.lock:  # like MLflow: the same ids again replace what they wrote
            self.trace_ends[end.trace_id] = end
            if end.run_uuid:
                self.trace_links[bytes.fromhex(end.trace_id.removeprefix("tr-"))] = end.run_uuid
            held = self.assessments.setdefault(end.trace_id, [])
            keys = {assessment.key for assessment in end.assessments}
            held[:] = [(key, found) for key, found in held if key not in keys]
            held.extend((assessment.key, assessment) for assessment in end.assessments)

    def link_traces(self, run_uuid: str, trace_ids: Sequence[str]) -> None:
        self._enter("link_traces")
        with self.lock:
            for trace_id in trace_ids:
                self.run_links.setdefault(trace_id, set()).add(run_uuid)

    def log_dataset(self, run_uuid: str, dataset: Dataset) -> None:
        self._enter("log_dataset")
        with self.lock:
            held = self.datasets.setdefault(run_uuid, [])
            if dataset not in held:
                held.append(dataset)

    def close(self) -> None:
        pass

    # -- reading back --------------------------------------------------------------------------

    def by_name(self, name: str) -> list[MemoryRun]:
        """The runs of an RLM run id (their ``run_id`` tag), or of an MLflow run name."""
        with self.lock:
            return [
                run
                for run in self.runs.values()
                if name in (run.tags.get("run_id"), run.name) and not run.deleted
            ]

    def one(self, name: str) -> MemoryRun:
        runs = self.by_name(name)
        if len(runs) != 1:
            raise AssertionError(f"expected one run named {name!r}, found {len(runs)}")
        return runs[0]


def wait_for(
    predicate: Callable[[], object], timeout: float = 30.0, interval: float = 0.01
) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds have passed; its last answer.

    For tests: wait on a condition with a deadline instead of sleeping a fixed time."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return bool(predicate())
        time.sleep(interval)

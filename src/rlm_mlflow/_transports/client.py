"""A transport over ``mlflow.MlflowClient``, for every store that is not an HTTP server.

The default store (``sqlite:///mlflow.db`` when ``MLFLOW_TRACKING_URI`` is unset), file stores,
and tracking URIs with plugins go through here. mlflow is imported on the worker, never on a
hook's caller. The embedded stores need the full ``mlflow`` package (``pip install
'.[full]'`` from the checkout, or ``pip install mlflow``); the slim client alone (``mlflow-skinny``,
the runtime dependency) can only talk to a server.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from .._config import redact_text, redact_uri
from .._exceptions import REFUSED_CODES, PermanentError, StoreRefused, TransientError
from .base import (
    ASSESSMENT_KEY,
    ASSESSMENTS_UNSUPPORTED,
    KEY_TAG,
    Assessment,
    Dataset,
    Metric,
    RunRef,
    TraceEnd,
    key_filter,
    may_begin,
    parse_spans_request,
    prefix_filter,
)

T = TypeVar("T")

#: The first MLflow release whose database store merges a trace's info into the trace its
#: spans made (see ``TraceUpserts``).
_UPSERTS_SINCE = (3, 13)

# MLflow error codes that mean "this request will never succeed".
_PERMANENT_CODES = frozenset(
    {
        "INVALID_PARAMETER_VALUE",
        "RESOURCE_DOES_NOT_EXIST",
        "RESOURCE_ALREADY_EXISTS",
        "BAD_REQUEST",
        "INVALID_STATE",
        "NOT_FOUND",
        "ENDPOINT_NOT_FOUND",
    }
)

FULL_MLFLOW_HINT = (
    "the embedded store ({uri}) needs the full mlflow package (SQLAlchemy, alembic), which "
    "rlm-mlflow's runtime install leaves out: pip install mlflow (from rlm-mlflow's checkout: "
    "pip install '.[full]'), or point MLFLOW_TRACKING_URI at a tracking server (http://...)"
)


def resolve_tracking_uri(tracking_uri: str | None) -> str:
    """The URI MLflow would use: the argument, else ``MLFLOW_TRACKING_URI``, else its default."""
    if tracking_uri:
        return tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    import mlflow

    return str(mlflow.get_tracking_uri())


def embedded_store_problem(uri: str) -> str | None:
    """Why ``uri`` (a database or file store) cannot be used in this environment, if it cannot."""
    if not uri.startswith(("sqlite:", "postgresql", "mysql", "mssql")):
        return None
    import importlib.util

    if (
        importlib.util.find_spec("sqlalchemy") is None
        or importlib.util.find_spec("alembic") is None
    ):
        return FULL_MLFLOW_HINT.format(uri=redact_uri(uri))
    return None


class ClientTransport:
    """The :class:`~rlm_mlflow._transports.base.Transport` interface over ``MlflowClient``."""

    def __init__(self, tracking_uri: str | None = None) -> None:
        self._uri = resolve_tracking_uri(tracking_uri)
        problem = embedded_store_problem(self._uri)
        if problem:
            raise ImportError(problem)
        from mlflow import MlflowClient

        self._client = MlflowClient(tracking_uri=self._uri)
        # An embedded store is one file: writers queue on its lock anyway.
        self._slots = threading.BoundedSemaphore(2)

    @property
    def client(self) -> Any:
        return self._client

    @property
    def uri(self) -> str:
        return self._uri

    def describe(self) -> str:
        return redact_uri(self._uri) or ""

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        from mlflow.exceptions import MlflowException

        try:
            with self._slots:
                return fn()
        except (TransientError, PermanentError):
            raise
        except MlflowException as exc:
            code = str(getattr(exc, "error_code", "") or "INTERNAL_ERROR")
            message = str(exc.message)
            text = redact_text(f"{what}: {code}: {message}", self._uri)
            if code in REFUSED_CODES:
                raise StoreRefused(text, code=code) from None
            if code == "INVALID_PARAMETER_VALUE" and "'active' state" in message:
                raise PermanentError(text, code="RUN_NOT_ACTIVE") from None
            if code in _PERMANENT_CODES:
                raise PermanentError(text, code=code) from None
            raise TransientError(text) from None
        except OSError as exc:  # sqlite locked, disk full, network trouble under a plugin
            raise TransientError(redact_text(f"{what}: {exc}", self._uri)) from None
        except Exception as exc:
            text = redact_text(f"{what}: {type(exc).__name__}: {exc}", self._uri)
            if "locked" in str(exc).lower():
                raise TransientError(text) from None
            raise PermanentError(text, code=type(exc).__name__) from None

    def get_or_create_experiment(self, name: str) -> str:
        def run() -> str:
            from mlflow.exceptions import MlflowException

            experiment = self._client.get_experiment_by_name(name)
            if experiment is not None:
                if experiment.lifecycle_stage == "deleted":
                    raise _deleted(name)
                return str(experiment.experiment_id)
            try:
                return str(self._client.create_experiment(name))
            except MlflowException as exc:
                if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                    raise
            experiment = self._client.get_experiment_by_name(name)
            if experiment is None:
                raise TransientError(f"experiment {name!r} vanished while being created")
            return str(experiment.experiment_id)

        return self._call("get or create experiment", run)

    def check_experiment(self, experiment_id: str) -> None:
        experiment = self._call(
            "get experiment", lambda: self._client.get_experiment(experiment_id)
        )
        if experiment.lifecycle_stage == "deleted":
            raise _deleted(str(experiment.name))

    def _search(self, experiment_id: str, filter_string: str, limit: int) -> list[RunRef]:
        from mlflow.entities import ViewType

        runs: list[RunRef] = []
        token: str | None = None
        while True:
            page = self._call(
                "search runs",
                lambda token=token: self._client.search_runs(  # type: ignore[misc]
                    [experiment_id],
                    filter_string=filter_string,
                    run_view_type=ViewType.ACTIVE_ONLY,
                    max_results=min(limit, 1000),
                    page_token=token,
                ),
            )
            runs.extend(_run_ref(run) for run in page)
            token = getattr(page, "token", None)
            if not token or len(runs) >= limit:
                return runs

    def find_runs(self, experiment_id: str, key: str) -> list[RunRef]:
        return self._search(experiment_id, key_filter(key), 100)

    def find_runs_by_prefix(self, experiment_id: str, prefix: str) -> list[RunRef]:
        return self._search(experiment_id, prefix_filter(prefix), 10**9)

    def create_run(
        self,
        experiment_id: str,
        *,
        run_name: str,
        start_time_ms: int,
        tags: Sequence[tuple[str, str]],
    ) -> RunRef:
        may_begin("create run")
        run = self._call(
            "create run",
            lambda: self._client.create_run(
                experiment_id, start_time=start_time_ms, tags=dict(tags), run_name=run_name
            ),
        )
        return _run_ref(run)

    def delete_run(self, run_uuid: str) -> None:
        try:
            self._call("delete run", lambda: self._client.delete_run(run_uuid))
        except PermanentError as exc:
            if exc.code != "RESOURCE_DOES_NOT_EXIST":
                raise

    def run_status(self, run_uuid: str) -> str | None:
        try:
            run = self._call("get run", lambda: self._client.get_run(run_uuid))
        except PermanentError as exc:
            if exc.code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        if run.info.lifecycle_stage == "deleted":
            return None
        return str(run.info.status)

    def log_batch(
        self,
        run_uuid: str,
        *,
        metrics: Sequence[Metric] = (),
        params: Sequence[tuple[str, str]] = (),
        tags: Sequence[tuple[str, str]] = (),
    ) -> None:
        from mlflow.entities import Metric as MlflowMetric
        from mlflow.entities import Param, RunTag

        self._call(
            "log batch",
            lambda: self._client.log_batch(
                run_uuid,
                metrics=[MlflowMetric(m.key, m.value, m.timestamp_ms, m.step) for m in metrics],
                params=[Param(k, v) for k, v in params],
                tags=[RunTag(k, v) for k, v in tags],
            ),
        )

    def metric_history(self, run_uuid: str, key: str) -> list[Metric]:
        points = self._call(
            "metric history", lambda: self._client.get_metric_history(run_uuid, key)
        )
        return [Metric(key, float(p.value), int(p.timestamp), int(p.step)) for p in points]

    def set_terminated(self, run_uuid: str, *, status: str, end_time_ms: int) -> None:
        self._call(
            "end run",
            lambda: self._client.set_terminated(run_uuid, status=status, end_time=end_time_ms),
        )

    def log_artifact(self, run: RunRef, local_path: str) -> None:
        self._call(
            "log artifact", lambda: upload_with_repository(run.artifact_uri, local_path, self._uri)
        )

    def export_spans(self, experiment_id: str, run_uuid: str | None, request: bytes) -> None:
        def run() -> None:
            from mlflow.entities.span import Span

            spans = [
                Span.from_otel_proto(span)
                for resource in parse_spans_request(request).resource_spans
                for scope in resource.scope_spans
                for span in scope.spans
            ]
            store = self._client._tracking_client.store
            try:
                store.log_spans(experiment_id, spans)
            except NotImplementedError:
                raise PermanentError(
                    f"this store ({type(store).__name__}) does not take traces",
                    code="TRACES_UNSUPPORTED",
                ) from None
            roots = sorted({span.trace_id for span in spans if span.parent_id is None})
            if run_uuid and roots:
                store.link_traces_to_run(roots, run_uuid)

        self._call("export spans", run)

    def assessment_keys(self, trace_id: str) -> set[str]:
        def run() -> set[str]:
            store = self._client._tracking_client.store
            try:
                info = store.get_trace_info(trace_id)
            except NotImplementedError:
                raise PermanentError(
                    f"this store ({type(store).__name__}) has no assessments",
                    code=ASSESSMENTS_UNSUPPORTED,
                ) from None
            keys = set()
            for found in info.assessments or ():
                key = (found.metadata or {}).get(ASSESSMENT_KEY)
                if isinstance(key, str):
                    keys.add(key)
            return keys

        return self._call("get trace", run)

    def create_assessment(self, trace_id: str, assessment: Assessment) -> None:
        self._call(
            "create assessment",
            lambda: self._client._tracking_client.store.create_assessment(
                _entity(assessment, trace_id)
            ),
        )

    def upserts_traces(self) -> bool | None:
        """A database store of MLflow 3.13 or newer, in this process (see ``TraceUpserts``)."""
        try:
            import mlflow
            from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
        except Exception:  # the slim client: no database store here
            return False
        found = re.match(r"(\d+)\.(\d+)", mlflow.__version__)
        if found is None or (int(found[1]), int(found[2])) < _UPSERTS_SINCE:
            return False
        return isinstance(self._client._tracking_client.store, SqlAlchemyStore)

    def finish_trace(self, experiment_id: str, end: TraceEnd) -> None:
        def run() -> None:
            from mlflow.entities import TraceInfo, TraceLocation, TraceState

            info = TraceInfo(
                trace_id=end.trace_id,
                trace_location=TraceLocation.from_experiment_id(experiment_id),
                request_time=end.request_time_ms,
                execution_duration=max(0, end.duration_ms),
                state=TraceState(end.state),
                trace_metadata={"mlflow.sourceRun": end.run_uuid} if end.run_uuid else {},
                tags={},
                assessments=[
                    _entity(assessment, end.trace_id, at_ms=end.at_ms, with_id=True)
                    for assessment in end.assessments
                ],
            )
            self._client._tracking_client.store.start_trace(info)

        self._call("finish trace", run)

    def link_traces(self, run_uuid: str, trace_ids: Sequence[str]) -> None:
        self._call(
            "link traces",
            lambda: self._client._tracking_client.store.link_traces_to_run(
                list(trace_ids), run_uuid
            ),
        )

    def log_dataset(self, run_uuid: str, dataset: Dataset) -> None:
        def run() -> None:
            from mlflow.entities import Dataset as MlflowDataset
            from mlflow.entities import DatasetInput

            entity = MlflowDataset(**dataset.body())
            self._client.log_inputs(run_uuid, datasets=[DatasetInput(dataset=entity)])

        self._call("log dataset", run)

    def close(self) -> None:
        pass


def _deleted(name: str) -> StoreRefused:
    return StoreRefused(
        f"experiment {name!r} is deleted; restore it in MLflow or choose another experiment "
        "name (nothing is sent until then; everything is kept)",
        code="EXPERIMENT_DELETED",
    )


def _run_ref(run: Any) -> RunRef:
    info, data = run.info, run.data
    return RunRef(
        run_uuid=str(info.run_id),
        artifact_uri=str(info.artifact_uri or ""),
        key=str((data.tags or {}).get(KEY_TAG) or ""),
        status=str(info.status or ""),
        start_time_ms=int(info.start_time or 0),
        has_data=bool(data.metrics or data.params),
        latest=_latest(data),
    )


def _latest(data: Any) -> tuple[tuple[str, int, int], ...] | None:
    """The latest point of each metric of a run's data (None if the data does not say)."""
    objects = getattr(data, "_metric_objs", None)
    if not isinstance(objects, list):
        return None
    try:
        return tuple((str(m.key), int(m.step or 0), int(m.timestamp)) for m in objects)
    except (AttributeError, TypeError, ValueError):
        return None


def upload_with_repository(artifact_uri: str, local_path: str, tracking_uri: str) -> None:
    """Upload a file or a directory through MLflow's artifact repository for ``artifact_uri``."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    path = Path(local_path)
    if not path.exists():
        raise PermanentError(f"{local_path} does not exist", code="ARTIFACT_MISSING")
    repository: Any = get_artifact_repository(artifact_uri, tracking_uri=tracking_uri)
    if path.is_dir():
        repository.log_artifacts(os.fspath(path))
    else:
        repository.log_artifact(os.fspath(path))


def _entity(
    assessment: Assessment, trace_id: str, *, at_ms: int | None = None, with_id: bool = False
) -> Any:
    """The assessment as MLflow's entity (a Feedback or an Expectation)."""
    from mlflow.entities.assessment import Expectation, Feedback
    from mlflow.entities.assessment_source import AssessmentSource

    source = AssessmentSource(source_type=assessment.source_type, source_id=assessment.source_id)
    metadata = {ASSESSMENT_KEY: assessment.key}
    made: Any
    if assessment.kind == "expectation":
        made = Expectation(
            assessment.name,
            assessment.value,
            source,
            trace_id,
            metadata=metadata,
            create_time_ms=at_ms,
            last_update_time_ms=at_ms,
        )
    else:
        made = Feedback(
            assessment.name,
            assessment.value,
            source=source,
            trace_id=trace_id,
            metadata=metadata,
            rationale=assessment.rationale,
            create_time_ms=at_ms,
            last_update_time_ms=at_ms,
        )
    if with_id:
        made.assessment_id = assessment.assessment_id
    return made

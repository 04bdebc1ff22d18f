"""A transport over ``mlflow.MlflowClient``, for every store that is not an HTTP server.

The default store (``sqlite:///mlflow.db`` when ``MLFLOW_TRACKING_URI`` is unset), file stores,
and tracking URIs with plugins go through here. mlflow is imported on the worker, never on a
hook's caller.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ._config import redact_text, redact_uri
from ._exceptions import PermanentError, TransientError
from ._transport import KEY_TAG, Metric, RunRef

T = TypeVar("T")

# MLflow error codes that mean "this request will never succeed".
_PERMANENT_CODES = frozenset(
    {
        "INVALID_PARAMETER_VALUE",
        "RESOURCE_DOES_NOT_EXIST",
        "RESOURCE_ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "UNAUTHENTICATED",
        "BAD_REQUEST",
        "INVALID_STATE",
        "NOT_FOUND",
        "ENDPOINT_NOT_FOUND",
    }
)


def resolve_tracking_uri(tracking_uri: str | None) -> str:
    """The URI MLflow would use: the argument, else ``MLFLOW_TRACKING_URI``, else its default."""
    if tracking_uri:
        return tracking_uri
    import mlflow

    return str(mlflow.get_tracking_uri())


class ClientTransport:
    """The :class:`~rlm_mlflow._transport.Transport` interface over ``MlflowClient``."""

    def __init__(self, tracking_uri: str | None = None) -> None:
        from mlflow import MlflowClient

        self._uri = resolve_tracking_uri(tracking_uri)
        self._client = MlflowClient(tracking_uri=self._uri)

    def describe(self) -> str:
        return redact_uri(self._uri) or ""

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        from mlflow.exceptions import MlflowException

        try:
            return fn()
        except (TransientError, PermanentError):
            raise
        except MlflowException as exc:
            code = str(getattr(exc, "error_code", "") or "INTERNAL_ERROR")
            text = redact_text(f"{what}: {code}: {exc.message}", self._uri)
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
                    raise PermanentError(
                        f"experiment {name!r} is deleted; restore it or choose another name",
                        code="RESOURCE_DELETED",
                    )
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

    def find_run(self, experiment_id: str, key: str) -> RunRef | None:
        from mlflow.entities import ViewType

        runs = self._call(
            "search runs",
            lambda: self._client.search_runs(
                [experiment_id],
                filter_string=f"tags.`{KEY_TAG}` = '{key}'",
                run_view_type=ViewType.ALL,
                max_results=1,
            ),
        )
        if not runs:
            return None
        return RunRef(run_uuid=runs[0].info.run_id, artifact_uri=runs[0].info.artifact_uri)

    def create_run(
        self,
        experiment_id: str,
        *,
        run_name: str,
        start_time_ms: int,
        tags: Sequence[tuple[str, str]],
    ) -> RunRef:
        run = self._call(
            "create run",
            lambda: self._client.create_run(
                experiment_id, start_time=start_time_ms, tags=dict(tags), run_name=run_name
            ),
        )
        return RunRef(run_uuid=run.info.run_id, artifact_uri=run.info.artifact_uri)

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

    def set_terminated(self, run_uuid: str, *, status: str, end_time_ms: int) -> None:
        self._call(
            "end run",
            lambda: self._client.set_terminated(run_uuid, status=status, end_time=end_time_ms),
        )

    def log_artifact(self, run: RunRef, local_path: str) -> None:
        self._call(
            "log artifact", lambda: upload_with_repository(run.artifact_uri, local_path, self._uri)
        )

    def close(self) -> None:
        pass


def upload_with_repository(artifact_uri: str, local_path: str, tracking_uri: str) -> None:
    """Upload a file or a directory through MLflow's artifact repository for ``artifact_uri``."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    path = Path(local_path)
    if not path.exists():
        raise PermanentError(f"{local_path} no longer exists", code="ARTIFACT_MISSING")
    repository: Any = get_artifact_repository(artifact_uri, tracking_uri=tracking_uri)
    if path.is_dir():
        repository.log_artifacts(os.fspath(path))
    else:
        repository.log_artifact(os.fspath(path))

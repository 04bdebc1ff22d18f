"""The MLflow-facing interface: the few calls the worker makes, all blocking, all explicit-run-id.

The worker never calls MLflow any other way, so a test can swap in an in-memory transport and a
real deployment can pick the fastest way to reach its store (:mod:`._rest` for an HTTP server,
:mod:`._client` for anything ``MlflowClient`` reaches, such as the default sqlite store).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

#: The tag that holds a run's client-side id, so a retried or replayed create finds the first one.
KEY_TAG = "rlm_mlflow.key"
PARENT_TAG = "mlflow.parentRunId"


@dataclass(frozen=True, slots=True)
class Metric:
    key: str
    value: float
    timestamp_ms: int
    step: int


@dataclass(frozen=True, slots=True)
class RunRef:
    """An MLflow run as the worker knows it."""

    run_uuid: str
    artifact_uri: str


@runtime_checkable
class Transport(Protocol):
    """Blocking calls to one MLflow tracking store.

    Every method raises only :class:`~rlm_mlflow.TransientError` (worth retrying) or
    :class:`~rlm_mlflow.PermanentError` (not), and is safe to call again after a failure.
    """

    def describe(self) -> str:
        """Where this transport sends data, with credentials redacted."""
        ...

    def get_or_create_experiment(self, name: str) -> str:
        """The experiment's id, created when missing."""
        ...

    def find_run(self, experiment_id: str, key: str) -> RunRef | None:
        """The run tagged with ``KEY_TAG = key``, if one exists."""
        ...

    def create_run(
        self,
        experiment_id: str,
        *,
        run_name: str,
        start_time_ms: int,
        tags: Sequence[tuple[str, str]],
    ) -> RunRef:
        """Create a run (not idempotent: the worker looks before it creates again)."""
        ...

    def log_batch(
        self,
        run_uuid: str,
        *,
        metrics: Sequence[Metric] = (),
        params: Sequence[tuple[str, str]] = (),
        tags: Sequence[tuple[str, str]] = (),
    ) -> None:
        """One request, within MLflow's batch limits (the caller splits)."""
        ...

    def set_terminated(self, run_uuid: str, *, status: str, end_time_ms: int) -> None:
        """End a run with FINISHED, FAILED or KILLED."""
        ...

    def log_artifact(self, run: RunRef, local_path: str) -> None:
        """Upload a file, or every file of a directory, to the run's artifact root."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...

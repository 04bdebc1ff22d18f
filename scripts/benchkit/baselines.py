"""The sinks ours is compared with, and one factory for every sink a benchmark can drive.

- ``none``: no logging at all, the workload's own cost;
- ``sync``: the seed, RLM Code's synchronous fluent-API sink (``mlflow.start_run``,
  ``log_params``, ``set_tags``, ``log_metric`` x2 per step, ``log_metrics``, ``log_artifact``,
  ``end_run``);
- ``async``: the same sink with MLflow's own async logging (``synchronous=False``);
- ``ours``: ``rlm_mlflow.MLflowSink``, with keyword arguments from the spec.

Every sink here has the three hooks plus ``flush(timeout) -> bool`` and ``close(timeout)``, so
drivers and tasks treat them alike. mlflow and rlm_mlflow are imported only when a sink is made.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from pathlib import Path
from typing import Any

LABELS = {
    "none": "no sink (reference)",
    "sync": "seed: fluent API, synchronous",
    "async": "MLflow async logging (synchronous=False)",
    "ours": "rlm_mlflow.MLflowSink",
    "ours_nojournal": "rlm_mlflow.MLflowSink, journal=False",
}
SHORT = {"sync": "sync (seed)", "async": "MLflow async", "ours": "rlm_mlflow"}
#: The sinks compared side by side, in the order of the tables.
COMPARED = ("sync", "async", "ours")


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


def make_sink(kind: str, uri: str, experiment: str, options: dict[str, Any] | None = None) -> Any:
    """A sink of ``kind`` sending to ``uri``; ``options`` are ``MLflowSink`` keyword arguments."""
    if kind == "none":
        return NullSink()
    if kind in ("sync", "async"):
        return SeedFluentSink(experiment=experiment, tracking_uri=uri, synchronous=kind == "sync")
    if kind == "ours":
        from rlm_mlflow import MLflowSink

        return MLflowSink(enabled=True, experiment=experiment, tracking_uri=uri, **(options or {}))
    raise ValueError(f"unknown sink {kind!r}")

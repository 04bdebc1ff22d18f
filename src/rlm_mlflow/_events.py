"""Events: what a hook call turns into, before anything is checked or sent.

A hook does as little as it can on the caller's thread: it reads a few fields, stamps the time and
builds one of these records. Validation and conversion happen later, on the worker (``_convert``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class RunStart:
    """``on_run_start``: open one MLflow run."""

    key: str  # client-side id of this run, unique across processes; tagged on the MLflow run
    run_id: str
    timestamp_ms: int
    environment: Any
    task_chars: int | None
    params: dict[str, Any]
    parent_key: str | None


@dataclass(frozen=True, slots=True)
class Step:
    """``on_step``: one step's rewards, as the caller gave them."""

    key: str
    run_id: str
    timestamp_ms: int
    step: Any
    reward: Any
    cumulative_reward: Any


@dataclass(frozen=True, slots=True)
class RunEnd:
    """``on_run_end`` (or shutdown for a run that never ended): close the run."""

    key: str
    run_id: str
    timestamp_ms: int
    status: str  # FINISHED or FAILED
    completed: Any = None
    steps: Any = None
    total_reward: Any = None
    run_path: str | None = None


Event = RunStart | Step | RunEnd

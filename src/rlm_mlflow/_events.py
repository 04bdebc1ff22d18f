"""Events: what a hook call becomes, as the worker sees it after decoding its record.

A hook never builds these objects: it encodes the few fields it reads straight into a record
(:mod:`._codec`), which goes to the journal and the queue. The worker decodes records into these
frozen dataclasses, checks the values (:mod:`._convert`) and hands them to the exporters.

Runs are named inside a sink by a small number (``run_no``); the MLflow-facing key of a run is the
sink's random prefix and that number (``<prefix>-<run_no>``), unique across processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class RunStart:
    """``on_run_start``: open one MLflow run (or a run opened for a step that came first)."""

    run_no: int
    timestamp_ms: int
    run_id: str
    environment: Any = None
    task_chars: int | None = None
    params: dict[str, Any] = field(default_factory=dict)
    parent_no: int | None = None  # the run this one is a child of, in the same sink
    implicit: bool = False  # opened by the sink for a hook that came before on_run_start
    internal: bool = False  # made by the sink, not by a hook call: not counted as an event


@dataclass(frozen=True, slots=True)
class Step:
    """``on_step``: one step's rewards, as the caller gave them (checked later)."""

    run_no: int
    timestamp_ms: int
    step: Any
    reward: Any
    cumulative_reward: Any
    internal: bool = False


@dataclass(frozen=True, slots=True)
class RunEnd:
    """``on_run_end``, or the end the sink gives a run that never had one (close, signal)."""

    run_no: int
    timestamp_ms: int
    run_id: str
    status: str  # FINISHED, FAILED or KILLED
    completed: Any = None
    steps: Any = None
    total_reward: Any = None
    run_path: str | None = None
    internal: bool = False


Event = RunStart | Step | RunEnd

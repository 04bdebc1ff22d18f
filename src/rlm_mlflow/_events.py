"""Events: what a hook call becomes, as the worker sees it after decoding its record.

A hook never builds these objects: it encodes the few fields it reads straight into a record
(:mod:`._codec`), which goes to the journal and the queue. The worker decodes records into these
frozen dataclasses, checks the values (:mod:`._convert`) and hands them to the exporters.

Runs are named inside a sink by a small number (``run_no``); the MLflow-facing key of a run is the
sink's random prefix and that number (``<prefix>-<run_no>``), unique across processes. Times are
nanoseconds since the epoch, taken when the hook was called.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens one step (or run) used, as the runtime reported them."""

    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0
    calls: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.total_tokens + other.total_tokens,
            self.calls + other.calls,
        )

    def __sub__(self, other: Usage) -> Usage:
        return Usage(
            max(0, self.input_tokens - other.input_tokens),
            max(0, self.output_tokens - other.output_tokens),
            max(0, self.total_tokens - other.total_tokens),
            max(0, self.calls - other.calls),
        )

    def __bool__(self) -> bool:
        return bool(self.input_tokens or self.output_tokens or self.total_tokens)


NO_USAGE = Usage()


@dataclass(frozen=True, slots=True)
class Text:
    """A text field as recorded: possibly cut (``length`` is then the original length), or not
    recorded at all (metadata-only traces: ``text`` is None, ``length`` says how long it was)."""

    text: str | None
    length: int
    cut: bool = False


@dataclass(frozen=True, slots=True)
class ModelCall:
    """One call to a language model during a step (DSPy's sub-LM calls, for instance)."""

    model: str | None
    input: Text | None
    output: Text | None
    usage: Usage
    start_ns: int = 0
    end_ns: int = 0


@dataclass(frozen=True, slots=True)
class StepDetail:
    """What a step event carries beyond its rewards (RLM Code's action/observation/usage)."""

    action: Text | None = None
    code: Text | None = None
    rationale: Text | None = None
    stdout: Text | None = None
    stderr: Text | None = None
    success: bool | None = None
    execution_time: float | None = None
    usage: Usage | None = None
    depth: int | None = None
    children_usage: Usage | None = None  # child runs that ended during this step
    calls: tuple[ModelCall, ...] = ()  # model calls of the step, when the runtime tells them


@dataclass(frozen=True, slots=True)
class RunStart:
    """``on_run_start``: open one MLflow run (or a run opened for a step that came first)."""

    run_no: int
    timestamp_ns: int
    run_id: str
    environment: Any = None
    task_chars: int | None = None
    params: dict[str, Any] = field(default_factory=dict)
    parent_no: int | None = None  # the run this one is a child of, in the same sink
    implicit: bool = False  # opened by the sink for a hook that came before on_run_start
    internal: bool = False  # made by the sink, not by a hook call: not counted as an event
    root_no: int | None = None  # the top run of its recursion tree (its trace)
    parent_step: int | None = None  # which step of the parent was running (0-based)
    depth: int | None = None
    task: Text | None = None
    replaced: bool = False  # a lone surrogate in its texts (not UTF-8) was replaced by U+FFFD
    session: str | None = None  # the session (MLflow's ``session.id``) a root run belongs to
    user: str | None = None  # and its user (``user.id``)
    benchmark: bool = False  # a benchmark's evaluation run: its root runs are its cases
    dataset: dict[str, Any] | None = None  # a benchmark's dataset: name, digest, rows
    bench_no: int | None = None  # the benchmark this root run is a case of


@dataclass(frozen=True, slots=True)
class Step:
    """``on_step``: one step's rewards, as the caller gave them (checked later)."""

    run_no: int
    timestamp_ns: int
    step: Any
    reward: Any
    cumulative_reward: Any
    internal: bool = False
    detail: StepDetail | None = None
    ordinal: int = 0  # the how-many-th step of its run, from 0 (span ids come from it)
    since_ns: int = 0  # when the run's previous step (or its start) was


@dataclass(frozen=True, slots=True)
class RunEnd:
    """``on_run_end``, or the end the sink gives a run that never had one (close, signal)."""

    run_no: int
    timestamp_ns: int
    run_id: str
    status: str  # FINISHED, FAILED or KILLED
    completed: Any = None
    steps: Any = None
    total_reward: Any = None
    run_path: str | None = None
    internal: bool = False
    final: Text | None = None
    usage: Usage | None = None  # what the run used in all (its steps' usage added up)
    replaced: bool = False  # a lone surrogate in its texts (not UTF-8) was replaced by U+FFFD
    # A benchmark's end: what its hooks saw of each case (case's run no -> figure -> value:
    # reward, completed, tokens, duration, VERDICT + judge), kept with the end so that a
    # replay after a crash aggregates what an earlier process had already sent.
    cases: dict[int, dict[str, float]] | None = None


def completed_of(end: RunEnd) -> object:
    """Whether the run completed, as its end says: what ``on_run_end`` said, and False for a
    run that never reached it (ended FAILED or KILLED by the sink or a replay)."""
    return end.completed if end.status == "FINISHED" else False


#: A judge's verdict among a case's figures (the judge's name follows).
VERDICT = "verdict:"


def finite(value: object) -> float | None:
    """A finite int or float (not a bool) as a float, else None."""
    if type(value) in (int, float):
        number = float(value)  # type: ignore[arg-type]
        return number if math.isfinite(number) else None
    return None


def verdict_score(verdict: object) -> float | None:
    """A judge's verdict as a figure: a bool as 0 or 1, a finite number as it is."""
    return float(verdict) if type(verdict) is bool else finite(verdict)


def case_figures(
    completed: object, reward: object, tokens: int, start_ns: int, end_ns: int
) -> dict[str, float]:
    """A benchmark case's figures from its end, as the benchmark's aggregates take them."""
    figures: dict[str, float] = {}
    found = finite(reward)
    if found is not None:
        figures["reward"] = found
    if type(completed) is bool:
        figures["completed"] = float(completed)
    if tokens:
        figures["tokens"] = float(tokens)
    if start_ns and end_ns >= start_ns:
        figures["duration"] = (end_ns - start_ns) / 1e9
    return figures


@dataclass(frozen=True, slots=True)
class CaseResult:
    """What a benchmark says of one of its cases (``run_no`` is the benchmark's run): the
    expected answer and a judge's verdict, written on the case's trace."""

    run_no: int
    timestamp_ns: int
    case_no: int  # the case's root run
    expected: Any = None
    verdict: Any = None
    rationale: str | None = None
    judge: str = "judge"  # the verdict's assessment name
    internal: bool = False


Event = RunStart | Step | RunEnd | CaseResult

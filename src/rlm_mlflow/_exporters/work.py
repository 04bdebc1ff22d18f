"""The unit of work every exporter shares: one run's events of a drain cycle (:class:`RunWork`),
and each exporter's word on it (:data:`Outcome`).

The worker groups a cycle's events by run and hands each exporter the same works; an exporter
only sees ``export(works)`` and answers, run by run, whether they were sent (:data:`SENT`), must
be kept for replay (:data:`DEFERRED`), wait because the store refuses everything for now
(:data:`HOLD`), or were refused for good (``("dropped", reason)``). :class:`RunRefs` is what the
traces and assessments exporters need of the runs exporter: the MLflow run of a run, and its
experiment, without depending on how runs are sent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from .._events import CaseResult, Event, RunEnd, RunStart, Step
from .._transports.base import RunRef

Outcome = Literal["sent", "deferred", "hold"] | tuple[Literal["dropped"], str]
SENT: Outcome = "sent"
DEFERRED: Outcome = "deferred"  # kept in the journal for replay; the exporter moves on
HOLD: Outcome = "hold"  # the store refuses everything for now: try again later


@dataclass(slots=True)
class RunWork:
    """One run's events of a drain cycle, in order, with what the worker needs to settle them.

    ``steps``/``end`` go to the runs exporter, ``span_steps``/``span_end`` to the traces
    exporter: the same events, but for a journal replayed after one exporter had some of them.
    """

    no: int
    starts: list[RunStart] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    end: RunEnd | None = None
    span_steps: list[Step] = field(default_factory=list)
    span_end: RunEnd | None = None
    locations: list[tuple[Any, int]] = field(default_factory=list)  # journal (segment, offset)
    counted: int = 0  # events from hook calls (not the sink's own)
    in_memory_only: int = 0  # counted events that are in no journal
    step_locations: list[tuple[Any, int]] = field(default_factory=list)  # of the steps only
    step_counted: int = 0
    step_in_memory: int = 0
    maybe_sent: bool = False  # a request with its metrics may have been committed already
    # Its end was stored beside a batch that failed (a close's end_by): sent again, the work
    # sends the batch only, never the end a second time.
    end_sent: bool = False
    run_id: str = ""
    needs_runs: bool = True  # replay: False when the runs exporter had it all already
    needs_traces: bool = True  # False: written with traces off, or sent as spans already
    runs_outcome: Outcome | None = None  # each exporter's word, once it has given it
    traces_outcome: Outcome | None = None
    cases: list[CaseResult] = field(default_factory=list)  # a benchmark's (traces exporter)

    def add(self, event: Event, *, runs: bool = True, traces: bool = True) -> None:
        """One event, for the runs exporter, the traces exporter, or both."""
        if type(event) is CaseResult:
            if traces:
                self.cases.append(event)
        elif type(event) is Step:
            if runs:
                self.steps.append(event)
            if traces:
                self.span_steps.append(event)
        elif type(event) is RunStart:
            self.starts.append(event)
            self.run_id = event.run_id
        else:
            assert isinstance(event, RunEnd)
            self.run_id = event.run_id
            if runs:
                self.end = event
            if traces:
                self.span_end = event

    def split(self) -> tuple[RunWork, RunWork]:
        """The run's starts and end, and its steps, as two works (closing sends ends first)."""
        steps = set(self.step_locations)
        control = RunWork(
            self.no,
            starts=self.starts,
            end=self.end,
            span_end=self.span_end,
            cases=self.cases,
            locations=[at for at in self.locations if at not in steps],
            counted=self.counted - self.step_counted,
            in_memory_only=self.in_memory_only - self.step_in_memory,
            run_id=self.run_id,
            needs_traces=self.needs_traces,
            end_sent=self.end_sent,
        )
        rest = RunWork(
            self.no,
            steps=self.steps,
            span_steps=self.span_steps,
            locations=list(self.step_locations),
            step_locations=list(self.step_locations),
            counted=self.step_counted,
            in_memory_only=self.step_in_memory,
            step_counted=self.step_counted,
            step_in_memory=self.step_in_memory,
            maybe_sent=self.maybe_sent,
            run_id=self.run_id,
            needs_traces=self.needs_traces,
        )
        return control, rest

    def first_time(self) -> int:
        """The time (ns) of its first step or of its end; 0 when it has neither."""
        if self.steps:
            return self.steps[0].timestamp_ns
        if self.end is not None:
            return self.end.timestamp_ns
        return 0

    def merge(self, later: RunWork) -> None:
        self.starts.extend(later.starts)
        self.steps.extend(later.steps)
        self.span_steps.extend(later.span_steps)
        self.cases.extend(later.cases)
        if later.end is not None:
            self.end, self.end_sent = later.end, later.end_sent
        if later.span_end is not None:
            self.span_end = later.span_end
        self.locations.extend(later.locations)
        self.step_locations.extend(later.step_locations)
        self.counted += later.counted
        self.in_memory_only += later.in_memory_only
        self.step_counted += later.step_counted
        self.step_in_memory += later.step_in_memory
        self.maybe_sent = self.maybe_sent or later.maybe_sent
        self.run_id = self.run_id or later.run_id
        self.needs_traces = self.needs_traces or later.needs_traces


Done = Callable[["RunWork", Outcome], None]


class RunRefs(Protocol):
    """What the traces and assessments exporters need of the runs exporter."""

    @property
    def replaying(self) -> bool:
        """True in a replay: runs and traces may exist already."""
        ...

    def key_of(self, no: int) -> str:
        """The client-side key of run ``no`` (its run id until the run's start is known)."""
        ...

    def ref_of(self, no: int) -> RunRef | None:
        """The MLflow run of run ``no``, when it is known."""
        ...

    async def ensure_experiment(self) -> str:
        """The experiment's id, looked up or created once."""
        ...

    def count_rejected(self, reason: str) -> None:
        """Count one value that cannot be sent (status()'s ``rejected``)."""
        ...

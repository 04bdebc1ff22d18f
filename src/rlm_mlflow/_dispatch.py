"""Dispatch: a drain cycle's runs through both exporters, and each event's one fate.

The live worker and ``rlm-mlflow replay`` send the same way, through this. A cycle goes:

1. the runs (:class:`RunsExporter`), first: runs matter most, and a trace's link names its
   MLflow run; a run whose events need no spans is settled the moment it is sent;
2. the spans (:class:`TracesExporter`): one request for the traces still running, one for each
   trace whose root run ended (linked to that run). Traces never hold runs up: their requests
   are retried for a short while only, then kept in the journal for replay.

An event is *sent* when every exporter it needs has it, *deferred* (kept in the journal for
replay) when one of them could not send it, *dropped* when MLflow refused its data for good. Each
journal record gets the "done" bit of each exporter that is finished with it, and counts as
finished (its segment may go) once it has every bit it needs. A run the store refuses for now
(credentials, a deleted experiment) is *held*, and what an exporter had already done for it is
not done again when it is retried.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable

from ._exceptions import StoreRefused
from ._exporters.runs import RunsExporter
from ._exporters.traces import TracesExporter
from ._exporters.work import DEFERRED, HOLD, SENT, Outcome, RunWork
from ._journal import RUNS_DONE, RUNS_IN_FLIGHT, TRACES_DONE, TRACES_IN_FLIGHT
from ._stats import WorkerCounts


def done(outcome: Outcome | None) -> bool:
    """The exporter is finished with it: sent, or refused for good."""
    return outcome == SENT or isinstance(outcome, tuple)


def _keep_runs_outcome(work: RunWork, outcome: Outcome) -> None:
    work.runs_outcome = outcome


class Dispatcher:
    """See the module docstring."""

    def __init__(
        self,
        runs: RunsExporter,
        traces: TracesExporter,
        counts: WorkerCounts,
        *,
        on_settled: Callable[[RunWork, bool], None] | None = None,
        before_traces: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.runs = runs
        self.traces = traces
        self.counts = counts
        self.on_settled = on_settled
        # Awaited between the runs and the spans of a cycle (closing: every sink's run ends
        # go before anyone's spans; a close may take the cycle over there).
        self.before_traces = before_traces
        self.exporting: dict[int, RunWork] = {}  # handed to the exporters, not settled yet
        self.held: list[RunWork] = []  # waiting for the store to take writes again

    async def export(self, works: list[RunWork]) -> None:
        """One cycle (see the module docstring). Raises PermanentError when the experiment
        cannot be had at all (the caller gives up: :meth:`give_up`)."""
        traces = self.traces
        for work in works:
            work.needs_traces = work.needs_traces and traces.active
            if work.runs_outcome is None:
                for segment, offset in work.locations:
                    segment.mark(offset, RUNS_IN_FLIGHT)
        # A deadline may cancel this: take_unsettled() then returns what is left in here.
        self.exporting = {work.no: work for work in works}
        try:
            for work in works:
                if not work.needs_traces:
                    work.traces_outcome = work.traces_outcome or SENT
                if work.runs_outcome is not None:
                    self._maybe_settle(work)
            await self.runs.export([w for w in works if w.runs_outcome is None], self._runs_done)
            if self.before_traces is not None:
                await self.before_traces()
            spans = [
                w
                for w in self.exporting.values()
                if w.traces_outcome is None and w.runs_outcome not in (None, HOLD)
            ]
            # Marked only now, as the spans go out: a replay then knows that what never had the
            # mark reached no trace (nor its assessments), whatever the runs part went through.
            for work in spans:
                for segment, offset in work.locations:
                    segment.mark(offset, TRACES_IN_FLIGHT)
            traces.learn(works)
            for no, outcome in (await traces.export(spans)).items():
                waiting = self.exporting.get(no)
                if waiting is not None:
                    waiting.traces_outcome = outcome
                    self._maybe_settle(waiting)
        except StoreRefused:
            pass
        self.give_up(HOLD)  # the store refuses everything for now: keep what is left

    async def runs_first(self, works: list[RunWork]) -> None:
        """The runs exporter's part of ``works`` now, its outcomes kept on them; their spans go
        when they are exported (the runs exporter then passes over them)."""
        todo = [work for work in works if work.runs_outcome is None]
        for work in todo:
            for segment, offset in work.locations:
                segment.mark(offset, RUNS_IN_FLIGHT)
        with contextlib.suppress(StoreRefused):  # what has no outcome is tried again then
            await self.runs.export(todo, _keep_runs_outcome)

    def give_up(self, outcome: Outcome) -> None:
        """Settle what the exporters have not answered for with ``outcome``."""
        for work in list(self.exporting.values()):
            if outcome != HOLD:
                work.runs_outcome = work.runs_outcome or outcome
                work.traces_outcome = work.traces_outcome or outcome
            self.exporting.pop(work.no, None)
            self.settle(work)

    def take_unsettled(self) -> list[RunWork]:
        """What is being exported or held (at the end: it is all kept for replay)."""
        left = [*self.exporting.values(), *self.held]
        self.exporting, self.held = {}, []
        return left

    def settle_left(self, work: RunWork) -> None:
        """At the end: what an exporter did not finish is kept for replay."""
        work.runs_outcome = work.runs_outcome if done(work.runs_outcome) else DEFERRED
        work.traces_outcome = work.traces_outcome if done(work.traces_outcome) else DEFERRED
        self.settle(work)

    def _runs_done(self, work: RunWork, outcome: Outcome) -> None:
        work.runs_outcome = outcome
        self._maybe_settle(work)

    def _maybe_settle(self, work: RunWork) -> None:
        if work.runs_outcome is None or work.traces_outcome is None:
            return
        if self.exporting.pop(work.no, None) is not None:
            self.settle(work)

    def settle(self, work: RunWork) -> None:
        """Give each event of ``work`` its one fate, from what both exporters said."""
        counts = self.counts
        runs, traces = work.runs_outcome, work.traces_outcome
        if HOLD in (runs, traces) or runs is None or traces is None:
            # Kept for a retry; only what was not done is done again.
            work.runs_outcome = runs if done(runs) else None
            work.traces_outcome = traces if done(traces) else None
            self.held.append(work)
            return
        if isinstance(runs, tuple):
            counts.dropped[runs[1]] += work.counted
        elif isinstance(traces, tuple) and runs == SENT:
            counts.dropped[traces[1]] += work.counted
        elif runs == SENT and traces == SENT:
            counts.sent += work.counted
        else:
            counts.deferred += work.counted - work.in_memory_only
            if work.in_memory_only:
                counts.dropped["send_failed"] += work.in_memory_only
        bits = (RUNS_DONE if done(runs) else 0) | (TRACES_DONE if done(traces) else 0)
        complete = 0
        touched = set()
        for segment, offset in work.locations:
            if bits and segment.mark(offset, bits):
                segment.done += 1
                complete += 1
                touched.add(segment)
        for segment in touched:
            segment.release_if_finished()
        if self.on_settled is not None:
            self.on_settled(work, complete == len(work.locations) and done(runs))

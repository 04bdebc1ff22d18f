"""The traces exporter: every RLM run tree as one MLflow trace (see :mod:`._spans`).

Each drain cycle's spans go out together: one OTLP request (protobuf, gzip) with every span of
the traces still running, and one per trace whose root run ended in the cycle, sent last with
the root's MLflow run in its header, which links the trace to that run (the run page's Traces
tab, ``search_traces(run_id=...)``). On a store that writes a trace's info with its assessments
(:mod:`.assessments`), that info links it instead, and the spans of ending traces share the
requests of the others. Spans are upserted by their ids, so a retry or a replay
never duplicates one. A store that says itself that it cannot take traces (a server older than
MLflow 3.6, a store without trace ingest answering 501) turns traces off with one warning: the
spans of that cycle are counted as rejected (``traces_unsupported``), never as sent; runs go
on. A proxy's page on ``/v1/traces`` is a transient failure like any other. A request too large
for the server or a proxy (HTTP 413) is split in halves, down to one span; a single span still
too large is refused and counted (``span_too_large``). A request holds at most
:data:`MAX_SPANS` spans and :data:`MAX_BYTES` bytes.

A trace holds at most ``span_budget`` spans. Past it, each run's steps go into one summary span
(their count, rewards, failures, tokens and time range, re-sent as it grows), the root's last
steps are sent in full at its end, and a child run that starts past it is folded into its
nearest ancestor's summary; a child in the trace gets the step that spawned it in full, so
every span has its parent. The budget is weighed in the order runs and steps happened.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from .._calls import Caller
from .._config import DEFAULT_SPAN_BUDGET
from .._events import (
    VERDICT,
    CaseResult,
    RunEnd,
    Step,
    case_figures,
    completed_of,
    verdict_score,
)
from .._exceptions import SMALL_ITEM, TOO_LARGE, PermanentError, StoreRefused, TransientError
from .._journal_format import (
    TraceShape,
    read_figures,
    read_trace_shapes,
    write_figures,
    write_trace_shapes,
)
from .._stats import RateLimitedWarnings
from .._transports.base import (
    Assessment,
    AssessmentStore,
    Dataset,
    Metric,
    TraceEnd,
    Transport,
)
from .assessments import AssessmentsExporter, assessment_key, outcome_of, value_of
from .spans import Elided, Ids, RunInfo, SpanBuilder, run_error, run_times_ms
from .work import DEFERRED, HOLD, SENT, Outcome, RunRefs, RunWork

logger = logging.getLogger("rlm_mlflow")

#: Spans in one request at most, and serialized bytes (before gzip) at most: a request of
#: 1,000 spans is stored in about 2 s on a busy 2-core machine (docs/traces.md), far within
#: the request timeout even on a slower store.
MAX_SPANS = 1_000
MAX_BYTES = 2 << 20
#: Steps in a cycle beyond which spans are built on a worker thread, off the event loop.
_BUILD_ON_THREAD = 200
#: Ended runs remembered, for a step that comes after its run's end.
ENDED_MEMORY = 1024
#: The root run's last steps kept in full past the span budget (at most a tenth of it).
TAIL_STEPS = 50


@dataclass(slots=True)
class _Budget:
    """The spans one trace may still take in full before its steps go into summaries."""

    limit: int  # the budget less what the root's tail, summary and span keep aside
    used: int = 0
    # Each run's place in the trace as it was first seen, ended runs' too (see ShapeKeeper),
    # and the runs whose summary span may be stored.
    places: dict[int, tuple[int, list[int]]] = field(default_factory=dict)
    summaries: set[int] = field(default_factory=set)
    # Of the spans used, those kept for replay that certainly did not reach the store (never
    # sent, refused on the way): a replay builds them again, so the kept shape does not count
    # them.
    unstored: int = 0


class ShapeKeeper:
    """The shapes of running traces (see :func:`write_trace_shapes`), kept in a file beside
    the journal: a replay shapes a trace's spans as the process that sent its first ones did
    (each run shown or folded as it was, each child under the step that spawned it), within
    what is left of its budget.

    ``loaded`` is what a replay read back from the file; :meth:`keep` replaces the entries of
    the traces an exporter sent spans of, drops those stored whole (their root's end, spans and
    assessments), and writes the file when that changed anything (a replay's exporters share
    one keeper: each has some trees)."""

    def __init__(self) -> None:
        self.loaded: dict[int, TraceShape] = {}
        self.shapes: dict[int, TraceShape] = {}
        self.written: dict[int, TraceShape] = {}
        self.refused = False  # the disk refused the last write (said once, until one goes)
        self._writing = anyio.Lock()  # one write at a time (a replay's lanes share the file)

    def load(self, folder: Path) -> None:
        self.loaded = read_trace_shapes(folder)
        self.shapes = dict(self.loaded)
        self.written = dict(self.loaded)

    async def keep(self, folder: Path, shapes: dict[int, TraceShape], gone: set[int]) -> None:
        self.shapes.update(shapes)
        for root in gone:
            self.shapes.pop(root, None)
        async with self._writing:
            if self.shapes == self.written and not self.refused:  # a refused write: again
                return
            self.written = written = dict(self.shapes)
            say = not self.refused
            self.refused = not await anyio.to_thread.run_sync(
                lambda: write_trace_shapes(folder, written, say=say)
            )


@dataclass(slots=True)
class _Shape:
    """How one run appears in its trace under the span budget."""

    shown: bool  # its run span and steps are in the trace; else it is folded into ``into``
    into: int  # the shown run whose summary span stands for it (itself when shown)
    forced: set[int] = field(default_factory=set)  # step ordinals that have shown child runs
    eliding: bool = False  # its steps go into its summary from now on
    elided: Elided | None = None  # what its summary says (the root: steps past the ring)
    ring: deque[Step] | None = None  # the root's last elided steps, sent in full at its end
    last: int = -1  # the last step ordinal weighed (a step taken again is not counted again)
    first: str | None = None  # what its summary began with (its span id comes from it)
    stored: bool = False  # its summary span is in the store: sending it again replaces it


_Snapshot = tuple[list[Step] | None, Elided | None, bool, int, str | None]


class TracesExporter:
    """See the module docstring."""

    def __init__(
        self,
        *,
        caller: Caller,
        warnings: RateLimitedWarnings,
        prefix: str,
        runs: RunRefs,
        transport: Callable[[], Transport],
        mode: str,
        span_budget: int = DEFAULT_SPAN_BUDGET,
    ) -> None:
        self.caller = caller
        self.warnings = warnings
        self.ids = Ids(prefix)
        self.runs = runs
        self._transport = transport
        self.mode = mode
        self.span_budget = span_budget
        self.tail = min(TAIL_STEPS, span_budget // 10)
        self.budgets: dict[int, _Budget] = {}  # trace (root run no) -> its budget
        self.shapes: dict[int, _Shape] = {}  # open run no -> how it appears in its trace
        # A cycle's summaries as they were before it: put back for the runs not sent.
        self._snapshots: dict[int, _Snapshot] = {}
        self._summarised: set[int] = set()  # runs whose summary this cycle sends
        self._again: set[int] = set()  # the summary spans it sends again (by id()): not new
        self._root_of: dict[int, int] = {}  # each span of a cycle (by id()) -> its trace's root
        self._unstored_changed = False  # a trace's spans not stored were counted (keep shapes)
        self.unsupported: str | None = None  # why traces are off for this store
        self.info: dict[int, RunInfo] = {}
        # Replay: runs known from the journal's starts alone (see learn): their ends may be
        # done already, their traces stored.
        self.seeded: set[int] = set()
        self.ended: OrderedDict[int, RunInfo] = OrderedDict()
        self._builder: SpanBuilder | None = None
        self.spans_sent = 0
        self.requests = 0
        self.assessments = AssessmentsExporter(
            caller=caller, warnings=warnings, runs=runs, transport=transport
        )
        self.benchmarks: set[int] = set()  # evaluation runs: no trace of their own
        self.datasets: dict[int, Dataset] = {}  # an evaluation run's input
        self.case_of: dict[int, int] = {}  # a benchmark's case (root run) -> the benchmark
        # benchmark -> case -> its figures (reward, completed, tokens, duration, verdict)
        self.figures: dict[int, dict[int, dict[str, float]]] = {}
        # Where they are kept on disk until the benchmark's aggregates are written (the
        # journal's folder): a process killed before its benchmark ended leaves the figures of
        # the cases whose records were done, which replay no longer reads.
        self.figures_dir: Callable[[], Path | None] | None = None
        self._figures_changed: set[int] = set()
        # The running traces' shapes beside the journal (see ShapeKeeper); a replay's exporters
        # share one.
        self.keeper = ShapeKeeper()
        self._gone: set[int] = set()  # traces stored whole: their shapes go from the file
        self._starting: set[int] = set()  # runs whose start is in the cycle being shaped

    @property
    def active(self) -> bool:
        return self.mode != "off" and self.unsupported is None

    async def learn_server(self) -> None:
        """Ask the store now what it does with a trace's info (see ``upserts``), before any
        trace needs it: a failure only leaves it to be asked at the first spans (a task of
        the worker's own: nothing of it may reach the worker)."""
        try:
            await self.assessments.upserts()
        except Exception:
            logger.debug("rlm-mlflow: the server's version was not read", exc_info=True)

    def state(self) -> str:
        """For status(): on, off (by configuration) or why they are off."""
        if self.mode == "off":
            return "off"
        if self.unsupported is not None:
            return f"off: {self.unsupported}"
        return self.mode

    def learn(self, works: Sequence[RunWork], *, seeded: bool = False) -> None:
        """Remember what the spans of these runs need (their starts), even with traces off;
        ``seeded``: starts a replay read whatever became of them."""
        if seeded:
            self.seeded.update(work.no for work in works)
        for work in works:
            for start in work.starts:
                if start.bench_no is not None:
                    self.case_of[work.no] = start.bench_no
                if start.benchmark:
                    self.benchmarks.add(work.no)
                    dataset = _dataset_of(start.dataset)
                    if dataset is not None:
                        self.datasets[work.no] = dataset
                known = self.info.get(work.no)
                if start.implicit and known is not None:
                    continue
                info = self.info[work.no] = RunInfo.of(start)
                if known is not None:  # the same start again (a retry): keep what it learnt
                    info.child_start_ns = known.child_start_ns
        for work in works:  # then each child's start, its parent known whatever the order
            for start in work.starts:
                parent = self.info.get(start.parent_no) if start.parent_no is not None else None
                if parent is not None and start.parent_step is not None and not start.implicit:
                    parent.child_started(start.parent_step, start.timestamp_ns)

    def _info(self, work: RunWork) -> RunInfo:
        info = self.info.get(work.no) or self.ended.get(work.no)
        if info is None:  # its start is long gone (a journal replayed in part)
            info = self.info[work.no] = RunInfo(
                no=work.no, run_id=work.run_id or self.runs.key_of(work.no), root_no=work.no
            )
        return info

    # -- one cycle -------------------------------------------------------------------------

    async def export(self, works: Sequence[RunWork]) -> dict[int, Outcome]:
        """Send the spans of these runs (their MLflow runs exist: the runs exporter went
        first); each run's outcome for its traces part."""
        self.learn(works)
        todo = [w for w in works if w.needs_traces and w.traces_outcome is None]
        outcomes: dict[int, Outcome] = {work.no: SENT for work in works}
        if not self.active or not todo:
            self._forget_ended(works)
            return outcomes
        if self._builder is None:
            self._builder = SpanBuilder(self.ids)
        # A store that writes a trace's info with its Feedback links each trace to its run
        # there: the spans of ending traces then share requests with the others.
        # Asked of the store at its first spans (read once), not at the first root's end: that
        # may come in a close against a deadline, where the read would hold the info up.
        takes_upserts = await self.assessments.upserts()
        roots_end = any(self.ends_root(w) and w.no not in self.benchmarks for w in todo)
        upserts = takes_upserts and roots_end
        experiment_id = await self.runs.ensure_experiment()
        # The info of a trace that begins and ends in this cycle goes before its spans.
        early: dict[int, Outcome] = {}
        for work in todo if upserts else ():
            ending = work.span_end
            if ending is not None and self._begins_and_ends(work):
                trace_end = self._trace_end(self._info(work), ending)
                outcome = await self.assessments.finish_first(experiment_id, trace_end)
                if outcome is not None:
                    early[work.no] = outcome
        if sum(len(w.span_steps) for w in todo) > _BUILD_ON_THREAD:
            requests = await anyio.to_thread.run_sync(self._requests_of, todo, upserts)
        else:
            requests = self._requests_of(todo, upserts)
        await self._keep_shapes()  # before any of these spans can be stored
        for index, (run_uuid, spans, nos) in enumerate(requests):
            outcome = await self._send(experiment_id, run_uuid, spans)
            if outcome == SENT and self._again:  # a summary sent again is no new span
                self.spans_sent -= sum(1 for span in spans if id(span) in self._again)
            if self.unsupported is not None:  # the store cannot take traces: none are sent
                unsent = sum(len(spans) for _, spans, _ in requests[index:])
                for _ in range(unsent):
                    self.runs.count_rejected("traces_unsupported")
                outcomes = {work.no: SENT for work in works}  # their runs' part is what is left
                break
            for no in nos:  # a run whose summary went again for a folded run may have no work
                outcomes[no] = worse(outcomes.get(no, SENT), outcome)
        self._settle_summaries(outcomes)
        self._root_of = {}
        if self._unstored_changed:  # before the budgets of traces that ended go
            self._unstored_changed = False
            await self._keep_shapes()
        if self.active:
            for no, outcome in early.items():
                outcomes[no] = worse(outcomes[no], outcome)
            await self._assess(todo, outcomes, experiment_id if upserts else None, set(early))
            await self._keep_figures()  # before the cases' records are marked done
        self._unplace(todo, outcomes)
        self._forget_ended(works)
        if self._gone:  # traces stored whole: their shapes go from the file now
            await self._keep_shapes()
        return outcomes

    async def _assess(
        self,
        works: Sequence[RunWork],
        outcomes: dict[int, Outcome],
        upsert_in: str | None,
        written: set[int],
    ) -> None:
        """The assessments of each trace whose root span is stored now (see
        :mod:`.assessments`; with ``upsert_in``, the experiment, they go with the trace's info
        and run link; ``written``: roots whose trace's info went before its spans, whatever
        its outcome), then what benchmarks say of their cases, then the aggregates of each
        benchmark that ended. A run's outcome is kept for replay until they are written."""
        for work in works:
            end = work.span_end
            if work.no in self.benchmarks or work.no in written or end is None:
                continue
            if outcomes[work.no] != SENT or not self.ends_root(work):
                continue
            info = self._info(work)
            trace_id = self.ids.trace_hex(info.root_no)
            if upsert_in is not None:
                outcome = await self.assessments.finish(upsert_in, self._trace_end(info, end))
            else:
                outcome = await self.assessments.write(trace_id, outcome_of(trace_id, end))
            bench = self.case_of.get(work.no)
            if bench is not None and outcome == SENT:
                ref = self.runs.ref_of(bench)
                if ref is None:  # the evaluation run could not be had yet: kept for replay
                    outcome = DEFERRED
                else:
                    outcome = await self.assessments.link(ref.run_uuid, [trace_id])
                if outcome == SENT:
                    self.case_of.pop(work.no, None)
                    self._case_figures(bench, work.no, info.start_ns, end)
            outcomes[work.no] = worse(outcomes[work.no], outcome)
        by_no = {work.no: work for work in works}
        for work in works:
            if work.no not in self.benchmarks or outcomes[work.no] != SENT:
                continue
            for case in work.cases:
                # Its trace is not there yet: its run's spans were not sent, or it has not
                # ended (its trace may be stored only with its root's end). Kept for replay.
                ending = by_no.get(case.case_no)
                ends_now = ending is not None and ending.span_end is not None
                seen_open = case.case_no in self.info and case.case_no not in self.seeded
                still_open = seen_open and not ends_now
                if still_open or outcomes.get(case.case_no, SENT) != SENT:
                    outcomes[work.no] = DEFERRED
                    continue
                outcome = await self._case(case)
                outcomes[work.no] = worse(outcomes[work.no], outcome)
            if work.span_end is not None and outcomes[work.no] == SENT:
                outcomes[work.no] = await self._aggregate(work.no, work.span_end)

    def _trace_end(self, info: RunInfo, end: RunEnd) -> TraceEnd:
        """What the trace of a root run that ended says, as its root span says it."""
        trace_id = self.ids.trace_hex(info.root_no)
        start_ms, duration_ms = run_times_ms(info, end)
        ref = self.runs.ref_of(info.root_no)
        return TraceEnd(
            trace_id=trace_id,
            request_time_ms=start_ms,
            duration_ms=duration_ms,
            state="OK" if run_error(end) is None else "ERROR",
            run_uuid=ref.run_uuid if ref is not None else None,
            assessments=tuple(outcome_of(trace_id, end)),
            at_ms=end.timestamp_ns // 1_000_000,
        )

    def _case_figures(self, bench: int, case: int, start_ns: int, end: RunEnd) -> None:
        tokens = end.usage.total_tokens if end.usage is not None else 0
        figures = case_figures(
            completed_of(end), end.total_reward, tokens, start_ns, end.timestamp_ns
        )
        self.figures.setdefault(bench, {}).setdefault(case, {}).update(figures)
        self._figures_changed.add(bench)

    async def _keep_figures(self) -> None:
        """Write the figures of the benchmarks whose cases said something this cycle beside
        the journal; remove those of benchmarks whose aggregates are written."""
        changed, self._figures_changed = self._figures_changed, set()
        folder = self.figures_dir() if self.figures_dir is not None and changed else None
        if folder is None:
            return
        kept = {bench: self.figures.get(bench) for bench in changed}
        await anyio.to_thread.run_sync(write_figures, folder, kept)

    def _shapes(self) -> dict[int, TraceShape]:
        """The shape of each running trace this exporter sent spans of: the spans it holds or
        may hold (its budget's, and one more for each summary span that may be stored: a
        replay sends its own summary beside it) and its runs' places."""
        for no, shape in self.shapes.items():
            info = self.info.get(no) or self.ended.get(no)
            budget = self.budgets.get(info.root_no) if info is not None else None
            if budget is None:
                continue
            budget.places[no] = (shape.into, sorted(shape.forced))
            if shape.stored or no in self._summarised:
                budget.summaries.add(no)
        return {
            root: (
                max(0, budget.used - budget.unstored) + len(budget.summaries),
                dict(budget.places),
            )
            for root, budget in self.budgets.items()
        }

    def _unplace(self, works: Sequence[RunWork], outcomes: dict[int, Outcome]) -> None:
        """A run whose end's spans are stored has nothing left for a replay to place: its place
        goes from its trace's shape (which then grows with the runs open, not with all)."""
        for work in works:
            if work.span_end is None or outcomes.get(work.no) != SENT:
                continue
            info = self.info.get(work.no) or self.ended.get(work.no)
            if info is not None and info.is_root:  # the trace is whole: its shape goes
                self._gone.add(work.no)
            budget = self.budgets.get(info.root_no) if info is not None else None
            if budget is not None:
                budget.places.pop(work.no, None)
                budget.summaries.discard(work.no)

    async def _keep_shapes(self) -> None:
        """Keep the running traces' shapes beside the journal when they changed, before the
        cycle's spans go out (a process killed while they do leaves a shape that counts them)."""
        folder = self.figures_dir() if self.figures_dir is not None else None
        if folder is not None:
            gone, self._gone = self._gone, set()
            await self.keeper.keep(folder, self._shapes(), gone)

    def load_figures(self, folder: Path) -> None:
        """Replay: the figures a process kept beside its journal (see :meth:`_keep_figures`);
        what the records replayed say comes on top."""
        for bench, cases in read_figures(folder).items():
            known = self.figures.setdefault(bench, {})
            for case, figures in cases.items():
                for name, value in figures.items():
                    known.setdefault(case, {}).setdefault(name, value)

    async def _case(self, case: CaseResult) -> Outcome:
        """The expected answer and the verdict of one case, on its trace."""
        trace_id = self.ids.trace_hex(case.case_no)
        found: list[Assessment] = []
        expected = value_of(case.expected)
        if expected is not None:
            key = assessment_key(trace_id, "expected_response")
            found.append(Assessment("expected_response", expected, key, kind="expectation"))
        verdict = value_of(case.verdict)
        if verdict is not None:
            key = assessment_key(trace_id, case.judge)
            found.append(Assessment(case.judge, verdict, key, rationale=case.rationale))
            score = verdict_score(verdict)
            if score is not None:
                figures = self.figures.setdefault(case.run_no, {}).setdefault(case.case_no, {})
                figures[VERDICT + case.judge] = score
                self._figures_changed.add(case.run_no)
        return await self.assessments.write(trace_id, found)

    async def _aggregate(self, bench: int, end: RunEnd) -> Outcome:
        """A benchmark's aggregate metrics, on its evaluation run, once."""
        # What the hooks saw (kept with the end through a crash), and what the cases' ends and
        # records said here (cases the sink or a replay ended).
        cases = {no: dict(figures) for no, figures in (end.cases or {}).items()}
        for no, figures in self.figures.pop(bench, {}).items():
            cases.setdefault(no, {}).update(figures)
        self._figures_changed.add(bench)  # written, or kept again below: its file follows
        ref = self.runs.ref_of(bench)
        if ref is None:
            return SENT
        dataset = self.datasets.get(bench)
        store = self._transport()
        if dataset is not None and isinstance(store, AssessmentStore):
            kept = await self._benchmark_write(
                "dataset", bench, cases, store.log_dataset, ref.run_uuid, dataset
            )
            if kept is not None:
                return kept
        self.datasets.pop(bench, None)
        if not cases:
            return SENT
        at = end.timestamp_ns // 1_000_000
        metrics = [Metric("cases", float(len(cases)), at, 0)]
        names = sorted({name for figures in cases.values() for name in figures})
        for name in names:
            values = [figures[name] for figures in cases.values() if name in figures]
            key = _METRIC_UNSAFE.sub("_", name.removeprefix(VERDICT))[:200]
            metrics.append(Metric(f"{key}/mean", mean(values), at, 0))
        tokens = [figures["tokens"] for figures in cases.values() if "tokens" in figures]
        if tokens:
            metrics.append(Metric("tokens/total", sum(tokens), at, 0))
        transport = self._transport()
        kept = await self._benchmark_write(
            "aggregates", bench, cases, _log_once, transport, ref.run_uuid, metrics
        )
        return SENT if kept is None else kept

    async def _benchmark_write(
        self,
        what: str,
        bench: int,
        cases: dict[int, dict[str, float]],
        fn: Callable[..., object],
        *args: object,
    ) -> Outcome | None:
        """One write of a benchmark's run (its dataset, its aggregates): None when it is done
        (or refused for good, said once); HOLD or DEFERRED with the cases kept for a next try."""
        try:
            await self.caller.call(f"log {what}", fn, *args)
        except StoreRefused:
            self.figures[bench] = cases
            return HOLD
        except PermanentError as exc:
            self.warnings.warn(
                f"{what}_refused", "rlm-mlflow: MLflow refused a benchmark's %s: %s", what, exc
            )
        except TransientError as exc:
            self.figures[bench] = cases
            self.warnings.warn(
                f"{what}_deferred", "rlm-mlflow: a benchmark's %s not sent, kept: %s", what, exc
            )
            return DEFERRED
        return None

    def _requests_of(
        self, works: Sequence[RunWork], shared_ends: bool = False
    ) -> list[tuple[str | None, list[bytes], set[int]]]:
        """The spans of a cycle as requests: each trace whose root run ends now in one request
        of its own, linked to the root's MLflow run (unless ``shared_ends``: its info links it
        then), and the spans of running traces together.
        Past a trace's span budget, steps go into their run's summary span (see
        :meth:`_step_spans`), re-sent with the figures so far in each cycle that changes it."""
        builder = self._builder
        assert builder is not None
        benchmarks = self.benchmarks
        ending = set()
        if not shared_ends:
            ending = {
                self._info(w).root_no for w in works if self.ends_root(w) and w.no not in benchmarks
            }
        shared: list[bytes] = []
        shared_nos: set[int] = set()
        traces: dict[int, tuple[list[bytes], set[int]]] = {root: ([], set()) for root in ending}
        self._snapshots, self._summarised, self._again = {}, set(), set()
        self._root_of = {}
        # shown run -> the runs whose events its summary carries this cycle
        summaries: dict[int, set[int]] = {}
        ended: set[int] = set()
        # The budget goes to runs and steps in the order they happened: a child run started
        # before its parent's tenth step is weighed before that step.
        kept = [work for work in works if work.no not in benchmarks]
        self._starting = {work.no for work in kept if work.starts}
        moments: list[tuple[int, int, int, Step | None]] = []
        for index, work in enumerate(kept):
            if work.starts and work.no not in self.shapes:
                moments.append((work.starts[0].timestamp_ns, 0, index, None))
            for step in work.span_steps:
                moments.append((step.timestamp_ns, 1, index, step))
        moments.sort(key=lambda moment: moment[:3])
        spans_of: dict[int, list[bytes]] = {}
        for _, _, index, moment in moments:
            work = kept[index]
            info = self._info(work)
            shape = self._shape_of(info, summaries)
            if moment is not None and shape.shown:
                spans = self._step_spans(info, shape, moment, summaries)
                spans_of.setdefault(index, []).extend(spans)
        for work in kept:  # folded runs first: an ancestor ending now sums them up
            shape = self._shape_of(self._info(work), summaries)
            if not shape.shown:
                self._fold(work, shape, summaries)
        for index, work in enumerate(kept):
            info = self._info(work)
            shape = self._shape_of(info, summaries)
            spans = spans_of.get(index, [])
            if shape.shown and work.span_end is not None:
                spans.extend(self._tail_spans(info, shape))
                spans.append(builder.run_span(info, work.span_end))
                ended.add(work.no)
            if not spans:
                continue
            target, nos = traces.get(info.root_no, (shared, shared_nos))
            target.extend(spans)
            self._root_of.update((id(span), info.root_no) for span in spans)
            nos.add(work.no)
            if work.no in ended:  # the runs its final summary sums up
                nos.update(summaries.get(work.no, ()))
        for no, carried in summaries.items():
            summarised = self.shapes.get(no)
            of = self.info.get(no) or self.ended.get(no)
            if no in ended or summarised is None or of is None:
                continue  # an ending run's summary went with its tail
            figures = self._figures(summarised)
            if figures is None:
                continue
            target, nos = traces.get(of.root_no, (shared, shared_nos))
            span = self._summary_span(of, summarised, figures)
            target.append(span)
            self._root_of[id(span)] = of.root_no
            nos.update(carried)
            nos.add(no)
        requests: list[tuple[str | None, list[bytes], set[int]]] = [
            (None, chunk, shared_nos) for chunk in _chunks(shared)
        ]
        for root, (spans, nos) in traces.items():
            ref = self.runs.ref_of(root)
            run_uuid = ref.run_uuid if ref is not None else None
            chunks = _chunks(spans)
            # The chunk with the root span goes last: it finalises the trace (and links it).
            requests.extend((None, chunk, nos) for chunk in chunks[:-1])
            requests.append((run_uuid, chunks[-1], nos))
        return requests

    # -- the span budget ---------------------------------------------------------------------

    def _budget(self, root_no: int) -> _Budget:
        budget = self.budgets.get(root_no)
        if budget is None:
            # Kept aside: the root's tail, its summary and its own span.
            limit = max(0, self.span_budget - self.tail - 2)
            used, places = self.keeper.loaded.get(root_no, (0, {}))  # sent before this replay
            budget = self.budgets[root_no] = _Budget(limit, used, dict(places))
        return budget

    def _shape_of(self, info: RunInfo, summaries: dict[int, set[int]]) -> _Shape:
        """How the run appears in its trace, decided when it is first seen: a root is shown;
        a child is shown while its parent is and the budget has room for its span, its
        summary and its parent's step (which is then sent in full, so that the child's span
        has its parent); otherwise it is folded into its nearest shown ancestor's summary."""
        shape = self.shapes.get(info.no)
        if shape is not None:
            return shape
        kept = self.keeper.loaded.get(info.root_no, (0, {}))[1].get(info.no)
        if kept is not None:
            shape = self._restore(info, *kept, summaries)
            if shape is not None:
                return shape
        if info.is_root:
            shape = _Shape(True, info.no, ring=deque(maxlen=self.tail))
            self.shapes[info.no] = shape
            return shape
        parent_no = info.parent_no
        parent_info = None
        if parent_no is not None:
            parent_info = self.info.get(parent_no) or self.ended.get(parent_no)
        # An open parent not weighed yet (a replay meets a child's start before its parent's
        # first step) takes its place first: the child's span hangs under the parent's step.
        gone = parent_no not in self.shapes and parent_no not in self.info
        if parent_info is None or gone:  # its parent ended and was forgotten: as before
            shape = self.shapes[info.no] = _Shape(True, info.no)
            return shape
        parent = self._shape_of(parent_info, summaries)
        budget = self._budget(info.root_no)
        if parent.shown and budget.used + 3 <= budget.limit:
            budget.used += 2
            if info.parent_step is not None:
                parent.forced.add(info.parent_step)
            shape = self.shapes[info.no] = _Shape(True, info.no)
            return shape
        return self._folded(info, parent.into, summaries)

    def _folded(self, info: RunInfo, into: int, summaries: dict[int, set[int]]) -> _Shape:
        """The run folded into shown run ``into``: counted in its summary."""
        shape = self.shapes[info.no] = _Shape(False, into)
        target = self.shapes[into]
        self._snapshot(into, target)
        self._elided(target, f"r{info.no}").child_runs += 1
        summaries.setdefault(into, set()).add(info.no)
        return shape

    def _restore(
        self, info: RunInfo, into: int, forced: list[int], summaries: dict[int, set[int]]
    ) -> _Shape | None:
        """A run's place as its trace's kept shape says (None: its shown run is unknown)."""
        if into == info.no:
            ring: deque[Step] | None = deque(maxlen=self.tail) if info.is_root else None
            shape = self.shapes[info.no] = _Shape(True, info.no, forced=set(forced), ring=ring)
            return shape
        target = self.info.get(into) or self.ended.get(into)
        if target is None or target.root_no != info.root_no:
            return None
        shown = self._shape_of(target, summaries)
        if info.no in self._starting:  # counted as when it was folded: the same summary
            return self._folded(info, shown.into, summaries)
        shape = self.shapes[info.no] = _Shape(False, shown.into)
        return shape

    def _step_spans(
        self, info: RunInfo, shape: _Shape, step: Step, summaries: dict[int, set[int]]
    ) -> list[bytes]:
        """A shown run's step: in full while the trace's budget has room for all its spans
        (or when a child run shown in the trace hangs under it); else into the run's summary
        (the root's through its ring of last steps, sent in full at its end)."""
        builder = self._builder
        assert builder is not None
        budget = self._budget(info.root_no)
        again = step.ordinal <= shape.last
        if step.ordinal in shape.forced or (again and not shape.eliding):
            spans = builder.step_spans(info, step)
            budget.used += 0 if again else len(spans)
            shape.last = max(shape.last, step.ordinal)
            return spans
        if again:  # in the summary or the ring already
            return []
        self._snapshot(info.no, shape)
        shape.last = step.ordinal
        if not shape.eliding and budget.used < budget.limit:
            spans = builder.step_spans(info, step)
            if budget.used + len(spans) <= budget.limit:
                budget.used += len(spans)
                return spans
        shape.eliding = True
        ring = shape.ring
        if ring is not None and ring.maxlen:
            if len(ring) == ring.maxlen:
                oldest = ring[0]
                self._elided(shape, f"s{oldest.ordinal}").add(oldest)
            elif shape.first is None:
                shape.first = f"s{step.ordinal}"
            ring.append(step)
        else:
            self._elided(shape, f"s{step.ordinal}").add(step)
        summaries.setdefault(info.no, set()).add(info.no)
        return []

    def _tail_spans(self, info: RunInfo, shape: _Shape) -> list[bytes]:
        """At a shown run's end: its last steps in full, then its summary's final figures. The
        root's last steps stay in its summary when nothing else is (the summary sent while it
        ran holds them already, and a span once stored cannot be taken back)."""
        builder = self._builder
        assert builder is not None
        if not shape.elided:
            figures = self._figures(shape)
            return [] if figures is None else [self._summary_span(info, shape, figures)]
        # The last steps in full, newest first, as far as the budget has room for them (a
        # step can have model-call spans); those before stay in the summary.
        budget = self._budget(info.root_no)
        room = self.span_budget - budget.used - 2  # the summary and the run's span
        ring = list(shape.ring or ())
        cut = len(ring)
        full: list[list[bytes]] = []
        while cut > 0:
            spans = builder.step_spans(info, ring[cut - 1])
            if len(spans) > room:
                break
            room -= len(spans)
            full.append(spans)
            cut -= 1
        summary = shape.elided
        if cut:
            before = Elided(first=summary.first)
            for step in ring[:cut]:
                before.add(step)
            summary = summary.merge(before)
        out = [span for spans in reversed(full) for span in spans]
        budget.used += len(out)
        out.append(self._summary_span(info, shape, summary))
        return out

    def _summary_span(self, info: RunInfo, shape: _Shape, figures: Elided) -> bytes:
        builder = self._builder
        assert builder is not None
        span = builder.summary_span(info, figures)
        self._summarised.add(info.no)
        if shape.stored:
            self._again.add(id(span))
        return span

    def _fold(self, work: RunWork, shape: _Shape, summaries: dict[int, set[int]]) -> None:
        """A folded run's steps and end, counted in its shown ancestor's summary (their tokens
        are in the usage of the ancestor's step that delegated)."""
        target = self.shapes.get(shape.into)
        if target is None:
            return
        failed = work.span_end is not None and work.span_end.status != "FINISHED"
        if not work.span_steps and not failed:
            return
        self._snapshot(shape.into, target)
        elided = self._elided(target, f"r{work.no}")
        for step in work.span_steps:
            elided.add_child_step(step)
        if failed:
            elided.child_failures += 1
        summaries.setdefault(shape.into, set()).add(work.no)

    @staticmethod
    def _elided(shape: _Shape, first: str) -> Elided:
        """The run's summary figures past its ring; it begins with ``first`` unless it began
        before (its ring's first step)."""
        if shape.first is None:
            shape.first = first
        if shape.elided is None:
            shape.elided = Elided(first=shape.first)
        return shape.elided

    def _figures(self, shape: _Shape) -> Elided | None:
        """A running run's summary so far, the steps in its ring included (sent as it goes,
        a process that dies loses none of them from the trace)."""
        if shape.first is None:
            return None
        figures = Elided(first=shape.first)
        for step in shape.ring or ():
            figures.add(step)
        return shape.elided.merge(figures) if shape.elided else figures

    def _snapshot(self, no: int, shape: _Shape) -> None:
        """Keep the run's summary as it was before this cycle (once per cycle)."""
        if no not in self._snapshots:
            ring = list(shape.ring) if shape.ring is not None else None
            elided = shape.elided.copy() if shape.elided is not None else None
            self._snapshots[no] = (ring, elided, shape.eliding, shape.last, shape.first)

    def _settle_summaries(self, outcomes: dict[int, Outcome]) -> None:
        """A run whose events of this cycle are kept for replay gets its summary back as it
        was: the replay summarises them itself (under another span id), never twice."""
        for no in self._summarised:
            shape = self.shapes.get(no)
            if shape is not None and outcomes.get(no, SENT) == SENT:
                shape.stored = True
        for no, (ring, elided, eliding, last, first) in self._snapshots.items():
            shape = self.shapes.get(no)
            if shape is None or outcomes.get(no, SENT) == SENT:
                continue
            if ring is not None and shape.ring is not None:
                shape.ring = deque(ring, maxlen=shape.ring.maxlen)
            shape.elided, shape.eliding, shape.last, shape.first = elided, eliding, last, first
            shape.stored = shape.stored and first is not None
        self._snapshots, self._summarised, self._again = {}, set(), set()

    def _begins_and_ends(self, work: RunWork) -> bool:
        """A plain root run (no benchmark's) whose start is in this cycle and that ends in it:
        its trace's spans have not gone out before (unless this is a retry, or its start came
        after its first hooks: the store then merges the info into that trace, as ever)."""
        return (
            bool(work.starts)
            and self.ends_root(work)
            and work.no not in self.benchmarks
            and work.no not in self.case_of
        )

    def ends_root(self, work: RunWork) -> bool:
        """The run is a trace's root and ends in this cycle."""
        return work.span_end is not None and self._info(work).is_root

    def _forget_ended(self, works: Sequence[RunWork]) -> None:
        for work in works:
            if work.span_end is not None or work.end is not None:
                info = self.info.pop(work.no, None)
                self.shapes.pop(work.no, None)
                if info is not None and info.is_root:
                    self.budgets.pop(work.no, None)
                if info is not None:
                    self.ended[work.no] = info
                    while len(self.ended) > ENDED_MEMORY:
                        self.ended.popitem(last=False)

    def _not_stored(self, spans: Sequence[bytes]) -> None:
        """These spans, kept for replay, are certainly not stored: their traces' kept shapes
        stop counting them (see :class:`_Budget`)."""
        for span in spans:
            budget = self.budgets.get(self._root_of.get(id(span), -1))
            if budget is not None:
                budget.unstored += 1
                self._unstored_changed = True

    async def _send(self, experiment_id: str, run_uuid: str | None, spans: list[bytes]) -> Outcome:
        builder = self._builder
        assert builder is not None
        request = builder.request(spans)
        export = self._transport().export_spans
        maybe_stored = False

        def attempt() -> None:
            nonlocal maybe_stored
            try:
                export(experiment_id, run_uuid, request)
            except TransientError as exc:
                maybe_stored = maybe_stored or exc.maybe_committed
                raise

        try:
            await self.caller.call("export spans", attempt)
        except StoreRefused:
            return HOLD
        except PermanentError as exc:
            if exc.code == "TRACES_UNSUPPORTED":
                self.unsupported = self.caller.clean(str(exc))
                logger.warning(
                    "rlm-mlflow: traces are off for this store (%s); runs are logged as before",
                    self.unsupported,
                )
                return SENT
            if exc.code == TOO_LARGE:
                return await self._split(experiment_id, run_uuid, spans, exc)
            self.warnings.warn(
                "spans_refused", "rlm-mlflow: MLflow refused %d spans: %s", len(spans), exc
            )
            return ("dropped", "spans_refused")
        except TransientError as exc:
            self.warnings.warn(
                "spans_deferred", "rlm-mlflow: %d spans not sent, kept: %s", len(spans), exc
            )
            if not maybe_stored:
                self._not_stored(spans)
            return DEFERRED
        self.spans_sent += len(spans)
        self.requests += 1
        return SENT

    async def _split(
        self, experiment_id: str, run_uuid: str | None, spans: list[bytes], exc: PermanentError
    ) -> Outcome:
        """A request too large: its halves, each on its own (the half with the last span, the
        root when the trace ends, goes last and carries the link); one span too large is
        refused and counted, and the others of its runs still count as sent. One small span
        refused so (under :data:`SMALL_ITEM`: the 413 is not about it), or a half kept, keeps
        the rest for a later try."""
        if len(spans) <= 1 and sum(len(span) for span in spans) < SMALL_ITEM:
            # A gateway's 413 on everything: it says nothing about this span. Kept for replay.
            self.warnings.warn(
                "spans_deferred", "rlm-mlflow: %d spans not sent, kept: %s", len(spans), exc
            )
            self._not_stored(spans)
            return DEFERRED
        if len(spans) <= 1:
            self.runs.count_rejected("span_too_large")
            self.warnings.warn(
                "span_too_large",
                "rlm-mlflow: a span of %d bytes is too large for the server or a proxy in "
                "front of it; it is not sent: %s",
                sum(len(span) for span in spans),
                exc,
            )
            return SENT
        half = len(spans) // 2
        first = await self._send(experiment_id, None, spans[:half])
        if first in (HOLD, DEFERRED) or self.unsupported is not None:
            # The other half would fare no better now (the spans go again whole: at once when
            # held, in replay when kept).
            if first == DEFERRED:
                self._not_stored(spans[half:])
            return first
        return worse(first, await self._send(experiment_id, run_uuid, spans[half:]))


#: What MLflow refuses in a metric name.
_METRIC_UNSAFE = re.compile(r"[^\w\-. /]")


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _dataset_of(document: object) -> Dataset | None:
    """The dataset of a benchmark's start record, if it has a valid one."""
    if not isinstance(document, dict):
        return None
    fields = [document.get(name) for name in ("name", "digest", "source", "profile")]
    if not all(isinstance(value, str) and value for value in fields):
        return None
    name, digest, source, profile = (str(value) for value in fields)
    return Dataset(name, digest, source, profile)


def _log_once(transport: Transport, run_uuid: str, metrics: list[Metric]) -> None:
    """Log metrics the run does not hold yet (a retried or replayed request adds none)."""
    if not transport.metric_history(run_uuid, "cases"):
        transport.log_batch(run_uuid, metrics=metrics)


def worse(a: Outcome, b: Outcome) -> Outcome:
    """The outcome of a run whose spans went in two requests."""
    for outcome in (HOLD, DEFERRED):
        if outcome in (a, b):
            return outcome
    return b if a == SENT else a


def _chunks(spans: list[bytes]) -> list[list[bytes]]:
    """Requests within MAX_SPANS spans and (roughly) MAX_BYTES bytes each."""
    chunks: list[list[bytes]] = []
    current: list[bytes] = []
    size = 0
    for span in spans:
        span_size = len(span)
        if current and (len(current) >= MAX_SPANS or size + span_size > MAX_BYTES):
            chunks.append(current)
            current, size = [], 0
        current.append(span)
        size += span_size
    if current:
        chunks.append(current)
    return chunks

"""Replay: send what journals hold that never reached MLflow, exactly once.

After a crash, a kill, a shutdown deadline or an outage, a journal keeps the events that were not
confirmed sent. ``replay()`` sends them through the same dispatcher and exporters the live sink
uses, ends the runs their process left open (KILLED: it died without ending them; a run that is
not RUNNING anymore is left as it is), marks each record done as it lands, and removes the
journal once nothing is left in it. Damaged bytes in a segment (a torn page, bit rot) are passed
over to the whole records after them, which are sent as usual; a journal with damage is kept,
and the report names the damaged byte ranges.

Exactly once, whatever the store: what an exporter is done with is skipped; what was in flight
(a request carrying it was sent, its answer never came) is checked against the store first, and
only the metric points it does not hold are sent; every other write is idempotent (runs are
found by their key tag, in one search per journal; spans have fixed ids). A replay interrupted
half way can simply be run again.

A journal whose sink is still alive (or that another replay is sending) is locked and left alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from . import _codec
from ._calls import Caller
from ._config import DEFAULT_EXPERIMENT, DEFAULT_SPAN_BUDGET, duration, redact_uri
from ._dispatch import Dispatcher
from ._events import RunEnd, RunStart
from ._exceptions import PermanentError, StoreRefused, TransientError
from ._exporters.runs import RunsExporter
from ._exporters.traces import ShapeKeeper, TracesExporter
from ._exporters.work import SENT, RunWork
from ._fork import KEY_PREFIX
from ._journal import Segment, default_journal_dir, open_segment, remove_journal
from ._journal_format import (
    RECORD_HEADER_SIZE,
    RUNS_IN_FLIGHT,
    SEGMENT_HEADER_SIZE,
    TRACES_IN_FLIGHT,
    Damage,
    ScanStats,
    journal_segments,
    never_written,
    read_late_runs,
    read_meta,
    scan_segment,
    try_lock,
)
from ._retry import RetryPolicy
from ._stats import RateLimitedWarnings, WorkerCounts
from ._transports.base import Transport

logger = logging.getLogger("rlm_mlflow")

Progress = Callable[[int, int], None]  # (events done, events in all)

#: Runs handed to the exporters at once.
BATCH = 200
#: Run trees of one journal sent at the same time, each through exporters of its own (the
#: transport bounds the requests in flight): a trace's requests never hold up other runs.
LANES = 4
#: Journal folders (one per sink) replayed at the same time: many small journals, a few
#: requests each, go at the server's pace rather than one after another.
FOLDERS_AT_ONCE = 4


@dataclass
class ReplayReport:
    """What a replay did."""

    journals: int = 0  # journals found
    replayed: int = 0  # journals sent in full and removed
    kept: list[str] = field(default_factory=list)  # journals with events that still failed
    in_use: list[str] = field(default_factory=list)  # locked by a live sink or another replay
    events: int = 0  # events that were waiting to be sent
    sent: int = 0  # events every exporter they needed has now
    runs_sent: int = 0  # events whose runs part (run, params, metrics, end) has now landed
    spans_sent: int = 0  # spans written to MLflow's traces
    failed: int = 0  # events that could not be sent (they stay for the next replay)
    refused: int = 0  # events the store refused for good (logged; not tried again)
    already_sent: int = 0  # events the journals held that had been sent already
    torn: int = 0  # records cut short at the end of what was written (a crash), skipped
    damaged: list[str] = field(default_factory=list)  # damaged byte ranges skipped (kept)
    runs_killed: int = 0  # runs left open by a dead process, ended KILLED
    problems: list[str] = field(default_factory=list)
    unreachable: str | None = None  # the store stopped answering: the rest was not tried

    @property
    def ok(self) -> bool:
        return not self.kept and self.failed == 0 and not self.damaged


def journal_folders(directory: Path) -> list[Path]:
    """One journal folder, or every journal folder under a journal directory."""
    if (directory / "meta.json").exists():
        return [directory]
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if (p / "meta.json").exists())


def replay(
    directory: str | os.PathLike[str] | None = None,
    *,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    transport: Transport | None = None,
    retry_deadline: float = 60.0,
    progress: Progress | None = None,
) -> ReplayReport:
    """Send every unsent event of the journals under ``directory`` (default: the sink's default
    journal directory), end the runs their process left open, and remove what was sent.

    ``retry_deadline`` bounds how long one failing request is retried; once the store has not
    answered for that long, the rest of the journal is left for the next replay."""
    retry_deadline = duration("retry_deadline", retry_deadline)
    root = Path(directory) if directory is not None else default_journal_dir()
    report = ReplayReport()
    folders = journal_folders(root)
    report.journals = len(folders)
    shared = _shared_prefixes(folders)
    lock = threading.Lock()
    totals: dict[Path, tuple[int, int]] = {}

    def progress_of(folder: Path) -> Progress | None:
        if progress is None:
            return None
        if len(folders) == 1:
            return progress

        def tell(done: int, total: int) -> None:
            with lock:  # one bar for every folder
                totals[folder] = (done, total)
                progress(sum(d for d, _ in totals.values()), sum(t for _, t in totals.values()))

        return tell

    def one(folder: Path) -> ReplayReport:
        part = ReplayReport()
        fd = try_lock(folder)
        if fd is None:
            part.in_use.append(str(folder))
            return part
        try:
            if report.unreachable is not None:  # one budget for the whole replay: not tried
                _count_waiting(folder, part)
                return part
            _replay_folder(
                folder,
                part,
                shared=shared,
                tracking_uri=tracking_uri,
                experiment=experiment,
                transport=transport,
                retry_deadline=retry_deadline,
                progress=progress_of(folder),
            )
            if part.unreachable is not None:
                report.unreachable = part.unreachable
        finally:
            os.close(fd)
        return part

    if len(folders) <= 1 or transport is not None:  # a transport given is used by one at once
        parts = [one(folder) for folder in folders]
    else:
        # The first alone: it finds the experiment for the others, or finds the store gone
        # (then the others are not tried, rather than each waiting out its own deadline).
        parts = [one(folders[0])]
        with ThreadPoolExecutor(min(FOLDERS_AT_ONCE, len(folders) - 1)) as pool:
            parts.extend(pool.map(one, folders[1:]))
    for part in parts:  # in the folders' order, whichever ended first
        _merge(report, part)
    return report


def _merge(report: ReplayReport, part: ReplayReport) -> None:
    for name in ("events", "sent", "runs_sent", "spans_sent", "failed", "refused"):
        setattr(report, name, getattr(report, name) + getattr(part, name))
    report.replayed += part.replayed
    report.already_sent += part.already_sent
    report.torn += part.torn
    report.runs_killed += part.runs_killed
    report.kept.extend(part.kept)
    report.in_use.extend(part.in_use)
    report.damaged.extend(part.damaged)
    report.problems.extend(part.problems)
    report.unreachable = report.unreachable or part.unreachable


@dataclass
class _Loaded:
    folder: Path
    segments: list[Segment]
    works: dict[int, RunWork]  # runs with something to send
    starts: dict[int, RunStart]  # every run's start, sent or not (traces need them)
    open_runs: dict[int, str]  # runs started and never ended: run -> run id
    in_flight: dict[int, set[int]]  # run -> times (ms) of its records sent without an answer
    for_runs: dict[int, int]  # run -> its events (from hook calls) the runs part lacks
    # Runs whose end record never went out with spans: no process wrote their trace's
    # assessments yet (they are written only once the end's spans are stored), so creating
    # them needs no read of what the trace holds.
    fresh_ends: set[int]
    # Runs whose sink closed while a create of theirs that had no answer could still be
    # committed as a duplicate (key -> run id, the MLflow run kept): looked for once more.
    late: dict[str, tuple[str, str]]
    events: int
    already_sent: int
    torn: int
    damaged: list[Damage]
    # Segments holding the start of a run that has something left to send or is open: kept
    # while it does (a replay that stops midway leaves the next one what it needs to end the
    # run and link its records), even if every record in them is finished.
    pins: dict[int, list[Segment]] = field(default_factory=dict)

    def unpin(self, no: int) -> None:
        """Run ``no`` has nothing left in the journal: its start holds no segment any more."""
        for segment in self.pins.pop(no, ()):
            segment.starts_ended += 1
            segment.release_if_finished()

    def settled(self, work: RunWork, complete: bool) -> None:
        if complete:
            self.unpin(work.no)


def _never_written(path: Path) -> bool:
    """Zeros where the header and the first record would be, or a file shorter than that and
    all zeros (empty: its process was killed between making the file and allocating it)."""
    try:
        with path.open("rb") as file:
            head = file.read(SEGMENT_HEADER_SIZE + RECORD_HEADER_SIZE)
    except OSError:
        return False
    return never_written(head)


def _load(folder: Path) -> _Loaded:
    stats = ScanStats()
    segments: list[Segment] = []
    works: dict[int, RunWork] = {}
    starts: dict[int, RunStart] = {}
    ended: set[int] = set()
    in_flight: dict[int, set[int]] = {}
    for_runs: dict[int, int] = {}
    fresh_ends: set[int] = set()
    start_at: dict[int, list[Segment]] = {}
    events = already = 0
    for path in journal_segments(folder):
        segment = open_segment(path)
        if segment is None:
            if _never_written(path):
                logger.info("rlm-mlflow replay: %s was made and never written; skipped", path)
                continue
            size = path.stat().st_size if path.exists() else 0
            stats.damaged.append(Damage(path, 0, size))
            logger.warning("rlm-mlflow replay: %s is not a segment file; skipped", path)
            continue
        segments.append(segment)
        damaged = len(stats.damaged)
        for record in scan_segment(path, stats, segment.mm):
            try:
                event = _codec.decode(record.payload)
            except ValueError:
                stats.torn += 1
                continue
            segment.written += 1
            if type(event) is RunStart:
                if event.run_no not in starts or not event.implicit:
                    starts[event.run_no] = event
                start_at.setdefault(event.run_no, []).append(segment)
            elif type(event) is RunEnd:
                ended.add(event.run_no)
            if record.finished:
                segment.done += 1
                already += not event.internal
                continue
            work = works.get(event.run_no)
            if work is None:
                work = works[event.run_no] = RunWork(event.run_no)
            work.add(event, runs=record.needs_runs, traces=record.needs_traces)
            work.locations.append((segment, record.offset))
            if not event.internal:
                work.counted += 1
                events += 1
                if record.needs_runs:
                    for_runs[event.run_no] = for_runs.get(event.run_no, 0) + 1
            if isinstance(event, RunEnd) and not record.state & TRACES_IN_FLIGHT:
                fresh_ends.add(event.run_no)
            if record.state & RUNS_IN_FLIGHT and record.needs_runs:
                work.maybe_sent = True
                # Only the points of records that went out in a request may be stored.
                in_flight.setdefault(event.run_no, set()).add(event.timestamp_ns // 1_000_000)
        segment.damaged = len(stats.damaged) > damaged
    open_runs = {no: s.run_id for no, s in starts.items() if no not in ended}
    pins = {no: at for no, at in start_at.items() if no in works or no in open_runs}
    for at in pins.values():
        for segment in at:
            segment.starts += 1
    return _Loaded(
        folder,
        segments,
        works,
        starts,
        open_runs,
        in_flight,
        for_runs,
        fresh_ends,
        read_late_runs(folder),
        events,
        already,
        stats.torn,
        stats.damaged,
        pins,
    )


def _count_waiting(folder: Path, report: ReplayReport) -> None:
    """A journal the replay does not try (the store is gone): what it holds is not sent."""
    loaded = _load(folder)
    _close_segments(loaded.segments)
    report.events += loaded.events
    report.failed += loaded.events
    report.already_sent += loaded.already_sent
    report.torn += loaded.torn
    report.damaged.extend(str(damage) for damage in loaded.damaged)
    report.kept.append(str(folder))


def _close_segments(segments: list[Segment]) -> None:
    for segment in segments:
        with contextlib.suppress(ValueError, OSError, BufferError):
            segment.mm.flush()
            segment.mm.close()


def _shared_prefixes(folders: list[Path]) -> set[str]:
    """Key prefixes that more than one of these journals claims (a version that did not draw a
    new prefix in a forked child wrote them): such journals' runs cannot be told apart by key."""
    seen: dict[str, int] = {}
    for folder in folders:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            prefix = str(read_meta(folder).get("prefix") or "")
            seen[prefix] = seen.get(prefix, 0) + 1
    return {prefix for prefix, count in seen.items() if count > 1}


def _prefix_problem(meta: dict[str, Any], shared: set[str]) -> str | None:
    """Why the journal's runs could be mistaken for another process's runs, if they could: the
    runs are found again on the server by ``<prefix>-<run_no>``, so the prefix must be one this
    journal alone holds."""
    prefix = meta.get("prefix")
    if not isinstance(prefix, str) or not KEY_PREFIX.fullmatch(prefix):
        return "its meta.json holds no valid key prefix, so its runs cannot be found by key"
    if prefix in shared:
        return (
            f"another journal claims the same key prefix {prefix}, so their runs cannot be "
            "told apart (replay each folder on its own after checking which runs are its)"
        )
    return None


def _replay_folder(
    folder: Path,
    report: ReplayReport,
    *,
    shared: set[str],
    tracking_uri: str | None,
    experiment: str | None,
    transport: Transport | None,
    retry_deadline: float,
    progress: Progress | None,
) -> None:
    try:
        meta = read_meta(folder)
    except (OSError, ValueError) as exc:
        report.problems.append(f"{folder}: no readable meta.json ({exc})")
        logger.error("rlm-mlflow replay: %s has no readable meta.json (%s); skipped", folder, exc)
        report.kept.append(str(folder))
        return
    problem = _prefix_problem(meta, shared)
    if problem is not None:  # sent under a wrong key, its steps would land in someone's run
        report.problems.append(f"{folder}: {problem}; kept, not sent")
        logger.error("rlm-mlflow replay: %s: %s; kept, not sent", folder, problem)
        _count_waiting(folder, report)
        return
    loaded = _load(folder)
    report.torn += loaded.torn
    report.damaged.extend(str(damage) for damage in loaded.damaged)
    report.events += loaded.events
    report.already_sent += loaded.already_sent
    try:
        if loaded.works or loaded.open_runs or loaded.late:
            counts, sent, problem, gave_up = _send(
                loaded,
                meta,
                tracking_uri=tracking_uri,
                experiment=experiment,
                transport=transport,
                retry_deadline=retry_deadline,
                progress=progress,
            )
        else:
            counts, sent, problem, gave_up = WorkerCounts(), _Sent(), None, None
    finally:
        _close_segments(loaded.segments)
    refused = sum(v for k, v in counts.dropped.items() if k != "send_failed")
    report.sent += counts.sent
    report.refused += refused
    # A replay that stops on a problem (the store gone) leaves events it never tried: every
    # event that was waiting and is neither sent nor refused is not sent.
    failed = max(
        counts.deferred + counts.dropped.get("send_failed", 0),
        loaded.events - counts.sent - refused,
    )
    report.failed += failed
    report.runs_killed += sent.killed
    report.runs_sent += sent.runs
    report.spans_sent += sent.spans
    if problem is not None:
        report.problems.append(problem)
    if gave_up is not None:
        report.unreachable = gave_up
    left = sum(segment.written - segment.done for segment in loaded.segments)
    # Damaged bytes may have held events no one can read back: the journal stays, for a look.
    if left == 0 and problem is None and failed == 0 and not loaded.damaged:
        remove_journal(folder)
        report.replayed += 1
    else:
        report.kept.append(str(folder))


@dataclass
class _Sent:
    runs: int = 0  # events whose runs part landed
    spans: int = 0
    killed: int = 0


@dataclass
class _Lane:
    """Exporters of their own for some of a journal's run trees (see :data:`LANES`)."""

    runs: RunsExporter
    traces: TracesExporter
    dispatcher: Dispatcher
    works: list[RunWork] = field(default_factory=list)
    trees: list[int] = field(default_factory=list)  # the runs of each tree in works, in order
    handed: int = 0  # works handed to the dispatcher so far (in order)


def _trees(
    works: dict[int, RunWork], starts: dict[int, RunStart], lanes: int
) -> list[list[list[int]]]:
    """The runs to send, as up to ``lanes`` groups of whole run trees (a run, its parent, and
    a benchmark with its cases go together: their requests depend on each other), each tree's
    runs in their order, the groups about even in events."""
    root_of: dict[int, int] = {}

    def root(no: int) -> int:
        seen: list[int] = []
        while no not in root_of:
            start = starts.get(no)
            up = None if start is None else start.parent_no
            if up is None and start is not None:
                up = start.bench_no
            if up is None or up in seen or up == no:
                break
            seen.append(no)
            no = up
        top = root_of.get(no, no)
        for each in [*seen, no]:
            root_of[each] = top
        return top

    trees: dict[int, list[int]] = {}
    for no in sorted(works):
        trees.setdefault(root(no), []).append(no)
    if any(start.benchmark for start in starts.values()):
        lanes = 1  # a benchmark's aggregates gather its cases' figures in one traces exporter
    groups: list[list[list[int]]] = [[] for _ in range(max(1, min(lanes, len(trees))))]
    weight = [0] * len(groups)
    for top in sorted(trees):
        lightest = weight.index(min(weight))
        groups[lightest].append(sorted(trees[top]))
        weight[lightest] += sum(1 + len(works[no].steps) for no in trees[top])
    return [group for group in groups if group]


def _batches(works: list[RunWork], trees: list[int]) -> list[list[RunWork]]:
    """``works`` (whole trees of ``trees`` runs each, one after another) in batches of about
    :data:`BATCH` runs that never split a tree: a trace's spans are built from its whole tree
    at once (a root ending in one batch would leave its children of the next one out of its
    summary, and of its span budget)."""
    batches: list[list[RunWork]] = []
    at = 0
    for size in trees:
        if not batches or len(batches[-1]) >= BATCH:
            batches.append([])
        batches[-1].extend(works[at : at + size])
        at += size
    return batches


def _send(
    loaded: _Loaded,
    meta: dict[str, Any],
    *,
    tracking_uri: str | None,
    experiment: str | None,
    transport: Transport | None,
    retry_deadline: float,
    progress: Progress | None,
) -> tuple[WorkerCounts, _Sent, str | None, str | None]:
    uri = _uri_for(meta, tracking_uri)
    counts = WorkerCounts()
    warnings = RateLimitedWarnings()
    caller = Caller(
        RetryPolicy(deadline=retry_deadline, initial=0.2, max_wait=min(5.0, retry_deadline or 5.0)),
        counts,
        warnings,
        tracking_uri=uri,
        give_up=True,  # no outage is waited out: what fails stays for the next replay
    )
    holder: list[Transport] = []

    def get_transport() -> Transport:
        return holder[0]

    prefix = str(meta.get("prefix") or "")

    keeper = ShapeKeeper()
    keeper.load(loaded.folder)

    def lane() -> _Lane:
        runs = RunsExporter(
            caller=caller,
            counts=counts,
            rejected=lambda reason: None,
            warnings=warnings,
            prefix=prefix,
            experiment=experiment or str(meta.get("experiment") or DEFAULT_EXPERIMENT),
            transport=get_transport,
            replaying=True,
        )
        runs.in_flight = loaded.in_flight
        # The mode the records were written with is in their flags: "full" sends what they hold.
        traces = TracesExporter(
            caller=caller,
            warnings=warnings,
            prefix=prefix,
            runs=runs,
            transport=get_transport,
            mode="full",
            span_budget=_span_budget(meta),
        )
        traces.assessments.fresh = {traces.ids.trace_hex(no) for no in loaded.fresh_ends}
        traces.figures_dir = lambda: loaded.folder
        traces.load_figures(loaded.folder)  # cases whose records were done before a kill
        traces.keeper = keeper  # the spans of running traces the process sent
        traces.learn(
            [RunWork(no, starts=[start]) for no, start in loaded.starts.items()], seeded=True
        )
        return _Lane(runs, traces, Dispatcher(runs, traces, counts, on_settled=loaded.settled))

    lanes = [lane()]
    runs = lanes[0].runs
    works = loaded.works

    async def end_open_runs() -> None:
        """End KILLED the runs the process left open, unless MLflow holds the run as ended
        already: its end was sent, from a segment removed since. A replay never changes an
        ended run, nor its trace (the root span would be sent again, as an error)."""
        now = time.time_ns()
        for no, run_id in loaded.open_runs.items():
            work = works.get(no)
            if work is not None and (work.end is not None or work.span_end is not None):
                continue
            if await _ended_in_store(runs, caller, holder[0], no):
                logger.info("rlm-mlflow replay: run %s had ended already; left as it is", run_id)
                if work is None:
                    loaded.unpin(no)
                continue
            if work is None:
                work = works[no] = RunWork(no, run_id=run_id)
            work.add(RunEnd(no, now, run_id, "KILLED", internal=True))
        for work in works.values():
            work.steps.sort(key=lambda s: s.timestamp_ns)
            work.span_steps.sort(key=lambda s: s.timestamp_ns)
            if not (work.steps or work.end or any(not s.implicit for s in work.starts)):
                work.runs_outcome = SENT  # nothing the runs exporter has not had already
            if not (work.span_steps or work.span_end):
                work.needs_traces = False

    from ._sink import default_transport_factory

    total = loaded.events
    problem: str | None = None

    async def send_lane(each: _Lane, scope: anyio.CancelScope) -> None:
        """Every run's metrics and end first, then the spans: traces never hold them up."""
        nonlocal problem
        batches = _batches(each.works, each.trees)
        each.runs.ended_memory = max(each.runs.ended_memory, len(each.works) + 1)
        try:
            for batch in batches:
                await each.dispatcher.runs_first(batch)
            for batch in batches:
                each.handed += len(batch)
                await each.dispatcher.export(batch)
                if progress is not None:
                    progress(min(total, counts.sent + counts.deferred), total)
        except (TransientError, StoreRefused, PermanentError) as exc:
            if problem is None:  # the first lane to stop says why; the others stop with it
                problem = caller.clean(str(exc))
                logger.error("rlm-mlflow replay stopped: %s", problem)
            scope.cancel()

    async def send() -> None:
        nonlocal problem
        try:
            holder.append(
                transport
                if transport is not None
                else await anyio.to_thread.run_sync(default_transport_factory, uri, 30.0)
            )
        except Exception as exc:  # a URI MLflow cannot use: this journal waits, the rest go
            reason = caller.clean(str(exc).strip().splitlines()[0] if str(exc).strip() else "")
            problem = (
                f"the journal's tracking URI {redact_uri(uri) or '(MLflow default)'} cannot be "
                f"used ({type(exc).__name__}: {reason[:300]}); replay it with --tracking-uri"
            )
            logger.error("rlm-mlflow replay: %s", problem)
            counts.deferred += loaded.events - counts.sent
            return
        try:
            await runs.load_known()
            await end_open_runs()
            groups = _trees(works, loaded.starts, LANES)
            while len(lanes) < len(groups):
                more = lane()
                more.runs.known, more.runs.searched = runs.known, runs.searched
                more.runs.experiment_id = runs.experiment_id
                lanes.append(more)
            for each, group in zip(lanes, groups, strict=False):
                each.works = [works[no] for tree in group for no in tree]
                each.trees = [len(tree) for tree in group]
            async with anyio.create_task_group() as tg:
                for each in lanes:
                    tg.start_soon(send_lane, each, tg.cancel_scope)
            created = {k: v for each in lanes for k, v in each.runs.created_uncertain.items()}
            created.update(loaded.late)
            try:
                await runs.recheck_all(created)
            except (TransientError, PermanentError) as exc:  # the runs are sent: say it only
                logger.warning(
                    "rlm-mlflow replay: could not look for duplicates of %d runs a dead process "
                    "may have created too: %s",
                    len(created),
                    caller.clean(str(exc)),
                )
                if loaded.late:  # what this journal was kept for is not done: kept still
                    problem = caller.clean(str(exc))
        except (TransientError, StoreRefused, PermanentError) as exc:
            problem = caller.clean(str(exc))
            logger.error("rlm-mlflow replay stopped: %s", problem)
        finally:
            for each in lanes:
                # Never handed to the dispatcher (stopped before): what the runs part did counts.
                for work in [*each.dispatcher.take_unsettled(), *each.works[each.handed :]]:
                    each.dispatcher.settle_left(work)
            holder[0].close()

    try:
        anyio.run(send)
    except ImportError as exc:
        problem = str(exc)
        logger.error("rlm-mlflow replay: %s", exc)
        counts.deferred += loaded.events - counts.sent
    sent = _Sent(
        runs=sum(loaded.for_runs.get(no, 0) for no, w in works.items() if w.runs_outcome == SENT),
        spans=sum(each.traces.spans_sent for each in lanes),
        killed=sum(each.runs.killed for each in lanes),
    )
    return counts, sent, problem, caller.gave_up


async def _ended_in_store(
    runs: RunsExporter, caller: Caller, transport: Transport, no: int
) -> bool:
    """Whether the MLflow run of run ``no`` exists and has ended (any status but RUNNING)."""
    for ref in runs.known.get(runs.key_of(no), ()):
        status: str | None = ref.status
        if not status:
            status = await caller.call("read run status", transport.run_status, ref.run_uuid)
        if status and status != "RUNNING":
            return True
    return False


def _span_budget(meta: dict[str, Any]) -> int:
    """The span budget the journal's sink had (journals from before it was recorded: the
    default)."""
    budget = meta.get("span_budget")
    return budget if type(budget) is int and budget > 0 else DEFAULT_SPAN_BUDGET


def _uri_for(meta: dict[str, Any], override: str | None) -> str | None:
    if override:
        return override
    if meta.get("tracking_uri"):
        return str(meta["tracking_uri"])
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    cwd = meta.get("cwd")  # MLflow's default store is relative to where the program ran
    if cwd and Path(cwd, "mlflow.db").exists():
        return f"sqlite:///{Path(cwd, 'mlflow.db')}"
    return None

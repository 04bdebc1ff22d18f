"""Replay: send what journals hold that never reached MLflow, exactly once.

After a crash, a kill, a shutdown deadline or an outage, a journal keeps the events that were not
confirmed sent. ``replay()`` sends them through the same exporter the live sink uses, ends the
runs their process left open (KILLED: it died without ending them; a run that is not RUNNING
anymore is left as it is), marks every record DONE as it lands, and removes the journal once
nothing is left in it.

Exactly once, whatever the store: records already DONE are skipped; records IN_FLIGHT (a request
carrying them was sent, its answer never came) are checked against the store first, and only the
metric points it does not hold are sent; every other write is idempotent (runs are found by
their key tag, in one search per journal). A replay interrupted half way can be run again.

A journal whose sink is still alive (or that another replay is sending) is locked and left alone.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from . import _codec
from ._calls import Caller
from ._config import DEFAULT_EXPERIMENT
from ._events import RunEnd, RunStart, Step
from ._exceptions import PermanentError, StoreRefused, TransientError
from ._journal import (
    DONE,
    IN_FLIGHT,
    ScannedRecord,
    ScanStats,
    default_journal_dir,
    journal_segments,
    read_meta,
    remove_journal,
    scan_segment,
    set_state,
    try_lock,
)
from ._retry import RetryPolicy
from ._runs import SENT, Outcome, RunsExporter, RunWork
from ._stats import RateLimitedWarnings, WorkerCounts
from ._transport import Transport

logger = logging.getLogger("rlm_mlflow")

Progress = Callable[[int, int], None]  # (events done, events in all)


@dataclass
class ReplayReport:
    """What a replay did."""

    journals: int = 0  # journals found
    replayed: int = 0  # journals sent in full and removed
    kept: list[str] = field(default_factory=list)  # journals with events that still failed
    in_use: list[str] = field(default_factory=list)  # locked by a live sink or another replay
    events: int = 0  # events that were waiting to be sent
    sent: int = 0
    failed: int = 0  # events that could not be sent (they stay for the next replay)
    already_sent: int = 0  # events the journals held that had been sent already
    refused: int = 0  # events the store refused for good (logged; not tried again)
    torn: int = 0  # torn or corrupt records skipped
    runs_killed: int = 0  # runs left open by a dead process, ended KILLED
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.kept and self.failed == 0


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
    root = Path(directory) if directory is not None else default_journal_dir()
    report = ReplayReport()
    folders = journal_folders(root)
    report.journals = len(folders)
    for folder in folders:
        fd = try_lock(folder)
        if fd is None:
            report.in_use.append(str(folder))
            continue
        try:
            _replay_folder(
                folder,
                report,
                tracking_uri=tracking_uri,
                experiment=experiment,
                transport=transport,
                retry_deadline=retry_deadline,
                progress=progress,
            )
        finally:
            os.close(fd)
    return report


@dataclass
class _Loaded:
    meta: dict[str, Any]
    works: dict[int, RunWork]
    records: dict[int, list[ScannedRecord]]  # run -> records to mark DONE when it lands
    open_runs: dict[int, str]  # runs started and never ended: run -> run id
    events: int


def _load(folder: Path, report: ReplayReport) -> _Loaded | None:
    try:
        meta = read_meta(folder)
    except (OSError, ValueError) as exc:
        report.problems.append(f"{folder}: no readable meta.json ({exc})")
        logger.error("rlm-mlflow replay: %s has no readable meta.json (%s); skipped", folder, exc)
        report.kept.append(str(folder))
        return None
    stats = ScanStats()
    works: dict[int, RunWork] = {}
    records: dict[int, list[ScannedRecord]] = {}
    started: dict[int, str] = {}
    ended: set[int] = set()
    events = 0
    for path in journal_segments(folder):
        for record in scan_segment(path, stats):
            try:
                event = _codec.decode(record.payload)
            except ValueError:
                stats.torn += 1
                continue
            if type(event) is RunStart:
                started.setdefault(event.run_no, event.run_id)
            elif type(event) is RunEnd:
                ended.add(event.run_no)
            if record.state == DONE:
                if not event.internal:
                    report.already_sent += 1
                continue
            work = works.get(event.run_no)
            if work is None:
                work = works[event.run_no] = RunWork(event.run_no)
            records.setdefault(event.run_no, []).append(record)
            if not event.internal:
                work.counted += 1
                events += 1
            if record.state == IN_FLIGHT:
                work.maybe_sent = True
            if type(event) is Step:
                work.steps.append(event)
            elif type(event) is RunStart:
                work.starts.append(event)
                work.run_id = event.run_id
            else:
                assert isinstance(event, RunEnd)
                work.end = event
                work.run_id = event.run_id
    report.torn += stats.torn
    open_runs = {no: run_id for no, run_id in started.items() if no not in ended}
    for work in works.values():
        work.steps.sort(key=lambda s: s.timestamp_ns)
    return _Loaded(meta, works, records, open_runs, events)


def _replay_folder(
    folder: Path,
    report: ReplayReport,
    *,
    tracking_uri: str | None,
    experiment: str | None,
    transport: Transport | None,
    retry_deadline: float,
    progress: Progress | None,
) -> None:
    loaded = _load(folder, report)
    if loaded is None:
        return
    report.events += loaded.events
    if not loaded.works and not loaded.open_runs:
        remove_journal(folder)
        report.replayed += 1
        return
    meta = loaded.meta
    uri = _uri_for(meta, tracking_uri)
    counts = WorkerCounts()
    warnings = RateLimitedWarnings()
    caller = Caller(
        RetryPolicy(deadline=retry_deadline, initial=0.2, max_wait=min(5.0, retry_deadline or 5.0)),
        counts,
        warnings,
        tracking_uri=uri,
        probe=None,  # no outage is waited out: what fails stays for the next replay
    )
    holder: list[Transport] = []

    def get_transport() -> Transport:
        return holder[0]

    exporter = RunsExporter(
        caller=caller,
        counts=counts,
        rejected=lambda reason: None,
        warnings=warnings,
        prefix=str(meta.get("prefix") or ""),
        experiment=experiment or str(meta.get("experiment") or DEFAULT_EXPERIMENT),
        transport=get_transport,
        replaying=True,
    )
    from ._sink import default_transport_factory

    total = loaded.events + len(loaded.open_runs)

    async def send() -> tuple[int, int, int, int]:
        holder.append(
            transport
            if transport is not None
            else await anyio.to_thread.run_sync(default_transport_factory, uri, 30.0)
        )
        sent = failed = refused = 0
        try:
            await exporter.load_known()
            now = _now_ns()
            for no, run_id in loaded.open_runs.items():
                work = loaded.works.get(no)
                if work is None:
                    work = loaded.works[no] = RunWork(no, run_id=run_id)
                if work.end is None:
                    work.end = RunEnd(no, now, run_id, "KILLED", internal=True)
            works = sorted(loaded.works.values(), key=lambda w: w.no)
            finished: set[int] = set()

            def done(work: RunWork, outcome: Outcome) -> None:
                nonlocal sent, failed, refused
                finished.add(work.no)
                if outcome == SENT or isinstance(outcome, tuple):  # nothing more to do for it
                    for record in loaded.records.get(work.no, ()):
                        set_state(record.path, record.offset, DONE)
                    if outcome == SENT:
                        sent += work.counted
                    else:
                        refused += work.counted
                else:
                    failed += work.counted
                if progress is not None:
                    progress(sent + failed + refused, total)

            for start in range(0, len(works), 200):
                await exporter.export(works[start : start + 200], done)
        except (TransientError, StoreRefused, PermanentError) as exc:
            report.problems.append(caller.clean(str(exc)))
            logger.error("rlm-mlflow replay of %s stopped: %s", folder, caller.clean(str(exc)))
        finally:
            holder[0].close()
        failed += sum(w.counted for w in loaded.works.values() if w.no not in finished)
        return sent, failed, refused, exporter.killed

    try:
        sent, failed, refused, killed = anyio.run(send)
    except ImportError as exc:
        report.problems.append(str(exc))
        logger.error("rlm-mlflow replay of %s: %s", folder, exc)
        sent, failed, refused, killed = 0, loaded.events, 0, 0
    report.sent += sent
    report.failed += failed
    report.refused += refused
    report.runs_killed += killed
    if failed == 0 and not report.problems:
        remove_journal(folder)
        report.replayed += 1
    else:
        report.kept.append(str(folder))


def _now_ns() -> int:
    import time

    return time.time_ns()


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

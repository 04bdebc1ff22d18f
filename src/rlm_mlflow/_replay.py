"""Replay: send what journals hold that never reached MLflow, exactly once.

After a crash, a kill or an outage longer than the retry budget, a journal keeps the events that
were not sent. ``replay()`` sends them through the same worker code the live sink uses, then ends
the runs that were left open (KILLED: their process died without ending them) and removes the
journal. Exactly once holds because every write is idempotent: a run is found by its key tag
before it is created, metric points keep their original timestamps (MLflow stores an identical
point once), params their values. A journal whose sink is still alive (or that another replay is
sending) is locked and left alone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from ._buffer import NO_SEQ, EventBuffer, Item
from ._config import SinkConfig
from ._events import RunEnd, RunStart
from ._journal import (
    ReadStats,
    default_journal_dir,
    read_runs_log,
    read_segment,
    remove_journal,
    segments,
    try_lock,
)
from ._sink import default_transport_factory
from ._stats import Counters, RateLimitedWarnings
from ._transport import Transport
from ._worker import TAKE_LIMIT, Worker

logger = logging.getLogger("rlm_mlflow")

Progress = Callable[[int, int], None]  # (events done, events in all)


@dataclass
class ReplayReport:
    """What a replay did."""

    journals: int = 0  # journals found
    replayed: int = 0  # journals sent and removed
    kept: list[str] = field(default_factory=list)  # journals with events that still failed
    in_use: list[str] = field(default_factory=list)  # locked by a live sink or another replay
    events: int = 0  # events read
    sent: int = 0
    failed: int = 0
    torn: int = 0  # torn or corrupt records skipped
    runs_killed: int = 0  # runs left open by a dead process, ended KILLED

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
    journal directory), end the runs their process left open, and remove what was sent."""
    root = Path(directory) if directory is not None else default_journal_dir()
    report = ReplayReport()
    folders = journal_folders(root)
    report.journals = len(folders)
    loaded: list[tuple[Path, int, dict[str, Any], list[Item], dict[str, str]]] = []
    for folder in folders:
        fd = try_lock(folder)
        if fd is None:
            report.in_use.append(str(folder))
            continue
        try:
            meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            logger.error(
                "rlm-mlflow replay: %s has no readable meta.json (%s); skipped", folder, exc
            )
            os.close(fd)
            report.kept.append(str(folder))
            continue
        stats = ReadStats()
        items: list[Item] = []
        for _, path in segments(folder):
            items.extend((NO_SEQ, event) for event in read_segment(path, stats))
        report.torn += stats.torn
        report.events += len(items)
        created, ended = read_runs_log(folder)
        open_runs = _left_open(items, created, ended)
        loaded.append((folder, fd, meta, items, open_runs))
    total = sum(len(items) + len(open_runs) for _, _, _, items, open_runs in loaded)
    done = 0
    for folder, fd, meta, items, open_runs in loaded:
        try:
            counters = _replay_one(
                meta,
                items,
                open_runs,
                tracking_uri=tracking_uri,
                experiment=experiment,
                transport=transport,
                retry_deadline=retry_deadline,
                progress=_offset(progress, done, total),
            )
        finally:
            done += len(items) + len(open_runs)
        failed = counters.processed - counters.sent
        report.sent += counters.sent
        report.failed += failed
        if failed == 0:
            report.runs_killed += len(open_runs)
            remove_journal(folder)
            report.replayed += 1
        else:
            report.kept.append(str(folder))
        os.close(fd)
    return report


def _offset(progress: Progress | None, base: int, total: int) -> Progress | None:
    """One journal's progress as part of all journals'."""
    if progress is None:
        return None

    def report(done: int, _: int) -> None:
        progress(base + done, total)

    return report


def _left_open(items: list[Item], created: dict[str, str], ended: set[str]) -> dict[str, str]:
    """Runs started (or created) and never ended: key -> run_id."""
    open_runs = dict(created)
    for _, event in items:
        if type(event) is RunStart:
            open_runs.setdefault(event.key, event.run_id)
        elif type(event) is RunEnd:
            ended = ended | {event.key}
    return {key: run_id for key, run_id in open_runs.items() if key not in ended}


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


def _replay_one(
    meta: dict[str, Any],
    items: list[Item],
    open_runs: dict[str, str],
    *,
    tracking_uri: str | None,
    experiment: str | None,
    transport: Transport | None,
    retry_deadline: float,
    progress: Progress | None,
) -> Counters:
    config = SinkConfig(
        enabled=True,
        experiment=experiment or str(meta.get("experiment") or "rlm-code-rlm"),
        tracking_uri=_uri_for(meta, tracking_uri),
        retry_deadline=retry_deadline,
        journal=False,
    )
    counters = Counters()
    warnings = RateLimitedWarnings()
    buffer = EventBuffer(1, config.overflow, counters, warnings, trigger=1)

    def make() -> Transport:
        if transport is not None:
            return transport
        return default_transport_factory(config.tracking_uri, config.request_timeout)

    worker = Worker(
        config,
        buffer=buffer,
        counters=counters,
        warnings=warnings,
        transport_factory=make,
        replaying=True,
    )

    async def send() -> None:
        for start in range(0, len(items), TAKE_LIMIT):
            await worker._process(items[start : start + TAKE_LIMIT])
            if progress:
                progress(min(start + TAKE_LIMIT, len(items)), len(items) + len(open_runs))
        now = time.time_ns() // 1_000_000
        ends: list[Item] = [
            (NO_SEQ, RunEnd(key, run_id, now, "KILLED"))
            for key, run_id in open_runs.items()
            if not (key in worker.runs and worker.runs[key].ended)
        ]
        if ends:
            await worker._process(ends)
        if progress:
            progress(len(items) + len(open_runs), len(items) + len(open_runs))
        if worker.transport is not None:
            with contextlib.suppress(Exception):
                worker.transport.close()

    anyio.run(send)
    return counters

"""The worker: drains one sink's queue to the exporters, settles every event, owns its shutdown.

It is one anyio task: on the process's background thread (:mod:`._runtime`) in a sync program,
or in the caller's event loop under ``async with``. A drain cycle takes what waits (run starts and
ends first, then steps, then records spilled to the journal), decodes it, groups it by run and
hands it to the exporters; each run's outcome then settles its events exactly once: sent (journal
records marked DONE), kept for replay (deferred), or dropped with a reason.

When the store refuses everything (credentials, a deleted experiment) the worker holds what it
has, stops taking more (the journal takes the agent's events meanwhile), probes now and then,
and goes on where it stopped once the store takes writes again.

Closing is the worker's own job, whoever asks (``close()``, the exit hook, a signal, a dropped
sink): it waits for hooks in flight, ends every open run with the status the process ends with,
drains within the deadline, then counts what is left (kept in the journal for replay, or dropped
without one) and removes the journal if nothing is left in it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import anyio

from . import _codec
from ._calls import Caller
from ._config import SinkConfig
from ._dispatch import Dispatcher
from ._events import RunStart, Step
from ._exceptions import PermanentError, StoreRefused
from ._exporters.runs import DEFERRED, RunsExporter, RunWork
from ._exporters.traces import TracesExporter
from ._journal import Segment
from ._pipeline import Item, Pipeline, State
from ._retry import RetryPolicy
from ._stats import RateLimitedWarnings, SinkStatistics, WorkerCounts
from ._transports.base import Transport

logger = logging.getLogger("rlm_mlflow")

#: Records taken from the queue and the journal in one drain cycle.
TAKE_LIMIT = 20_000
CLOSE_SPLIT_STEPS = 500  # a run's steps that fit one log_batch (two metrics each)
#: How long closing waits for hooks that were already running when it began.
QUIESCE_TIMEOUT = 1.0
#: How often a blocked store (credentials, deleted experiment) is asked again.
BLOCKED_PROBE = 30.0
#: A journal with nothing left to send and no record for this long is swapped for a fresh,
#: empty one the worker makes: the files an idle sink holds shrink to those of a new journal,
#: and the next event finds a journal ready.
JOURNAL_IDLE = 30.0
#: How long a failing span request is retried before its spans are kept for replay.
TRACES_RETRY = 15.0
#: How often the worker makes sure spare journal lanes and next segments are ready.
MAINTENANCE_EVERY = 0.25


class Worker:
    """See the module docstring."""

    def __init__(
        self,
        config: SinkConfig,
        pipeline: Pipeline,
        *,
        transport_factory: Callable[[], Transport],
        warnings: RateLimitedWarnings,
    ) -> None:
        self.config = config
        self.pipeline = pipeline
        self.warnings = warnings
        self._transport_factory = transport_factory
        self.reset()

    def reset(self) -> None:
        config = self.config
        self.counts = WorkerCounts()
        self.rejected: Counter[str] = Counter()
        self.transport: Transport | None = None
        self.caller = Caller(
            RetryPolicy(
                deadline=config.retry_deadline,
                initial=config.retry_initial,
                max_wait=config.retry_max_wait,
            ),
            self.counts,
            self.warnings,
            tracking_uri=config.tracking_uri,
            probe=self._probe,
        )
        self.runs = RunsExporter(
            caller=self.caller,
            counts=self.counts,
            rejected=self._count_rejected,
            warnings=self.warnings,
            prefix=self.pipeline.prefix,
            experiment=config.experiment,
            transport=self._get_transport,
            # A create given up on may still be waiting in the server (its own database
            # timeouts, its queue): two request timeouts cover what servers keep waiting.
            late_window=2 * config.request_timeout + 1.0,
        )
        # Traces never hold runs up: their requests are retried briefly, then kept for replay.
        traces_caller = Caller(
            RetryPolicy(
                deadline=min(config.retry_deadline, TRACES_RETRY),
                initial=config.retry_initial,
                max_wait=config.retry_max_wait,
            ),
            self.counts,
            self.warnings,
            tracking_uri=config.tracking_uri,
        )
        self.traces = TracesExporter(
            caller=traces_caller,
            warnings=self.warnings,
            prefix=self.pipeline.prefix,
            runs=self.runs,
            transport=self._get_transport,
            mode=config.traces,
        )
        self.dispatcher = Dispatcher(self.runs, self.traces, self.counts, on_settled=self._settled)
        self.carry: dict[int, RunWork] = {}  # runs whose start has not been taken yet
        self.later: list[RunWork] = []  # closing: steps waiting while their runs' ends go
        self.pins: dict[int, list[Segment]] = {}  # segments holding an open run's start
        self._journal_seen = (-1, 0.0)  # (records written, when that figure last changed)
        self._maintaining = False
        self.unavailable: str | None = None  # the store cannot be used at all (setup failed)
        self.describe: str | None = None
        # Signalled across threads: close and flush requests, progress for flush() waiters.
        self.close_requested = False
        self._open_runs_ended = False
        self.close_deadline: float | None = None  # time.monotonic(); None: no hurry
        self._deadline_set: float | None = None
        self.flush_requested = False
        self.wake_flag = False
        self.started = False
        self.loop: Any = None  # the _runtime.Loop whose dispatcher wakes this worker
        self.transition = threading.Lock()  # the rare state changes of the sink, never a hook's
        self.stopped = threading.Event()
        self.progress = threading.Condition()
        self._wake: anyio.Event | None = None
        self._close_seen: anyio.Event | None = None
        self._cycle_done: anyio.Event | None = None

    # -- transport ---------------------------------------------------------------------------

    def _get_transport(self) -> Transport:
        transport = self.transport
        if transport is None:
            raise RuntimeError("the transport is not ready")
        return transport

    async def _probe(self) -> None:
        await self.runs.probe()

    async def _setup(self) -> bool:
        if self.transport is not None:
            return True
        if self.unavailable is not None:
            return False
        try:
            self.transport = await anyio.to_thread.run_sync(self._transport_factory)
            self.describe = self.transport.describe()
            from . import _runtime

            _runtime.after_mlflow_import()
            return True
        except ImportError as exc:
            self.unavailable = f"mlflow cannot be used: {exc}"
        except Exception as exc:
            self.unavailable = f"{type(exc).__name__}: {exc}"
        self.caller.note_error(self.unavailable)
        logger.error("rlm-mlflow: %s; events are kept in the journal, if any", self.unavailable)
        return False

    # -- waking --------------------------------------------------------------------------------

    def notify(self) -> None:
        """Called in the worker's loop by the loop's dispatcher after ``wake_flag`` was set."""
        seen = self._close_seen
        if self.close_requested and seen is not None and self.close_deadline != self._deadline_set:
            seen.set()
        if self._wake is not None:
            self._wake.set()

    # -- the loop ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Drain until closed; returns within the close deadline, whatever the store does."""
        self.started = True
        self._wake = anyio.Event()
        self._close_seen = anyio.Event()
        try:
            async with anyio.create_task_group() as tg:
                with anyio.CancelScope() as scope:
                    tg.start_soon(self._watch_close, scope)
                    tg.start_soon(self._keep_journal_ready)
                    await self._loop()
                tg.cancel_scope.cancel()
        except Exception:  # never let the worker die silently
            logger.exception("rlm-mlflow worker failed; what it had not sent is counted below")
        finally:
            with anyio.CancelScope(shield=True):
                if self.close_requested and not self._open_runs_ended:
                    # The deadline came while a request was out, before the close began: the
                    # runs still open are ended in the journal all the same (kept for replay).
                    await self._end_open_runs()
                self._finish()

    async def _watch_close(self, scope: anyio.CancelScope) -> None:
        """Bound the whole drain by the close deadline, wherever it waits, as soon as there is
        one (a dropped sink closes without one; the process's exit then sets one)."""
        while True:
            assert self._close_seen is not None
            if self.close_deadline == self._deadline_set:
                await self._close_seen.wait()
            self._close_seen = anyio.Event()
            deadline = self._deadline_set = self.close_deadline
            if deadline is not None:
                scope.deadline = anyio.current_time() + max(0.0, deadline - time.monotonic())

    async def _loop(self) -> None:
        pipeline = self.pipeline
        closing = False
        while True:
            if self.close_requested and not closing:
                closing = True
                await self._begin_close()
            if not await self._setup():
                if closing:
                    return
                await self._sleep(self.config.flush_interval)
                continue
            if self.dispatcher.held:
                if not await self._store_back():
                    if closing:
                        return
                    await self._sleep(min(BLOCKED_PROBE, max(self.config.retry_max_wait, 1.0)))
                    continue
                works, self.dispatcher.held = self.dispatcher.held, []
                await self._export(works)
                continue
            items = pipeline.take(TAKE_LIMIT)
            if items:
                works = self._group(items, final=False)
                if closing and any(len(work.steps) > CLOSE_SPLIT_STEPS for work in works):
                    # Ends first: with more steps than one request carries and little time
                    # left, statuses matter most. (With fewer, a run's steps and its end go
                    # together, in fewer rounds of requests.)
                    parts = [work.split() for work in works]
                    # Counted at the end if the deadline comes while the ends are out.
                    self.later = [rest for _, rest in parts if rest.steps or rest.span_steps]
                    await self._export([c for c, _ in parts if c.starts or c.end or c.span_end])
                    works, self.later = self.later, []
                await self._export(works)
                await self._maintain_journal()
                if closing or self.flush_requested or pipeline.waiting() >= pipeline.trigger:
                    continue  # a backlog, a flush or a close: go on at once
                # Otherwise what came in meanwhile waits for the next cycle (flush_interval,
                # or batch_trigger events): one request per run and interval, not one per
                # request's round trip.
                self._cycle_finished()
                await self._release_idle_journal()
                await self.runs.recheck()
                await self._idle()
                continue
            if closing:
                if self.carry:  # events of runs whose start never came: send them as they are
                    works = list(self.carry.values())
                    self.carry.clear()
                    await self._export(works)
                    continue
                await self.runs.recheck(closing=True)
                return
            self._cycle_finished()
            await self._release_idle_journal()
            await self._maintain_journal()
            await self.runs.recheck()
            await self._idle()

    async def _keep_journal_ready(self) -> None:
        """Now and then, even while a long export runs: new threads find a lane ready."""
        written = -1
        while True:
            await self._maintain_journal()
            # While records come in, look after the lanes often (a busy lane fills a segment in
            # milliseconds with large records); when nothing comes, now and then.
            journal = self.pipeline.journal
            now = journal.written() if journal is not None else 0
            await anyio.sleep(0.01 if now != written else MAINTENANCE_EVERY)
            written = now

    async def _maintain_journal(self) -> bool:
        """Lanes and segments made ahead (so hooks do not make files), finished segments
        removed, and the fsync setting."""
        journal = self.pipeline.journal
        if journal is None:
            return False
        journal.release_sealed()
        busy = False
        if journal.needs_maintenance() and not self._maintaining:
            self._maintaining = True
            try:
                busy = await anyio.to_thread.run_sync(journal.maintain, abandon_on_cancel=True)
            finally:
                self._maintaining = False
        if self.config.journal_fsync:
            await anyio.to_thread.run_sync(journal.sync)
        return busy

    async def _release_idle_journal(self) -> None:
        """Swap a journal that is idle, and was written to, for a fresh one made here (so the
        next hook finds a journal ready and makes no file); close retired ones once no hook
        runs."""
        pipeline = self.pipeline
        journal = pipeline.journal
        now = time.monotonic()
        if journal is not None and not journal.retiring:
            written = journal.written()
            if written != self._journal_seen[0]:
                self._journal_seen = (written, now)
            elif (
                written
                and now - self._journal_seen[1] >= JOURNAL_IDLE
                and not journal.backlog()
                and not pipeline.runs_open()
                and not (self.pins or self.carry or self.dispatcher.held)
            ):
                fresh = await anyio.to_thread.run_sync(pipeline.prepare_journal)
                if fresh is None:
                    journal.retiring = True  # the next hook opens a new journal
                else:
                    pipeline.replace_journal(journal, fresh)
        if pipeline.quiet():
            pipeline.release_idle_journals()

    async def _end_open_runs(self) -> None:
        pipeline = self.pipeline
        with anyio.move_on_after(QUIESCE_TIMEOUT):
            while not pipeline.quiet():
                await anyio.sleep(0.001)
        self._open_runs_ended = True
        pipeline.end_open_runs(pipeline.end_status)

    async def _begin_close(self) -> None:
        pipeline = self.pipeline
        await self._end_open_runs()
        # Ends first: the run starts and ends that wait in the journal, behind steps spilled
        # before them, go now; the steps follow while the deadline allows (then replay).
        control = [
            item
            for journal in pipeline.journals()
            for item in journal.spilled_unsent(control_only=True)
        ]
        if control:
            await self._export(self._group(control, final=True))

    async def _idle(self) -> None:
        """Sleep until a batch is ready, a flush or close asks, or the interval is up."""
        pipeline = self.pipeline
        assert self._wake is not None
        if self.close_requested or self.flush_requested:
            self.flush_requested = False
            return
        pipeline.worker_asleep = True
        pipeline.wake_sent = False
        try:
            if pipeline.waiting() < pipeline.trigger and not self.close_requested:
                with anyio.move_on_after(self.config.flush_interval):
                    await self._wake.wait()
        finally:
            pipeline.worker_asleep = False
            self._wake = anyio.Event()
        self.flush_requested = False

    async def _sleep(self, seconds: float) -> None:
        """A pause that a close or flush request cuts short."""
        assert self._wake is not None
        if self.close_requested:
            return
        with anyio.move_on_after(seconds):
            await self._wake.wait()
        self._wake = anyio.Event()

    async def _store_back(self) -> bool:
        """Blocked: ask the store once whether it takes our writes again."""
        try:
            await self.runs.probe()
        except StoreRefused:
            return False
        except Exception:
            return False
        return True  # the first write that succeeds lifts the block, and says so

    def _cycle_finished(self) -> None:
        self._notify_progress()

    def cycle_event(self) -> anyio.Event:
        """Set at the next progress (for ``aflush`` in the worker's own loop)."""
        if self._cycle_done is None:
            self._cycle_done = anyio.Event()
        return self._cycle_done

    def _notify_progress(self) -> None:
        event = self._cycle_done
        if event is not None:
            self._cycle_done = None
            event.set()
        with self.progress:
            self.progress.notify_all()

    # -- one cycle ------------------------------------------------------------------------------

    def _group(self, items: Sequence[Item], *, final: bool) -> list[RunWork]:
        """Decode records and group them by run, in order; hold runs whose start is not here."""
        works: dict[int, RunWork] = {}
        for segment, offset, queued in items:
            try:
                # A large record is queued by reference: its bytes are in the journal.
                payload = queued if queued is not None else _read_back(segment, offset)
                event = _codec.decode(payload)
            except ValueError:
                self.counts.dropped["unreadable"] += 1
                logger.error("rlm-mlflow: a record could not be read back; dropped")
                continue
            work = works.get(event.run_no)
            if work is None:
                work = works[event.run_no] = RunWork(event.run_no)
            if segment is not None:
                work.locations.append((segment, offset))
            if not event.internal:
                work.counted += 1
                if segment is None:
                    work.in_memory_only += 1
            if type(event) is Step:
                if segment is not None:
                    work.step_locations.append((segment, offset))
                if not event.internal:
                    work.step_counted += 1
                    if segment is None:
                        work.step_in_memory += 1
            work.add(event)
            if type(event) is RunStart and segment is not None:
                self.pins.setdefault(event.run_no, []).append(segment)
        out: list[RunWork] = []
        known = self.runs.runs
        for no, work in works.items():
            whole = self.carry.pop(no, None)
            if whole is None:
                whole = work
            else:
                whole.merge(work)
            if not final and not whole.starts and no not in known and no not in self.runs.ended:
                self.carry[no] = whole  # its start was appended after we took the starts
                continue
            out.append(whole)
        return out

    async def _export(self, works: list[RunWork]) -> None:
        try:
            await self.dispatcher.export(works)
        except PermanentError as exc:  # the experiment cannot be had (a bad name, ...)
            self.unavailable = f"MLflow refuses the experiment: {exc}"
            self.caller.note_error(self.unavailable)
            logger.error("rlm-mlflow: %s", self.unavailable)
            self.dispatcher.give_up(DEFERRED)

    def _settled(self, work: RunWork, complete: bool) -> None:
        """A run's events have their fate: once its end is done, its start pins nothing."""
        if work.end is not None and complete:
            for segment in self.pins.pop(work.no, ()):
                segment.starts_ended += 1
                segment.release_if_finished()
        self._notify_progress()

    # -- the end -------------------------------------------------------------------------------

    def _finish(self) -> None:
        """After the loop, whatever ended it: count what is left, release everything."""
        pipeline = self.pipeline
        left = self.dispatcher.take_unsettled()
        left.extend(self.carry.values())
        left.extend(self.later)
        self.carry.clear()
        self.later = []
        # What waits in memory is counted here; what waits in the journal only (spilled) stays
        # there unread: reading millions of records back just to count them could outlive the
        # deadline, and the journal knows how many there are.
        items = pipeline.take(0)
        left.extend(self._group(items, final=True))
        for work in left:
            self.dispatcher.settle_left(work)
        deferred = sum(w.counted - w.in_memory_only for w in left)
        dropped = sum(w.in_memory_only for w in left)
        for journal in pipeline.journals():
            spilled = journal.count_spilled_unsent()  # still in the journal: kept for replay
            self.counts.deferred += spilled
            deferred += spilled
        kept: list[str] = []
        for journal in pipeline.journals():
            keep = journal.backlog() > 0
            journal.close(keep=keep)
            if keep:
                kept.append(str(journal.folder))
        if deferred or dropped:
            logger.warning(
                "rlm-mlflow stopped with %d events not sent%s%s",
                deferred + dropped,
                f"; {deferred} kept in {', '.join(kept)}: send them with 'rlm-mlflow replay'"
                if kept and deferred
                else "",
                f"; {dropped} lost (no journal)" if dropped else "",
            )
        elif kept:
            logger.warning(
                "rlm-mlflow: events of this process not confirmed sent are kept in %s; "
                "send them with 'rlm-mlflow replay'",
                ", ".join(kept),
            )
        transport, self.transport = self.transport, None
        if transport is not None:
            try:
                transport.close()
            except Exception:
                logger.debug("closing the transport failed", exc_info=True)
        pipeline.state = State.CLOSED
        self.stopped.set()
        self._notify_progress()

    # -- figures -------------------------------------------------------------------------------

    def _count_rejected(self, reason: str) -> None:
        self.rejected[reason] += 1

    def settled(self) -> int:
        counts = self.counts
        return (
            counts.sent
            + counts.deferred
            + sum(counts.dropped.values())
            + self.pipeline.door.total()
            + self.pipeline.deferred_door.value
        )

    def lost(self) -> int:
        return self.settled() - self.counts.sent

    def statistics(self) -> SinkStatistics:
        pipeline, counts = self.pipeline, self.counts
        accepted = pipeline.accepted.value
        dropped = Counter(dict(counts.dropped))
        dropped.update(pipeline.door.snapshot())
        deferred = counts.deferred + pipeline.deferred_door.value
        sent = counts.sent
        rejected = Counter(dict(self.rejected))
        rejected.update(pipeline.rejected.snapshot())
        on_disk = [j for j in pipeline.journals() if j.kept or not j.closed]
        spilled = pipeline.spilled_before + sum(
            lane.spill_written for j in pipeline.journals() for lane in list(j.lanes)
        )
        return SinkStatistics(
            accepted=accepted,
            sent=sent,
            pending=max(0, accepted - sent - deferred - sum(dropped.values())),
            deferred=deferred,
            dropped={k: v for k, v in dropped.items() if v},
            rejected={k: v for k, v in rejected.items() if v},
            refused=counts.refused,
            spilled=spilled,
            queue_depth=len(pipeline.ctl) + len(pipeline.steps),
            queue_capacity=pipeline.capacity,
            journal=str(on_disk[-1].folder) if on_disk else None,
            journal_backlog=sum(j.backlog() for j in on_disk),
            retries=counts.retries,
            requests=counts.requests,
            runs_open=pipeline.runs_open(),
            runs_created=counts.runs_created,
            runs_ended=counts.runs_ended,
            last_error=counts.last_error,
        )


def _read_back(segment: Segment | None, offset: int) -> bytes:
    assert segment is not None
    return segment.payload(offset)

"""The worker: drains one sink's queue to the exporters, settles every event, owns its shutdown.

It is one anyio task: on the process's background thread (:mod:`._runtime`) in a sync program,
or in the caller's event loop under ``async with``. A drain cycle takes what waits (run starts and
ends first, then steps, then records spilled to the journal), decodes it, groups it by run and
hands it to the exporters; each run's outcome then settles its events exactly once: sent (journal
records marked DONE), kept for replay (deferred), or dropped with a reason.

When the store refuses everything (credentials, a deleted experiment) the worker holds what it
has, stops taking more (the journal takes the agent's events meanwhile), probes now and then,
and goes on where it stopped once the store takes writes again.

The worker is supervised: an exception it did not expect (a bug, a custom transport raising
something of its own) is logged once with its traceback, counted, shown by ``status()`` (health
"failed", ``last_error``), and the worker starts its loop again. What it had taken and not settled
is exported again (the exporters do again only what was not confirmed done: runs are found by
their key before being created, stored points are read back before metrics are sent), so nothing
is lost and nothing lands twice; hooks never feed a dead worker.

The worker imports nothing above it: its owner passes what it needs (``on_transport_ready``).

Closing is the worker's own job, whoever asks (``close()``, the exit hook, a signal, a dropped
sink): it waits for hooks in flight, ends every open run with the status the process ends with,
drains within the deadline, then counts what is left (kept in the journal for replay, or dropped
without one) and removes the journal if nothing is left in it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskGroup

from . import _codec, _fork
from ._calls import Caller
from ._config import SinkConfig
from ._dispatch import Dispatcher
from ._events import RunStart, Step
from ._exceptions import PermanentError, StoreRefused
from ._exporters.runs import RunsExporter
from ._exporters.traces import TracesExporter
from ._exporters.work import DEFERRED, HOLD, RunWork
from ._journal import Journal, Segment
from ._journal_format import write_late_runs
from ._pipeline import BY_REFERENCE, Item, Pipeline, State
from ._retry import RetryPolicy
from ._stats import RateLimitedWarnings, SinkStatistics, WorkerCounts
from ._transports.base import Transport

logger = logging.getLogger("rlm_mlflow")

#: Records taken from the queue and the journal in one drain cycle.
TAKE_LIMIT = 20_000
CLOSE_SPLIT_STEPS = 500  # steps that fit one log_batch (two metrics each)
#: A cycle of one round of requests that a close with a deadline finds waiting on the server
#: may go on until this much time is left (at most half the time left when the close came);
#: then, if it is stuck (a request of the sink's unanswered for :data:`CYCLE_STUCK`), it is
#: taken over, so that its runs' ends still go in the rest (a server holding a request past the
#: close would otherwise leave them RUNNING). Taken over, its requests are done again, reads
#: first, and a create it had out may be committed unseen: while a slow server still answers,
#: a cycle is better left to finish.
CYCLE_RESERVE = 2.0
CYCLE_STUCK = 2.0
#: How often a close looks whether the cycle out has a request out at all (see
#: :meth:`Worker._take_over_if_stuck`).
CYCLE_LOOK = 0.05
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
#: How often the worker makes sure spare journal lanes and next segments are ready (asking the
#: journal's keeper): while records come in, and when none do (a hook that needs them sooner
#: asks the keeper itself: ``Journal.ask_upkeep``).
MAINTENANCE_BUSY = 0.01
MAINTENANCE_EVERY = 0.25
#: After an unexpected failure the worker starts again after this pause, doubled (up to
#: RESTART_MAX) while it keeps failing, back to this once a cycle went through.
RESTART_FIRST = 0.5
RESTART_MAX = 30.0
#: Runs the closing sinks of one loop send at the same time, all together: each is created,
#: sent and ended before more are begun, so that a deadline too short for every run leaves runs
#: never created (replay creates them, ended) rather than many created and left RUNNING. As
#: many as the HTTP transport has requests in flight while closing (``http.CLOSING_IN_FLIGHT``):
#: a run has one request out at a time (its create, then its batch, then its end), so more runs
#: at once only queue their requests behind each other. Each run then takes longer from create
#: to end, that time is what a close allows for a new run (``ClosingGate.took``), and the close
#: stops creating runs early: with 32 at a time, 300 sinks closing against a server 200 ms away
#: ended 26 and 28 runs within 5 s; with 12, 48 to 57 (see docs/performance.md).
CLOSING_RUNS = 12
#: Closing against a deadline, a run is created only if the time its runs have taken from
#: create to end (:class:`ClosingGate`), times this, is left: answers slow down as the
#: requests of hundreds of closing sinks queue, and a run created and not ended is RUNNING.
CLOSING_MARGIN = 1.5
#: Closing against a deadline, a run's end waits for its last batch's answer until this much
#: (or CLOSING_MARGIN times the latest answer, if more) is left, then goes beside the batch.
END_RESERVE = 0.5
#: Until a run has ended while sinks close, a run is taken to need this many times what its
#: create took: its create, its last batch and its end, one after another (before any create
#: of the close is answered, this many times the sink's latest answer: never nothing).
CREATE_TO_END = 3.0
#: Runs begun at a time while sinks close before any create has been answered: those go out
#: knowing nothing of how long a run takes to be ended, so only as many as the transport sends
#: at once (``http.MAX_IN_FLIGHT``); a server queueing many more makes each of them slower.
CLOSING_FIRST = 4
#: How many of the latest creates' answer times a close's guess of a new run's time reads.
RECENT_CREATES = 8


class ClosingGate:
    """The sinks of one event loop and one server that are closing and have not yet sent their
    runs' ends, and how many runs they send at a time, all together (:data:`CLOSING_RUNS`).

    Closing, a sink sends its runs first (create, last batch with the summary, end); then,
    when it closes against a deadline, it waits here until every other closing sink of its
    loop and server has done the same before it sends steps that did not fit and spans. With
    hundreds of sinks closing at exit, every run is ended before the deadline's time goes to
    anyone's steps.
    A close of all sinks enters each in the gate before it wakes any (:meth:`Worker.enter_gate`,
    from its own thread: one set insertion); the rest happens on the loop's thread: no lock."""

    def __init__(self) -> None:
        self._renew()
        _fork.register(self, ClosingGate._renew)  # a forked child's gate knows no closing sink

    def _renew(self) -> None:
        self.pending: set[int] = set()  # id() of the workers whose ends are not sent yet
        self._clear: anyio.Event | None = None
        # The workers closing now, from their entry to their end: when a close begins while none
        # is, what an earlier close learnt (a server slow then) is not this one's.
        self.closing: set[int] = set()
        self._forget()

    def _forget(self) -> None:
        self._runs: anyio.CapacityLimiter | None = None
        # How long a run takes from its create going out to its end's answer while sinks close
        # (the longest of late, fading; read on transport threads): a run is created only if
        # that much time, and a margin, is left (:data:`CLOSING_MARGIN`).
        self.took = 0.0
        self.ended = False  # a run has ended: ``took`` is measured, no longer guessed
        # The latest creates' answer times, and the longest of them (read on transport
        # threads): see Worker._time_to_create.
        self.answers: deque[float] = deque(maxlen=RECENT_CREATES)
        self.answer = 0.0

    def runs(self) -> anyio.CapacityLimiter:
        """The runs the closing sinks of the loop send at a time (made in the loop): at first
        :data:`CLOSING_FIRST`, :data:`CLOSING_RUNS` once a create has been timed."""
        if self._runs is None:
            self._runs = anyio.CapacityLimiter(CLOSING_RUNS if self.took else CLOSING_FIRST)
        return self._runs

    def ended_in(self, seconds: float) -> None:
        """A run was ended, while sinks close, ``seconds`` after its create went out (in the
        loop)."""
        # The first measure replaces the guess made from creates (see created_in).
        self.took = max(seconds, self.took * 0.9) if self.ended else seconds
        self.ended = True
        self._timed()

    def created_in(self, seconds: float) -> None:
        """A create was answered ``seconds`` after it went out, while sinks close (in the
        loop). Until a run has ended, what a run takes is guessed from it: its batch and its
        end take about as long again each."""
        if not self.ended:
            self.took = max(self.took, CREATE_TO_END * seconds)
        self.answers.append(seconds)
        self.answer = max(self.answers)
        self._timed()

    def _timed(self) -> None:
        if self._runs is not None and self._runs.total_tokens < CLOSING_RUNS:
            self._runs.total_tokens = CLOSING_RUNS

    def enter(self, worker: object) -> None:
        if not self.closing:
            self._forget()
        self.closing.add(id(worker))
        self.pending.add(id(worker))

    def done(self, worker: object) -> None:
        """The worker has finished closing."""
        self.closing.discard(id(worker))
        self.leave(worker)

    def leave(self, worker: object) -> None:
        self.pending.discard(id(worker))
        if not self.pending and self._clear is not None:
            self._clear.set()
            self._clear = None

    async def wait(self) -> None:
        while self.pending:
            if self._clear is None:
                self._clear = anyio.Event()
            await self._clear.wait()


class ClosingGates:
    """The closing gates of one event loop, one per server (tracking URI): the sinks closing
    against one server wait for each other's run ends and share what a run takes there; the
    sinks of another server go at their own server's pace, never behind these."""

    def __init__(self) -> None:
        self._gates: dict[str, ClosingGate] = {}

    def of(self, tracking_uri: str | None) -> ClosingGate:
        """The gate of the sinks that send to ``tracking_uri`` (in the loop, or from a close of
        all sinks before any is woken: a dict lookup, made once per sink)."""
        key = (tracking_uri or "").rstrip("/")
        gate = self._gates.get(key)
        if gate is None:
            gate = self._gates.setdefault(key, ClosingGate())
        return gate


def _ended_text(ended: int) -> str:
    """The runs ended in MLflow by sinks that left events unsent (their traces, other runs)."""
    if not ended:
        return ""
    return f"; {ended} run{'s were' if ended > 1 else ' was'} ended in MLflow all the same"


class CloseReports:
    """What the sinks closed together (at exit, on a signal) left unsent, said in one line.

    A process with hundreds of sinks would otherwise print one warning per sink. Each worker
    that closes while the group is open hands its figures here instead of logging them; one that
    closes after :meth:`say` (past the group's deadline) logs its own as before.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open = True
        self._unsent = 0
        self._lost = 0
        self._sinks = 0
        self._ended = 0  # runs the sinks that left events ended in MLflow all the same
        self._kept: list[str] = []
        self._why: Counter[str] = Counter()

    def add(self, deferred: int, dropped: int, kept: list[str], why: str, ended: int) -> bool:
        """Take one worker's figures; False once the group has spoken (log them yourself)."""
        with self._lock:
            if not self._open:
                return False
            if deferred or dropped or kept:
                self._sinks += 1
                self._ended += ended
                self._unsent += deferred + dropped
                self._lost += dropped
                self._kept.extend(kept)
                if deferred or dropped:
                    self._why[why] += 1
            return True

    def say(self) -> None:
        """Log what the group left, once; later closers log their own."""
        with self._lock:
            self._open = False
            if not self._sinks:
                return
            folders = sorted({os.path.dirname(k) for k in self._kept})
            reasons = "; ".join(
                (f"{count} sinks: " if count > 1 else "") + why
                for why, count in self._why.most_common(3)
            )
            logger.warning(
                "rlm-mlflow: %d sinks stopped with %d events not sent (%s)%s%s%s",
                self._sinks,
                self._unsent,
                reasons or "none left unsent",
                _ended_text(self._ended),
                f"; kept in {len(self._kept)} journals under {', '.join(folders)}: send them "
                "with 'rlm-mlflow replay'"
                if self._kept
                else "",
                f"; {self._lost} lost (no journal)" if self._lost else "",
            )


class Worker:
    """See the module docstring."""

    def __init__(
        self,
        config: SinkConfig,
        pipeline: Pipeline,
        *,
        transport_factory: Callable[[], Transport],
        warnings: RateLimitedWarnings,
        on_transport_ready: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self.pipeline = pipeline
        self.warnings = warnings
        self._transport_factory = transport_factory
        self._on_transport_ready = on_transport_ready
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
        # A run's create waiting for its turn when a close request comes is checked then.
        self.runs.time_to_create = self._time_to_create
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
            background=True,
        )
        self.callers = (self.caller, traces_caller)  # runs first, then traces
        self.traces = TracesExporter(
            caller=traces_caller,
            warnings=self.warnings,
            prefix=self.pipeline.prefix,
            runs=self.runs,
            transport=self._get_transport,
            mode=config.traces,
            span_budget=config.span_budget,
        )
        self.traces.figures_dir = self._journal_folder
        self.dispatcher = Dispatcher(
            self.runs,
            self.traces,
            self.counts,
            on_settled=self._settled,
            before_traces=self._before_spans,
        )
        self.carry: dict[int, RunWork] = {}  # runs whose start has not been taken yet
        self.later: list[RunWork] = []  # closing: steps waiting while their runs' ends go
        self.pins: dict[int, list[Segment]] = {}  # segments holding an open run's start
        # A run's start pins its segment until the run has ended and every record of it taken
        # so far is finished: its records taken and not settled, the runs whose end is done
        # (their start still pinned), and the runs with records kept for replay (pinned for
        # good: replay needs the start to send them where they belong).
        self.unsettled: dict[int, int] = {}
        self.ended_pinned: set[int] = set()
        self.kept_runs: set[int] = set()
        self.retry: list[RunWork] = []  # taken, not settled when the worker failed: sent again
        # Spilled run starts and ends read ahead of the read position at a close: passed over
        # when the read position reaches them (they have their fate already).
        self.early: set[tuple[Segment, int]] = set()
        self.failure: str | None = None  # the worker's last unexpected failure, until it recovers
        self._logged_failure = False
        self._restart_pause = RESTART_FIRST
        self._closing = False
        self._hurrying: Transport | None = None  # told to hurry (closing against a deadline)
        self._gate: ClosingGate | None = None  # entered at the close, left once ends are sent
        self._interruptible: anyio.CancelScope | None = None  # a cycle a close may interrupt
        self._long_cycle = False  # ... and it carries more steps than one round of requests
        self._spans_out = False  # ... and its runs are sent: its spans go now
        self._watched: anyio.CancelScope | None = None  # the short cycle a close watches
        self._tasks: TaskGroup | None = None  # the worker's own (while it runs)
        self._server_asked = False  # what the server does with traces, asked (see _learn_server)
        self._journal_seen = (-1, 0.0)  # (records written, when that figure last changed)
        self.unavailable: str | None = None  # the store cannot be used at all (setup failed)
        self.describe: str | None = None
        # Signalled across threads: close and flush requests, progress for flush() waiters.
        self.close_requested = False
        self._open_runs_ended = False
        self.close_deadline: float | None = None  # time.monotonic(); None: no hurry
        self.close_allowed: float | None = None  # the seconds the close was given, when asked
        self._deadline_set: float | None = None
        self.flush_requested = False
        self.wake_flag = False
        self.started = False
        self.loop: Any = None  # the _runtime.Loop whose dispatcher wakes this worker
        self.transition = threading.Lock()  # the rare state changes of the sink, never a hook's
        self.stopped = threading.Event()
        self.close_reports: CloseReports | None = None  # closing with others: say it once
        self.progress = threading.Condition()
        self._wake: anyio.Event | None = None
        self._close_seen: anyio.Event | None = None
        self._cycle_done: anyio.Event | None = None
        self._taken_at = 0.0  # time.monotonic() of the last drain's take: drains keep a pace

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
            for caller in self.callers:
                caller.announced = bool(getattr(self.transport, "announces_sends", False))
            self.describe = self.transport.describe()
            if self._on_transport_ready is not None:
                self._on_transport_ready()
            return True
        except ImportError as exc:
            self.unavailable = f"mlflow cannot be used: {exc}"
        except Exception as exc:
            self.unavailable = f"{type(exc).__name__}: {exc}"
        self.caller.note_error(self.unavailable)
        logger.error("rlm-mlflow: %s; events are kept in the journal, if any", self.unavailable)
        return False

    def _journal_folder(self) -> Path | None:
        """The folder of the journal hooks write to now (None without one)."""
        journal = self.pipeline.journal
        return journal.folder if journal is not None and not journal.closed else None

    # -- waking --------------------------------------------------------------------------------

    def notify(self) -> None:
        """Called in the worker's loop by the loop's dispatcher after ``wake_flag`` was set."""
        seen = self._close_seen
        if self.close_requested and seen is not None and self.close_deadline != self._deadline_set:
            seen.set()
        if self._wake is not None:
            self._wake.set()
        if self.close_requested:
            self._take_over_cycle()

    def _take_over_cycle(self) -> None:
        """Closing: the close takes over what the cycle out now was sending (see _send), a
        long cycle at once, a short one as soon as nothing of it is out, or when its share of
        the close's time is up and it is stuck (:meth:`_take_over_if_stuck`)."""
        scope = self._interruptible
        if scope is None:
            return
        deadline = self.close_deadline
        if self._long_cycle or (self._spans_out and self._ends_first()):
            scope.cancel()
        elif deadline is not None and self._watched is not scope and self._tasks is not None:
            self._watched = scope
            left = max(0.0, deadline - time.monotonic())
            allowed = max(left - CYCLE_RESERVE, left / 2)
            self._tasks.start_soon(self._take_over_if_stuck, scope, time.monotonic() + allowed)

    async def _take_over_if_stuck(self, scope: anyio.CancelScope, at: float) -> None:
        """Take the short cycle out now over as soon as none of its requests is out (each waits
        for its turn behind other requests, or for its next try) while runs of this sink wait
        to be ended: nothing of it is in doubt, and the close sends those ends first. Else,
        from ``at`` (time.monotonic()) on, once one of its requests has waited
        :data:`CYCLE_STUCK` for its answer, or for its next try (a 429 or 503 answered at once,
        retried until the deadline, holds the run's end up as long as a server holding the
        request; see :data:`CYCLE_RESERVE`)."""
        while self._interruptible is scope:
            now = time.monotonic()
            if self._ends_first() and all(caller.nothing_out() for caller in self.callers):
                scope.cancel()
                return
            if now >= at:
                callers = map(Caller.oldest_unsettled, self.callers)
                since = [found[1] for found in callers if found is not None]
                waited = now - min(since, default=now)
                if waited >= CYCLE_STUCK:
                    scope.cancel()
                    return
                at = now + CYCLE_STUCK - waited
            await anyio.sleep(min(CYCLE_LOOK, max(0.0, at - now)))

    # -- the loop ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Drain until closed; returns within the close deadline, whatever the store does."""
        self.started = True
        self._wake = anyio.Event()
        self._close_seen = anyio.Event()
        try:
            async with anyio.create_task_group() as tg:
                self._tasks = tg
                with anyio.CancelScope() as scope:
                    tg.start_soon(self._watch_close, scope)
                    tg.start_soon(self._keep_journal_ready)
                    await self._supervise()
                tg.cancel_scope.cancel()
        except Exception:  # the supervision itself failed: stop taking events, count them
            self.pipeline.active = False
            logger.exception("rlm-mlflow worker failed; what it had not sent is counted below")
        finally:
            self._tasks = None
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
                self._hurry()

    async def _supervise(self) -> None:
        """The drain loop, started again after any exception it did not expect."""
        while True:
            try:
                await self._loop()
                return
            except Exception as exc:
                self._failed(exc)
            self._take_back()
            pause = self._restart_pause
            self._restart_pause = min(pause * 2, RESTART_MAX)
            if self.close_requested:
                await anyio.sleep(min(pause, 1.0))  # the close deadline still bounds it
            else:
                await self._sleep(pause)

    def _failed(self, exc: BaseException, where: str = "drain") -> None:
        """An exception the worker did not expect: logged once with its traceback, counted,
        shown by status() until a cycle goes through again."""
        self.counts.worker_failures += 1
        text = self.caller.clean(f"the worker failed ({where}): {type(exc).__name__}: {exc}")
        self.failure = text
        self.caller.note_error(text)
        if not self._logged_failure:
            self._logged_failure = True
            logger.error(
                "rlm-mlflow: %s; restarting it (what it had taken is kept and sent again)",
                text,
                exc_info=exc,
            )
        else:
            self.warnings.warn(
                "worker_failed", "rlm-mlflow: %s; restarting it", text, level=logging.ERROR
            )

    def _take_back(self) -> None:
        """After a failure: what the exporters had and did not settle is exported again."""
        dispatcher = self.dispatcher
        held = len(dispatcher.held)
        dispatcher.give_up(HOLD)  # unsettled: back with what each exporter had finished
        self.retry.extend(dispatcher.held[held:])
        del dispatcher.held[held:]
        self.retry.extend(self.later)
        self.later = []
        now = time.monotonic()
        for state in self.runs.runs.values():
            # A create still out, given up on, is waited for: its answer says (the run it made
            # is the run, its failure marks the create as lost); see RunIdentity._create_or_find.
            if state.ref is not None or state.create_out or state.answered is not None:
                continue
            if state.create_lost_at is None:
                # A create the failure interrupted may have been committed: look before creating.
                state.create_lost_at = now

    async def _loop(self) -> None:
        pipeline = self.pipeline
        while True:
            # The transport first, even when closing: a close that comes before the worker could
            # connect waits for the connection (within the close deadline), then sends.
            if not await self._setup():
                if self.close_requested:
                    return
                await self._sleep(self.config.flush_interval)
                continue
            self._hurry()
            if self.close_requested and not self._closing:
                self._closing = True
                await self._begin_close()
            closing = self._closing
            if self.retry:
                works, self.retry = self.retry, []
                if closing:
                    works, ahead = self._with_waiting(works)
                    if ahead:
                        await self.dispatcher.runs_first(ahead)
                await self._send(works)
                continue
            if self.dispatcher.held:
                if not await self._store_back():
                    if closing:
                        return
                    await self._sleep(min(BLOCKED_PROBE, max(self.config.retry_max_wait, 1.0)))
                    continue
                works, self.dispatcher.held = self.dispatcher.held, []
                await self._send(works)
                continue
            self._taken_at = time.monotonic()
            items = pipeline.take(TAKE_LIMIT)
            # What came may free held runs; once nothing comes, what ended meanwhile may too.
            works = self._group(items, final=False) if items or self.carry else []
            if works:
                self._learn_server()
                await self._send(works)
                await self._maintain_journal()
                if (
                    closing
                    or self.close_requested
                    or self.flush_requested
                    or pipeline.waiting() >= pipeline.trigger
                ):
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

    async def _send(self, works: list[RunWork]) -> None:
        """One cycle's works through the exporters.

        Before the close, a close request interrupts a cycle of more than one round of
        requests: what was not settled is taken back and sent again by the closing cycles,
        whose run starts and ends go first (the exporters do again only what they had not
        finished). A cycle of one round is cheaper finished than taken back: with a deadline,
        it may go on until :data:`CYCLE_RESERVE` is left, then it is taken back too (its
        requests still out are checked, not sent twice, see ``maybe_sent``).

        While closing, with more steps than one round of requests carries and little time
        left, statuses matter most: the runs' starts and ends go ahead of their steps (many
        runs of a few hundred steps each take many rounds too), as they do after steps that
        went out once unanswered. Otherwise a run's steps and its end go together."""
        if not self._closing:
            with anyio.CancelScope() as scope:
                self._interruptible = scope
                self._long_cycle = sum(len(work.steps) for work in works) > CLOSE_SPLIT_STEPS
                self._spans_out = False
                if self.close_requested:
                    self._take_over_cycle()  # the close came while the cycle was being made
                try:
                    await self._export(works)
                finally:
                    self._interruptible = None
            if scope.cancelled_caught:
                for caller in self.callers:
                    caller.give_up_left()  # done again now: their places go to the close
                self._take_back()
            return
        whole = [w for w in works if w.runs_outcome or w.traces_outcome]  # half done: as is
        fresh = [w for w in works if not (w.runs_outcome or w.traces_outcome)]
        # Split too when a run's steps went out once and got no answer (a cycle taken over):
        # the server that did not take them in time would hold its end up again behind them.
        if sum(len(work.steps) for work in fresh) > CLOSE_SPLIT_STEPS or any(
            work.maybe_sent and work.steps for work in fresh
        ):
            parts = [work.split() for work in fresh]
            for work, (control, _) in zip(fresh, parts, strict=True):
                control.maybe_sent = work.maybe_sent  # its summary may be stored already
            # Counted at the end if the deadline comes while the ends are out.
            self.later = [rest for _, rest in parts if rest.steps or rest.span_steps] + whole
            await self._export([c for c, _ in parts if c.starts or c.end or c.span_end])
            await self._ends_sent()
            works, self.later = self.later, []
        await self._export(works)

    def _learn_server(self) -> None:
        """Once, at a sink's first works, if it sends traces and is not closing: ask the
        server's version (whether it writes a trace's info with its assessments) beside the
        cycle's runs. Asked at the first spans, it came in the close at exit for sinks whose
        cycles had not reached their spans: with 300 sinks closing, the read waited behind the
        runs' requests, and every trace behind it (half a second of the close). The transport
        reads ``/version`` once for every sink of the process."""
        if self._server_asked or self._closing or self.close_requested or self._tasks is None:
            return
        self._server_asked = True
        if self.traces.active:
            self._tasks.start_soon(self.traces.learn_server)

    async def _keep_journal_ready(self) -> None:
        """Now and then, even while a long export runs: new threads find a lane ready."""
        written = -1
        while True:
            try:
                await self._maintain_journal()
            except Exception as exc:  # the hooks write in memory meanwhile, or spill
                self._failed(exc, "journal upkeep")
                await anyio.sleep(MAINTENANCE_EVERY)
                continue
            # While records come in, look after the lanes often (a busy lane fills a segment in
            # milliseconds with large records); when nothing comes, now and then. A hook that
            # needs it sooner asks the journal's keeper itself.
            journal = self.pipeline.journal
            now = journal.written() if journal is not None else 0
            await anyio.sleep(MAINTENANCE_BUSY if now != written else MAINTENANCE_EVERY)
            written = now

    async def _maintain_journal(self) -> None:
        """Lanes and segments made ahead (so hooks do not make files: the journal's keeper
        makes them, on its own thread), finished segments removed, and the fsync setting."""
        journal = self.pipeline.journal
        if journal is None:
            return
        journal.release_sealed()
        if journal.needs_maintenance():
            journal.ask_upkeep()
        if self.config.journal_fsync:
            await anyio.to_thread.run_sync(journal.sync)

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

    def _hurry(self) -> None:
        """Closing against a deadline: the transport's in-flight bound raised for the process
        until this sink has closed (see ``http.CLOSING_IN_FLIGHT``)."""
        transport = self.transport
        if self.close_deadline is None or transport is None or self._hurrying is not None:
            return
        hurry = getattr(transport, "hurry", None)
        if callable(hurry):
            self._hurrying = transport
            hurry(True)

    def _time_to_create(self, at: float | None = None) -> bool:
        """Closing against a deadline: whether a run created now (or at ``at``, a later
        time.monotonic()) can still be ended in time (else it is kept for replay, which
        creates it ended, rather than left RUNNING)."""
        deadline = self.close_deadline  # set from any thread by a close request
        if deadline is None:
            return True
        gate = self._loop_gate()
        took = gate.took if gate is not None else 0.0
        if not took:  # no create of this close answered yet: guessed from the latest answer
            took = CREATE_TO_END * self.caller.answered_in
        elif gate is not None and gate.answer:
            # What runs took lags: it is measured at their ends, and the first runs of a close
            # wait behind the ends of runs created before it. A run's create, batch and end
            # take about what creates take now to be answered, each; a run slower than that
            # has its end go beside its batch at _end_by.
            took = min(took, CREATE_TO_END * gate.answer)
        return max(time.monotonic(), at or 0.0) + took * CLOSING_MARGIN < deadline

    def _end_by(self) -> float | None:
        """Closing against a deadline: when a run's end must go out at the latest, its last
        batch answered or not: the deadline less what an end takes (:data:`CLOSING_MARGIN`
        times the latest answer, at least :data:`END_RESERVE`). None without a deadline."""
        deadline = self.close_deadline  # set from any thread by a close request
        if deadline is None:
            return None
        return deadline - max(END_RESERVE, CLOSING_MARGIN * self.caller.answered_in)

    def _calm(self) -> None:
        transport, self._hurrying = self._hurrying, None
        if transport is not None:
            try:
                transport.hurry(False)  # type: ignore[attr-defined]
            except Exception:
                logger.debug("rlm-mlflow: the transport refused to slow down", exc_info=True)

    async def _before_spans(self) -> None:
        """Between a cycle's runs and its spans (a cycle taken over here does not return).

        Closing: once this sink's ends are sent (:meth:`_ends_sent`). Before the close: when a
        close against a deadline has come and runs wait to be ended (still open, or their ends
        not sent), the close takes the cycle over here, as it would once the spans are out
        (:meth:`_take_over_cycle`): the spans go after every closing sink's run ends, not
        ahead of this sink's own (a trace never holds a run's end up)."""
        if self._closing:
            await self._ends_sent()
            return
        self._spans_out = True
        scope = self._interruptible
        if scope is not None and (self._ends_first() or self._others_end_first()):
            scope.cancel()
            await anyio.sleep(0)  # the take-over

    def _ends_first(self) -> bool:
        """A close against a deadline has come and runs of this sink wait to be ended (still
        open, or their ends not taken yet): their ends go before the spans of a cycle out."""
        pipeline = self.pipeline
        return self.close_deadline is not None and bool(pipeline.by_thread or pipeline.ctl)

    def _others_end_first(self) -> bool:
        """A close against a deadline has come and other sinks of this loop and server have not
        sent their runs' ends: the spans of this sink's cycle out wait for them as a closing
        sink's do (taken over, the cycle's spans go through the gate). With hundreds of sinks
        at exit, the spans of the cycles out when the close came took a third of the requests
        the runs' ends needed."""
        if self.close_deadline is None:
            return False
        gate = self._loop_gate()
        return gate is not None and bool(gate.pending - {id(self)})

    async def _ends_sent(self) -> None:
        """Closing: this sink's runs went (ended, or kept); with a deadline, its steps and spans
        wait until every closing sink of the loop has sent its runs too (:class:`ClosingGate`)."""
        gate = self._gate
        if gate is None or not self._closing:
            return
        gate.leave(self)
        if self.close_deadline is not None:
            await gate.wait()

    def enter_gate(self) -> None:
        """Before the sinks of a loop are woken to close together (any thread): this one is
        in the loop's closing gate before any of them can pass it, so none sends steps or
        spans while another has not begun to send its runs' ends. A sink that has begun its
        close already is left as it is."""
        if not self._closing:
            self._join_gate()

    def _loop_gate(self) -> ClosingGate | None:
        """The closing gate of this sink's server in its loop, if its loop has gates."""
        gates = getattr(self.loop, "gates", None)
        if not isinstance(gates, ClosingGates):
            return None
        return gates.of(self.config.tracking_uri)

    def _join_gate(self) -> ClosingGate | None:
        """This sink in its server's closing gate (once), if its loop has gates."""
        if self._gate is None:
            gate = self._loop_gate()
            if gate is not None:
                self._gate = gate
                gate.enter(self)
        return self._gate

    async def _begin_close(self) -> None:
        pipeline = self.pipeline
        gate = self._join_gate()
        if gate is not None:
            self.runs.limiter = gate.runs()
            self.runs.ended_in = gate.ended_in
            self.runs.created_in = gate.created_in
        self.runs.end_by = self._end_by
        await self._end_open_runs()
        # Ends first: the run starts and ends that wait in the journal, behind steps spilled
        # before them, go now; the steps follow while the deadline allows (then replay).
        control = [
            item
            for journal in pipeline.journals()
            for item in journal.spilled_unsent(control_only=True)
        ]
        if control:
            works = self._group(control, final=True)
            self.early.update((segment, offset) for segment, offset, _ in control)
            await self._export(works)

    async def _idle(self) -> None:
        """Sleep until a batch is ready, a flush or close asks, or the interval is up.

        The interval runs from the last drain's start, not its end: the time a drain spends
        sending is not added to the next wait, so a step is sent within ``flush_interval`` and
        one drain's sending of its hook, however long the server takes to answer (with a drain
        longer than the interval, the next one starts at once, with all that came meanwhile)."""
        pipeline = self.pipeline
        assert self._wake is not None
        if self.close_requested or self.flush_requested:
            self.flush_requested = False
            # The wake that came with this flush is served by the cycle it asks for: kept, it
            # would end the next sleep at once (hooks wake only a worker asleep).
            if not self.close_requested:
                self._wake = anyio.Event()
            return
        pipeline.worker_asleep = True
        pipeline.wake_sent = False
        try:
            wait = self._taken_at + self.config.flush_interval - time.monotonic()
            if pipeline.waiting() < pipeline.trigger and not self.close_requested and wait > 0:
                with anyio.move_on_after(wait):
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
        self.failure = None  # a whole cycle went through: recovered
        self._restart_pause = RESTART_FIRST
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

    def _with_waiting(self, works: list[RunWork]) -> tuple[list[RunWork], list[RunWork]]:
        """Closing, with a cycle taken back: what came in since it was taken (a run's end, other
        runs) joins it, so that every run's start and end go ahead of all the steps (a taken
        back run's steps may be held by the server again until the deadline).

        A run taken back half done goes as it is, and what came in for it right after it (its
        spans after the first's: the traces exporter learns a run from its start). When only
        the first one's spans were left, what came in for it is also returned apart: its runs
        part (a run's end) goes before those spans (``Dispatcher.runs_first``), never after."""
        items = self.pipeline.take(TAKE_LIMIT)
        if not items:
            return works, []
        fresh = {w.no: w for w in works if not (w.runs_outcome or w.traces_outcome)}
        half = {w.no: w for w in works if w.no not in fresh}
        out = list(works)
        ahead: list[RunWork] = []
        # A cycle taken over before its runs exporter saw them: their starts are in ``works``.
        started = {w.no for w in works if w.starts}
        for work in self._group(items, final=False, started=started):
            same = fresh.get(work.no)
            taken = half.get(work.no)
            if same is not None:
                same.merge(work)
            elif taken is None:
                out.append(work)
            else:
                self.retry.append(work)
                if taken.runs_outcome is not None:
                    ahead.append(work)
        # A benchmark whose case's end goes after the cycle goes after it too: the case's
        # assessments go on the trace that end stores.
        later = {work.no for work in self.retry}
        for work in out[len(works) :]:
            if any(case.case_no in later for case in work.cases):
                out.remove(work)
                self.retry.append(work)
        return out, ahead

    def _group(
        self, items: Sequence[Item], *, final: bool, started: Collection[int] = ()
    ) -> list[RunWork]:
        """Decode records and group them by run, in order; hold runs whose start is not here
        (nor in ``started``: runs whose start is in works being sent)."""
        works: dict[int, RunWork] = {}
        early = self.early
        for segment, offset, queued in items:
            if early and (segment, offset) in early:  # sent ahead at the close: has its fate
                early.discard((segment, offset))
                continue
            try:
                # A large record is queued by reference: its bytes are in the journal.
                payload = queued if queued is not None else _read_back(segment, offset)
                if segment is not None and len(payload) > BY_REFERENCE:
                    segment.sum_unsummed(offset, payload)  # the hook left that to us
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
                self.unsettled[event.run_no] = self.unsettled.get(event.run_no, 0) + 1
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
        for no, work in works.items():
            whole = self.carry.pop(no, None)
            if whole is None:
                whole = work
            else:
                whole.merge(work)
            if not final and not self._may_go(no, whole, works, started):
                self.carry[no] = whole
                continue
            out.append(whole)
        for no, whole in list(self.carry.items()):  # held before: what came now may free them
            # Not into the starts and ends a close sends ahead (final): steps never go there.
            if not final and no not in works and self._may_go(no, whole, works, started):
                del self.carry[no]
                out.append(whole)
        return out

    def _may_go(
        self, no: int, whole: RunWork, works: dict[int, RunWork], started: Collection[int]
    ) -> bool:
        """Whether a run's events may be sent now, or are held (in ``carry``) until:

        - its start is taken (it was appended to another lane after we took the starts);
        - for a benchmark made in an earlier cycle, each of its cases' runs has ended: a case's
          assessments go on its trace, which may be stored only with its root run's end. The
          hooks of several threads go to lanes of their own, so the benchmark's end may be
          taken before a case's end was (with DSPy's ``Evaluate``, its threads' last runs).
          (A benchmark begun in the same cycle goes: the traces exporter keeps what it says
          of a case still open for replay.)"""
        runs = self.runs
        if not (whole.starts or no in runs.runs or no in runs.ended or no in started):
            return False
        if whole.starts:
            return True  # its evaluation run is made first (a case is linked to it as it ends)
        for case in whole.cases:
            grouped = works.get(case.case_no)
            if grouped is not None and grouped.end is not None:
                continue  # it ends in this cycle, its spans before the benchmark's assessments
            if case.case_no in runs.runs or case.case_no in self.carry or grouped is not None:
                return False
        return True

    async def _export(self, works: list[RunWork]) -> None:
        try:
            await self.dispatcher.export(works)
        except PermanentError as exc:  # the experiment cannot be had (a bad name, ...)
            self.unavailable = f"MLflow refuses the experiment: {exc}"
            self.caller.note_error(self.unavailable)
            logger.error("rlm-mlflow: %s", self.unavailable)
            self.dispatcher.give_up(DEFERRED)

    def _settled(self, work: RunWork, complete: bool) -> None:
        """A run's events have their fate: once it has ended and every record of it is
        finished, its start pins nothing (a close sends a run's end before its steps; steps
        kept for replay keep it pinned)."""
        no = work.no
        left = self.unsettled.get(no, 0) - len(work.locations)
        if left > 0:
            self.unsettled[no] = left
        else:
            self.unsettled.pop(no, None)
        if not complete:
            self.kept_runs.add(no)
        elif work.end is not None:
            self.ended_pinned.add(no)
        if no in self.ended_pinned and left <= 0:
            self.ended_pinned.discard(no)
            pins = self.pins.pop(no, ())
            if no not in self.kept_runs:
                for segment in pins:
                    segment.starts_ended += 1
                    segment.release_if_finished()
            self.kept_runs.discard(no)
        self._notify_progress()

    # -- the end -------------------------------------------------------------------------------

    def _why_not_sent(self) -> str:
        """What held events back at the close, in words a user can act on."""
        health, detail = self.caller.health()
        if self.unavailable is not None:
            return "the store cannot be used, as said above"
        if health == "ok":
            error = self.counts.last_error
            reason = f"; last error: {error}" if error else ""
            allowed = self._allowed()
            return f"the server did not take them before the close's deadline ({allowed}){reason}"
        return f"the store is {health}: {detail}"

    def _allowed(self) -> str:
        """The time the close had, and the setting that gives it by default."""
        given = "" if self.close_allowed is None else f"it was given {self.close_allowed:.1f} s; "
        return f"{given}shutdown_timeout is {self.pipeline.config.shutdown_timeout:g} s"

    def _finish(self) -> None:
        """After the loop, whatever ended it: count what is left, release everything."""
        pipeline = self.pipeline
        pipeline.active = False  # whatever ended the loop, nothing feeds it any more
        if self._gate is not None:
            self._gate.done(self)
        self._calm()
        left = self.dispatcher.take_unsettled()
        left.extend(self.carry.values())
        left.extend(self.later)
        left.extend(self.retry)
        self.carry.clear()
        self.later = []
        self.retry = []
        # What waits in memory is counted here; what waits in the journal only (spilled) stays
        # there unread: reading millions of records back just to count them could outlive the
        # deadline, and the journal knows how many there are.
        items = pipeline.take(0)
        left.extend(self._group(items, final=True))
        for work in left:
            self.dispatcher.settle_left(work)
        for journal in pipeline.journals():
            # Still in the journal: kept for replay.
            self.counts.deferred += journal.count_spilled_unsent()
        # Run starts and ends read ahead at the close are counted with their works already,
        # and the journal counts them again while the read position has not passed them.
        self.counts.deferred -= self._early_unsettled()
        kept: list[str] = []
        late = self._keep_late_runs()
        for journal in pipeline.journals():
            keep = journal.backlog() > 0 or journal is late
            journal.close(keep=keep)
            if keep:
                kept.append(str(journal.folder))
        # Said at the close: every event the sink leaves, as status() counts it, also those
        # kept for replay (or lost) earlier, while it ran or as the close went.
        deferred = self.counts.deferred + pipeline.deferred_door.value
        dropped = self.counts.dropped.get("send_failed", 0)
        reports = self.close_reports
        ended = self.counts.runs_ended
        if reports is not None and reports.add(
            deferred, dropped, kept, self._why_not_sent(), ended
        ):
            pass  # said once for every sink that closed with this one
        elif deferred or dropped:
            logger.warning(
                "rlm-mlflow stopped with %d events not sent (%s)%s%s%s",
                deferred + dropped,
                self._why_not_sent(),
                _ended_text(ended),
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

    def _keep_late_runs(self) -> Journal | None:
        """Runs that may still get a duplicate MLflow run after the close's last look for one
        (see ``RunIdentity.late_risks``) are written beside the current journal, which is then
        kept: ``rlm-mlflow replay`` looks for them (the journal it returns)."""
        late = self.runs.late_risks()
        if not late:
            return None
        journal = self.pipeline.journal
        if journal is not None and not journal.closed and write_late_runs(journal.folder, late):
            logger.warning(
                "rlm-mlflow: %d run(s) may still get a duplicate MLflow run (a create that had "
                "no answer may be committed late); 'rlm-mlflow replay' looks for it and deletes "
                "it (%s)",
                len(late),
                journal.folder,
            )
            return journal
        logger.warning(
            "rlm-mlflow: %d run(s) may still get a duplicate MLflow run (a create that had no "
            "answer may be committed late), and no journal keeps them for replay: runs %s",
            len(late),
            ", ".join(sorted(run_id for run_id, _ in late.values())),
        )
        return None

    def _early_unsettled(self) -> int:
        """Records read ahead at the close, not finished, made by hook calls."""
        count = 0
        for segment, offset in self.early:
            if segment.is_finished(offset):
                continue
            try:
                if not _codec.decode(segment.payload(offset)).internal:
                    count += 1
            except ValueError:
                continue
        self.early.clear()
        return count

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
        """One consistent snapshot: every fate is read before ``accepted`` (an event is accepted
        before it has a fate), so ``accepted == sent + deferred + dropped + pending`` holds with
        ``pending >= 0`` however hooks and the worker race this."""
        pipeline, counts = self.pipeline, self.counts
        sent = counts.sent
        deferred = counts.deferred + pipeline.deferred_door.value
        dropped = Counter(dict(counts.dropped))
        dropped.update(pipeline.door.snapshot())
        accepted = pipeline.accepted.value
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
            worker_failures=counts.worker_failures,
        )


def _read_back(segment: Segment | None, offset: int) -> bytes:
    assert segment is not None
    return segment.payload(offset)

"""The runs exporter: RLM runs as MLflow runs (params, tags, step metrics, summary, artifacts).

It gets each drain cycle's events grouped by run (:class:`RunWork`) and answers, run by run,
whether they were sent, must be kept for replay, or were refused for good. Which MLflow run each
RLM run is (created once, found again after a lost answer, its parent first) is
:class:`~.identity.RunIdentity`'s. Every write is idempotent, so a retry or a replay never
duplicates anything:

- params are immutable in MLflow (the same value again is a no-op);
- metric points keep the time of their hook call; after an answer was lost, the run's stored
  points are read back and only the missing ones are sent (a file store does not deduplicate);
- ending a run overwrites its status; replay never ends a run that is not RUNNING anymore.

Failures are contained per run: a bad value is counted and skipped, an unexpected error in one
run's conversion is logged and that run's events kept, and the other runs of the cycle go on.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

import anyio

from .._codec import describe
from .._events import RunEnd, RunStart, Step, Usage
from .._exceptions import (
    SMALL_ITEM,
    TOO_LARGE,
    PermanentError,
    Postponed,
    StoreRefused,
    TransientError,
)
from .._transports.base import PARENT_TAG, Metric, RangeReads, Transport, current_call
from . import convert as _convert
from .identity import ANSWER_POLL, CreatePending, RunIdentity, RunState
from .work import DEFERRED, HOLD, SENT, Done, Outcome, RunWork

logger = logging.getLogger("rlm_mlflow")

#: Runs whose data is sent at the same time (each run's own writes stay in order).
CONCURRENT_RUNS = 4
#: Steps one bounded read of a metric's history spans at most, and the windows read so before
#: the whole history is read instead (see :func:`stored_points`).
RANGE_STEPS = 2000
RANGE_WINDOWS = 16


def _item_chars(
    metrics: Sequence[Metric], params: Sequence[tuple[str, str]], tags: Sequence[tuple[str, str]]
) -> int:
    """How many characters the items of a batch carry (a metric point: its name, and 32 for
    its numbers)."""
    return (
        sum(len(m.key) + 32 for m in metrics)
        + sum(len(k) + len(v) for k, v in params)
        + sum(len(k) + len(v) for k, v in tags)
    )


#: Codes for which splitting a refused batch cannot help: the whole run is concerned.
_WHOLE_RUN_CODES = frozenset({"RESOURCE_DOES_NOT_EXIST", "RUN_NOT_ACTIVE", "ENDPOINT_NOT_FOUND"})


class RunsExporter(RunIdentity):
    """See the module docstring."""

    def __init__(self, **identity: Any) -> None:
        super().__init__(**identity)
        # Replay: run -> times (ms) of the events that went out in a request whose answer never
        # came; only their points may be stored (None: not known, any point may be).
        self.in_flight: dict[int, set[int]] | None = None
        self.killed = 0  # replay: runs left open by a dead process, ended KILLED
        # Closing: one limiter for the runs of every closing sink of the loop (each run is
        # created, sent and ended before more are begun).
        self.limiter: AbstractAsyncContextManager[Any] | None = None
        # Closing against a deadline: the time (time.monotonic()) by which a run's end must go
        # out, its last batch answered or not (see _send); None without a deadline.
        self.end_by: Callable[[], float | None] | None = None

    # -- one cycle ---------------------------------------------------------------------------

    async def export(self, works: Sequence[RunWork], done: Done) -> None:
        """Send the works; ``done(work, outcome)`` as soon as each run's outcome is known (see
        :data:`Outcome`), so progress shows while slow runs are still being sent."""
        outcomes: dict[int, Outcome] = {}
        by_no = {work.no: work for work in works}

        def finished(no: int, outcome: Outcome) -> None:
            outcomes[no] = outcome
            done(by_no[no], outcome)

        await self.ensure_experiment()
        states: dict[int, RunState] = {}
        for work in works:
            try:
                states[work.no] = self._state_for(work)
            except Exception:
                logger.exception("rlm-mlflow run %s: its events could not be read", work.run_id)
                finished(work.no, ("dropped", "internal_error"))
        # One task per run; a child waits until its parent's MLflow run exists (its tag names
        # it), then goes. The limiter is held only while requests are made, never while waiting.
        created = {no: anyio.Event() for no in states}
        limiter = self.limiter or anyio.CapacityLimiter(CONCURRENT_RUNS)
        async with anyio.create_task_group() as tg:
            for no in sorted(states):
                if no not in outcomes:
                    tg.start_soon(self._one_run, states[no], by_no[no], created, finished, limiter)

    async def _one_run(
        self,
        state: RunState,
        work: RunWork,
        created: dict[int, anyio.Event],
        finished: Callable[[int, Outcome], None],
        limiter: AbstractAsyncContextManager[Any],
    ) -> None:
        parent = created.get(state.parent_no) if state.parent_no is not None else None
        if parent is not None:
            await parent.wait()
            if self._parent_not_created(state):
                # Tried in this cycle and failed: the child waits for it (kept for replay, which
                # creates the parent first), so that it is never created without its link.
                created[state.no].set()
                self._failed(f"run {state.run_id}: its parent run is not created yet; kept")
                finished(state.no, DEFERRED)
                return
        if state.ref is not None and self.limiter is not None:
            # Closing: the shared limiter bounds the runs begun at a time; a run created
            # already only waits for its requests' turn (ends go first), never for new runs.
            limiter = contextlib.nullcontext()
        try:
            outcome = await self._send_in_turn(state, work, created[state.no], limiter)
        finally:
            created[state.no].set()
        finished(state.no, SENT if outcome is None else outcome)

    async def _send_in_turn(
        self,
        state: RunState,
        work: RunWork,
        created: anyio.Event,
        limiter: AbstractAsyncContextManager[Any],
    ) -> Outcome | None:
        """The run's job, holding a place among the runs sent at a time; while a create of it
        that had no answer is looked for, its place goes to others between the looks."""
        while True:
            if state.ref is None and state.create_out:
                # A create of it given up on is still out: its answer is waited for here,
                # holding no place (see _create_or_find).
                await anyio.sleep(ANSWER_POLL)
                continue
            try:
                async with limiter:
                    enough_time = self.time_to_create  # False once a close could not end it
                    # (A run whose create may have made it is taken, or looked for, first.)
                    if (
                        state.ref is None
                        and not state.maybe_created
                        and enough_time is not None
                        and not enough_time()
                    ):
                        return DEFERRED  # too late to end it: kept for replay
                    return await self._contain(state, self._send(state, work, created))
            except CreatePending as pending:
                await anyio.sleep(pending.pause)

    def _state_for(self, work: RunWork) -> RunState:
        state = self.runs.get(work.no)
        if state is None:
            first = work.starts[0] if work.starts else None
            key = self.key_of(work.no)
            state = RunState(
                no=work.no,
                key=key,
                run_id=first.run_id if first else work.run_id or key,
                start_ms=(first.timestamp_ns if first else work.first_time()) // 1_000_000,
                look_first=self.replaying or first is None,
                uncertain=self.replaying and work.maybe_sent,
            )
            known = self.ended.get(work.no)
            if known is not None:
                state.ref, state.look_first = known, False
            self.runs[work.no] = state
        for start in work.starts:
            self._take_start(state, start)
        return state

    def _take_start(self, state: RunState, start: RunStart) -> None:
        if start.parent_no is not None and state.parent_no is None:
            state.parent_no = start.parent_no
        state.benchmark = state.benchmark or start.benchmark
        if start.implicit:
            return
        if state.started:
            return
        state.started = True
        state.run_id = start.run_id
        state.name = _convert.run_name(start.run_id, start.task.text if start.task else None)
        reject = self._reject(start.run_id)
        if start.replaced:
            reject("text_replaced", _convert.REPLACED)
        if len(start.run_id) > _convert.MAX_NAME_LENGTH:
            reject(
                "name_cut",
                f"its run id of {len(start.run_id)} characters names its trace (and its run "
                f"when no task does) cut to {_convert.MAX_NAME_LENGTH}",
            )
        try:
            state.params.extend(
                _convert.params_of(
                    environment=start.environment,
                    task_chars=start.task_chars,
                    params=start.params if isinstance(start.params, dict) else {},
                    reject=reject,
                    skip=functools.partial(self._skip_param, start.run_id),
                )
            )
        except Exception:  # never let one run's params stop the others
            logger.exception("rlm-mlflow run %s: its params could not be read", start.run_id)
            self._rejected("internal_error")

    async def _contain(self, state: RunState, job: Any) -> Outcome | None:
        """Run one run's job; turn what it raises into that run's outcome, never further."""
        try:
            await job
        except Postponed:
            logger.debug("rlm-mlflow run %s: not created, too late to end it; kept", state.run_id)
            return DEFERRED
        except StoreRefused:
            return HOLD
        except TransientError as exc:
            self._failed(f"run {state.run_id}: not sent, kept for replay: {exc}")
            return DEFERRED
        except PermanentError as exc:
            if exc.code == TOO_LARGE:
                # A request of the run's own (its create, the look for it by key, its end, a
                # read), or a batch of one small item, refused for its size by something on
                # the way: that says nothing about the run's data, and such a request cannot
                # be split. Kept for replay.
                self._failed(f"run {state.run_id}: not sent, kept for replay: {exc}")
                return DEFERRED
            state.refused = state.refused or str(exc)
            self._failed(f"run {state.run_id}: MLflow refused it: {exc}")
            return ("dropped", "refused")
        except (anyio.get_cancelled_exc_class(), CreatePending):
            raise
        except Exception:
            logger.exception(
                "rlm-mlflow run %s: unexpected error; its events are kept", state.run_id
            )
            self._rejected("internal_error")
            return DEFERRED
        return None

    # -- sending a run's data ------------------------------------------------------------------

    async def _send(self, state: RunState, work: RunWork, created: anyio.Event) -> None:
        await self._ensure_run(state)
        created.set()  # its children may go
        assert state.ref is not None
        if len(work.steps) > 200:
            # Converting thousands of steps takes milliseconds: not on an event loop that
            # may be the agent's own (``async with``).
            metrics = await anyio.to_thread.run_sync(self._metrics_of, state, work.steps)
        else:
            metrics = self._metrics_of(state, work.steps)
        end = work.end
        # An evaluation run's metrics are its cases' aggregates (the traces exporter's).
        if end is not None and not state.ended and end.status == "FINISHED" and not state.benchmark:
            metrics.extend(self._summary_of(state, end))
        tags: list[tuple[str, str]] = []
        if state.parent_pending:
            parent = await self._parent_uuid(state)
            if parent is not None:
                tags.append((PARENT_TAG, parent))
        params = list(state.params)
        uncertain = work.maybe_sent

        def out() -> None:  # a request with its points went out (see Call.when_out)
            work.maybe_sent = True

        async def batches() -> None:
            nonlocal metrics
            if uncertain and metrics:  # a request with some of them went out unanswered
                sent = None if self.in_flight is None else self.in_flight.get(work.no, set())
                metrics = await self._not_yet_stored(state, metrics, sent)
            known, state.stored_latest = state.stored_latest, None  # unknown while this goes
            await self._log_batches(state, metrics, params, tags, out)
            if known is not None:
                # Stored now: each metric's latest point is the later of the two (never earlier
                # than the truth, so a later check reads what it must).
                for m in metrics:
                    latest = known.get(m.key)
                    if latest is None or (m.step, m.timestamp_ms) > latest:
                        known[m.key] = (m.step, m.timestamp_ms)
                state.stored_latest = known
            state.sent_params.extend(params)
            del state.params[: len(params)]

        if end is None or state.ended or work.end_sent:
            await batches()
            return
        end_by = self.end_by() if self.end_by is not None else None
        if end_by is not None:
            # Closing against a deadline: the end goes after the batch's answer (a reader never
            # sees the run ended without its steps and summary) while the deadline leaves it
            # time; past ``end_by`` it goes beside the batch still out (or the reads that check
            # what an unanswered request stored), so that the run is ended in MLflow with its
            # true status even when its points miss the deadline (those are kept for replay,
            # which logs them to the ended run).
            try:
                await _first_then(batches(), self._finish(state, end), end_by)
            finally:
                # The end stored while the batch failed: what is sent again is the batch.
                work.end_sent = state.ended
        else:
            await batches()
            await self._finish(state, end)
        began, state.create_began = state.create_began, None
        if began is not None and self.ended_in is not None:
            self.ended_in(time.monotonic() - began)

    def _metrics_of(self, state: RunState, steps: Iterable[Step]) -> list[Metric]:
        reject = self._reject(state.run_id)
        metrics: list[Metric] = []
        for step in steps:
            number = _convert.step_number(step.step)
            if number is None and _convert.out_of_range(step.step):
                # A step number MLflow cannot store: its points would collide with real
                # steps under any stand-in number, so they are left out (counted).
                reject(
                    "bad_step",
                    f"step {describe(step.step)} does not fit MLflow's int64; its metrics skipped",
                )
                continue
            if number is None:
                number = state.last_step + 1
                reject(
                    "bad_step",
                    f"step {describe(step.step)} is not a whole number; using {number}",
                )
            state.last_step = max(state.last_step, number)
            rewards: tuple[tuple[str, Any], ...] = (
                ("step_reward", step.reward),
                ("cumulative_reward", step.cumulative_reward),
            )
            if step.reward is None and step.cumulative_reward is None:
                rewards = ()  # a runtime without rewards (DSPy): not an error, nothing to log
            for name, raw in rewards:
                value, why = _convert.metric_value(raw)
                if why is None:
                    assert value is not None
                    metrics.append(Metric(name, value, step.timestamp_ns // 1_000_000, number))
                else:
                    reject("bad_metric", f"step {number}: {name} skipped: {why}")
            usage = step.detail.usage if step.detail is not None else None
            if usage is not None:
                at = step.timestamp_ns // 1_000_000
                metrics.extend(
                    Metric(f"step_{name}", float(count), at, number)
                    for name, count in _token_counts(usage)
                )
        return metrics

    def _summary_of(self, state: RunState, end: RunEnd) -> list[Metric]:
        reject = self._reject(state.run_id)
        if end.replaced:
            reject("text_replaced", _convert.REPLACED)
        metrics: list[Metric] = []
        completed: Any = end.completed
        if type(completed) in (bool, int, float):
            completed = float(bool(completed))
        steps: Any = end.steps if end.steps is not None else state.last_step + 1
        for name, raw in (
            ("completed", completed),
            ("steps", steps),
            ("total_reward", end.total_reward),
        ):
            if raw is None:
                continue
            value, why = _convert.metric_value(raw)
            if why is None:
                assert value is not None
                metrics.append(Metric(name, value, end.timestamp_ns // 1_000_000, 0))
            else:
                reject("bad_metric", f"summary metric {name} skipped: {why}")
        if end.usage:
            at = end.timestamp_ns // 1_000_000
            metrics.extend(
                Metric(name, float(count), at, 0) for name, count in _token_counts(end.usage)
            )
        return metrics

    async def _not_yet_stored(
        self, state: RunState, metrics: list[Metric], sent: set[int] | None
    ) -> list[Metric]:
        """After a lost answer: only the points the store does not hold already.

        Only points that went out (``sent``: their times, when known) may be stored; and when
        the run's latest stored points are known from the answer that found (or created) it, a
        point past its metric's latest one, or of a metric the run does not hold, cannot be.
        Only the steps of points that may be stored are read back (see stored_points)."""
        assert state.ref is not None
        run_uuid = state.ref.run_uuid
        latest = state.stored_latest
        maybe = [
            m
            for m in metrics
            if (sent is None or m.timestamp_ms in sent)
            and (latest is None or (m.key in latest and (m.step, m.timestamp_ms) <= latest[m.key]))
        ]
        if not maybe:
            return metrics
        stored: set[Metric] = set()

        async def read(key: str) -> None:
            points = [m for m in maybe if m.key == key]
            stored.update(
                await self.caller.call(
                    "read metric history", stored_points, self.transport, run_uuid, points
                )
            )

        # One metric's history per request: all of them at once, a round trip in all.
        await _together(*(read(key) for key in sorted({m.key for m in maybe})))
        return [m for m in metrics if m not in stored]

    async def _log_batches(
        self,
        state: RunState,
        metrics: Sequence[Metric],
        params: Sequence[tuple[str, str]],
        tags: Sequence[tuple[str, str]],
        out: Callable[[], None],
    ) -> None:
        for chunk_metrics, chunk_params, chunk_tags in _chunks(metrics, params, tags):
            await self._log_batch(state, chunk_metrics, chunk_params, chunk_tags, out)

    async def _log_batch(
        self,
        state: RunState,
        metrics: Sequence[Metric],
        params: Sequence[tuple[str, str]],
        tags: Sequence[tuple[str, str]],
        out: Callable[[], None],
    ) -> None:
        """Send one batch; when MLflow refuses it, split it until the refused items are alone.
        ``out`` is called as soon as a request with its items goes out."""
        if not (metrics or params or tags):
            return
        assert state.ref is not None
        run_uuid = state.ref.run_uuid
        transport = self.transport
        pending = list(metrics)
        written = False  # an attempt's answer was lost: the store may hold its points already

        def attempt() -> None:
            # On a thread. Exactly once must not depend on the store deduplicating points (a
            # file store does not): after a lost answer, send only what it does not hold.
            nonlocal pending, written
            if written and pending:
                stored = stored_points(transport, run_uuid, pending)
                pending = [m for m in pending if m not in stored]
            call = current_call()
            if call is None:
                out()
            else:
                call.when_out(out)  # not before: one waiting for its turn is not in doubt
            try:
                transport.log_batch(run_uuid, metrics=pending, params=params, tags=tags)
            except TransientError as exc:
                written = written or exc.maybe_committed
                raise

        try:
            await self.caller.call("log batch", attempt)
            return
        except StoreRefused:
            raise
        except PermanentError as exc:
            if exc.code in _WHOLE_RUN_CODES:
                resend = await self._run_gone(state, exc)
                await self._log_batch(state, pending, [*resend, *params], tags, out)
                return
            size = len(metrics) + len(params) + len(tags)
            if (
                size <= 1
                and exc.code == TOO_LARGE
                and _item_chars(metrics, params, tags) < SMALL_ITEM
            ):
                raise  # a gateway's 413 on everything: the run's work is kept for replay
            if size <= 1:
                self.counts.refused += 1
                what = metrics[0] if metrics else (params[0] if params else tags[0])
                self._failed(f"run {state.run_id}: MLflow refused {what}: {exc}")
                return
            # Halve the items (tags, then params, then metrics) until the refused ones stand alone.
            items: list[tuple[str, Any]] = [
                *(("t", t) for t in tags),
                *(("p", p) for p in params),
                *(("m", m) for m in metrics),
            ]
            half = size // 2
            for part in (items[:half], items[half:]):
                await self._log_batch(
                    state,
                    [x for kind, x in part if kind == "m"],
                    [x for kind, x in part if kind == "p"],
                    [x for kind, x in part if kind == "t"],
                    out,
                )

    async def _run_gone(self, state: RunState, exc: PermanentError) -> list[tuple[str, str]]:
        """The run refuses writes: its experiment was deleted (blocked), the run was deleted
        (refused), or the store was replaced (the run is created again: the params it had
        are returned, to be sent again)."""
        if exc.code == "RUN_NOT_ACTIVE":
            await self._check_experiment()
            raise PermanentError(f"run {state.run_id} was deleted in MLflow", code=exc.code)
        if state.ref is None or exc.code != "RESOURCE_DOES_NOT_EXIST":
            raise exc
        self._vanished("run", state.run_id)
        state.ref, state.answered = None, None
        state.look_first = True
        self.forget_experiment()
        await self._ensure_run(state)
        return list(state.sent_params)

    async def _finish(self, state: RunState, end: RunEnd) -> None:
        assert state.ref is not None
        ref = state.ref
        if end.run_path:
            try:
                await self.caller.call(
                    "log artifact", self.transport.log_artifact, ref, end.run_path
                )
            except StoreRefused:
                raise
            except PermanentError as exc:
                self._rejected("artifact")
                self.warnings.warn(
                    "artifact", "rlm-mlflow run %s: artifact not uploaded: %s", end.run_id, exc
                )
        if self.replaying and end.internal and not state.created_here:
            status = await self.caller.call(
                "read run status", self.transport.run_status, ref.run_uuid
            )
            if status is not None and status != "RUNNING":
                state.ended = True  # ended by someone else meanwhile: never changed here
                self._forget(state)
                return
        await self._repair(state)
        if self.replaying and not state.created_here and ref.status == end.status:
            # Found ended so when replay looked for it: this end landed before (a close sent it
            # beside a batch that then missed the deadline). Not sent again.
            state.ended = True
            self._forget(state)
            return
        await self.caller.call(
            "end run",
            functools.partial(
                self.transport.set_terminated,
                ref.run_uuid,
                status=end.status,
                end_time_ms=end.timestamp_ns // 1_000_000,
            ),
        )
        state.ended = True
        self.counts.runs_ended += 1
        if self.replaying and end.internal and end.status == "KILLED":
            self.killed += 1  # not a FAILED end a closing sink wrote to its journal
        self._forget(state)

    # -- errors --------------------------------------------------------------------------------

    def _skip_param(self, run_id: str, key: str, value: object) -> None:
        # Documented behaviour (RLM Code sends lists and dicts as params on every run), not
        # bad input: counted, and said at INFO level only.
        self._rejected("param_not_scalar")
        self.warnings.warn(
            "param_not_scalar",
            "rlm-mlflow run %s: param %r skipped: MLflow params are scalars, this one is %s",
            run_id,
            key,
            describe(value),
            level=logging.INFO,
        )


async def _together(*jobs: Coroutine[Any, Any, None]) -> None:
    """Run ``jobs`` at once; each runs to its own end whatever the others do, then the first
    failure (in the order given) is raised as it was."""
    failures: list[tuple[int, Exception]] = []

    async def one(at: int, job: Coroutine[Any, Any, None]) -> None:
        try:
            await job
        except Exception as exc:  # cancellation passes: it is the caller's
            failures.append((at, exc))

    async with anyio.create_task_group() as tg:
        for at, job in enumerate(jobs):
            tg.start_soon(one, at, job)
    if failures:
        raise min(failures, key=lambda failure: failure[0])[1]


async def _first_then(
    first: Coroutine[Any, Any, None], then: Coroutine[Any, Any, None], by: float
) -> None:
    """Run ``first``, and ``then`` once ``first`` is over or at ``by`` (time.monotonic()),
    whichever comes first, ``first`` going on meanwhile. Each runs to its own end whatever the
    other does; then the first failure (``first``'s before ``then``'s) is raised as it was."""
    over = anyio.Event()

    async def run_first() -> None:
        try:
            await first
        finally:
            over.set()

    async def run_then() -> None:
        with anyio.move_on_after(max(0.0, by - time.monotonic())):
            await over.wait()
        await then

    await _together(run_first(), run_then())


def stored_points(transport: Transport, run_uuid: str, points: Sequence[Metric]) -> set[Metric]:
    """On a thread: those of ``points`` the store holds. Each metric is read over the steps
    the points cover, in windows of at most :data:`RANGE_STEPS` steps (one bounded request
    each: a lost batch of a 100,000-step run never reads its whole history); the whole
    history only where the store cannot read a range, or the points are scattered over more
    than :data:`RANGE_WINDOWS` windows."""
    stored: set[Metric] = set()
    ranged = transport if isinstance(transport, RangeReads) else None
    for key in sorted({m.key for m in points}):
        windows = _windows(sorted({m.step for m in points if m.key == key}))
        found: list[Metric] | None = None
        if ranged is not None and len(windows) <= RANGE_WINDOWS:
            found = []
            for low, high in windows:
                part = ranged.metric_history_range(run_uuid, key, low, high)
                if part is None:
                    found = None
                    break
                found.extend(part)
        if found is None:
            found = transport.metric_history(run_uuid, key)
        stored.update(found)
    return {m for m in points if m in stored}


def _windows(steps: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted steps as ``(first, last)`` windows, each spanning fewer than RANGE_STEPS."""
    windows: list[tuple[int, int]] = []
    for step in steps:
        if windows and step - windows[-1][0] < RANGE_STEPS:
            windows[-1] = (windows[-1][0], step)
        else:
            windows.append((step, step))
    return windows


def _token_counts(usage: Usage) -> list[tuple[str, int]]:
    return [
        ("input_tokens", usage.input_tokens),
        ("output_tokens", usage.output_tokens),
        ("total_tokens", usage.total_tokens),
    ]


def _chunks(
    metrics: Sequence[Metric], params: Sequence[tuple[str, str]], tags: Sequence[tuple[str, str]]
) -> Iterable[tuple[Sequence[Metric], Sequence[tuple[str, str]], Sequence[tuple[str, str]]]]:
    """Split into requests within MLflow's limits: tags and params first, metrics in order."""
    p_size, m_size = _convert.MAX_PARAMS_PER_BATCH, _convert.MAX_METRICS_PER_BATCH
    t_size = _convert.MAX_TAGS_PER_BATCH
    p_start = m_start = t_start = 0
    while p_start < len(params) or m_start < len(metrics) or t_start < len(tags):
        chunk_tags = tags[t_start : t_start + t_size]
        chunk_params = params[p_start : p_start + p_size]
        room = min(m_size, _convert.MAX_ENTITIES_PER_BATCH - len(chunk_params) - len(chunk_tags))
        chunk_metrics = metrics[m_start : m_start + room]
        t_start += len(chunk_tags)
        p_start += len(chunk_params)
        m_start += len(chunk_metrics)
        yield chunk_metrics, chunk_params, chunk_tags

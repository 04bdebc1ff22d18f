"""The worker: drains the queue to MLflow in batches, one run's writes in order, with retries.

It is one anyio task. In a sync program it runs on a background thread under ``anyio.run``; in
an async program it runs in the caller's event loop (asyncio or trio). Every blocking MLflow call
goes to a worker thread, so the event loop it shares with the agent is never blocked, and a
shutdown deadline can abandon a call that hangs.

One drain cycle: wait until a batch is ready or ``flush_interval`` has passed; take what is queued;
create the runs that started (parents first: they were queued first); send each run's params and
metrics in as few ``log_batch`` requests as MLflow's limits allow; end the runs that ended.
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
from tenacity import RetryCallState

from . import _convert, _process
from ._buffer import NO_SEQ, EventBuffer, Item
from ._config import COMPONENT_TAG, SinkConfig, redact_text
from ._events import RunEnd, RunStart, Step
from ._exceptions import PermanentError, TransientError
from ._retry import RetryPolicy
from ._stats import Counters, RateLimitedWarnings
from ._transport import KEY_TAG, PARENT_TAG, Metric, RunRef, Transport

logger = logging.getLogger("rlm_mlflow")

T = TypeVar("T")

#: Events taken from the queue in one drain cycle.
TAKE_LIMIT = 20_000
#: Runs whose data is sent at the same time.
CONCURRENT_RUNS = 2
#: A run's steps in one cycle beyond which they are converted on a worker thread.
_CONVERT_ON_THREAD = 200
#: Codes for which splitting a refused batch cannot help: the whole run is refused.
_WHOLE_BATCH_CODES = frozenset(
    {
        "PERMISSION_DENIED",
        "UNAUTHENTICATED",
        "RESOURCE_DOES_NOT_EXIST",
        "ENDPOINT_NOT_FOUND",
    }
)


@dataclass(slots=True)
class RunState:
    """What the worker knows of one run."""

    start: RunStart
    ref: RunRef | None = None
    params: list[tuple[str, str]] = field(default_factory=list)  # not yet sent
    refused: bool = False  # creation refused for good: its events are dropped
    create_tried: bool = False  # a create may have reached the server: look before creating again
    last_step: int = -1
    ended: bool = False


@dataclass(slots=True)
class RunWork:
    """One run's share of a drain cycle, in queue order."""

    key: str
    events: int = 0
    seqs: list[int] = field(default_factory=list)  # journal records of these events
    start: RunStart | None = None
    steps: list[Step] = field(default_factory=list)
    end: RunEnd | None = None


class Worker:
    def __init__(
        self,
        config: SinkConfig,
        *,
        buffer: EventBuffer,
        counters: Counters,
        warnings: RateLimitedWarnings,
        transport_factory: Callable[[], Transport],
        replaying: bool = False,
    ) -> None:
        self._config = config
        # Replaying a journal, any run may exist already: always look before creating.
        self._replaying = replaying
        self._buffer = buffer
        self._counters = counters
        self._warnings = warnings
        self._transport_factory = transport_factory
        self._policy = RetryPolicy(
            deadline=config.retry_deadline,
            initial=config.retry_initial,
            max_wait=config.retry_max_wait,
        )
        self.transport: Transport | None = None
        self.experiment_id: str | None = None
        self.runs: dict[str, RunState] = {}
        self.progress = threading.Condition()
        self.stop_requested = threading.Event()
        self.stopped = threading.Event()
        self.shutdown_deadline: float | None = None  # time.monotonic() value
        self.unavailable: str | None = None  # why the store cannot be used at all
        self.describe: str | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Drain until a stop is requested and the queue is empty, or the deadline passes."""
        try:
            async with anyio.create_task_group() as tg:
                with anyio.CancelScope() as scope:
                    tg.start_soon(self._watch_stop, scope)
                    await self._drain_loop()
                tg.cancel_scope.cancel()
        except Exception:  # never let the worker die silently
            logger.exception("rlm-mlflow worker failed; data still queued is lost")
        finally:
            self._abandon_rest()
            transport, self.transport = self.transport, None
            if transport is not None:
                try:
                    transport.close()
                except Exception:
                    logger.debug("closing the transport failed", exc_info=True)
            self.stopped.set()
            self._notify()

    async def _watch_stop(self, scope: anyio.CancelScope) -> None:
        """Cancel the drain when the shutdown deadline passes, wherever it is waiting."""
        await anyio.to_thread.run_sync(self.stop_requested.wait, abandon_on_cancel=True)
        deadline = self.shutdown_deadline
        if deadline is not None:
            scope.deadline = anyio.current_time() + max(0.0, deadline - time.monotonic())

    async def _drain_loop(self) -> None:
        wake = self._buffer.wake
        trigger = self._config.batch_trigger
        while True:
            # Sleep until a batch is ready, a flush or close asks, or the interval is up.
            idle = len(self._buffer) < trigger and not wake.is_set()
            if idle and not self.stop_requested.is_set():
                await anyio.to_thread.run_sync(
                    wake.wait, self._config.flush_interval, abandon_on_cancel=True
                )
            wake.clear()
            events = self._buffer.take(TAKE_LIMIT)
            if events:
                await self._process(events)
            elif self.stop_requested.is_set():
                return

    def _abandon_rest(self) -> None:
        """At the end: what is still queued is not sent now; count it and say where it is."""
        left = self._buffer.drain_all()
        journaled = sum(1 for seq, _ in left if seq != NO_SEQ)
        spilled = self._buffer.spilled
        counters = self._counters
        counters.processed += len(left) + spilled
        counters.deferred += journaled + spilled
        if len(left) > journaled:
            counters.dropped["shutdown"] += len(left) - journaled
        if left or spilled:
            journal = self._buffer.journal
            logger.warning(
                "rlm-mlflow stopped with %d events not sent (shutdown deadline or failure)%s",
                len(left) + spilled,
                f"; {journaled + spilled} kept in {journal.folder} for 'rlm-mlflow replay'"
                if journal is not None and journaled + spilled
                else "",
            )

    def _notify(self) -> None:
        with self.progress:
            self.progress.notify_all()

    # -- one drain cycle -------------------------------------------------------------------

    async def _process(self, events: list[Item]) -> None:
        works: dict[str, RunWork] = {}
        for seq, event in events:
            work = works.get(event.key)
            if work is None:
                work = works[event.key] = RunWork(event.key)
            work.events += 1
            if seq != NO_SEQ:
                work.seqs.append(seq)
            if type(event) is Step:
                work.steps.append(event)
            elif type(event) is RunStart:
                work.start = event
            else:
                assert isinstance(event, RunEnd)
                work.end = event
        try:
            if await self._ensure_experiment():
                for work in works.values():
                    if work.start is not None:
                        await self._open(work.start)
                # Runs are independent: send a few at once, so that preparing one request
                # overlaps another's round trip. Each run's own writes stay in order.
                limiter = anyio.CapacityLimiter(CONCURRENT_RUNS)
                async with anyio.create_task_group() as tg:
                    for work in works.values():
                        tg.start_soon(self._send_and_settle, work, limiter)
        except anyio.get_cancelled_exc_class():
            raise
        except Exception:
            logger.exception("rlm-mlflow could not process a batch of %d events", len(events))
        finally:
            for work in works.values():
                if work.events:
                    self._settle(work, sent=False)
            self._notify()

    async def _send_and_settle(self, work: RunWork, limiter: anyio.CapacityLimiter) -> None:
        async with limiter:
            self._settle(work, sent=await self._send(work))
            self._notify()

    def _settle(self, work: RunWork, *, sent: bool) -> None:
        """Count a run's share of a cycle; mark its journal records done, or keep them."""
        counters = self._counters
        counters.processed += work.events
        journal = self._buffer.journal
        if sent:
            counters.sent += work.events
            if journal is not None and work.seqs:
                journal.mark_done(work.seqs)
        elif journal is not None and len(work.seqs) == work.events:
            counters.deferred += work.events  # still in the journal: replay sends it
        else:
            counters.dropped["send_failed"] += work.events
        work.events = 0
        work.seqs = []

    async def _ensure_experiment(self) -> bool:
        if self.experiment_id is not None:
            return True
        if self.unavailable is not None:
            return False
        try:
            if self.transport is None:
                self.transport = await anyio.to_thread.run_sync(self._transport_factory)
                self.describe = self.transport.describe()
                if "mlflow" in sys.modules:  # its exit hook was just registered: ours goes first
                    _process.reorder_exit_hook()
            transport = self.transport
            self.experiment_id = await self._call(
                "get or create experiment",
                transport.get_or_create_experiment,
                self._config.experiment,
            )
            return True
        except PermanentError as exc:
            self.unavailable = str(exc)
            self._counters.last_error = str(exc)
            logger.error("rlm-mlflow cannot use MLflow: %s; events are dropped", exc)
        except TransientError as exc:
            logger.warning("rlm-mlflow cannot reach MLflow yet: %s", exc)
        except ImportError as exc:
            self.unavailable = f"mlflow cannot be imported: {exc}"
            logger.error("rlm-mlflow: %s", self.unavailable)
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as exc:
            self.unavailable = f"{type(exc).__name__}: {exc}"
            logger.exception("rlm-mlflow cannot set up its MLflow transport")
        return False

    # -- opening a run -------------------------------------------------------------------------

    def _reject(self, run_id: str) -> Callable[[str, str], None]:
        def reject(reason: str, message: str) -> None:
            self._counters.rejected[reason] += 1
            self._warnings.warn(reason, "rlm-mlflow run %s: %s", run_id, message)

        return reject

    def _skip_param(self, run_id: str, key: str, value: object) -> None:
        self._reject(run_id)(
            "param_not_scalar",
            f"param {key!r} skipped: MLflow params are scalars, this one is a "
            f"{type(value).__name__}",
        )

    async def _open(self, start: RunStart) -> None:
        state = self.runs.get(start.key)
        if state is None:
            state = self.runs[start.key] = RunState(start, create_tried=self._replaying)
        reject = self._reject(start.run_id)
        state.params.extend(
            _convert.params_of(
                environment=start.environment,
                task_chars=start.task_chars,
                params=start.params,
                reject=reject,
                skip=functools.partial(self._skip_param, start.run_id),
            )
        )
        await self._create(state)

    async def _create(self, state: RunState) -> bool:
        """Create the MLflow run of ``state`` if it has none yet; False when it cannot be had."""
        if state.ref is not None:
            return True
        if state.refused:
            return False
        start = state.start
        transport = self.transport
        experiment_id = self.experiment_id
        assert transport is not None
        assert experiment_id is not None
        reject = self._reject(start.run_id)
        tags = [
            ("run_id", _convert.tag_value(start.run_id, "run_id", reject)),
            ("component", COMPONENT_TAG),
            (KEY_TAG, start.key),
        ]
        if start.parent_key is not None:
            parent = self.runs.get(start.parent_key)
            if parent is not None and parent.ref is not None:
                tags.append((PARENT_TAG, parent.ref.run_uuid))
            else:
                self._warnings.warn(
                    "parent_missing",
                    "rlm-mlflow run %s: its parent run was not created; logged without parent",
                    start.run_id,
                )

        def create() -> RunRef:
            if state.create_tried:  # an earlier attempt may have landed: find it
                found = transport.find_run(experiment_id, start.key)
                if found is not None:
                    return found
            state.create_tried = True
            return transport.create_run(
                experiment_id,
                run_name=start.run_id[:250] or "run",
                start_time_ms=start.timestamp_ms,
                tags=tags,
            )

        try:
            state.ref = await self._call("create run", create)
        except PermanentError as exc:
            state.refused = True
            self._failed(f"run {start.run_id}: MLflow refused to create it: {exc}")
            return False
        except TransientError as exc:
            self._failed(f"run {start.run_id}: could not be created, will try again: {exc}")
            return False
        self._counters.runs_created += 1
        journal = self._buffer.journal
        if journal is not None:
            journal.note_run("S", start.key, start.run_id)
        return True

    # -- sending a run's data ------------------------------------------------------------------

    def _metrics_of(self, state: RunState, steps: Iterable[Step]) -> list[Metric]:
        reject = self._reject(state.start.run_id)
        metrics: list[Metric] = []
        for step in steps:
            number = _convert.step_number(step.step)
            if number is None:
                number = state.last_step + 1
                reject("bad_step", f"step {step.step!r} is not a whole number; using {number}")
            state.last_step = max(state.last_step, number)
            for name, raw in (
                ("step_reward", step.reward),
                ("cumulative_reward", step.cumulative_reward),
            ):
                value, why = _convert.metric_value(raw)
                if why is None:
                    assert value is not None
                    metrics.append(Metric(name, value, step.timestamp_ms, number))
                else:
                    reject("bad_metric", f"step {number}: {name} skipped: {why}")
        return metrics

    def _summary_of(self, end: RunEnd, state: RunState) -> list[Metric]:
        reject = self._reject(end.run_id)
        metrics: list[Metric] = []
        completed: Any = end.completed
        if isinstance(completed, bool | int | float):
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
                metrics.append(Metric(name, value, end.timestamp_ms, 0))
            else:
                reject("bad_metric", f"summary metric {name} skipped: {why}")
        return metrics

    async def _send(self, work: RunWork) -> bool:
        state = self.runs.get(work.key)
        if state is None:
            # Replay: a run whose start was sent (and its record removed) long ago. Its key
            # tag finds it; only if it was never created is it created now, without params.
            first = work.steps[0] if work.steps else work.end
            assert first is not None
            start = RunStart(first.key, first.run_id, first.timestamp_ms, None, None, {}, None)
            state = self.runs[work.key] = RunState(start, create_tried=True)
        if not await self._create(state):
            return False
        assert state.ref is not None
        if len(work.steps) > _CONVERT_ON_THREAD:
            # Converting thousands of steps takes milliseconds: not on an event loop that
            # may be the agent's own (``async with``).
            metrics = await anyio.to_thread.run_sync(self._metrics_of, state, work.steps)
        else:
            metrics = self._metrics_of(state, work.steps)
        if work.end is not None and not state.ended and work.end.status == "FINISHED":
            metrics.extend(self._summary_of(work.end, state))
        params, state.params = state.params, []
        ok = await self._log_batches(state, metrics, params)
        if work.end is not None and not state.ended:
            ok = await self._finish(state, work.end) and ok
        return ok

    async def _log_batches(
        self, state: RunState, metrics: Sequence[Metric], params: Sequence[tuple[str, str]]
    ) -> bool:
        ok = True
        for chunk_metrics, chunk_params in _chunks(metrics, params):
            ok = await self._log_batch(state, chunk_metrics, chunk_params) and ok
        return ok

    async def _log_batch(
        self, state: RunState, metrics: Sequence[Metric], params: Sequence[tuple[str, str]]
    ) -> bool:
        """Send one batch; when MLflow refuses it, split it until the refused items are alone."""
        if not metrics and not params:
            return True
        transport = self.transport
        assert transport is not None
        assert state.ref is not None
        run_uuid = state.ref.run_uuid
        try:
            await self._call(
                "log batch",
                functools.partial(transport.log_batch, run_uuid, metrics=metrics, params=params),
            )
            return True
        except TransientError as exc:
            self._failed(
                f"run {state.start.run_id}: {len(metrics)} metrics, "
                f"{len(params)} params not sent after retries: {exc}"
            )
            return False
        except PermanentError as exc:
            size = len(metrics) + len(params)
            if size <= 1 or exc.code in _WHOLE_BATCH_CODES:
                self._counters.permanent_failures += size
                what = metrics[0] if metrics else (params[0] if params else None)
                self._failed(
                    f"run {state.start.run_id}: MLflow refused "
                    f"{what if size == 1 else f'{size} items'}: {exc}"
                )
                return size <= 1  # one bad item is counted; the rest of the run is fine
            # Halve the items (params first, then metrics) until the refused ones stand alone.
            half = size // 2
            p_cut, m_cut = min(half, len(params)), max(0, half - len(params))
            first = await self._log_batch(state, metrics[:m_cut], params[:p_cut])
            second = await self._log_batch(state, metrics[m_cut:], params[p_cut:])
            return first and second

    async def _finish(self, state: RunState, end: RunEnd) -> bool:
        transport = self.transport
        assert transport is not None
        assert state.ref is not None
        ref = state.ref
        ok = True
        if end.run_path:
            try:
                await self._call("log artifact", transport.log_artifact, ref, end.run_path)
            except PermanentError as exc:
                self._counters.rejected["artifact"] += 1
                self._warnings.warn(
                    "artifact", "rlm-mlflow run %s: artifact not uploaded: %s", end.run_id, exc
                )
            except TransientError as exc:
                ok = False
                self._failed(f"run {end.run_id}: artifact not uploaded after retries: {exc}")
        try:
            await self._call(
                "end run",
                functools.partial(
                    transport.set_terminated,
                    ref.run_uuid,
                    status=end.status,
                    end_time_ms=end.timestamp_ms,
                ),
            )
        except (PermanentError, TransientError) as exc:
            self._failed(f"run {end.run_id}: could not be ended: {exc}")
            return False
        state.ended = True
        self._counters.runs_ended += 1
        journal = self._buffer.journal
        if journal is not None:
            journal.note_run("E", state.start.key, state.start.run_id)
        return ok

    # -- calls and retries ---------------------------------------------------------------------

    def _failed(self, message: str) -> None:
        text = redact_text(message, self._config.tracking_uri)
        self._counters.last_error = text
        logger.warning("rlm-mlflow %s", text)

    async def _call(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        def before_sleep(state: RetryCallState) -> None:
            self._counters.retries += 1
            outcome = state.outcome
            error = outcome.exception() if outcome is not None else None
            self._counters.last_error = redact_text(str(error), self._config.tracking_uri)
            wait = state.upcoming_sleep
            self._warnings.warn(
                "retry", "rlm-mlflow %s failed (%s); retrying in %.1f s", what, error, wait
            )

        retrying = self._policy.retrying(sleep=self._sleep, before_sleep=before_sleep)
        async for attempt in retrying:
            with attempt:
                self._counters.requests += 1
                return await anyio.to_thread.run_sync(
                    functools.partial(fn, *args), abandon_on_cancel=True
                )
        raise AssertionError("unreachable")  # pragma: no cover

    async def _sleep(self, seconds: float) -> None:
        """Back off; a shutdown request cuts the wait short only at its deadline.

        The stop watcher cancels everything when the deadline passes, so waiting here can never
        outlive it. Until a stop is requested the wait sits on a thread, where a stop can wake it.
        """
        until = time.monotonic() + seconds
        if not self.stop_requested.is_set():
            await anyio.to_thread.run_sync(
                self.stop_requested.wait, seconds, abandon_on_cancel=True
            )
        left = until - time.monotonic()
        if left > 0:
            await anyio.sleep(left)


def _chunks(
    metrics: Sequence[Metric], params: Sequence[tuple[str, str]]
) -> Iterable[tuple[Sequence[Metric], Sequence[tuple[str, str]]]]:
    """Split into requests within MLflow's limits, params first, metrics in order."""
    p_size, m_size = _convert.MAX_PARAMS_PER_BATCH, _convert.MAX_METRICS_PER_BATCH
    p_start = m_start = 0
    while p_start < len(params) or m_start < len(metrics):
        chunk_params = params[p_start : p_start + p_size]
        room = min(m_size, _convert.MAX_ENTITIES_PER_BATCH - len(chunk_params))
        chunk_metrics = metrics[m_start : m_start + room]
        p_start += len(chunk_params)
        m_start += len(chunk_metrics)
        yield chunk_metrics, chunk_params

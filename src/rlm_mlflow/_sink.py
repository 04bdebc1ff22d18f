"""The sink: RLM Code's hook protocol in front, the pipeline and the worker behind.

A hook reads a few fields, encodes one record, writes it to the journal and the queue
(:mod:`._pipeline`). It never touches the network, never imports mlflow, never takes a lock,
never waits on the worker and never raises. The worker (:mod:`._worker`) does the rest, on the
process's background thread or in the caller's event loop (``async with``).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import anyio
import anyio.to_thread

from . import _runtime
from ._config import (
    Overflow,
    SinkConfig,
    call_timeout,
    config_from_env,
    redact_text,
    redact_uri,
)
from ._pipeline import Pipeline, State
from ._stats import RateLimitedWarnings, SinkStatistics
from ._transports.base import Transport
from ._worker import Worker

logger = logging.getLogger("rlm_mlflow")


_runtime.protect(Pipeline.start, Pipeline.step, Pipeline.end)


def default_transport_factory(tracking_uri: str | None, request_timeout: float) -> Transport:
    """The fastest way to reach the store: plain HTTP for a server, ``MlflowClient`` otherwise."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    if uri is not None and uri.startswith(("http://", "https://")):
        from ._transports.rest import shared_transport

        return shared_transport(uri, timeout=request_timeout)
    from ._transports.client import ClientTransport

    return ClientTransport(uri)


class MLflowSink:
    """An RLM observability sink that sends runs to MLflow without blocking the agent.

    Hooks write each event to a local journal and a bounded queue; a worker drains them to MLflow
    in batches with retries. The worker starts with the first event on a background thread shared
    by every sink of the process, or in your event loop when the sink is used as
    ``async with MLflowSink(...) as sink``. ``close()`` (also run at exit, and on SIGTERM/SIGINT)
    sends what is queued within ``shutdown_timeout`` and ends every run.

    Args:
        enabled: Turn the sink on. Off, every hook returns at once.
        experiment: MLflow experiment name, created when missing.
        tracking_uri: Where MLflow is; ``None`` means ``MLFLOW_TRACKING_URI`` or MLflow's default.
        queue_size: Events that may wait in memory; beyond it they wait in the journal (or, without
            one, step events are dropped by ``overflow``; run starts and ends never are).
        overflow: What a full queue without a journal drops: ``"drop_oldest"`` or
            ``"drop_newest"``.
        flush_interval: Seconds between drains when the queue is not filling up.
        shutdown_timeout: Seconds ``close()`` (and the exit hook) may take at most.
        request_timeout: Seconds one HTTP request may take.
        retry_deadline: Seconds a failing request is retried while the server otherwise answers,
            before its data is kept for replay (an outage is waited out instead).
        batch_trigger: Queued events that wake the worker before ``flush_interval`` is up.
        journal: Write every event to a local write-ahead journal first (default on).
        journal_dir: Where journals live (default ``~/.local/state/rlm-mlflow/journal``).
        journal_fsync: Also flush the journal to the device now and then and when closing
            (power-loss durability).
        handle_signals: On SIGTERM/SIGINT, end open runs KILLED, then run the previous handler.
        traces: Each run also as an MLflow trace: ``"full"`` (code, output, task text),
            ``"metadata"`` (no text: sizes, timings, tokens, status), or ``"off"``.
        session: The session (MLflow's Sessions page) of root runs that get none from
            :func:`rlm_mlflow.session` or RLM Code's chat; at most 250 characters.
        user: Their user, the same way.
        transport: Send through this instead of the default (tests, custom stores).
    """

    name = "mlflow"

    def __init__(
        self,
        enabled: bool = False,
        experiment: str | None = None,
        tracking_uri: str | None = None,
        *,
        queue_size: int | None = None,
        overflow: Overflow | str | None = None,
        flush_interval: float | None = None,
        shutdown_timeout: float | None = None,
        request_timeout: float | None = None,
        retry_deadline: float | None = None,
        retry_initial: float | None = None,
        retry_max_wait: float | None = None,
        batch_trigger: int | None = None,
        journal: bool | None = None,
        journal_dir: str | os.PathLike[str] | None = None,
        journal_fsync: bool | None = None,
        handle_signals: bool | None = None,
        traces: str | None = None,
        span_budget: int | None = None,
        session: str | None = None,
        user: str | None = None,
        transport: Transport | Callable[[], Transport] | None = None,
        config: SinkConfig | None = None,
    ) -> None:
        changes = {
            key: value
            for key, value in {
                "enabled": enabled if config is None else None,
                "experiment": experiment,
                "tracking_uri": tracking_uri,
                "queue_size": queue_size,
                "overflow": overflow,
                "flush_interval": flush_interval,
                "shutdown_timeout": shutdown_timeout,
                "request_timeout": request_timeout,
                "retry_deadline": retry_deadline,
                "retry_initial": retry_initial,
                "retry_max_wait": retry_max_wait,
                "batch_trigger": batch_trigger,
                "journal": journal,
                "journal_dir": os.fspath(journal_dir) if journal_dir is not None else None,
                "journal_fsync": journal_fsync,
                "handle_signals": handle_signals,
                "traces": traces,
                "span_budget": span_budget,
                "session": session,
                "user": user,
            }.items()
            if value is not None
        }
        base = config if config is not None else SinkConfig()
        self.config = base.with_changes(**changes) if changes else base
        self._warnings = RateLimitedWarnings()
        self._pipeline = Pipeline(self.config, self._warnings)
        # Nothing the worker holds may point back at the sink: a sink dropped without close()
        # must be collectable, so that its finalizer can close it.
        self._worker = Worker(
            self.config,
            self._pipeline,
            transport_factory=functools.partial(_make_transport, self.config, transport),
            warnings=self._warnings,
            on_transport_ready=_runtime.after_mlflow_import,
        )
        self._pipeline.on_first_event = functools.partial(_activate, self._worker)
        _runtime.follow_fork(self._worker)  # a child forked before its first event too
        self._task_loop: _runtime.Loop | None = None
        self._loop_thread: int | None = None
        self._task_group: Any = None
        self._finished: anyio.Event | None = None
        self._available = True
        self._detail = redact_uri(self.config.tracking_uri) or "default tracking URI"
        if self.config.enabled and transport is None and not _mlflow_installed():
            self._available = False
            self._pipeline.off = True  # as RLM Code's own sink: every hook returns at once
            self._pipeline.active = False
            self._detail = "mlflow cannot be imported: pip install mlflow-skinny (or mlflow)"
            logger.warning("rlm-mlflow: %s; the sink does nothing", self._detail)
        if self.config.enabled and self.config.handle_signals:
            _runtime.install_signal_handlers()
        if self.config.enabled and self._available:
            _import_ahead(self.config, transport)
        # A sink dropped without close() still ends its runs and releases what it holds.
        weakref.finalize(self, _abandon, self._worker)

    # -- construction from the environment ---------------------------------------------------

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> MLflowSink:
        """A sink configured from ``DSPY_RLM_MLFLOW_*``, ``MLFLOW_TRACKING_URI`` and
        ``RLM_MLFLOW_*``; keyword arguments override the environment."""
        transport = overrides.pop("transport", None)
        return cls(config=config_from_env(env, **overrides), transport=transport)

    # -- the hooks ------------------------------------------------------------------------------

    def on_run_start(
        self, run_id: str, *, task: str, environment: str, params: dict[str, Any]
    ) -> None:
        """A run started: queue the creation of its MLflow run (params, tags, parent link).

        Logs ``environment``, ``task_chars`` (the task's length, never its text) and every
        scalar param; a ``parent_run_id`` naming an open run makes this run its child.
        Returns at once; never raises.
        """
        self._pipeline.start(run_id, task, environment, params)
        if _runtime.deferred_signal is not None:  # a signal came during the hook
            _runtime.run_deferred_signal()

    def on_step(
        self, run_id: str, *, event: dict[str, Any], cumulative_reward: float | None
    ) -> None:
        """A step: queue ``step_reward`` (``event["reward"]``) and ``cumulative_reward`` at
        ``event["step"]``, stamped with the time of this call; a step without rewards (None)
        logs no reward metric. Returns at once; never raises."""
        self._pipeline.step(run_id, event, cumulative_reward)
        if _runtime.deferred_signal is not None:  # a signal came during the hook
            _runtime.run_deferred_signal()

    def on_run_end(self, run_id: str, *, result: Any, run_path: Path | str | None) -> None:
        """A run ended: queue ``completed``, ``steps``, ``total_reward`` (read from ``result``'s
        attributes or keys), the upload of ``run_path`` (a file or a directory) and the end of
        the run (FINISHED). Returns at once; never raises."""
        self._pipeline.end(run_id, result, run_path)
        if _runtime.deferred_signal is not None:  # a signal came during the hook
            _runtime.run_deferred_signal()

    # -- the worker -----------------------------------------------------------------------------

    def _in_worker_loop(self) -> bool:
        loop = self._task_loop
        return (
            self._pipeline.state in (State.TASK, State.CLOSING)
            and loop is not None
            and threading.get_ident() == self._loop_thread
        )

    # -- flushing and closing -------------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything accepted so far has been handled; True if all of it was sent.

        ``timeout`` defaults to ``shutdown_timeout``. From inside the event loop that runs the
        worker, use ``await aflush()`` instead.
        """
        if self._in_worker_loop():
            logger.warning(
                "rlm-mlflow: flush() called inside the worker's event loop; "
                "use 'await sink.aflush()'"
            )
            return False
        timeout = call_timeout(timeout, self.config.shutdown_timeout)
        worker = self._worker
        target = self._pipeline.accepted.value
        lost_before = worker.lost()
        self._request_flush()
        deadline = time.monotonic() + timeout
        with worker.progress:
            while worker.settled() < target and not worker.stopped.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                worker.progress.wait(min(left, 1.0))
        return worker.settled() >= target and worker.lost() == lost_before

    def _request_flush(self) -> None:
        worker = self._worker
        worker.flush_requested = True
        waker = self._pipeline.waker
        if waker is not None:
            waker()

    async def aflush(self, timeout: float | None = None) -> bool:
        """``flush()`` for async code: never blocks the event loop."""
        if not self._in_worker_loop():
            return await anyio.to_thread.run_sync(self.flush, timeout, abandon_on_cancel=True)
        timeout = call_timeout(timeout, self.config.shutdown_timeout)
        worker = self._worker
        target = self._pipeline.accepted.value
        lost_before = worker.lost()
        with anyio.move_on_after(timeout):
            while worker.settled() < target and not worker.stopped.is_set():
                event = worker.cycle_event()
                self._request_flush()
                await event.wait()
        return worker.settled() >= target and worker.lost() == lost_before

    def close(self, timeout: float | None = None) -> None:
        """Send what is queued, end every run (FAILED if it never ended) and stop the worker.

        Returns within ``timeout`` (default ``shutdown_timeout``) whatever the server does.
        Idempotent. From inside the event loop that runs the worker, use ``await aclose()``.
        """
        timeout = call_timeout(timeout, self.config.shutdown_timeout)
        in_loop = self._in_worker_loop()
        worker = self._worker
        _runtime.request_close(worker, time.monotonic() + timeout)
        if in_loop:
            logger.warning(
                "rlm-mlflow: close() called inside the worker's event loop; "
                "the worker stops on its own, use 'await sink.aclose()' to wait"
            )
            return
        if worker.stopped.wait(timeout + 0.5):
            self._log_summary()

    async def aclose(self, timeout: float | None = None) -> None:
        """``close()`` for async code: never blocks the event loop."""
        timeout = call_timeout(timeout, self.config.shutdown_timeout)
        if not self._in_worker_loop():
            await anyio.to_thread.run_sync(self.close, timeout, abandon_on_cancel=True)
            return
        _runtime.request_close(self._worker, time.monotonic() + timeout)
        finished = self._finished
        if finished is not None:
            with anyio.move_on_after(timeout + 0.5):
                await finished.wait()
        if self._worker.stopped.is_set():
            self._log_summary()

    def _log_summary(self) -> None:
        stats = self.statistics()
        lost = sum(stats.dropped.values())
        log = logger.warning if lost else logger.info
        kept = f", {stats.deferred} kept in the journal" if stats.deferred else ""
        log(
            "rlm-mlflow closed: %d events accepted, %d sent%s, %d dropped %s, %d runs ended",
            stats.accepted,
            stats.sent,
            kept,
            lost,
            stats.dropped,
            stats.runs_ended,
        )

    # -- context managers -----------------------------------------------------------------------

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            self._pipeline.end_status = "KILLED"
        self.close()

    async def __aenter__(self) -> Self:
        pipeline = self._pipeline
        if not pipeline.active:
            return self
        with self._worker.transition:
            if pipeline.state is not State.IDLE:
                raise RuntimeError(
                    "this sink's worker is already running; enter 'async with' before any hook"
                )
            pipeline.state = State.TASK
            self._loop_thread = threading.get_ident()
            loop = self._task_loop = _runtime.task_loop()
            worker = self._worker
            worker.loop = loop
            pipeline.waker = lambda: loop.wake(worker)
            _runtime.runtime().register(worker)
        self._finished = anyio.Event()
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self._task_group.start_soon(self._serve, loop)
        return self

    async def _serve(self, loop: _runtime.Loop) -> None:
        """The worker in the caller's loop; only a close stops it, not the host's cancellation
        (the host being cancelled is exactly when the runs must still be ended and sent)."""
        worker = self._worker
        loop.workers.append(worker)
        try:
            with anyio.CancelScope(shield=True):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(_dispatch, loop)
                    await worker.run()
                    tg.cancel_scope.cancel()
        finally:
            _runtime.runtime().unregister(worker)
            loop.waker.close()
            assert self._finished is not None
            self._finished.set()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            self._pipeline.end_status = "KILLED"
        group = self._task_group
        try:
            with anyio.CancelScope(shield=True):
                await self.aclose()
        finally:
            self._task_group = None
            if group is not None:
                group.cancel_scope.cancel()
                await group.__aexit__(None, None, None)

    # -- status -----------------------------------------------------------------------------------

    def statistics(self) -> SinkStatistics:
        """A snapshot of the sink's figures (see :class:`SinkStatistics` for the invariant)."""
        return self._worker.statistics()

    def status(self) -> dict[str, Any]:
        """RLM Code's keys (name, enabled, available, detail, experiment) and live figures."""
        config = self.config
        worker = self._worker
        if not config.enabled:
            health, detail = "off", "disabled (DSPY_RLM_MLFLOW_ENABLED is not set)"
        elif not self._available:
            health, detail = "unavailable", self._detail
        elif worker.unavailable is not None:
            health, detail = "unavailable", worker.unavailable
        elif worker.failure is not None:
            health, detail = "failed", worker.failure
        else:
            health, reason = worker.caller.health()
            detail = reason or worker.describe or self._detail
        status: dict[str, Any] = {
            "name": self.name,
            "enabled": config.enabled,
            "available": health == "ok",
            "detail": redact_text(detail, config.tracking_uri),
            "experiment": config.experiment,
            "state": self._pipeline.state.value,
            "health": health,
        }
        if config.enabled:
            status.update(self.statistics().as_dict())
            status["traces"] = worker.traces.state()
            status["spans_sent"] = worker.traces.spans_sent
            trouble = self._pipeline.journal_trouble()
            if trouble:
                status["journal_problem"] = trouble
        return status

    def __repr__(self) -> str:
        return (
            f"MLflowSink(enabled={self.config.enabled}, experiment={self.config.experiment!r}, "
            f"tracking_uri={redact_uri(self.config.tracking_uri)!r}, "
            f"state={self._pipeline.state.value})"
        )


def _import_ahead(config: SinkConfig, transport: object) -> None:
    """Import now, on the thread building the sink, the modules the worker imports when it starts
    at the first event (the event loop, the HTTP transport: about 0.2 s). Imported by the worker
    instead, they hold the interpreter lock against the agent's first hooks, each of which may
    then wait out a switch interval. MLflow itself (a store other than a server) is not: it takes
    seconds to import, and a sink is built on the agent's own start-up path."""
    try:
        importlib.import_module("anyio._backends._asyncio")
        uri = config.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or ""
        if transport is None and uri.startswith(("http://", "https://")):
            importlib.import_module("rlm_mlflow._transports.rest")
    except Exception:  # the worker meets the same failure and says so
        logger.debug("rlm-mlflow: importing ahead failed", exc_info=True)


def _make_transport(
    config: SinkConfig, arg: Transport | Callable[[], Transport] | None
) -> Transport:
    if arg is None:
        return default_transport_factory(config.tracking_uri, config.request_timeout)
    if isinstance(arg, Transport):
        return arg
    return arg()


def _activate(worker: Worker) -> None:
    """The first event: run the worker on the process's background thread."""
    pipeline = worker.pipeline
    with worker.transition:
        if pipeline.state is not State.IDLE:
            return
        pipeline.state = State.THREAD
        current = _runtime.runtime()
        pipeline.waker = lambda: worker.loop.wake(worker)
        current.register(worker)
        current.attach(worker)
    if worker.config.handle_signals:
        _runtime.rearm_signal_handlers()


async def _dispatch(loop: _runtime.Loop) -> None:
    while True:
        await loop.waker.wait()
        loop.dispatch()


def _abandon(worker: Worker) -> None:
    """The sink was garbage-collected without close(): its worker ends its runs (FAILED: nobody
    can end them now), sends everything in its own time, and stops."""
    if not worker.stopped.is_set():
        _runtime.request_close(worker, None)


def _mlflow_installed() -> bool:
    return importlib.util.find_spec("mlflow") is not None


def create_mlflow_sink_from_env(**overrides: Any) -> MLflowSink:
    """RLM Code-style factory: the same as :meth:`MLflowSink.from_env`."""
    return MLflowSink.from_env(**overrides)

"""The sink: RLM Code's hook protocol in front, the queue and the worker behind.

A hook reads a few fields, stamps the time, builds one event and puts it on the queue. It never
touches the network, never imports mlflow, never waits on the worker and never raises.
"""

from __future__ import annotations

import enum
import importlib.util
import itertools
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import anyio
import anyio.to_thread

from . import _process
from ._buffer import EventBuffer
from ._config import Overflow, SinkConfig, config_from_env, redact_text, redact_uri
from ._events import RunEnd, RunStart, Step
from ._journal import Journal, default_journal_dir
from ._stats import Counters, RateLimitedWarnings, SinkStatistics
from ._transport import Transport
from ._worker import Worker

logger = logging.getLogger("rlm_mlflow")


class _State(enum.Enum):
    IDLE = "idle"  # no worker yet: it starts with the first event
    THREAD = "thread"  # worker on a background thread
    TASK = "task"  # worker in the caller's event loop (``async with``)
    CLOSED = "closed"


@dataclass(slots=True)
class _OpenRun:
    key: str
    thread: int
    implicit: bool = False


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _field(obj: Any, name: str) -> Any:
    """``obj.name`` or ``obj[name]``, else None: other runtimes pass other objects."""
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def default_transport_factory(tracking_uri: str | None, request_timeout: float) -> Transport:
    """The fastest way to reach the store: plain HTTP for a server, ``MlflowClient`` otherwise."""
    from ._client import ClientTransport, resolve_tracking_uri

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    if uri is None:
        uri = resolve_tracking_uri(None)
    if uri.startswith(("http://", "https://")):
        from ._rest import RestTransport

        return RestTransport(uri, timeout=request_timeout)
    return ClientTransport(uri)


class MLflowSink:
    """An RLM observability sink that sends runs to MLflow without blocking the agent.

    Hooks put events on a bounded queue; a worker drains it to MLflow in batches with retries.
    The worker starts with the first event on a background thread, or in your event loop when the
    sink is used as ``async with MLflowSink(...) as sink``. ``close()`` (also run at exit) sends
    what is queued within ``shutdown_timeout`` and ends every run.

    Args:
        enabled: Turn the sink on. Off, every hook returns at once.
        experiment: MLflow experiment name, created when missing.
        tracking_uri: Where MLflow is; ``None`` means ``MLFLOW_TRACKING_URI`` or MLflow's default.
        queue_size: Step events that may wait for the worker; starts and ends are never dropped.
        overflow: What to drop when the queue is full of steps: ``"drop_oldest"`` or
            ``"drop_newest"``.
        flush_interval: Seconds between drains when the queue is not filling up.
        shutdown_timeout: Seconds ``close()`` (and the exit hook) may take at most.
        request_timeout: Seconds one HTTP request may take.
        retry_deadline: Seconds a failing request is retried before its data is counted lost.
        batch_trigger: Queued events that wake the worker before ``flush_interval`` is up.
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
        handle_signals: bool | None = None,
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
                "handle_signals": handle_signals,
            }.items()
            if value is not None
        }
        base = config if config is not None else SinkConfig()
        self.config = base.with_changes(**changes) if changes else base
        self._transport_arg = transport
        self._setup()

    def _setup(self) -> None:
        """Everything a process owns: run at construction, and again in a forked child."""
        config = self.config
        self._counters = Counters()
        self._warnings = RateLimitedWarnings()
        self._lock = threading.RLock()
        self._open: dict[str, tuple[_OpenRun, ...]] = {}
        self._state = _State.IDLE
        self._thread: threading.Thread | None = None
        self._loop_thread: int | None = None
        self._task_done: anyio.Event | None = None
        self._task_group: Any = None
        self._end_status = "FAILED"  # for runs still open at close; KILLED after a signal
        # Run keys: a random prefix per process (and per sink) and a counter. Unique across
        # processes without a system call per run, as uuid4() would make.
        self._key_prefix = secrets.token_hex(8)
        self._key_counter = itertools.count()
        self._available = True
        self._detail = redact_uri(config.tracking_uri) or "default tracking URI"
        if (
            config.enabled
            and self._transport_arg is None
            and importlib.util.find_spec("mlflow") is None
        ):
            self._available = False
            self._detail = "mlflow cannot be imported: No module named 'mlflow'"
            logger.warning("rlm-mlflow: %s; the sink does nothing", self._detail)
        active = config.enabled and self._available
        self._journal = self._open_journal() if active and config.journal else None
        self._buffer = EventBuffer(
            config.queue_size,
            config.overflow,
            self._counters,
            self._warnings,
            trigger=config.batch_trigger,
            journal=self._journal,
        )
        self._worker = Worker(
            config,
            buffer=self._buffer,
            counters=self._counters,
            warnings=self._warnings,
            transport_factory=self._make_transport,
        )
        # Hooks test this one attribute first, so a disabled or closed sink costs a lookup.
        self._active = active
        if active:
            _process.register(self, signals=config.handle_signals)

    def _new_key(self) -> str:
        return f"{self._key_prefix}-{next(self._key_counter)}"

    def _open_journal(self) -> Journal | None:
        root = Path(self.config.journal_dir) if self.config.journal_dir else default_journal_dir()
        try:
            return Journal(
                root, experiment=self.config.experiment, tracking_uri=self.config.tracking_uri
            )
        except OSError as exc:
            logger.warning(
                "rlm-mlflow: cannot open a journal in %s (%s); going on without one", root, exc
            )
            return None

    def _reset_after_fork(self) -> None:
        """In a forked child: a sink of its own, never re-sending what the parent queued."""
        inherited = self._journal
        if inherited is not None:
            inherited.forget()
        if self._active:
            self._setup()
        else:
            self._lock = threading.RLock()

    def _mark_interrupted(self, status: str) -> None:
        self._end_status = status

    def _fail_runs_of_thread(self, thread: int) -> None:
        """A thread died of an uncaught exception: end the runs it had open, FAILED."""
        if not self._active:
            return
        now = _now_ms()
        with self._lock:
            for run_id, runs in list(self._open.items()):
                dead = [r for r in runs if r.thread == thread]
                for run in dead:
                    self._buffer.put(RunEnd(run.key, run_id, now, "FAILED"))
                left = tuple(r for r in runs if r.thread != thread)
                if left:
                    self._open[run_id] = left
                else:
                    del self._open[run_id]

    # -- construction from the environment ---------------------------------------------------

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> MLflowSink:
        """A sink configured from ``DSPY_RLM_MLFLOW_*``, ``MLFLOW_TRACKING_URI`` and
        ``RLM_MLFLOW_*``; keyword arguments override the environment."""
        transport = overrides.pop("transport", None)
        return cls(config=config_from_env(env, **overrides), transport=transport)

    def _make_transport(self) -> Transport:
        arg = self._transport_arg
        if arg is None:
            return default_transport_factory(self.config.tracking_uri, self.config.request_timeout)
        if isinstance(arg, Transport):
            return arg
        return arg()

    # -- the hooks ------------------------------------------------------------------------------

    def on_run_start(
        self, run_id: str, *, task: str, environment: str, params: dict[str, Any]
    ) -> None:
        """A run started: queue the creation of its MLflow run (params, tags, parent link).

        Logs ``environment``, ``task_chars`` (the task's length, never its text) and every
        scalar param; a ``parent_run_id`` naming an open run makes this run its child.
        Returns at once; never raises.
        """
        # Typed as RLM Code calls it; checked as if anything could come (other runtimes do).
        given: Any = params
        if not self._active:
            self._refuse()
            return
        try:
            run_id = str(run_id)
            try:
                task_chars: int | None = len(task)
            except TypeError:
                task_chars = None
            parent = given.get("parent_run_id") if isinstance(given, Mapping) else None
            key = self._new_key()
            me = threading.get_ident()
            with self._lock:
                runs = self._open.get(run_id, ())
                implicit = next((r for r in runs if r.implicit and r.thread == me), None)
                if implicit is not None:  # steps came first; this start completes that run
                    implicit.implicit = False
                    key = implicit.key
                elif runs:
                    self._counters.rejected["duplicate_run_id"] += 1
                    self._warnings.warn(
                        "duplicate_run_id",
                        "rlm-mlflow: run %s started again while still open; logged as a new run",
                        run_id,
                    )
                if implicit is None:
                    self._open[run_id] = (*runs, _OpenRun(key, me))
                parent_key = self._key_of(str(parent), me) if parent else None
            self._ensure_worker()
            self._buffer.put(
                RunStart(
                    key=key,
                    run_id=run_id,
                    timestamp_ms=_now_ms(),
                    environment=environment,
                    task_chars=task_chars,
                    params=dict(given) if isinstance(given, Mapping) else {},
                    parent_key=parent_key,
                )
            )
            if not isinstance(given, Mapping):
                self._bad_input("params_not_mapping", run_id, f"params is a {type(given)}")
        except Exception:
            self._hook_failed("on_run_start")

    def on_step(self, run_id: str, *, event: dict[str, Any], cumulative_reward: float) -> None:
        """A step: queue ``step_reward`` (``event["reward"]``) and ``cumulative_reward`` at
        ``event["step"]``, stamped with the time of this call. Returns at once; never raises."""
        given: Any = event
        if not self._active:
            self._refuse()
            return
        try:
            runs = self._open.get(run_id)
            key = runs[0].key if runs is not None and len(runs) == 1 else self._route(run_id)
            if type(given) is dict or isinstance(given, Mapping):
                step, reward = given.get("step"), given.get("reward")
            else:
                step = reward = None
                self._bad_input("event_not_mapping", run_id, f"event is a {type(given).__name__}")
            self._buffer.put_step(
                Step(key, run_id, time.time_ns() // 1_000_000, step, reward, cumulative_reward)
            )
        except Exception:
            self._hook_failed("on_step")

    def on_run_end(self, run_id: str, *, result: Any, run_path: Path | str | None) -> None:
        """A run ended: queue ``completed``, ``steps``, ``total_reward`` (read from ``result``'s
        attributes or keys), the upload of ``run_path`` (a file or a directory) and the end of
        the run (FINISHED). Returns at once; never raises."""
        if not self._active:
            self._refuse()
            return
        try:
            run_id = str(run_id)
            key = self._route(run_id, closing=True)
            try:
                path = os.fsdecode(run_path) if run_path is not None else None
            except TypeError:
                path = None
                self._bad_input(
                    "artifact", run_id, f"run_path {type(run_path).__name__} is not a path"
                )
            self._buffer.put(
                RunEnd(
                    key=key,
                    run_id=run_id,
                    timestamp_ms=_now_ms(),
                    status="FINISHED",
                    completed=_field(result, "completed"),
                    steps=_field(result, "steps"),
                    total_reward=_field(result, "total_reward"),
                    run_path=path,
                )
            )
        except Exception:
            self._hook_failed("on_run_end")

    def _key_of(self, run_id: str, thread: int) -> str | None:
        """The key of the open run ``run_id``: the one this thread started, else the latest."""
        runs = self._open.get(run_id)
        if not runs:
            return None
        for run in reversed(runs):
            if run.thread == thread:
                return run.key
        return runs[-1].key

    def _route(self, run_id: str, *, closing: bool = False) -> str:
        """Find (or, for a run never started, open) the run a step or an end belongs to."""
        run_id = str(run_id)
        me = threading.get_ident()
        with self._lock:
            key = self._key_of(run_id, me)
            if key is None:
                key = self._new_key()
                self._open[run_id] = (_OpenRun(key, me, implicit=True),)
                self._bad_input(
                    "not_started", run_id, "hook called before on_run_start; run opened for it"
                )
                self._ensure_worker()
                self._buffer.put(RunStart(key, run_id, _now_ms(), None, None, {}, None))
            if closing:
                runs = tuple(r for r in self._open.get(run_id, ()) if r.key != key)
                if runs:
                    self._open[run_id] = runs
                else:
                    self._open.pop(run_id, None)
        return key

    def _refuse(self) -> None:
        if self._state is _State.CLOSED:
            self._counters.dropped["after_close"] += 1
            self._warnings.warn(
                "after_close", "rlm-mlflow: hook called after close(); event dropped"
            )

    def _bad_input(self, reason: str, run_id: str, message: str) -> None:
        self._counters.rejected[reason] += 1
        self._warnings.warn(reason, "rlm-mlflow run %s: %s", run_id, message)

    def _hook_failed(self, hook: str) -> None:
        self._counters.rejected["hook_error"] += 1
        self._warnings.warn("hook_error", "rlm-mlflow %s failed; event dropped", hook)
        logger.debug("rlm-mlflow %s failed", hook)

    # -- the worker -----------------------------------------------------------------------------

    def _ensure_worker(self) -> None:
        if self._state is _State.IDLE:
            self._start_thread()

    def _start_thread(self) -> None:
        with self._lock:
            if self._state is not _State.IDLE:
                return
            thread = threading.Thread(
                target=anyio.run, args=(self._worker.run,), name="rlm-mlflow", daemon=True
            )
            self._thread = thread
            self._state = _State.THREAD
            thread.start()

    # -- flushing and closing -------------------------------------------------------------------

    def _in_worker_loop(self) -> bool:
        return self._state is _State.TASK and threading.get_ident() == self._loop_thread

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
        timeout = self.config.shutdown_timeout if timeout is None else timeout
        with self._buffer.lock:
            target = self._counters.accepted
        lost_before = self._lost()
        if self._state in (_State.THREAD, _State.TASK):
            self._buffer.wake.set()
        deadline = time.monotonic() + timeout
        worker = self._worker
        with worker.progress:
            while self._counters.processed < target and not worker.stopped.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                worker.progress.wait(left)
        lost_after = self._lost()
        return self._counters.processed >= target and lost_after == lost_before

    def _lost(self) -> int:
        counters = self._counters
        return sum(counters.dropped.values()) + counters.permanent_failures + counters.deferred

    async def aflush(self, timeout: float | None = None) -> bool:
        """``flush()`` for async code: waits on a thread, never blocks the event loop."""
        return await anyio.to_thread.run_sync(
            self._flush_from_thread, timeout, abandon_on_cancel=True
        )

    def _flush_from_thread(self, timeout: float | None) -> bool:
        return self.flush(timeout)

    def _request_close(self, timeout: float) -> _State | None:
        """Queue a FAILED end for every run still open and ask the worker to stop by a deadline.

        Returns the state the sink was in, or None if there is nothing to wait for.
        """
        with self._lock:
            state, self._state = self._state, _State.CLOSED
            active, self._active = self._active, False
            if state is _State.CLOSED or not active:
                return None
            now = _now_ms()
            for run_id, runs in self._open.items():
                for run in runs:
                    self._buffer.put(RunEnd(run.key, run_id, now, self._end_status))
            self._open.clear()
            self._worker.shutdown_deadline = time.monotonic() + timeout
            self._worker.stop_requested.set()
            self._buffer.wake.set()
        _process.unregister(self)
        _process.restore_signal_handlers()
        if state is _State.IDLE:  # no worker ever ran: nothing was queued
            self._close_journal()
            return None
        return state

    def _close_journal(self) -> None:
        """Remove the journal when everything in it was sent; keep it for replay otherwise."""
        journal = self._journal
        if journal is None:
            return
        keep = journal.backlog > 0  # records written and not done (pending ones included)
        journal.close(keep=keep)
        if keep:
            logger.warning(
                "rlm-mlflow: %d events not sent are kept in %s; send them with 'rlm-mlflow replay'",
                journal.backlog,
                journal.folder,
            )

    def close(self, timeout: float | None = None) -> None:
        """Send what is queued, end every run (FAILED if it never ended) and stop the worker.

        Returns within ``timeout`` (default ``shutdown_timeout``) whatever the server does.
        Idempotent. From inside the event loop that runs the worker, use ``await aclose()``.
        """
        timeout = self.config.shutdown_timeout if timeout is None else timeout
        in_loop = self._in_worker_loop()
        state = self._request_close(timeout)
        if state is None:
            return
        if in_loop:
            logger.warning(
                "rlm-mlflow: close() called inside the worker's event loop; "
                "the worker stops on its own, use 'await sink.aclose()' to wait"
            )
            return
        self._worker.stopped.wait(timeout + 0.5)
        self._close_journal()
        self._log_summary()

    async def aclose(self, timeout: float | None = None) -> None:
        """``close()`` for async code: never blocks the event loop."""
        timeout = self.config.shutdown_timeout if timeout is None else timeout
        if self._in_worker_loop() and self._task_done is not None:
            if self._request_close(timeout) is not None:
                with anyio.move_on_after(timeout + 0.5):
                    await self._task_done.wait()
                self._close_journal()
                self._log_summary()
            return
        await anyio.to_thread.run_sync(self.close, timeout, abandon_on_cancel=True)

    def _log_summary(self) -> None:
        stats = self.statistics()
        lost = sum(stats.dropped.values())
        log = logger.warning if lost else logger.info
        log(
            "rlm-mlflow closed: %d events accepted, %d sent, %d dropped %s, %d runs ended",
            stats.accepted,
            stats.sent,
            lost,
            dict(stats.dropped),
            stats.runs_ended,
        )

    # -- context managers -----------------------------------------------------------------------

    def __enter__(self) -> Self:
        if self._active:
            self._ensure_worker()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        if not self._active:
            return self
        with self._lock:
            if self._state is not _State.IDLE:
                raise RuntimeError(
                    "this sink's worker is already running; enter 'async with' before any hook"
                )
            self._state = _State.TASK
            self._loop_thread = threading.get_ident()
        self._task_done = anyio.Event()
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self._task_group.start_soon(self._run_task)
        return self

    async def _run_task(self) -> None:
        try:
            await self._worker.run()
        finally:
            assert self._task_done is not None
            self._task_done.set()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.aclose()
        finally:
            group, self._task_group = self._task_group, None
            if group is not None:
                group.cancel_scope.cancel()
                await group.__aexit__(None, None, None)

    # -- status -----------------------------------------------------------------------------------

    def statistics(self) -> SinkStatistics:
        """A consistent snapshot of the sink's figures."""
        counters = self._counters
        with self._buffer.lock:
            depth = len(self._buffer)
            accepted = counters.accepted
            dropped = dict(counters.dropped)
        runs_open = sum(len(r) for r in self._open.values())
        return SinkStatistics(
            queue_depth=depth,
            queue_capacity=self._buffer.capacity,
            accepted=accepted,
            sent=counters.sent,
            pending=max(0, accepted - counters.processed),
            dropped=dropped,
            rejected=dict(counters.rejected),
            retries=counters.retries,
            permanent_failures=counters.permanent_failures,
            requests=counters.requests,
            runs_open=runs_open,
            runs_created=counters.runs_created,
            runs_ended=counters.runs_ended,
            last_error=counters.last_error,
            spilled=counters.spilled,
            deferred=counters.deferred,
            journal=str(self._journal.folder) if self._journal is not None else None,
            journal_backlog=self._journal.backlog if self._journal is not None else 0,
        )

    def status(self) -> dict[str, Any]:
        """RLM Code's keys (name, enabled, available, detail, experiment) and live figures."""
        worker = self._worker
        available = self._available and worker.unavailable is None
        detail = worker.unavailable or worker.describe or self._detail
        status: dict[str, Any] = {
            "name": self.name,
            "enabled": self.config.enabled,
            "available": available,
            "detail": redact_text(detail, self.config.tracking_uri),
            "experiment": self.config.experiment,
            "state": self._state.value,
        }
        if self.config.enabled:
            status.update(self.statistics().as_dict())
        return status

    def __repr__(self) -> str:
        return (
            f"MLflowSink(enabled={self.config.enabled}, experiment={self.config.experiment!r}, "
            f"tracking_uri={redact_uri(self.config.tracking_uri)!r}, state={self._state.value})"
        )


def create_mlflow_sink_from_env(**overrides: Any) -> MLflowSink:
    """RLM Code-style factory: the same as :meth:`MLflowSink.from_env`."""
    return MLflowSink.from_env(**overrides)

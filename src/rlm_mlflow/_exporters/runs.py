"""The runs exporter: RLM runs as MLflow runs (params, tags, step metrics, summary, artifacts).

It gets each drain cycle's events grouped by run (:class:`RunWork`) and answers, run by run,
whether they were sent, must be kept for replay, or were refused for good. Every write is
idempotent, so a retry or a replay never duplicates anything:

- a run carries a client-side key tag (``rlm_mlflow.key``); after a create whose answer was lost,
  the key is looked up before creating again, and duplicates that a slow server committed late
  are deleted (the run with data is kept) before any data is sent and again at the run's end;
- params are immutable in MLflow (the same value again is a no-op);
- metric points keep the time of their hook call; after an answer was lost, the run's stored
  points are read back and only the missing ones are sent (a file store does not deduplicate);
- ending a run overwrites its status; replay never ends a run that is not RUNNING anymore.

Failures are contained per run: a bad value is counted and skipped, an unexpected error in one
run's conversion is logged and that run's events kept, and the other runs of the cycle go on.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any

import anyio

from .._calls import Caller
from .._codec import describe
from .._config import COMPONENT_TAG
from .._events import RunEnd, RunStart, Step, Usage
from .._exceptions import PermanentError, StoreRefused, TransientError
from .._stats import RateLimitedWarnings, WorkerCounts
from .._transports.base import KEY_TAG, PARENT_TAG, Metric, RunRef, Transport
from . import convert as _convert
from .work import DEFERRED, HOLD, SENT, Done, Outcome, RunWork

logger = logging.getLogger("rlm_mlflow")

#: Runs whose data is sent at the same time (each run's own writes stay in order).
CONCURRENT_RUNS = 4
#: How long, at least, runs whose create answer was lost are looked for duplicates.
LATE_HORIZON = 300.0
#: Ended runs remembered, so that a late event finds its MLflow run without a search.
ENDED_MEMORY = 1024
#: Codes for which splitting a refused batch cannot help: the whole run is concerned.
_WHOLE_RUN_CODES = frozenset({"RESOURCE_DOES_NOT_EXIST", "RUN_NOT_ACTIVE", "ENDPOINT_NOT_FOUND"})

#: How MLflow marks an evaluation run (``mlflow.genai.evaluate``'s): the Evaluation runs page.
RUN_TYPE_TAG = "mlflow.runType"
RUN_TYPE_EVALUATION = "genai_evaluate"

#: Experiment ids found in this process, by (store, experiment name): sinks share them.
_EXPERIMENTS: dict[tuple[str, str], str] = {}
_ASKING: dict[tuple[str, str], threading.Event] = {}


@dataclass(slots=True)
class RunState:
    """What the exporter knows of one run."""

    no: int
    key: str
    run_id: str
    start_ms: int
    parent_no: int | None = None
    ref: RunRef | None = None
    name: str = ""  # the MLflow run's name (its task's first words); its run id until known
    params: list[tuple[str, str]] = field(default_factory=list)  # not sent yet
    sent_params: list[tuple[str, str]] = field(default_factory=list)
    started: bool = False  # a real (not implicit) start was seen
    # time.monotonic() of the last create whose answer was lost (None: none was): such a
    # create may have landed without us knowing its run.
    create_lost_at: float | None = None
    look_first: bool = False  # the run may exist already (replay, a late event): look it up
    parent_pending: bool = False  # the parent link is still to be set
    last_step: int = -1
    ended: bool = False
    refused: str | None = None
    benchmark: bool = False  # an evaluation run (tagged as MLflow's evaluations are)
    # Replay: an earlier process may have sent this run's create or data (its records were in
    # flight), so a create of ours is checked for a duplicate afterwards (see recheck_all).
    uncertain: bool = False
    created_here: bool = False  # this exporter created the MLflow run (it was not found)
    # Each metric's latest stored point (key -> (step, timestamp_ms)) as known when the run was
    # found or created, before any data of ours went: None once data went, or when unknown.
    stored_latest: dict[str, tuple[int, int]] | None = None


@dataclass
class _Suspect:
    """A run whose create answer was lost: looked up again when ``due`` has come, at growing
    intervals until ``until`` (a request can wait in a busy server far longer than its client
    waited for it), and once more at close."""

    run_id: str
    keep: str  # the MLflow run we chose
    due: float  # time.monotonic()
    interval: float
    until: float


class RunsExporter:
    """See the module docstring."""

    def __init__(
        self,
        *,
        caller: Caller,
        counts: WorkerCounts,
        rejected: Callable[[str], None],
        warnings: RateLimitedWarnings,
        prefix: str,
        experiment: str,
        transport: Callable[[], Transport],
        replaying: bool = False,
        late_window: float = 60.0,
    ) -> None:
        self.caller = caller
        self.counts = counts
        self._rejected = rejected
        self.warnings = warnings
        self.prefix = prefix
        self.experiment = experiment
        self._transport = transport
        self.replaying = replaying
        self.experiment_id: str | None = None
        self.runs: dict[int, RunState] = {}
        self.ended: OrderedDict[int, RunRef] = OrderedDict()
        self.ended_memory = ENDED_MEMORY  # replay: every run it sends (their spans go after)
        self.known: dict[str, list[RunRef]] = {}  # key -> runs found by a bulk search
        # A bulk search found every run this sink had created: a key it did not find has no run.
        self.searched = False
        # Replay: run -> times (ms) of the events that went out in a request whose answer never
        # came; only their points may be stored (None: not known, any point may be).
        self.in_flight: dict[int, set[int]] | None = None
        # Replay: runs created where an earlier process may have sent a create too: key -> (run
        # id, our MLflow run), all looked for duplicates in one search by recheck_all().
        self.created_uncertain: dict[str, tuple[str, str]] = {}
        self.killed = 0  # replay: runs left open by a dead process, ended KILLED
        # Runs whose create answer was lost: a server may still commit such a create after the
        # run's end; each is looked up once more, ``late_window`` s after that create was sent.
        self.late_window = late_window
        self.suspects: dict[str, _Suspect] = {}
        self._creating: dict[int, anyio.Event] = {}  # runs being created (see _ensure_run)
        # Closing: one limiter for the runs of every closing sink of the loop (each run is
        # created, sent and ended before more are begun), and whether there is still time to
        # create a run and end it (if not, it is kept for replay, never left RUNNING).
        self.limiter: AbstractAsyncContextManager[Any] | None = None
        self.time_to_create: Callable[[], bool] = lambda: True

    @property
    def transport(self) -> Transport:
        return self._transport()

    def key_of(self, no: int) -> str:
        return f"{self.prefix}-{no}"

    def ref_of(self, no: int) -> RunRef | None:
        """The MLflow run of run ``no``, when it is known."""
        state = self.runs.get(no)
        if state is not None and state.ref is not None:
            return state.ref
        return self.ended.get(no)

    # -- the experiment ----------------------------------------------------------------------

    async def ensure_experiment(self) -> str:
        if self.experiment_id is None:
            where = (self.transport.describe(), self.experiment)
            # One sink asks, the others of the process wait for its answer.
            mine = threading.Event()
            asking = _ASKING.setdefault(where, mine)
            while asking is not mine and not asking.is_set():
                await anyio.sleep(0.02)
                asking = _ASKING.setdefault(where, mine)
            known = _EXPERIMENTS.get(where)
            try:
                if known is None:
                    known = await self.caller.call(
                        "get or create experiment",
                        self.transport.get_or_create_experiment,
                        self.experiment,
                    )
                    _EXPERIMENTS[where] = known
            finally:
                if _ASKING.get(where) is mine:
                    del _ASKING[where]
                mine.set()
            self.experiment_id = known
        return self.experiment_id

    def forget_experiment(self) -> None:
        """The experiment vanished (the store was replaced): look it up again, everywhere."""
        if self.experiment_id is not None:
            _EXPERIMENTS.pop((self.transport.describe(), self.experiment), None)
        self.experiment_id = None

    async def probe(self) -> None:
        """A cheap request that succeeds when the store takes our writes (StoreRefused if not).

        It reads: when reads pass while writes were refused, the writes are due again only
        now and then (:meth:`Caller.write_try_due`); until then the block stands."""
        caller = self.caller
        if self.experiment_id is None:
            self.experiment_id = await caller.once(
                "get or create experiment", self.transport.get_or_create_experiment, self.experiment
            )
        else:
            await caller.once(
                "check experiment", self.transport.check_experiment, self.experiment_id
            )
        if caller.refused is not None and not caller.write_try_due():
            raise StoreRefused(caller.refused)

    async def load_known(self) -> None:
        """Replay: find every run this sink created, in one search."""
        experiment_id = await self.ensure_experiment()
        found = await self.caller.call(
            "find runs", self.transport.find_runs_by_prefix, experiment_id, self.prefix
        )
        for ref in found:
            self.known.setdefault(ref.key, []).append(ref)
        self.searched = True

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
        try:
            async with limiter:
                if state.ref is None and not self.time_to_create():
                    outcome: Outcome | None = DEFERRED  # too late to end it: kept for replay
                else:
                    job = self._send(state, work, created[state.no])
                    outcome = await self._contain(state, job)
        finally:
            created[state.no].set()
        finished(state.no, SENT if outcome is None else outcome)

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
        except StoreRefused:
            return HOLD
        except TransientError as exc:
            self._failed(f"run {state.run_id}: not sent, kept for replay: {exc}")
            return DEFERRED
        except PermanentError as exc:
            state.refused = state.refused or str(exc)
            self._failed(f"run {state.run_id}: MLflow refused it: {exc}")
            return ("dropped", "refused")
        except anyio.get_cancelled_exc_class():
            raise
        except Exception:
            logger.exception(
                "rlm-mlflow run %s: unexpected error; its events are kept", state.run_id
            )
            self._rejected("internal_error")
            return DEFERRED
        return None

    # -- creating a run ----------------------------------------------------------------------

    async def _ensure_run(self, state: RunState) -> None:
        """The run's MLflow run, created once: a child creating its parent first and the
        parent's own job never create it twice (the second waits for the first)."""
        while state.ref is None and (creating := self._creating.get(state.no)) is not None:
            await creating.wait()
        if state.ref is not None:
            return
        if state.refused is not None:
            raise PermanentError(state.refused)
        creating = self._creating[state.no] = anyio.Event()
        try:
            await self._create_run(state)
        finally:
            creating.set()
            self._creating.pop(state.no, None)

    async def _create_run(self, state: RunState) -> None:
        experiment_id = await self.ensure_experiment()
        tags = [
            ("run_id", _convert.tag_value(state.run_id, "run_id", self._reject(state.run_id))),
            ("component", COMPONENT_TAG),
            (KEY_TAG, state.key),
        ]
        if state.benchmark:
            tags.append((RUN_TYPE_TAG, RUN_TYPE_EVALUATION))
        await self._ensure_parent(state)
        parent = await self._parent_uuid(state)
        if parent is not None:
            tags.append((PARENT_TAG, parent))
        try:
            state.ref = await self.caller.call(
                "create run", self._create_or_find, state, experiment_id, tags
            )
        except PermanentError as exc:
            if isinstance(exc, StoreRefused):
                raise
            if exc.code == "RUN_NOT_ACTIVE":  # "the experiment must be in the 'active' state"
                await self._check_experiment()
            if exc.code != "RESOURCE_DOES_NOT_EXIST":
                raise
            # "No Experiment with id=...": the store was replaced under us; find it again.
            self._vanished("experiment", self.experiment)
            self.forget_experiment()
            experiment_id = await self.ensure_experiment()
            state.ref = await self.caller.call(
                "create run", self._create_or_find, state, experiment_id, tags
            )
        self.counts.runs_created += 1

    def _create_or_find(
        self, state: RunState, experiment_id: str, tags: list[tuple[str, str]]
    ) -> RunRef:
        """On a thread: the run of ``state``, found (after a lost answer) or created."""
        transport = self.transport
        if state.look_first or state.create_lost_at is not None:
            found = self.known.get(state.key)
            # A bulk search after the process that created it ended saw every run it had: a
            # key it did not find needs no search of its own (a create of that process still
            # being committed is caught by the look for duplicates at the run's end).
            if not found and not (self.searched and state.create_lost_at is None):
                found = transport.find_runs(experiment_id, state.key)
            if found:
                ref = self._keep_one(state, found, None)
                state.stored_latest = _latest_of(ref)
                return ref
        try:
            ref = transport.create_run(
                experiment_id,
                run_name=state.name or _convert.name_of(state.run_id),
                start_time_ms=state.start_ms,
                tags=tags,
            )
        except TransientError as exc:
            if exc.maybe_committed:
                state.create_lost_at = time.monotonic()
            raise
        if state.create_lost_at is not None:  # an earlier attempt may have been committed
            found = transport.find_runs(experiment_id, state.key)
            if len(found) > 1:
                ref = self._keep_one(state, found, ref.run_uuid)
                state.stored_latest = _latest_of(ref)
                return ref
        state.created_here = True
        state.stored_latest = {}  # a run just created holds no points
        if state.uncertain:  # see RunState.uncertain
            self.created_uncertain[state.key] = (state.run_id, ref.run_uuid)
        return ref

    def _keep_one(self, state: RunState, found: list[RunRef], prefer: str | None) -> RunRef:
        """On a thread: keep one of the runs that carry this key, delete the others."""
        if len(found) == 1:
            return found[0]
        with_data = [r for r in found if r.has_data]
        if with_data:
            keep = min(with_data, key=lambda r: r.run_uuid)
        else:
            keep = next((r for r in found if r.run_uuid == prefer), None) or min(
                found, key=lambda r: r.run_uuid
            )
        for ref in found:
            if ref.run_uuid != keep.run_uuid:
                self.transport.delete_run(ref.run_uuid)
        self.warnings.warn(
            "duplicate_runs",
            "rlm-mlflow run %s: %d duplicate MLflow runs (a create whose answer was lost, "
            "committed late) were deleted; the run is %s",
            state.run_id,
            len(found) - 1,
            keep.run_uuid,
        )
        self.known.pop(state.key, None)
        return keep

    async def _repair(self, state: RunState) -> None:
        """At a run's end: delete duplicates a slow server committed after we chose our run."""
        lost_at = state.create_lost_at
        if lost_at is None or state.ref is None or self.experiment_id is None:
            return
        found = await self.caller.call(
            "find runs", self.transport.find_runs, self.experiment_id, state.key
        )
        await self._delete_extra(state.run_id, state.ref.run_uuid, found)
        due = lost_at + self.late_window
        self.suspects[state.key] = _Suspect(
            state.run_id,
            state.ref.run_uuid,
            due=due,
            interval=self.late_window,
            until=due + max(LATE_HORIZON, 10 * self.late_window),
        )

    async def _delete_extra(self, run_id: str, keep: str, found: list[RunRef]) -> None:
        extra = [r for r in found if r.run_uuid != keep]
        if not extra:
            return

        def delete() -> None:
            for ref in extra:
                self.transport.delete_run(ref.run_uuid)

        await self.caller.call("delete duplicate runs", delete)
        self.warnings.warn(
            "duplicate_runs",
            "rlm-mlflow run %s: %d duplicate MLflow runs committed late were deleted",
            run_id,
            len(extra),
        )

    async def recheck_all(self, created: dict[str, tuple[str, str]]) -> None:
        """Replay: delete the duplicates of runs it created (``created``: key -> run id and
        our MLflow run) that an earlier process's create, committed late, made; one search."""
        if not created:
            return
        experiment_id = await self.ensure_experiment()
        found = await self.caller.call(
            "find runs", self.transport.find_runs_by_prefix, experiment_id, self.prefix
        )
        by_key: dict[str, list[RunRef]] = {}
        for ref in found:
            by_key.setdefault(ref.key, []).append(ref)
        for key, (run_id, keep) in sorted(created.items()):
            if len(by_key.get(key, ())) > 1:
                await self._delete_extra(run_id, keep, by_key[key])

    async def recheck(self, *, closing: bool = False) -> None:
        """Look again for duplicates of runs whose create answer was lost, when due; closing,
        look for all of them at once (a close does not wait for late windows)."""
        if not self.suspects or self.experiment_id is None:
            return
        for key, suspect in sorted(self.suspects.items(), key=lambda item: item[1].due):
            if suspect.due > time.monotonic() and not closing:
                continue
            try:
                found = await self.caller.call(
                    "find runs", self.transport.find_runs, self.experiment_id, key
                )
                await self._delete_extra(suspect.run_id, suspect.keep, found)
            except Exception as exc:  # a look-up that fails never stops the worker
                logger.warning(
                    "rlm-mlflow run %s: could not look for duplicate MLflow runs: %s",
                    suspect.run_id,
                    self.caller.clean(str(exc)),
                )
                if not closing:
                    continue  # looked for again at the next cycle
            suspect.interval *= 2
            suspect.due = time.monotonic() + suspect.interval
            if closing or suspect.due > suspect.until:
                self.suspects.pop(key, None)

    def _parent_not_created(self, state: RunState) -> bool:
        """The parent's events came here, and its MLflow run could not be created yet."""
        parent = self.runs.get(state.parent_no) if state.parent_no is not None else None
        return parent is not None and parent.ref is None and parent.refused is None

    async def _ensure_parent(self, state: RunState) -> None:
        """A parent first: a child created before its parent's MLflow run exists would end
        without ``mlflow.parentRunId`` (a crash before the link is set leaves it so for good).
        Creating the parent may fail: the child is then not created either, and kept."""
        if not self._parent_not_created(state):
            return
        assert state.parent_no is not None
        parent = self.runs[state.parent_no]
        try:
            await self._ensure_run(parent)
        except StoreRefused:
            raise
        except PermanentError as exc:  # refused for good: the child goes on without it
            parent.refused = parent.refused or str(exc)
        if parent.ref is None and parent.refused is None:
            raise TransientError(f"its parent run {parent.run_id} is not created yet")

    async def _parent_uuid(self, state: RunState) -> str | None:
        """The MLflow run of the parent, by state or by key; None (and retried later) if unknown."""
        if state.parent_no is None:
            return None
        parent = self.runs.get(state.parent_no)
        if parent is not None and parent.ref is not None:
            state.parent_pending = False
            return parent.ref.run_uuid
        ended = self.ended.get(state.parent_no)
        if ended is not None:
            state.parent_pending = False
            return ended.run_uuid
        experiment_id = await self.ensure_experiment()
        key = self.key_of(state.parent_no)
        found = self.known.get(key) or await self.caller.call(
            "find parent run", self.transport.find_runs, experiment_id, key
        )
        if found:
            state.parent_pending = False
            return min(found, key=lambda r: r.run_uuid).run_uuid
        state.parent_pending = True
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
        if work.maybe_sent and metrics:
            sent = None if self.in_flight is None else self.in_flight.get(work.no, set())
            metrics = await self._not_yet_stored(state, metrics, sent)
        params = list(state.params)
        work.maybe_sent = True
        state.stored_latest = None  # what is stored now depends on what this sends
        await self._log_batches(state, metrics, params, tags)
        state.sent_params.extend(params)
        del state.params[: len(params)]
        if end is not None and not state.ended:
            await self._finish(state, end)

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
        Only the metrics of points that may be stored are read back."""
        assert state.ref is not None
        run_uuid = state.ref.run_uuid
        latest = state.stored_latest
        maybe = {
            m.key
            for m in metrics
            if (sent is None or m.timestamp_ms in sent)
            and (latest is None or (m.key in latest and (m.step, m.timestamp_ms) <= latest[m.key]))
        }
        if not maybe:
            return metrics
        stored: set[Metric] = set()
        for key in sorted(maybe):
            stored.update(
                await self.caller.call(
                    "read metric history", self.transport.metric_history, run_uuid, key
                )
            )
        return [m for m in metrics if m not in stored]

    async def _log_batches(
        self,
        state: RunState,
        metrics: Sequence[Metric],
        params: Sequence[tuple[str, str]],
        tags: Sequence[tuple[str, str]],
    ) -> None:
        for chunk_metrics, chunk_params, chunk_tags in _chunks(metrics, params, tags):
            await self._log_batch(state, chunk_metrics, chunk_params, chunk_tags)

    async def _log_batch(
        self,
        state: RunState,
        metrics: Sequence[Metric],
        params: Sequence[tuple[str, str]],
        tags: Sequence[tuple[str, str]],
    ) -> None:
        """Send one batch; when MLflow refuses it, split it until the refused items are alone."""
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
                stored: set[Metric] = set()
                for key in sorted({m.key for m in pending}):
                    stored.update(transport.metric_history(run_uuid, key))
                pending = [m for m in pending if m not in stored]
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
                await self._log_batch(state, pending, [*resend, *params], tags)
                return
            size = len(metrics) + len(params) + len(tags)
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
        state.ref = None
        state.look_first = True
        self.forget_experiment()
        await self._ensure_run(state)
        return list(state.sent_params)

    async def _check_experiment(self) -> None:
        """Raises StoreRefused when the experiment was deleted (everything is then held)."""
        experiment_id = await self.ensure_experiment()
        await self.caller.call("check experiment", self.transport.check_experiment, experiment_id)

    def _vanished(self, what: str, name: str) -> None:
        self.warnings.warn(
            "vanished",
            "rlm-mlflow: the %s %s no longer exists on the server (was its database replaced?); "
            "it is created again; what was sent to it before is not there anymore",
            what,
            name,
        )

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

    def _forget(self, state: RunState) -> None:
        """A run that ended: keep only its MLflow run, for a late event."""
        self.runs.pop(state.no, None)
        if state.ref is not None:
            self.ended[state.no] = state.ref
            while len(self.ended) > self.ended_memory:
                self.ended.popitem(last=False)

    # -- errors --------------------------------------------------------------------------------

    def _reject(self, run_id: str) -> Callable[[str, str], None]:
        shown = run_id if len(run_id) <= 100 else run_id[:97] + "..."

        def reject(reason: str, message: str) -> None:
            self._rejected(reason)
            self.warnings.warn(reason, "rlm-mlflow run %s: %s", shown, message)

        return reject

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

    def count_rejected(self, reason: str) -> None:
        """Count one value that cannot be sent (status()'s ``rejected``)."""
        self._rejected(reason)

    def _failed(self, message: str) -> None:
        self.caller.note_error(message)
        self.warnings.warn("failed", "rlm-mlflow %s", self.caller.clean(message))


def _latest_of(ref: RunRef) -> dict[str, tuple[int, int]] | None:
    """Each metric's latest stored point of a run found by a search (None: not known)."""
    if ref.latest is None:
        return None
    return {key: (step, timestamp) for key, step, timestamp in ref.latest}


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

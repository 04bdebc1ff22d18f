"""Run identity: which MLflow run an RLM run is, known once, whatever answers were lost.

An RLM run becomes one MLflow run, and only one:

- a run carries a client-side key tag (``rlm_mlflow.key``: the sink's key prefix and the run's
  number); after a create whose answer was lost, the key is looked up before creating again (and
  only looked up while a create that had no answer may still be committed: its late window), and
  duplicates that a slow server committed late are deleted (the run with data is kept) before any
  data is sent, again at the run's end, and once more when its late window has passed;
- a parent's MLflow run is created before its child's, so that the child's link
  (``mlflow.parentRunId``) is set at its creation;
- replay finds every run a sink created in one search by key prefix, and a run that an earlier
  process may have created too is checked for a duplicate in one more search at the end;
- the experiment is looked up once per process and store, whatever the number of sinks, and
  again if it vanished (a server redeployed on an empty database).

:class:`RunIdentity` holds this; the runs exporter (:mod:`.runs`) builds on it to send each
run's data.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import anyio

from .. import _fork
from .._calls import Caller
from .._config import COMPONENT_TAG
from .._exceptions import PermanentError, StoreRefused, TransientError
from .._stats import RateLimitedWarnings, WorkerCounts
from .._transports.base import KEY_TAG, PARENT_TAG, RunRef, Transport, begin_only_if
from . import convert as _convert

logger = logging.getLogger("rlm_mlflow")

#: How long, at least, runs whose create answer was lost are looked for duplicates.
LATE_HORIZON = 300.0
#: Ended runs remembered, so that a late event finds its MLflow run without a search.
ENDED_MEMORY = 1024
#: While a create that had no answer may still be committed, it is looked for again after
#: this long, then at doubling intervals.
FIRST_LOOK = 0.25
#: ... up to FIRST_LOOK * 2**CLOSING_LOOKS apart while a close waits for it to end the run.
CLOSING_LOOKS = 2
#: While a create given up on is still out (its cycle was taken over), its answer is waited for
#: by looking this often whether it came.
ANSWER_POLL = 0.05

#: How MLflow marks an evaluation run (``mlflow.genai.evaluate``'s): the Evaluation runs page.
RUN_TYPE_TAG = "mlflow.runType"
RUN_TYPE_EVALUATION = "genai_evaluate"

#: Experiment ids found in this process, by (store, experiment name): sinks share them.
_EXPERIMENTS: dict[tuple[str, str], str] = {}
#: The sink asking the store for an experiment now, by the same key: the others wait for it.
_ASKING: dict[tuple[str, str], threading.Event] = {}


def _forget_askers_in_child() -> None:
    """A forked child has no sink asking for an experiment: one of the parent's may have been
    waiting for its answer at the fork, and its event would never be set here (its task is
    not in the child), so every sink of the child would wait for it, never sending anything.
    The ids the parent found are kept: the store is the same."""
    _ASKING.clear()


_fork.at_fork_in_child(_forget_askers_in_child)


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
    # ... and whether that create had no answer at all (the server may still be working on
    # it), and how often it was looked for since.
    create_unanswered: bool = False
    looks: int = 0
    # A create went out after one that had no answer (its late window was over, or a close
    # could not wait): that one may still be committed, a duplicate, after any look for it.
    resent: bool = False
    create_out: bool = False  # a create of it went out, and its answer has not come yet
    # The run a create made, noted by the transport's thread when the answer came: a create
    # given up on (its cycle taken over) is still answered, and its run is the one to use.
    answered: RunRef | None = None
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
    # time.monotonic() when its create went out while sinks close (the time from there to its
    # end's answer is what a create then must still have: time_to_create, ended_in).
    create_began: float | None = None
    # Each metric's latest stored point (key -> (step, timestamp_ms)) as known when the run was
    # found or created, before any data of ours went: None once data went, or when unknown.
    stored_latest: dict[str, tuple[int, int]] | None = None

    @property
    def maybe_created(self) -> bool:
        """A create of it went out and may have made its MLflow run: answered after it was
        given up, or its answer lost (looked for by key before any other create)."""
        return self.answered is not None or self.create_lost_at is not None


class TimeToCreate(Protocol):
    """Whether a run created now, or at ``at`` (a later ``time.monotonic()``), can still be
    ended before the close's deadline."""

    def __call__(self, at: float | None = None) -> bool: ...


class CreatePending(Exception):
    """A create of this run that had no answer may still be committed: look for it again
    after ``pause`` s rather than send another (raised on the transport's thread; not a
    failure: not retried by the caller, whose retry budget it does not use up, and waited out
    by the runs exporter without holding a place among the runs being sent)."""

    def __init__(self, run_id: str, pause: float) -> None:
        super().__init__(f"run {run_id}: a create that had no answer may still be committed")
        self.pause = pause


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
    # A create of it that had no answer went out before the one we kept: a duplicate may
    # still come after the close's last look (then the journal keeps it for replay to look).
    at_risk: bool = False


class RunIdentity:
    """See the module docstring: the MLflow run of each RLM run, its parent first, created
    once."""

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
        # Replay: runs created where an earlier process may have sent a create too: key -> (run
        # id, our MLflow run), all looked for duplicates in one search by recheck_all().
        self.created_uncertain: dict[str, tuple[str, str]] = {}
        # Runs whose create answer was lost: a server may still commit such a create after the
        # run's end; each is looked up once more, ``late_window`` s after that create was sent.
        self.late_window = late_window
        self.suspects: dict[str, _Suspect] = {}
        self._creating: dict[int, anyio.Event] = {}  # runs being created (see _ensure_run)
        # Closing against a deadline: whether a run created now can still be ended in time
        # (asked on the transport's thread right before the create goes out; if not, the run
        # is kept for replay, which creates it ended, rather than left RUNNING).
        # (With a time: whether a run created then could still be ended in time.)
        self.time_to_create: TimeToCreate | None = None
        # Closing: what learns how long a run takes from its create going out to its end's
        # answer (only runs created while it is set are timed).
        self.ended_in: Callable[[float], None] | None = None
        # ... and what learns, before any run has ended, how long a create took to be answered.
        self.created_in: Callable[[float], None] | None = None

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
            state.answered = None  # the answer was taken
            if state.create_began is not None and self.created_in is not None:
                self.created_in(time.monotonic() - state.create_began)
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
            state.answered = None
        self.counts.runs_created += 1

    def _create_or_find(
        self, state: RunState, experiment_id: str, tags: list[tuple[str, str]]
    ) -> RunRef:
        """On a thread: the run of ``state``, found (after a lost answer) or created."""
        transport = self.transport
        if state.create_out:
            # A create of it that was given up on (a close took its cycle over) is still out:
            # its answer is waited for, neither guessed at by a look (too early, it may not be
            # committed yet) nor doubled by a create, up to the close's deadline.
            raise CreatePending(state.run_id, ANSWER_POLL)
        answered, state.answered = state.answered, None
        if answered is not None:  # ... and it came: that create's run is the run
            return answered
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
            self._wait_for_lost_create(state)
        after_unanswered = state.create_unanswered  # this create may make a second run
        try:
            with begin_only_if(functools.partial(self._may_create, state)):
                ref = transport.create_run(
                    experiment_id,
                    run_name=state.name or _convert.name_of(state.run_id),
                    start_time_ms=state.start_ms,
                    tags=tags,
                )
        except TransientError as exc:
            if exc.maybe_committed:
                state.create_lost_at = time.monotonic()
                state.resent = state.resent or after_unanswered
                state.create_unanswered, state.looks = exc.unanswered, 0
            raise
        finally:
            state.create_out = False
        state.resent = state.resent or after_unanswered
        # Noted at once: if this call was given up, the look below is never sent (and an
        # earlier create, if any, is looked for again at the run's end: _repair).
        state.answered = ref
        state.created_here = True
        state.stored_latest = {}  # a run just created holds no points
        if state.create_lost_at is not None:  # an earlier attempt may have been committed
            found = transport.find_runs(experiment_id, state.key)
            if len(found) > 1:
                ref = state.answered = self._keep_one(state, found, ref.run_uuid)
                state.created_here = False
                state.stored_latest = _latest_of(ref)
                return ref
        if state.uncertain:  # see RunState.uncertain
            self.created_uncertain[state.key] = (state.run_id, ref.run_uuid)
        return ref

    def _wait_for_lost_create(self, state: RunState) -> None:
        """Before a create goes again after one that had no answer at all: while that one may
        still be committed by the server (its late window), it is looked for at doubling
        intervals, not sent again (:class:`CreatePending`).

        A server that holds a request (a write lock, a queue) commits it whenever its turn
        comes; a second create sent meanwhile commits too, and the duplicate is only repaired
        when it is seen, which a close may come too early for. Closing against a deadline that
        the window would leave a run too little time before, it is created at once instead:
        ended in MLflow now beats kept for replay. When even a run created now could not be
        ended in time, the held create is the run's one chance to be ended by this close: it is
        looked for until the deadline (at short intervals), never given up unlooked-for while
        the server may still commit it, a RUNNING run until replay."""
        lost_at = state.create_lost_at
        if lost_at is None or not state.create_unanswered:
            return
        window_ends = lost_at + self.late_window
        left = window_ends - time.monotonic()
        check = self.time_to_create
        if left <= 0:
            return
        if check is None or check(window_ends):
            pause = FIRST_LOOK * 2**state.looks
        elif not check():  # closing, too late for a new run: only the held one can be ended
            pause = FIRST_LOOK * 2 ** min(state.looks, CLOSING_LOOKS)
        else:
            return  # closing: created at once
        if not state.looks:
            logger.debug(
                "rlm-mlflow run %s: its create had no answer; looking for it for up to "
                "%.1f s before sending another",
                state.run_id,
                left,
            )
        state.looks += 1
        raise CreatePending(state.run_id, min(left, pause))

    def _may_create(self, state: RunState) -> bool:
        """On a thread, right before the create of ``state`` goes out: see time_to_create."""
        check = self.time_to_create
        if check is not None:
            if not check():
                return False
            if self.ended_in is not None:
                state.create_began = time.monotonic()
        state.create_out = True  # it goes out now
        return True

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
            at_risk=state.resent,
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
            if suspect.due > suspect.until or (closing and not suspect.at_risk):
                self.suspects.pop(key, None)

    def late_risks(self) -> dict[str, tuple[str, str]]:
        """At the close, after its last look: the runs that may still get a duplicate (a create
        of theirs that had no answer went out before the one kept, and their late horizon is
        not over): key -> run id and our MLflow run."""
        now = time.monotonic()
        return {
            key: (s.run_id, s.keep)
            for key, s in self.suspects.items()
            if s.at_risk and s.until > now
        }

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

    # -- a run that ended, an experiment or run that vanished --------------------------------

    def _forget(self, state: RunState) -> None:
        """A run that ended: keep only its MLflow run, for a late event."""
        self.runs.pop(state.no, None)
        if state.ref is not None:
            self.ended[state.no] = state.ref
            while len(self.ended) > self.ended_memory:
                self.ended.popitem(last=False)

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

    # -- errors --------------------------------------------------------------------------------

    def _reject(self, run_id: str) -> Callable[[str, str], None]:
        shown = run_id if len(run_id) <= 100 else run_id[:97] + "..."

        def reject(reason: str, message: str) -> None:
            self._rejected(reason)
            self.warnings.warn(reason, "rlm-mlflow run %s: %s", shown, message)

        return reject

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

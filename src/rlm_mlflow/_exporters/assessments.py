"""Assessments: what a run achieved, written on its trace as MLflow Feedback and Expectations.

A root run's trace gets Feedback ``total_reward`` (a number) and ``completed`` (a bool), source
CODE ``rlm-mlflow``, once its root span is stored (the trace exists then); a benchmark case's
trace also gets its expected answer (Expectation ``expected_response``) and a judge's verdict
(Feedback ``judge``). The traces table shows them as columns and ``search_traces`` filters on
them (``feedback.total_reward > 0.5``).

Each create makes a new assessment server-side, so exactly once is ours: every assessment
carries a key stable for (trace, name) in its metadata, and one write is "read the trace's keys,
create what is missing", retried whole. A lost answer, a retry or a replay after ``kill -9``
reads the keys again and creates nothing twice. (A trace's first write in a live process skips
the read: nothing can be there yet.) A create that had no answer at all, and is not there when
the keys are read again, may still be stored by the server: it is left to replay rather than
created again. The trace's journal records keep their traces
"done" bit until their assessments are written, so what is not written is replayed.

On a store that merges a trace's info into the trace its spans made (MLflow 3.13 and newer,
read once from the server's ``/version``), a root run's Feedback goes instead with its trace's
info in one request (``StartTraceV3``): its state, times and run link (``mlflow.sourceRun``),
and each assessment under an id made from its key, so writing it again replaces it. One request
per trace instead of one per assessment, and no read before it. For a trace none of whose spans
went out yet (one that begins and ends within a drain), that request goes before its spans
(:meth:`AssessmentsExporter.finish_first`): the store creates the trace in one insert instead of
merging into the one its spans made. Should the store refuse that
request, this exporter goes back to creating them one by one, with the trace linked to its run.

A store without assessments (MLflow older than 3, a transport without the calls) turns them off
with one warning; each assessment not written is counted in ``status()["rejected"]`` under
``assessments_unsupported``; runs and spans go on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

import anyio

from .._calls import Caller
from .._events import RunEnd, completed_of, finite
from .._exceptions import SMALL_ITEM, TOO_LARGE, PermanentError, StoreRefused, TransientError
from .._stats import RateLimitedWarnings
from .._transports.base import (
    ASSESSMENTS_UNSUPPORTED,
    Assessment,
    AssessmentStore,
    TraceEnd,
    TraceUpserts,
    Transport,
)
from .work import DEFERRED, HOLD, SENT, Outcome, RunRefs

logger = logging.getLogger("rlm_mlflow")

#: An assessment's value as MLflow shows it: cut beyond this many characters.
MAX_VALUE_TEXT = 4_000


def assessment_key(trace_id: str, name: str) -> str:
    """The key of the assessment ``name`` on trace ``trace_id`` (one per trace and name)."""
    return f"{trace_id}/{name}"


def value_of(value: object) -> Any:
    """A value MLflow keeps as it is (bool, finite number, text), or its text."""
    if value is None or type(value) in (bool, str):
        return value if type(value) is not str else value[:MAX_VALUE_TEXT]
    found = finite(value)
    if found is not None:
        return found
    if type(value) in (int, float):
        return None  # NaN, infinity: no JSON for them
    try:
        text = str(value)
    except Exception:
        return None
    return text[:MAX_VALUE_TEXT]


def outcome_of(trace_id: str, end: RunEnd) -> list[Assessment]:
    """Feedback ``total_reward`` and ``completed`` of a root run's end, those it has (a run
    ended FAILED or KILLED did not complete)."""
    found: list[Assessment] = []
    reward = finite(end.total_reward)
    if reward is not None:
        key = assessment_key(trace_id, "total_reward")
        found.append(Assessment("total_reward", reward, key))
    completed = completed_of(end)
    if type(completed) is bool:
        found.append(Assessment("completed", completed, assessment_key(trace_id, "completed")))
    return found


class AssessmentsExporter:
    """See the module docstring."""

    def __init__(
        self,
        *,
        caller: Caller,
        warnings: RateLimitedWarnings,
        runs: RunRefs,
        transport: Callable[[], Transport],
    ) -> None:
        self.caller = caller
        self.warnings = warnings
        self.runs = runs
        self._transport = transport
        self.unsupported: str | None = None  # why assessments are off for this store
        self.written = 0
        self.tried: set[str] = set()  # traces whose write was tried and not confirmed
        # Replay: traces no process can have written assessments to (their root's end never
        # went out with spans): their first write needs no read either.
        self.fresh: set[str] = set()
        self._upserts: bool | None = None  # the store writes a trace's info with them
        self._asking: anyio.Lock | None = None  # one ask at a time (made in the loop)

    def _off(self, why: str) -> None:
        self.unsupported = why
        logger.warning(
            "rlm-mlflow: assessments are off for this store (%s); runs and traces are logged "
            "as before",
            why,
        )

    def _kept(self, trace_id: str, exc: Exception) -> Outcome:
        """A trace's assessments not written now, kept for a later try (said, rate-limited)."""
        self.warnings.warn(
            "assessments_deferred",
            "rlm-mlflow: assessments of trace %s not written, kept: %s",
            trace_id,
            exc,
        )
        return DEFERRED

    def _not_written(self, count: int, reason: str) -> None:
        for _ in range(count):
            self.runs.count_rejected(reason)

    async def write(self, trace_id: str, assessments: Sequence[Assessment]) -> Outcome:
        """Write what of ``assessments`` the trace does not hold yet (see the module
        docstring); SENT once they are stored or refused for good (counted)."""
        if not assessments:
            return SENT
        store = self._transport()
        if self.unsupported is None and not isinstance(store, AssessmentStore):
            self._off(f"{type(store).__name__} has no assessments calls")
        if self.unsupported is not None:
            self._not_written(len(assessments), "assessments_unsupported")
            return SENT
        assert isinstance(store, AssessmentStore)
        look = self._may_hold_some(trace_id)
        self.tried.add(trace_id)
        writer = _Writer(store, trace_id, list(assessments), look=look)
        try:
            written = await self.caller.call("write assessments", writer)
        except StoreRefused:
            return HOLD
        except _MayStillBeStored:
            self.warnings.warn(
                "assessments_deferred",
                "rlm-mlflow: assessments of trace %s kept for replay: a create had no answer and "
                "may still be stored",
                trace_id,
            )
            return DEFERRED
        except PermanentError as exc:
            if exc.code == TOO_LARGE and writer.small(trace_id):
                # A gateway's 413 page on a request of a few hundred bytes: it says nothing
                # about the assessment. Kept for replay, never refused.
                return self._kept(trace_id, exc)
            self.tried.discard(trace_id)  # settled: never tried again
            if exc.code == ASSESSMENTS_UNSUPPORTED:
                self._off(self.caller.clean(str(exc)))
                self._not_written(len(assessments), "assessments_unsupported")
                return SENT
            reason = "assessment_no_trace" if exc.code == "RESOURCE_DOES_NOT_EXIST" else None
            self._not_written(len(assessments), reason or "assessment_refused")
            self.warnings.warn(
                reason or "assessment_refused",
                "rlm-mlflow: MLflow refused %d assessments of trace %s: %s",
                len(assessments),
                trace_id,
                exc,
            )
            return SENT
        except TransientError as exc:
            return self._kept(trace_id, exc)
        self.written += written
        self.tried.discard(trace_id)
        return SENT

    def _may_hold_some(self, trace_id: str) -> bool:
        """Whether the trace may hold some of our assessments already. Nothing can be there
        yet on a trace's first try in a live process, nor in a replay of a root whose end never
        went out: no read then."""
        return (self.runs.replaying and trace_id not in self.fresh) or trace_id in self.tried

    async def upserts(self) -> bool:
        """Whether a root's trace info and Feedback go in one request (see the module
        docstring); asked of the store until it says."""
        if self._upserts is not None:
            return self._upserts
        store = self._transport()
        if self.unsupported is not None or not isinstance(store, TraceUpserts):
            return False
        if self._asking is None:
            self._asking = anyio.Lock()
        async with self._asking:  # an ask out already (see Worker._learn_server): its answer
            found: bool | None = self._upserts
            if found is None:
                try:
                    found = await self.caller.once("read server version", store.upserts_traces)
                except Exception:  # a custom store's failure: it cannot say now; asked later
                    return False
                if found is not None:
                    self._upserts = found
            return bool(found)

    async def finish(self, experiment_id: str, end: TraceEnd) -> Outcome:
        """A trace's info with its assessments, in one request; on a refusal, its run link
        and its assessments the other way."""
        store = self._transport()
        if self._upserts and isinstance(store, TraceUpserts):
            read = self._may_hold_some(end.trace_id)
            outcome = await self._write_info(store, experiment_id, end, read=read)
            if outcome is not None:
                return outcome
        return await self._one_by_one(end)  # refused, now or earlier in the same cycle

    async def finish_first(self, experiment_id: str, end: TraceEnd) -> Outcome | None:
        """The same, for a trace whose spans have not gone out yet, before them: the store then
        creates the trace in one insert, where after its spans it has to merge into the trace
        they made (a rollback, then a read and a write per row on MLflow's SQL store). None
        when it is not written this way (no upserts, a trace that may hold assessments
        already, or a store that refuses it for good): :meth:`finish` after the spans then."""
        store = self._transport()
        if not self._upserts or not isinstance(store, TraceUpserts):
            return None
        if self._may_hold_some(end.trace_id):
            return None
        return await self._write_info(store, experiment_id, end, read=False)

    async def _write_info(
        self, store: TraceUpserts, experiment_id: str, end: TraceEnd, *, read: bool
    ) -> Outcome | None:
        """``StartTraceV3`` with the assessments; None when the store refuses it for good
        (upserts are off from now on). ``read``: the trace may hold some already."""
        try:
            if read and isinstance(store, AssessmentStore):
                # Created one by one before (server-made ids): written again under ids made
                # from their keys, they would be copies. Only what the trace lacks goes.
                held = await self.caller.call(
                    "read assessments", store.assessment_keys, end.trace_id
                )
                kept = tuple(a for a in end.assessments if a.key not in held)
                end = dataclasses.replace(end, assessments=kept)
            await self.caller.call("finish trace", store.finish_trace, experiment_id, end)
        except StoreRefused:
            return HOLD
        except PermanentError as exc:
            self._no_upserts(exc)
            return None
        except TransientError as exc:
            return self._kept(end.trace_id, exc)
        self.written += len(end.assessments)
        return SENT

    def _no_upserts(self, exc: Exception) -> None:
        self._upserts = False
        logger.warning(
            "rlm-mlflow: the store refused a trace's info with its assessments (%s); "
            "assessments are created one by one from now on",
            self.caller.clean(str(exc)),
        )

    async def _one_by_one(self, end: TraceEnd) -> Outcome:
        """The trace's run link and its assessments, each its own request."""
        outcome = SENT
        if end.run_uuid:
            outcome = await self.link(end.run_uuid, [end.trace_id])
        if outcome != SENT:
            return outcome
        return await self.write(end.trace_id, end.assessments)

    async def link(self, run_uuid: str, trace_ids: Sequence[str]) -> Outcome:
        """Link traces to one more run (a benchmark's evaluation run)."""
        store = self._transport()
        if not trace_ids or not isinstance(store, AssessmentStore) or self.unsupported:
            return SENT
        try:
            await self.caller.call("link traces", store.link_traces, run_uuid, list(trace_ids))
        except StoreRefused:
            return HOLD
        except PermanentError as exc:
            if exc.code == TOO_LARGE and sum(len(t) + 4 for t in trace_ids) < SMALL_ITEM:
                self.warnings.warn(
                    "trace_link_deferred", "rlm-mlflow: traces not linked, kept: %s", exc
                )
                return DEFERRED  # a gateway's 413 page on a small request: not about it
            self.warnings.warn(
                "trace_link_refused", "rlm-mlflow: MLflow refused a trace link: %s", exc
            )
            return SENT
        except TransientError as exc:
            self.warnings.warn(
                "trace_link_deferred", "rlm-mlflow: traces not linked, kept: %s", exc
            )
            return DEFERRED
        return SENT


class _MayStillBeStored(Exception):
    """A create of an assessment had no answer at all and the trace does not hold it yet: the
    server may still store it, so it is not created again here (raised on the transport's
    thread; not retried)."""


class _Writer:
    """One write: read the trace's keys (unless nothing can be there yet), create what is
    missing. Every later try of it reads first: an answer lost may have hidden a create. A
    create that had no answer at all and is not there when read again may still be stored
    (a queue, a lock): the write stops (:class:`_MayStillBeStored`) rather than create it twice;
    its records stay in the journal, and replay, much later, reads first too."""

    def __init__(
        self, store: AssessmentStore, trace_id: str, assessments: list[Assessment], *, look: bool
    ) -> None:
        self.store = store
        self.trace_id = trace_id
        self.assessments = assessments
        self.look = look
        self.unanswered: set[str] = set()  # keys whose create had no answer
        self.creating: Assessment | None = None  # the create under way (None: the read)

    def small(self, trace_id: str) -> bool:
        """Whether the request under way (the read, or one create) is too small for any body
        limit a gateway sets."""
        if self.creating is None:
            return True
        body = json.dumps(self.creating.body(trace_id), default=str)
        return len(body) < SMALL_ITEM

    def __call__(self) -> int:
        self.creating = None
        held = self.store.assessment_keys(self.trace_id) if self.look else set()
        self.look = True
        if self.unanswered - held:
            raise _MayStillBeStored(", ".join(sorted(self.unanswered - held)))
        written = 0
        for assessment in self.assessments:
            if assessment.key not in held:
                self.creating = assessment
                try:
                    self.store.create_assessment(self.trace_id, assessment)
                except TransientError as exc:
                    if exc.unanswered:
                        self.unanswered.add(assessment.key)
                    raise
                held.add(assessment.key)
                written += 1
        return written

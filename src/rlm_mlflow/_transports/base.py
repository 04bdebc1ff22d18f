"""The MLflow-facing interface: the few calls the exporters make, all blocking, explicit run ids.

Nothing else ever calls MLflow, so a test can swap in an in-memory transport and a deployment
gets the fastest way to its store (:mod:`._rest` for an HTTP server, :mod:`._client` for
anything ``MlflowClient`` reaches, such as the default sqlite store).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from .._exceptions import Postponed, TransientError

#: The tag that holds a run's client-side id, so a retried or replayed create finds the first one.
KEY_TAG = "rlm_mlflow.key"
PARENT_TAG = "mlflow.parentRunId"
#: The metadata key that names an assessment we wrote, so a retry or a replay finds it.
ASSESSMENT_KEY = "rlm_mlflow.key"
#: The code of a store without the assessments endpoint (written nowhere, counted).
ASSESSMENTS_UNSUPPORTED = "ASSESSMENTS_UNSUPPORTED"


#: Set (on the thread that makes a request) around a request worth sending only if what must
#: follow it still fits: see :func:`begin_only_if`.
_begin_if: ContextVar[Callable[[], bool] | None] = ContextVar("rlm_mlflow_begin_if", default=None)


@contextmanager
def begin_only_if(check: Callable[[], bool]) -> Iterator[None]:
    """Around one blocking transport call: right before its request goes out (after any wait
    for a turn among the requests in flight), the transport asks ``check``; if it says no,
    nothing is sent and :class:`~rlm_mlflow._exceptions.Postponed` is raised."""
    token = _begin_if.set(check)
    try:
        yield
    finally:
        _begin_if.reset(token)


class Call:
    """One blocking transport call, as its caller sees it: the caller may give it up (a close
    took its cycle over, a deadline came) while the thread that makes it still waits. A
    transport then stops counting its request among those in flight (see :meth:`on_give_up`),
    and does not send it if it has not gone yet: nobody would read the answer."""

    __slots__ = ("_announced", "_lock", "_then", "_when_out", "given_up", "out")

    def __init__(self, *, announced: bool = False) -> None:
        self._lock = threading.Lock()
        self._then: Callable[[], None] | None = None
        self._when_out: list[Callable[[], None]] = []
        self.given_up = False
        # Whether its transport says when each request goes out (``announces_sends``: through
        # :func:`may_begin`). Else the call counts as out from its start.
        self._announced = announced
        # A request of it went out (or may have). A call given up before one went sends none.
        self.out = not announced

    def begin(self) -> bool:
        """A request of it goes out now (the transport, through :func:`may_begin`): False, and
        it must not be sent, if the caller gave the call up already."""
        with self._lock:
            if self.given_up and self._announced:
                return False
            self.out = True
            then, self._when_out = self._when_out, []
            for fn in then:  # under the lock: once give_up returns, nothing more is marked
                fn()
        return True

    def when_out(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` once a request of the call goes out (now if one has): what the caller
        must then count as possibly stored. ``fn`` runs under the call's lock: set a flag."""
        with self._lock:
            if not self.out:
                self._when_out.append(fn)
                return
            fn()

    def give_up(self) -> None:
        """The caller no longer waits for the answer (any thread)."""
        with self._lock:
            self.given_up = True
            then, self._then = self._then, None
        if then is not None:
            then()  # outside the lock: it takes the transport's own

    def on_give_up(self, then: Callable[[], None] | None) -> bool:
        """Call ``then`` when the call is given up (None: no longer); False, and nothing is
        kept, if it has been already."""
        with self._lock:
            if self.given_up:
                return False
            self._then = then
            return True


#: The call the thread running now makes, when its caller set one (see :func:`calling`).
_call: ContextVar[Call | None] = ContextVar("rlm_mlflow_call", default=None)


@contextmanager
def calling(call: Call) -> Iterator[None]:
    """Around the start of a thread that makes ``call`` (the thread takes the context)."""
    token = _call.set(call)
    try:
        yield
    finally:
        _call.reset(token)


def current_call() -> Call | None:
    """The call this thread makes, if its caller said (see :class:`Call`)."""
    return _call.get()


def may_begin(what: str) -> None:
    """Called by a transport right before it sends ``what``: raises Postponed if the caller's
    :func:`begin_only_if` check says it is too late to begin it."""
    check = _begin_if.get()
    if check is not None and not check():
        raise Postponed(f"{what}: not begun, too late to finish what must follow it")
    call = _call.get()
    if call is not None and not call.begin():
        raise given_up(what)


def given_up(what: str = "") -> TransientError:
    """What a request its caller gave up before it went out raises: never sent, so never
    stored."""
    prefix = f"{what}: " if what else ""
    return TransientError(
        f"{prefix}given up by its caller before it was sent", maybe_committed=False
    )


@dataclass(frozen=True, slots=True)
class Metric:
    key: str
    value: float
    timestamp_ms: int
    step: int


@dataclass(frozen=True, slots=True)
class RunRef:
    """An MLflow run as the exporters know it."""

    run_uuid: str
    artifact_uri: str
    key: str = ""
    status: str = ""
    start_time_ms: int = 0
    has_data: bool = False  # params or metrics logged (used to choose among duplicates)
    # Each metric's latest point as the store ranks them (highest step, then time) when the run
    # was read, as (key, step, timestamp_ms); None when the answer did not say.
    latest: tuple[tuple[str, int, int], ...] | None = None


@dataclass(frozen=True, slots=True)
class Assessment:
    """A Feedback (``kind`` "feedback") or an Expectation ("expectation") on one trace.

    ``key`` is stable for (trace, name): written into the assessment's metadata, it is how a
    retried or replayed write finds the one already stored."""

    name: str
    value: Any
    key: str
    kind: str = "feedback"
    source_type: str = "CODE"
    source_id: str = "rlm-mlflow"
    rationale: str | None = None

    @property
    def assessment_id(self) -> str:
        """An id stable for the key (MLflow's form, ``a-`` and 32 hex digits): written with a
        trace's info, the same assessment written again replaces itself."""
        return "a-" + hashlib.sha256(self.key.encode()).hexdigest()[:32]

    def body(self, trace_id: str) -> dict[str, Any]:
        """The ``assessment`` object of MLflow's REST API (``CreateAssessment``)."""
        document: dict[str, Any] = {
            "trace_id": trace_id,
            "assessment_name": self.name,
            "source": {"source_type": self.source_type, "source_id": self.source_id},
            self.kind: {"value": self.value},
            "metadata": {ASSESSMENT_KEY: self.key},
        }
        if self.rationale:
            document["rationale"] = self.rationale
        return document


@dataclass(frozen=True, slots=True)
class Dataset:
    """A benchmark's dataset as an MLflow run input (what ``mlflow.genai.evaluate`` logs)."""

    name: str
    digest: str
    source: str
    profile: str
    source_type: str = "code"

    def body(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "digest": self.digest,
            "source_type": self.source_type,
            "source": self.source,
            "profile": self.profile,
        }


@runtime_checkable
class Transport(Protocol):
    """Blocking calls to one MLflow tracking store.

    Every method raises only :class:`~rlm_mlflow.TransientError` (worth retrying) or
    :class:`~rlm_mlflow.PermanentError` (not; :class:`~rlm_mlflow.StoreRefused` when the store
    refuses everything), and is safe to call again after a failure.

    A transport may have ``announces_sends = True``: it then calls :func:`may_begin` right
    before each request goes out (after any wait for its turn), and a request a close gives
    up before that is never sent and never counted as possibly stored. Without it, every call
    counts as sent from its start.
    """

    def describe(self) -> str:
        """Where this transport sends data, with credentials redacted."""
        ...

    def get_or_create_experiment(self, name: str) -> str:
        """The id of the active experiment ``name``, created when missing.

        Raises StoreRefused when the experiment exists but is deleted."""
        ...

    def check_experiment(self, experiment_id: str) -> None:
        """A cheap request that succeeds when the store takes our writes to this experiment."""
        ...

    def find_runs(self, experiment_id: str, key: str) -> list[RunRef]:
        """Every active run whose ``KEY_TAG`` is ``key`` (more than one means duplicates)."""
        ...

    def find_runs_by_prefix(self, experiment_id: str, prefix: str) -> list[RunRef]:
        """Every active run whose ``KEY_TAG`` starts with ``prefix`` (one sink's runs)."""
        ...

    def create_run(
        self,
        experiment_id: str,
        *,
        run_name: str,
        start_time_ms: int,
        tags: Sequence[tuple[str, str]],
    ) -> RunRef:
        """Create a run (not idempotent: the exporter looks before it creates again).

        Calls :func:`may_begin` right before the request goes out."""
        ...

    def delete_run(self, run_uuid: str) -> None:
        """Delete a duplicate run."""
        ...

    def run_status(self, run_uuid: str) -> str | None:
        """RUNNING, FINISHED, FAILED, KILLED, ...; None when the run does not exist."""
        ...

    def log_batch(
        self,
        run_uuid: str,
        *,
        metrics: Sequence[Metric] = (),
        params: Sequence[tuple[str, str]] = (),
        tags: Sequence[tuple[str, str]] = (),
    ) -> None:
        """One request, within MLflow's batch limits (the caller splits)."""
        ...

    def metric_history(self, run_uuid: str, key: str) -> list[Metric]:
        """Every stored point of one metric (to check what a lost answer had committed)."""
        ...

    def set_terminated(self, run_uuid: str, *, status: str, end_time_ms: int) -> None:
        """End a run with FINISHED, FAILED or KILLED."""
        ...

    def log_artifact(self, run: RunRef, local_path: str) -> None:
        """Upload a file, or every file of a directory, to the run's artifact root."""
        ...

    def export_spans(self, experiment_id: str, run_uuid: str | None, request: bytes) -> None:
        """Write the spans of a serialized OTLP ``ExportTraceServiceRequest`` (all or nothing),
        and link the traces whose root span it carries to ``run_uuid``. A store that cannot take
        traces raises PermanentError with code ``TRACES_UNSUPPORTED``."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


@runtime_checkable
class RangeReads(Protocol):
    """What a transport adds to read part of a metric's history in one bounded request (a run
    of 100,000 steps is never read whole to check one lost batch). Without it, the whole
    history is read."""

    def metric_history_range(
        self, run_uuid: str, key: str, start_step: int, end_step: int
    ) -> list[Metric] | None:
        """Every stored point of ``key`` with a step in ``[start_step, end_step]``; None when
        the store cannot answer that exactly (no such call, or more points than one answer
        holds): the caller then reads the whole history."""
        ...


@runtime_checkable
class AssessmentStore(Protocol):
    """What a transport adds for assessments and evaluation runs. A transport without these
    calls (one written before them) works as before: assessments are counted as unsupported."""

    def assessment_keys(self, trace_id: str) -> set[str]:
        """The ``ASSESSMENT_KEY`` of every assessment the trace holds. Raises PermanentError
        ``RESOURCE_DOES_NOT_EXIST`` when there is no such trace, ``ASSESSMENTS_UNSUPPORTED``
        when the store has no assessments."""
        ...

    def create_assessment(self, trace_id: str, assessment: Assessment) -> None:
        """Write one assessment (not idempotent: the caller looks first)."""
        ...

    def link_traces(self, run_uuid: str, trace_ids: Sequence[str]) -> None:
        """Link traces to one more run (an evaluation run); linking again changes nothing."""
        ...

    def log_dataset(self, run_uuid: str, dataset: Dataset) -> None:
        """Log a dataset as the run's input; logging it again changes nothing."""
        ...


@dataclass(frozen=True, slots=True)
class TraceEnd:
    """What a trace's info says once its root run has ended, with its assessments: written in
    one request that creates or completes the info and replaces what it held under the same
    keys (see :class:`TraceUpserts`)."""

    trace_id: str
    request_time_ms: int  # its root span's start
    duration_ms: int
    state: str  # "OK" or "ERROR", as its root span's status says
    run_uuid: str | None  # the MLflow run it belongs to (metadata ``mlflow.sourceRun``)
    assessments: tuple[Assessment, ...] = ()
    at_ms: int = 0  # when its assessments were made (its root run's end)


@runtime_checkable
class TraceUpserts(Protocol):
    """A store that writes a trace's info and its assessments in one idempotent request, which
    keeps what the trace's spans put there (MLflow 3.13 and newer merge ``StartTraceV3`` into
    an existing trace; older servers replace its tags, metadata and assessments)."""

    def upserts_traces(self) -> bool | None:
        """Whether :meth:`finish_trace` may be used: None while the store cannot say (no
        answer); never raises."""
        ...

    def finish_trace(self, experiment_id: str, end: TraceEnd) -> None:
        """Write the trace's info and assessments; writing it again changes nothing."""
        ...


def parse_spans_request(request: bytes) -> Any:
    """A serialized ``ExportTraceServiceRequest`` as the protobuf message (for stores written
    to in-process)."""
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

    return trace_service_pb2.ExportTraceServiceRequest.FromString(request)


def key_filter(key: str) -> str:
    """A runs search filter: the runs whose ``KEY_TAG`` is ``key``."""
    return f"tags.`{KEY_TAG}` = '{_quote(key)}'"


def prefix_filter(prefix: str) -> str:
    """A runs search filter: the runs whose ``KEY_TAG`` starts with ``prefix`` and a dash."""
    return f"tags.`{KEY_TAG}` LIKE '{_quote(prefix)}-%'"


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "\\'")

"""Calls to the store: one attempt on a thread, retries with backoff, and what the store's state is.

Every blocking transport call goes through :meth:`Caller.call`, which runs it on a worker thread
(so the event loop that may be the agent's own is never blocked, and a shutdown deadline can walk
away from a call that hangs) and retries transient failures with exponential backoff and full
jitter (tenacity), honouring ``Retry-After``.

``retry_deadline`` is how long one request is retried *while the store otherwise answers*: when
the deadline passes, a cheap probe asks the store; if the store answers, this request is the
problem (it is given up and its data kept for replay); if the store does not answer either, it is
an outage and the request keeps waiting for it (the journal holds what the agent produces
meanwhile, and a shutdown deadline still bounds every wait).

The caller also keeps what ``status()`` reports about the store: healthy, retrying, stalled (a
request has waited long for its answer), or blocked (credentials refused, experiment deleted, the
tracking URI redirects). A refusal of the credentials is a block whether a transport raises
:class:`StoreRefused` or, as custom transports do, a ``PermanentError`` with code
``UNAUTHENTICATED``/``PERMISSION_DENIED`` or status 401/403. A block lifts only when a write
succeeds: credentials that may read but not write pass every read, so a read proves nothing, and
while reads pass during a block, writes are tried again only every :meth:`Caller.write_try_due`.
"""

from __future__ import annotations

import functools
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from anyio.lowlevel import RunVar
from tenacity import RetryCallState

from ._config import redact_text
from ._exceptions import REFUSED_CODES, REFUSED_STATUS, PermanentError, StoreRefused, TransientError
from ._retry import RetryPolicy
from ._stats import RateLimitedWarnings, WorkerCounts
from ._transports.base import Call, calling

logger = logging.getLogger("rlm_mlflow")

T = TypeVar("T")

#: A request waiting longer than this for its answer makes the store "stalled" in status().
STALLED_AFTER = 5.0
#: The calls that only read: their success does not lift a block (writes may still be refused).
READS = frozenset(
    {
        "get or create experiment",
        "check experiment",
        "find runs",
        "find parent run",
        "read metric history",
        "read run status",
        "read server version",
        "read assessments",
    }
)

#: The worker threads of one event loop that calls which may wait long for their turn take at
#: most (a new run's create and traces go last while sinks close: ``http.rank``): the rest of
#: ``_runtime.THREADS`` is left to the calls that end runs, which then always find a thread.
BACKGROUND_THREADS = 24
#: The calls of a runs caller that go with those (the traces caller's all do).
BACKGROUND_CALLS = frozenset({"create run"})
_background_threads: RunVar[anyio.CapacityLimiter] = RunVar("rlm_mlflow_background_threads")


def background_threads() -> anyio.CapacityLimiter:
    """This event loop's limiter for :data:`BACKGROUND_CALLS`."""
    try:
        return _background_threads.get()
    except LookupError:
        limiter = anyio.CapacityLimiter(BACKGROUND_THREADS)
        _background_threads.set(limiter)
        return limiter


def as_refusal(exc: PermanentError) -> StoreRefused | None:
    """The block a permanent error means, when it refuses our credentials (None otherwise)."""
    if isinstance(exc, StoreRefused):
        return exc
    if exc.code in REFUSED_CODES or exc.status in REFUSED_STATUS:
        refused = StoreRefused(str(exc), code=exc.code, status=exc.status)
        refused.__cause__ = exc
        return refused
    return None


def _earliest(waiting: list[tuple[str, float]]) -> tuple[str, float] | None:
    return min(waiting, key=lambda item: item[1]) if waiting else None


class Caller:
    """Runs transport calls for the exporters of one sink."""

    def __init__(
        self,
        policy: RetryPolicy,
        counts: WorkerCounts,
        warnings: RateLimitedWarnings,
        *,
        tracking_uri: str | None,
        probe: Callable[[], Awaitable[None]] | None = None,
        give_up: bool = False,
        background: bool = False,
    ) -> None:
        self.policy = policy
        self.counts = counts
        self.warnings = warnings
        self._uri = tracking_uri
        self.probe = probe
        self.inflight: dict[int, tuple[str, float]] = {}  # requests waiting for an answer
        self.calls: dict[int, Call] = {}  # ... as their transports see them
        # Whether the transport says when each request goes out (see Call): set with it.
        self.announced = False
        # Calls between their tries: since their first failure.
        self.retrying: dict[int, tuple[str, float]] = {}
        self._tokens = itertools.count()
        self.failing_since: float | None = None  # first failure of the current trouble
        self.refused: str | None = None  # why the store refuses everything, while it does
        self.refused_at = 0.0  # when a request was last refused (monotonic)
        self.sleep_until: float | None = None
        # Without a probe, a request past its deadline is given up. With ``give_up`` (replay),
        # every later one too: the store stopped answering, what is left waits for next time.
        self.give_up = give_up
        self.gave_up: str | None = None
        self.background = background  # every call is one of BACKGROUND_CALLS (traces)
        # Calls whose waiter was cancelled while their thread went on (see give_up_left).
        self.left: list[Call] = []
        # How long the latest call that succeeded took, from its turn asked to its answer.
        self.answered_in = 0.0

    def clean(self, text: str) -> str:
        return redact_text(text, self._uri)

    def note_error(self, text: str) -> None:
        self.counts.last_error = self.clean(text)

    # -- state for status() ------------------------------------------------------------------

    def health(self) -> tuple[str, str | None]:
        """``(health, detail)``: why data is or is not moving."""
        if self.refused is not None:
            return "blocked", self.refused
        now = time.monotonic()
        oldest = self.oldest()
        if oldest is not None:
            what, since = oldest
            if now - since >= STALLED_AFTER:
                return "stalled", f"waiting {now - since:.1f} s for the server to answer {what}"
        if self.failing_since is not None:
            error = self.counts.last_error or "requests fail"
            wait = ""
            if self.sleep_until is not None and self.sleep_until > now:
                wait = f"; next attempt in {self.sleep_until - now:.1f} s"
            return (
                "retrying",
                f"failing for {now - self.failing_since:.1f} s ({error}){wait}",
            )
        return "ok", None

    def oldest(self) -> tuple[str, float] | None:
        """``(what, since)`` of the call that has waited longest for its answer, if any."""
        return _earliest(list(self.inflight.values()))

    def oldest_unsettled(self) -> tuple[str, float] | None:
        """``(what, since)`` of the call that has waited longest for its answer, or for its
        next try since it first failed (a refusal the server asks to wait out, an outage)."""
        return _earliest([*self.inflight.values(), *self.retrying.values()])

    def nothing_out(self) -> bool:
        """No request of this caller is out unanswered: each call made now waits for its turn
        among the requests in flight, or has not reached its transport yet (with a transport
        that says when it sends), and those between their tries wait for their next one."""
        return not any(call.out for call in list(self.calls.values()))

    # -- calls ---------------------------------------------------------------------------------

    async def once(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        """One attempt, on a thread; the store's state follows its outcome."""
        self.counts.requests += 1
        token = next(self._tokens)
        began = time.monotonic()
        self.inflight[token] = (what, began)
        try:
            limiter = None
            if self.background or what in BACKGROUND_CALLS:
                limiter = background_threads()
            call = self.calls[token] = Call(announced=self.announced)
            try:
                with calling(call):  # the thread takes this context
                    result = await anyio.to_thread.run_sync(
                        functools.partial(fn, *args), abandon_on_cancel=True, limiter=limiter
                    )
            except anyio.get_cancelled_exc_class():
                self.left.append(call)  # its thread goes on: see give_up_left
                raise
        except PermanentError as exc:
            refused = as_refusal(exc)
            if refused is None:
                raise
            self.refused_by(refused)
            if refused is exc:
                raise
            raise refused from exc
        except TransientError as exc:
            if self.failing_since is None:
                self.failing_since = time.monotonic()
            self.note_error(str(exc))
            raise
        finally:
            self.inflight.pop(token, None)
            self.calls.pop(token, None)
        self.answered_in = time.monotonic() - began
        self.failing_since = None
        if self.refused is not None and what not in READS:
            logger.warning("rlm-mlflow: the store takes our writes again; sending what was held")
            self.refused = None
        return result

    def give_up_left(self) -> None:
        """What the calls left behind were for is done again (a cycle a close took over):
        their requests leave their places in flight, and those not sent yet are not sent.
        (At the close's deadline nothing is given up: a run's end still waiting for its turn
        may yet end the run in MLflow, and replay checks what it did.)"""
        left, self.left = self.left, []
        for call in left:
            call.give_up()

    def refused_by(self, exc: StoreRefused) -> None:
        text = self.clean(str(exc))
        if self.refused is None:
            logger.error("rlm-mlflow: the store refuses our writes: %s", text)
        self.refused = text
        self.refused_at = time.monotonic()
        self.note_error(text)

    def write_try_due(self) -> bool:
        """Blocked while reads pass: whether writes may be tried again (one try per backoff
        period, however often the store is probed)."""
        return time.monotonic() - self.refused_at >= max(self.policy.max_wait, 1.0)

    async def call(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        """Call with retries: see the module docstring. Raises what the last attempt raised."""
        token = next(self._tokens)

        def failed() -> None:
            self.retrying.setdefault(token, (what, time.monotonic()))

        def before_sleep(state: RetryCallState) -> None:
            failed()
            self.counts.retries += 1
            wait = state.upcoming_sleep
            self.sleep_until = time.monotonic() + wait
            outcome = state.outcome
            error = outcome.exception() if outcome is not None else None
            self.warnings.warn(
                "retry",
                "rlm-mlflow %s failed (%s); retrying in %.1f s",
                what,
                self.clean(str(error)),
                wait,
            )

        if self.gave_up is not None:
            raise TransientError(f"{what}: not tried, the store stopped answering ({self.gave_up})")
        try:
            while True:
                try:
                    async for attempt in self.policy.retrying(
                        sleep=anyio.sleep, before_sleep=before_sleep
                    ):
                        with attempt:
                            return await self.once(what, fn, *args)
                except TransientError as exc:
                    if self.probe is None:  # nothing waits out an outage here
                        if self.give_up:
                            self.gave_up = self.clean(str(exc))
                        raise
                    failed()
                    if self.policy.deadline <= 0 or await self.store_answers():
                        raise  # the store answers: this request is the problem
                finally:
                    self.sleep_until = None
                # An outage: keep waiting for the store, probing now and then.
                wait = self.policy.outage_wait()
                self.sleep_until = time.monotonic() + wait
                await anyio.sleep(wait)
        finally:
            self.retrying.pop(token, None)

    async def store_answers(self) -> bool:
        """One probe: does the store answer at all? (StoreRefused propagates.)"""
        probe = self.probe
        assert probe is not None
        try:
            await probe()
        except TransientError:
            return False
        return True

"""HTTP to a tracking server: sessions, the in-flight limit, redirects, fork safety, and what an
answer means.

:func:`classify` is the one place that turns an HTTP answer into a result or an exception:

- 2xx: MLflow's JSON answer (an empty body or one that is not JSON is transient, never a success);
  where no JSON is expected (span exports, artifact uploads), an HTML page is transient too (a
  gateway's sign-in page answered 200);
- 401, 403: our credentials are refused, whatever the body says: the whole store is refused
  (:class:`StoreRefused`), for reads and writes alike;
- 301, 302, 303 (and a 307/308 that cannot be followed): the tracking URI points at the wrong
  address, a configuration error that holds everything (:class:`StoreRefused`, ``REDIRECTED``);
  ``requests`` would have turned the POST into a GET;
- 413: the request is too large for something on the way (``REQUEST_TOO_LARGE``): the caller
  splits it; it says nothing about any one item;
- 408, 425, 429, 5xx but 501: transient, with the server's ``Retry-After``; so is MLflow's 400
  saying its database pool had no connection in time ("QueuePool limit"): the server was busy;
- any other answer refuses the request only when it is MLflow's JSON error (an ``error_code``):
  a proxy's page (an HTML 404 during a redeploy, a JSON 404 without MLflow's fields) is transient.

:class:`HttpClient` makes one request per call, at most :data:`MAX_IN_FLIGHT` at a time per
server (:data:`CLOSING_IN_FLIGHT` while sinks close against a deadline), follows 307/308 to the
same host with the same method and body, and is reset in a forked child (a parent's requests in
flight must not hold the child's slots, locks or connections).
"""

from __future__ import annotations

import email.utils
import itertools
import json
import math

# ``requests`` imports ``netrc`` (and ``shlex``) as it prepares a request, on a transport thread.
# Imported with this module instead (on the thread that builds the sink, see ``_sink``): a
# thread that imports holds the module's import lock, and a child forked meanwhile (the parent's
# first request under way) would find that lock held forever and never send a request.
import netrc  # noqa: F401
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests
import urllib3.exceptions

from .. import _fork
from .._config import redact_text, redact_uri
from .._exceptions import (
    REDIRECTED,
    REFUSED_STATUS,
    TOO_LARGE,
    PermanentError,
    StoreRefused,
    TransientError,
)
from .base import current_call, given_up, may_begin

__all__ = [
    "CLOSING_IN_FLIGHT",
    "MAX_IN_FLIGHT",
    "REDIRECTED",
    "TOO_LARGE",
    "HttpClient",
    "InFlight",
    "classify",
]

#: Requests one process has in flight to one server at most, whatever the number of sinks: a
#: tracking server has a small database pool (5 + 10 by default) and a handful of workers.
MAX_IN_FLIGHT = 4
#: The most requests in flight while sinks close against a deadline. Closing ends every open
#: run: each needs its create, its last batch and its end (three requests), so more at once
#: helps a process with many sinks and a server far away (300 runs in 5 s against a server
#: 200 ms away would need 36 at a time). But a tracking server's database pool holds 15
#: connections by default (5 + 10 overflow): past it, its requests wait 30 s and fail, and a
#: close whose requests hang ends no run at all. So the bound closing uses is found as it goes
#: (:class:`InFlight`), between MAX_IN_FLIGHT and this, which stays within that pool.
CLOSING_IN_FLIGHT = 12
#: Where the closing bound starts.
CLOSING_START = 8
#: An answer slower than this many times the quickest answer seen means the server queues our
#: requests (it is the bottleneck, not the way to it): the closing bound shrinks.
QUEUEING = 2.0
#: Same-host 307/308 redirects followed for one request at most.
MAX_REDIRECTS = 5
TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
MOVED_STATUS = frozenset({301, 302, 303})
FOLLOWED_STATUS = frozenset({307, 308})
#: A gateway that gave up waiting for the server (which may still apply the request).
GATEWAY_TIMEOUT_STATUS = frozenset({504, 524})


def retry_after_seconds(value: str | None, *, now: float | None = None) -> float | None:
    """Parse ``Retry-After``: delta-seconds or an HTTP date. None when absent or invalid."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if math.isnan(seconds):
        return None
    return max(0.0, seconds)


def mlflow_error(body: bytes) -> tuple[str, str] | None:
    """``(error_code, message)`` when ``body`` is MLflow's JSON error, else None.

    MLflow's REST handlers answer ``{"error_code": ..., "message": ...}``; its OTLP endpoint
    (FastAPI) answers ``{"detail": ...}``, reported with the code ``UNKNOWN``."""
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(parsed, dict):
        return None
    code = parsed.get("error_code")
    if isinstance(code, str) and code:
        return code, str(parsed.get("message", ""))[:500]
    detail = parsed.get("detail")
    if isinstance(detail, str) and set(parsed) <= {"detail"}:
        return "UNKNOWN", detail[:500]
    return None


def classify(
    response: requests.Response,
    what: str,
    *,
    want_json: bool = True,
    clean: Any = None,
) -> dict[str, Any]:
    """The parsed answer of a successful request, or the exception its answer means (see the
    module docstring). ``clean`` redacts texts (credentials in the URI)."""
    scrub = clean if clean is not None else (lambda text: text)
    status = response.status_code
    if status in REFUSED_STATUS:
        raise StoreRefused(
            scrub(
                f"{what}: the server refused our credentials (HTTP {status}); set "
                "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN "
                "(a token that may read but not write is refused the same way)"
            ),
            code="UNAUTHENTICATED" if status == 401 else "PERMISSION_DENIED",
            status=status,
        )
    if 200 <= status < 300:
        if not want_json:
            if _is_page(response):  # a gateway's sign-in page answered 200: nothing stored
                raise TransientError(
                    f"{what}: HTTP {status} with a page, not MLflow's answer "
                    f"({_not_mlflow(response)})"
                )
            return {}
        if not response.content:
            raise TransientError(f"{what}: HTTP {status} with an empty body")
        try:
            parsed = response.json()
        except ValueError:
            kind = response.headers.get("Content-Type", "unknown type")
            raise TransientError(
                f"{what}: HTTP {status} with a body that is not JSON ({kind})"
            ) from None
        if not isinstance(parsed, dict):
            raise TransientError(f"{what}: HTTP {status} with an unexpected JSON answer")
        return parsed
    if status in MOVED_STATUS or status in FOLLOWED_STATUS:
        location = redact_uri(response.headers.get("Location") or "") or "nowhere"
        raise StoreRefused(
            scrub(
                f"{what}: the tracking server redirects to {location} (HTTP {status}); set "
                "the tracking URI to the address it redirects to (nothing is sent until then; "
                "everything is kept)"
            ),
            code=REDIRECTED,
            status=status,
        )
    error = mlflow_error(response.content)
    if status == 413:
        raise PermanentError(
            scrub(f"{what}: HTTP 413, the request is too large for the server or a proxy"),
            code=TOO_LARGE,
            status=status,
        )
    if (
        status in TRANSIENT_STATUS
        or (status >= 500 and status != 501)
        or status < 200
        or (status == 400 and _pool_exhausted(response.content))
    ):
        code, message = error or ("", _not_mlflow(response))
        raise TransientError(
            scrub(f"{what}: HTTP {status} {code}: {message}".replace("  ", " ")),
            retry_after=retry_after_seconds(response.headers.get("Retry-After")),
            unanswered=status in GATEWAY_TIMEOUT_STATUS,
        )
    if error is None:  # not MLflow's answer: a proxy's page, a redeploy in progress
        raise TransientError(
            scrub(f"{what}: HTTP {status} that is not MLflow's answer ({_not_mlflow(response)})")
        )
    code, message = error
    if code == "INVALID_PARAMETER_VALUE" and "'active' state" in message:
        code = "RUN_NOT_ACTIVE"  # the run (or its experiment) was deleted
    raise PermanentError(
        scrub(f"{what}: HTTP {status} {code}: {message}"), code=code, status=status
    )


def overloaded(response: requests.Response) -> bool:
    """The answer says the server has more requests than it can take now."""
    status = response.status_code
    return status in (429, 503) or (status == 400 and _pool_exhausted(response.content))


def _pool_exhausted(body: bytes) -> bool:
    """MLflow's answer when its database pool had no connection for a request in time (it says
    BAD_REQUEST, but the request is fine: the server was too busy)."""
    return b"QueuePool limit" in body[:2000]


def _is_page(response: requests.Response) -> bool:
    """An HTML page (a gateway's), which MLflow never answers a write with."""
    kind = response.headers.get("Content-Type", "").lower()
    return "html" in kind or response.content.lstrip()[:1] == b"<"


def _not_mlflow(response: requests.Response) -> str:
    kind = response.headers.get("Content-Type", "no type")
    return f"{response.reason or ''} ({len(response.content)} bytes of {kind})".strip()


def never_sent(exc: requests.RequestException) -> bool:
    """True when the request cannot have reached the server (no connection was made)."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    reason = exc.args[0] if exc.args else None
    reason = getattr(reason, "reason", reason)
    return isinstance(reason, urllib3.exceptions.NewConnectionError)


def _same_origin(a: str, b: str) -> bool:
    """``b`` is on the host of ``a`` (http may become https): credentials may follow."""
    pa, pb = urlsplit(a), urlsplit(b)
    if pa.hostname != pb.hostname:
        return False
    if pa.scheme == pb.scheme:
        return pa.port == pb.port
    return (
        pa.scheme == "http"
        and pb.scheme == "https"
        and pa.port in (None, 80)
        and (pb.port in (None, 443))
    )


def rank(path: str) -> int:
    """Which requests go first while sinks close against a deadline (lowest first): a run's
    end, then the rest of a run already created (its batches, its artifact, reads), then
    traces, and a new run's create last: every run created is ended before the deadline's
    time goes to runs that may not fit (those are kept for replay, never left RUNNING)."""
    if path.endswith("/runs/update"):
        return 0
    if path.endswith("/runs/create"):
        return 3
    if "traces" in path:
        return 2
    return 1  # a run's batches, its artifact (before its end), reads


class InFlight:
    """The requests in flight to one server (taken by transport threads only, never by a hook).

    At most :data:`MAX_IN_FLIGHT`; while at least one sink closes against a deadline, a bound
    found as answers come: it grows by one with each answer about as quick as the quickest seen
    (the time goes to the way to the server: more in flight means more done), and shrinks by a
    quarter with each answer that took more than :data:`QUEUEING` times that, or said the server
    is overloaded (the server queues: more in flight would only wait there, and a server past
    its database pool fails requests). Always between MAX_IN_FLIGHT and CLOSING_IN_FLIGHT.

    Requests waiting for a turn go in the order they came; while sinks close, by
    :func:`rank` first."""

    def __init__(self) -> None:
        self._changed = threading.Condition(threading.Lock())
        self._arrivals = itertools.count()
        self._waiting: dict[int, int] = {}  # arrival -> rank of each request waiting
        self.busy = 0
        self.closing = 0  # sinks closing against a deadline
        self.bound = float(CLOSING_START)  # the closing bound found so far
        self.quickest = math.inf  # the quickest answer seen (seconds)

    @property
    def limit(self) -> int:
        return int(self.bound) if self.closing else MAX_IN_FLIGHT

    def _next(self) -> int:
        """The waiting request whose turn comes first."""
        if self.closing:
            return min(self._waiting, key=lambda arrival: (self._waiting[arrival], arrival))
        return min(self._waiting)

    @contextmanager
    def turn(self, rank: int = 1) -> Iterator[None]:
        """Hold one place in flight for one request of ``rank`` (see :func:`rank`).

        A request its caller gives up (see :class:`~.base.Call`) leaves its place at once,
        though its thread still waits for the answer: requests given up on (a cycle a close
        took over) never keep the ends that follow from going. One given up before its turn
        is not sent at all."""
        call = current_call()
        with self._changed:
            arrival = next(self._arrivals)
            self._waiting[arrival] = rank
            try:
                if call is not None and not call.on_give_up(self._wake_all):
                    raise given_up()
                while self.busy >= self.limit or self._next() != arrival:
                    self._changed.wait()
                    if call is not None and call.given_up:
                        raise given_up()
            except TransientError:
                del self._waiting[arrival]
                self._changed.notify_all()  # the next in line may be another
                raise
            del self._waiting[arrival]
            self.busy += 1
            if self._waiting and self.busy < self.limit:
                self._changed.notify_all()  # the next in line may go too
        held = True

        def leave() -> None:
            nonlocal held
            with self._changed:
                if held:
                    held = False
                    self.busy -= 1
                    self._changed.notify_all()

        if call is not None and not call.on_give_up(leave):
            leave()
            raise given_up()
        try:
            yield
        finally:
            if call is not None:
                call.on_give_up(None)
            leave()

    def _wake_all(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def answered(self, seconds: float, overloaded: bool = False) -> None:
        """A request took ``seconds`` to be answered (``overloaded``: the server said so)."""
        with self._changed:
            if not overloaded:
                self.quickest = min(self.quickest, seconds)
            if overloaded or seconds > QUEUEING * self.quickest:
                self.bound = max(float(MAX_IN_FLIGHT), self.bound * 0.75)
            elif self.closing:
                self.bound = min(float(CLOSING_IN_FLIGHT), self.bound + 1.0)
                self._changed.notify_all()

    def hurry(self, closing: bool) -> None:
        """One sink begins (True) or ends (False) closing against a deadline."""
        with self._changed:
            self.closing = max(0, self.closing + (1 if closing else -1))
            self._changed.notify_all()


class HttpClient:
    """Sessions (one per thread), a bound on the requests in flight (:class:`InFlight`),
    same-host 307/308 redirects, and a reset in a forked child."""

    def __init__(
        self,
        base_uri: str,
        *,
        timeout: tuple[float, float],
        headers: Mapping[str, str],
        auth: tuple[str, str] | None,
        verify: bool | str,
        cert: str | None,
    ) -> None:
        self.base_uri = base_uri.rstrip("/")
        self._timeout = timeout
        self._headers = dict(headers)
        self._auth = auth
        self._verify = verify
        self._cert = cert
        self._fresh()
        _fork.register(self, HttpClient.after_fork)

    def _fresh(self) -> None:
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._sessions_lock = threading.Lock()
        self.slots = InFlight()

    def after_fork(self) -> None:
        """In a forked child: the parent's requests in flight hold slots, maybe locks, and its
        connections are shared with the parent; start over (the parent's sockets are left for
        the parent to close)."""
        self._fresh()

    def clean(self, text: str) -> str:
        return redact_text(text, self.base_uri)

    def session(self) -> requests.Session:
        """This thread's HTTP session (connections are reused, one pool per thread)."""
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.headers.update(self._headers)
            if self._auth:
                session.auth = self._auth
            session.verify = self._verify
            if self._cert:
                session.cert = self._cert
            self._local.session = session
            with self._sessions_lock:
                self._sessions.append(session)
        return session

    def send(
        self,
        method: str,
        path: str,
        *,
        data: Any = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> requests.Response:
        """One request (and the same-host 307/308 it is sent on to), never redirected by
        ``requests`` itself (it would turn a POST into a GET). Raises TransientError when no
        answer came."""
        url = self.base_uri + path
        try:
            with self.slots.turn(rank(path)):
                may_begin(f"{method} {path}")
                for _ in range(MAX_REDIRECTS + 1):
                    began = time.monotonic()
                    try:
                        response = self.session().request(
                            method,
                            url,
                            data=data,
                            params=params,
                            headers=dict(headers) if headers else None,
                            timeout=self._timeout,
                            allow_redirects=False,
                        )
                    except requests.Timeout:
                        # No answer in time: the server queues (or is gone); fewer at once.
                        self.slots.answered(time.monotonic() - began, overloaded=True)
                        raise
                    self.slots.answered(time.monotonic() - began, overloaded(response))
                    location = response.headers.get("Location")
                    if response.status_code not in FOLLOWED_STATUS or not location:
                        return response
                    target = urljoin(response.url or url, location)
                    if not _same_origin(url, target) or not _rewind(data):
                        return response  # classify() reports it as a configuration error
                    response.close()
                    url, params = target, None
                return response
        except requests.RequestException as exc:
            sent = not never_sent(exc)
            raise TransientError(
                self.clean(f"{method} {path}: {type(exc).__name__}"),
                maybe_committed=sent,
                unanswered=sent,
            ) from None

    def close(self) -> None:
        with self._sessions_lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()


def _rewind(data: Any) -> bool:
    """The body can be sent again (bytes, text, or a file rewound to its start)."""
    if data is None or isinstance(data, bytes | str):
        return True
    seek = getattr(data, "seek", None)
    if seek is None:
        return False
    try:
        seek(0)
    except OSError:
        return False
    return True

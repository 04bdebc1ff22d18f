"""Exceptions of the MLflow-facing side. None of them ever reaches a hook's caller.

TransportError
├── TransientError   worth retrying: connection refused or reset, timeout, 408, 429, 5xx,
│                    an answer that is not what MLflow sends (an empty body, a login page)
└── PermanentError   retrying this request cannot help: 400-class answers
    └── StoreRefused the store refuses everything for now: credentials refused (401/403),
                     the experiment deleted. Nothing is sent until it changes; nothing is lost.
Postponed            not sent at all: a sink closing against a deadline has no time left for
                     what must follow this request (a run created and never ended). Kept.
"""

from __future__ import annotations

#: MLflow error codes, and HTTP statuses, that refuse our credentials: the whole store, not one
#: request (from MLflow, a proxy, or a custom transport).
REFUSED_CODES = frozenset({"UNAUTHENTICATED", "PERMISSION_DENIED"})
REFUSED_STATUS = frozenset({401, 403})
#: The code of a request too large for the server or a proxy in front of it (HTTP 413): the
#: caller splits it; it says nothing about any one item.
TOO_LARGE = "REQUEST_TOO_LARGE"
#: Characters under which one item alone (a metric point, a short param or tag, a small span)
#: is too small for any body limit a gateway sets: a 413 on it says nothing about the item (the
#: gateway answers every request so), and it is kept for replay, not refused.
SMALL_ITEM = 1024
#: The code of a tracking URI that redirects elsewhere (a configuration error: everything held).
REDIRECTED = "REDIRECTED"


class TransportError(Exception):
    """Raised by a transport when a request to MLflow fails."""


class TransientError(TransportError):
    """Raised when a later attempt may succeed.

    ``retry_after``: seconds the server asked for. ``maybe_committed``: the request reached the
    server and its answer was lost (a read timeout, a reset), so it may have been applied.
    ``unanswered``: no answer came at all for a request that was sent (a read timeout, a
    connection lost after sending, a gateway that timed out): the server may still be working
    on it, and apply it later.
    """

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        maybe_committed: bool = True,
        unanswered: bool = False,
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.maybe_committed = maybe_committed
        self.unanswered = unanswered


class PermanentError(TransportError):
    """Raised when MLflow refused a request and the same request will always be refused."""

    def __init__(self, message: str, *, code: str = "UNKNOWN", status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


class Postponed(TransportError):
    """Raised, before anything is sent, for a request that must not begin now: what has to
    follow it no longer fits in a closing sink's deadline (a run's create, when its end would
    not land in time: the run is kept for replay, which creates it ended, rather than left
    RUNNING). Never retried."""


class StoreRefused(PermanentError):
    """Raised when the store refuses every request for now (credentials, a deleted experiment)."""

"""Exceptions of the MLflow-facing side. None of them ever reaches a hook's caller.

TransportError
├── TransientError   worth retrying: connection refused or reset, timeout, 408, 429, 5xx
└── PermanentError   retrying cannot help: 400-class answers, a store that refuses the data
"""

from __future__ import annotations


class TransportError(Exception):
    """Raised by a transport when a request to MLflow fails."""


class TransientError(TransportError):
    """Raised when a later attempt may succeed (``retry_after``: seconds the server asked for)."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentError(TransportError):
    """Raised when MLflow refused a request and the same request will always be refused."""

    def __init__(self, message: str, *, code: str = "UNKNOWN", status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.status = status

"""Counters the sink keeps about itself, and warnings that cannot flood a log."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("rlm_mlflow")


@dataclass(frozen=True, slots=True)
class SinkStatistics:
    """A snapshot of what the sink has done so far."""

    queue_depth: int
    queue_capacity: int
    accepted: int
    sent: int
    pending: int
    dropped: dict[str, int]
    rejected: dict[str, int]
    spilled: int
    deferred: int
    journal: str | None
    journal_backlog: int
    retries: int
    permanent_failures: int
    requests: int
    runs_open: int
    runs_created: int
    runs_ended: int
    last_error: str | None

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


@dataclass(slots=True)
class Counters:
    """Mutable figures, updated by hooks (under the buffer lock) and by the worker."""

    accepted: int = 0
    sent: int = 0
    processed: int = 0  # events the worker is done with: sent, rejected, lost or deferred
    spilled: int = 0  # events written to the journal only, the memory queue being full
    deferred: int = 0  # events not sent in time, kept in the journal for replay
    retries: int = 0
    permanent_failures: int = 0
    requests: int = 0
    runs_created: int = 0
    runs_ended: int = 0
    last_error: str | None = None
    dropped: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)


class RateLimitedWarnings:
    """Log a warning per reason at most once per ``interval`` seconds, saying how many were hidden.

    Every occurrence is still counted by the caller; this only keeps a log readable when bad input
    or a full queue repeats thousands of times a second.
    """

    def __init__(self, interval: float = 10.0) -> None:
        self._interval = interval
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._hidden: Counter[str] = Counter()

    def warn(self, reason: str, message: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(reason)
            if last is not None and now - last < self._interval:
                self._hidden[reason] += 1
                return
            self._last[reason] = now
            hidden = self._hidden.pop(reason, 0)
        if hidden:
            message += " (%d similar warnings hidden in the last %.0f s)"
            args = (*args, hidden, self._interval)
        logger.warning(message, *args)

"""The retry policy: which failures are retried, how long to wait, when to give up.

Built on tenacity, which stays private to this module. Waits grow exponentially with full jitter
(so many sinks restarting at once do not retry in step), a ``Retry-After`` from the server is
honoured when it asks for longer, and the whole budget is a deadline rather than a count. The
sleep is the worker's own, so a shutdown interrupts a backoff at once.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_delay,
    wait_random_exponential,
)

from ._exceptions import TransientError

#: A server asking for more than this is waited for this long, then asked again.
MAX_RETRY_AFTER = 300.0


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How the worker retries one request."""

    deadline: float = 300.0  # seconds from the first attempt; 0 means one attempt only
    initial: float = 0.5
    max_wait: float = 30.0

    def wait_for(self, state: RetryCallState) -> float:
        backoff = wait_random_exponential(multiplier=self.initial, max=self.max_wait)(state)
        outcome = state.outcome
        error = outcome.exception() if outcome is not None else None
        retry_after = getattr(error, "retry_after", None)
        if isinstance(retry_after, int | float) and retry_after > backoff:
            return min(float(retry_after), MAX_RETRY_AFTER)
        return backoff

    def outage_wait(self) -> float:
        """How long to wait between probes while the store does not answer at all."""
        return self.max_wait * random.uniform(0.5, 1.0)

    def retrying(
        self,
        *,
        sleep: Callable[[float], Awaitable[None]],
        before_sleep: Callable[[RetryCallState], None],
    ) -> AsyncRetrying:
        return AsyncRetrying(
            retry=retry_if_exception_type(TransientError),
            wait=self.wait_for,
            stop=stop_after_delay(self.deadline),
            sleep=sleep,
            before_sleep=before_sleep,
            reraise=True,
        )

"""Where an event waits: a bounded, thread-safe queue between the hooks and the worker.

Any thread may put; only the worker takes. A put is a lock, an append and a few integer updates.
Capacity bounds step events only: run starts and run ends are never dropped, and there are at
most two of them per run. anyio's memory streams cannot be used here because their producers must
run in the event loop, while hooks come from any thread.
"""

from __future__ import annotations

import threading
from collections import deque

from ._config import Overflow
from ._events import Event, Step
from ._stats import Counters, RateLimitedWarnings


class EventBuffer:
    """A FIFO of events with a step capacity and an overflow policy."""

    def __init__(
        self,
        capacity: int,
        overflow: Overflow,
        counters: Counters,
        warnings: RateLimitedWarnings,
        *,
        trigger: int,
    ) -> None:
        self.capacity = capacity
        self._overflow = overflow
        self._counters = counters
        self._warnings = warnings
        self._trigger = trigger
        self._lock = threading.Lock()
        self._items: deque[Event] = deque()
        self._steps = 0
        #: Set when the worker should look now: a batch is ready, or a flush or close is asked for.
        self.wake = threading.Event()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def lock(self) -> threading.Lock:
        return self._lock

    def put_step(self, event: Step) -> None:
        with self._lock:
            if self._steps >= self.capacity and not self._make_room():
                self._counters.dropped["queue_full"] += 1
                dropped = True
            else:
                self._items.append(event)
                self._steps += 1
                self._counters.accepted += 1
                dropped = False
            ready = len(self._items) >= self._trigger
        if dropped:
            self._warn_full()
        elif ready and not self.wake.is_set():
            self.wake.set()

    def put(self, event: Event) -> None:
        """Queue a run start or run end: never refused, whatever the capacity."""
        with self._lock:
            self._items.append(event)
            self._counters.accepted += 1

    def _make_room(self) -> bool:
        """Evict the oldest queued step under DROP_OLDEST. Called with the lock held."""
        if self._overflow is not Overflow.DROP_OLDEST:
            return False
        items = self._items
        if isinstance(items[0], Step):
            items.popleft()
        else:
            for index, item in enumerate(items):  # rare: a run start or end is at the front
                if isinstance(item, Step):
                    del items[index]
                    break
            else:
                return False
        self._steps -= 1
        self._counters.processed += 1  # accepted earlier, will never be sent
        self._counters.dropped["queue_full"] += 1
        self._warn_full()
        return True

    def _warn_full(self) -> None:
        self._warnings.warn(
            "queue_full",
            "rlm-mlflow queue is full (%d step events): %s step events; "
            "the tracking server is slower than the agent or unreachable",
            self.capacity,
            "dropping the oldest" if self._overflow is Overflow.DROP_OLDEST else "refusing new",
        )

    def take(self, limit: int) -> list[Event]:
        """Up to ``limit`` events, oldest first."""
        with self._lock:
            items = self._items
            count = min(limit, len(items))
            taken = [items.popleft() for _ in range(count)]
            self._steps -= sum(1 for e in taken if type(e) is Step)
        return taken

    def drain_all(self) -> list[Event]:
        with self._lock:
            taken = list(self._items)
            self._items.clear()
            self._steps = 0
        return taken

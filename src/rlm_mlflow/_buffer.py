"""Where an event waits: a bounded, thread-safe queue between the hooks and the worker.

Any thread may put; only the worker takes. A put is a lock, a journal append (one ``os.write``),
a deque append and a few integer updates. anyio's memory streams cannot be used here: their
producers must run in the event loop, while hooks come from any thread.

Capacity bounds the step events held in memory. With the journal on, nothing is ever dropped:
when memory is full, events are written to the journal only ("spilled") and the worker reads them
back from disk once it has caught up, in order. With the journal off, the overflow policy drops
step events; run starts and run ends are never dropped.
"""

from __future__ import annotations

import logging
import threading
from collections import deque

from ._config import Overflow
from ._events import Event, Step
from ._journal import Journal
from ._stats import Counters, RateLimitedWarnings

logger = logging.getLogger("rlm_mlflow")

#: Sequence number of an event that is in no journal.
NO_SEQ = -1

Item = tuple[int, Event]


class EventBuffer:
    """A FIFO of ``(journal seq, event)`` with a step capacity and an overflow policy."""

    def __init__(
        self,
        capacity: int,
        overflow: Overflow,
        counters: Counters,
        warnings: RateLimitedWarnings,
        *,
        trigger: int,
        journal: Journal | None = None,
    ) -> None:
        self.capacity = capacity
        self._overflow = overflow
        self._counters = counters
        self._warnings = warnings
        self._trigger = trigger
        self.journal = journal
        if journal is not None:
            journal.on_durable = self._on_durable
        self._lock = threading.Lock()
        self._items: deque[Item] = deque()
        self._steps = 0
        self._spill_from: int | None = None  # first seq that is on disk only
        #: Set when the worker should look now: a batch is ready, or a flush or close is asked for.
        self.wake = threading.Event()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def lock(self) -> threading.Lock:
        return self._lock

    @property
    def spilled(self) -> int:
        """Events waiting on disk only."""
        journal, start = self.journal, self._spill_from
        return 0 if journal is None or start is None else journal.write_seq - start

    def put_step(self, event: Step) -> None:
        self._put(event, step=True)

    def put(self, event: Event) -> None:
        """Queue a run start or run end: never refused, whatever the capacity."""
        self._put(event, step=False)

    def _put(self, event: Event, *, step: bool) -> None:
        dropped = evicted = False
        with self._lock:
            journal = self.journal
            if journal is not None:
                if journal.failed is None:
                    seq = journal.append(event)
                else:  # the disk refused a write: go on in memory only
                    self._journal_failed(journal.failed)
                    journal = None
            if journal is not None:
                if self._spill_from is None and (not step or self._steps < self.capacity):
                    self._items.append((seq, event))
                    self._steps += step
                else:
                    if self._spill_from is None:
                        self._spill_from = seq
                    self._counters.spilled += 1
                self._counters.accepted += 1
            elif step and self._steps >= self.capacity and not (evicted := self._make_room()):
                self._counters.dropped["queue_full"] += 1
                dropped = True
            else:
                self._items.append((NO_SEQ, event))
                self._steps += step
                self._counters.accepted += 1
            ready = len(self._items) >= self._trigger or self._spill_from is not None
        if dropped or evicted:
            self._warn_full()
        elif ready and not self.wake.is_set():
            self.wake.set()

    def _journal_failed(self, why: str) -> None:
        """Called with the lock held."""
        self.journal = None
        self._counters.last_error = f"journal write failed: {why}"
        if self._spill_from is not None:
            logger.error("rlm-mlflow: events spilled to the failed journal may be lost")

    def _on_durable(self) -> None:
        """The journal thread wrote records: a worker waiting for spilled ones can read them."""
        if self._spill_from is not None:
            self.wake.set()

    def _make_room(self) -> bool:
        """Evict the oldest queued step under DROP_OLDEST. Called with the lock held."""
        if self._overflow is not Overflow.DROP_OLDEST:
            return False
        items = self._items
        if isinstance(items[0][1], Step):
            items.popleft()
        else:
            for index, (_, item) in enumerate(items):  # rare: a run start or end is in front
                if isinstance(item, Step):
                    del items[index]
                    break
            else:
                return False
        self._steps -= 1
        self._counters.processed += 1  # accepted earlier, will never be sent
        self._counters.dropped["queue_full"] += 1
        return True

    def _warn_full(self) -> None:
        self._warnings.warn(
            "queue_full",
            "rlm-mlflow queue is full (%d step events): %s step events; "
            "the tracking server is slower than the agent or unreachable",
            self.capacity,
            "dropping the oldest" if self._overflow is Overflow.DROP_OLDEST else "refusing new",
        )

    def take(self, limit: int) -> list[Item]:
        """Up to ``limit`` events, oldest first: from memory, else read back from the journal."""
        with self._lock:
            items = self._items
            if items:
                count = min(limit, len(items))
                taken = [items.popleft() for _ in range(count)]
                self._steps -= sum(1 for _, e in taken if type(e) is Step)
                return taken
            journal, start = self.journal, self._spill_from
            if journal is None or start is None:
                return []
            stop = min(journal.durable_seq, start + limit)
            if stop <= start:  # not written yet: the journal thread wakes the worker when it is
                return []
        read = journal.read(start, stop)  # whole records only: every seq < stop is written
        with self._lock:
            lost = (stop - start) - len(read)
            if lost:
                self._counters.dropped["journal_unreadable"] += lost
                self._counters.processed += lost
            self._spill_from = stop if stop < journal.write_seq else None
        return read

    def drain_all(self) -> list[Item]:
        """Everything still in memory (the spilled part stays on disk for replay)."""
        with self._lock:
            taken = list(self._items)
            self._items.clear()
            self._steps = 0
        return taken

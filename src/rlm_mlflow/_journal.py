"""The write-ahead journal: every accepted event on local disk before its hook returns.

Layout of one journal (one per sink and process, made at the sink's first event)::

    <journal dir>/<time>-<pid>-<prefix>/
        meta.json               key prefix, experiment, tracking URI (no credentials), pid, cwd
        lock                    flock()ed while the sink lives: replay leaves the journal alone
        L0003-S000001.seg       lane 3, segment 1: records of one agent thread
        bench-12.json           while benchmark run 12 is open: the figures of its cases sent
        late-runs.json          runs that may still get a duplicate MLflow run after the close
                                (a create that had no answer went out before the one kept)
        trace-shapes.json       the running traces' shapes under their span budget (replay
                                completes each within what is left of it)

A hook appends its record to its thread's *lane*: a segment file mapped into memory (``mmap``,
``MAP_SHARED``). The write is a memory copy, no system call and no lock, so hooks on eight
threads never queue behind each other; the copy is in the kernel's page cache when the hook
returns, which outlives the process: a ``kill -9`` after a hook returned loses nothing (a power
cut may; see ``fsync``). Segments are allocated in full up front (``posix_fallocate``), so a full
disk shows up as a failed allocation, never as a fault on a write.

Segment files and records are laid out as :mod:`._journal_format` describes. The payload is
written before the header, so a record whose header is there is whole. ``state`` is the
record's progress, updated in place by the worker, for each exporter that needs it (runs always;
traces when the record's ``HFLAG_TRACES`` says so): in flight (a request carrying it was sent;
whether the server committed it is unknown until it answers), then done. Replay sends what is
not done, checks what was in flight against the server before sending it again, and skips what
is done, so nothing is sent twice even to a store that does not deduplicate, and a replay
interrupted half way can simply be run again.

A segment is removed once it is sealed (its lane moved on), every record in it is finished, and
no run whose start it holds is still open or has records left (replay must find every open run
to end it, and each run's start to send the rest).
"""

from __future__ import annotations

import contextlib
import ctypes  # here, not on the keeper's thread (see _madvise_function)
import errno
import fcntl
import itertools
import json
import logging
import mmap
import os
import secrets
import struct
import threading
import time
import weakref
import zlib
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import _fork
from ._config import redact_uri
from ._journal_format import (
    CRC_OFFSET,
    FLAGS_OFFSET,
    FORMAT,
    HFLAG_SPILLED,
    HFLAG_TRACES,
    HFLAG_UNSUMMED,
    MAX_RECORD,
    NEW,
    RECORD,
    RECORD_HEADER_SIZE,
    RUNS_DONE,
    RUNS_IN_FLIGHT,
    SEGMENT_HEADER_SIZE,
    STATE_OFFSET,
    TRACES_DONE,
    TRACES_IN_FLIGHT,
    checksum,
    finished,
    map_segment,
    segment_header,
    segment_name,
    write_private,
)

__all__ = [
    "HFLAG_SPILLED",
    "HFLAG_TRACES",
    "HFLAG_UNSUMMED",
    "RUNS_DONE",
    "RUNS_IN_FLIGHT",
    "TRACES_DONE",
    "TRACES_IN_FLIGHT",
    "Journal",
    "Lane",
    "Segment",
    "default_journal_dir",
    "open_segment",
    "remove_journal",
    "without_credentials",
]

logger = logging.getLogger("rlm_mlflow")

_CRC = struct.Struct("<I")
#: The journal folders this process made last, with the second in their name: a name is never
#: given to two journals of a process (a journal let go when idle is removed, and a new one may
#: come within the same second). Only a name of this second can come again: past
#: :data:`MADE_KEPT`, the oldest of earlier seconds are forgotten.
_MADE: dict[Path, str] = {}
_MADE_LOCK = threading.Lock()  # journals are made on transport threads
MADE_KEPT = 1024
_INTERNAL = 2  # _codec.FLAG_INTERNAL, in a payload's flags byte
_CONTROL_KINDS = frozenset({1, 3})  # _codec.KIND_START, KIND_END: a payload's first byte

#: A record up to this size is summed by its hook (and queued in memory, never read back); a
#: larger one is written unsummed, queued by reference, and summed by the worker as it reads it
#: back (see ``_journal_format``), unless ``fsync`` is on.
SMALL_RECORD = 2048
#: First segment of a lane, and the most a segment grows to (each new one is 4 times larger).
FIRST_SEGMENT = 256 << 10
MAX_SEGMENT = 16 << 20
#: A lane that filled a quarter of its segment (the keeper asked) or all of it (its hook
#: making the next) within this many seconds of the segment's making is in a burst: its next
#: segment is the largest at once, so that its hooks meet one new segment, not three.
BURST = 0.25
#: Lanes kept ready for threads that have none yet (made by the keeper, not by a hook: a system
#: call in a hook costs it a turn of the GIL, 5 ms or more while other threads are busy). Each
#: holds a mapped file, and so a file descriptor: a sink starts with this many, and doubles them
#: (up to SPARE_LANES_MAX) each time a thread found none ready. A process with a sink per
#: runtime, each used from one thread, keeps three descriptors a sink, not ten.
SPARE_LANES = 2
SPARE_LANES_MAX = 8
#: The most a closing journal waits for an upkeep under way to finish.
UPKEEP_WAIT = 1.0


def default_journal_dir() -> Path:
    """``$RLM_MLFLOW_JOURNAL_DIR``, else ``$XDG_STATE_HOME/rlm-mlflow/journal``
    (``~/.local/state/rlm-mlflow/journal``)."""
    explicit = os.environ.get("RLM_MLFLOW_JOURNAL_DIR")
    if explicit:
        return Path(explicit).expanduser()
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state")
    return Path(state) / "rlm-mlflow" / "journal"


class Segment:
    """One mapped segment file of a lane.

    ``pos``, ``written``, ``starts`` and ``sealed`` are written by the lane's thread only;
    ``done``, ``starts_ended`` and the state bytes by the worker only.
    """

    __slots__ = (
        "damaged",
        "done",
        "lane",
        "low_mark",
        "made",
        "mm",
        "number",
        "path",
        "populated",
        "pos",
        "removed",
        "sealed",
        "size",
        "starts",
        "starts_ended",
        "written",
    )

    def __init__(self, lane: int, number: int, path: Path, mm: mmap.mmap) -> None:
        self.lane = lane
        self.number = number
        self.path = path
        self.mm = mm
        self.made = time.monotonic()
        self.size = len(mm)
        self.pos = SEGMENT_HEADER_SIZE
        self.low_mark = self.size // 4  # written past it, the lane asks for its next segment
        self.written = 0
        self.starts = 0
        self.sealed = False
        self.done = 0
        self.starts_ended = 0
        self.removed = False
        self.damaged = False  # replay: bytes in it could not be read; the file stays
        self.populated = False  # its pages faulted in, writable (keeper)

    def mark(self, offset: int, bits: int) -> bool:
        """Add ``bits`` to a record's state; whether that finished it (True once per record:
        a record settled again, or marked by a second path, is not counted twice in ``done``,
        which would let the segment go while one of its records is still to be read)."""
        if self.removed:
            return False
        mm = self.mm
        before = mm[offset + STATE_OFFSET]
        mm[offset + STATE_OFFSET] = state = before | bits
        flags = mm[offset + STATE_OFFSET + 1]
        return finished(state, flags) and not finished(before, flags)

    def is_finished(self, offset: int) -> bool:
        """Whether every exporter the record needs is done with it (a removed segment's are)."""
        if self.removed:
            return True
        mm = self.mm
        return finished(mm[offset + STATE_OFFSET], mm[offset + STATE_OFFSET + 1])

    def sum_unsummed(self, offset: int, payload: bytes) -> None:
        """Worker: give a record its hook wrote unsummed (``HFLAG_UNSUMMED``) its checksum,
        ``payload`` being its bytes as read back. The checksum goes in before the flag is
        cleared, so a crash in between leaves a record that is read as unsummed."""
        if self.removed:
            return
        mm = self.mm
        with contextlib.suppress(ValueError):  # the mapping closed meanwhile: nothing to sum
            flags = mm[offset + FLAGS_OFFSET]
            if not flags & HFLAG_UNSUMMED:
                return
            # In one call: zlib gives up the interpreter lock for it, the hooks run meanwhile.
            crc = zlib.crc32(payload)
            _CRC.pack_into(mm, offset + CRC_OFFSET, crc)
            mm[offset + FLAGS_OFFSET] = flags & ~HFLAG_UNSUMMED

    def payload(self, offset: int) -> bytes:
        """The payload of the record at ``offset`` (a large record is queued by reference)."""
        size = RECORD.unpack_from(self.mm, offset)[0]
        body = offset + RECORD_HEADER_SIZE
        return self.mm[body : body + size]

    def populate(self) -> None:
        """Fault every page of a fresh segment in, writable, before any hook writes there
        (keeper, before the segment is handed out): a first write to a page costs
        a page fault of several microseconds, a few of them for a large record.

        ``madvise(MADV_POPULATE_WRITE)`` (Linux 5.14) through ctypes, which releases the GIL for
        the call (the ``mmap`` module's own ``madvise`` would hold it, and stall every hook);
        elsewhere, zeros written through the file put the pages in the page cache at least."""
        self.populated = True
        if _populate_write(self.mm, 0, self.size):
            return
        zeros = bytes(1 << 20)
        fd = os.open(self.path, os.O_WRONLY)
        try:
            for start in range(SEGMENT_HEADER_SIZE, self.size, len(zeros)):
                os.pwrite(fd, zeros[: min(len(zeros), self.size - start)], start)
        finally:
            os.close(fd)

    def populate_ahead(self) -> None:
        """Fault in the pages of a segment in use that no one populated (made by a hook, before
        the keeper came), from just past where its writer is now: ``MADV_POPULATE_WRITE`` leaves
        the bytes as they are, so the hook may write meanwhile. Nothing where it is not there."""
        self.populated = True
        start = min(self.size, (self.pos // mmap.PAGESIZE + 1) * mmap.PAGESIZE)
        if start < self.size and not self.removed:
            with contextlib.suppress(ValueError, BufferError):  # closed meanwhile
                _populate_write(self.mm, start, self.size - start)

    @property
    def finished(self) -> bool:
        """Sealed, every record finished, no open run's start in it: the file can go."""
        return (
            self.sealed
            and self.done >= self.written
            and self.starts_ended >= self.starts
            and not self.removed
            and not self.damaged
        )

    def release_if_finished(self) -> None:
        """Remove the segment's file once it is :attr:`finished` (worker)."""
        if not self.finished:
            return
        self.removed = True
        with contextlib.suppress(ValueError, BufferError):
            self.mm.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


_MADV_POPULATE_WRITE = 23
_madvise: Any = None


def _madvise_function() -> Any:
    """``(ctypes, madvise)`` where ``MADV_POPULATE_WRITE`` may work here; None where it cannot.

    Called first on the keeper's thread: ``ctypes`` is imported with this module, never there.
    A thread that imports holds the module's import lock, and a child forked meanwhile would
    find that lock held forever (its own keeper, and any thread importing ``ctypes``, stuck)."""
    global _madvise
    if _madvise is None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            function = libc.madvise
            function.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
            function.restype = ctypes.c_int
            _madvise = (ctypes, function)
        except (OSError, AttributeError):
            _madvise = False
    return _madvise or None


def populates_in_place() -> bool:
    """Whether pages can be faulted in while a hook writes to the segment (else only before)."""
    return _madvise_function() is not None


def _populate_write(mm: mmap.mmap, start: int, length: int) -> bool:
    global _madvise
    found = _madvise_function()
    if found is None:
        return False
    ctypes, function = found
    view = (ctypes.c_char * length).from_buffer(mm, start)
    address = ctypes.addressof(view)
    del view  # the mapping must stay closable
    if function(address, length, _MADV_POPULATE_WRITE) == 0:
        return True
    if ctypes.get_errno() == errno.EINVAL:
        _madvise = False  # not supported here (an older kernel): never ask again
    return False


class Lane:
    """The records of one agent thread (or, after it died, of the next thread that needs one)."""

    __slots__ = (
        "__weakref__",
        "gone_written",
        "journal",
        "next",
        "number",
        "read_at",
        "read_internal",
        "segment",
        "segments",
        "spill_from",
        "spill_internal",
        "spill_read",
        "spill_written",
    )

    def __init__(self, journal: Journal, number: int, segment: Segment) -> None:
        self.journal = journal
        self.number = number
        self.segment = segment
        self.segments: list[Segment] = [segment]
        self.next: Segment | None = None  # made ahead by the keeper, for when this one is full
        self.gone_written = 0  # records of the removed segments dropped from ``segments``
        # Spilled records: written by the hook (spill_written, spill_from), read by the worker
        # (spill_read, read_at). The lane keeps spilling while the worker has not read them all,
        # so a thread's later events never overtake its spilled ones.
        self.spill_written = 0
        self.spill_read = 0
        self.spill_internal = 0  # spilled records made by the sink itself (hook side)
        self.read_internal = 0  # of those, read back (worker side)
        self.spill_from: tuple[Segment, int] | None = None
        self.read_at: tuple[Segment, int] | None = None

    def write(self, payload: bytes, flags: int) -> tuple[Segment, int] | None:
        """Append one record; ``(segment, offset)``, or None when no segment can be had. Past a
        quarter of the segment, with no next one ready, the keeper is asked (once) to make it,
        so that the hook that fills this one need not."""
        segment = self.segment
        size = len(payload)
        offset = segment.pos
        end = offset + RECORD_HEADER_SIZE + size
        if end > segment.size:
            new = self.journal.next_segment(self, RECORD_HEADER_SIZE + size)
            if new is None:
                return None
            segment = new
            offset = segment.pos
            end = offset + RECORD_HEADER_SIZE + size
        mm = segment.mm
        mm[offset + RECORD_HEADER_SIZE : end] = payload
        if size > self.journal.sum_up_to:
            flags |= HFLAG_UNSUMMED
            crc = 0
        else:
            crc = checksum(payload)
        mm[offset : offset + RECORD_HEADER_SIZE] = RECORD.pack(size, crc, NEW, flags, 0)
        segment.pos = end
        segment.written += 1
        if end > segment.low_mark and self.next is None:
            segment.low_mark = segment.size
            self.journal.ask_upkeep()
        return segment, offset

    # -- worker side -------------------------------------------------------------------------

    def _unread(self) -> Iterator[tuple[Segment, int, int, int]]:
        """``(segment, offset, size, flags)`` of every record from the read position on (spilled
        or not), without moving it."""
        if self.spill_written == self.spill_read:
            return
        start = self.read_at
        if start is None or (self.spill_from is not None and _before(start, self.spill_from)):
            start = self.spill_from
        if start is None:
            return
        segment, offset = start
        segments = self.segments
        index = segments.index(segment) if segment in segments else 0
        while True:
            # A removed segment (every record finished: sent from memory between two spells
            # of spilling) stays listed while spilled records wait: passed over, never read.
            if not segment.removed:
                mm = segment.mm
                while offset < segment.pos:  # looked at again: the agent's thread writes on
                    size, _, _, flags, _ = RECORD.unpack_from(mm, offset)
                    yield segment, offset, size, flags
                    offset += RECORD_HEADER_SIZE + size
                if not segment.sealed:
                    return
                if offset < segment.pos:
                    continue  # written after the look above and before the seal: read them too
            if index + 1 >= len(segments):
                return
            index += 1
            segment, offset = segments[index], SEGMENT_HEADER_SIZE

    def read_spilled(self, limit: int) -> list[tuple[Segment, int, bytes]]:
        """Up to ``limit`` spilled records not read yet, in the order they were written (those
        already finished - sent early, at a close - are passed over)."""
        out: list[tuple[Segment, int, bytes]] = []
        at: tuple[Segment, int] | None = None
        read = 0
        for segment, offset, size, flags in self._unread():
            if len(out) >= limit:
                at = (segment, offset)
                break
            at = (segment, offset + RECORD_HEADER_SIZE + size)
            if not flags & HFLAG_SPILLED:
                continue
            read += 1
            body = offset + RECORD_HEADER_SIZE
            mm = segment.mm
            if mm[body + 1] & _INTERNAL:
                self.read_internal += 1
            if not finished(mm[offset + STATE_OFFSET], flags):
                out.append((segment, offset, mm[body : body + size]))
        if at is not None:
            self.read_at = at
        self.spill_read += read
        return out

    def count_spilled_unsent(self) -> int:
        """Spilled records made by hook calls, not read back yet and not finished (from their
        headers and one byte each: there may be millions, none is decoded)."""
        count = 0
        for segment, offset, _, flags in self._unread():
            mm = segment.mm
            if (
                flags & HFLAG_SPILLED
                and not finished(mm[offset + STATE_OFFSET], flags)
                and not mm[offset + RECORD_HEADER_SIZE + 1] & _INTERNAL
            ):
                count += 1
        return count

    def spilled_unsent(self, *, control_only: bool = False) -> list[tuple[Segment, int, bytes]]:
        """Spilled records not read back yet and not finished: all of them, or only the run
        starts and ends (closing sends those first). The read position does not move."""
        out: list[tuple[Segment, int, bytes]] = []
        for segment, offset, size, flags in self._unread():
            if not flags & HFLAG_SPILLED:
                continue
            mm = segment.mm
            body = offset + RECORD_HEADER_SIZE
            if finished(mm[offset + STATE_OFFSET], flags):
                continue
            if control_only and mm[body] not in _CONTROL_KINDS:
                continue
            out.append((segment, offset, mm[body : body + size]))
        return out


def _before(a: tuple[Segment, int], b: tuple[Segment, int]) -> bool:
    return (a[0].number, a[1]) < (b[0].number, b[1])


class _LaneHolder:
    """Lives in a thread's local storage; when the thread ends, its lane goes back to the pool."""

    __slots__ = ("__weakref__", "lane")

    def __init__(self, lane: Lane) -> None:
        self.lane = lane


def _second() -> str:
    """This second, as journal folder names begin."""
    return time.strftime("%Y%m%dT%H%M%S")


class _Keeper:
    """The thread that makes lanes and segments ahead of the hooks, and faults their pages in,
    for every journal of the process (see :meth:`Journal.ask_upkeep`).

    A hook asks it directly: setting an event is no system call and gives up no turn of the
    GIL. The worker's event loop would answer later, and later still in a burst: it waits for
    its turn of the GIL, then hands the work to a thread that waits for one too, while the
    agent's threads keep writing into pages no one faulted in (a 10 KB record costs its hook
    three page faults, several microseconds each) and make their next segments themselves. The
    keeper needs the GIL only to start each system call: the allocation and the faulting in
    run beside the hooks."""

    def __init__(self) -> None:
        self._asked: deque[weakref.ref[Journal]] = deque()
        self._event = threading.Event()
        self._thread: threading.Thread | None = None
        self._starting = threading.Lock()

    def start(self) -> None:
        """Start the thread if it is not running (at a journal's making, not in a plain hook:
        starting a thread waits for it). A process that cannot start one (at its exit, or at
        its thread limit) goes without: its hooks make their own segments."""
        if self._thread is not None:
            return
        with self._starting:
            if self._thread is None:
                thread = threading.Thread(target=self._run, name="rlm-mlflow-journal", daemon=True)
                try:
                    thread.start()
                except RuntimeError as exc:
                    logger.debug("rlm-mlflow journal: no keeper thread (%s)", exc)
                    return
                self._thread = thread

    def ask(self, journal: Journal) -> None:
        self._asked.append(weakref.ref(journal))
        self._event.set()

    def _run(self) -> None:
        asked, event = self._asked, self._event
        while True:
            event.wait()
            event.clear()
            while asked:
                journal = asked.popleft()()
                if journal is None:
                    continue
                try:
                    journal.keep_ready()
                except Exception:  # a hook that finds nothing ready makes its own segment
                    logger.debug("rlm-mlflow journal: upkeep failed", exc_info=True)
                del journal  # not held while waiting

    def forget(self) -> None:
        """In a forked child: the thread did not come along."""
        self._asked = deque()
        self._event = threading.Event()
        self._thread = None
        self._starting = threading.Lock()


_KEEPER = _Keeper()
_fork.at_fork_in_child(_KEEPER.forget)


def _renew_made_lock() -> None:
    """In a forked child: a thread of the parent may have been making a journal at the fork,
    holding the lock; the child does not have that thread, and would wait for it forever."""
    global _MADE_LOCK
    _MADE_LOCK = threading.Lock()


_fork.at_fork_in_child(_renew_made_lock)


class Journal:
    """The write side of one sink's journal (made at the sink's first event)."""

    def __init__(
        self,
        root: Path,
        *,
        prefix: str,
        experiment: str,
        tracking_uri: str | None,
        fsync: bool = False,
        span_budget: int | None = None,
    ) -> None:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        second = _second()
        name = f"{second}-{os.getpid()}-{prefix[:8]}"
        folder = root / name
        while True:
            try:
                with _MADE_LOCK:
                    if folder in _MADE:  # removed since, in the same second: never reused
                        raise FileExistsError(folder)
                    folder.mkdir(mode=0o700)
                    _MADE[folder] = second
                    while len(_MADE) > MADE_KEPT:
                        oldest = next(iter(_MADE))
                        if _MADE[oldest] == second:
                            break  # every one is of this second
                        del _MADE[oldest]
                break
            except FileExistsError:
                folder = root / f"{name}-{secrets.token_hex(2)}"
        self.folder = folder
        self.prefix = prefix
        self.fsync = fsync
        self.sum_up_to = MAX_RECORD if fsync else SMALL_RECORD  # larger: summed by the worker
        self._lock_fd = os.open(folder / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        meta = {
            "format": FORMAT,
            "prefix": prefix,
            "experiment": experiment,
            "tracking_uri": without_credentials(tracking_uri),
            "pid": os.getpid(),
            "cwd": os.getcwd(),
            "created": time.time(),
            "span_budget": span_budget,  # replay shapes the traces as the sink did
        }
        write_private(folder / "meta.json", json.dumps(meta).encode())
        self.lanes: list[Lane] = []
        self._local = threading.local()
        self._free: deque[Lane] = deque()
        self._lane_numbers = itertools.count()
        self._segment_numbers = itertools.count()
        self.spares = SPARE_LANES  # lanes kept ready (see SPARE_LANES)
        self.failed: str | None = None  # why the disk refused a segment: no more journal writes
        self.closed = False
        self.kept = False  # closed with events not sent in it (for replay)
        self.retiring = False  # idle: the next hook opens a new journal, this one goes
        # Upkeep asked by a hook (a lane past a quarter of its segment, the last spare lane
        # taken), not yet begun by the keeper.
        self.upkeep_asked = False
        self._upkeep = threading.Lock()  # one upkeep at a time; close() waits for it
        # Ready before anyone needs them: threads started together then find a lane each; the
        # keeper faults their pages in.
        self.maintain(populate=False)
        _KEEPER.start()
        self.ask_upkeep()

    # -- lanes -----------------------------------------------------------------------------

    def lane_for_thread(self) -> Lane | None:
        """The lane of the calling thread, made (or taken from a thread that ended) if needed."""
        local = self._local
        holder: _LaneHolder | None = getattr(local, "lane", None)
        if holder is not None:
            return holder.lane
        if self.failed is not None or self.closed:
            return None
        try:
            lane: Lane | None = self._free.pop()
        except IndexError:  # more threads than lanes ready: keep more ready from now on
            self.spares = min(SPARE_LANES_MAX, self.spares * 2)
            lane = self._new_lane()
        if lane is None:
            return None
        if not self._free:
            self.ask_upkeep()
        holder = _LaneHolder(lane)
        weakref.finalize(holder, self._free.append, lane)
        local.lane = holder
        return lane

    def ask_upkeep(self) -> None:
        """Hook side: have the keeper make lanes and segments ahead, and fault their pages in,
        now (a burst of large records fills a segment in a millisecond)."""
        if not self.upkeep_asked:  # asked already: the keeper has not looked yet
            self.upkeep_asked = True
            _KEEPER.ask(self)

    def keep_ready(self) -> None:
        """The keeper: what :meth:`maintain` does, while the journal needs it."""
        while self.upkeep_asked or self.needs_maintenance():
            self.upkeep_asked = False  # a hook that asks from now on is heard again
            if not self.maintain():
                return

    def _new_lane(self, listed: bool = True) -> Lane | None:
        # No lock: numbers are drawn and lanes listed in one step each.
        number = next(self._lane_numbers)
        segment = self._allocate(number, FIRST_SEGMENT)
        if segment is None:
            return None
        lane = Lane(self, number, segment)
        if listed:
            self.lanes.append(lane)
        return lane

    @staticmethod
    def _next_size(old: Segment) -> int:
        if time.monotonic() - old.made < BURST:  # a burst: as few new files as can be
            return MAX_SEGMENT
        return min(max(old.size * 4, FIRST_SEGMENT), MAX_SEGMENT)

    def next_segment(self, lane: Lane, needed: int) -> Segment | None:
        """Seal the lane's segment and give it the next one (ready, or made now)."""
        old = lane.segment
        segment = lane.next
        if segment is not None and segment.size >= SEGMENT_HEADER_SIZE + needed:
            lane.next = None
        else:
            size = max(self._next_size(old), SEGMENT_HEADER_SIZE + needed)
            # No lock: hooks of other lanes making theirs at the same time would queue behind
            # this one's system calls, each waiting for its turn of the GIL.
            segment = self._allocate(lane.number, size)
            if segment is None:
                return None
            self.ask_upkeep()  # made here, unpopulated: the keeper faults its pages in ahead
        lane.segments.append(segment)
        lane.segment = segment
        old.sealed = True
        return segment

    def maintain(self, populate: bool = True) -> bool:
        """The keeper (and a new journal, unpopulated, on its maker's thread): keep spare lanes,
        and a next segment for lanes past a quarter of theirs, ready (pages faulted in), so that
        hooks almost never make a file or take a page fault themselves. Whether anything had to
        be made. Most urgent first: the pages ahead of a hook in a segment no one faulted in,
        then next segments, then spare lanes."""
        with self._upkeep:
            return self._maintain(populate)

    def _maintain(self, populate: bool) -> bool:
        if self.failed is not None or self.closed or self.retiring:
            return False
        made = False
        if populate:
            # Segments a hook made (faster than the keeper could make them),
            # lanes made unpopulated at the journal's start: in place, ahead of the hook.
            made = self._populate_in_use()
        for lane in list(self.lanes):
            segment = lane.segment
            if lane.next is None and segment.pos * 4 > segment.size:
                prepared = self._allocate(lane.number, self._next_size(segment))
                if prepared is None:
                    break
                if populate and not populates_in_place():
                    prepared.populate()  # zeros through the file: before a hook may write there
                # Handed out at once: a hook that fills its segment while the pages are faulted
                # in takes this one, not one it would make (and fault in) itself.
                lane.next = prepared
                made = True
        if populate:
            made = self._populate_in_use() or made
        while len(self._free) < self.spares:
            spare = self._new_lane(listed=False)
            if spare is None:
                break
            if populate:
                spare.segment.populate()
            self.lanes.append(spare)  # handed out only now, its pages in place
            self._free.append(spare)
            made = True
        return made

    def _populate_in_use(self) -> bool:
        """Fault in, ahead of their writers, the pages of lanes' segments and next segments
        that are not yet (those being written first); whether there were any."""
        waiting = [
            segment
            for lane in list(self.lanes)
            for segment in (lane.segment, lane.next)
            if segment is not None and not segment.populated
        ]
        waiting.sort(key=lambda segment: segment.pos == SEGMENT_HEADER_SIZE)
        for segment in waiting:
            segment.populate_ahead()
        return bool(waiting)

    def release_sealed(self) -> None:
        """Worker: remove each sealed segment whose records are all finished. A segment is
        sealed by the hook that finds it full, often after the worker marked its last record
        done: marking cannot see that, so sealed segments are looked at again here. Removed
        segments are then dropped from the lane (their records still counted), unless
        spilled records wait to be read: reading walks the lane's list."""
        for lane in list(self.lanes):
            segments = lane.segments
            for segment in list(segments):
                if segment.sealed:
                    segment.release_if_finished()
            if lane.spill_written != lane.spill_read:
                continue
            for segment in [s for s in segments[:-1] if s.removed]:
                lane.gone_written += segment.written
                segments.remove(segment)  # one step each, as the hook's append to the end

    def needs_maintenance(self) -> bool:
        if self.failed is not None or self.closed or self.retiring:
            return False
        if len(self._free) < self.spares:
            return True
        return any(
            (lane.next is None and lane.segment.pos * 4 > lane.segment.size)
            or not lane.segment.populated
            or (lane.next is not None and not lane.next.populated)
            for lane in list(self.lanes)
        )

    def _allocate(self, lane: int, size: int) -> Segment | None:
        if self.failed is not None or self.closed or size > MAX_RECORD + SEGMENT_HEADER_SIZE:
            return None
        number = next(self._segment_numbers)
        path = self.folder / segment_name(lane, number)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.posix_fallocate(fd, 0, size)
                mm = mmap.mmap(fd, size)
            finally:
                os.close(fd)
        except OSError as exc:
            self.failed = f"{type(exc).__name__}: {exc.strerror or exc}"
            with contextlib.suppress(OSError):
                path.unlink()
            logger.error(
                "rlm-mlflow journal: cannot allocate %s (%s); events from now on are kept in "
                "memory only",
                path,
                self.failed,
            )
            return None
        mm[:SEGMENT_HEADER_SIZE] = segment_header(lane, number)
        return Segment(lane, number, path, mm)

    # -- worker side -------------------------------------------------------------------------

    def count_spilled_unsent(self) -> int:
        return sum(lane.count_spilled_unsent() for lane in list(self.lanes))

    def spilled_unsent(self, *, control_only: bool = False) -> list[tuple[Segment, int, bytes]]:
        """Every lane's :meth:`Lane.spilled_unsent`."""
        return [
            item
            for lane in list(self.lanes)
            for item in lane.spilled_unsent(control_only=control_only)
        ]

    def spill_pending(self) -> bool:
        return any(lane.spill_written != lane.spill_read for lane in list(self.lanes))

    def read_spilled(self, limit: int) -> list[tuple[Segment, int, bytes]]:
        out: list[tuple[Segment, int, bytes]] = []
        for lane in list(self.lanes):
            if len(out) >= limit:
                break
            out.extend(lane.read_spilled(limit - len(out)))
        return out

    def written(self) -> int:
        """Records written so far (it stops moving when the agent is idle)."""
        return sum(
            lane.gone_written + sum(s.written for s in list(lane.segments))
            for lane in list(self.lanes)
        )

    def backlog(self) -> int:
        """Records written and not finished yet."""
        return sum(s.written - s.done for lane in list(self.lanes) for s in list(lane.segments))

    def sync(self) -> None:
        """Flush dirty pages to the device (the ``fsync`` setting: power-loss durability)."""
        for lane in list(self.lanes):
            for segment in list(lane.segments):
                if not segment.removed:
                    with contextlib.suppress(OSError, ValueError):
                        segment.mm.flush()

    def close(self, *, keep: bool) -> None:
        """Unmap everything; remove the journal unless ``keep`` (events not sent are in it)."""
        self.closed = True
        # An upkeep under way ends soon (closed: it makes nothing more); what it made is then
        # seen here. One stuck on the disk is not waited for.
        if self._upkeep.acquire(timeout=UPKEEP_WAIT):
            self._upkeep.release()
        self.kept = keep
        for lane in list(self.lanes):
            lane.segment.sealed = True
            for segment in [*lane.segments, *([lane.next] if lane.next else [])]:
                if segment.removed:
                    continue
                if keep and self.fsync:
                    with contextlib.suppress(OSError, ValueError):
                        segment.mm.flush()
                with contextlib.suppress(ValueError, BufferError):
                    segment.mm.close()
                segment.removed = True
                if keep and segment.written == 0:  # made ahead, never used: not worth keeping
                    with contextlib.suppress(OSError):
                        segment.path.unlink()
        if not keep:
            remove_journal(self.folder)
        if self._lock_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    def forget(self) -> None:
        """In a forked child: let go of the parent's journal without touching its files."""
        self.closed = True
        for lane in list(self.lanes):
            for segment in [*lane.segments, *([lane.next] if lane.next else [])]:
                with contextlib.suppress(ValueError, BufferError):
                    segment.mm.close()
                segment.removed = True
        if self._lock_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)  # the parent still holds its own lock
            self._lock_fd = -1


# -- reading journals back (replay, status) ---------------------------------------------------


def open_segment(path: Path) -> Segment | None:
    """A segment file mapped for reading and marking (replay); None if it is not one."""
    mapped = map_segment(path)
    if mapped is None:
        return None
    mm, lane, number = mapped
    segment = Segment(lane, number, path, mm)
    segment.sealed = True
    return segment


def remove_journal(folder: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        for path in sorted(folder.iterdir()):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    with contextlib.suppress(OSError):
        folder.rmdir()


def without_credentials(uri: str | None) -> str | None:
    """The URI with any user and password removed: secrets never go to disk."""
    if uri is None:
        return None
    redacted = redact_uri(uri)
    if redacted is None or redacted == uri:
        return uri
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "", parts.fragment))

"""The write-ahead journal: every accepted event on local disk before it is sent.

Layout of one journal (one per sink, in its own folder under the journal directory)::

    <journal dir>/<time>-<pid>-<random>/
        meta.json             experiment, tracking URI (credentials removed), pid, format
        lock                  flock()ed by the live sink: replay leaves this journal alone
        seg-00000000.log      records 0 .. 4095
        seg-00000001.log      records 4096 .. 8191, ...
        runs.log              one line per run the worker created ("S key") or ended ("E key")

A record is ``<u32 length><u32 crc32><payload>``, the payload compact JSON. A hook writes its
record with one ``os.write`` to an ``O_APPEND`` file, no fsync: the page cache outlives the
process, so an event whose hook returned survives a SIGKILL (not a power cut). A torn last record
fails its length or checksum and is skipped. The worker marks records done once MLflow has them;
a segment whose records are all done is removed, so disk use follows the backlog. Records that
could not be sent stay, and ``rlm-mlflow replay`` sends them later: every write is idempotent
(runs are found by their key tag, metric points keep their timestamps, params their values).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import numbers
import os
import secrets
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._config import redact_uri
from ._events import Event, RunEnd, RunStart, Step

logger = logging.getLogger("rlm_mlflow")

FORMAT = 1
SEGMENT_RECORDS = 4096
#: How long the journal thread lets records gather before writing them.
GROUP_WINDOW = 0.002
#: How long the journal thread keeps writing every GROUP_WINDOW after the last record.
IDLE_AFTER = 0.5
_HEADER = struct.Struct("<II")
_MAX_RECORD = 64 * 1024 * 1024


def default_journal_dir() -> Path:
    """``$RLM_MLFLOW_JOURNAL_DIR``, else ``$XDG_STATE_HOME/rlm-mlflow/journal``
    (``~/.local/state/rlm-mlflow/journal``)."""
    explicit = os.environ.get("RLM_MLFLOW_JOURNAL_DIR")
    if explicit:
        return Path(explicit).expanduser()
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state")
    return Path(state) / "rlm-mlflow" / "journal"


def _jsonable(value: object) -> Any:
    """For values json cannot encode: numbers as float or int, anything else as its text."""
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    try:
        return str(value)
    except Exception:
        return f"<{type(value).__name__}>"


_dumps = json.JSONEncoder(separators=(",", ":"), default=_jsonable, ensure_ascii=False).encode


def encode(event: Event) -> bytes:
    """One framed record."""
    if type(event) is Step:
        row: list[Any] = [
            "s",
            event.key,
            event.run_id,
            event.timestamp_ms,
            event.step,
            event.reward,
            event.cumulative_reward,
        ]
    elif type(event) is RunStart:
        row = [
            "S",
            event.key,
            event.run_id,
            event.timestamp_ms,
            event.environment,
            event.task_chars,
            event.params,
            event.parent_key,
        ]
    else:
        assert isinstance(event, RunEnd)
        row = [
            "E",
            event.key,
            event.run_id,
            event.timestamp_ms,
            event.status,
            event.completed,
            event.steps,
            event.total_reward,
            event.run_path,
        ]
    payload = _dumps(row).encode("utf-8", "surrogatepass")
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def decode(payload: bytes) -> Event:
    row = json.loads(payload.decode("utf-8", "surrogatepass"))
    kind = row[0]
    if kind == "s":
        return Step(*row[1:7])
    if kind == "S":
        return RunStart(*row[1:8])
    if kind == "E":
        return RunEnd(*row[1:9])
    raise ValueError(f"unknown record kind {kind!r}")


@dataclass(slots=True)
class ReadStats:
    records: int = 0
    torn: int = 0  # records cut short or failing their checksum (a crash while writing)


def read_segment(path: Path, stats: ReadStats, limit: int | None = None) -> Iterator[Event]:
    """The events of one segment (at most ``limit``), stopping at the first torn record."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    offset, size = 0, len(data)
    while offset < size and (limit is None or stats.records < limit):
        if size - offset < _HEADER.size:
            stats.torn += 1
            return
        length, crc = _HEADER.unpack_from(data, offset)
        start = offset + _HEADER.size
        payload = data[start : start + length]
        if length > _MAX_RECORD or len(payload) < length or zlib.crc32(payload) != crc:
            stats.torn += 1
            logger.warning(
                "rlm-mlflow journal %s: torn or corrupt record at byte %d; "
                "the rest of this segment is skipped",
                path,
                offset,
            )
            return
        try:
            event = decode(payload)
        except (ValueError, TypeError, IndexError, UnicodeDecodeError):
            stats.torn += 1
            return
        stats.records += 1
        yield event
        offset = start + length


def _segment_name(index: int) -> str:
    return f"seg-{index:08d}.log"


def segments(folder: Path) -> list[tuple[int, Path]]:
    found = []
    for path in folder.glob("seg-*.log"):
        with contextlib.suppress(ValueError):
            found.append((int(path.stem[4:]), path))
    return sorted(found)


class Journal:
    """The write side of one journal.

    Group commit: ``append`` (called by a hook, with the queue's lock held) only encodes the
    record and queues it; the journal's own thread wakes on the first pending record, lets a
    group gather for ``GROUP_WINDOW`` (2 ms) and writes it with one ``os.write``. A hook thus
    never makes a system call, which would release the GIL while the queue's lock is held and
    make every other agent thread queue up behind it. What a SIGKILL can lose is what was
    appended since the thread's last write: about 2 ms of events, up to about 7 ms when every
    core is busy (one more GIL switch interval).
    """

    def __init__(
        self,
        root: Path,
        *,
        experiment: str,
        tracking_uri: str | None,
        segment_records: int = SEGMENT_RECORDS,
    ) -> None:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        name = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{secrets.token_hex(3)}"
        self.folder = root / name
        self.folder.mkdir(mode=0o700)
        self.segment_records = segment_records
        self._lock_fd = os.open(self.folder / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        meta = {
            "format": FORMAT,
            "experiment": experiment,
            "tracking_uri": _without_credentials(tracking_uri),
            "pid": os.getpid(),
            "cwd": os.getcwd(),
            "created": time.time(),
        }
        _write_private(self.folder / "meta.json", json.dumps(meta).encode())
        self.write_seq = 0  # the seq the next record gets
        self.durable_seq = 0  # every record below it is in a segment file
        self._segment = -1
        self._fd = -1
        self._lock = threading.Lock()  # pending records and done counts; never held over I/O
        self._io_lock = threading.Lock()  # one writer at a time: the thread, or close()
        self._pending: list[bytes] = []
        self._pending_start = 0
        self._done: dict[int, int] = {}  # segment -> records marked done
        self._done_total = 0
        self._prefixes: dict[str, bytes] = {}  # run key -> encoded start of its step records
        self.failed: str | None = None  # set when the disk refused a write: journal off
        self.on_durable: Callable[[], None] | None = None
        self._durable = threading.Condition()
        self._wake = threading.Event()
        self._idle = True  # blocked on _wake (or about to be): a hook must wake it
        self._closing = False
        self._runs_fd = os.open(
            self.folder / "runs.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600
        )
        self._writer = threading.Thread(target=self._write_loop, name="rlm-mlflow-journal")
        self._writer.daemon = True
        self._writer.start()

    # -- hook side (buffer lock held: no system call, no waiting) ----------------------------

    def append(self, event: Event) -> int:
        """Queue one record for the journal thread; return its seq."""
        record = self._encode(event)
        with self._lock:
            seq = self.write_seq
            self._pending.append(record)
            self.write_seq = seq + 1
            first = len(self._pending) == 1
        if first and self._idle:  # the journal thread is blocked: wake it, once
            self._wake.set()
        return seq

    def _encode(self, event: Event) -> bytes:
        """``encode()``, with a fast path for the common step: an int step and float rewards.

        The record's start (kind, key, run id) is the same for every step of a run: it is
        encoded once per run and kept until the run ends. Halves the cost of a step's record.
        """
        if type(event) is Step:
            step, reward, total = event.step, event.reward, event.cumulative_reward
            if (
                type(step) is int
                and type(reward) is float
                and type(total) is float
                and reward - reward == 0.0  # finite: repr() of a finite float is valid JSON
                and total - total == 0.0
            ):
                prefix = self._prefixes.get(event.key)
                if prefix is None:
                    prefix = self._prefixes[event.key] = (
                        f'["s",{_dumps(event.key)},{_dumps(event.run_id)},'.encode()
                    )
                payload = prefix + b"%d,%d,%r,%r]" % (event.timestamp_ms, step, reward, total)
                return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload
        elif type(event) is RunEnd:
            self._prefixes.pop(event.key, None)
        return encode(event)

    # -- the journal thread ------------------------------------------------------------------

    def _write_loop(self) -> None:
        # Idle, the thread blocks until a hook wakes it. Busy, it writes what gathered every
        # GROUP_WINDOW and hooks never wake it (waking a thread costs the hook a GIL hand-off);
        # it goes back to blocking after IDLE_AFTER without a record.
        while not self._closing:
            self._idle = True
            if not self._pending:
                self._wake.wait()
            self._idle = False
            self._wake.clear()
            quiet = 0.0
            while not self._closing and quiet < IDLE_AFTER:
                time.sleep(GROUP_WINDOW)
                quiet = 0.0 if self.write_pending() else quiet + GROUP_WINDOW

    def write_pending(self) -> bool:
        """Write every pending record, in order, one system call per segment touched.

        Returns whether there was anything to write."""
        with self._io_lock:
            with self._lock:
                batch, self._pending = self._pending, []
                seq = self._pending_start
                self._pending_start = seq + len(batch)
            if not batch or self.failed is not None:
                return bool(batch)
            try:
                index = 0
                while index < len(batch):
                    segment = seq // self.segment_records
                    count = min(len(batch) - index, (segment + 1) * self.segment_records - seq)
                    if segment != self._segment:
                        self._open_segment(segment)
                    _write_all(self._fd, b"".join(batch[index : index + count]))
                    index += count
                    seq += count
            except OSError as exc:
                self.failed = str(exc)
                logger.error("rlm-mlflow journal write failed (%s); going on without it", exc)
                return True
        with self._durable:
            self.durable_seq = seq
            self._durable.notify_all()
        callback = self.on_durable
        if callback is not None:
            callback()
        return True

    def wait_durable(self, timeout: float) -> bool:
        """Wait until every record appended so far is in a segment file."""
        target = self.write_seq
        self._wake.set()
        with self._durable:
            return (
                self._durable.wait_for(
                    lambda: self.durable_seq >= target or self.failed is not None, timeout
                )
                and self.failed is None
            )

    def _open_segment(self, segment: int) -> None:
        fd = os.open(
            self.folder / _segment_name(segment), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600
        )
        old, self._fd, self._segment = self._fd, fd, segment
        if old >= 0:
            os.close(old)
        with self._lock:
            self._maybe_remove(segment - 1)

    # -- worker side --------------------------------------------------------------------------

    def mark_done(self, seqs: list[int]) -> None:
        """Records MLflow has (or refused for good): their segments go once all are done."""
        touched = set()
        with self._lock:
            self._done_total += len(seqs)
            for seq in seqs:
                segment = seq // self.segment_records
                self._done[segment] = self._done.get(segment, 0) + 1
                touched.add(segment)
            for segment in touched:
                self._maybe_remove(segment)

    def _maybe_remove(self, segment: int) -> None:
        """Delete a segment whose records are all done and written. ``_lock`` held."""
        if segment < 0 or segment >= self._segment:  # the open segment, or not written yet
            return
        if self._done.get(segment, 0) >= self.segment_records:
            with contextlib.suppress(FileNotFoundError):
                (self.folder / _segment_name(segment)).unlink()
            self._done.pop(segment, None)

    def note_run(self, kind: str, key: str, run_id: str) -> None:
        """``S`` when the worker created a run, ``E`` when it ended one (for replay)."""
        with contextlib.suppress(OSError):
            os.write(self._runs_fd, _dumps([kind, key, run_id]).encode("utf-8", "replace") + b"\n")

    @property
    def backlog(self) -> int:
        """Records written and not yet done."""
        return self.write_seq - self._done_total

    def read(self, start: int, stop: int) -> list[tuple[int, Event]]:
        """Records ``start <= seq < stop`` (below ``durable_seq``), for a worker catching up."""
        out: list[tuple[int, Event]] = []
        seq = start
        while seq < stop:
            segment = seq // self.segment_records
            first = segment * self.segment_records
            end = min(stop, first + self.segment_records)
            path = self.folder / _segment_name(segment)
            for index, event in enumerate(read_segment(path, ReadStats(), end - first)):
                if first + index >= seq:
                    out.append((first + index, event))
            seq = end
        if len(out) < stop - start:
            logger.error(
                "rlm-mlflow journal %s: %d of records %d..%d unreadable",
                self.folder,
                stop - start - len(out),
                start,
                stop - 1,
            )
        return out

    def forget(self) -> None:
        """In a forked child: drop the parent's files without touching them (or its lock)."""
        self._closing = True
        for fd in (self._fd, self._runs_fd, self._lock_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd = self._runs_fd = self._lock_fd = -1

    def close(self, *, keep: bool) -> None:
        """Write what is pending, close files, and remove the journal unless ``keep``."""
        self._closing = True
        self._wake.set()
        self.write_pending()
        for fd in (self._fd, self._runs_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd = self._runs_fd = -1
        if not keep:
            remove_journal(self.folder)
        if self._lock_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1


def read_runs_log(folder: Path) -> tuple[dict[str, str], set[str]]:
    """Runs the worker created (key -> run_id) and the keys of those it ended."""
    created: dict[str, str] = {}
    ended: set[str] = set()
    try:
        lines = (folder / "runs.log").read_bytes().splitlines()
    except FileNotFoundError:
        return created, ended
    for line in lines:
        try:
            kind, key, run_id = json.loads(line)
        except (ValueError, TypeError):
            continue  # a torn last line
        if kind == "S":
            created[key] = run_id
        elif kind == "E":
            ended.add(key)
    return created, ended


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def remove_journal(folder: Path) -> None:
    for path in sorted(folder.iterdir()):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    with contextlib.suppress(OSError):
        folder.rmdir()


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _without_credentials(uri: str | None) -> str | None:
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


def try_lock(folder: Path) -> int | None:
    """Take a journal's lock for replay; None when its sink (or another replay) holds it."""
    try:
        fd = os.open(folder / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None
        raise
    return fd

"""The journal's on-disk format: segment and record headers, reading segments back, and the
files of a journal folder. Used by the writer (:mod:`._journal`), replay and the command line.

Segment file: 16-byte header (``RLMJ``, format, lane, segment), then records::

    length u32 | crc32 u32 | state u8 | flags u8 | reserved u16 | payload (length bytes)

The writer copies the payload in before the header, so a record whose header is there is whole,
and a record cut by a crash has no header (length 0): the end of what was written. The checksum
covers the payload; ``state`` is updated in place as exporters finish with the record.

A large record may be written *unsummed* (``HFLAG_UNSUMMED``, checksum 0): summing 10 KB costs a
hook several microseconds, so the worker sums it when it reads the record back (within a drain
cycle) and clears the flag. A process killed in between leaves the record whole in the page
cache, and its header says so; only a machine crash before the sum (which, without ``fsync``,
may lose any recent record anyway) could leave such a record unchecked. With ``fsync`` on,
hooks sum every record. An unsummed record is read as whole when its header is sound, but is
never taken as the first whole record after damage (only a matching checksum proves that).

Reading back (:func:`scan_segment`) survives damage in the middle of a file (a torn page, bit
rot): a record that fails its checks is skipped by its length when a whole record follows it,
otherwise the scan looks byte by byte for the next whole record (a valid header whose checksum
matches); every record after the damage is still read, and the damaged byte range is reported.
A bad record with no whole record after it is the end of what was written (a write cut short).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import math
import mmap
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger("rlm_mlflow")

FORMAT = 2
MAGIC = b"RLMJ"
SEGMENT_HEADER = struct.Struct("<4sHHII")  # magic, format, lane, segment, reserved
SEGMENT_HEADER_SIZE = SEGMENT_HEADER.size
RECORD = struct.Struct("<IIBBH")

#: zlib gives up the interpreter lock while it sums more than 5 KiB, and a thread that gives
#: it up waits for it again behind any busy thread (up to the 5 ms switch interval): a hook
#: sums a large record in pieces no larger than that, so it keeps the lock.
_CRC_PIECE = 5 * 1024


def checksum(payload: bytes, crc: int = 0) -> int:
    """CRC-32 of a record's payload (``crc``: of what came before it), computed without
    releasing the interpreter lock."""
    if len(payload) <= _CRC_PIECE:
        return zlib.crc32(payload, crc)
    view = memoryview(payload)
    for start in range(0, len(view), _CRC_PIECE):
        crc = zlib.crc32(view[start : start + _CRC_PIECE], crc)
    return crc


RECORD_HEADER_SIZE = RECORD.size
CRC_OFFSET = 4
STATE_OFFSET = 8
FLAGS_OFFSET = 9

NEW = 0
RUNS_IN_FLIGHT = 1
RUNS_DONE = 2
TRACES_IN_FLIGHT = 4
TRACES_DONE = 8
_KNOWN_STATE = RUNS_IN_FLIGHT | RUNS_DONE | TRACES_IN_FLIGHT | TRACES_DONE

HFLAG_SPILLED = 1  # the record went to the journal only (the memory queue was full)
HFLAG_TRACES = 2  # the record is also sent as spans (traces were on when it was written)
HFLAG_UNSUMMED = 4  # written without its checksum (0): the worker sums it on reading it back
_KNOWN_FLAGS = HFLAG_SPILLED | HFLAG_TRACES | HFLAG_UNSUMMED

MAX_RECORD = 64 << 20

_ZEROS = b"\0\0\0\0"
_WINDOW = 1 << 16


def finished(state: int, flags: int) -> bool:
    """Every exporter the record needs is done with it."""
    return bool(state & RUNS_DONE) and (bool(state & TRACES_DONE) or not flags & HFLAG_TRACES)


def segment_name(lane: int, number: int) -> str:
    return f"L{lane:04d}-S{number:06d}.seg"


def segment_header(lane: int, number: int) -> bytes:
    return SEGMENT_HEADER.pack(MAGIC, FORMAT, lane, number, 0)


def never_written(data: bytes | mmap.mmap) -> bool:
    """A segment file made (allocated: zeros) and never given its header: its process was
    stopped in between. Only a segment with its header is handed out, so it holds no record."""
    return not any(data[: SEGMENT_HEADER_SIZE + RECORD_HEADER_SIZE])


def read_segment_header(data: bytes | mmap.mmap) -> tuple[int, int] | None:
    """``(lane, segment number)`` of a segment file's contents; None if it is not one."""
    if len(data) < SEGMENT_HEADER_SIZE:
        return None
    magic, _, lane, number, _ = SEGMENT_HEADER.unpack_from(data)
    if magic != MAGIC:
        return None
    return lane, number


# -- reading back --------------------------------------------------------------------------------


@dataclass(slots=True)
class ScannedRecord:
    path: Path
    offset: int
    state: int
    flags: int
    payload: bytes

    @property
    def finished(self) -> bool:
        return finished(self.state, self.flags)

    @property
    def needs_runs(self) -> bool:
        return not self.state & RUNS_DONE

    @property
    def needs_traces(self) -> bool:
        return bool(self.flags & HFLAG_TRACES) and not self.state & TRACES_DONE


@dataclass(frozen=True, slots=True)
class Damage:
    """Bytes ``[start, end)`` of a segment file that hold no whole record, with whole records
    after them: what was there (one record or more) could not be read."""

    path: Path
    start: int
    end: int

    def __str__(self) -> str:
        return f"{self.path} bytes {self.start}-{self.end}"


@dataclass(slots=True)
class ScanStats:
    records: int = 0
    torn: int = 0  # a bad record at the end of what was written (a write cut short)
    damaged: list[Damage] = field(default_factory=list)  # skipped, whole records after them


def _record_end(
    data: bytes | mmap.mmap, offset: int, size: int, *, summed: bool = False
) -> int | None:
    """Where the whole record at ``offset`` ends; None if there is none there. ``summed``: an
    unsummed record does not count (looking for the first whole record after damage)."""
    if offset + RECORD_HEADER_SIZE > size:
        return None
    length: int
    length, crc, state, flags, reserved = RECORD.unpack_from(data, offset)
    body = offset + RECORD_HEADER_SIZE
    if (
        length == 0
        or reserved
        or state & ~_KNOWN_STATE
        or flags & ~_KNOWN_FLAGS
        or length > MAX_RECORD
        or body + length > size
    ):
        return None
    if flags & HFLAG_UNSUMMED:
        return None if summed or crc else body + length
    if zlib.crc32(data[body : body + length]) != crc:
        return None
    return body + length


def _next_nonzero(data: bytes | mmap.mmap, start: int, size: int) -> int | None:
    """The first byte at or after ``start`` that is not zero; None if there is none."""
    position = start
    while position < size:
        window = data[position : min(size, position + _WINDOW)]
        rest = window.lstrip(b"\0")
        if rest:
            return position + len(window) - len(rest)
        position += len(window)
    return None


def _resync(data: bytes | mmap.mmap, start: int, size: int) -> int | None:
    """The offset of the next whole record at or after ``start``; None if there is none."""
    position = start
    last = size - RECORD_HEADER_SIZE
    while position <= last:
        if data[position : position + 4] == _ZEROS:  # no length starts here: skip the zeros
            nonzero = _next_nonzero(data, position, size)
            if nonzero is None:
                return None
            position = max(position + 1, nonzero - 3)
            continue
        if _record_end(data, position, size, summed=True) is not None:
            return position
        position += 1
    return None


def scan_segment(
    path: Path, stats: ScanStats, data: bytes | mmap.mmap | None = None
) -> Iterator[ScannedRecord]:
    """Every whole record of a segment file (or of ``data``, its contents), in order, passing
    over damaged bytes (recorded in ``stats.damaged``) to the whole records after them."""
    if data is None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return
    size = len(data)
    if read_segment_header(data) is None:
        if never_written(data):
            logger.info("rlm-mlflow journal %s: a segment never written; skipped", path)
            return
        stats.damaged.append(Damage(path, 0, size))
        logger.warning("rlm-mlflow journal %s: not a segment file; skipped", path)
        return
    offset = SEGMENT_HEADER_SIZE
    while offset + RECORD_HEADER_SIZE <= size:
        end = _record_end(data, offset, size)
        if end is not None:
            _, _, state, flags, _ = RECORD.unpack_from(data, offset)
            stats.records += 1
            yield ScannedRecord(path, offset, state, flags, data[offset + RECORD_HEADER_SIZE : end])
            offset = end
            continue
        header = data[offset : offset + RECORD_HEADER_SIZE]
        empty = header == bytes(RECORD_HEADER_SIZE)
        following: int | None = None
        length = RECORD.unpack_from(data, offset)[0]
        by_length = offset + RECORD_HEADER_SIZE + length
        if not empty and 0 < length <= MAX_RECORD and _record_end(data, by_length, size):
            following = by_length  # skipped by its length: the next record is whole
        else:
            following = _resync(data, offset + 1, size)
        if following is None:
            if not empty:
                stats.torn += 1
                logger.warning(
                    "rlm-mlflow journal %s: torn record at byte %d, the end of what was written; "
                    "skipped",
                    path,
                    offset,
                )
            return  # the end of what was written
        damage = Damage(path, offset, following)
        stats.damaged.append(damage)
        logger.warning(
            "rlm-mlflow journal %s: bytes %d-%d hold no whole record (damaged); skipped, the "
            "records after them are read",
            path,
            damage.start,
            damage.end,
        )
        offset = following


# -- the files of a journal ----------------------------------------------------------------------


def journal_segments(folder: Path) -> list[Path]:
    return sorted(folder.glob("L*-S*.seg"))


def map_segment(path: Path) -> tuple[mmap.mmap, int, int] | None:
    """A segment file mapped for reading and marking (replay): ``(mapping, lane, number)``;
    None if it cannot be opened or is not one."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        size = os.fstat(fd).st_size
        if size < SEGMENT_HEADER_SIZE:
            return None
        mm = mmap.mmap(fd, size)
    finally:
        os.close(fd)
    header = read_segment_header(mm)
    if header is None:
        mm.close()
        return None
    return mm, header[0], header[1]


def write_private(path: Path, data: bytes) -> None:
    """A file only its owner may read (mode 0600), written whole or not at all: a disk that
    fills up (or a file size limit) takes part of a write and refuses the rest, and the part
    must never pass for the whole (the caller replaces the file it stands for with it)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            if written <= 0:
                raise OSError(errno.ENOSPC, "nothing written", str(path))
            view = view[written:]
    finally:
        os.close(fd)


def _figures_path(folder: Path, bench: int) -> Path:
    return folder / f"bench-{bench}.json"


def write_figures(folder: Path, kept: dict[int, dict[int, dict[str, float]] | None]) -> None:
    """Beside a journal, each benchmark's case figures (``bench-<run>.json``: case -> name ->
    value), replaced whole; None removes a benchmark's file. A disk that refuses is said and
    passed over: the figures are still in memory, and in the benchmark's end record."""
    if not folder.is_dir():  # the journal went meanwhile (everything sent): nothing to keep
        return
    for bench, cases in kept.items():
        data = None if cases is None else {str(case): f for case, f in cases.items()}
        _replace(_figures_path(folder, bench), data, "a benchmark's figures")


def _replace(path: Path, data: Any, what: str, *, say: bool = True) -> bool:
    """Replace ``path`` whole with ``data`` as JSON (None: remove it); a disk that refuses
    is said (``say``, else only in the debug log) and passed over: False."""
    try:
        if data is None:
            path.unlink(missing_ok=True)
            return True
        temporary = path.with_suffix(".tmp")
        write_private(temporary, json.dumps(data, separators=(",", ":")).encode())
        os.replace(temporary, path)
    except OSError as exc:
        log = logger.warning if say else logger.debug
        log("rlm-mlflow journal: cannot keep %s in %s: %s", what, path, exc)
        with contextlib.suppress(OSError):
            path.with_suffix(".tmp").unlink(missing_ok=True)
        return False
    return True


def read_figures(folder: Path) -> dict[int, dict[int, dict[str, float]]]:
    """What :func:`write_figures` kept beside a journal; a file that cannot be read is said and
    passed over (its benchmark's aggregates then come from the records alone)."""
    out: dict[int, dict[int, dict[str, float]]] = {}
    for path in sorted(folder.glob("bench-*.json")):
        try:
            bench = int(path.stem.removeprefix("bench-"))
            raw = json.loads(path.read_text(encoding="utf-8"))
            out[bench] = {
                int(case): {
                    str(name): float(value)
                    for name, value in figures.items()
                    if isinstance(value, int | float) and math.isfinite(value)
                }
                for case, figures in raw.items()
            }
        except (OSError, ValueError, AttributeError, TypeError) as exc:
            logger.warning("rlm-mlflow journal %s: benchmark figures unreadable (%s)", path, exc)
    return out


#: Beside a journal: how each running trace was shaped under its span budget (see
#: ``TracesExporter.keep_shapes``): root run -> {"used": spans, "runs": {run: [into, forced]}}.
TRACE_SHAPES = "trace-shapes.json"

#: One trace's shape as kept: spans it holds or may hold, and each run's place in it (the
#: shown run it is folded into, itself when shown; its steps that have shown child runs).
TraceShape = tuple[int, dict[int, tuple[int, list[int]]]]


def write_trace_shapes(folder: Path, shapes: dict[int, TraceShape], *, say: bool = True) -> bool:
    """Beside a journal, the shapes of the traces still running, replaced whole (none: the
    file goes); False if the disk refused (said if ``say``)."""
    if not folder.is_dir():
        return True
    data = {
        str(root): {
            "used": used,
            "runs": {str(no): [into, forced] for no, (into, forced) in runs.items()},
        }
        for root, (used, runs) in shapes.items()
    }
    return _replace(folder / TRACE_SHAPES, data or None, "the traces' shapes", say=say)


def read_trace_shapes(folder: Path) -> dict[int, TraceShape]:
    """What :func:`write_trace_shapes` kept; nothing if there is no such file or it cannot be
    read (said: replay then shapes those traces afresh, and they may grow past their budget)."""
    path = folder / TRACE_SHAPES
    out: dict[int, TraceShape] = {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        for root, entry in raw.items():
            runs = {
                int(no): (int(into), [int(step) for step in forced])
                for no, (into, forced) in entry["runs"].items()
            }
            out[int(root)] = (int(entry["used"]), runs)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, AttributeError, TypeError, KeyError) as exc:
        logger.warning("rlm-mlflow journal %s: traces' shapes unreadable (%s)", path, exc)
        return {}
    return out


#: Beside a journal: runs that may still get a duplicate MLflow run after the close (see
#: ``RunIdentity.late_risks``), for replay to look for: key -> [run id, our MLflow run].
LATE_RUNS = "late-runs.json"


def write_late_runs(folder: Path, runs: dict[str, tuple[str, str]]) -> bool:
    """Keep :data:`LATE_RUNS` beside a journal (replaced whole); False when the disk refused
    (said)."""
    path = folder / LATE_RUNS
    temporary = path.with_suffix(".tmp")
    try:
        write_private(temporary, json.dumps({k: list(v) for k, v in runs.items()}).encode())
        os.replace(temporary, path)
    except OSError as exc:
        logger.warning("rlm-mlflow journal: cannot keep %s: %s", path, exc)
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        return False
    return True


def read_late_runs(folder: Path) -> dict[str, tuple[str, str]]:
    """What :func:`write_late_runs` kept (nothing when there is no such file; an unreadable
    file, or entry, is said and passed over)."""
    path = folder / LATE_RUNS
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        logger.warning("rlm-mlflow journal %s: unreadable (%s); passed over", path, exc)
        return {}
    out: dict[str, tuple[str, str]] = {}
    for key, entry in raw.items() if isinstance(raw, dict) else ():
        if isinstance(entry, list) and len(entry) == 2 and all(isinstance(x, str) for x in entry):
            out[str(key)] = (entry[0], entry[1])
        else:
            logger.warning("rlm-mlflow journal %s: entry %r unreadable; passed over", path, key)
    return out


def read_meta(folder: Path) -> dict[str, Any]:
    meta: dict[str, Any] = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    return meta


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

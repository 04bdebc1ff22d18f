"""A journal with damaged bytes in the middle of a segment (a torn page, bit rot): every whole
record after the damage is still read and sent, runs end with their true status, the damage is
reported, and the journal is kept.

The journals are written by a real sink whose server never answers, damaged on disk, then
replayed into a real server."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest

from promises_support import Store, assert_each_once, journal_folders
from rlm_mlflow import MLflowSink, replay
from rlm_mlflow._codec import decode
from rlm_mlflow._events import Step
from rlm_mlflow._journal_format import (
    HFLAG_UNSUMMED,
    RECORD_HEADER_SIZE,
    SEGMENT_HEADER_SIZE,
    ScanStats,
    journal_segments,
    read_late_runs,
    read_trace_shapes,
    scan_segment,
    segment_header,
)
from rlm_mlflow.testing import MlflowServer, free_port

STEPS = 10
DAMAGED_STEP = 5


def kept_journal(journal_dir: Path, experiment: str, run_id: str) -> Path:
    """A run's start, 10 steps and its end, kept in a journal (the server never answers)."""
    sink = MLflowSink(
        enabled=True,
        experiment=experiment,
        tracking_uri=f"http://127.0.0.1:{free_port()}",
        flush_interval=0.1,
        retry_deadline=0.5,
        retry_initial=0.05,
    )
    sink.on_run_start(run_id, task="t", environment="e", params={})
    for number in range(STEPS):
        sink.on_step(run_id, event={"step": number, "reward": 1.0}, cumulative_reward=1.0)
    sink.on_run_end(run_id, result={"completed": True, "steps": STEPS}, run_path=None)
    sink.close(3.0)
    (folder,) = journal_folders(journal_dir)
    return folder


def record_of_step(folder: Path, number: int) -> tuple[Path, int, int]:
    """``(segment file, offset, payload length)`` of the record of step ``number``."""
    for path in journal_segments(folder):
        for record in scan_segment(path, ScanStats()):
            event = decode(record.payload)
            if type(event) is Step and event.step == number:
                return path, record.offset, len(record.payload)
    raise AssertionError(f"no record of step {number} in {folder}")


def damage(path: Path, offset: int, length: int, how: str) -> None:
    with path.open("r+b") as handle:
        if how == "payload":  # bit rot inside the payload: the checksum fails
            handle.seek(offset + RECORD_HEADER_SIZE + length // 2)
            handle.write(b"\xff\x00\xff")
        elif how == "length":  # the length itself is wrong: the scan must find the next record
            handle.seek(offset)
            handle.write(struct.pack("<I", length + 7))
        else:  # zeroed, header and payload (a page never written back)
            handle.seek(offset)
            handle.write(bytes(RECORD_HEADER_SIZE + length))


@pytest.mark.integration
@pytest.mark.parametrize("how", ["payload", "length", "zeroed"])
def test_a_damaged_record_mid_segment_hides_nothing_after_it(
    how: str,
    mlflow_server: MlflowServer,
    store: Store,
    experiment_name: str,
    journal_dir: Path,
) -> None:
    folder = kept_journal(journal_dir, experiment_name, "damaged")
    path, offset, length = record_of_step(folder, DAMAGED_STEP)
    damage(path, offset, length, how)

    report = replay(journal_dir, tracking_uri=mlflow_server.uri)

    run = store.run(experiment_name, "damaged")
    intact = [n for n in range(STEPS) if n != DAMAGED_STEP]
    assert_each_once(store.steps(run), intact)
    assert DAMAGED_STEP not in store.steps(run)
    assert run.info.status == "FINISHED"  # its end, after the damage, was read
    assert report.runs_killed == 0
    assert len(report.damaged) == 1, report
    assert f"{path} bytes {offset}-" in report.damaged[0]
    assert not report.ok
    assert report.kept == [str(folder)]
    assert journal_folders(journal_dir) == [folder]  # kept, for a look at the damage

    again = replay(journal_dir, tracking_uri=mlflow_server.uri)  # nothing sent twice
    assert again.sent == 0
    assert again.damaged == report.damaged
    assert_each_once(store.steps(store.run(experiment_name, "damaged")), intact)


def segment_of(*payloads: bytes, unsummed: frozenset[int] = frozenset()) -> bytearray:
    """A segment file's contents holding these records, with room after them; the records at
    the indexes in ``unsummed`` written as a hook writes a large one (no checksum)."""
    import zlib

    data = bytearray(segment_header(0, 0))
    for index, payload in enumerate(payloads):
        if index in unsummed:
            header = struct.pack("<IIBBH", len(payload), 0, 0, HFLAG_UNSUMMED, 0)
        else:
            header = struct.pack("<IIBBH", len(payload), zlib.crc32(payload), 0, 0, 0)
        data += header + payload
    return data + bytes(4096)


def test_an_unsummed_record_is_read_whole_but_never_found_after_damage(tmp_path: Path) -> None:
    """A record its hook left unsummed is read when the scan comes to it; looking byte by byte
    for the first whole record after damage, only a checksum counts, so the scan goes on to the
    next summed record and reports the unsummed one with the damage."""
    payloads = [bytes([65 + i]) * (20 + i) for i in range(4)]
    data = segment_of(*payloads, unsummed=frozenset({1, 2}))
    records = list(scan_segment(tmp_path / "x.seg", ScanStats(), bytes(data)))
    assert [r.payload for r in records] == payloads
    # Garbage over the first record: the unsummed ones after it cannot vouch for themselves.
    start = SEGMENT_HEADER_SIZE
    data[start : start + RECORD_HEADER_SIZE + 20] = bytes(range(7, 7 + RECORD_HEADER_SIZE + 20))
    stats = ScanStats()
    records = list(scan_segment(tmp_path / "x.seg", stats, bytes(data)))
    assert [r.payload for r in records] == [payloads[3]]
    end = start + sum(RECORD_HEADER_SIZE + len(p) for p in payloads[:3])
    assert [(d.start, d.end) for d in stats.damaged] == [(start, end)]
    # An unsummed record with a checksum in its header is not one a hook wrote.
    data = segment_of(*payloads, unsummed=frozenset({1}))
    offset = SEGMENT_HEADER_SIZE + RECORD_HEADER_SIZE + 20
    data[offset + 4 : offset + 8] = struct.pack("<I", 1)
    stats = ScanStats()
    records = list(scan_segment(tmp_path / "x.seg", stats, bytes(data)))
    assert [r.payload for r in records] == [payloads[0], *payloads[2:]]
    assert len(stats.damaged) == 1


def test_a_write_cut_at_the_end_is_torn_not_damage(tmp_path: Path) -> None:
    """Bytes after the last whole record with no whole record after them are a write cut
    short by a crash: counted torn, never reported as damage."""
    data = segment_of(b"a" * 40, b"b" * 40)
    end = SEGMENT_HEADER_SIZE + 2 * (RECORD_HEADER_SIZE + 40)
    data[end + RECORD_HEADER_SIZE : end + RECORD_HEADER_SIZE + 30] = b"c" * 30  # payload only
    stats = ScanStats()
    records = list(scan_segment(tmp_path / "x.seg", stats, bytes(data)))
    assert [r.payload for r in records] == [b"a" * 40, b"b" * 40]
    assert (stats.torn, stats.damaged) == (0, [])
    data[end : end + 4] = struct.pack("<I", 30)  # a header whose checksum fails, at the end
    stats = ScanStats()
    assert len(list(scan_segment(tmp_path / "x.seg", stats, bytes(data)))) == 2
    assert (stats.torn, stats.damaged) == (1, [])


def test_garbage_mid_segment_is_skipped_to_the_next_whole_record(tmp_path: Path) -> None:
    payloads = [bytes([65 + i]) * (20 + i) for i in range(6)]
    data = segment_of(*payloads)
    start = SEGMENT_HEADER_SIZE + RECORD_HEADER_SIZE + 20  # the second record
    end = start + RECORD_HEADER_SIZE + 21 + RECORD_HEADER_SIZE + 22  # and the third
    data[start:end] = bytes(range(7, 7 + end - start))
    stats = ScanStats()
    records = list(scan_segment(tmp_path / "x.seg", stats, bytes(data)))
    assert [r.payload for r in records] == [payloads[0], *payloads[3:]]
    assert [(d.start, d.end) for d in stats.damaged] == [(start, end)]


@pytest.mark.integration
@pytest.mark.parametrize("left", ["allocated", "empty"])
def test_a_segment_made_and_never_written_is_empty_not_damage(
    mlflow_server: MlflowServer, store: Store, experiment_name: str, journal_dir: Path, left: str
) -> None:
    """A process killed between making a segment file and writing its header (the keeper makes
    lanes and segments ahead, at any moment) leaves a file of zeros, or an empty one when the
    kill came before its allocation (16 MiB take milliseconds). It never held a record: replay
    sends the rest, says nothing is damaged, and removes the journal."""
    folder = kept_journal(journal_dir, experiment_name, "whole")
    (folder / "L0009-S000099.seg").write_bytes(bytes(256 << 10) if left == "allocated" else b"")
    report = replay(journal_dir, tracking_uri=mlflow_server.uri)
    assert report.damaged == []
    assert report.ok, report
    assert_each_once(store.steps(store.run(experiment_name, "whole")), range(STEPS))
    assert journal_folders(journal_dir) == []
    stats = ScanStats()
    assert list(scan_segment(folder / "x.seg", stats, bytes(4096))) == []
    assert stats.damaged == []


def test_benchmark_figures_beside_a_journal_are_read_back_and_damage_is_passed_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """What a worker kept of a benchmark's cases reads back as written; a file cut short is
    said and passed over; a value that is not a finite number is left out."""
    import logging

    from rlm_mlflow._journal_format import read_figures, write_figures

    write_figures(tmp_path, {7: {8: {"reward": 1.0, "tokens": 20.0}, 9: {"reward": 0.0}}})
    write_figures(tmp_path, {11: {12: {"reward": 0.5}}})
    assert read_figures(tmp_path) == {
        7: {8: {"reward": 1.0, "tokens": 20.0}, 9: {"reward": 0.0}},
        11: {12: {"reward": 0.5}},
    }
    write_figures(tmp_path, {11: None})  # its aggregates written: the file goes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench-7.json"]
    (tmp_path / "bench-7.json").write_text('{"8": {"reward": 1.0, "odd": "x", "inf": 1e999}}')
    assert read_figures(tmp_path) == {7: {8: {"reward": 1.0}}}
    (tmp_path / "bench-13.json").write_text('{"14": {"rew')
    with caplog.at_level(logging.WARNING, logger="rlm_mlflow"):
        assert read_figures(tmp_path) == {7: {8: {"reward": 1.0}}}
    assert any("bench-13.json" in r.getMessage() for r in caplog.records)


def test_runs_kept_for_a_late_duplicate_read_back_and_damage_is_passed_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The runs a close kept for replay to look for a late duplicate read back as written; a
    damaged entry is said and passed over, the others are still read; a file cut short is said
    and reads as none (replay then only sends what the journal holds)."""
    import logging

    from rlm_mlflow._journal_format import LATE_RUNS, read_late_runs, write_late_runs

    assert read_late_runs(tmp_path) == {}
    assert write_late_runs(tmp_path, {"p-3": ("held", "abc"), "p-4": ("other", "def")})
    assert read_late_runs(tmp_path) == {"p-3": ("held", "abc"), "p-4": ("other", "def")}
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATE_RUNS]  # no temporary left
    (tmp_path / LATE_RUNS).write_text('{"p-3": ["held", "abc"], "p-4": ["other", 5], "p-5": 1}')
    with caplog.at_level(logging.WARNING, logger="rlm_mlflow"):
        assert read_late_runs(tmp_path) == {"p-3": ("held", "abc")}
    assert sum("unreadable" in r.getMessage() for r in caplog.records) == 2
    (tmp_path / LATE_RUNS).write_text('{"p-3": ["he')
    assert read_late_runs(tmp_path) == {}


def test_a_file_beside_the_journal_is_never_replaced_by_the_part_a_full_disk_took(
    tmp_path: Path,
) -> None:
    """A process whose files may not grow past 64 bytes (``ulimit -f``, as a disk that fills
    up: the first part of a write is taken, the rest refused) replaces the traces' shapes and
    the runs kept for a late duplicate beside its journal. Each write is refused whole: the
    files kept before stay as they were (said once each), never swapped for a cut copy."""
    script = """
import json, resource, sys
from pathlib import Path
from rlm_mlflow._journal_format import write_late_runs, write_trace_shapes
folder = Path(sys.argv[1])
old = {1: (3, {1: (1, [2]), 2: (1, [])})}
assert write_trace_shapes(folder, old) and write_late_runs(folder, {"k": ("r", "u")})
resource.setrlimit(resource.RLIMIT_FSIZE, (64, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
shapes = {root: (40, {n: (1, list(range(30))) for n in range(1, 20)}) for root in range(1, 4)}
late = {"k" * 80: ("r", "u")}
print(json.dumps([write_trace_shapes(folder, shapes), write_late_runs(folder, late)]))
"""
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[false,", "false]"], done.stdout
    assert done.stderr.count("cannot keep") == 2, done.stderr
    left = sorted(path.name for path in tmp_path.iterdir())
    assert left == ["late-runs.json", "trace-shapes.json"]  # no cut copy left over
    assert read_trace_shapes(tmp_path) == {1: (3, {1: (1, [2]), 2: (1, [])})}
    assert read_late_runs(tmp_path) == {"k": ("r", "u")}

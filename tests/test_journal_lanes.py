"""A lane's spilled records, read back by the worker while the agent's thread still writes them,
and a segment's count of finished records, on the journal itself (no sink, no store)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from rlm_mlflow._journal import Journal, Lane, Segment
from rlm_mlflow._journal_format import HFLAG_SPILLED, RUNS_DONE, RUNS_IN_FLIGHT

RECORD = b"x" * 1000


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    made = Journal(tmp_path, prefix="0123456789abcdef", experiment="e", tracking_uri=None)
    yield made
    made.close(keep=False)


def spill(lane: Lane, payload: bytes = RECORD) -> None:
    """Write one spilled record as a hook does when the memory queue is full."""
    where = lane.write(payload, HFLAG_SPILLED)
    assert where is not None
    if lane.spill_written == lane.spill_read:
        lane.spill_from = where
    lane.spill_written += 1


def test_records_written_while_the_worker_reads_their_segment_are_read_before_the_next_one(
    journal: Journal,
) -> None:
    """The worker reads a segment up to where it was written when it came to it; the agent's
    thread writes on meanwhile, fills the segment and goes on in the next one. Every spilled
    record is read, once, in order: none written between the worker's look and the segment's
    seal is passed over (they would wait in the journal until a replay)."""
    lane = journal.lane_for_thread()
    assert lane is not None
    first = lane.segment
    for _ in range(3):
        spill(lane)
    reading = lane._unread()
    seen = [next(reading)]  # the worker is in the first segment, at its first record
    while lane.segment is first:  # the agent fills it and goes on in the next one
        spill(lane)
    spill(lane)
    seen.extend(reading)
    assert len(seen) == lane.spill_written
    assert len({(segment.number, offset) for segment, offset, _, _ in seen}) == len(seen)
    assert all(flags & HFLAG_SPILLED for _, _, _, flags in seen)
    assert [segment for segment, _, _, _ in seen][-1] is lane.segment


def test_a_record_finished_twice_counts_once_and_its_segment_stays_until_all_are(
    journal: Journal,
) -> None:
    """A record settled again (a retry after its outcome was written) is finished once: the
    segment counts it once, so it is not taken for finished - and its file removed, under a
    reader - while another of its records is not."""
    lane = journal.lane_for_thread()
    assert lane is not None
    first = lane.segment
    offsets = []
    while lane.segment is first:
        where = lane.write(RECORD, 0)
        assert where is not None
        if where[0] is first:
            offsets.append(where[1])
    assert first.sealed
    for offset in offsets[:-1]:
        assert first.mark(offset, RUNS_IN_FLIGHT) is False
        assert first.mark(offset, RUNS_DONE) is True
        first.done += 1
        assert first.mark(offset, RUNS_DONE) is False  # already finished: not again
    first.release_if_finished()
    assert not first.removed  # its last record is not finished
    assert first.mark(offsets[-1], RUNS_DONE) is True
    first.done += 1
    first.release_if_finished()
    assert first.removed


def test_a_finished_segment_between_spilled_records_is_passed_over_not_read(
    journal: Journal,
) -> None:
    """Spilling stops and starts again: a whole segment of records sent from memory lies between
    two spilled ones. Once all its records are finished the worker removes it (its file gone, its
    mapping closed) while the lane still lists it, the spilled record after it not read yet. The
    reader passes over it and reads both spilled records; it never reads a closed mapping."""
    lane = journal.lane_for_thread()
    assert lane is not None
    spill(lane)  # read later: the reader starts here
    first = lane.segment
    written: list[tuple[Segment, int]] = []
    while len({segment for segment, _ in written} - {first}) < 2:  # from memory: not spilled
        where = lane.write(RECORD, 0)
        assert where is not None
        written.append(where)
    middle = next(segment for segment, _ in written if segment is not first)
    offsets = [offset for segment, offset in written if segment is middle]
    assert middle.sealed
    assert len(offsets) == middle.written
    for offset in offsets:  # sent: every record of the middle segment finished
        assert middle.mark(offset, RUNS_DONE) is True
        middle.done += 1
    spill(lane)  # spilling again, in the segment after it
    journal.release_sealed()
    assert middle.removed
    assert middle in lane.segments
    read = lane.read_spilled(10)
    assert len(read) == 2
    assert lane.spill_read == lane.spill_written == 2
    assert lane.count_spilled_unsent() == 0

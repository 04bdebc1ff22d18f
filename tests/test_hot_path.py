"""What a hook does with a large step: one copy of its texts into the journal, and never a call
that gives up the interpreter lock (a thread that gives it up waits behind any busy thread, up to
the 5 ms switch interval, in the middle of the agent's step)."""

from __future__ import annotations

import os
import threading
import time
import zlib
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import pytest

from promises_support import asleep_until_woken, patient, wait_until
from rlm_mlflow import MLflowSink, TransientError, _journal, _journal_format, _worker
from rlm_mlflow._codec import decode
from rlm_mlflow._events import Step
from rlm_mlflow._journal_format import ScanStats, scan_segment
from rlm_mlflow.testing import MemoryTransport
from test_spans_unit import code_event, spans_of

#: zlib gives up the lock while it sums more than this many bytes at once.
ZLIB_RELEASES_ABOVE = 5 * 1024


class _CountingZlib:
    """The zlib module as the journal sees it, noting each checksum's size and thread."""

    def __init__(self) -> None:
        self.sizes: list[tuple[int, int]] = []

    def crc32(self, data: Any, value: int = 0) -> int:
        self.sizes.append((threading.get_ident(), len(memoryview(data))))
        return zlib.crc32(data, value)

    def __getattr__(self, name: str) -> Any:
        return getattr(zlib, name)


def journaled(memory: MemoryTransport, journal_dir: Path) -> MLflowSink:
    """A sink into ``memory`` with its journal in ``journal_dir``, draining often."""
    return MLflowSink(enabled=True, transport=memory, journal_dir=journal_dir, flush_interval=0.05)


def test_a_large_step_is_summed_by_the_worker_not_the_hook(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The hook sums small records only; the worker sums a large one when it reads it back (in
    one call: zlib gives up the lock, the hooks run meanwhile), and the journal then holds every
    record summed, as a reader checks it."""
    counting = _CountingZlib()
    monkeypatch.setattr(_journal_format, "zlib", counting)
    monkeypatch.setattr(_journal, "zlib", counting)
    code = "x = 1\n" * 340  # 2 KB
    stdout = "".join(f"window {i:5d}: 3 primes\n" for i in range(400))  # 8 KB
    memory = MemoryTransport()
    hook_thread = threading.get_ident()
    with journaled(memory, tmp_path) as sink:
        sink.on_run_start("r", task="t", environment="e", params={})
        for number in range(3):
            sink.on_step("r", event=code_event(number, code, stdout), cumulative_reward=0.5)
        assert sink.flush(patient(10))
        on_hook = [size for thread, size in counting.sizes if thread == hook_thread]
        assert max(on_hook) <= _journal.SMALL_RECORD  # the run's start only
        on_worker = [size for thread, size in counting.sizes if thread != hook_thread]
        assert len([size for size in on_worker if size > len(stdout)]) == 3  # whole, once each
        stats = ScanStats()
        records = [
            record
            for path in sorted(tmp_path.rglob("*.seg"))
            for record in scan_segment(path, stats)
        ]
        assert len(records) == 4
        assert not stats.damaged
        assert not [r for r in records if r.flags & _journal_format.HFLAG_UNSUMMED]
        sink.on_run_end("r", result={"completed": True}, run_path=None)
    # Read back whole: the worker sent each step's texts as given.
    spans = spans_of(memory)
    for number in range(3):
        outputs = spans[f"step {number}: run_python"][0]["mlflow.spanOutputs"]
        assert outputs["stdout"] == "```\n" + stdout + "```"
    assert memory.one("r").history("step_reward") == [(0, 0.5), (1, 0.5), (2, 0.5)]


def test_with_fsync_on_the_hook_sums_every_record_in_pieces_the_lock_is_kept_through(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``journal_fsync`` promises records that survive a machine crash checked: the hook sums
    a large one too, in pieces small enough that zlib keeps the lock."""
    counting = _CountingZlib()
    monkeypatch.setattr(_journal_format, "zlib", counting)
    stdout = "".join(f"window {i:5d}: 3 primes\n" for i in range(400))  # 8 KB
    memory = MemoryTransport()
    hook_thread = threading.get_ident()
    with MLflowSink(
        enabled=True, transport=memory, journal_dir=tmp_path, journal_fsync=True
    ) as sink:
        sink.on_run_start("r", task="t", environment="e", params={})
        sink.on_step("r", event=code_event(0, "print(1)", stdout), cumulative_reward=0.5)
        on_hook = [size for thread, size in counting.sizes if thread == hook_thread]
        assert sum(on_hook) > len(stdout)
        assert max(on_hook) <= ZLIB_RELEASES_ABOVE
        sink.on_run_end("r", result={"completed": True}, run_path=None)
    assert memory.one("r").history("step_reward") == [(0, 0.5)]


def test_a_record_written_in_pieces_passes_the_readers_checks(tmp_path: Path) -> None:
    """The checksum of the pieces is the checksum of the record: replay reads every step back,
    texts whole (a sink whose store is down keeps them all in its journal)."""
    memory = MemoryTransport()
    memory.fail = lambda call: TransientError("down")
    stdout = "y" * 6_000 + "\u00e9" * 3_000  # two bytes a character past the first 6,000
    sink = MLflowSink(
        enabled=True, transport=memory, journal_dir=tmp_path, retry_initial=5, retry_max_wait=5
    )
    sink.on_run_start("r", task="t", environment="e", params={})
    for number in range(4):
        sink.on_step("r", event=code_event(number, "print(1)", stdout), cumulative_reward=0.5)
    sink.close(0.5)
    stats = ScanStats()
    steps = []
    for path in sorted(tmp_path.rglob("*.seg")):
        for record in scan_segment(path, stats):
            event = decode(record.payload)
            if isinstance(event, Step):
                steps.append(event)
    assert not stats.damaged
    assert not stats.torn
    assert [step.step for step in steps] == [0, 1, 2, 3]
    for step in steps:
        assert step.detail is not None
        assert step.detail.stdout is not None
        assert step.detail.stdout.text == stdout


def _lanes(journal_dir: Path) -> set[str]:
    """The lanes a sink's journal holds files for (``L0003-S000001.seg``: lane 3)."""
    return {path.name.split("-")[0] for path in journal_dir.rglob("L*-S*.seg")}


def test_a_sink_used_from_one_thread_keeps_few_files_open(tmp_path: Path) -> None:
    """Every lane is a mapped file (a file descriptor): a sink per runtime, each used from one
    thread, keeps its own lane and two kept ready for a new thread, not eight."""
    memory = MemoryTransport()
    with journaled(memory, tmp_path) as sink:
        sink.on_run_start("r", task="t", environment="e", params={})
        for number in range(20):
            sink.on_step("r", event={"step": number, "reward": 0.1}, cumulative_reward=0.1)
        assert sink.flush(patient(30))
        assert len(_lanes(tmp_path)) <= 3
        sink.on_run_end("r", result={"completed": True}, run_path=None)


def test_threads_starting_together_each_get_a_lane_and_more_are_kept_ready(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Six threads starting at once, more than the lanes ready (the keeper makes no more
    meanwhile: a busy one would make them in time, and no thread would find none): each gets
    a lane of its own (its events land, in order), and the journal keeps more lanes ready from
    then on."""
    from rlm_mlflow._journal import SPARE_LANES

    monkeypatch.setattr(_journal, "_KEEPER", _NoKeeper())
    memory = MemoryTransport()
    barrier, holding = threading.Barrier(6), threading.Barrier(6)
    with journaled(memory, tmp_path) as sink:
        sink.on_run_start("warm", task="t", environment="e", params={})  # the journal exists
        sink.on_run_end("warm", result={}, run_path=None)

        def agent(n: int) -> None:
            barrier.wait()
            sink.on_run_start(f"r{n}", task="t", environment="e", params={})
            holding.wait()  # all six hold a lane at once
            for number in range(50):
                sink.on_step(f"r{n}", event={"step": number, "reward": 1.0}, cumulative_reward=1.0)
            sink.on_run_end(f"r{n}", result={"completed": True}, run_path=None)

        threads = [threading.Thread(target=agent, args=(n,)) for n in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sink.flush(patient(30))
        journal = sink._pipeline.journal
        assert journal is not None
        assert journal.spares > SPARE_LANES
    for n in range(6):
        history = memory.one(f"r{n}").history("step_reward")
        assert [step for step, _ in history] == list(range(50))


#: What the burst scenario waits for next: a condition, and what it is.
Wait = tuple[Callable[[], bool], str]


def burst_after_a_quiet_spell(sink: MLflowSink) -> Generator[Wait, None, None]:
    """The hooks of a burst of large steps after the worker went idle; yields each condition to
    wait for (the caller waits for it, in its own way) and checks what the hooks did."""
    code, stdout = "x = 1\n" * 340, "y" * 8_000
    sink.on_run_start("r", task="t", environment="e", params={})
    yield (lambda: asleep_until_woken(sink) and sink.status()["pending"] == 0), "idle"
    journal = sink._pipeline.journal
    assert journal is not None
    lane = journal.lane_for_thread()
    assert lane is not None
    first = lane.segment
    number = 0
    while first.pos * 4 <= first.size:
        sink.on_step("r", event=code_event(number, code, stdout), cumulative_reward=0.5)
        number += 1
    assert lane.segment is first  # a quarter of it, not all of it: the hook made no file
    yield (lambda: lane.next is not None), "the next segment made"
    ready = lane.next
    while lane.segment is first:
        sink.on_step("r", event=code_event(number, code, stdout), cumulative_reward=0.5)
        number += 1
    assert lane.segment is ready  # the hook took the segment made ahead
    sink.on_run_end("r", result={"completed": True}, run_path=None)


def only_when_asked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> MLflowSink:
    """A sink whose worker never looks after its journal (the journal's keeper does, when a hook
    asks), and drains only when told to (a burst's hooks then meet no drain cycle either)."""
    monkeypatch.setattr(_worker, "MAINTENANCE_BUSY", 3600.0)
    monkeypatch.setattr(_worker, "MAINTENANCE_EVERY", 3600.0)
    return MLflowSink(
        enabled=True, transport=MemoryTransport(), journal_dir=tmp_path, flush_interval=3600
    )


def test_a_hook_past_a_quarter_of_its_segment_has_the_keeper_make_the_next_one_now(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A burst of large steps fills a segment in a millisecond: the hook that passes a quarter of
    it asks the journal's keeper, which makes and faults in the next one at once (the worker
    never looks here), so the hook that fills the segment neither makes a file nor takes page
    faults."""
    with only_when_asked(monkeypatch, tmp_path) as sink:
        for condition, what in burst_after_a_quiet_spell(sink):
            if what == "idle":
                assert sink.flush(patient(30))
            wait_until(condition, patient(30), what)


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.anyio
async def test_a_sink_in_a_blocked_event_loop_has_the_next_segment_made_when_a_hook_asks(
    anyio_backend: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The same burst with the worker in the agent's own event loop (``async with``), and that
    loop blocked by the agent meanwhile (a burst of hooks with no ``await`` between them): the
    keeper is a thread of its own, it needs no turn of the loop."""
    async with only_when_asked(monkeypatch, tmp_path) as sink:
        for condition, what in burst_after_a_quiet_spell(sink):
            if what == "idle":
                assert await sink.aflush(patient(30))
            wait_until(condition, patient(30), what)  # blocking: the loop gets no turn


def _past_a_quarter(lane: _journal.Lane, payload: bytes) -> None:
    first = lane.segment
    while first.pos * 4 <= first.size:
        assert lane.write(payload, 0) is not None


def test_the_keeper_makes_and_faults_in_the_next_segment_with_no_worker_at_all(
    tmp_path: Path,
) -> None:
    """A journal on its own, no sink and no worker: its keeper faults the lane's first segment
    in, and makes and faults in the next one once a hook passes a quarter of it."""
    journal = _journal.Journal(
        tmp_path, prefix="0123456789abcdef", experiment="e", tracking_uri=None
    )
    try:
        lane = journal.lane_for_thread()
        assert lane is not None
        _past_a_quarter(lane, b"x" * 10_000)
        wait_until(
            lambda: lane.next is not None and lane.next.populated and lane.segment.populated,
            patient(30),
            "the next segment made and faulted in by the keeper",
        )
    finally:
        journal.close(keep=False)


def test_a_forked_child_has_a_keeper_of_its_own(tmp_path: Path) -> None:
    """The keeper's thread does not survive a fork: a journal made in the child starts one."""
    journal = _journal.Journal(
        tmp_path / "parent", prefix="0123456789abcdef", experiment="e", tracking_uri=None
    )
    journal.close(keep=False)  # the parent's keeper is running now
    pid = os.fork()
    if pid == 0:  # the child: exit code 0 if its keeper made the next segment
        code = 1
        try:
            child = _journal.Journal(
                tmp_path / "child", prefix="fedcba9876543210", experiment="e", tracking_uri=None
            )
            lane = child.lane_for_thread()
            if lane is not None:
                _past_a_quarter(lane, b"y" * 10_000)
                deadline = time.monotonic() + patient(30)
                while lane.next is None and time.monotonic() < deadline:
                    time.sleep(0.01)
                code = 0 if lane.next is not None else 2
            child.close(keep=False)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_process_that_cannot_start_the_keeper_loses_no_event(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The journal's keeper thread cannot be started (a process at its thread limit, or
    exiting): the journal is made all the same, every hook returns, and every event lands,
    the hooks making their own segments (1 MB of steps: past the first one)."""

    class NoThread(threading.Thread):
        def start(self) -> None:
            raise RuntimeError("can't start new thread")

    class Threading:  # the threading module as the journal sees it
        Thread = NoThread

        def __getattr__(self, name: str) -> Any:
            return getattr(threading, name)

    keeper = _journal._Keeper()
    monkeypatch.setattr(_journal, "_KEEPER", keeper)
    monkeypatch.setattr(_journal, "threading", Threading())
    memory = MemoryTransport()
    code, stdout = "x = 1\n" * 340, "y" * 8_000
    with journaled(memory, tmp_path) as sink:
        sink.on_run_start("r", task="t", environment="e", params={})
        for number in range(100):
            sink.on_step("r", event=code_event(number, code, stdout), cumulative_reward=0.5)
        sink.on_run_end("r", result={"completed": True}, run_path=None)
        assert sink.flush(patient(30))
        status = sink.status()
        assert sink._pipeline.journal is not None
    assert keeper._thread is None
    assert status["dropped"] == {}, status
    assert status["rejected"] == {}, status
    history = memory.one("r").history("step_reward")
    assert [step for step, _ in history] == list(range(100))


def test_a_lane_in_a_burst_takes_the_largest_segment_next(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A lane that filled its segment soon after it was made gets the largest segment next (one
    new file in a burst, not three); one that filled it slowly, four times its size."""
    monkeypatch.setattr(_journal, "_KEEPER", _NoKeeper())  # the hook makes its own
    for burst, expected in ((60.0, _journal.MAX_SEGMENT), (0.0, 4 * _journal.FIRST_SEGMENT)):
        monkeypatch.setattr(_journal, "BURST", burst)
        journal = _journal.Journal(
            tmp_path / str(burst), prefix="0123456789abcdef", experiment="e", tracking_uri=None
        )
        try:
            lane = journal.lane_for_thread()
            assert lane is not None
            first = lane.segment
            while lane.segment is first:
                assert lane.write(b"z" * 10_000, 0) is not None
            assert lane.segment.size == expected
        finally:
            journal.close(keep=False)


def test_threads_that_start_once_the_disk_is_full_log_in_memory_and_lose_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The disk fills up (every new segment refused: ENOSPC) after the journal was made, and
    then more threads start than lanes were kept ready: each thread's hooks still return at
    once, none raises, and every event of every thread lands once (kept in memory)."""
    import errno
    import os

    memory = MemoryTransport()
    with journaled(memory, tmp_path) as sink:
        sink.on_run_start("warm", task="t", environment="e", params={})
        sink.on_run_end("warm", result={}, run_path=None)
        assert sink.flush(patient(30))

        def full(fd: int, offset: int, size: int) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "posix_fallocate", full)  # as the journal calls it
        failures: list[BaseException] = []
        holding = threading.Barrier(8)

        def agent(n: int) -> None:
            try:
                sink.on_run_start(f"r{n}", task="t", environment="e", params={})
                holding.wait(patient(60))  # all eight hold a lane at once: more than were ready
                for number in range(30):
                    sink.on_step(
                        f"r{n}", event={"step": number, "reward": 1.0}, cumulative_reward=1.0
                    )
                sink.on_run_end(f"r{n}", result={"completed": True}, run_path=None)
            except BaseException as exc:  # a hook that raises fails the test
                failures.append(exc)

        threads = [threading.Thread(target=agent, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(patient(60))
        assert sink.flush(patient(60))
        status = sink.status()
    assert failures == []
    assert status["dropped"] == {}
    assert "took no more segments" in status["journal_problem"]  # status says so
    assert "No space left" in status["journal_problem"]
    for n in range(8):
        run = memory.one(f"r{n}")
        assert run.status == "FINISHED"
        assert [step for step, _ in run.history("step_reward")] == list(range(30))


class _NoKeeper:
    """The journals' keeper, asked and never looking (upkeep only as a test runs it)."""

    def start(self) -> None:
        pass

    def ask(self, journal: object) -> None:
        pass


def test_segments_a_hook_made_are_faulted_in_ahead_of_it_while_it_writes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A journal made by a sink's first hook, and a segment a hook had to make itself (the
    keeper had not come yet), are not faulted in: each first write to a page costs the hook
    a page fault. Upkeep faults their pages in ahead of the hook while it writes on, and every
    record written before, during and after reads back as written.

    The upkeep runs as the keeper runs it: again whenever the journal needs it. A hook that
    fills its segment while an upkeep is making the next one makes its own, which the next
    upkeep faults in."""
    from rlm_mlflow._journal import Journal

    monkeypatch.setattr(_journal, "_KEEPER", _NoKeeper())  # this test's thread is the keeper
    journal = Journal(tmp_path, prefix="0123456789abcdef", experiment="e", tracking_uri=None)
    try:
        lane = journal.lane_for_thread()
        assert lane is not None
        payloads = [bytes([48 + i % 10]) * (3000 + i) for i in range(400)]
        written = 0
        while lane.next is None and written < len(payloads):  # past a quarter: no next yet
            assert lane.write(payloads[written], 0) is not None
            written += 1
            if lane.segment.pos * 2 > lane.segment.size:
                break
        assert not lane.segment.populated
        assert journal.needs_maintenance()

        started, writing, done = threading.Event(), threading.Event(), threading.Event()
        writing.set()
        upkeeps = 0

        def upkeep() -> None:
            nonlocal upkeeps
            while writing.is_set() or journal.needs_maintenance():
                if journal.needs_maintenance():
                    started.set()
                    journal.maintain()
                    upkeeps += 1
                else:
                    time.sleep(0)  # let the writer have the interpreter
            done.set()

        worker = threading.Thread(target=upkeep)
        worker.start()
        while written < len(payloads) // 2:  # writing while it runs
            assert lane.write(payloads[written], 0) is not None
            written += 1
            if written == 80:
                assert started.wait(patient(30))  # the first upkeep has begun by then
        writing.clear()
        worker.join(patient(30))
        assert done.is_set()
        assert upkeeps >= 1
        assert all(segment.populated for segment in (lane.segment, lane.next) if segment)
        for payload in payloads[written:]:
            assert lane.write(payload, 0) is not None
        stats = ScanStats()
        read = [
            record.payload
            for path in sorted(journal.folder.glob(f"L{lane.number:04d}-S*.seg"))
            for record in scan_segment(path, stats)
        ]
        assert not stats.damaged
        assert not stats.torn
        assert read == payloads
    finally:
        journal.close(keep=False)

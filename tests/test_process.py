"""How a process ends, and what MLflow then holds: real child processes, real signals, replay."""

from __future__ import annotations

import os
import selectors
import signal
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent_process import large_output
from rlm_mlflow import MLflowSink, replay
from rlm_mlflow._journal_format import HFLAG_UNSUMMED, ScanStats, scan_segment
from rlm_mlflow.testing import MlflowServer, free_port

pytestmark = pytest.mark.integration

AGENT = Path(__file__).with_name("agent_process.py")


def start_agent(mode: str, uri: str, experiment: str, journal_dir: Path) -> subprocess.Popen[str]:
    """Start the agent process and wait (with a deadline) until it says READY."""
    env = {
        **os.environ,
        "RLM_MLFLOW_JOURNAL_DIR": str(journal_dir),
        "PYTHONUNBUFFERED": "1",
        "PYTHONFAULTHANDLER": "1",  # a hang is shown: SIGABRT dumps every thread's stack
    }
    process = subprocess.Popen(
        [sys.executable, str(AGENT), mode, uri, experiment],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout=60):
            process.kill()
            raise AssertionError(f"agent ({mode}) never became ready")
    line = process.stdout.readline()
    if line.strip() != "READY":
        process.kill()
        _, err = process.communicate(timeout=30)
        raise AssertionError(f"agent ({mode}) said {line!r}; stderr:\n{err}")
    return process


def finish(process: subprocess.Popen[str]) -> tuple[int, str]:
    try:
        _, err = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGABRT)
        _, err = process.communicate(timeout=30)
        stacks = err[-6000:]
        raise AssertionError(f"the agent did not end within 60 s; its threads:\n{stacks}") from None
    return process.returncode, err


@dataclass
class Lab:
    """The session's server, this test's experiment and journal folder, and readers."""

    uri: str
    experiment: str
    journal_dir: Path
    read_runs: Callable[[str], dict[str, Any]]
    client: Any

    def runs(self) -> dict[str, Any]:
        return self.read_runs(self.experiment)

    def steps(self, run: Any, key: str = "step_reward") -> list[int]:
        return sorted(p.step for p in self.client.get_metric_history(run.info.run_id, key))


@pytest.fixture
def lab(
    mlflow_server: MlflowServer,
    experiment_name: str,
    journal_dir: Path,
    read_runs: Callable[[str], dict[str, Any]],
    mlflow_client: Any,
) -> Lab:
    return Lab(mlflow_server.uri, experiment_name, journal_dir, read_runs, mlflow_client)


def test_clean_exit_without_close_ends_every_run(
    lab: Lab,
) -> None:
    """The exit hook flushes and ends runs: FINISHED if ended, FAILED if never ended."""
    process = start_agent("exit", lab.uri, lab.experiment, lab.journal_dir)
    code, err = finish(process)
    assert code == 0, err
    runs = lab.runs()
    assert runs["main"].info.status == "FINISHED"
    assert runs["left-open"].info.status == "FAILED"
    assert runs["left-open"].info.end_time is not None
    assert lab.steps(runs["main"]) == [0, 1, 2, 3, 4]
    assert lab.steps(runs["left-open"]) == [0, 1]
    assert list(lab.journal_dir.iterdir()) == []  # everything sent: no journal left


def test_uncaught_exception_marks_runs_failed(
    lab: Lab,
) -> None:
    process = start_agent("raise", lab.uri, lab.experiment, lab.journal_dir)
    code, err = finish(process)
    assert code == 1
    assert "the model failed mid-run" in err
    run = lab.runs()["main"]
    assert run.info.status == "FAILED"
    assert lab.steps(run) == [0, 1, 2, 3, 4]


def test_a_thread_that_dies_fails_its_own_runs_only(
    lab: Lab,
) -> None:
    process = start_agent("thread-raise", lab.uri, lab.experiment, lab.journal_dir)
    code, err = finish(process)
    assert code == 0, err
    runs = lab.runs()
    assert runs["thread-run"].info.status == "FAILED"
    assert lab.steps(runs["thread-run"]) == [0, 1, 2]
    assert runs["main"].info.status == "FINISHED"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_marks_runs_killed_and_the_process_still_dies_of_it(
    signum: int,
    lab: Lab,
) -> None:
    process = start_agent("forever", lab.uri, lab.experiment, lab.journal_dir)
    process.send_signal(signum)
    code, err = finish(process)
    if signum == signal.SIGTERM:
        assert code == -signum, err  # SIGTERM's default action ran after our handler
    else:
        # SIGINT's default is KeyboardInterrupt. CPython then kills itself with SIGINT, unless
        # (as it does here when a socket failed during exit) it settles for exit status 1.
        assert code in (-signum, 1), err
        assert "KeyboardInterrupt" in err
    run = lab.runs()["main"]
    assert run.info.status == "KILLED"
    assert run.info.end_time is not None
    steps = lab.steps(run)
    assert steps[:5] == [0, 1, 2, 3, 4]
    assert steps == list(range(len(steps)))  # no gap: every step the agent made landed


@pytest.mark.slow
def test_sigkill_then_replay_sends_everything_exactly_once(
    lab: Lab,
) -> None:
    """Half the data confirmed sent, half not: after kill -9 the journal holds all of it;
    replay re-sends it (some twice over the wire) and MLflow holds each point once."""
    process = start_agent("sigkill-after-flush", lab.uri, lab.experiment, lab.journal_dir)
    process.kill()
    finish(process)
    assert len(list(lab.journal_dir.iterdir())) == 1
    report = replay(lab.journal_dir)
    assert report.ok, report
    assert report.runs_killed == 1
    assert list(lab.journal_dir.iterdir()) == []
    run = lab.runs()["main"]
    assert run.info.status == "KILLED"
    assert lab.steps(run) == list(range(10))
    assert len(lab.client.get_metric_history(run.info.run_id, "cumulative_reward")) == 10
    again = replay(lab.journal_dir)
    assert again.journals == 0
    assert len(lab.runs()) == 1


def test_replay_of_a_journal_never_sent(
    lab: Lab,
) -> None:
    """A process that never reached its server: kill -9, then replay to where it should go.

    The last record is torn (the crash hit mid-write): it is detected and skipped."""
    dead_end = f"http://127.0.0.1:{free_port()}"
    process = start_agent("forever", dead_end, lab.experiment, lab.journal_dir)
    process.kill()
    finish(process)
    (journal,) = lab.journal_dir.iterdir()
    segment = sorted(journal.glob("L*-S*.seg"))[-1]
    tear_after_last_record(segment)
    report = replay(lab.journal_dir, tracking_uri=lab.uri)
    assert report.ok, report
    assert report.torn == 1
    run = lab.runs()["main"]
    assert run.info.status == "KILLED"
    steps = lab.steps(run)
    assert steps[:5] == [0, 1, 2, 3, 4]
    assert steps == list(range(len(steps)))
    assert run.data.params["mode"] == "forever"


def test_large_steps_killed_before_the_worker_summed_them_are_replayed_whole_once(
    lab: Lab,
) -> None:
    """A hook writes a large step without its checksum (the worker sums it when it reads it
    back). Killed before the worker could: the records are whole in the page cache, replay reads
    them, and each step lands once with its texts as the agent gave them."""
    dead_end = f"http://127.0.0.1:{free_port()}"  # the worker never gets to read a record
    process = start_agent("large-steps", dead_end, lab.experiment, lab.journal_dir)
    process.kill()
    finish(process)
    (journal,) = lab.journal_dir.iterdir()
    stats = ScanStats()
    unsummed = [
        record
        for path in sorted(journal.glob("L*-S*.seg"))
        for record in scan_segment(path, stats)
        if record.flags & HFLAG_UNSUMMED
    ]
    assert not stats.damaged
    assert not stats.torn
    assert len(unsummed) == 3  # the three large steps, and only they
    report = replay(lab.journal_dir, tracking_uri=lab.uri)
    assert report.ok, report
    run = lab.runs()["main"]
    assert run.info.status == "KILLED"
    assert lab.steps(run) == list(range(8))
    experiment_id = run.info.experiment_id
    (trace,) = lab.client.search_traces(locations=[experiment_id])
    outputs = {
        span.name: span.outputs for span in trace.data.spans if span.name.startswith("step ")
    }
    for number in range(5, 8):
        (stdout,) = [
            o["stdout"] for name, o in outputs.items() if name.startswith(f"step {number}:")
        ]
        assert stdout == "```\n" + large_output(number) + "```"
    assert replay(lab.journal_dir, tracking_uri=lab.uri).journals == 0
    assert lab.steps(run) == list(range(8))


def tear_after_last_record(segment: Path) -> None:
    """Write a record header whose payload never came (a crash in the middle of a write)."""
    data = segment.read_bytes()
    offset = 16  # the segment header
    while True:
        (length,) = struct.unpack_from("<I", data, offset)
        if length == 0:
            break
        offset += 12 + length
    with segment.open("r+b") as handle:
        handle.seek(offset)
        handle.write(struct.pack("<IIBBH", 64, 12345, 0, 0, 0))  # 64 bytes promised, none there


def test_replay_leaves_a_live_sink_alone(
    lab: Lab,
) -> None:
    sink = MLflowSink(enabled=True, experiment=lab.experiment, tracking_uri=lab.uri)
    sink.on_run_start("alive", task="t", environment="e", params={})
    sink.on_step("alive", event={"step": 0, "reward": 1.0}, cumulative_reward=1.0)
    report = replay(lab.journal_dir)
    assert report.journals == 1
    assert len(report.in_use) == 1
    assert report.sent == 0
    sink.on_run_end("alive", result={"completed": True}, run_path=None)
    sink.close()
    runs = lab.runs()
    assert list(runs) == ["alive"]


def test_fork_child_has_its_own_sink(
    lab: Lab,
) -> None:
    """Events queued before a fork are sent once, by the parent; the child's by the child."""
    process = start_agent("fork", lab.uri, lab.experiment, lab.journal_dir)
    code, err = finish(process)
    assert code == 0, err
    runs = lab.runs()  # raises on a duplicate run name
    assert set(runs) == {"main", "forked-child"}
    assert lab.steps(runs["main"]) == [0, 1, 2, 3, 4, 5]
    assert lab.steps(runs["forked-child"]) == [0, 1, 2]
    assert runs["main"].info.status == "FINISHED"
    assert runs["forked-child"].info.status == "FINISHED"
    # Each process's trace is written by that process: its info with its link to its own run
    # and its outcome as Feedback, once (the child's HTTP sessions and version read its own).
    experiment_id = runs["main"].info.experiment_id
    traces = {
        trace.info.tags["run_id"]: trace
        for trace in lab.client.search_traces(locations=[experiment_id])
    }
    assert set(traces) == {"main", "forked-child"}
    for name, trace in traces.items():
        assert trace.info.trace_metadata["mlflow.sourceRun"] == runs[name].info.run_id
        completed = [
            a.value
            for a in trace.info.assessments
            if a.name == "completed" and a.source.source_id == "rlm-mlflow"
        ]
        assert completed == [True], trace.info.assessments


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_program_with_sinks_in_its_event_loop_and_on_the_thread_closes_every_socket(
    tmp_path: Path, backend: str
) -> None:
    """A sink run in the program's event loop (``async with``), then one on the background
    thread: no socket the package opened is left for the collector to close
    (``ResourceWarning: unclosed``)."""
    program = f"""
import anyio
from rlm_mlflow import MLflowSink
from rlm_mlflow.testing import MemoryTransport

async def main() -> None:
    memory = MemoryTransport()
    sink = MLflowSink(enabled=True, experiment="e", transport=memory, journal_dir={str(tmp_path)!r})
    async with sink:
        sink.on_run_start("r", task="t", environment="e", params={{}})
        sink.on_step("r", event={{"step": 0, "reward": 1.0}}, cumulative_reward=1.0)
        sink.on_run_end("r", result={{"completed": True, "steps": 1}}, run_path=None)
    assert memory.one("r").status == "FINISHED"

anyio.run(main, backend={backend!r})
memory = MemoryTransport()
sink = MLflowSink(enabled=True, experiment="e", transport=memory, journal_dir={str(tmp_path)!r})
sink.on_run_start("s", task="t", environment="e", params={{}})
sink.close(30)
assert memory.one("s").status == "FAILED"
"""
    done = subprocess.run(
        [sys.executable, "-W", "always::ResourceWarning", "-c", program],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "unclosed" not in done.stderr, done.stderr[-2000:]


def test_a_signal_the_instant_the_sink_watches_it_reaches_the_programs_own_handler() -> None:
    """SIGTERM arriving right as the sink puts its handler in place (in a signal storm, sooner
    or later it does): the program's own handler is called, and the program lives on. Each
    install is followed by the signal itself, so the window is entered every time."""
    script = """
import os, signal
from rlm_mlflow import _runtime

seen = []
signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
real = signal.signal

def install_then_signal(signum, handler):
    previous = real(signum, handler)
    if handler is _runtime._on_signal and signum == signal.SIGTERM:
        os.kill(os.getpid(), signum)  # delivered before this call returns
    return previous

signal.signal = install_then_signal
_runtime.install_signal_handlers()
signal.signal = real
_runtime.restore_signal_handlers()
print("ALIVE", seen)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, f"exit code {done.returncode}; stderr:\n{done.stderr}"
    assert done.stdout.split() == ["ALIVE", f"[{int(signal.SIGTERM)}]"]

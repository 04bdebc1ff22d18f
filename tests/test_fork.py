"""Fork is an event: a sink built before a fork, used or not, is a sink of its own in each child.

Real forked processes (``tests/agents/fork_children.py``: a module-level sink, two children
forked before its first event) against the session's real ``mlflow server``; ``kill -9`` and
``rlm-mlflow replay`` in processes of their own. Replay's check of a journal's key prefix runs
against an in-memory store.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from promises_support import WAIT, Agent, Store, journal_folders, replay_cli, wait_until
from rlm_mlflow import MLflowSink, TransientError, replay
from rlm_mlflow.testing import FaultProxy, MemoryTransport, MlflowServer

KEY = "rlm_mlflow.key"
EXPERIMENT_LOOKUP = "/api/2.0/mlflow/experiments/get-by-name"
Spawn = Callable[..., Agent]


@pytest.fixture
def proxy(mlflow_server: MlflowServer) -> Iterator[FaultProxy]:
    with FaultProxy(mlflow_server.port) as proxy:
        yield proxy


def children(agent: Agent) -> dict[str, int]:
    """The children's pids, by name, once both said they are there."""
    pids = {}
    for _ in range(2):
        _, name, pid = agent.expect("CHILD").split()
        pids[name] = int(pid)
    return pids


def log_and_close(agent: Agent, name: str, count: int) -> dict[str, Any]:
    agent.send(f"{name} log {count}")
    agent.expect(f"LOGGED {name}")
    agent.send(f"{name} end")
    line = agent.expect(f"CLOSED {name}", 120)
    status: dict[str, Any] = json.loads(line.split(" ", 2)[2])
    return status


def traces_of(store: Store, experiment: str) -> list[Any]:
    experiment_id = store.experiment_id(experiment)
    assert experiment_id is not None
    return list(store.client.search_traces(locations=[experiment_id]))


def span_ids(trace: Any) -> set[str]:
    return {span.span_id for span in trace.data.spans}


def assert_two_processes_two_identities(store: Store, experiment: str, b_status: str) -> None:
    """Two root runs with their own keys, and two traces with their own trace and span ids."""
    runs = store.by_name(experiment)
    assert set(runs) == {"run-a", "run-b"}, sorted(runs)
    keys = {name: run.data.tags.get(KEY) for name, run in runs.items()}
    assert keys["run-a"], keys
    assert keys["run-b"], keys
    assert keys["run-a"] != keys["run-b"], keys
    for run in runs.values():
        assert "mlflow.parentRunId" not in run.data.tags
    assert runs["run-a"].info.status == "FINISHED"
    assert runs["run-b"].info.status == b_status
    wait_until(lambda: len(traces_of(store, experiment)) >= 2, WAIT, "a trace for each run")
    traces = traces_of(store, experiment)
    assert len({t.info.trace_id for t in traces}) == 2, [t.info.trace_id for t in traces]
    first, second = traces
    assert not span_ids(first) & span_ids(second), "two processes wrote the same span ids"


@pytest.mark.integration
@pytest.mark.slow
def test_children_of_an_unused_sink_log_runs_and_traces_under_keys_of_their_own(
    agents: Spawn, mlflow_server: MlflowServer, store: Store, experiment_name: str
) -> None:
    """A module-level sink never used before a fork: each forked child's run gets its own
    ``rlm_mlflow.key``, its own trace and its own span ids (a new key prefix, run counter and
    id seed in each child), and each run holds exactly its own steps."""
    agent = agents("fork_children.py", mlflow_server.uri, experiment_name, stdin=True)
    children(agent)
    status_a = log_and_close(agent, "a", 3)
    status_b = log_and_close(agent, "b", 5)
    assert status_a["sent"] == status_a["accepted"] == 5, status_a
    assert status_b["sent"] == status_b["accepted"] == 7, status_b
    assert_two_processes_two_identities(store, experiment_name, "FINISHED")
    runs = store.by_name(experiment_name)
    assert store.steps(runs["run-a"]) == [0, 1, 2]
    assert store.steps(runs["run-b"]) == [0, 1, 2, 3, 4]


@pytest.mark.integration
@pytest.mark.slow
def test_replaying_a_killed_child_never_maps_its_run_onto_its_siblings(
    agents: Spawn,
    proxy: FaultProxy,
    mlflow_server: MlflowServer,
    store: Store,
    experiment_name: str,
    journal_dir: Path,
) -> None:
    """Child ``a`` logs its run; child ``b`` (forked from the same unused sink) logs its own
    while the server does not answer and is killed with ``kill -9`` mid-run. Replaying ``b``'s
    journal creates ``b``'s run (ended KILLED) with ``b``'s steps: nothing lands in ``a``'s run
    or trace."""
    agent = agents("fork_children.py", proxy.uri, experiment_name, stdin=True)
    pids = children(agent)
    status_a = log_and_close(agent, "a", 3)
    assert status_a["sent"] == status_a["accepted"] == 5, status_a

    proxy.set(mode="stall")  # b's worker waits on its first request: nothing of b is sent
    before = proxy.requests
    agent.send("b log 5")
    agent.expect("LOGGED b")
    wait_until(
        lambda: any(f"-{pids['b']}-" in p.name for p in journal_folders(journal_dir)),
        WAIT,
        "child b's journal",
    )
    wait_until(lambda: proxy.requests > before, WAIT, "child b's worker waits on the server")
    os.kill(pids["b"], signal.SIGKILL)
    assert agent.process.stdin is not None
    agent.process.stdin.close()
    assert agent.wait(WAIT) == 0
    proxy.set(mode="pass")
    mine = [p for p in journal_folders(journal_dir) if f"-{pids['b']}-" in p.name]
    assert len(mine) == 1, [p.name for p in journal_folders(journal_dir)]

    done = replay_cli(mine[0], tracking_uri=mlflow_server.uri)
    assert done.returncode == 0, done.stdout + done.stderr

    runs = store.by_name(experiment_name)
    assert set(runs) == {"run-a", "run-b"}, sorted(runs)
    assert store.steps(runs["run-a"]) == [0, 1, 2]
    assert store.steps(runs["run-b"]) == [0, 1, 2, 3, 4]
    assert_two_processes_two_identities(store, experiment_name, "KILLED")


# -- replay: a journal's runs are found by its key prefix, which must be its own ------------------


def kept_journal(journal_dir: Path) -> Path:
    """A journal holding one run of three steps that the store never took."""

    def down(call: str) -> None:
        raise TransientError("the store is down")

    memory = MemoryTransport()
    memory.fail = down
    sink = MLflowSink(
        enabled=True, experiment="e", transport=memory, journal_dir=journal_dir, retry_deadline=0.2
    )
    sink.on_run_start("kept", task="t", environment="e", params={})
    for number in range(3):
        sink.on_step("kept", event={"step": number, "reward": 1.0}, cumulative_reward=1.0)
    sink.on_run_end("kept", result={"completed": True}, run_path=None)
    sink.close(1.0)
    assert sink.status()["deferred"] == 5, sink.status()
    (folder,) = journal_folders(journal_dir)
    return folder


def test_replay_keeps_journals_that_claim_one_key_prefix_and_sends_none_of_them(
    journal_dir: Path,
) -> None:
    """Two journals with one key prefix (forked children of a sink that kept its prefix): their
    runs cannot be told apart by key, so neither is sent into the other's runs; both are kept
    and the report says why."""
    folder = kept_journal(journal_dir)
    shutil.copytree(folder, folder.with_name(folder.name + "-copy"))
    store = MemoryTransport()
    report = replay(journal_dir, transport=store)
    assert store.by_name("kept") == []
    assert len(report.kept) == 2, report
    assert sum("same key prefix" in problem for problem in report.problems) == 2, report.problems
    assert not report.ok


def test_replay_keeps_a_journal_without_a_valid_key_prefix(journal_dir: Path) -> None:
    """A journal whose meta.json has no valid prefix is kept, never sent under a made-up key."""
    folder = kept_journal(journal_dir)
    meta = json.loads((folder / "meta.json").read_text())
    meta["prefix"] = ""
    (folder / "meta.json").write_text(json.dumps(meta))
    store = MemoryTransport()
    report = replay(journal_dir, transport=store)
    assert store.by_name("kept") == []
    assert report.kept == [str(folder)], report
    assert any("no valid key prefix" in problem for problem in report.problems), report
    (mine,) = journal_folders(journal_dir)
    meta["prefix"] = "0123456789abcdef"
    (mine / "meta.json").write_text(json.dumps(meta))
    report = replay(journal_dir, transport=store)
    assert report.ok, report
    assert [run.status for run in store.by_name("kept")] == ["FINISHED"]


def test_a_sigterm_sent_before_a_forked_child_first_runs_still_ends_it(
    agents: Spawn, experiment_name: str
) -> None:
    """The sink's SIGTERM handler is a Python one, and Python forgets in a new child every signal
    that came before its own after-fork work: a pool terminated on a busy machine left children
    that never died. Signals stay blocked through the fork, so each child still dies of it."""
    agent = agents("fork_sigterm.py", "http://127.0.0.1:1", experiment_name, "5", "early")
    line = agent.expect("ENDED", WAIT + 5 * 60)
    assert json.loads(line.split(" ", 1)[1]) == ["signal 15"] * 5
    assert agent.wait(WAIT) == 0


def test_a_forked_child_blocked_in_c_dies_of_sigterm_and_a_child_using_its_sink_watches_it(
    agents: Spawn, experiment_name: str
) -> None:
    """A Python handler runs only when the main thread runs Python. A pool's worker blocked in C
    on the lock its terminating pool holds never does: with the parent's handler inherited, the
    SIGTERM was kept forever and ``Pool.terminate()`` hung. A child whose sink is not in use has
    the program's own handlers; one whose sink is in use on its main thread watches SIGTERM."""
    agent = agents("fork_sigterm.py", "http://127.0.0.1:1", experiment_name, "3", "blocked")
    assert json.loads(agent.expect("ENDED", WAIT + 3 * 60).split(" ", 1)[1]) == ["signal 15"] * 3
    assert agent.wait(WAIT) == 0
    agent = agents("fork_sigterm.py", "http://127.0.0.1:1", experiment_name, "2", "used")
    assert json.loads(agent.expect("ENDED", WAIT + 2 * 60).split(" ", 1)[1]) == ["signal 15"] * 2
    assert json.loads(agent.expect("HANDLER").split(" ", 1)[1]) == ["_on_signal"] * 2
    assert agent.wait(WAIT) == 0


def test_a_forked_childs_closing_gate_knows_no_closing_sink_of_its_parent() -> None:
    """A gate forked while its parent's sinks were closing would make the child's first close
    wait for sinks that are not there, and count on what the parent's close learnt. (What a
    fork calls in the child is called here directly: forking the test process, threads and
    all, is what the process tests do.)"""
    from rlm_mlflow import _fork
    from rlm_mlflow._worker import ClosingGate

    gate = ClosingGate()
    gate.enter(object())
    gate.created_in(5.0)
    renew = _fork._holders.get(gate)
    assert renew is not None, "the gate is not renewed in a forked child"
    renew(gate)
    assert (gate.pending, gate.closing, gate.took, gate.ended) == (set(), set(), 0.0, False)


@pytest.mark.slow
def assert_children_sent(agent: Agent, store: Store, experiment: str, journal_dir: Path) -> None:
    """``multiprocessing_children.py`` exited 0, and its three runs are in MLflow, FINISHED,
    each child's every step once, nothing kept for replay."""
    assert agent.wait(WAIT) == 0, agent.stderr()[-2000:]
    runs = store.by_name(experiment)
    assert {name: run.info.status for name, run in runs.items()} == {
        "parent": "FINISHED",
        "inherited": "FINISHED",
        "own": "FINISHED",
    }, agent.stderr()[-3000:]
    for name in ("inherited", "own"):
        assert sorted(store.steps(runs[name])) == list(range(300)), name
    assert journal_folders(journal_dir) == []


def test_multiprocessing_fork_children_send_their_runs_though_they_never_run_atexit(
    agents: Callable[..., Agent],
    store: Store,
    mlflow_server: MlflowServer,
    experiment_name: str,
    journal_dir: Path,
) -> None:
    """multiprocessing ends a forked child with ``os._exit()`` after its own exit finalizers,
    never ``atexit``'s. A child that logs a run with the sink it inherited, and one with a sink
    it made, each return without ``close()``: both runs are in MLflow at once, FINISHED, every
    step once, nothing kept for replay (before, neither was sent, their journals kept)."""
    agent = agents("multiprocessing_children.py", mlflow_server.uri, experiment_name)
    assert json.loads(agent.expect("JOINED", 120).split(" ", 1)[1]) == [0, 0]
    assert_children_sent(agent, store, experiment_name, journal_dir)


def test_multiprocessing_fork_children_send_their_runs_while_the_parent_asks_for_its_experiment(
    agents: Callable[..., Agent],
    store: Store,
    proxy: FaultProxy,
    experiment_name: str,
    journal_dir: Path,
) -> None:
    """The children are forked while the parent's sink waits for the answer to its first
    request, which looks the experiment up (the proxy holds it). A sink that asks for an
    experiment makes every other sink of the process wait for its answer: in a child, that
    answer never comes (the asking task is the parent's). Expected: each child's sink asks for
    the experiment itself, and both runs are in MLflow, FINISHED, every step once, nothing kept
    for replay (before, neither child sent anything: their runs were kept in their journals)."""
    proxy.set(mode="stall", path=EXPERIMENT_LOOKUP, exact_path=True, count=1)
    agent = agents("multiprocessing_children.py", proxy.uri, experiment_name, "line", stdin=True)
    agent.expect("LOGGED", 120)
    wait_until(lambda: proxy.paths[EXPERIMENT_LOOKUP] >= 1, WAIT, "the parent's lookup held")
    agent.send("fork")
    joined = json.loads(agent.expect("JOINED", 120).split(" ", 1)[1])
    proxy.set(mode="pass")  # the parent's held lookup is reset: it asks again, then exits
    assert joined == [0, 0], agent.stderr()[-3000:]
    assert_children_sent(agent, store, experiment_name, journal_dir)


def test_a_sink_imports_nothing_on_its_threads(
    agents: Callable[..., Agent], mlflow_server: MlflowServer, experiment_name: str
) -> None:
    """A thread that imports a module holds its import lock until the import is done; a child
    forked meanwhile inherits the lock held, by a thread it does not have, and every thread of
    the child that imports the module waits for ever. The sink's threads (the event loop, the
    transport's, the journal's keeper) must therefore import nothing once the sink is built:
    a fork during the parent's first request would otherwise leave the child's sinks unable to
    send anything (before, ``requests`` imported ``netrc`` on the transport's thread, the
    journal's keeper ``ctypes``)."""
    agent = agents("thread_imports.py", mlflow_server.uri, experiment_name)
    imported = json.loads(agent.expect("IMPORTED", 120).split(" ", 1)[1])
    assert imported == [], imported
    assert agent.wait(WAIT) == 0, agent.stderr()[-2000:]


def _child_journals_a_run(folder: str) -> None:
    """In a forked child: a sink with a journal logs a run and flushes it (exit 0 if sent)."""
    memory = MemoryTransport()
    sink = MLflowSink(
        enabled=True, experiment="made", transport=memory, journal_dir=folder, flush_interval=0.05
    )
    sink.on_run_start("child", task="t", environment="e", params={})
    sink.on_step("child", event={"step": 0, "reward": 1.0}, cumulative_reward=1.0)
    sink.on_run_end("child", result={"completed": True, "steps": 1}, run_path=None)
    sent = sink.flush(WAIT) and len(memory.by_name("child")) == 1
    sink.close(WAIT)
    os._exit(0 if sent else 3)


def test_a_child_forked_while_a_journal_is_being_made_makes_its_own(tmp_path: Path) -> None:
    """Journals are made on the sink's threads under one lock of the process. A child forked
    while another thread holds it inherits it held, by a thread the child does not have: the
    child's first journal would wait for it forever. The child renews the lock: its sink makes
    its journal and sends its run."""
    import multiprocessing
    import threading

    from rlm_mlflow import _journal

    held, release = threading.Event(), threading.Event()

    def making() -> None:  # a sink's thread in the middle of making a journal
        with _journal._MADE_LOCK:
            held.set()
            release.wait(WAIT)

    maker = threading.Thread(target=making, name="making-a-journal")
    maker.start()
    child = None
    try:
        assert held.wait(WAIT)
        child = multiprocessing.get_context("fork").Process(
            target=_child_journals_a_run, args=(str(tmp_path / "child"),)
        )
        child.start()
        child.join(WAIT)
        assert child.exitcode == 0, f"the child's run was not sent (exit {child.exitcode})"
    finally:
        if child is not None and child.is_alive():
            child.kill()
            child.join(WAIT)
        release.set()
        maker.join(WAIT)

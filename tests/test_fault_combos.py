"""Fault combinations: a create whose answer is lost, together with SIGTERM, a fork or a full disk.

A queue in front of the server (``FaultProxy`` mode ``late``) holds one ``runs/create`` past the
request timeout and forwards it after the client hung up: the server commits a run the sink does
not know of, and the sink looks for it by key instead of creating another. While it looks, the
process gets SIGTERM, forks a child that uses the sink too, or its journal's disk is full. Real
processes, real signals, real ``rlm-mlflow replay`` in a process of its own; every wait has a
deadline.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from promises_support import (
    WAIT,
    Agent,
    Store,
    assert_accounted,
    assert_each_once,
    journal_folders,
    replay_cli,
    wait_until,
)
from rlm_mlflow.testing import FaultProxy, MlflowServer

pytestmark = pytest.mark.integration

Spawn = Callable[..., Agent]

CREATES = "/api/2.0/mlflow/runs/create"
SEARCHES = "/api/2.0/mlflow/runs/search"
KEY = "rlm_mlflow.key"


def named(store: Store, experiment: str, name: str, *, deleted: bool = False) -> list[Any]:
    """The MLflow runs whose ``run_id`` tag is ``name`` (deleted ones too, if asked)."""
    runs = store.runs(experiment, include_deleted=deleted)
    return [run for run in runs if run.data.tags.get("run_id") == name]


def statuses(runs: list[Any]) -> list[str]:
    return sorted(f"{run.info.status}/{run.info.lifecycle_stage}" for run in runs)


def hold_next_create(proxy: FaultProxy) -> None:
    """The next ``runs/create`` waits 2.5 s in the proxy (the sinks' request timeout is 1 s),
    then goes to the server even though its client gave up: committed, its answer lost."""
    proxy.set(mode="late", latency=2.5, count=1, path="/runs/create")


def creates_over_two_replays(journal_dir: Path, proxy: FaultProxy) -> list[int]:
    """``rlm-mlflow replay`` run twice through ``proxy``, each to success: the count of
    ``runs/create`` requests the proxy has seen after each."""
    after = []
    for attempt in range(2):
        done = replay_cli(journal_dir, tracking_uri=proxy.uri)
        assert done.returncode == 0, f"replay {attempt + 1}: {done.stdout}{done.stderr}"
        after.append(proxy.paths[CREATES])
    return after


# -- 1. SIGTERM while the sink looks for a run whose create was lost ------------------------------


def sigterm_while_looking(
    agents: Spawn, proxy: FaultProxy, store: Store, experiment: str, shutdown_timeout: float
) -> Agent:
    """Run ``held`` logged and ended in an agent whose create of it the proxy holds; SIGTERM
    once the sink looks for it by key (a ``runs/search`` after the create); the agent's end
    awaited (it must die of the signal)."""
    agent = agents("lost_create.py", proxy.uri, experiment, str(shutdown_timeout), stdin=True)
    agent.expect("READY", 120)
    looked = proxy.paths[SEARCHES]
    hold_next_create(proxy)
    agent.send("go")
    agent.expect("LOGGED")
    wait_until(lambda: proxy.paths[SEARCHES] > looked, WAIT, "the sink looking for held by key")
    # The combination is entered: the held create is not committed yet.
    assert named(store, experiment, "held") == [], "the held create was committed already"
    agent.signal(signal.SIGTERM)
    code = agent.wait(shutdown_timeout + 30)
    assert code == -signal.SIGTERM, f"exit code {code}; stderr:\n{agent.stderr()[-2000:]}"
    wait_until(lambda: proxy.handling == 0, WAIT, "the proxy forwarded the held create")
    return agent


@pytest.mark.slow
def test_sigterm_while_the_sink_looks_for_a_lost_create_ends_the_one_run_finished(
    agents: Spawn,
    store: Store,
    mlflow_server: MlflowServer,
    experiment_name: str,
    journal_dir: Path,
) -> None:
    """Run ``held`` ends FINISHED in the agent; the proxy holds its create past the 1 s request
    timeout and commits it late. While the sink looks for it by key, the agent gets SIGTERM.
    Its 10 s shutdown timeout covers the look-up (the create's late window ends about 4 s after
    it went), so at exit: one MLflow run ``held``, FINISHED, each step once, one create, nothing
    kept for replay. Replay, run twice, sends no create and changes nothing."""
    with FaultProxy(mlflow_server.port) as proxy:
        before = proxy.paths[CREATES]
        agent = sigterm_while_looking(agents, proxy, store, experiment_name, 10.0)
        creates = proxy.paths[CREATES] - before - 1  # the warm run's create
        kept = [p.name for p in journal_folders(journal_dir)]
        at_exit = statuses(named(store, experiment_name, "held", deleted=True))
        creates_after_replay = creates_over_two_replays(journal_dir, proxy)[-1] - before - 1
        requests = dict(proxy.paths)
    seen = f"requests {requests}; agent stderr:\n{agent.stderr()[-2000:]}"
    assert at_exit == ["FINISHED/active"], f"at exit: {at_exit}; {seen}"
    assert creates == 1, f"{creates} creates of held; {seen}"
    assert kept == [], f"kept for replay: {kept}; {seen}"
    assert creates_after_replay == 1, f"replay sent {creates_after_replay - 1} creates; {seen}"
    held = named(store, experiment_name, "held", deleted=True)
    assert statuses(held) == ["FINISHED/active"], f"after replay: {statuses(held)}; {seen}"
    assert_each_once(store.steps(held[0]), range(5))
    assert_each_once(store.steps(held[0], "cumulative_reward"), range(5))


@pytest.mark.slow
def test_sigterm_with_too_short_a_deadline_for_the_look_up_leaves_one_finished_run_after_replay(
    agents: Spawn,
    store: Store,
    mlflow_server: MlflowServer,
    experiment_name: str,
    journal_dir: Path,
) -> None:
    """As above with a 2 s shutdown timeout: the close cannot wait out the lost create's late
    window. The sink may either keep the run for replay or create it again at once (and keep
    for replay the duplicate the held create may still make). Either way, at exit a run left
    RUNNING has a journal kept for replay, and after replay (run twice) exactly one active run
    ``held`` is left, FINISHED, each step once; any other was deleted and holds no step; at
    most one create besides the lost one, and none from the second replay."""
    with FaultProxy(mlflow_server.port) as proxy:
        before = proxy.paths[CREATES]
        agent = sigterm_while_looking(agents, proxy, store, experiment_name, 2.0)
        creates = proxy.paths[CREATES] - before - 1  # the warm run's create
        kept = [p.name for p in journal_folders(journal_dir)]
        at_exit = statuses(named(store, experiment_name, "held"))
        after = [n - before - 1 for n in creates_over_two_replays(journal_dir, proxy)]
        requests = dict(proxy.paths)
    seen = (
        f"at exit {at_exit} ({creates} creates, kept {kept}); creates after each replay {after};"
        f" requests {requests}; agent stderr:\n{agent.stderr()[-2000:]}"
    )
    if "RUNNING/active" in at_exit:
        assert kept, f"a run left RUNNING and nothing kept for replay; {seen}"
    assert creates <= 2, seen
    assert after[0] <= 2, seen
    assert after[1] == after[0], seen
    held = named(store, experiment_name, "held", deleted=True)
    active = [run for run in held if run.info.lifecycle_stage == "active"]
    assert statuses(active) == ["FINISHED/active"], f"after replay {statuses(held)}; {seen}"
    assert_each_once(store.steps(active[0]), range(5))
    assert_each_once(store.steps(active[0], "cumulative_reward"), range(5))
    for run in held:
        if run.info.lifecycle_stage != "active":
            assert store.steps(run) == [], f"a deleted duplicate holds steps; {seen}"
    assert journal_folders(journal_dir) == []


# -- 2. a forked child of a process whose sink lost a create ------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("child_ending", ["exit", "sigterm", "sigterm-looking"])
@pytest.mark.parametrize("parent_run", ["open", "ended"])
def test_a_child_forked_while_its_parent_looks_for_a_lost_create_duplicates_nothing(
    agents: Spawn,
    store: Store,
    mlflow_server: MlflowServer,
    experiment_name: str,
    journal_dir: Path,
    parent_run: str,
    child_ending: str,
) -> None:
    """The proxy holds the create of run ``parent`` past the 1 s request timeout and commits
    it late; while the parent's sink looks for it by key (before it is committed), the process
    forks, the run still open or ended already. The child logs run ``child`` with the sink it
    inherited, then exits normally (run FINISHED) or is SIGTERMed (run KILLED, the child dies
    of the signal), at once or (``sigterm-looking``) while its own create, held too, is looked
    for by key. The parent then ends its run if open and closes its sink. Expected: one MLflow
    run of each, with keys of their own, ``parent`` FINISHED with its five steps once,
    ``child`` ended as said with its three steps once, two creates in all (the child never
    sends the parent's create, nor a second of its own), nothing kept for replay; replay, run
    twice, sends no create and changes nothing."""
    with FaultProxy(mlflow_server.port) as proxy:
        agent = agents(
            "fork_lost_create.py",
            proxy.uri,
            experiment_name,
            parent_run,
            child_ending,
            stdin=True,
        )
        agent.expect("READY", 120)
        before, looked = proxy.paths[CREATES], proxy.paths[SEARCHES]
        held = 2 if child_ending == "sigterm-looking" else 1  # the child's create too
        proxy.set(mode="late", latency=2.5, count=held, path="/runs/create")
        agent.send("go")
        agent.expect("LOGGED")
        wait_until(lambda: proxy.paths[SEARCHES] > looked, WAIT, "the parent looking by key")
        agent.send("fork")
        child = int(agent.expect("CHILD_LOGGED").split()[1])
        if child_ending == "sigterm-looking":
            agent.expect("CHILD_LOOKING")
        # The combination was entered: the parent's held create was not committed yet.
        lost_at_fork = named(store, experiment_name, "parent") == []
        if child_ending.startswith("sigterm"):
            os.kill(child, signal.SIGTERM)
        ended = agent.expect("CHILD_ENDED", WAIT).split(" ", 1)[1]
        status = json.loads(agent.expect("STATUS", WAIT).split(" ", 1)[1])
        code = agent.wait(WAIT)
        wait_until(lambda: proxy.handling == 0, WAIT, "the proxy forwarded the held creates")
        creates = proxy.paths[CREATES] - before
        kept = [p.name for p in journal_folders(journal_dir)]
        runs = named(store, experiment_name, "parent", deleted=True)
        runs += named(store, experiment_name, "child", deleted=True)
        at_exit = {run.data.tags["run_id"]: statuses([run]) for run in runs}
        creates_after_replay = creates_over_two_replays(journal_dir, proxy)[-1] - before
        requests = dict(proxy.paths)
    seen = (
        f"child ended {ended}; parent exit {code}; at exit {at_exit}; {creates} creates "
        f"({creates_after_replay} after replay); kept {kept}; parent status {status}; "
        f"requests {requests}; stderr:\n{agent.stderr()[-3000:]}"
    )
    assert lost_at_fork, f"the parent's run existed in MLflow before the fork; {seen}"
    child_status = "FINISHED" if child_ending == "exit" else "KILLED"
    assert ended == ("exit 0" if child_ending == "exit" else f"signal {int(signal.SIGTERM)}"), seen
    assert code == 0, seen
    parent = named(store, experiment_name, "parent", deleted=True)
    forked = named(store, experiment_name, "child", deleted=True)
    assert statuses(parent) == ["FINISHED/active"], seen
    assert statuses(forked) == [f"{child_status}/active"], seen
    assert parent[0].data.tags[KEY] != forked[0].data.tags[KEY], seen
    assert creates == 2, seen
    assert kept == [], seen
    assert creates_after_replay == 2, seen
    assert_each_once(store.steps(parent[0]), range(5))
    assert_each_once(store.steps(forked[0]), range(3))


# -- 3. the journal's disk full while a create is lost -------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("queue_size", [10_000, 50], ids=["in-memory", "spilling"])
@pytest.mark.parametrize("limit_kib", [16, 512], ids=["no-journal", "full-mid-run"])
def test_a_full_journal_disk_while_a_create_is_lost_ends_the_one_run_finished(
    agents: Spawn,
    store: Store,
    mlflow_server: MlflowServer,
    experiment_name: str,
    journal_dir: Path,
    queue_size: int,
    limit_kib: int,
) -> None:
    """Every file write fails (ulimit -f) past 16 KiB (the journal gets no segment at all) or
    512 KiB (its first segment is made, not the next: the disk fills up mid-run). The proxy
    holds the create of run ``full`` past the 1 s request timeout and commits it late; while the
    sink looks for it by key, the agent takes 3,000 more steps (the sink reports a journal
    problem by then), ends the run and closes. Expected: one MLflow run ``full``, FINISHED,
    one create, no step stored twice; with a queue that holds every step, every step landed;
    replay adds no create, no step, and does not turn the run KILLED."""
    steps = 3000
    with FaultProxy(mlflow_server.port) as proxy:
        agent = agents(
            "disk_full_lost_create.py",
            proxy.uri,
            experiment_name,
            str(queue_size),
            str(steps),
            str(limit_kib),
            stdin=True,
        )
        agent.expect("READY", 120)
        before, looked = proxy.paths[CREATES], proxy.paths[SEARCHES]
        hold_next_create(proxy)
        agent.send("go")
        started = json.loads(agent.expect("STARTED").split(" ", 1)[1])
        wait_until(lambda: proxy.paths[SEARCHES] > looked, WAIT, "the sink looking by key")
        agent.send("fill")
        problem = json.loads(agent.expect("FILLED", WAIT).split(" ", 1)[1])
        # The combination was entered: the held create was not committed yet.
        still_lost = named(store, experiment_name, "full") == []
        status = json.loads(agent.expect("STATUS", 120).split(" ", 1)[1])
        code = agent.wait(WAIT)
        wait_until(lambda: proxy.handling == 0, WAIT, "the proxy forwarded the held create")
        creates = proxy.paths[CREATES] - before
        kept = [p.name for p in journal_folders(journal_dir)]
        at_exit = statuses(named(store, experiment_name, "full", deleted=True))
        creates_after_replay = creates_over_two_replays(journal_dir, proxy)[-1] - before
        requests = dict(proxy.paths)
    seen = (
        f"journal problem {started!r} at the start, {problem!r} after the steps; at exit "
        f"{at_exit}; {creates} creates ({creates_after_replay} after replay); kept {kept}; "
        f"status {status}; requests {requests}; stderr:\n{agent.stderr()[-3000:]}"
    )
    assert code == 0, seen
    assert problem, f"the disk never filled up; {seen}"  # the combination was entered
    if limit_kib > 256:
        assert started is None, f"the disk was full before the run started; {seen}"
    assert still_lost, f"the held create was committed before the disk filled; {seen}"
    assert_accounted(status)
    assert status["pending"] == 0, seen
    if status["deferred"] == 0:  # nothing kept: none may claim so
        assert "replay" not in agent.stderr(), f"says events were kept for replay; {seen}"
    assert at_exit == ["FINISHED/active"], seen
    assert creates == 1, seen
    assert creates_after_replay == 1, seen
    full = named(store, experiment_name, "full", deleted=True)
    assert statuses(full) == ["FINISHED/active"], seen
    landed = store.steps(full[0])
    assert len(landed) == len(set(landed)), f"a step stored twice; {seen}"
    if queue_size >= steps:  # nothing had to wait on disk: everything is sent
        assert_each_once(landed, range(steps))

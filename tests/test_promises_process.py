"""Promises about how a process ends, tested with real child processes against a real server.

Real signals, real ``kill -9``, real ``rlm-mlflow replay`` in a process of its own, real forks and
resource limits. The agents (``tests/agents``) use only the sink's public API and say on stdout
when they reach the point the test waits for; every wait has a deadline.
"""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
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
    patient,
    replay_cli,
    wait_until,
)
from rlm_mlflow import MLflowSink
from rlm_mlflow.testing import FaultProxy, MlflowServer, free_port, local_server

pytestmark = pytest.mark.integration

Spawn = Callable[..., Agent]


def step_numbers(lines: list[str]) -> list[int]:
    """The numbers of the ``STEP n`` lines an agent printed."""
    return [int(line.split()[1]) for line in lines if line.startswith("STEP ")]


def payload(line: str) -> Any:
    """The JSON after the first word of an agent's line."""
    return json.loads(line.split(" ", 1)[1])


# -- 2. crash durability ---------------------------------------------------------------------


@pytest.mark.slow
def test_every_step_whose_hook_returned_survives_kill_9(
    agents: Spawn,
    mlflow_server: MlflowServer,
    store: Store,
    experiment_name: str,
    journal_dir: Path,
) -> None:
    """A step whose hook returned survives kill -9: replay, run twice, lands it exactly once."""
    for trial, kill_after in enumerate((60, 150, 240)):
        run_id = f"crash-{trial}"
        agent = agents("crash_steps.py", mlflow_server.uri, experiment_name, run_id)
        while True:
            line = agent.next_line(WAIT)
            assert line is not None, f"the agent ended on its own:\n{agent.stderr()}"
            if step_numbers([line]) and step_numbers([line])[0] >= kill_after and agent.caught_up:
                agent.kill9()  # right after reading the latest step the agent printed
                break
        returned = step_numbers(agent.lines + agent.rest())
        for attempt in range(2):
            done = replay_cli(journal_dir)
            assert done.returncode == 0, f"replay {attempt + 1}: {done.stdout}{done.stderr}"
        run = store.run(experiment_name, run_id)
        assert_each_once(store.steps(run), range(max(returned) + 1))
        assert_each_once(store.steps(run, "cumulative_reward"), range(max(returned) + 1))
        assert run.info.status == "KILLED"
        assert journal_folders(journal_dir) == []


# -- 3, 4, 5. signals --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("trial", [1, 2])
@pytest.mark.parametrize("kind", ["reward", "step", "cumulative", "param", "event"])
def test_sigterm_inside_a_hook_ends_the_run_killed_and_the_process_dies_of_it(
    agents: Spawn,
    store: Store,
    mlflow_server: MlflowServer,
    experiment_name: str,
    kind: str,
    trial: int,
) -> None:
    """SIGTERM while the main thread is inside a hook: the run ends KILLED with every step sent
    before, and the process dies of SIGTERM within shutdown_timeout (2 s) + slack."""
    agent = agents("signal_in_hook.py", mlflow_server.uri, experiment_name, kind)
    agent.expect("ARMED")
    armed = time.monotonic()
    code = agent.wait(30)
    elapsed = time.monotonic() - armed
    runs = store.by_name(experiment_name)
    problems = []
    if code != -signal.SIGTERM:
        problems.append(f"exit code {code}, not -SIGTERM")
    if elapsed > 2.0 + 5.0:
        problems.append(f"took {elapsed:.1f} s to die")
    if runs["hooked"].info.status != "KILLED":
        problems.append(f"run 'hooked' is {runs['hooked'].info.status}")
    still_running = [name for name, run in runs.items() if run.info.status == "RUNNING"]
    if still_running:
        problems.append(f"runs left RUNNING: {still_running}")
    assert not problems, f"{problems}; agent said {agent.lines}; stderr:\n{agent.stderr()[-2000:]}"
    steps = store.steps(runs["hooked"])
    assert_each_once(steps, range(10))


@pytest.mark.slow
def test_steps_after_sigterm_land_and_the_run_ends_killed_after_the_last_of_them(
    agents: Spawn, store: Store, mlflow_server: MlflowServer, experiment_name: str
) -> None:
    """SIGTERM (default action) while the agent steps every 4 ms: the agent goes on for 250 more
    steps, and every hook that returned lands exactly once; the run ends KILLED, its end after
    its last step, and the process dies of SIGTERM within shutdown_timeout (10 s) + slack."""
    agent = agents("steps_through_sigterm.py", mlflow_server.uri, experiment_name, "through", "300")
    while True:
        line = agent.next_line(WAIT)
        assert line is not None, f"the agent ended on its own:\n{agent.stderr()}"
        if step_numbers([line]) and step_numbers([line])[0] >= 50:
            break
    signalled = time.monotonic()
    agent.signal(signal.SIGTERM)
    code = agent.wait(60)
    elapsed = time.monotonic() - signalled
    said = agent.lines + agent.rest()
    returned = step_numbers(said)
    assert code == -signal.SIGTERM, f"exit code {code}; stderr:\n{agent.stderr()[-2000:]}"
    assert elapsed < 10.0 + 5.0, f"took {elapsed:.1f} s to die"
    assert "DONE" in said, f"the agent did not finish its steps: {said[-3:]}"
    assert "hook called after close" not in agent.stderr()
    run = store.run(experiment_name, "through")
    assert run.info.status == "KILLED"
    assert_each_once(store.steps(run), range(max(returned) + 1))
    assert max(returned) == 299
    history = store.client.get_metric_history(run.info.run_id, "step_reward")
    last_step_ms = max(point.timestamp for point in history)
    assert run.info.end_time >= last_step_ms


@pytest.mark.slow
def test_sigterm_with_many_runs_open_ends_every_one_killed_within_the_deadline(
    agents: Spawn, store: Store, mlflow_server: MlflowServer, experiment_name: str
) -> None:
    """30 sinks with 3 runs each open and sent, the agent stepping all of them, SIGTERM with
    a 6 s deadline: every run ends KILLED in MLflow and the process dies of the signal in
    time. The sinks stop taking hooks as early as ending 90 runs at the server's recent pace
    needs. Before, a fixed quarter of the deadline (about 1 s after the finish reserve) was
    kept for the ends, and most runs stayed RUNNING (60 to 80 of 90 with a 4 s deadline; with
    4 s, this code still left 4 to 13 RUNNING beside two busy loops: the server's pace)."""
    agent = agents("many_sinks_sigterm.py", mlflow_server.uri, experiment_name, "30", "3")
    agent.expect("READY", 120)
    signalled = time.monotonic()
    agent.signal(signal.SIGTERM)
    code = agent.wait(60)
    elapsed = time.monotonic() - signalled
    assert code == -signal.SIGTERM, f"exit code {code}; stderr:\n{agent.stderr()[-2000:]}"
    assert elapsed < 6.0 + 5.0, f"took {elapsed:.1f} s to die"
    runs = store.by_name(experiment_name)
    assert len(runs) == 90
    statuses = Counter(run.info.status for run in runs.values())
    assert statuses == {"KILLED": 90}, statuses


@pytest.mark.parametrize("kind", ["reward", "step", "cumulative", "event"])
def test_sigint_inside_a_hook_raises_when_the_hook_returns_with_the_step_kept(
    agents: Spawn,
    store: Store,
    mlflow_server: MlflowServer,
    experiment_name: str,
    kind: str,
) -> None:
    """SIGINT (Python's default handler: KeyboardInterrupt) while the main thread is inside a
    hook: the interrupt is raised as the hook returns, never in the middle of writing its record.
    The step the hook was taking lands, the run ends KILLED, the process dies of the interrupt."""
    agent = agents("signal_in_hook.py", mlflow_server.uri, experiment_name, kind, "SIGINT")
    agent.expect("ARMED")
    code = agent.wait(30)
    stderr = agent.stderr()
    assert code in (-signal.SIGINT, 1), f"exit code {code}; stderr:\n{stderr[-2000:]}"
    assert "KeyboardInterrupt" in stderr
    assert "RETURNED" not in agent.lines  # the interrupt came out of the hook itself
    runs = store.by_name(experiment_name)
    assert runs["hooked"].info.status == "KILLED"
    assert_each_once(store.steps(runs["hooked"]), range(11))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_sigterm_under_async_with_kills_the_run_and_the_process(
    agents: Spawn, store: Store, mlflow_server: MlflowServer, experiment_name: str, backend: str
) -> None:
    """SIGTERM to an ``async with MLflowSink`` program: it dies of SIGTERM within
    shutdown_timeout (3 s) + slack, its run KILLED, every step made before the signal landed."""
    agent = agents("async_forever.py", backend, mlflow_server.uri, experiment_name)
    before = 0  # the last step whose hook had returned when the signal was sent
    while before < 30:
        before = max(step_numbers([agent.expect("STEP ")]), default=0)
    agent.signal(signal.SIGTERM)
    signalled = time.monotonic()
    code = agent.wait(30)
    elapsed = time.monotonic() - signalled
    returned = step_numbers(agent.lines + agent.rest())
    run = store.by_name(experiment_name, missing_ok=True).get("async")
    problems = []
    if code != -signal.SIGTERM:
        problems.append(f"exit code {code}, not -SIGTERM")
    if elapsed > 3.0 + 5.0:
        problems.append(f"took {elapsed:.1f} s to die")
    if run is None or run.info.status != "KILLED":
        problems.append(f"run is {'never created' if run is None else run.info.status}")
    assert not problems, f"{problems}; stderr:\n{agent.stderr()[-2000:]}"
    # Steps made after the signal arrived may be cut off by the shutdown (counted, not sent);
    # every step made before it landed, each once, and what landed has no gap.
    assert run is not None
    landed = store.steps(run)
    assert max(landed) <= max(returned)
    assert_each_once(landed, range(max(before, *landed) + 1))


@pytest.mark.slow
@pytest.mark.parametrize("ending", ["sigterm", "sigterm-in-hook", "exit"])
def test_every_sink_of_a_process_ends_its_runs_within_one_shutdown_timeout(
    agents: Spawn, store: Store, mlflow_server: MlflowServer, experiment_name: str, ending: str
) -> None:
    """Five sinks, each with an open run, 1 s per request: on SIGTERM (KILLED; sent from outside,
    or arriving inside a hook of one of them) and on a normal exit (FAILED) every run ends, with
    all its steps, within ONE shutdown_timeout, not five."""
    second = patient(1.0)  # a busy machine stretches the requests and the deadline alike
    sinks, timeout = 5, 5.0 * second
    with FaultProxy(mlflow_server.port) as proxy:
        proxy.set(latency=second)
        mode = {"sigterm": "wait", "sigterm-in-hook": "hook", "exit": "exit"}[ending]
        agent = agents("many_sinks.py", mode, proxy.uri, experiment_name, str(sinks), str(timeout))
        agent.expect("READY", 120)
        began = time.monotonic()
        if ending == "sigterm":
            agent.signal(signal.SIGTERM)
        code = agent.wait(sinks * timeout + 30)
        elapsed = time.monotonic() - began
    expected_status = "FAILED" if ending == "exit" else "KILLED"
    runs = store.by_name(experiment_name)
    statuses = {name: run.info.status for name, run in runs.items()}
    problems = []
    if statuses != {f"sink-{n}": expected_status for n in range(sinks)}:
        problems.append(f"run statuses {statuses}, expected all {expected_status}")
    if elapsed > timeout + 3.0 * second:
        problems.append(f"the process took {elapsed:.1f} s to end (shutdown_timeout {timeout})")
    if code != (0 if ending == "exit" else -signal.SIGTERM):
        problems.append(f"exit code {code}")
    assert not problems, f"{problems}; stderr:\n{agent.stderr()[-2000:]}"
    for name, run in runs.items():
        steps = store.steps(run)
        last = 11 if name == "sink-0" and ending == "sigterm-in-hook" else 10  # the step it was in
        assert_each_once(steps, range(last))


@pytest.mark.slow
def test_a_signal_storm_during_sink_construction_and_close_never_hangs(
    agents: Spawn, mlflow_server: MlflowServer, experiment_name: str
) -> None:
    """SIGTERM sent as fast as possible while a program with its own (counting) handler builds
    and closes sinks: the program keeps going, finishes, and its handler saw the signals."""
    agent = agents("signal_storm.py", mlflow_server.uri, experiment_name, "1000", stdin=True)
    agent.expect("READY")
    last_progress = time.monotonic()
    said: list[str] = []
    while not any(line.startswith("DONE ") for line in said):
        assert not agent.ended_output, (
            f"the program ended (code {agent.wait(WAIT)}) before finishing; said {said[-3:]}; "
            f"stderr:\n{agent.stderr()[-2000:]}"
        )
        agent.signal(signal.SIGTERM)
        lines = agent.drain(0.0005)
        if lines:
            said += lines
            last_progress = time.monotonic()
        assert time.monotonic() - last_progress < 20.0, (
            f"no progress for 20 s (hung); last lines {said[-3:]}; stderr:\n"
            f"{agent.stderr()[-2000:]}"
        )
    agent.send("exit")
    code = agent.wait(WAIT)
    assert code == 0, f"exit code {code}; stderr:\n{agent.stderr()[-2000:]}"
    done = next(line for line in said if line.startswith("DONE "))
    assert int(done.split()[1]) > 0  # the program's own handler was called


# -- 14, 15. replay after a kill -----------------------------------------------------------------


@pytest.mark.slow
def test_a_child_of_a_parent_sent_in_an_earlier_session_is_linked_by_replay(
    agents: Spawn,
    store: Store,
    mlflow_server: MlflowServer,
    experiment_name: str,
    journal_dir: Path,
) -> None:
    """Parent sent (5,000 steps), child never sent, kill -9: replay gives the child its
    ``mlflow.parentRunId``, pointing at the parent's MLflow run."""
    with FaultProxy(mlflow_server.port) as proxy:
        agent = agents("parent_child.py", proxy.uri, experiment_name, stdin=True)
        agent.expect("PARENT_SENT", 120)
        proxy.set(mode="refuse")
        agent.send("go")
        agent.expect("CHILD_LOGGED")
        agent.kill9()
    done = replay_cli(journal_dir, tracking_uri=mlflow_server.uri)
    assert done.returncode == 0, done.stdout + done.stderr
    runs = store.by_name(experiment_name)
    assert sorted(runs) == ["child", "parent"]
    child = runs["child"]
    assert child.data.tags.get("mlflow.parentRunId") == runs["parent"].info.run_id, child.data.tags
    assert_each_once(store.steps(child), range(3))
    assert child.info.status == "KILLED"
    assert_each_once(store.steps(runs["parent"]), range(5000))


@pytest.mark.slow
def test_kill_9_while_the_sink_waits_for_a_create_the_server_holds_leaves_one_run_for_replay(
    agents: Spawn,
    store: Store,
    mlflow_server: MlflowServer,
    experiment_name: str,
    journal_dir: Path,
) -> None:
    """A queue in front of the server holds run ``held``'s create 2.5 s (the request timeout is
    1 s) and forwards it after the client hung up. The agent is killed -9 while its sink looks
    for that create by key (it sends no other while the server may still commit it). The held
    create commits: a RUNNING run. Replay finds it by its key and completes it rather than
    creating another: one create in all, one run, FINISHED, each step once."""
    creates, searches = "/api/2.0/mlflow/runs/create", "/api/2.0/mlflow/runs/search"
    with FaultProxy(mlflow_server.port) as proxy:
        agent = agents("lost_create.py", proxy.uri, experiment_name, stdin=True)
        agent.expect("READY", 120)
        before = proxy.paths[creates]
        proxy.set(mode="late", latency=2.5, count=1, path="/runs/create")
        agent.send("go")
        agent.expect("LOGGED")
        looked = proxy.paths[searches]
        wait_until(lambda: proxy.paths[searches] > looked, WAIT, "the sink looking for it")
        agent.kill9()
        wait_until(lambda: proxy.handling == 0, WAIT, "the proxy forwarded the held create")
        held = [r for r in store.runs(experiment_name) if r.data.tags.get("run_id") == "held"]
        assert [r.info.status for r in held] == ["RUNNING"]
        done = replay_cli(journal_dir, tracking_uri=proxy.uri)
        assert done.returncode == 0, done.stdout + done.stderr
        assert proxy.paths[creates] - before == 1, "a second create was sent"
    held = [r for r in store.runs(experiment_name) if r.data.tags.get("run_id") == "held"]
    assert [r.info.status for r in held] == ["FINISHED"]
    assert_each_once(store.steps(held[0]), range(5))
    assert journal_folders(journal_dir) == []


@pytest.mark.slow
def test_a_child_whose_parent_was_not_created_yet_is_linked_to_it_live_and_after_kill_9(
    agents: Spawn,
    store: Store,
    mlflow_server: MlflowServer,
    experiment_name: str,
    journal_dir: Path,
) -> None:
    """The server refuses to create the parent run (kept for replay); then it creates runs
    again and a child of that parent starts, ends and is flushed; kill -9 and replay. The child
    has its ``mlflow.parentRunId`` (the parent is created before it), and replay never leaves
    it without one: one parent, its steps once, the child FINISHED under it."""
    with FaultProxy(mlflow_server.port) as proxy:
        proxy.set(mode="http", status=503, path="runs/create")
        agent = agents("late_parent.py", proxy.uri, experiment_name, stdin=True)
        tried = payload(agent.expect("PARENT_TRIED", 120))
        assert tried["deferred"] >= 3, tried  # the parent's start and steps: kept for replay
        proxy.set(mode="pass")
        agent.send("go")
        agent.expect("CHILD_DONE", 120)
        agent.kill9()
    done = replay_cli(journal_dir, tracking_uri=mlflow_server.uri)
    assert done.returncode == 0, done.stdout + done.stderr
    runs = store.by_name(experiment_name)
    assert sorted(runs) == ["child", "parent"]
    child = runs["child"]
    assert child.data.tags.get("mlflow.parentRunId") == runs["parent"].info.run_id, child.data.tags
    assert child.info.status == "FINISHED"
    assert_each_once(store.steps(child), range(3))
    assert_each_once(store.steps(runs["parent"]), range(2))
    assert runs["parent"].info.status == "KILLED"


@pytest.mark.slow
def test_replay_into_a_file_store_repeats_no_point_the_sink_had_sent(
    agents: Spawn,
    experiment_name: str,
    journal_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A file store keeps every point it is given: after kill -9 and replay, the steps the sink
    had sent (and been told so) are not sent again, and the others land once."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    agent = agents("file_store.py", uri, experiment_name)
    agent.expect("READY", 120)
    agent.kill9()
    done = replay_cli(journal_dir)
    assert done.returncode == 0, done.stdout + done.stderr
    file_store = Store(uri)
    run = file_store.run(experiment_name, "filed")
    assert_each_once(file_store.steps(run), range(40))
    assert_each_once(file_store.steps(run, "cumulative_reward"), range(40))
    assert run.info.status == "KILLED"


# -- 18. journal disk full -------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("queue_size", [10_000, 50], ids=["in-memory", "spilling"])
def test_a_full_journal_disk_loses_no_run_and_leaves_nothing_misleading(
    agents: Spawn,
    store: Store,
    mlflow_server: MlflowServer,
    experiment_name: str,
    journal_dir: Path,
    queue_size: int,
) -> None:
    """Every file write fails past 16 KiB (ulimit -f): with the server up the run still ends
    FINISHED, every event is accounted for, and a later replay does not turn it KILLED."""
    steps = 3000
    agent = agents("disk_full.py", mlflow_server.uri, experiment_name, str(queue_size), str(steps))
    status = payload(agent.expect("STATUS", 120))
    code = agent.wait(WAIT)
    assert code == 0, agent.stderr()[-2000:]
    assert_accounted(status)
    assert status["pending"] == 0
    run = store.run(experiment_name, "full")
    landed = store.steps(run)
    problems = []
    if run.info.status != "FINISHED":
        problems.append(f"the run is {run.info.status}, not FINISHED")
    if len(landed) != len(set(landed)):
        problems.append("a step stored twice")
    if queue_size >= steps:  # nothing had to wait on disk: everything is sent
        if status["dropped"] or status["deferred"]:
            problems.append(f"dropped {status['dropped']}, deferred {status['deferred']}")
        if sorted(set(landed)) != list(range(steps)):
            problems.append(f"{steps - len(set(landed))} steps never landed")
    if status["deferred"] == 0 and "replay" in agent.stderr():  # nothing kept: none may claim so
        problems.append(f"says events were kept for replay: {agent.stderr()[-500:]}")
    done = replay_cli(journal_dir)
    if done.returncode != 0:
        problems.append(f"replay failed: {done.stdout}{done.stderr}")
    after = store.run(experiment_name, "full")
    if after.info.status != run.info.status:
        problems.append(f"replay turned the {run.info.status} run {after.info.status}")
    replayed = store.steps(after)
    if len(replayed) != len(set(replayed)):
        problems.append("replay stored a step twice")
    assert not problems, problems


# -- 24. replay against a dead server ------------------------------------------------------------


@pytest.mark.slow
def test_replay_with_a_retry_deadline_gives_up_on_a_dead_server_by_that_deadline(
    store: Store, mlflow_server: MlflowServer, experiment_name: str, journal_dir: Path
) -> None:
    """``rlm-mlflow replay --retry-deadline 3`` against a dead server: back within 3 s + slack,
    non-zero exit, nothing removed (a later replay to a live server still sends it all)."""
    dead = f"http://127.0.0.1:{free_port()}"
    for n in range(3):
        sink = MLflowSink(
            enabled=True,
            experiment=experiment_name,
            tracking_uri=dead,
            flush_interval=0.1,
            retry_deadline=0.5,
            retry_initial=0.05,
        )
        sink.on_run_start(f"kept-{n}", task="t", environment="e", params={})
        for number in range(5):
            sink.on_step(f"kept-{n}", event={"step": number, "reward": 1.0}, cumulative_reward=1.0)
        sink.on_run_end(f"kept-{n}", result={"completed": True, "steps": 5}, run_path=None)
        sink.close(3.0)
    assert len(journal_folders(journal_dir)) == 3
    began = time.monotonic()
    done = replay_cli(journal_dir, tracking_uri=dead, retry_deadline=3.0, timeout=300)
    elapsed = time.monotonic() - began
    assert done.returncode != 0, done.stdout
    assert elapsed <= 3.0 + 5.0, f"replay took {elapsed:.1f} s"
    assert len(journal_folders(journal_dir)) == 3
    again = replay_cli(journal_dir, tracking_uri=mlflow_server.uri)
    assert again.returncode == 0, again.stdout + again.stderr
    runs = store.by_name(experiment_name)
    assert sorted(runs) == [f"kept-{n}" for n in range(3)]
    for run in runs.values():
        assert run.info.status == "FINISHED"
        assert_each_once(store.steps(run), range(5))


# -- 25, 26. resources -----------------------------------------------------------------------------


@pytest.mark.slow
def test_sinks_dropped_without_close_release_threads_and_files_and_send_everything(
    agents: Spawn, tmp_path: Path, experiment_name: str, journal_dir: Path
) -> None:
    """300 sinks that log one run each and are dropped without close(): every run lands, the
    process comes back to at most 2 extra threads and its file descriptors, and it exits within
    shutdown_timeout leaving no journal behind. (A server of its own: a sink that floods its
    server must not slow the other tests down.)"""
    count = 300
    with local_server(tmp_path / "server") as server:
        agent = agents("dropped_sinks.py", server.uri, experiment_name, str(count))
        agent.expect("BASELINE")
        result = payload(agent.expect("RESULT", 300))
        problems = []
        try:
            code: int | None = agent.wait(10.0 + 20.0)  # the exit hook's shutdown_timeout + slack
        except AssertionError:
            code = None
            problems.append("the process did not exit within shutdown_timeout + 20 s")
        if result["finished"] != count:
            problems.append(f"{result['finished']} of {count} runs FINISHED before the deadline")
        if result["threads"] > result["threads_before"] + 2:
            problems.append(
                f"{result['threads']} threads (baseline {result['threads_before']}): "
                f"{result['thread_names'][:10]}"
            )
        if result["fds"] > result["fds_before"] + 8:
            problems.append(f"{result['fds']} file descriptors (baseline {result['fds_before']})")
        if code not in (0, None):
            problems.append(f"exit code {code}")
        left = journal_folders(journal_dir)
        if left:
            problems.append(f"{len(left)} journal folders left behind")
        if result["finished"] == count:  # read back only a server that kept up
            runs = Store(server.uri).by_name(experiment_name)
            finished = sum(1 for run in runs.values() if run.info.status == "FINISHED")
            if finished != count:
                problems.append(f"after exit {finished} of {count} runs FINISHED")
    assert not problems, problems


@pytest.mark.slow
def test_an_unused_sink_and_a_forked_pool_leave_no_journal_and_no_thread(
    agents: Spawn, mlflow_server: MlflowServer, experiment_name: str, journal_dir: Path
) -> None:
    """A sink built and never used creates no folder and no thread; a forked pool whose workers
    never log (one closed, one terminated) leaves no journal folder behind."""
    agent = agents("fork_pool.py", mlflow_server.uri, experiment_name, str(journal_dir))
    unused = payload(agent.expect("UNUSED"))
    agent.expect("DONE", 120)
    code = agent.wait(WAIT)
    left = [p.name for p in journal_folders(journal_dir)]
    problems = []
    if unused["threads_added"] != 0:
        problems.append(f"the unused sink started {unused['threads_added']} threads")
    if unused["journal"]:
        problems.append(f"the unused sink created {unused['journal']}")
    if left:
        problems.append(f"{len(left)} journal folders left after exit: {left[:5]}")
    if code != 0:
        problems.append(f"exit code {code}")
    assert not problems, f"{problems}; stderr:\n{agent.stderr()[-2000:]}"

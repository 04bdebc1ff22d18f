"""Replay of many runs a killed process journaled while MLflow took none of them: one replay
sends everything exactly once, at a few requests per run (runs found in one search, no metric
history read for points that cannot be stored), and a second replay has nothing left."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from promises_support import Agent
from rlm_mlflow import MLflowSink, TransientError, replay
from rlm_mlflow._cli import print_replay_report
from rlm_mlflow._transports.base import Metric, RunRef
from rlm_mlflow.testing import FaultProxy, MemoryTransport, MlflowServer

RUNS = 40
STEPS = 50
OPEN = 2  # runs the process never ended: replay ends them KILLED
TRACE_READ = "/api/3.0/mlflow/traces/"
#: What only traces (spans, their assessments) ask of the server: shared, not per run.
TRACE_PATHS = ("/traces", "/v1/traces", "/assessments", "/version")


def journal_of_a_killed_agent(
    agents: Callable[..., Agent], mlflow_server: MlflowServer, experiment: str
) -> None:
    """The agent's run creates are all answered 503 (so its records went out in requests, and
    none landed); killed -9 once it journaled every run and tried to send some."""
    with FaultProxy(mlflow_server.port) as proxy:
        proxy.set(mode="http", status=503, path="/runs/create")
        agent = agents("many_runs.py", proxy.uri, experiment, str(RUNS), str(STEPS), str(OPEN))
        agent.expect("JOURNALED", 120)
        assert proxy.wait_until(lambda p: p.paths["/api/2.0/mlflow/runs/create"] >= 4, 120)
        agent.kill9()


def assert_once_and_nothing_left(
    mlflow_client: Any, experiment: str, journal_dir: Path, uri: str
) -> None:
    """Each run and point once in MLflow, and a second replay finds nothing left to send."""
    assert_exactly_once(mlflow_client, experiment)
    again = replay(journal_dir, tracking_uri=uri)
    assert (again.journals, again.events, again.sent) == (0, 0, 0), again


def per_run_requests(paths: Counter[str]) -> Counter[str]:
    return Counter({p: n for p, n in paths.items() if not any(t in p for t in TRACE_PATHS)})


def assert_exactly_once(mlflow_client: Any, experiment: str) -> None:
    found = mlflow_client.get_experiment_by_name(experiment)
    runs = mlflow_client.search_runs([found.experiment_id], max_results=1000)
    names = Counter(run.data.tags.get("run_id") for run in runs)
    assert names == Counter(f"run-{i}" for i in range(RUNS)), names  # each run once
    statuses = Counter(run.info.status for run in runs)
    assert statuses == {"FINISHED": RUNS - OPEN, "KILLED": OPEN}, statuses
    for run in runs:
        for key in ("step_reward", "cumulative_reward"):
            history = mlflow_client.get_metric_history(run.info.run_id, key)
            steps = sorted(m.step for m in history)
            assert steps == list(range(STEPS)), (run.data.tags.get("run_id"), key, steps)
        if run.info.status == "FINISHED":
            assert len(mlflow_client.get_metric_history(run.info.run_id, "total_reward")) == 1


def test_one_replay_sends_many_killed_runs_once_at_a_few_requests_per_run(
    agents: Callable[..., Agent],
    mlflow_server: MlflowServer,
    mlflow_client: Any,
    experiment_name: str,
    journal_dir: Path,
) -> None:
    journal_of_a_killed_agent(agents, mlflow_server, experiment_name)
    with FaultProxy(mlflow_server.port) as proxy:
        report = replay(journal_dir, tracking_uri=proxy.uri)
        paths = Counter(proxy.paths)
    assert report.ok, report
    assert report.sent == report.events > 0
    assert report.runs_sent == report.events  # every event's run part landed now
    assert report.spans_sent >= RUNS * (STEPS + 1)
    assert report.runs_killed == OPEN
    requests = per_run_requests(paths)
    # No point could be stored (no run existed): nothing is read back.
    assert not [p for p in requests if "get-history" in p], requests
    # One search finds the runs, one more looks for late duplicates of uncertain creates.
    assert 1 <= requests["/api/2.0/mlflow/runs/search"] <= 2, requests
    # Per run: create, one batch (params, steps, summary), end.
    assert sum(requests.values()) - 3 <= 3 * RUNS, requests  # 3: the experiment, the searches
    # A trace's assessments are read before they are written only where a process may have
    # written them: no end here ever went out with its spans; the runs replay ends KILLED
    # may have been ended by an earlier replay.
    reads = [p for p in paths if p.startswith(TRACE_READ) and not p.endswith("/assessments")]
    assert sum(paths[p] for p in reads) <= OPEN, reads
    # Each trace's info goes with its Feedback in one request; spans of many traces share one.
    assert paths["/api/3.0/mlflow/traces"] == RUNS, paths
    assert not [p for p in paths if p.endswith("/assessments")], paths
    assert paths["/v1/traces"] < RUNS / 2, paths
    assert_once_and_nothing_left(mlflow_client, experiment_name, journal_dir, mlflow_server.uri)


def test_answers_lost_during_the_replay_still_send_each_run_and_point_once(
    agents: Callable[..., Agent],
    mlflow_server: MlflowServer,
    mlflow_client: Any,
    experiment_name: str,
    journal_dir: Path,
) -> None:
    """The server commits, the answer is lost: creates, batches and ends alike, for a while."""
    journal_of_a_killed_agent(agents, mlflow_server, experiment_name)
    with FaultProxy(mlflow_server.port) as proxy:
        proxy.set(mode="commit_then_reset", path="/api/2.0/mlflow/runs/", count=12)
        report = replay(journal_dir, tracking_uri=proxy.uri)
        assert proxy.paths["/api/2.0/mlflow/runs/log-batch"] > RUNS - OPEN  # some were resent
    assert report.ok, report
    assert report.sent == report.events > 0
    assert_once_and_nothing_left(mlflow_client, experiment_name, journal_dir, mlflow_server.uri)


def test_points_a_killed_process_sent_without_an_answer_are_not_sent_again(
    agents: Callable[..., Agent],
    mlflow_server: MlflowServer,
    mlflow_client: Any,
    experiment_name: str,
    journal_dir: Path,
) -> None:
    """The agent's batches were committed but their answers lost until it was killed: replay
    finds its runs with their points and sends only what they lack."""
    lost = "/runs/log-batch"
    with FaultProxy(mlflow_server.port) as proxy:
        proxy.set(mode="commit_then_reset", path=lost)
        agent = agents("many_runs.py", proxy.uri, experiment_name, str(RUNS), str(STEPS), str(OPEN))
        agent.expect("JOURNALED", 120)
        assert proxy.wait_until(lambda p: p.paths["/api/2.0/mlflow" + lost] >= 8, 120)
        agent.kill9()
    report = replay(journal_dir, tracking_uri=mlflow_server.uri)
    assert report.ok, report
    assert report.sent == report.events > 0
    assert_once_and_nothing_left(mlflow_client, experiment_name, journal_dir, mlflow_server.uri)


@pytest.mark.integration
def test_a_killed_long_run_is_replayed_once_reading_only_the_steps_in_doubt(
    agents: Callable[..., Agent],
    mlflow_server: MlflowServer,
    mlflow_client: Any,
    experiment_name: str,
    journal_dir: Path,
) -> None:
    """One run of 40,000 steps whose batches the server committed while every answer was lost,
    then the process killed: replay checks what the store holds by reading the steps in doubt
    (bounded range reads), never the metric's whole history, and every step lands once."""
    steps, lost = 40_000, "/runs/log-batch"
    with FaultProxy(mlflow_server.port) as proxy:
        proxy.set(mode="commit_then_reset", path=lost)
        agent = agents("many_runs.py", proxy.uri, experiment_name, "1", str(steps), "1")
        agent.expect("JOURNALED", 120)
        assert proxy.wait_until(lambda p: p.paths["/api/2.0/mlflow" + lost] >= 4, 120)
        agent.kill9()
    with FaultProxy(mlflow_server.port) as proxy:
        report = replay(journal_dir, tracking_uri=proxy.uri)
        paths = Counter(proxy.paths)
    assert report.ok, report
    assert paths["/ajax-api/2.0/mlflow/metrics/get-history-bulk-interval"] >= 1, paths
    assert paths["/api/2.0/mlflow/metrics/get-history"] == 0, paths
    found = mlflow_client.get_experiment_by_name(experiment_name)
    (run,) = mlflow_client.search_runs([found.experiment_id])
    assert run.info.status == "KILLED"
    for key in ("step_reward", "cumulative_reward"):
        history = mlflow_client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == list(range(steps)), key


class _HalfCommitting(MemoryTransport):
    """While ``lose`` is set, a store that commits the first half of the first batch it gets
    (params and all), then nothing, and loses every answer; it records every point offered."""

    def __init__(self) -> None:
        super().__init__()
        self.lose = True
        self.committed = False
        self.offered: list[Metric] = []

    def log_batch(
        self,
        run_uuid: str,
        *,
        metrics: Sequence[Metric] = (),
        params: Sequence[tuple[str, str]] = (),
        tags: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.offered.extend(metrics)
        if not self.lose:
            super().log_batch(run_uuid, metrics=metrics, params=params, tags=tags)
            return
        if not self.committed:
            self.committed = True
            kept = metrics[: max(1, len(metrics) // 2)]
            super().log_batch(run_uuid, metrics=kept, params=params, tags=tags)
        raise TransientError("the answer was lost", maybe_committed=True)


def quick_to_give_up(memory: MemoryTransport, experiment: str, **settings: Any) -> MLflowSink:
    """A sink on ``memory`` whose retries end within ``retry_deadline`` (what fails is kept)."""
    return MLflowSink(
        enabled=True,
        experiment=experiment,
        transport=memory,
        retry_initial=0.01,
        retry_max_wait=0.05,
        **settings,
    )


def test_replay_sends_exactly_the_points_a_lost_answer_left_out(journal_dir: Path) -> None:
    """Batches half committed, their answers lost, until the sink gave up: replay offers the
    store exactly the points it lacks (those past each metric's latest stored point without
    reading them back), reads back only the metrics that may hold some, and ends the run."""
    memory = _HalfCommitting()
    sink = quick_to_give_up(memory, "unit", retry_deadline=0.3, flush_interval=0.05)
    sink.on_run_start("r", task="t", environment="e", params={})
    for i in range(40):
        sink.on_step("r", event={"step": i, "reward": 0.5}, cumulative_reward=0.5 * (i + 1))
    sink.on_run_end("r", result={"completed": True, "steps": 40}, run_path=None)
    sink.close(5.0)
    assert sink.status()["deferred"] > 0, sink.status()
    (run,) = memory.by_name("r")
    stored = set(run.metrics)
    assert 0 < len([m for m in stored if m.key == "step_reward"]) < 40

    memory.lose = False
    memory.offered.clear()
    memory.calls.clear()
    report = replay(journal_dir, transport=memory)
    assert report.ok, report
    assert not stored & set(memory.offered)  # nothing it holds is offered again
    for key in ("step_reward", "cumulative_reward"):
        assert sorted(m.step for m in run.metrics if m.key == key) == list(range(40)), key
    # The two step metrics, each read over the steps in doubt only: never a whole history.
    assert memory.calls.count("metric_history_range") <= 2
    assert "metric_history" not in memory.calls
    assert run.status == "FINISHED"


def test_a_replay_whose_traces_fail_says_its_runs_landed(
    agents: Callable[..., Agent],
    mlflow_server: MlflowServer,
    mlflow_client: Any,
    experiment_name: str,
    journal_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Every span request is answered 503: no event counts as sent (its trace part is kept for
    the next replay), but the report says that every event landed in its MLflow run."""
    journal_of_a_killed_agent(agents, mlflow_server, experiment_name)
    with FaultProxy(mlflow_server.port) as proxy:
        proxy.set(mode="http", status=503, path="/v1/traces")
        report = replay(journal_dir, tracking_uri=proxy.uri, retry_deadline=1.0)
    assert report.sent == 0, report
    assert report.failed == report.events > 0, report
    assert report.runs_sent == report.events, report
    assert report.spans_sent == 0, report
    assert print_replay_report(report, journal_dir) == 1
    out = capsys.readouterr().out
    assert f"landed now        {report.events} events in their MLflow runs" in out, out
    assert_exactly_once(mlflow_client, experiment_name)  # the runs are all there already
    again = replay(journal_dir, tracking_uri=mlflow_server.uri)
    assert again.ok, again
    assert again.sent == again.events > 0, again
    assert again.runs_sent == 0  # their runs part had landed: only spans went now


class _LateCreates(MemoryTransport):
    """Each run create also makes a second run with the same tags, as a create an earlier
    process sent, committed late, would (while ``late`` is set)."""

    def __init__(self) -> None:
        super().__init__()
        self.late = False

    def create_run(
        self,
        experiment_id: str,
        *,
        run_name: str,
        start_time_ms: int,
        tags: Sequence[tuple[str, str]],
    ) -> RunRef:
        if self.late:
            super().create_run(
                experiment_id, run_name=run_name, start_time_ms=start_time_ms, tags=tags
            )
        return super().create_run(
            experiment_id, run_name=run_name, start_time_ms=start_time_ms, tags=tags
        )


def test_replay_deletes_runs_a_dead_process_created_late_in_one_search(journal_dir: Path) -> None:
    """The sink's creates all failed (its records went out); at replay, each create of a run
    comes with a late one of the dead process: one search at the end finds and deletes them."""
    memory = _LateCreates()
    memory.fail = lambda call: TransientError("down") if call == "create_run" else None
    sink = MLflowSink(enabled=True, experiment="unit", transport=memory, retry_deadline=0.2)
    for index in range(5):
        sink.on_run_start(f"r{index}", task="t", environment="e", params={})
        sink.on_step(f"r{index}", event={"step": 0, "reward": 1.0}, cumulative_reward=1.0)
        sink.on_run_end(f"r{index}", result={"completed": True, "steps": 1}, run_path=None)
    sink.close(5.0)
    assert sink.status()["deferred"] > 0, sink.status()
    memory.fail, memory.late = None, True
    memory.calls.clear()
    report = replay(journal_dir, transport=memory)
    assert report.ok, report
    for index in range(5):
        (run,) = memory.by_name(f"r{index}")  # the late one deleted, ours kept with its data
        assert run.status == "FINISHED"
        assert [m.step for m in run.metrics if m.key == "step_reward"] == [0]
    assert memory.calls.count("find_runs") == 0, memory.calls
    assert memory.calls.count("find_runs_by_prefix") == 2, memory.calls


def test_replay_of_a_tree_wider_than_a_batch_sends_one_trace_within_its_budget(
    journal_dir: Path,
) -> None:
    """A tree three levels deep under its root (301 runs, more than a replay sends in one
    batch), all journaled while the store took nothing. One replay sends every run with its
    parent link and every point once, and one trace for the tree within its span budget (the
    runs past it in the root's summary). Before, a tree went over two batches: the runs of
    the second, their root ended in the first, were each shown in full (350 spans); with part
    of the tree sent live, the replay raised KeyError and stopped."""
    memory = MemoryTransport()
    memory.fail = lambda call: TransientError("the store is down", maybe_committed=False)
    sink = quick_to_give_up(memory, "tree", retry_deadline=0.2)
    parents: dict[str, str | None] = {"root": None}
    parents.update({f"a{i}": "root" for i in range(100)})
    parents.update({f"b{i}": f"a{i}" for i in range(100)})
    parents.update({f"c{i}": f"b{i}" for i in range(100)})
    for name, parent in parents.items():
        params = {} if parent is None else {"parent_run_id": parent}
        sink.on_run_start(name, task=f"task {name}", environment="e", params=params)
        for number in range(3):
            sink.on_step(name, event={"step": number, "reward": 1.0}, cumulative_reward=1.0)
    for name in reversed(parents):  # the deepest first, the root last
        sink.on_run_end(name, result={"completed": True, "steps": 3}, run_path=None)
    sink.close(1.0)
    assert not memory.runs
    memory.fail = None
    report = replay(journal_dir, transport=memory)
    assert report.ok, report
    uuid_of = {name: memory.one(name).run_uuid for name in parents}
    for name, parent in parents.items():
        run = memory.one(name)
        assert run.status == "FINISHED", name
        assert sorted(step for step, _ in run.history("step_reward")) == [0, 1, 2], name
        assert run.tags.get("mlflow.parentRunId") == (uuid_of[parent] if parent else None), name
    traces = Counter(trace for trace, _ in memory.spans)
    assert len(traces) == 1, traces
    (spans,) = traces.values()
    assert spans <= 100
    again = replay(journal_dir, transport=memory)
    assert (again.journals, again.events) == (0, 0), again

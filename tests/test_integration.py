"""The sink against a real ``mlflow server``: what lands is read back with ``MlflowClient``."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio
import pytest

from promises_support import patient
from rlm_mlflow import MLflowSink
from rlm_mlflow.testing import FaultProxy, MlflowServer

pytestmark = pytest.mark.integration

FAST: dict[str, Any] = {"flush_interval": 0.1, "retry_initial": 0.05, "retry_max_wait": 0.5}
RLM_PARAMS: dict[str, Any] = {
    "max_steps": 4,
    "exec_timeout": 30,
    "branch_width": 1,
    "framework": "native",
    "sub_model": None,
    "sub_provider": None,
    "max_depth": 2,
    "effective_max_depth": 2,
    "depth": 0,
    "parallelism": 2,
    "max_children_per_step": 2,
    "parent_run_id": None,
    "pure_rlm_backend": "exec",
    "pure_rlm_strict": False,
    "context_files": ["a.py"],
    "context_profile": {"k": 1},
    "pure_rlm_profile": "default",
}


def sink_for(server: MlflowServer, experiment: str, **kwargs: Any) -> MLflowSink:
    return MLflowSink(
        enabled=True, experiment=experiment, tracking_uri=server.uri, **{**FAST, **kwargs}
    )


def history(client: Any, run: Any, key: str) -> list[tuple[int, float]]:
    points = client.get_metric_history(run.info.run_id, key)
    return sorted((p.step, p.value) for p in points)


def agent(
    sink: MLflowSink,
    run_id: str,
    *,
    steps: int,
    trajectory: Callable[[str], Path] | None = None,
    parent: str | None = None,
    depth: int = 0,
    end: bool = True,
) -> None:
    params = {**RLM_PARAMS, "depth": depth, "parent_run_id": parent}
    sink.on_run_start(run_id, task=f"task of {run_id}", environment="pure_rlm", params=params)
    total = 0.0
    for i in range(steps):
        total += 0.5
        event = {
            "type": "step",
            "run_id": run_id,
            "step": i,
            "reward": 0.5,
            "action": {"action": "code", "code": "x = 1"},
            "observation": {"success": True},
        }
        sink.on_step(run_id, event=event, cumulative_reward=total)
    if end:
        result = {"completed": True, "steps": steps, "total_reward": total}
        path = trajectory(run_id) if trajectory else None
        sink.on_run_end(run_id, result=result, run_path=path)


def test_one_run_lands_as_the_seed_documents(
    mlflow_server: MlflowServer,
    experiment_name: str,
    read_runs: Callable[[str], dict[str, Any]],
    mlflow_client: Any,
    trajectory: Callable[[str], Path],
) -> None:
    # The default flush interval (5 s): the run's events go out together at flush(), however slow
    # the machine, so the number of requests is the batching's alone.
    with sink_for(mlflow_server, experiment_name, flush_interval=5.0) as sink:
        agent(sink, "run_20261126_120000_000001", steps=4, trajectory=trajectory)
        assert sink.flush(patient(30))
        status = sink.status()
    run = read_runs(experiment_name)["run_20261126_120000_000001"]
    assert run.info.status == "FINISHED"
    assert run.data.params["environment"] == "pure_rlm"
    assert run.data.params["task_chars"] == str(len("task of run_20261126_120000_000001"))
    assert run.data.params["max_steps"] == "4"
    assert run.data.params["sub_model"] == "None"
    assert "context_files" not in run.data.params
    assert "context_profile" not in run.data.params
    assert run.data.tags["run_id"] == "run_20261126_120000_000001"
    assert run.data.tags["component"] == "rlm-code-rlm"
    assert history(mlflow_client, run, "step_reward") == [(i, 0.5) for i in range(4)]
    assert history(mlflow_client, run, "cumulative_reward") == [
        (i, 0.5 * (i + 1)) for i in range(4)
    ]
    assert run.data.metrics["completed"] == 1.0
    assert run.data.metrics["steps"] == 4.0
    assert run.data.metrics["total_reward"] == 2.0
    artifacts = [a.path for a in mlflow_client.list_artifacts(run.info.run_id)]
    assert artifacts == ["run_20261126_120000_000001.jsonl"]
    assert run.info.end_time is not None
    assert status["sent"] == 6
    assert status["dropped"] == {}
    # One create, a batch for params + metrics + summary, one artifact, one end, the trace's
    # spans in one request and its info with its Feedback in one, and once per process the
    # server's version: 8. A cycle that begins while the agent still runs adds a batch and a
    # span request.
    assert status["requests"] <= 8 + 2


def test_concurrent_runs_from_threads_with_recursive_children(
    mlflow_server: MlflowServer,
    experiment_name: str,
    read_runs: Callable[[str], dict[str, Any]],
    mlflow_client: Any,
    trajectory: Callable[[str], Path],
) -> None:
    """Roots on a thread pool, each spawning children on the pool while it is still open."""
    with sink_for(mlflow_server, experiment_name) as sink, ThreadPoolExecutor(4) as pool:

        def root(n: int) -> None:
            run_id = f"root-{n}"
            sink.on_run_start(
                run_id,
                task="t",
                environment="pure_rlm",
                params={**RLM_PARAMS, "parent_run_id": None},
            )
            children = [
                pool.submit(
                    agent,
                    sink,
                    f"child-{n}-{c}",
                    steps=3,
                    parent=run_id,
                    depth=1,
                    trajectory=trajectory,
                )
                for c in range(2)
            ]
            for child in children:
                child.result(30)
            sink.on_step(run_id, event={"step": 0, "reward": 1.0}, cumulative_reward=1.0)
            sink.on_run_end(
                run_id,
                result={"completed": True, "steps": 1, "total_reward": 1.0},
                run_path=trajectory(run_id),
            )

        roots = [threading.Thread(target=root, args=(n,)) for n in range(5)]
        for t in roots:
            t.start()
        for t in roots:
            t.join(60)
        assert sink.flush(patient(60))
    runs = read_runs(experiment_name)
    assert len(runs) == 15
    for n in range(5):
        parent = runs[f"root-{n}"]
        assert parent.info.status == "FINISHED"
        assert "mlflow.parentRunId" not in parent.data.tags
        assert history(mlflow_client, parent, "step_reward") == [(0, 1.0)]
        for c in range(2):
            child = runs[f"child-{n}-{c}"]
            assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
            assert child.data.params["depth"] == "1"
            assert history(mlflow_client, child, "cumulative_reward") == [
                (0, 0.5),
                (1, 1.0),
                (2, 1.5),
            ]
            assert child.info.status == "FINISHED"


def test_nested_runs_on_one_thread_and_a_run_that_never_ends(
    mlflow_server: MlflowServer,
    experiment_name: str,
    read_runs: Callable[[str], dict[str, Any]],
    mlflow_client: Any,
) -> None:
    """Parallelism 1: the child starts and ends on the parent's thread; the model then raises."""
    with sink_for(mlflow_server, experiment_name) as sink:
        sink.on_run_start("parent", task="t", environment="e", params={"depth": 0})
        agent(sink, "child", steps=2, parent="parent", depth=1)
        sink.on_step("parent", event={"step": 0, "reward": 1.0}, cumulative_reward=1.0)
        agent(sink, "crashed", steps=2, end=False)  # the model raised: no on_run_end
        sink.on_run_end("parent", result={"completed": True, "steps": 1}, run_path=None)
    runs = read_runs(experiment_name)
    assert set(runs) == {"parent", "child", "crashed"}
    assert runs["child"].data.tags["mlflow.parentRunId"] == runs["parent"].info.run_id
    assert runs["parent"].info.status == "FINISHED"
    assert runs["child"].info.status == "FINISHED"
    assert runs["crashed"].info.status == "FAILED"
    assert runs["crashed"].info.end_time is not None
    assert history(mlflow_client, runs["crashed"], "step_reward") == [(0, 0.5), (1, 0.5)]
    assert "completed" not in runs["crashed"].data.metrics


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.anyio
async def test_async_context_manager_runs_the_worker_in_the_loop(
    anyio_backend: str,
    mlflow_server: MlflowServer,
    experiment_name: str,
    read_runs: Callable[[str], dict[str, Any]],
    mlflow_client: Any,
) -> None:
    """Many agent tasks share one sink inside asyncio or trio; nothing blocks the loop."""
    async with sink_for(mlflow_server, experiment_name) as sink:
        assert sink.status()["state"] == "task"

        async def task_agent(n: int) -> None:
            run_id = f"task-{n}"
            sink.on_run_start(run_id, task="t", environment="e", params={"n": n})
            for i in range(20):
                sink.on_step(
                    run_id,
                    event={"step": i, "reward": float(n)},
                    cumulative_reward=float(n * (i + 1)),
                )
                await anyio.sleep(0)  # let the other agents interleave
            sink.on_run_end(run_id, result={"completed": True, "steps": 20}, run_path=None)

        async with anyio.create_task_group() as tg:
            for n in range(6):
                tg.start_soon(task_agent, n)
        sink.on_run_start("left-open", task="t", environment="e", params={})
        assert await sink.aflush(patient(30))
    assert sink.status()["state"] == "closed"
    runs = await anyio.to_thread.run_sync(read_runs, experiment_name)
    for n in range(6):
        run = runs[f"task-{n}"]
        assert run.info.status == "FINISHED"
        points = await anyio.to_thread.run_sync(history, mlflow_client, run, "cumulative_reward")
        assert points == [(i, float(n * (i + 1))) for i in range(20)]
    assert runs["left-open"].info.status == "FAILED"


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.anyio
async def test_sinks_of_an_async_service_closed_together_end_every_run_and_lose_nothing(
    anyio_backend: str,
    mlflow_server: MlflowServer,
    experiment_name: str,
    read_runs: Callable[[str], dict[str, Any]],
    mlflow_client: Any,
) -> None:
    """A service with four sinks in its own event loop, each with an ended run of 200 steps and
    a run still open, closes them all at once (a shutdown) against a server 50 ms away: every
    run ends in MLflow, every point lands once, no event is kept or dropped."""
    with FaultProxy(mlflow_server.port) as proxy:
        proxy.set(latency=0.05)
        sinks = [
            MLflowSink(enabled=True, experiment=experiment_name, tracking_uri=proxy.uri, **FAST)
            for _ in range(4)
        ]
        async with contextlib.AsyncExitStack() as stack:
            for sink in sinks:
                await stack.enter_async_context(sink)
            for n, sink in enumerate(sinks):
                sink.on_run_start(f"run-{n}", task="t", environment="e", params={})
                for i in range(200):
                    sink.on_step(f"run-{n}", event={"step": i, "reward": 1.0}, cumulative_reward=i)
                sink.on_run_end(f"run-{n}", result={"completed": True}, run_path=None)
                sink.on_run_start(f"open-{n}", task="t", environment="e", params={})
            async with anyio.create_task_group() as tg:
                for sink in sinks:
                    tg.start_soon(sink.aclose, patient(60))
    for sink in sinks:
        status = sink.status()
        assert status["state"] == "closed", status
        assert status["sent"] == status["accepted"] == 1 + 200 + 1 + 1, status  # hook calls
    runs = await anyio.to_thread.run_sync(read_runs, experiment_name)
    assert sorted(runs) == sorted([f"run-{n}" for n in range(4)] + [f"open-{n}" for n in range(4)])
    for n in range(4):
        assert runs[f"run-{n}"].info.status == "FINISHED"
        assert runs[f"open-{n}"].info.status != "RUNNING"
        points = await anyio.to_thread.run_sync(
            history, mlflow_client, runs[f"run-{n}"], "step_reward"
        )
        assert points == [(i, 1.0) for i in range(200)]


@pytest.mark.asyncio
async def test_hooks_inside_a_running_loop_with_a_thread_worker(
    mlflow_server: MlflowServer,
    experiment_name: str,
    read_runs: Callable[[str], dict[str, Any]],
) -> None:
    """RLM Code's MCP server calls the blocking runner from an ``async def``: hooks run on the
    loop's thread while it runs. They must neither block nor touch the loop."""
    sink = sink_for(mlflow_server, experiment_name)
    loop = asyncio.get_running_loop()
    agent(sink, "in-loop", steps=3)  # called right here, on the event loop's thread
    assert sink.status()["state"] == "thread"
    assert loop.is_running()
    assert await sink.aflush(patient(30))
    await sink.aclose()
    runs = await asyncio.to_thread(read_runs, experiment_name)
    assert runs["in-loop"].info.status == "FINISHED"


def test_many_steps_go_out_in_few_requests(
    mlflow_server: MlflowServer,
    experiment_name: str,
    mlflow_client: Any,
    read_runs: Callable[[str], dict[str, Any]],
) -> None:
    """5,000 steps (10,000 points) of one run: every point lands, in at most a dozen requests."""
    with sink_for(mlflow_server, experiment_name, flush_interval=60, batch_trigger=10**6) as sink:
        agent(sink, "long", steps=5000)
        assert sink.flush(patient(60))
        status = sink.status()
        requests = status["requests"] - status["retries"]  # a busy server's retries aside
    run = read_runs(experiment_name)["long"]
    points = history(mlflow_client, run, "cumulative_reward")
    assert len(points) == 5000
    assert points[-1] == (4999, 2500.0)
    # plus the run's spans: one request a drain (a drain may begin before the agent's last
    # step, so one or two), the trace's root last; and its assessments
    assert requests <= 18


@pytest.mark.parametrize("journal", [True, False])
def test_unreachable_server_never_raises_and_close_returns(
    experiment_name: str, journal: bool
) -> None:
    from rlm_mlflow.testing import free_port

    sink = MLflowSink(
        enabled=True,
        experiment=experiment_name,
        tracking_uri=f"http://127.0.0.1:{free_port()}",
        journal=journal,
        **FAST,
    )
    agent(sink, "nowhere", steps=5)
    closer = threading.Thread(target=sink.close, args=(1.0,))
    closer.start()
    closer.join(30)
    assert not closer.is_alive()
    status = sink.status()
    assert status["sent"] == 0
    lost = status["deferred"] if journal else sum(status["dropped"].values())
    assert lost == status["accepted"] == 7
    assert status["last_error"]

"""The async examples in ``examples/``, run as a user runs them, against a real tracking server.

Each agent writes its trajectory file as it goes; that file is the ground truth. MLflow must hold,
for every file, a run of that name with exactly those step points, in step order and in the order
the steps happened, under the right parent, with the summary metrics and the file as artifact.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from rlm_mlflow.testing import MlflowServer, free_port

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
#: Generous bound for waits that normally end within seconds, on a busy 2-core machine.
WAIT = 120.0


@pytest.fixture
def example_env(mlflow_server: MlflowServer, experiment_name: str) -> dict[str, str]:
    """The environment a user sets to switch the sink on (plus a short flush interval)."""
    return {
        **os.environ,
        "DSPY_RLM_MLFLOW_ENABLED": "true",
        "MLFLOW_TRACKING_URI": mlflow_server.uri,
        "DSPY_RLM_MLFLOW_EXPERIMENT": experiment_name,
        "RLM_MLFLOW_FLUSH_INTERVAL": "0.2",
        "RLM_MLFLOW_SHUTDOWN_TIMEOUT": "90",  # the machine may be busy: never drop on close here
    }


def trajectories(run_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Every run's step events, as its agent wrote them."""
    return {
        path.stem: [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        for path in sorted(run_dir.glob("*.jsonl"))
    }


class Landed:
    """Checks what an example left in MLflow against the trajectory files it wrote."""

    def __init__(self, read: Callable[[], dict[str, Any]], client: Any) -> None:
        self.read = read
        self.client = client

    def check(self, run_dir: Path, *, cut_short: Mapping[str, str] = {}) -> dict[str, Any]:
        """MLflow holds each trajectory, in order, in the right run; the runs ``cut_short``
        (run id -> status) never ended by themselves."""
        runs = self.read()
        written = trajectories(run_dir)
        assert set(runs) == set(written)
        for run_id, events in written.items():
            self.check_run(runs, run_id, events, cut_short=cut_short.get(run_id))
        return runs

    def check_run(
        self,
        runs: dict[str, Any],
        run_id: str,
        events: list[dict[str, Any]],
        *,
        cut_short: str | None,
    ) -> None:
        client, run = self.client, runs[run_id]
        assert [e["step"] for e in events] == list(range(len(events)))
        assert all(e["run_id"] == run_id for e in events)
        cumulative, total = [], 0.0
        for event in events:
            total += event["reward"]
            cumulative.append((event["step"], total))
        points = client.get_metric_history(run.info.run_id, "step_reward")
        by_step = sorted(points, key=lambda p: p.step)
        assert [(p.step, p.value) for p in by_step] == [(e["step"], e["reward"]) for e in events]
        times = [p.timestamp for p in by_step]
        assert times == sorted(times), f"{run_id}: steps logged out of order"
        history = client.get_metric_history(run.info.run_id, "cumulative_reward")
        assert sorted((p.step, p.value) for p in history) == cumulative
        parent = events[0]["parent_run_id"] if events else None
        if parent is None:
            assert "mlflow.parentRunId" not in run.data.tags
        else:
            assert run.data.tags["mlflow.parentRunId"] == runs[parent].info.run_id
        artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
        if cut_short is not None:
            assert run.info.status == cut_short
            assert run.info.end_time is not None
            assert "total_reward" not in run.data.metrics
            assert artifacts == []
        else:
            assert run.info.status == "FINISHED"
            assert run.data.metrics["steps"] == len(events)
            assert run.data.metrics["total_reward"] == round(total, 3)
            assert artifacts == [f"{run_id}.jsonl"]


@pytest.fixture
def landed(
    experiment_name: str, read_runs: Callable[[str], dict[str, Any]], mlflow_client: Any
) -> Landed:
    return Landed(lambda: read_runs(experiment_name), mlflow_client)


def run_example(script: str, *args: str, env: dict[str, str], cwd: Path) -> str:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=WAIT * 2,
        check=False,
    )
    assert done.returncode == 0, f"{script} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.mark.parametrize(
    ("script", "agents"),
    [pytest.param("asyncio_service.py", 20, marks=pytest.mark.slow), ("trio_service.py", 10)],
)
def test_async_service_example(
    script: str, agents: int, example_env: dict[str, str], landed: Landed, tmp_path: Path
) -> None:
    """Agents as tasks of one event loop (asyncio, then trio), each delegating two sub-tasks
    that run at once, all sharing one sink: each step lands in its own run, in order."""
    run_dir = tmp_path / "runs"
    out = run_example(
        script, "--agents", str(agents), "--run-dir", str(run_dir), env=example_env, cwd=tmp_path
    )
    runs = agents * 3
    assert f"runs {runs} created / {runs} ended" in out
    assert "dropped none" in out
    assert len(landed.check(run_dir)) == runs


# -- the FastAPI app ------------------------------------------------------------------------


def call(url: str, body: dict[str, Any] | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="GET" if body is None else "POST")
    request.add_header("content-type", "application/json")
    with urllib.request.urlopen(request, timeout=WAIT + 30) as response:
        return json.loads(response.read())


def wait_until(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Poll ``condition`` (a process on the other end offers no event to wait on)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not true after {timeout:.0f} s")
        time.sleep(0.05)


@pytest.fixture
def fastapi_app(
    example_env: dict[str, str], tmp_path: Path
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``uvicorn --app-dir examples fastapi_app:app`` on a free port; killed if a test fails."""
    port = free_port()
    env = {**example_env, "RLM_RUN_DIR": str(tmp_path / "runs")}
    log = (tmp_path / "uvicorn.log").open("wb")
    command = [sys.executable, "-m", "uvicorn", "--app-dir", str(EXAMPLES), "fastapi_app:app"]
    process = subprocess.Popen(
        [*command, "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        assert process.poll() is None, (tmp_path / "uvicorn.log").read_text()
        try:
            call(f"{url}/sink")
        except OSError:
            return False
        return True

    try:
        wait_until(answers, "the app answers")
        yield url, process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)
        log.close()


def test_fastapi_app_example(
    fastapi_app: tuple[str, subprocess.Popen[bytes]], landed: Landed, tmp_path: Path
) -> None:
    """Requests start agents in the lifespan's task group; stopping the app with SIGTERM
    cancels the agents still running and flushes: finished runs FINISHED with every point,
    the interrupted ones KILLED with the steps they made."""
    url, process = fastapi_app
    assert call(f"{url}/sink")["state"] == "task"  # the worker runs in uvicorn's loop
    with ThreadPoolExecutor(8) as pool:
        started = list(
            pool.map(
                lambda n: call(f"{url}/runs", {"task": f"task {n}", "think": 0.02})["run_id"],
                range(10),
            )
        )
    wait_until(lambda: all(call(f"{url}/runs/{r}")["done"] for r in started), "all runs done")
    assert call(f"{url}/sink/flush?timeout={WAIT}", {})["flushed"]
    accepted = call(f"{url}/sink")["accepted"]

    slow = [
        call(f"{url}/runs", {"task": "slow", "steps": 1000, "children": 0, "think": 60})["run_id"]
        for _ in range(2)
    ]
    wait_until(lambda: call(f"{url}/sink")["accepted"] >= accepted + 2, "slow runs started")
    process.send_signal(signal.SIGTERM)
    assert process.wait(WAIT) in (0, -signal.SIGTERM)  # uvicorn re-raises it after shutdown
    assert "Application shutdown complete" in (tmp_path / "uvicorn.log").read_text()
    runs = landed.check(tmp_path / "runs", cut_short=dict.fromkeys(slow, "KILLED"))
    assert len(runs) == 10 * 3 + 2


# -- DSPy ---------------------------------------------------------------------------------------


def test_dspy_rlm_example(
    example_env: dict[str, str],
    experiment_name: str,
    read_runs: Callable[[str], dict[str, Any]],
    mlflow_client: Any,
    tmp_path: Path,
) -> None:
    """``examples/dspy_rlm.py``: three ``dspy.RLM`` calls at once in one event loop, each
    delegating to a sub-agent: three runs with their four iterations, each with a child run
    under it, and one trace per top-level call holding its child."""
    out = run_example("dspy_rlm.py", "--tasks", "3", env=example_env, cwd=tmp_path)
    assert "runs 6 created / 6 ended; events " in out
    assert "0 kept for 'rlm-mlflow replay', dropped none" in out
    runs = read_runs(experiment_name)
    assert len(runs) == 6
    roots = {r.info.run_id: r for r in runs.values() if "mlflow.parentRunId" not in r.data.tags}
    children = [r for r in runs.values() if "mlflow.parentRunId" in r.data.tags]
    assert len(roots) == 3
    assert sorted(c.data.tags["mlflow.parentRunId"] for c in children) == sorted(roots)
    for run in runs.values():
        assert run.info.status == "FINISHED"
        assert run.data.params["environment"] == "dspy"
        assert run.data.metrics["completed"] == 1.0
        assert run.data.metrics["total_tokens"] > 0
    assert all(r.data.metrics["steps"] == 4.0 for r in roots.values())
    assert all(c.data.metrics["steps"] == 2.0 for c in children)
    experiment = mlflow_client.get_experiment_by_name(experiment_name)
    traces = mlflow_client.search_traces(locations=[experiment.experiment_id])
    assert len(traces) == 3
    for trace in traces:
        agents = [s for s in trace.data.spans if s.span_type == "AGENT"]
        assert len(agents) == 2
        assert sum(1 for s in trace.data.spans if s.span_type == "LLM") == 8

"""RLM Code's own ``RLMRunner`` with our sink in its ``RLMObservability``, against a real server.

The runner is the real one from PyPI (``rlm-code==0.1.13``, installed without its heavy
dependencies: the runner needs only pyyaml and rich beyond what we have). Only the model and the
code execution engine are scripted, the way RLM Code's own tests do it. A second sink records
exactly what the runner handed to its sinks; MLflow must hold exactly that: every run, its parent,
every step point, the summary metrics, the trajectory artifact and the final status.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from promises_support import patient, span_label
from rlm_code_support import import_or_install, own_tests
from rlm_mlflow import MLflowSink
from rlm_mlflow.testing import MlflowServer

pytestmark = [
    pytest.mark.integration,
    # RLM Code warns that its pure_rlm environment falls back to exec(); we never use it.
    pytest.mark.filterwarnings("ignore:PureRLMEnvironment is using exec:UserWarning"),
]

FAST: dict[str, Any] = {"flush_interval": 0.1, "retry_initial": 0.05, "retry_max_wait": 0.5}


@pytest.fixture(scope="module")
def rlm_code() -> Iterator[Any]:
    """The real ``rlm_code.rlm.runner`` module, its run ids made unique.

    RLM Code's run ids are microsecond timestamps: two children started in the same microsecond
    would share one (the sink copes, see the unit tests). Here runs are compared by id, so the
    real id function is asked again until it gives a new one.
    """
    runner = import_or_install()
    original: Callable[[], str] = runner.RLMRunner._new_run_id
    seen: set[str] = set()
    lock = threading.Lock()

    def new_run_id() -> str:
        with lock:
            while (run_id := original()) in seen:
                pass
            seen.add(run_id)
            return run_id

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner.RLMRunner, "_new_run_id", staticmethod(new_run_id))
        yield runner


# -- a scripted model and execution engine ---------------------------------------------------


def kind_of(task: str) -> str:
    """``"root: x"`` is a root, ``"child A of root: x"`` a child A, ``"leaf of child A of ..."``
    a leaf."""
    return task.split(" of ", 1)[0].split(":", 1)[0]


class ScriptedModel:
    """Plans each step from the task's kind (see :func:`kind_of`) and the step number, so that
    runs on many threads at once get the same answers whatever order they ask in.

    - ``plain``: two ``run_python`` steps, then ``final``.
    - ``root``: one ``run_python``; a ``delegate_batch`` of ``child A`` and ``child B``; ``final``.
    - ``child A`` delegates one ``leaf`` (a grandchild), then runs code, then ``final``.
    - ``crash``: two ``run_python`` steps, then the model raises.
    - ``parent``: delegates a ``crash`` child (which raises inside it), then ``final``.
    """

    current_model = "scripted"

    def generate_response(
        self, prompt: str, system_prompt: str | None = None, context: Any = None
    ) -> str:
        task = re.search(r"Task: (.*)", prompt)
        step = re.search(r"Step: (\d+)", prompt)
        assert task is not None
        assert step is not None
        return json.dumps(self.plan(task.group(1), int(step.group(1))))

    @staticmethod
    def plan(task: str, step: int) -> dict[str, Any]:
        code: dict[str, Any] = {"action": "run_python", "code": f"print({step})", "done": False}
        final: dict[str, Any] = {"action": "final", "done": True, "final_response": "done"}
        kind = kind_of(task)
        if kind == "crash" and step == 3:
            raise RuntimeError("the model's provider went away")
        if kind == "root" and step == 2:
            return {
                "action": "delegate_batch",
                "tasks": [f"child A of {task}", f"child B of {task}"],
            }
        if kind == "child A" and step == 1:
            return {"action": "delegate", "task": f"leaf of {task}"}
        if kind == "parent" and step == 1:
            return {"action": "delegate", "task": f"crash of {task}", "steps": 4}
        if step >= 3 or (kind in ("leaf", "parent") and step >= 2):
            return final
        return code


class FakeExecutionEngine:
    """RLM Code's execution engine interface: validates and 'runs' code instantly."""

    def __init__(self) -> None:
        sandbox = SimpleNamespace(
            runtime="local",
            default_timeout_seconds=5,
            pure_rlm_backend="exec",
            pure_rlm_allow_unsafe_exec=True,
            pure_rlm_strict=False,
            pure_rlm_output_mode="summarize",
            pure_rlm_max_iteration_output_chars=4000,
            monty_type_check=False,
            monty_max_allocations=None,
            monty_max_memory=None,
            docker=SimpleNamespace(
                image="python:3.11-slim", network_enabled=False, memory_limit_mb=512, cpus=1.0
            ),
        )
        self.config_manager = SimpleNamespace(config=SimpleNamespace(sandbox=sandbox))

    def validate_code(self, code: str) -> Any:
        return SimpleNamespace(is_valid=True, errors=[], warnings=[])

    def execute_code(self, code: str, timeout: int = 30) -> Any:
        return SimpleNamespace(success=True, stdout="ok", stderr="", execution_time=0.01)


# -- what the runner handed its sinks ----------------------------------------------------------


@dataclass
class SeenRun:
    run_id: str
    task: str
    environment: str
    params: dict[str, Any]
    thread: int
    steps: list[tuple[int, float, float]] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    usage: list[dict[str, Any]] = field(default_factory=list)
    result: Any = None
    run_path: Path | None = None


class Recorder:
    """A second sink beside ours: the ground truth of every hook call the runner made."""

    name = "recorder"

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.runs: dict[str, SeenRun] = {}

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "enabled": True, "available": True, "detail": "memory"}

    def on_run_start(
        self, run_id: str, *, task: str, environment: str, params: dict[str, Any]
    ) -> None:
        with self.lock:
            assert run_id not in self.runs
            self.runs[run_id] = SeenRun(
                run_id, task, environment, dict(params), threading.get_ident()
            )

    def on_step(self, run_id: str, *, event: dict[str, Any], cumulative_reward: float) -> None:
        with self.lock:
            seen = self.runs[run_id]
            seen.steps.append(
                (int(event["step"]), float(event["reward"]), float(cumulative_reward))
            )
            action = event.get("action")
            seen.actions.append(str(action.get("action")) if isinstance(action, dict) else "")
            usage = event.get("usage")
            seen.usage.append(dict(usage) if isinstance(usage, dict) else {})

    def on_run_end(self, run_id: str, *, result: Any, run_path: Path) -> None:
        with self.lock:
            self.runs[run_id].result = result
            self.runs[run_id].run_path = run_path

    def by_kind(self, kind: str) -> list[SeenRun]:
        return [run for run in self.runs.values() if kind_of(run.task) == kind]


@dataclass
class Harness:
    runner: Any
    recorder: Recorder
    sink: MLflowSink
    read: Callable[[], dict[str, Any]]  # every run of the test's experiment, by name
    client: Any
    tmp_path: Path

    def check(self) -> dict[str, Any]:
        """MLflow holds exactly what the runner handed its sinks; returns the runs."""
        runs = self.read()
        assert_mlflow_holds(self.recorder, runs, self.client, self.tmp_path)
        return runs


@pytest.fixture
def harness(
    rlm_code: Any,
    mlflow_server: MlflowServer,
    experiment_name: str,
    read_runs: Callable[[str], dict[str, Any]],
    tmp_path: Path,
) -> Iterator[Harness]:
    """A real ``RLMRunner`` whose observability is ``[our sink, the recorder]``."""
    from mlflow import MlflowClient
    from rlm_code.rlm.observability import RLMObservability

    sink = MLflowSink(
        enabled=True, experiment=experiment_name, tracking_uri=mlflow_server.uri, **FAST
    )
    recorder = Recorder()
    workdir = tmp_path / "work"  # empty: delegated tasks get no context snippets appended
    workdir.mkdir()
    runner = rlm_code.RLMRunner(
        llm_connector=ScriptedModel(),
        execution_engine=FakeExecutionEngine(),
        run_dir=tmp_path / "runs",
        workdir=workdir,
        observability=RLMObservability(sinks=[sink, recorder]),
    )
    try:
        yield Harness(
            runner,
            recorder,
            sink,
            lambda: read_runs(experiment_name),
            MlflowClient(tracking_uri=mlflow_server.uri),
            tmp_path,
        )
    finally:
        sink.close()


# -- checking MLflow against the recorder -------------------------------------------------------


def history(client: Any, run: Any, key: str) -> list[tuple[int, float]]:
    return sorted((p.step, p.value) for p in client.get_metric_history(run.info.run_id, key))


def assert_mlflow_holds(
    recorder: Recorder, runs: dict[str, Any], client: Any, tmp_path: Path
) -> None:
    """Every run the runner started is in MLflow, exactly as the runner described it."""
    assert set(runs) == set(recorder.runs)
    for run_id, seen in recorder.runs.items():
        run = runs[run_id]
        params, tags, metrics = run.data.params, run.data.tags, run.data.metrics
        assert tags["run_id"] == run_id
        assert tags["component"] == "rlm-code-rlm"
        assert params["environment"] == seen.environment
        assert params["task_chars"] == str(len(seen.task))
        assert params["depth"] == str(seen.params["depth"])
        assert params["parallelism"] == str(seen.params["parallelism"])
        assert params["max_steps"] == str(seen.params["max_steps"])
        assert params["sub_model"] == "None"
        parent = seen.params["parent_run_id"]
        if parent is None:
            assert "mlflow.parentRunId" not in tags
        else:
            assert tags["mlflow.parentRunId"] == runs[parent].info.run_id
        assert seen.steps, f"{run_id} made no step"
        assert history(client, run, "step_reward") == [(s, r) for s, r, _ in seen.steps]
        assert history(client, run, "cumulative_reward") == [(s, c) for s, _, c in seen.steps]
        artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
        if seen.result is None:  # the model raised: on_run_end never came
            assert run.info.status == "FAILED"
            assert run.info.end_time is not None
            assert "completed" not in metrics
            assert "total_reward" not in metrics
            assert artifacts == []
            continue
        assert run.info.status == "FINISHED"
        assert metrics["completed"] == (1.0 if seen.result.completed else 0.0)
        assert metrics["steps"] == float(seen.result.steps)
        assert metrics["total_reward"] == seen.result.total_reward
        assert seen.run_path is not None
        assert artifacts == [seen.run_path.name]
        local = client.download_artifacts(run.info.run_id, seen.run_path.name, str(tmp_path))
        assert Path(local).read_bytes() == seen.run_path.read_bytes()


def assert_trace_holds(recorder: Recorder, runs: dict[str, Any], client: Any) -> None:
    """The root's one trace holds every run the runner started (an AGENT span each, a child
    under the step of its parent that delegated to it) and every step they reported (a span
    each, under its run, named by its action), linked to the root's MLflow run."""
    [root] = [run for run in recorder.runs.values() if run.params["parent_run_id"] is None]
    experiment_id = runs[root.run_id].info.experiment_id
    (trace,) = client.search_traces(locations=[experiment_id])
    linked = client.search_traces(locations=[experiment_id], run_id=runs[root.run_id].info.run_id)
    assert [t.info.trace_id for t in linked] == [trace.info.trace_id]
    spans = trace.data.spans
    assert len({span.span_id for span in spans}) == len(spans)
    by_id = {span.span_id: span for span in spans}
    agents = {span_label(span): span for span in spans if span.span_type == "AGENT"}
    assert set(agents) == set(recorder.runs)
    assert agents[root.run_id].parent_id is None
    for run_id, seen in recorder.runs.items():
        agent = agents[run_id]
        steps = [
            span
            for span in spans
            if span.parent_id == agent.span_id and span.span_type in ("TOOL", "CHAIN")
        ]
        expected = [
            f"step {number}: {action}"
            for (number, _, _), action in zip(seen.steps, seen.actions, strict=True)
        ]
        assert sorted(span.name for span in steps) == sorted(expected), run_id
        parent = seen.params["parent_run_id"]
        if parent is not None:
            step = by_id[agent.parent_id]
            assert by_id[step.parent_id] is agents[parent]
            assert step.name.split(": ", 1)[1] in ("delegate", "delegate_batch")
    reported = {
        key: sum(int(usage.get(name, 0) or 0) for usage in root.usage)
        for key, name in (("input_tokens", "prompt_tokens"), ("output_tokens", "completion_tokens"))
    }
    if any(reported.values()):  # each token once: the root's steps count their children's
        usage = trace.info.token_usage
        assert usage["input_tokens"] == reported["input_tokens"]
        assert usage["output_tokens"] == reported["output_tokens"]


def assert_tree(recorder: Recorder, *, parallel: bool) -> None:
    """The scenario ran as scripted: root -> (child A -> leaf, child B)."""
    [root] = recorder.by_kind("root")
    [child_a] = recorder.by_kind("child A")
    [child_b] = recorder.by_kind("child B")
    [leaf] = recorder.by_kind("leaf")
    assert child_a.params["parent_run_id"] == root.run_id
    assert child_b.params["parent_run_id"] == root.run_id
    assert leaf.params["parent_run_id"] == child_a.run_id
    assert leaf.params["depth"] == 2
    assert leaf.thread == child_a.thread  # a single delegate runs nested on its parent's thread
    on_root_thread = {child_a.thread == root.thread, child_b.thread == root.thread}
    assert on_root_thread == ({False} if parallel else {True})
    # The step that delegated is reported after the children ended.
    assert [s for s, _, _ in root.steps] == [1, 2, 3]


# -- the tests -------------------------------------------------------------------------------


def test_a_plain_run(harness: Harness) -> None:
    """One run of the real runner: params, tags, every step, summary, trajectory, FINISHED."""
    result = harness.runner.run_task("plain: sum two numbers", max_steps=5, environment="generic")
    assert result.completed
    assert harness.sink.flush(patient(30))
    status = harness.sink.status()
    assert status["dropped"] == {}
    assert status["refused"] == 0
    assert list(harness.check()) == [result.run_id]
    assert len(harness.recorder.runs[result.run_id].steps) == 3


@pytest.mark.parametrize("parallelism", [2, 1], ids=["children-in-parallel", "nested-one-thread"])
def test_recursive_children(harness: Harness, parallelism: int) -> None:
    """Children on a thread pool (parallelism 2) or nested on the parent's thread (1): every run
    lands, each child under its own parent, grandchild included; the root's trace holds every
    run and step, the runner's own events as they came."""
    harness.runner.run_task(
        "root: split the work", max_steps=5, environment="generic", parallelism=parallelism
    )
    assert harness.sink.flush(patient(30))
    assert_tree(harness.recorder, parallel=parallelism > 1)
    runs = harness.check()
    assert len(runs) == 4
    assert_trace_holds(harness.recorder, runs, harness.client)


def test_a_model_that_raises_mid_run(harness: Harness) -> None:
    """The model raises: the runner propagates it and never calls ``on_run_end``. Inside a
    delegated child the runner catches it and the parent goes on. Closing the sink ends the
    runs left open FAILED, with the steps they made; the parent is FINISHED."""
    with pytest.raises(RuntimeError, match="provider went away"):
        harness.runner.run_task("crash: flaky", max_steps=5, environment="generic")
    parent = harness.runner.run_task("parent: delegate", max_steps=5, environment="generic")
    assert parent.completed
    harness.sink.close()
    assert harness.sink.status()["state"] == "closed"
    recorder = harness.recorder
    crashed = recorder.by_kind("crash")
    assert len(crashed) == 2
    assert all(run.result is None and len(run.steps) == 2 for run in crashed)
    runs = harness.check()
    assert len(runs) == 3
    [child] = [run for run in crashed if run.params["parent_run_id"] == parent.run_id]
    assert runs[child.run_id].info.status == "FAILED"
    assert runs[parent.run_id].info.status == "FINISHED"


@pytest.fixture
def seed_env(
    mlflow_server: MlflowServer, experiment_name: str, monkeypatch: pytest.MonkeyPatch
) -> str:
    """The seed's environment variables, switched on; returns the experiment name.

    RLM Code's own sink sets MLflow's tracking URI and experiment process-wide: both are put
    back after the test.
    """
    from mlflow.tracking import _tracking_service, fluent

    utils = _tracking_service.utils
    monkeypatch.setattr(utils, "_tracking_uri", utils._tracking_uri)  # restored afterwards
    monkeypatch.setattr(fluent, "_active_experiment_id", fluent._active_experiment_id)
    monkeypatch.setenv("DSPY_RLM_MLFLOW_ENABLED", "true")
    monkeypatch.setenv("DSPY_RLM_MLFLOW_EXPERIMENT", experiment_name)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    return experiment_name


def test_switching_an_rlm_code_runner_over_as_documented(
    rlm_code: Any, seed_env: str, read_runs: Callable[[str], dict[str, Any]], tmp_path: Path
) -> None:
    """docs/rlm-code.md: the seed's environment variables, a runner built as RLM Code builds it
    (its default observability, which then holds RLM Code's own synchronous MLflow sink), and
    the two lines that swap that sink for ours. Each run lands once, nested runs included."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    runner = rlm_code.RLMRunner(
        llm_connector=ScriptedModel(),
        execution_engine=FakeExecutionEngine(),
        run_dir=tmp_path / "runs",
        workdir=workdir,
    )
    assert runner.observability.get_sink("mlflow") is not None  # RLM Code's own

    runner.observability.remove_sink("mlflow")
    runner.observability.add_sink(MLflowSink.from_env(**FAST))

    sink = runner.observability.get_sink("mlflow")
    assert isinstance(sink, MLflowSink)
    runner.run_task("root: documented", max_steps=5, environment="generic", parallelism=1)
    sink.close()
    runs = read_runs(seed_env)  # fails on a run logged twice
    assert len(runs) == 4
    assert {run.info.status for run in runs.values()} == {"FINISHED"}
    parents = {run.data.tags.get("mlflow.parentRunId") for run in runs.values()}
    assert len(parents) == 3  # no parent (the root), the root, child A


@pytest.mark.parametrize("how", ["its-own-line", "rlm-mlflow-run"])
def test_the_rlm_code_example(
    rlm_code: Any,
    seed_env: str,
    read_runs: Callable[[str], dict[str, Any]],
    tmp_path: Path,
    how: str,
) -> None:
    """``examples/rlm_code_runner.py`` as a user runs it: RLM Code's runner and its real local
    execution engine, the scripted planner, the sink switched on by the seed's variables; either
    with the example's own line, or built as RLM Code's CLI builds it, under ``rlm-mlflow run``.
    Either way our sink, and each run once."""
    example = Path(__file__).resolve().parent.parent / "examples" / "rlm_code_runner.py"
    command = [sys.executable, str(example), "--run-dir", str(tmp_path / "runs")]
    if how == "rlm-mlflow-run":
        launcher = str(Path(sys.executable).with_name("rlm-mlflow"))
        command = [launcher, "run", "--", *command, "--default-observability"]
    done = subprocess.run(
        command,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert "completed=True" in done.stdout
    assert "MLflow sink: rlm_mlflow._sink.MLflowSink" in done.stdout
    assert "'dropped': {}" in done.stdout
    runs = read_runs(seed_env)
    assert len(runs) == 3
    [root] = [run for run in runs.values() if "mlflow.parentRunId" not in run.data.tags]
    for run in runs.values():
        assert run.info.status == "FINISHED"
        assert run.data.metrics["completed"] == 1.0
        assert (tmp_path / "runs" / f"{run.data.tags['run_id']}.jsonl").exists()
        if run is not root:
            assert run.data.tags["mlflow.parentRunId"] == root.info.run_id


#: RLM Code's own tests of its runner and observability; two of them fail without rlm-mlflow
#: too (they read evaluation packs that only the repository has, not the sdist).
OWN_TESTS = ("test_rlm_observability.py", "test_rlm_runner.py")


def _failed(output: str) -> set[str]:
    return set(re.findall(r"^FAILED (\S+)", output, re.M))


@pytest.mark.slow
def test_rlm_codes_own_tests_under_rlm_mlflow_run_end_every_run_finished(
    rlm_code: Any,
    seed_env: str,
    read_runs: Callable[[str], dict[str, Any]],
    tmp_path_factory: pytest.TempPathFactory,
    journal_dir: Path,
) -> None:
    """RLM Code's own test suite builds a runner (and a sink) per test: under ``rlm-mlflow run``
    the same tests pass as without it, and at exit every run its sinks started is FINISHED in
    MLflow, with nothing left in a journal."""
    tests = own_tests(tmp_path_factory.mktemp("rlm-code-sdist"))
    pytest_command = [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider"]
    pytest_command += ["--noconftest", "-o", "addopts=", *(f"tests/{name}" for name in OWN_TESTS)]
    launcher = str(Path(sys.executable).with_name("rlm-mlflow"))

    def suite(command: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            command, cwd=tests.parent, capture_output=True, text=True, timeout=600, check=False
        )

    alone = suite(pytest_command)
    swapped = suite([launcher, "run", "--", *pytest_command])
    assert "passed" in swapped.stdout, swapped.stdout[-3000:] + swapped.stderr[-3000:]
    assert _failed(swapped.stdout) == _failed(alone.stdout), swapped.stdout[-3000:]
    runs = read_runs(seed_env)
    assert len(runs) >= 20, sorted(runs)
    statuses = {name: run.info.status for name, run in runs.items()}
    assert set(statuses.values()) == {"FINISHED"}, statuses
    assert not list(journal_dir.glob("*/meta.json")), "journals left for replay"

"""Shared fixtures: a real MLflow tracking server for the session, clients to read it back."""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from promises_support import Agent, Store
from rlm_mlflow.testing import MlflowServer, local_server

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
# The server prices LLM spans with litellm when it is installed (dspy brings it): without this,
# litellm's first import tries to download its price list, which takes as long as the network
# lets it fail (more than a request timeout here, with no network).
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


@pytest.fixture(autouse=True)
def journal_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every sink journals into the test's own folder, never the user's state directory."""
    folder = tmp_path / "journal"
    monkeypatch.setenv("RLM_MLFLOW_JOURNAL_DIR", str(folder))
    return folder


@pytest.fixture(autouse=True)
def temporary_files_stay_in_the_test(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """What a test, the libraries it drives and its child processes make with ``tempfile`` (RLM
    Code's interpreters' folders, the examples' run folders) goes into a folder of the test's
    among pytest's own (removed with its old ones; not in ``tmp_path``, which tests list),
    never into the machine's temporary folder."""
    folder = tmp_path_factory.mktemp("tmp")
    monkeypatch.setenv("TMPDIR", str(folder))
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.fixture(autouse=True)
def no_sink_outlives_its_test() -> Iterator[None]:
    """A test that fails before closing its sinks does not leave their workers sending (or
    retrying against a proxy that is gone) into the tests that follow it."""
    yield
    from rlm_mlflow._runtime import close_all

    close_all(None, 2.0)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A real ``mlflow server`` (sqlite backend, proxied artifacts) on a free loopback port."""
    with local_server(tmp_path_factory.mktemp("mlflow-server")) as server:
        yield server


@pytest.fixture
def store(mlflow_server: MlflowServer) -> Store:
    """Read the session server's store directly (never through a fault proxy)."""
    return Store(mlflow_server.uri)


@pytest.fixture
def experiment_name(request: pytest.FixtureRequest) -> str:
    """A fresh experiment name per test, so tests never see each other's runs."""
    return f"{request.node.name[:60]}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def read_runs(mlflow_server: MlflowServer) -> Callable[[str], dict[str, Any]]:
    """Read every run of an experiment back from the server, keyed by RLM run id (its
    ``run_id`` tag; a run the sink did not make by its name)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server.uri)

    def read(experiment: str) -> dict[str, Any]:
        found = client.get_experiment_by_name(experiment)
        assert found is not None, f"experiment {experiment!r} was never created"
        runs = client.search_runs([found.experiment_id], max_results=1000)
        by_name: dict[str, Any] = {}
        for run in runs:
            name = run.data.tags.get("run_id", run.info.run_name)
            assert name not in by_name, f"duplicate run {name}"
            by_name[name] = run
        return by_name

    return read


@pytest.fixture
def mlflow_client(mlflow_server: MlflowServer) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=mlflow_server.uri)


@pytest.fixture
def trajectory(tmp_path: Path) -> Callable[[str], Path]:
    """Write a small trajectory file like RLM Code's ``<run_dir>/<run_id>.jsonl``."""

    def write(run_id: str) -> Path:
        path = tmp_path / f"{run_id}.jsonl"
        path.write_text('{"type": "step", "step": 0}\n', encoding="utf-8")
        return path

    return write


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[Callable[..., Agent]]:
    """Start scripts of ``tests/agents`` as child processes; any still running is killed after
    the test. Each inherits the test's environment, its journal directory included."""
    started: list[Agent] = []

    def start(
        script: str, *args: str, env: dict[str, str] | None = None, stdin: bool = False
    ) -> Agent:
        log = tmp_path / f"{Path(script).stem}-{len(started)}.stderr"
        agent = Agent(script, *args, log=log, env=env, stdin=stdin)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.close()

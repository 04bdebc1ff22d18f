"""The runtime install: MLflow's slim client (``mlflow-skinny``), full MLflow only with ``[full]``.

A fresh virtualenv gets ``pip install .`` and nothing else (from a copy of the checkout, so the
checkout stays clean). In it, ``import rlm_mlflow`` works, a sink sends a run to the session's
real server, and the embedded store (MLflow's default, ``sqlite:///mlflow.db``) says exactly what
to install, in ``status()["detail"]``, in one log line and in ``rlm-mlflow status``. The same
message is checked in this process too, with the two packages it needs hidden.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from promises_support import WAIT, child_env, eventually
from rlm_mlflow import MLflowSink
from rlm_mlflow._transports.client import FULL_MLFLOW_HINT
from rlm_mlflow.testing import MlflowServer

ROOT = Path(__file__).resolve().parent.parent
#: The README's figure: the runtime install stays under this.
LIMIT_MB = 200


def hint(uri: str) -> str:
    return FULL_MLFLOW_HINT.format(uri=uri)


def test_the_embedded_store_without_full_mlflow_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """SQLAlchemy and alembic hidden (as with only the slim client): the sink is unavailable,
    and both ``status()["detail"]`` and one log line carry the install hint."""
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)  # find_spec() answers None, import fails
    monkeypatch.setitem(sys.modules, "alembic", None)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    sink = MLflowSink(enabled=True, experiment="light", tracking_uri=uri, flush_interval=0.1)
    with caplog.at_level(logging.WARNING, logger="rlm_mlflow"):
        sink.on_run_start("run-1", task="t", environment="e", params={})
        assert eventually(lambda: sink.status()["health"] == "unavailable", WAIT)
        status = sink.status()
        sink.close(5)
    assert status["available"] is False
    assert hint(uri) in status["detail"]
    assert "pip install" in status["detail"]
    lines = [r.getMessage() for r in caplog.records if hint(uri) in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]
    assert not (tmp_path / "mlflow.db").exists()


# -- a virtualenv with the runtime install only ----------------------------------------------


@dataclass
class LightVenv:
    root: Path
    python: Path

    def run(
        self, *args: str, cwd: Path, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.python), *args],
            cwd=cwd,
            env=env if env is not None else child_env(),
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )


def _copy_project(target: Path) -> Path:
    """The files ``pip install .`` reads, copied: building in place would leave ``build/``."""
    target.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, target / name)
    shutil.copytree(
        ROOT / "src",
        target / "src",
        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"),
    )
    return target


@pytest.fixture(scope="module")
def light_venv(tmp_path_factory: pytest.TempPathFactory) -> LightVenv:
    """``python -m venv`` then ``pip install .``: exactly what the README says to measure."""
    base = tmp_path_factory.mktemp("light")
    project = _copy_project(base / "project")
    root = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, timeout=300)
    python = root / "bin" / "python"
    done = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", project],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if done.returncode != 0:
        reason = f"pip install . failed: {done.stderr.strip()[-800:]}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return LightVenv(root, python)


def _size_mb(folder: Path) -> float:
    total = 0
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            total += path.stat().st_size
    return total / 1e6


@pytest.mark.slow
def test_the_runtime_install_is_light(light_venv: LightVenv, tmp_path: Path) -> None:
    """No full MLflow (SQLAlchemy, pandas, pyarrow, scipy, ...) and under the README's figure."""
    program = (
        "import importlib.util, json\n"
        "names = ['mlflow', 'rlm_mlflow', 'sqlalchemy', 'alembic', 'pandas', 'pyarrow', 'scipy',\n"
        "         'sklearn', 'flask', 'numpy']\n"
        "print(json.dumps({n: importlib.util.find_spec(n) is not None for n in names}))\n"
    )
    done = light_venv.run("-c", program, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found.pop("mlflow") is True
    assert found.pop("rlm_mlflow") is True
    assert not any(found.values()), found
    assert _size_mb(light_venv.root) < LIMIT_MB
    # The testing helpers are a package of the install, their memory transport usable in it.
    helpers = (
        "import importlib.util, json, rlm_mlflow.testing as t\n"
        "t.MemoryTransport().get_or_create_experiment('e')\n"
        "names = ['memory', 'server', 'faultproxy']\n"
        "print(json.dumps([importlib.util.find_spec(f'{t.__name__}.{n}') is not None\n"
        "                  for n in names]))\n"
    )
    done = light_venv.run("-c", helpers, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [True, True, True]
    # The launcher's bootstrap folder is part of the installed package, not only of the checkout.
    hooked = subprocess.run(
        [
            str(light_venv.root / "bin" / "rlm-mlflow"),
            "run",
            "--",
            str(light_venv.python),
            "-c",
            "import sys; print(type(sys.meta_path[0]).__name__)",
        ],
        cwd=tmp_path,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert hooked.returncode == 0, hooked.stderr
    assert hooked.stdout.strip() == "RLMCodeHook"


SEND = """
import json, sys
import rlm_mlflow
assert "mlflow" not in sys.modules, "importing rlm_mlflow must not import mlflow"
sink = rlm_mlflow.MLflowSink.from_env(flush_interval=0.1)
sink.on_run_start("light-1", task="t", environment="e", params={"max_steps": 2})
sink.on_step("light-1", event={"step": 0, "reward": 0.5}, cumulative_reward=0.5)
sink.on_run_end("light-1", result={"completed": True, "steps": 1, "total_reward": 0.5},
                run_path=None)
sink.close(60)
print(json.dumps(sink.status()))
"""


@pytest.mark.slow
@pytest.mark.integration
def test_a_sink_works_against_a_server_with_the_runtime_install(
    light_venv: LightVenv,
    mlflow_server: MlflowServer,
    experiment_name: str,
    read_runs: Callable[[str], dict[str, Any]],
    tmp_path: Path,
) -> None:
    env = child_env(
        DSPY_RLM_MLFLOW_ENABLED="true",
        MLFLOW_TRACKING_URI=mlflow_server.uri,
        DSPY_RLM_MLFLOW_EXPERIMENT=experiment_name,
    )
    done = light_venv.run("-c", SEND, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout.splitlines()[-1])
    assert status["health"] == "ok"
    assert status["dropped"] == {}
    assert status["spans_sent"] > 0  # the trace went too
    run = read_runs(experiment_name)["light-1"]
    assert run.info.status == "FINISHED"
    assert run.data.metrics["total_reward"] == 0.5


@pytest.mark.slow
def test_the_default_store_with_the_runtime_install_says_what_to_install(
    light_venv: LightVenv, tmp_path: Path
) -> None:
    """MLFLOW_TRACKING_URI unset: MLflow's default is its sqlite store, which needs full MLflow.
    ``status()``, the log and ``rlm-mlflow status`` all say what to install."""
    env = child_env(DSPY_RLM_MLFLOW_ENABLED="true", RLM_MLFLOW_SHUTDOWN_TIMEOUT="5")
    env.pop("MLFLOW_TRACKING_URI", None)
    program = (
        "import json, time, rlm_mlflow\n"
        "sink = rlm_mlflow.MLflowSink.from_env(flush_interval=0.1)\n"
        "sink.on_run_start('r', task='t', environment='e', params={})\n"
        "deadline = time.monotonic() + 60\n"
        "while sink.status()['health'] != 'unavailable' and time.monotonic() < deadline:\n"
        "    time.sleep(0.02)\n"
        "print(json.dumps(sink.status()))\n"
    )
    done = light_venv.run("-c", program, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout.splitlines()[-1])
    expected = hint(f"sqlite:///{tmp_path.resolve()}/mlflow.db")
    assert status["health"] == "unavailable"
    assert expected in status["detail"]
    assert sum(expected in line for line in done.stderr.splitlines()) == 1, done.stderr

    cli = subprocess.run(
        [str(light_venv.root / "bin" / "rlm-mlflow"), "status"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert cli.returncode == 1, cli.stdout
    assert "pip install" in cli.stdout
    assert "full mlflow package" in cli.stdout

"""``rlm-mlflow run -- COMMAND``: real processes started through the launcher.

The main test runs a program that uses RLM Code as its CLI does (``RLMRunner`` with no
``observability``: ``RLMObservability.default()`` builds the sinks) and knows nothing of
rlm_mlflow, through ``rlm-mlflow run``, against the session's real MLflow server. The others
check the launcher's promises: exec semantics and exit status, nothing imported by processes that
never import RLM Code, an existing ``sitecustomize`` still run, and any failure leaving RLM Code
as it was with a warning.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from promises_support import AGENTS, Store, child_env
from rlm_code_support import import_or_install
from rlm_mlflow.testing import MlflowServer

#: RLM Code warns that its pure_rlm environment falls back to exec(); the program never uses it.
QUIET = "ignore:PureRLMEnvironment is using exec:UserWarning"


def launcher() -> list[str]:
    """The installed ``rlm-mlflow`` script of this virtualenv."""
    script = Path(sys.executable).with_name("rlm-mlflow")
    assert script.exists(), f"{script} is missing: is the project installed in this venv?"
    return [str(script)]


def launch(
    *command: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*launcher(), "run", "--", *command],
        env=env if env is not None else child_env(),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def last_json(stdout: str) -> dict[str, Any]:
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert lines, f"no JSON line in the output:\n{stdout}"
    result: dict[str, Any] = json.loads(lines[-1])
    return result


@pytest.fixture(scope="module")
def rlm_code_installed() -> None:
    import_or_install()


@pytest.mark.integration
@pytest.mark.usefixtures("rlm_code_installed")
def test_rlm_code_builds_our_sink_under_the_launcher(
    mlflow_server: MlflowServer,
    experiment_name: str,
    read_runs: Callable[[str], dict[str, Any]],
    store: Store,
    tmp_path: Path,
) -> None:
    """A program that never heard of rlm_mlflow, run with ``rlm-mlflow run``: RLM Code's
    ``RLMObservability.default()`` holds our sink and not its own; the program's four runs (a
    root, two children in parallel, a grandchild) land once each, nested, FINISHED, with their
    steps and one trace for the tree, sent by the exit hook; the exit status is the program's."""
    env = child_env(
        DSPY_RLM_MLFLOW_ENABLED="true",
        MLFLOW_TRACKING_URI=mlflow_server.uri,
        DSPY_RLM_MLFLOW_EXPERIMENT=experiment_name,
        RLM_MLFLOW_FLUSH_INTERVAL="0.2",
        RLM_MLFLOW_SHUTDOWN_TIMEOUT="120",  # a busy machine must not cut the exit hook short
        PYTHONWARNINGS=QUIET,
    )
    run_dir = tmp_path / "runs"
    done = launch(sys.executable, str(AGENTS / "rlm_code_default.py"), str(run_dir), "3", env=env)
    assert done.returncode == 3, done.stderr
    report = last_json(done.stdout)
    assert report["imported_before"] is False  # the program itself never imported us
    assert report["sinks"] == [
        {"name": "mlflow", "module": "rlm_mlflow._sink", "class": "MLflowSink"}
    ]

    runs = read_runs(experiment_name)  # fails on a run logged twice
    assert len(runs) == 4
    root = runs[report["root"]]
    children = {name: run for name, run in runs.items() if run is not root}
    assert "mlflow.parentRunId" not in root.data.tags
    parents = sorted(run.data.tags["mlflow.parentRunId"] for run in children.values())
    assert parents.count(root.info.run_id) == 2  # the two children, run in parallel
    for run in runs.values():
        assert run.info.status == "FINISHED"
        assert run.data.tags["rlm_mlflow.key"]  # only our sink writes this tag
        assert run.data.metrics["completed"] == 1.0
        assert (run_dir / f"{run.data.tags['run_id']}.jsonl").exists()
    assert [p.step for p in store.client.get_metric_history(root.info.run_id, "step_reward")] == [
        1,
        2,
        3,
    ]
    experiment_id = store.experiment_id(experiment_name)
    (trace,) = store.client.search_traces(locations=[experiment_id])
    agent_spans = [s for s in trace.data.spans if s.span_type == "AGENT"]
    assert len(agent_spans) == 4  # the whole recursion in one trace


@pytest.mark.usefixtures("rlm_code_installed")
def test_without_the_launcher_rlm_code_keeps_its_own_sink(tmp_path: Path) -> None:
    """The same program run directly gets RLM Code's own sink: what the test above tells apart.
    (The sink is off here, so RLM Code's sink never reaches for a server.)"""
    done = subprocess.run(
        [sys.executable, str(AGENTS / "rlm_code_default.py"), str(tmp_path / "runs"), "0"],
        env=child_env(DSPY_RLM_MLFLOW_ENABLED="false", PYTHONWARNINGS=QUIET),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    (sink,) = last_json(done.stdout)["sinks"]
    assert sink["module"] == "rlm_code.rlm.observability"


def test_the_command_replaces_the_launcher_and_its_status_is_ours(tmp_path: Path) -> None:
    """exec: the command runs in the launcher's own process; its exit status comes back as is;
    a missing command is 127, no command is a usage error."""
    process = subprocess.Popen(
        [
            *launcher(),
            "run",
            "--",
            sys.executable,
            "-c",
            "import os, sys; print(os.getpid()); sys.exit(7)",
        ],
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = process.communicate(timeout=120)
    assert process.returncode == 7, err
    assert int(out.strip()) == process.pid

    missing = launch("rlm-mlflow-no-such-command", "--flag")
    assert missing.returncode == 127
    assert "rlm-mlflow-no-such-command: command not found" in missing.stderr

    bare = subprocess.run(
        [*launcher(), "run"], capture_output=True, text=True, timeout=120, check=False
    )
    assert bare.returncode == 2
    assert "usage: rlm-mlflow run -- COMMAND" in bare.stderr
    assert "no command given" in bare.stderr


def test_a_process_that_never_imports_rlm_code_pays_nothing(tmp_path: Path) -> None:
    """Only the hook is added: no module of ours, of anyio or of mlflow is imported, the
    bootstrap folder is off ``sys.path`` again, and the arguments reach the command intact."""
    program = (
        "import json, sys\n"
        "print(json.dumps({\n"
        "    'modules': sorted(m for m in sys.modules if m.split('.')[0] in\n"
        "                      ('rlm_mlflow', 'anyio', 'mlflow', 'rlm_code')),\n"
        "    'hooks': [type(f).__name__ for f in sys.meta_path],\n"
        "    'path': [p for p in sys.path if '_bootstrap' in p],\n"
        "    'argv': sys.argv[1:],\n"
        "}))\n"
    )
    done = launch(sys.executable, "-c", program, "--", "a b", "-x", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    seen = last_json(done.stdout)
    assert seen["modules"] == []
    assert seen["hooks"][0] == "RLMCodeHook"
    assert seen["path"] == []
    assert seen["argv"] == ["--", "a b", "-x"]


def test_an_existing_sitecustomize_still_runs(tmp_path: Path) -> None:
    """A ``sitecustomize`` already on the path is run after ours, as it would be without us."""
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "sitecustomize.py").write_text(
        "import builtins\nbuiltins.THEIR_SITECUSTOMIZE_RAN = True\n", encoding="utf-8"
    )
    program = (
        "import builtins, sys\n"
        "print(getattr(builtins, 'THEIR_SITECUSTOMIZE_RAN', False))\n"
        "print(sys.modules['sitecustomize'].__file__)\n"
        "print(type(sys.meta_path[0]).__name__)\n"
    )
    env = child_env(PYTHONPATH=str(theirs))
    done = launch(sys.executable, "-c", program, env=env)
    assert done.returncode == 0, done.stderr
    ran, module, hook = done.stdout.splitlines()
    assert ran == "True"
    assert Path(module) == theirs / "sitecustomize.py"
    assert hook == "RLMCodeHook"


def test_an_rlm_code_it_does_not_know_is_left_alone_with_a_warning(tmp_path: Path) -> None:
    """An ``rlm_code`` whose observability module lacks what the swap relies on: a warning, the
    module as it was, and the program runs to its end."""
    package = tmp_path / "fake" / "rlm_code" / "rlm"
    package.mkdir(parents=True)
    (package.parent / "__init__.py").write_text("", encoding="utf-8")
    (package / "__init__.py").write_text("", encoding="utf-8")
    (package / "observability.py").write_text(
        "class MLflowSink:\n    def __init__(self, url):\n        self.url = url\n\n"
        "class RLMObservability:\n    pass\n",
        encoding="utf-8",
    )
    program = "from rlm_code.rlm import observability\nprint(observability.MLflowSink.__module__)\n"
    done = launch(sys.executable, "-c", program, env=child_env(PYTHONPATH=str(package.parents[1])))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "rlm_code.rlm.observability"
    assert "RLM Code is left as it is" in done.stderr
    assert "this version of RLM Code is not supported" in done.stderr


@pytest.mark.usefixtures("rlm_code_installed")
def test_a_sink_that_cannot_be_built_falls_back_to_rlm_code_s_own(tmp_path: Path) -> None:
    """A bad ``RLM_MLFLOW_*`` value: the launcher says so, RLM Code's ``default()`` still builds
    its sinks, with its own MLflow sink, and the program runs to its end."""
    env = child_env(
        DSPY_RLM_MLFLOW_ENABLED="false", RLM_MLFLOW_QUEUE_SIZE="many", PYTHONWARNINGS=QUIET
    )
    done = launch(
        sys.executable, str(AGENTS / "rlm_code_default.py"), str(tmp_path / "runs"), "0", env=env
    )
    assert done.returncode == 0, done.stderr
    (sink,) = last_json(done.stdout)["sinks"]
    assert sink["module"] == "rlm_code.rlm.observability"
    assert "RLM_MLFLOW_QUEUE_SIZE='many' is not a valid int" in done.stderr
    assert "RLM Code's own MLflow sink is used instead" in done.stderr


def test_the_environment_puts_the_bootstrap_folder_first_once() -> None:
    from rlm_mlflow._launcher import BOOTSTRAP, launcher_environment

    once = launcher_environment({"PYTHONPATH": os.pathsep.join(["/a", "/b"])})
    twice = launcher_environment(once)
    assert twice["PYTHONPATH"] == os.pathsep.join([str(BOOTSTRAP), "/a", "/b"])
    assert (BOOTSTRAP / "sitecustomize.py").exists()
    assert launcher_environment({})["PYTHONPATH"] == str(BOOTSTRAP)


def test_empty_pythonpath_entries_still_mean_the_working_directory(tmp_path: Path) -> None:
    """``PYTHONPATH=":x"``: the empty entry is the working directory for Python, with or
    without the launcher; a program importing a module from its working directory runs."""
    from rlm_mlflow._launcher import BOOTSTRAP, launcher_environment

    folder = str(BOOTSTRAP)
    sep = os.pathsep
    assert launcher_environment({"PYTHONPATH": f"{sep}/x"})["PYTHONPATH"] == f"{folder}{sep}{sep}/x"
    assert launcher_environment({"PYTHONPATH": f"/x{sep}"})["PYTHONPATH"] == f"{folder}{sep}/x{sep}"
    assert launcher_environment({"PYTHONPATH": ""})["PYTHONPATH"] == folder

    work, scripts = tmp_path / "work", tmp_path / "scripts"
    work.mkdir()
    scripts.mkdir()
    (work / "helper_in_cwd.py").write_text("VALUE = 'found in the working directory'\n")
    program = scripts / "program.py"  # not ``-c``: its own folder, not the cwd, is sys.path[0]
    program.write_text("import helper_in_cwd\nprint(helper_in_cwd.VALUE)\n")
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(sep) if p]
    env = child_env(PYTHONPATH=sep.join(["", str(tmp_path / "x"), *inherited]))
    done = launch(sys.executable, str(program), env=env, cwd=work)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "found in the working directory"

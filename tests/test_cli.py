"""``rlm-mlflow status``, ``replay`` and ``demo`` as a user runs them, in processes of their own."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from promises_support import WAIT, Agent, child_env, journal_folders
from rlm_mlflow import MLflowSink
from rlm_mlflow._cli import tracking_uri_problem
from rlm_mlflow.testing import MlflowServer, free_port


def cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).with_name("rlm-mlflow")), *args],
        env=env if env is not None else child_env(),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


# -- status --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "says"),
    [
        ("htp:/nonsense", "unknown scheme 'htp'"),
        ("http:/nonsense", "names no host"),
        ("https://", "names no host"),
        ("postgresql://", "names no database server"),
        ("sqlite:mlflow.db", "write sqlite:///relative.db"),
        ("file:", "names no folder"),
        ("127.0.0.1:5000", "write http://127.0.0.1:5000"),
        ("mlflow.internal:5000/", "without its scheme"),
        ("http://127.0.0.1:99999", "is not a valid URI (Port out of range"),
    ],
)
def test_status_refuses_a_malformed_tracking_uri(uri: str, says: str) -> None:
    done = cli("status", env=child_env(DSPY_RLM_MLFLOW_ENABLED="true", MLFLOW_TRACKING_URI=uri))
    assert done.returncode == 1, done.stdout
    assert f"problem: MLFLOW_TRACKING_URI={uri!r}" in done.stdout
    assert says in done.stdout


@pytest.mark.parametrize(
    "uri",
    [
        "http://127.0.0.1:5000",
        "https://mlflow.example.com/prefix",
        "sqlite:///mlflow.db",
        "sqlite:////var/lib/mlflow.db",
        "postgresql+psycopg://mlflow@db.internal:5432/mlflow",
        "mysql://u@h/db",
        "file:///tmp/mlruns",
        "./mlruns",
        "/abs/mlruns",
        "databricks",
        "databricks://profile",
        "databricks-uc",
    ],
)
def test_well_formed_tracking_uris_pass(uri: str) -> None:
    assert tracking_uri_problem(uri) is None


@pytest.mark.integration
def test_status_against_a_live_server_exits_zero(
    mlflow_server: MlflowServer, experiment_name: str, tmp_path: Path
) -> None:
    env = child_env(
        DSPY_RLM_MLFLOW_ENABLED="true",
        MLFLOW_TRACKING_URI=mlflow_server.uri,
        DSPY_RLM_MLFLOW_EXPERIMENT=experiment_name,
    )
    done = cli("status", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout
    assert "server            answers" in done.stdout
    assert "problem" not in done.stdout


def test_status_counts_the_runs_a_close_left_for_replay_to_look_for(tmp_path: Path) -> None:
    """A journal a close kept only for runs that may still get a late duplicate holds no event:
    status says which look replay still has to make, not just "0 events"."""
    from rlm_mlflow._journal_format import write_late_runs

    folder = tmp_path / "journal" / "20261206T000000-1-abc"
    folder.mkdir(parents=True)
    (folder / "meta.json").write_text(json.dumps({"prefix": "abc"}))
    assert write_late_runs(folder, {"abc-3": ("held", "r1"), "abc-4": ("other", "r2")})
    env = child_env(
        DSPY_RLM_MLFLOW_ENABLED="false", RLM_MLFLOW_JOURNAL_DIR=str(tmp_path / "journal")
    )
    done = cli("status", env=env, cwd=tmp_path)
    line = next(x for x in done.stdout.splitlines() if x.startswith("journal"))
    assert "1 journal, 0 events not yet confirmed sent" in line, line
    assert "2 run(s) to look for a duplicate MLflow run committed late" in line, line


@pytest.mark.parametrize(
    ("uri", "says"),
    [
        ("postgresql://mlflow@127.0.0.1:{port}/db", "the database at postgresql://"),
        ("file:///{tmp}/mlruns", "is a file store, which this MLflow refuses"),
        ("{tmp}/mlruns", "is a file store, which this MLflow refuses"),
    ],
)
def test_status_checks_stores_the_sink_cannot_use(uri: str, says: str, tmp_path: Path) -> None:
    """Well formed, but unusable: a database nothing listens for, a file store MLflow refuses."""
    uri = uri.format(port=free_port(), tmp=tmp_path)
    env = child_env(DSPY_RLM_MLFLOW_ENABLED="true", MLFLOW_TRACKING_URI=uri)
    env.pop("MLFLOW_ALLOW_FILE_STORE", None)
    done = cli("status", env=env, cwd=tmp_path)
    assert done.returncode == 1, done.stdout
    assert says in done.stdout
    assert not (tmp_path / "mlruns").exists()  # status only looks


def test_the_demo_checks_its_server_before_it_runs(tmp_path: Path) -> None:
    """Nothing listens at the URI: the demo says so and stops at once, without running tasks
    against it or printing links to a UI that is not there."""
    uri = f"http://127.0.0.1:{free_port()}"
    done = cli("demo", "--tracking-uri", uri, "--workdir", str(tmp_path), cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"problem: the tracking server at {uri} does not answer" in done.stdout
    assert "Retrying" not in done.stderr
    assert "See them" not in done.stdout
    assert not (tmp_path / "demo-output").exists()


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("ture", "DSPY_RLM_MLFLOW_ENABLED='ture' is not a value read as true (true, 1, yes, on)"),
        ("0", "DSPY_RLM_MLFLOW_ENABLED='0'"),
        (None, "DSPY_RLM_MLFLOW_ENABLED is not set"),
    ],
)
def test_status_quotes_the_value_that_leaves_the_sink_off(value: str | None, says: str) -> None:
    env = child_env()
    env.pop("DSPY_RLM_MLFLOW_ENABLED", None)
    if value is not None:
        env["DSPY_RLM_MLFLOW_ENABLED"] = value
    done = cli("status", env=env)
    assert done.returncode == 1, done.stdout
    assert f"problem: the sink is disabled ({says})" in done.stdout


def test_status_of_the_default_store_names_it(tmp_path: Path) -> None:
    """MLFLOW_TRACKING_URI unset: MLflow's default store in the current folder, named."""
    env = child_env(DSPY_RLM_MLFLOW_ENABLED="true")
    env.pop("MLFLOW_TRACKING_URI", None)
    done = cli("status", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout
    assert f"sqlite:///{tmp_path.resolve()}/mlflow.db" in done.stdout
    assert "MLflow's default" in done.stdout
    assert not (tmp_path / "mlflow.db").exists()  # status only looks


# -- replay --------------------------------------------------------------------------------------


def kept_journal(uri: str, experiment: str) -> None:
    """A run, its start, 5 steps and its end, and a run left open (the close ends it FAILED),
    kept in a journal: the server never answers."""
    sink = MLflowSink(
        enabled=True,
        experiment=experiment,
        tracking_uri=uri,
        flush_interval=0.1,
        retry_deadline=0.5,
        retry_initial=0.05,
    )
    sink.on_run_start("ended", task="t", environment="e", params={})
    for number in range(5):
        sink.on_step("ended", event={"step": number, "reward": 1.0}, cumulative_reward=1.0)
    sink.on_run_end("ended", result={"completed": True, "steps": 5}, run_path=None)
    sink.on_run_start("left-open", task="t", environment="e", params={})
    sink.close(3.0)


def figures(stdout: str) -> dict[str, int]:
    """The first number of each line of the replay's report, by the line's label."""
    found: dict[str, int] = {}
    for line in stdout.splitlines():
        match = re.match(r"^([a-zA-Z][a-zA-Z ]*?) +(\d+)", line)
        if match:
            found[match.group(1)] = int(match.group(2))
    return found


@pytest.mark.integration
def test_replay_says_what_was_waiting_sent_failed_and_killed(
    mlflow_server: MlflowServer,
    experiment_name: str,
    journal_dir: Path,
    read_runs: Callable[[str], dict[str, Any]],
    agents: Callable[..., Agent],
) -> None:
    """Two journals: one kept whole by a sink whose server never answered, one left by an
    agent killed (-9) mid-run. A replay to a dead server: everything waiting is not sent, exit
    1. Then to the live server: all of it sent, the killed agent's run ended KILLED (and counted
    so), the run the closing sink ended FAILED stays FAILED (and is not counted), exit 0."""
    dead = f"http://127.0.0.1:{free_port()}"
    kept_journal(dead, experiment_name)
    agent = agents("crash_steps.py", mlflow_server.uri, experiment_name, "crashed")
    while True:
        line = agent.next_line(WAIT)
        assert line is not None, f"the agent ended on its own:\n{agent.stderr()}"
        if line == "STEP 50":
            agent.kill9()
            break
    assert len(journal_folders(journal_dir)) == 2

    failed = cli("replay", str(journal_dir), "--tracking-uri", dead, "--retry-deadline", "1")
    assert failed.returncode == 1, failed.stdout
    first = figures(failed.stdout)
    assert first["journals"] == 2
    assert first["waiting"] >= 7  # at least the first journal: a start, 5 steps, an end
    assert first["sent now"] == 0
    assert first["not sent"] == first["waiting"]
    assert "run 'rlm-mlflow replay' again" in failed.stdout

    done = cli("replay", str(journal_dir), "--tracking-uri", mlflow_server.uri)
    assert done.returncode == 0, done.stdout + done.stderr
    second = figures(done.stdout)
    assert second["waiting"] == first["waiting"]
    assert second["sent now"] == second["waiting"]
    assert second["not sent"] == 0
    assert second["refused"] == 0
    assert second["runs ended KILLED"] == 1
    assert not [line for line in done.stdout.splitlines() if line.startswith("kept")]
    assert journal_folders(journal_dir) == []
    runs = read_runs(experiment_name)
    assert {name: run.info.status for name, run in runs.items()} == {
        "ended": "FINISHED",
        "left-open": "FAILED",
        "crashed": "KILLED",
    }

    nothing = cli("replay", str(journal_dir))
    assert nothing.returncode == 0
    assert "nothing to replay" in nothing.stdout


@pytest.mark.integration
@pytest.mark.parametrize("bad_uri", ["htp:/host", "127.0.0.1:5000"])
def test_a_journal_headed_for_a_bad_uri_is_kept_with_the_reason_and_the_others_go(
    bad_uri: str,
    mlflow_server: MlflowServer,
    experiment_name: str,
    journal_dir: Path,
    read_runs: Callable[[str], dict[str, Any]],
) -> None:
    """Two journals, one written for a URI MLflow cannot use: replay says why that one waits
    (no traceback), sends the other in full, and exits 1."""
    dead = f"http://127.0.0.1:{free_port()}"
    kept_journal(dead, f"{experiment_name}-bad")
    kept_journal(dead, experiment_name)
    folders = journal_folders(journal_dir)
    assert len(folders) == 2
    metas = {folder: json.loads((folder / "meta.json").read_text()) for folder in folders}
    (bad,) = [f for f, meta in metas.items() if meta["experiment"].endswith("-bad")]
    (good,) = [f for f in folders if f != bad]
    for folder, uri in ((bad, bad_uri), (good, mlflow_server.uri)):
        metas[folder]["tracking_uri"] = uri
        (folder / "meta.json").write_text(json.dumps(metas[folder]))

    done = cli("replay", str(journal_dir))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    (problem,) = [line for line in done.stdout.splitlines() if line.startswith("problem:")]
    assert f"tracking URI {bad_uri} cannot be used" in problem
    assert "--tracking-uri" in problem
    assert journal_folders(journal_dir) == [bad]
    runs = read_runs(experiment_name)
    assert {name: run.info.status for name, run in runs.items()} == {
        "ended": "FINISHED",
        "left-open": "FAILED",
    }


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_replay_of_a_folder_that_is_not_there_says_so(kind: str, tmp_path: Path) -> None:
    target = tmp_path / "jornal"
    if kind == "file":
        target.write_text("not a journal")
    done = cli("replay", str(target))
    assert done.returncode == 2, done.stdout
    assert str(target) in done.stderr
    assert ("is a file" if kind == "file" else "does not exist") in done.stderr
    assert "nothing to replay" not in done.stdout


# -- demo ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_demo_prints_commands_that_work_as_printed(tmp_path: Path) -> None:
    """The demo into the default store; the UI command it prints names a program that exists
    and the store it wrote, and its links lead to the experiment's runs and traces."""
    env = child_env()
    env.pop("MLFLOW_TRACKING_URI", None)
    done = cli("demo", "--tasks", "2", "--workdir", str(tmp_path), env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all data in MLflow     yes" in done.stdout
    (command,) = [line.strip() for line in done.stdout.splitlines() if " ui " in line]
    program, *args = command.split()
    assert Path(program).is_file(), program
    assert args[:2] == ["ui", "--backend-store-uri"]
    assert args[2] == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    port = args[args.index("--port") + 1]
    assert port != "5000"  # the port the docs give a tracking server
    links = re.findall(rf"http://127\.0\.0\.1:{port}/\S+", done.stdout)
    assert [re.sub(r"/experiments/\d+/", "/experiments/ID/", link) for link in links] == [
        f"http://127.0.0.1:{port}/#/experiments/ID/runs?workflowType=machine_learning",
        f"http://127.0.0.1:{port}/#/experiments/ID/traces",
    ]


@pytest.mark.integration
def test_the_demo_links_open_pages_of_a_real_server(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    """Against a server, the demo prints the experiment's runs and traces links on that server;
    the server serves its UI for them."""
    done = cli(
        "demo",
        "--tasks",
        "1",
        "--tracking-uri",
        mlflow_server.uri,
        "--workdir",
        str(tmp_path),
        "--experiment",
        f"demo-{free_port()}",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    links = re.findall(re.escape(mlflow_server.uri) + r"/\S+", done.stdout)
    assert len(links) == 2, done.stdout
    for link in links:
        with urllib.request.urlopen(link.split("#")[0], timeout=30) as page:
            assert page.status == 200
            assert b"<html" in page.read().lower()

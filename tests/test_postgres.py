"""A tracking server that scales out: PostgreSQL, ``mlflow server --workers 2``, many agent
processes writing through their own sinks at once. Every run and every point must land.

The test starts a real PostgreSQL itself (Debian's ``postgresql`` package; on CI as root it is
installed when missing) in a temporary folder, on a free loopback port, and stops it afterwards.
What landed is read twice: through MLflow (runs, statuses, parents) and straight from PostgreSQL
(every metric row).

This file is also the measuring tool behind ``docs/deploy.md``::

    python tests/test_postgres.py bench --processes 4 --roots 8 --steps 500   # or scripts/postgres
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest

from promises_support import eventually
from rlm_mlflow import MLflowSink
from rlm_mlflow.testing import MlflowServer, free_port, local_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHILDREN = 2
CHILD_STEPS = 30


# -- PostgreSQL ------------------------------------------------------------------------------


def _pg_bin() -> Path | None:
    """The newest ``/usr/lib/postgresql/<version>/bin`` that has initdb and pg_ctl."""
    found = sorted(
        (Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    found = [p for p in found if (p / "pg_ctl").exists()]
    return found[-1] if found else None


def find_or_install_postgres() -> Path:
    """PostgreSQL's binaries; on CI, as root, ``apt-get install postgresql`` first if needed.

    Raises ``RuntimeError`` with the reason when PostgreSQL cannot be had.
    """
    found = _pg_bin()
    if found is not None:
        return found
    if os.environ.get("CI", "").lower() != "true" or os.geteuid() != 0:
        raise RuntimeError(
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): "
            "apt-get install postgresql"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "postgresql"]
    if subprocess.run(install, env=env, capture_output=True, check=False).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, check=False)
        done = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"apt-get install postgresql failed: {done.stderr[-500:]}")
    found = _pg_bin()
    if found is None:
        raise RuntimeError("apt-get installed postgresql, but no initdb was found")
    return found


@dataclass
class Postgres:
    """A running PostgreSQL cluster: where it listens and how to query it."""

    bin: Path
    port: int
    database: str
    as_user: list[str]  # the command prefix that runs a program as the cluster's owner
    root: Path  # its folder: data, socket, log

    @property
    def uri(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{self.database}"

    def query(self, sql: str) -> list[list[str]]:
        """Rows of ``sql``, each a list of column texts."""
        done = subprocess.run(
            [
                *self.as_user,
                str(self.bin / "psql"),
                *("-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"),
                *("-d", self.database, "-At", "-F", "\t", "-v", "ON_ERROR_STOP=1", "-c", sql),
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
            cwd="/",  # the cluster's owner may not be allowed in ours
        )
        if done.returncode != 0:
            raise RuntimeError(f"psql failed: {done.stderr.strip()}")
        return [line.split("\t") for line in done.stdout.splitlines() if line]


@contextlib.contextmanager
def postgres_server(database: str = "mlflow", *, fsync: bool = False) -> Iterator[Postgres]:
    """``initdb`` into a fresh folder, start on a free loopback port, stop and delete after.

    PostgreSQL refuses to run as root: as root, the cluster belongs to the ``postgres`` user
    (created by Debian's package) and every program runs through ``runuser``. ``fsync`` is off
    unless asked for: the test's data is thrown away.
    """
    pg_bin = find_or_install_postgres()
    as_user: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="rlm-mlflow-pg-"))  # /tmp: reachable by another user
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres", "postgres")
    data, log = root / "data", root / "server.log"
    port = free_port()

    def run(*command: str) -> None:
        done = subprocess.run(
            [*as_user, *command], capture_output=True, text=True, check=False, timeout=180, cwd="/"
        )
        if done.returncode != 0:
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{command[0]} failed: {done.stdout}{done.stderr}{tail}")

    try:
        run(str(pg_bin / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8")
        settings = {
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(root),
            "fsync": "on" if fsync else "off",
            "max_connections": "200",
        }
        # In the foreground under a lifeline, not daemonized by pg_ctl: the cluster stops when
        # this process is gone, also when it is killed before its teardown could stop it.
        lifeline = [sys.executable, "-m", "rlm_mlflow.testing._lifeline", str(os.getpid()), "--"]
        with log.open("ab") as out:
            process = subprocess.Popen(
                [
                    *lifeline,
                    *as_user,
                    str(pg_bin / "postgres"),
                    *("-D", str(data), "-p", str(port)),
                    *(part for key, value in settings.items() for part in ("-c", f"{key}={value}")),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd="/",
            )
        try:
            _wait_ready(pg_bin, port, process, log)
            server = Postgres(pg_bin, port, database, as_user, root)
            address = ("-h", "127.0.0.1", "-p", str(port), "-U", "postgres")
            run(str(pg_bin / "createdb"), *address, database)
            yield server
        finally:
            try:
                run(str(pg_bin / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
            finally:
                try:
                    process.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _wait_ready(pg_bin: Path, port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    """Until the cluster takes connections (``pg_isready``), or raise with its log."""
    deadline = time.monotonic() + 120
    while True:
        ready = subprocess.run(
            [str(pg_bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(port), "-t", "2"],
            capture_output=True,
            check=False,
            timeout=30,
        )
        if ready.returncode == 0:
            return
        if process.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"PostgreSQL did not start (exit {process.poll()}): {tail}")
        time.sleep(0.2)  # a poll of the cluster's readiness, not a synchronisation of the test


# -- the agent processes --------------------------------------------------------------------------


def reward(run_id: str, step: int) -> float:
    """A reward both the agent and the test can compute, different for every run and step."""
    return (zlib.crc32(f"{run_id}:{step}".encode()) % 2000) / 1000 - 0.5


def run_names(prefix: str, roots: int) -> dict[str, str | None]:
    """Every run one agent process makes, each with its parent's name."""
    names: dict[str, str | None] = {}
    for r in range(roots):
        root = f"{prefix}-root{r}"
        names[root] = None
        for c in range(CHILDREN):
            names[f"{root}.child{c}"] = root
    return names


def agent_process(uri: str, experiment: str, prefix: str, roots: int, steps: int) -> dict[str, Any]:
    """What one agent process does: ``roots`` runs at once on threads, each delegating, at its
    step 1, ``CHILDREN`` child runs on other threads; every hook call is timed."""
    hook_ns: list[int] = []
    sink = MLflowSink(enabled=True, experiment=experiment, tracking_uri=uri, flush_interval=0.2)

    def timed(hook: Any, *args: Any, **kwargs: Any) -> None:
        started = time.perf_counter_ns()
        hook(*args, **kwargs)
        hook_ns.append(time.perf_counter_ns() - started)

    def run(run_id: str, count: int, parent: str | None, depth: int) -> None:
        params = {"depth": depth, "parent_run_id": parent, "max_steps": count}
        timed(sink.on_run_start, run_id, task="t" * 40, environment="pure_rlm", params=params)
        total = 0.0
        for step in range(count):
            if depth == 0 and step == 1:
                names = [f"{run_id}.child{c}" for c in range(CHILDREN)]
                for child in [children.submit(run, n, CHILD_STEPS, run_id, 1) for n in names]:
                    child.result()
            total += reward(run_id, step)
            event = {"step": step, "reward": reward(run_id, step)}
            timed(sink.on_step, run_id, event=event, cumulative_reward=total)
        result = {"completed": True, "steps": count, "total_reward": total}
        timed(sink.on_run_end, run_id, result=result, run_path=None)

    started = time.perf_counter()
    with sink, ThreadPoolExecutor(roots) as pool, ThreadPoolExecutor(roots * CHILDREN) as children:
        names = [name for name, parent in run_names(prefix, roots).items() if parent is None]
        for done in [pool.submit(run, name, steps, None, 0) for name in names]:
            done.result()
        agent_seconds = time.perf_counter() - started
        flushed = sink.flush(300)
    hook_ns.sort()
    return {
        "flushed": flushed,
        "agent_seconds": agent_seconds,
        "total_seconds": time.perf_counter() - started,
        "hook_p50_us": hook_ns[len(hook_ns) // 2] / 1000,
        "hook_p99_us": hook_ns[int(len(hook_ns) * 0.99)] / 1000,
        "status": sink.status(),
    }


def run_agents(
    server_uri: str, experiment: str, processes: int, roots: int, steps: int
) -> list[dict[str, Any]]:
    """Start ``processes`` agent processes at once; their reports, once all have ended."""
    command = [sys.executable, __file__, "agent", server_uri, experiment]
    procs = [
        subprocess.Popen(
            [*command, f"p{n}", str(roots), str(steps)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(processes)
    ]
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"agent process failed:\n{out}\n{err}"
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return reports


def expected_points(processes: int, roots: int, steps: int) -> dict[tuple[str, str, int], float]:
    """Every metric row the agents should have put in MLflow: (run, key, step) -> value."""
    points: dict[tuple[str, str, int], float] = {}
    for n in range(processes):
        for name, parent in run_names(f"p{n}", roots).items():
            count = steps if parent is None else CHILD_STEPS
            total = 0.0
            for step in range(count):
                total += reward(name, step)
                points[name, "step_reward", step] = reward(name, step)
                points[name, "cumulative_reward", step] = total
            points[name, "completed", 0] = 1.0
            points[name, "steps", 0] = float(count)
            points[name, "total_reward", 0] = total
    return points


def stored_points(pg: Postgres, experiment: str) -> dict[tuple[str, str, int], list[float]]:
    """Every metric row PostgreSQL holds for the experiment, straight from MLflow's tables, by
    the RLM run id (the run's ``run_id`` tag)."""
    rows = pg.query(
        "SELECT t.value, m.key, m.step, m.value FROM metrics m "
        "JOIN runs r ON r.run_uuid = m.run_uuid "
        "JOIN tags t ON t.run_uuid = m.run_uuid AND t.key = 'run_id' "
        "JOIN experiments e ON e.experiment_id = r.experiment_id "
        f"WHERE e.name = '{experiment}'"
    )
    stored: dict[tuple[str, str, int], list[float]] = {}
    for name, key, step, value in rows:
        stored.setdefault((name, key, int(step)), []).append(float(value))
    return stored


# -- the test ------------------------------------------------------------------------------


def _cannot(reason: str) -> NoReturn:
    """Skip here; on CI (CI=true), where everything can be installed, fail instead."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def test_the_cluster_stops_when_the_process_that_started_it_is_killed() -> None:
    """A test run killed with SIGKILL skips its teardown: the PostgreSQL cluster it started
    (and the server processes it forks) stops all the same, as ``local_server`` does."""
    try:
        pg_bin = find_or_install_postgres()
    except RuntimeError as exc:
        _cannot(str(exc))
    owner_code = (
        "import sys, time\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_postgres import postgres_server\n"
        "with postgres_server() as pg:\n"
        "    print(pg.port, pg.root, flush=True)\n"
        "    time.sleep(600)\n"
    )
    env = dict(os.environ, TMPDIR="/tmp")  # the cluster's owner must reach its folder
    owner = subprocess.Popen(
        [sys.executable, "-c", owner_code], stdout=subprocess.PIPE, text=True, env=env
    )
    assert owner.stdout is not None
    port_text, root_text = owner.stdout.readline().split()
    root = Path(root_text)

    def listening() -> bool:
        ready = subprocess.run(
            [str(pg_bin / "pg_isready"), "-h", "127.0.0.1", "-p", port_text, "-t", "2"],
            capture_output=True,
            check=False,
            timeout=30,
        )
        return ready.returncode == 0

    def cluster_processes() -> list[str]:
        found = subprocess.run(
            ["pgrep", "-f", f"postgres -D {root / 'data'}"],
            capture_output=True,
            text=True,
            check=False,
        )
        return found.stdout.split()

    try:
        assert listening()
        assert cluster_processes()
        owner.kill()
        owner.wait(30)
        assert eventually(lambda: not listening() and not cluster_processes(), 30.0)
    finally:
        owner.kill()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    try:
        find_or_install_postgres()
    except RuntimeError as exc:
        _cannot(str(exc))
    try:
        import psycopg  # noqa: F401  (the server's driver: postgresql+psycopg://)
    except ImportError:
        _cannot("psycopg is not installed: pip install -e '.[test]'")
    with postgres_server() as server:
        yield server


@pytest.fixture(scope="module")
def scaled_server(
    postgres: Postgres, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MlflowServer]:
    """``mlflow server --backend-store-uri postgresql://... --workers 2``."""
    root = tmp_path_factory.mktemp("mlflow-postgres")
    with local_server(root, backend_store_uri=postgres.uri, workers=2, timeout=180) as server:
        yield server


def test_agent_processes_in_parallel_into_postgres(
    postgres: Postgres, scaled_server: MlflowServer, experiment_name: str
) -> None:
    """4 processes at once, each with its own sink, 4 root runs on threads, each root with 2
    children: 48 runs, 5,264 points into 2 server workers on one PostgreSQL. Every run is
    FINISHED under the right parent and every point is stored once, with its value."""
    from mlflow import MlflowClient

    processes, roots, steps = 4, 4, 100
    reports = run_agents(scaled_server.uri, experiment_name, processes, roots, steps)
    for report in reports:
        assert report["flushed"], report
        assert report["status"]["dropped"] == {}
        assert report["status"]["refused"] == 0

    client = MlflowClient(tracking_uri=scaled_server.uri)
    experiment = client.get_experiment_by_name(experiment_name)
    assert experiment is not None
    runs = {r.data.tags["run_id"]: r for r in client.search_runs([experiment.experiment_id])}
    expected_runs = {
        name: parent for n in range(processes) for name, parent in run_names(f"p{n}", roots).items()
    }
    assert set(runs) == set(expected_runs)
    for name, parent in expected_runs.items():
        run = runs[name]
        assert run.info.status == "FINISHED"
        if parent is None:
            assert "mlflow.parentRunId" not in run.data.tags
        else:
            assert run.data.tags["mlflow.parentRunId"] == runs[parent].info.run_id

    expected = expected_points(processes, roots, steps)
    stored = stored_points(postgres, experiment_name)
    assert set(stored) == set(expected)
    duplicated = {key: values for key, values in stored.items() if len(values) != 1}
    assert not duplicated
    assert {key: values[0] for key, values in stored.items()} == expected


# -- measuring (scripts/postgres) -----------------------------------------------------------


def bench(processes: int, roots: int, steps: int, workers: int, fsync: bool) -> None:
    """Start PostgreSQL and the server, run the agents, print what it took."""
    with contextlib.ExitStack() as stack:
        t0 = time.perf_counter()
        pg = stack.enter_context(postgres_server(fsync=fsync))
        t1 = time.perf_counter()
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rlm-mlflow-bench-")))
        server = stack.enter_context(
            local_server(root, backend_store_uri=pg.uri, workers=workers, timeout=300)
        )
        t2 = time.perf_counter()
        experiment = f"bench-{int(time.time())}"
        started = time.perf_counter()
        reports = run_agents(server.uri, experiment, processes, roots, steps)
        wall = time.perf_counter() - started
        stored = stored_points(pg, experiment)
        expected = expected_points(processes, roots, steps)
    points = sum(len(v) for v in stored.values())
    runs = processes * roots * (1 + CHILDREN)
    p50 = sorted(r["hook_p50_us"] for r in reports)[len(reports) // 2]
    lines = [
        f"PostgreSQL up, fsync {'on ' if fsync else 'off'}             {t1 - t0:8.1f} s",
        f"mlflow server up ({workers} workers, migrations) {t2 - t1:6.1f} s",
        f"processes x roots x root steps         {processes} x {roots} x {steps} ({runs} runs)",
        f"points stored / expected               {points} / {len(expected)}",
        f"every sink flushed                     {all(r['flushed'] for r in reports)}",
        f"wall time, start to all landed         {wall:8.1f} s",
        f"points per second (all processes)      {points / wall:8.0f}",
        f"runs per second                        {runs / wall:8.1f}",
        f"requests (all sinks)                   {sum(r['status']['requests'] for r in reports)}",
        f"agent time (slowest process)           {max(r['agent_seconds'] for r in reports):8.2f} s",
        f"hook time p50 / worst p99              {p50:.1f} us / "
        f"{max(r['hook_p99_us'] for r in reports):.1f} us",
    ]
    sys.stdout.write("\n".join(lines) + "\n")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description="PostgreSQL-backed MLflow: agents and figures")
    commands = parser.add_subparsers(dest="command", required=True)
    agent = commands.add_parser("agent", help="one agent process (used by the test)")
    agent.add_argument("uri")
    agent.add_argument("experiment")
    agent.add_argument("prefix")
    agent.add_argument("roots", type=int)
    agent.add_argument("steps", type=int)
    measure = commands.add_parser("bench", help="start everything and print figures")
    measure.add_argument("--processes", type=int, default=4)
    measure.add_argument("--roots", type=int, default=8)
    measure.add_argument("--steps", type=int, default=500)
    measure.add_argument("--workers", type=int, default=2)
    measure.add_argument("--fsync", action="store_true", help="PostgreSQL with fsync on")
    args = parser.parse_args(argv)
    if args.command == "agent":
        report = agent_process(args.uri, args.experiment, args.prefix, args.roots, args.steps)
        sys.stdout.write(json.dumps(report) + "\n")
    else:
        bench(args.processes, args.roots, args.steps, args.workers, args.fsync)


if __name__ == "__main__":
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    main(sys.argv[1:])

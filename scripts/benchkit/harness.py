"""The parent side: a real MLflow server, a FaultProxy in front of it, child processes, read-back.

``Harness`` owns the work folder, the server and the proxy. ``child()`` runs one task in a fresh
interpreter (``python -m benchkit.child``) with its own journal folder and log file, and returns
its result; ``ending_child()`` runs one and ends it (a normal exit, or SIGTERM) right after its
last hook. ``run_workload()`` drives one sink through one workload and reads back from the
server's store what reached MLflow; ``read_traces()`` reads traces back with
``MlflowClient.search_traces``; ``replay()`` runs ``rlm-mlflow replay`` on a child's journal.
``cpu_snapshot()`` tells how busy the machine was.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .child import RESULT_PREFIX
from .measure import summarize_traces
from .workloads import STEP_KEYS, SUMMARY_KEYS, WARM_UP, RlmWorkload, workload_spec

SCRIPTS = Path(__file__).resolve().parent.parent
ROOT = SCRIPTS.parent
SRC = ROOT / "src"


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def closed_port_uri() -> str:
    """A loopback URI nobody listens on: connects are refused."""
    from rlm_mlflow.testing import free_port

    return f"http://127.0.0.1:{free_port()}"


@dataclass
class Harness:
    """Where children run, and what they send to."""

    workdir: Path
    server: Any = None  # rlm_mlflow.testing.MlflowServer, None when no section needs one
    proxy: Any = None  # rlm_mlflow.testing.FaultProxy in pass mode, None without a server
    logs: Path = field(init=False)

    def __post_init__(self) -> None:
        self.logs = self.workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    @property
    def server_uri(self) -> str:
        if self.server is None:
            raise RuntimeError("this section needs the mlflow server")
        return str(self.server.uri)

    @property
    def uri(self) -> str:
        """Through the proxy (it counts requests and adds latency), else straight to the server."""
        return str(self.proxy.uri) if self.proxy is not None else self.server_uri

    @property
    def proxy_requests(self) -> int:
        return int(self.proxy.requests) if self.proxy is not None else 0

    @property
    def proxy_paths(self) -> Counter[str]:
        """Requests the proxy has read so far, by path (a copy)."""
        return Counter(self.proxy.paths) if self.proxy is not None else Counter()

    def settle(self, timeout: float = 30.0) -> bool:
        """Wait until the server has answered every request the proxy forwarded."""
        if self.proxy is None:
            return True
        return bool(self.proxy.wait_until(lambda proxy: proxy.in_flight == 0, timeout))

    @property
    def db_path(self) -> Path:
        """The server's sqlite store."""
        return Path(self.server.root) / "mlflow.db"

    def set_latency(self, seconds: float) -> None:
        if self.proxy is not None:
            self.proxy.set(latency=seconds)

    @contextlib.contextmanager
    def latency(self, seconds: float) -> Iterator[None]:
        self.set_latency(seconds)
        try:
            yield
        finally:
            self.set_latency(0.0)

    def experiment(self, label: str) -> str:
        return f"bench-{label}-{uuid.uuid4().hex[:8]}"

    def folder(self, experiment: str) -> Path:
        """Where a child writes its runs' trajectory files."""
        return self.workdir / "runs" / experiment

    # -- child processes ------------------------------------------------------------------------

    def _environment(self, name: str) -> dict[str, str]:
        """A child's environment: the sources importable, telemetry off, its own journal."""
        env = dict(os.environ)
        env.pop("MLFLOW_TRACKING_URI", None)
        env.pop("MLFLOW_ENABLE_ASYNC_LOGGING", None)
        env.pop("MLFLOW_ENABLE_ASYNC_TRACE_LOGGING", None)
        env["MLFLOW_DISABLE_TELEMETRY"] = "true"
        env["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
        paths = (str(SCRIPTS), str(SRC) if SRC.is_dir() else None, env.get("PYTHONPATH"))
        env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        # Our sink's write-ahead journal goes under the work folder, one folder per child.
        env["RLM_MLFLOW_JOURNAL_DIR"] = str(self.journal_dir(name))
        return env

    def journal_dir(self, name: str) -> Path:
        return self.workdir / "journal" / name

    def child(self, spec: dict[str, Any], timeout: float = 900.0) -> dict[str, Any]:
        """Run ``spec`` in a fresh interpreter; its result, or RuntimeError with its log's tail."""
        name = f"{spec['task']}-{spec.get('sink', '')}-{uuid.uuid4().hex[:6]}"
        env = self._environment(name)
        log_path = self.logs / f"{name}.log"
        command = [sys.executable, "-m", "benchkit.child", json.dumps(spec)]
        started = time.monotonic()
        with log_path.open("w", encoding="utf-8") as errors:
            process = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=errors, text=True, env=env, cwd=self.workdir
            )
            try:
                out, _ = process.communicate(timeout=timeout)
            finally:
                if process.poll() is None:  # timeout or Ctrl-C: never leave it behind
                    process.kill()
                    process.wait()
        for line in out.splitlines():
            if line.startswith(RESULT_PREFIX):
                result = dict(json.loads(line[len(RESULT_PREFIX) :]))
                result["child_s"] = time.monotonic() - started
                result.update(logged_failures(log_path))
                log(f"    ({spec['task']} child: {result['child_s']:.1f} s)")
                return result
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise RuntimeError(f"child {name} failed (exit {process.returncode}):\n{tail}")

    def ending_child(self, spec: dict[str, Any], timeout: float = 300.0) -> dict[str, Any]:
        """Run ``spec`` in a fresh interpreter and end it as ``spec["ending"]`` says, right after
        its result line (printed when its last hook returned): "exit" lets it exit on its own,
        "sigterm" sends it SIGTERM at once. Adds how long it took to die, its exit code and its
        journal folder to the result."""
        name = f"{spec['task']}-{spec.get('sink', '')}-{spec['ending']}-{uuid.uuid4().hex[:6]}"
        env = self._environment(name)
        log_path = self.logs / f"{name}.log"
        command = [sys.executable, "-m", "benchkit.child", json.dumps(spec)]
        result: dict[str, Any] | None = None
        with log_path.open("w", encoding="utf-8") as errors:
            process = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=errors, text=True, env=env, cwd=self.workdir
            )
            try:
                assert process.stdout is not None
                for line in process.stdout:
                    if line.startswith(RESULT_PREFIX):
                        if spec["ending"] == "sigterm":
                            process.send_signal(signal.SIGTERM)
                        elif spec["ending"] == "kill":
                            process.kill()
                        ended_at = time.monotonic()
                        result = dict(json.loads(line[len(RESULT_PREFIX) :]))
                        break
                process.communicate(timeout=timeout)
            finally:
                if process.poll() is None:  # timeout or Ctrl-C: never leave it behind
                    process.kill()
                    process.wait()
        if result is None:
            tail = log_path.read_text(encoding="utf-8", errors="replace")[-3000:]
            raise RuntimeError(f"child {name} failed (exit {process.returncode}):\n{tail}")
        result["exit_s"] = time.monotonic() - ended_at
        result["returncode"] = process.returncode
        result["journal_dir"] = str(self.journal_dir(name))
        result["log"] = log_path.name
        result.update(logged_failures(log_path))
        log(
            f"    ({spec['task']} child, {spec['ending']}: gone {result['exit_s']:.1f} s after "
            f"its last hook, exit code {process.returncode})"
        )
        return result

    def replay(
        self,
        journal_dir: str,
        uri: str | None = None,
        timeout: float = 300.0,
        *,
        watch: tuple[str, int] | None = None,
    ) -> dict[str, Any]:
        """``rlm-mlflow replay`` of one child's journal folder, to the server (or ``uri``).

        ``watch=(experiment, points)``: the server's store is read every half second while the
        replay runs, and ``points_landed_s`` says when it first held that many metric points
        of the experiment (None if it never did while the replay ran)."""
        env = self._environment("replay")
        command = [
            sys.executable,
            "-m",
            "rlm_mlflow",
            "replay",
            journal_dir,
            "--tracking-uri",
            uri or self.server_uri,
        ]
        started = time.monotonic()
        landed: float | None = None
        out_path = self.workdir / f"replay-{uuid.uuid4().hex[:6]}.out"
        # Into files, not pipes: nobody reads a pipe while the store is watched.
        with (
            out_path.open("w+", encoding="utf-8") as out,
            subprocess.Popen(
                command, stdout=out, stderr=subprocess.DEVNULL, env=env, cwd=self.workdir
            ) as process,
        ):
            try:
                while watch is not None and landed is None and process.poll() is None:
                    if time.monotonic() - started > timeout:
                        raise subprocess.TimeoutExpired(command, timeout)
                    if self._points(watch[0]) >= watch[1]:
                        landed = time.monotonic() - started
                    else:
                        time.sleep(0.5)
                process.wait(max(0.0, timeout - (time.monotonic() - started)))
            except subprocess.TimeoutExpired:
                process.kill()
                raise
            out.seek(0)
            stdout = out.read()
        seconds = time.monotonic() - started
        if watch is not None and landed is None and self._points(watch[0]) >= watch[1]:
            landed = seconds  # all there when it ended, not seen before
        report = {}
        for line in stdout.splitlines():
            key, _, value = line.partition("  ")
            if key and value.strip():
                report[key.strip()] = value.strip()
        return {
            "returncode": process.returncode,
            "seconds": seconds,
            "report": report,
            "points_landed_s": landed,
        }

    def _points(self, experiment: str) -> int:
        """The step and summary points of ``experiment`` the server's store holds now."""
        keys = (*STEP_KEYS, *SUMMARY_KEYS)
        db = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=60)
        try:
            row = db.execute(
                "SELECT COUNT(*) FROM metrics WHERE run_uuid IN (SELECT run_uuid FROM runs "
                "WHERE experiment_id = (SELECT experiment_id FROM experiments WHERE name = ?)) "
                f"AND key IN ({', '.join('?' * len(keys))})",
                (experiment, *keys),
            ).fetchone()
            return int(row[0])
        except sqlite3.OperationalError:  # not created yet, or busy: not there yet
            return 0
        finally:
            db.close()

    def run_workload(
        self,
        kind: str,
        workload: RlmWorkload,
        *,
        label: str,
        uri: str | None = None,
        options: dict[str, Any] | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """Sink ``kind`` through ``workload`` in a child; requests counted, data read back.

        ``uri`` defaults to the proxy; another ``uri`` (a closed port) is not read back.
        """
        experiment = self.experiment(f"{label}-{kind}")
        target = uri or self.uri
        before = self.proxy_requests
        spec = {
            "task": "workload",
            "sink": kind,
            "uri": target,
            "experiment": experiment,
            "workload": workload_spec(workload),
            "folder": str(self.folder(experiment)),
            "prefix": f"{label}-{kind}",
            "options": options or {},
            **extra,
        }
        result = self.child(spec)
        through_proxy = self.proxy is not None and target == self.proxy.uri
        result["requests"] = (
            self.proxy_requests - before if through_proxy else result["http_inproc"]
        )
        result["requests_counted_by"] = "proxy" if through_proxy else "in-process"
        result["workload"] = workload_spec(workload)
        if kind != "none" and uri is None:
            result["readback"] = self.read_back(experiment)
            points = result["readback"]["step_points"] + result["readback"]["summary_points"]
            result["points_per_s"] = points / result["to_data_s"] if result["to_data_s"] else 0.0
        return result

    # -- what reached MLflow --------------------------------------------------------------------

    def read_back(self, experiment: str) -> dict[str, Any]:
        """What reached MLflow, read from the server's sqlite store and artifact folder."""
        root = Path(self.server.root)
        empty = dict.fromkeys(
            ("runs", "finished", "nested", "step_points", "summary_points", "params", "artifacts"),
            0,
        )
        db = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=60)
        try:
            row = db.execute(
                "SELECT experiment_id FROM experiments WHERE name = ?", (experiment,)
            ).fetchone()
            if row is None:
                return empty
            exp_id = row[0]
            runs = "SELECT run_uuid FROM runs WHERE experiment_id = ?"

            def count(sql: str, *args: Any) -> int:
                return int(db.execute(sql, (exp_id, *args)).fetchone()[0])

            result = {
                "runs": count("SELECT COUNT(*) FROM runs WHERE experiment_id = ?"),
                "finished": count(
                    "SELECT COUNT(*) FROM runs WHERE experiment_id = ? AND status = 'FINISHED'"
                ),
                "nested": count(
                    f"SELECT COUNT(*) FROM tags WHERE run_uuid IN ({runs}) "
                    "AND key = 'mlflow.parentRunId'"
                ),
                "step_points": count(
                    f"SELECT COUNT(*) FROM metrics WHERE run_uuid IN ({runs}) AND key IN (?, ?)",
                    *STEP_KEYS,
                ),
                "summary_points": count(
                    f"SELECT COUNT(*) FROM metrics WHERE run_uuid IN ({runs}) AND key IN (?, ?, ?)",
                    *SUMMARY_KEYS,
                ),
                "params": count(f"SELECT COUNT(*) FROM params WHERE run_uuid IN ({runs})"),
            }
        finally:
            db.close()
        folder = root / "artifacts" / str(exp_id)
        result["artifacts"] = sum(1 for _ in folder.rglob("*.jsonl")) if folder.is_dir() else 0
        return result

    def read_traces(self, experiment: str, spans_per_trace: int) -> dict[str, Any]:
        """What ``MlflowClient.search_traces(locations=[experiment_id])`` finds of
        ``experiment``: see :func:`measure.summarize_traces` (the warm-up trace left out)."""
        from mlflow import MlflowClient

        client = MlflowClient(self.server_uri)
        found = client.get_experiment_by_name(experiment)
        if found is None:
            return summarize_traces([], spans_per_trace, WARM_UP)
        # A trace whose info is stored before its spans (MLflow's own tracing, exporting in the
        # background) is looked for in the artifact store, which this reader cannot reach:
        # read again until its spans are there, within a deadline.
        deadline = time.monotonic() + 60.0
        while True:
            try:
                traces: list[Any] = []
                token = None
                while True:
                    page = client.search_traces(
                        locations=[found.experiment_id], max_results=500, page_token=token
                    )
                    traces.extend(page)
                    token = page.token
                    if not token:
                        break
                return summarize_traces(traces, spans_per_trace, WARM_UP)
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)


def logged_failures(log_path: Path) -> dict[str, Any]:
    """Writes MLflow's async logging gave up on: it says so only in a log line."""
    text = log_path.read_text(encoding="utf-8", errors="replace")
    failures = [line for line in text.splitlines() if "Failed to log run data" in line]
    out: dict[str, Any] = {"logged_failures": len(failures)}
    if failures:
        out["failure_sample"] = failures[0].split("Failed to log run data: ")[-1][:160]
    # MLflow's trace export says it gave up (or dropped a task) only in a log line too.
    traces = [line for line in text.splitlines() if any(m in line for m in TRACE_FAILURES)]
    if traces:
        out["logged_trace_failures"] = len(traces)
        out["trace_failure_sample"] = traces[0][-200:]
    return out


TRACE_FAILURES = (
    "Failed to log spans",
    "Failed to export",
    "Failed to log trace",
    "trace will be discarded",
)


@contextlib.contextmanager
def server_and_proxy(workdir: Path) -> Iterator[tuple[Any, Any]]:
    """A local ``mlflow server`` (sqlite, one worker) and a pass-through FaultProxy before it."""
    from rlm_mlflow.testing import FaultProxy, local_server

    # The server's job runner (huey consumers) serves none of the sinks: keep its CPU out.
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    with local_server(workdir / "server") as server, FaultProxy(server.port) as proxy:
        yield server, proxy


# ---------------------------------------------------------------------------------------------
# How busy the machine was
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU-seconds the whole machine has been busy, and those this benchmark has used."""

    when: float
    machine: float
    ours: float


def cpu_snapshot() -> CpuSnapshot | None:
    """Busy CPU time from /proc/stat, and ours: this process, its reaped children, and every
    live descendant (the mlflow server and what it started). None where that cannot be read."""
    try:
        import psutil

        with open("/proc/stat", encoding="ascii") as stat:
            fields = [int(x) for x in stat.readline().split()[1:9]]
    except (ImportError, OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    machine = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    mine = os.times()
    ours = mine.user + mine.system + mine.children_user + mine.children_system
    for process in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            t = process.cpu_times()
            ours += t.user + t.system + t.children_user + t.children_system
    return CpuSnapshot(time.monotonic(), machine, ours)


@dataclass
class Machine:
    """The machine's state around a benchmark run, for the report's first paragraph."""

    cores: int
    load_before: tuple[float, float, float]
    cpu_before: CpuSnapshot | None
    load_after: tuple[float, float, float] | None = None
    cpu_after: CpuSnapshot | None = None

    @classmethod
    def now(cls) -> Machine:
        return cls(os.cpu_count() or 1, os.getloadavg(), cpu_snapshot())

    def finish(self) -> None:
        """Call while the server still runs: its CPU counts as ours."""
        self.cpu_after = cpu_snapshot()
        self.load_after = os.getloadavg()

    def describe(self) -> str:
        """Cores, load, and how much of the CPU other work took during the run."""
        text = f"{self.cores} cores, load average {self.load_before[0]:.2f} when the run began"
        start, end = self.cpu_before, self.cpu_after
        if start is None or end is None:
            after = self.load_after[0] if self.load_after else float("nan")
            text += f" and {after:.2f} at its end (1 min, this run included)"
            busy = self.load_before[0] > 0.5 * self.cores
        else:
            available = (end.when - start.when) * self.cores
            other = max(0.0, (end.machine - start.machine) - (end.ours - start.ours))
            share = other / available if available > 0 else 0.0
            busy = share > 0.15
            text += (
                f"; other processes used {share:.0%} of the machine's CPU during the run "
                f"({other:.0f} of {available:.0f} CPU-seconds; /proc/stat minus this "
                "benchmark's own processes), this benchmark "
                f"{(end.ours - start.ours) / available if available > 0 else 0.0:.0%}"
            )
        if busy:
            text += (
                ". The machine was busy with other work: timings are pessimistic and the tails "
                "(p99) carry scheduling noise"
            )
        return text

"""Shared pieces of the promise tests: deadlines, the accounting invariant, child agents, readers.

Every wait here is on a condition with a deadline; nothing sleeps to synchronise. Child agents
are plain scripts in ``tests/agents`` that use only the sink's public API and say on stdout when
they reach a point the test waits for.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

AGENTS = Path(__file__).with_name("agents")

#: A generous bound for waits that normally end within a second or two.
HTML_401 = (
    b"<html><head><title>401 Authorization Required</title></head>"
    b"<body><h1>401 Authorization Required</h1><hr><center>nginx</center></body></html>"
)
HTML_504 = (
    b"<html><head><title>504 Gateway Time-out</title></head>"
    b"<body><h1>504 Gateway Time-out</h1><hr><center>nginx</center></body></html>"
)
#: What a gateway in front of the server may answer a request with (``FaultProxy.set`` in mode
#: "http"): a login page, its page when the server times out, a redirect to a login host, a
#: body limit.
GATEWAY_ANSWERS: dict[str, dict[str, Any]] = {
    "401 login page": {"status": 401, "body": HTML_401},
    "504 gateway page": {"status": 504, "body": HTML_504},
    "302 to a login host": {"status": 302, "location": "https://login.example.com/sso"},
    "413 page": {
        "status": 413,
        "body": b"<html><body><h1>413 Request Entity Too Large</h1></body></html>",
    },
    "500 from MLflow": {
        "status": 500,
        "body": b'{"error_code": "INTERNAL_ERROR", "message": "(sqlite3.OperationalError)"}',
    },
}
WAIT = 60.0
#: Poll period inside deadline loops: the granularity of a wait, never a synchronisation.
POLL = 0.02


#: Extra patience asked for by the person running the tests (``RLM_MLFLOW_TEST_PATIENCE=3``).
_PATIENCE = float(os.environ.get("RLM_MLFLOW_TEST_PATIENCE") or 1.0)
#: How far the machine's load may stretch a deadline.
_MOST_STRETCH = 8.0


def patient(seconds: float) -> float:
    """A deadline for something expected to happen, stretched by how busy the machine is now.

    On an idle machine it is ``seconds``; with the load average at twice the cores it is twice
    that (at most 8x), so a test on a machine shared with other jobs waits longer instead of
    failing. Only for waits that end early when the thing happens, never for a deadline whose
    expiry is what a test checks (``close(1.0)`` giving up in time).
    """
    try:
        load = os.getloadavg()[0]
    except OSError:  # not on every platform
        load = 0.0
    stretch = min(_MOST_STRETCH, max(1.0, load / (os.cpu_count() or 1)))
    return seconds * stretch * _PATIENCE


def eventually(predicate: Callable[[], bool], timeout: float) -> bool:
    """Poll ``predicate`` until it holds (True) or ``timeout`` seconds pass (False); the
    timeout is stretched by the machine's load (:func:`patient`)."""
    deadline = time.monotonic() + patient(timeout)
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL)


def asleep_until_woken(sink: Any) -> bool:
    """Whether ``sink``'s worker sleeps and nothing will wake it but new events: no flush is
    left to serve (a flush asked after the worker had sent everything still wakes it once),
    and no wake is on its way. The worker clears the request after it wakes, before it
    sleeps again: read in this order, both hold only once it sleeps for good. A wake asked
    earlier may reach the worker only after it fell asleep (its loop's thread was busy): a
    worker that took a flush's events at its first cycle is still woken by that flush's
    wake, and would then take events meant for a later cycle."""
    worker = sink._worker
    wake = worker._wake
    return (
        not worker.flush_requested
        and bool(sink._pipeline.worker_asleep)
        and not worker.wake_flag
        and not (wake is not None and wake.is_set())
    )


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Like :func:`eventually`, but a missed deadline fails the test, saying what was awaited."""
    if not eventually(predicate, timeout):
        raise AssertionError(f"not within {timeout:g} s: {what}")


def span_label(span: Any) -> str:
    """A span's name; for a run's AGENT span (named after its task), its RLM run id."""
    if span.span_type == "AGENT":
        return str(span.attributes.get("rlm.run_id"))
    return str(span.name)


def assert_accounted(status: Mapping[str, Any]) -> None:
    """The accounting invariant: every accepted event is sent, deferred, dropped or pending."""
    dropped = sum(status["dropped"].values())
    fates = status["sent"] + status["deferred"] + dropped + status["pending"]
    assert status["accepted"] == fates, (
        f"accepted {status['accepted']} != sent {status['sent']} + deferred "
        f"{status['deferred']} + dropped {dropped} + pending {status['pending']}: {status}"
    )


def journal_folders(journal_dir: Path) -> list[Path]:
    """The journals (one folder per sink) under a journal directory; none if it does not exist."""
    if not journal_dir.exists():
        return []
    return sorted(p for p in journal_dir.iterdir() if p.is_dir())


def replay_cli(
    directory: Path,
    *,
    tracking_uri: str | None = None,
    retry_deadline: float | None = None,
    timeout: float = 120.0,
) -> subprocess.CompletedProcess[str]:
    """Run ``rlm-mlflow replay`` in a process of its own and return how it ended."""
    command = [sys.executable, "-m", "rlm_mlflow", "replay", str(directory)]
    if tracking_uri is not None:
        command += ["--tracking-uri", tracking_uri]
    if retry_deadline is not None:
        command += ["--retry-deadline", str(retry_deadline)]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env=child_env(), check=False
    )


def child_env(**extra: str) -> dict[str, str]:
    """The test's environment (its journal directory included) for a child process."""
    env = dict(os.environ)
    env.update(
        PYTHONUNBUFFERED="1",
        MLFLOW_DISABLE_TELEMETRY="true",
        MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT="true",
    )
    env.update(extra)
    return env


class Agent:
    """A script of ``tests/agents`` in a child process; its stdout is read line by line, each
    read bounded by a deadline, its stderr kept in a file for failure messages."""

    def __init__(
        self,
        script: str,
        *args: str,
        log: Path,
        env: Mapping[str, str] | None = None,
        stdin: bool = False,
    ) -> None:
        self.log = log
        self._stderr = log.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, str(AGENTS / script), *args],
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=child_env(**(env or {})),
        )
        assert self.process.stdout is not None
        self._fd = self.process.stdout.fileno()
        os.set_blocking(self._fd, False)
        self._partial = b""
        self._unread: deque[str] = deque()
        self._eof = False
        self.lines: list[str] = []  # every line read so far, in order

    @property
    def pid(self) -> int:
        return self.process.pid

    def stderr(self) -> str:
        self._stderr.flush()
        return self.log.read_text(encoding="utf-8", errors="replace")

    def _fill(self, timeout: float) -> None:
        """Read what stdout has within ``timeout`` seconds (or until end of file)."""
        if self._eof:
            return
        with selectors.DefaultSelector() as selector:
            selector.register(self._fd, selectors.EVENT_READ)
            if not selector.select(max(0.0, timeout)):
                return
        try:
            data = os.read(self._fd, 1 << 16)
        except BlockingIOError:
            return
        if not data:
            self._eof = True
            if self._partial:
                self._push(self._partial)
                self._partial = b""
            return
        *complete, self._partial = (self._partial + data).split(b"\n")
        for raw in complete:
            self._push(raw)

    def _push(self, raw: bytes) -> None:
        line = raw.decode("utf-8", errors="replace").rstrip("\r")
        self._unread.append(line)
        self.lines.append(line)

    def next_line(self, timeout: float) -> str | None:
        """The next line of stdout; None at end of file; an AssertionError at the deadline
        (stretched by the machine's load)."""
        timeout = patient(timeout)
        deadline = time.monotonic() + timeout
        while not self._unread:
            if self._eof:
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"agent said nothing for {timeout:g} s; stderr:\n{self.stderr()[-3000:]}"
                )
            self._fill(left)
        return self._unread.popleft()

    @property
    def caught_up(self) -> bool:
        """Every line the agent wrote so far has been read (as far as the pipe shows now)."""
        if self._unread:
            return False
        self._fill(0.0)
        return not self._unread

    def drain(self, timeout: float) -> list[str]:
        """The lines available within ``timeout`` seconds (maybe none), without failing."""
        if not self._unread:
            self._fill(timeout)
        out = list(self._unread)
        self._unread.clear()
        return out

    @property
    def ended_output(self) -> bool:
        """stdout reached its end (the process closed it, or died)."""
        return self._eof and not self._unread

    def expect(self, prefix: str, timeout: float = WAIT) -> str:
        """Read lines until one starts with ``prefix`` (the readiness line), within ``timeout``
        (stretched by the machine's load)."""
        timeout = patient(timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.next_line(max(0.0, deadline - time.monotonic()))
            except AssertionError:
                raise AssertionError(
                    f"agent never said {prefix!r} within {timeout:g} s; said {self.lines[-5:]}; "
                    f"stderr:\n{self.stderr()[-3000:]}"
                ) from None
            if line is None:
                raise AssertionError(
                    f"agent ended (code {self.process.poll()}) without saying {prefix!r}; "
                    f"said {self.lines[-5:]}; stderr:\n{self.stderr()[-3000:]}"
                )
            if line.startswith(prefix):
                return line

    def rest(self, timeout: float = WAIT) -> list[str]:
        """Every line still to come, up to end of file (the process ended or was killed)."""
        out: list[str] = []
        while (line := self.next_line(timeout)) is not None:
            out.append(line)
        return out

    def send(self, line: str) -> None:
        stdin = self.process.stdin
        assert stdin is not None
        stdin.write(line.encode() + b"\n")
        stdin.flush()

    def signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, signum)

    def kill9(self) -> None:
        """SIGKILL, and reap."""
        self.signal(signal.SIGKILL)
        self.process.wait(WAIT)

    def wait(self, timeout: float) -> int:
        """The exit code (negative: the signal that killed it); a failure if it is still running
        after ``timeout`` seconds, stretched by the machine's load (it is then killed, so
        nothing outlives the test)."""
        timeout = patient(timeout)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.dump_stacks()
            self.kill9()
            raise AssertionError(
                f"agent still running after {timeout:g} s; said {self.lines[-5:]}; "
                f"stderr:\n{self.stderr()[-6000:]}"
            ) from None

    def dump_stacks(self) -> None:
        """A hung agent's threads, where they are, into its stderr (agents that import
        ``agentkit`` dump them on SIGUSR2)."""
        if self.process.poll() is not None:
            return
        before = len(self.stderr())
        self.signal(signal.SIGUSR2)
        eventually(lambda: "most recent call first" in self.stderr()[before:], 5.0)

    def close(self) -> None:
        if self.process.poll() is None:
            self.kill9()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        self._stderr.close()


class Store:
    """Read what a tracking store holds, straight from it (never through a fault proxy)."""

    def __init__(self, uri: str) -> None:
        from mlflow import MlflowClient

        self.uri = uri
        self.client: Any = MlflowClient(tracking_uri=uri)

    def experiment_id(self, name: str) -> str | None:
        found = self.client.get_experiment_by_name(name)
        return None if found is None else str(found.experiment_id)

    def runs(
        self, experiment: str, *, include_deleted: bool = False, missing_ok: bool = False
    ) -> list[Any]:
        """Every run of the experiment (active ones only, unless ``include_deleted``); an
        experiment that was never created fails the test, unless ``missing_ok`` (no runs)."""
        from mlflow.entities import ViewType

        experiment_id = self.experiment_id(experiment)
        if experiment_id is None and missing_ok:
            return []
        assert experiment_id is not None, f"experiment {experiment!r} was never created"
        view = ViewType.ALL if include_deleted else ViewType.ACTIVE_ONLY
        return list(self.client.search_runs([experiment_id], run_view_type=view, max_results=5000))

    def by_name(self, experiment: str, *, missing_ok: bool = False) -> dict[str, Any]:
        """Active runs keyed by RLM run id (their ``run_id`` tag; a run the sink did not make
        by its name); two active runs of one id fail the test."""
        out: dict[str, Any] = {}
        for run in self.runs(experiment, missing_ok=missing_ok):
            name = run.data.tags.get("run_id", run.info.run_name)
            assert name not in out, f"two active runs named {name!r} in {experiment!r}"
            out[name] = run
        return out

    def run(self, experiment: str, name: str) -> Any:
        runs = self.by_name(experiment)
        assert name in runs, f"no run {name!r} in {experiment!r}; runs: {sorted(runs)}"
        return runs[name]

    def points(self, run: Any, key: str = "step_reward") -> list[tuple[int, float]]:
        """Every stored point of a metric, duplicates included, ordered by step."""
        history = self.client.get_metric_history(run.info.run_id, key)
        return sorted((p.step, p.value) for p in history)

    def steps(self, run: Any, key: str = "step_reward") -> list[int]:
        return [step for step, _ in self.points(run, key)]


def assert_each_once(steps: list[int], expected: Iterable[int]) -> None:
    """``steps`` (sorted, duplicates kept) holds every expected step exactly once."""
    counts = Counter(steps)
    duplicates = sorted(step for step, seen in counts.items() if seen > 1)
    assert not duplicates, f"steps stored more than once: {duplicates[:20]}"
    missing = sorted(set(expected) - set(counts))
    assert not missing, f"{len(missing)} steps never landed: {missing[:20]}"


def thread_count_of(pid: int) -> int:
    """Threads of a process, from /proc."""
    return len(os.listdir(f"/proc/{pid}/task"))


def start(sink: Any, run_id: str, **params: Any) -> None:
    sink.on_run_start(run_id, task="a task", environment="pure_rlm", params=params)


def steps(sink: Any, run_id: str, numbers: range) -> None:
    for i in numbers:
        sink.on_step(run_id, event={"step": i, "reward": 1.0}, cumulative_reward=float(i + 1))


def end(sink: Any, run_id: str, count: int) -> None:
    result = {"completed": True, "steps": count, "total_reward": float(count)}
    sink.on_run_end(run_id, result=result, run_path=None)


def close_within(sink: Any, timeout: float) -> None:
    """``close(timeout)`` on a thread of its own; it must return by its deadline (+ slack)."""
    closer = threading.Thread(target=sink.close, args=(timeout,), name="closer")
    closer.start()
    closer.join(timeout + patient(10.0))
    assert not closer.is_alive(), f"close({timeout}) did not return"

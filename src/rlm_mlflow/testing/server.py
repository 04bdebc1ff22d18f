"""A real ``mlflow server`` on a free loopback port, for integration tests and benchmarks.

``local_server()`` starts it with its data under a folder of the caller's, waits until it answers
``/health`` and stops it, with every child process, however the ``with`` block ends; it stops
as well when the process that started it is gone (killed before it could stop it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MlflowServer", "free_port", "local_server", "wait_healthy"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class MlflowServer:
    """A running ``mlflow server``: its URI, its data folder and its process."""

    uri: str
    port: int
    root: Path
    process: subprocess.Popen[bytes]
    backend_store_uri: str

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        """Stop the server and every process it started."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)  # orphaned workers, if any

    @property
    def sqlite_path(self) -> Path | None:
        """The sqlite file behind the server, when its backend store is one."""
        prefix = "sqlite:///"
        if self.backend_store_uri.startswith(prefix):
            return Path(self.backend_store_uri[len(prefix) :])
        return None

    def restart(self, timeout: float = 60.0, *, fresh: bool = False) -> None:
        """Stop the server and start it again on the same port (a deploy).

        ``fresh``: on an empty sqlite database and artifact store, as a server redeployed
        without its volume would be; every experiment and run it held is gone.
        """
        self.stop()
        if fresh:
            database = self.sqlite_path
            if database is None:
                raise ValueError("fresh=True needs a sqlite backend store")
            for suffix in ("", "-journal", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    Path(f"{database}{suffix}").unlink()
            shutil.rmtree(self.root / "artifacts", ignore_errors=True)
        self.process = _spawn(self.root, self.port, self.backend_store_uri, workers=1)
        wait_healthy(self.uri, timeout, self.process)


def _spawn(
    root: Path, port: int, backend_store_uri: str, *, workers: int
) -> subprocess.Popen[bytes]:
    artifacts = root / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # The job runner (huey consumers) serves no sink: its processes only take CPU.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    # The server prices LLM spans with litellm, which otherwise fetches its price list from the
    # network on each trace request (and waits for it to fail where there is no network).
    env.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    env.pop("MLFLOW_TRACKING_URI", None)
    log = (root / "server.log").open("ab")
    # Under a lifeline: the server (and the uvicorn it starts) stops when this process is gone,
    # also when it is killed before it could stop it.
    lifeline = [sys.executable, "-m", "rlm_mlflow.testing._lifeline", str(os.getpid()), "--"]
    command = [
        *lifeline,
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        backend_store_uri,
        "--artifacts-destination",
        str(artifacts),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]
    return subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=root
    )


def wait_healthy(uri: str, timeout: float, process: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until ``GET /health`` answers OK, or raise with the reason."""
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"mlflow server exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"mlflow server at {uri} not healthy after {timeout:.0f} s")
        time.sleep(0.1)  # polling a child process that has no readiness signal


@contextlib.contextmanager
def local_server(
    root: Path,
    *,
    port: int | None = None,
    backend_store_uri: str | None = None,
    workers: int = 1,
    timeout: float = 90.0,
) -> Iterator[MlflowServer]:
    """Run ``mlflow server`` on 127.0.0.1 with its data under ``root``; stop it on exit."""
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    backend = backend_store_uri or f"sqlite:///{root / 'mlflow.db'}"
    process = _spawn(root, port, backend, workers=workers)
    server = MlflowServer(f"http://127.0.0.1:{port}", port, root, process, backend)
    try:
        wait_healthy(server.uri, timeout, process)
        yield server
    finally:
        server.stop()

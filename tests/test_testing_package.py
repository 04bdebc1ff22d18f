"""``rlm_mlflow.testing``: the memory transport on import, the server launcher and the fault
proxy (and what they bring: subprocess, asyncio, HTTP clients) only when asked for."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

import rlm_mlflow
import rlm_mlflow.testing
from promises_support import child_env

#: The folder ``rlm_mlflow`` is imported from here, so the child imports the same package.
SOURCE = Path(rlm_mlflow.__file__).resolve().parents[1]

#: What the server launcher and the fault proxy need, and a unit test of a sink does not.
HEAVY = [
    "rlm_mlflow.testing.server",
    "rlm_mlflow.testing.faultproxy",
    "subprocess",
    "asyncio",
    "http.client",
    "http.server",
    "socketserver",
    "urllib.request",
    "mlflow",
]

PROGRAM = textwrap.dedent(
    """
    import json, sys
    heavy = json.loads(sys.argv[1])
    seen = {}
    before = set(sys.modules)
    import rlm_mlflow.testing
    seen["import"] = sorted(set(heavy) & (set(sys.modules) - before))
    rlm_mlflow.testing.MemoryTransport()
    seen["memory"] = sorted(set(heavy) & (set(sys.modules) - before))
    rlm_mlflow.testing.FaultProxy
    seen["proxy"] = sorted(set(heavy) & (set(sys.modules) - before))
    from rlm_mlflow.testing import local_server
    seen["server"] = sorted(set(heavy) & (set(sys.modules) - before))
    print(json.dumps(seen))
    """
)


def run_child() -> dict[str, Any]:
    path = os.pathsep.join(p for p in (str(SOURCE), os.environ.get("PYTHONPATH")) if p)
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM, json.dumps(HEAVY)],
        env=child_env(PYTHONPATH=path),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    seen: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return seen


def test_importing_the_package_loads_only_the_memory_transport() -> None:
    """A fresh interpreter imports ``rlm_mlflow.testing`` and uses ``MemoryTransport``: neither
    the server launcher nor the fault proxy, nor subprocess, asyncio, an HTTP client or mlflow,
    is imported. Each part is imported by its first use."""
    seen = run_child()
    assert seen["import"] == []
    assert seen["memory"] == []
    assert "rlm_mlflow.testing.faultproxy" in seen["proxy"]
    assert "rlm_mlflow.testing.server" not in seen["proxy"]
    assert "mlflow" not in seen["proxy"]
    assert "rlm_mlflow.testing.server" in seen["server"]
    assert "mlflow" not in seen["server"]


def test_every_public_name_is_importable_from_the_package() -> None:
    """Each name of ``__all__`` is the object of the module it lives in; others are refused."""
    from rlm_mlflow.testing import faultproxy, memory, server

    assert rlm_mlflow.testing.FaultProxy is faultproxy.FaultProxy
    assert rlm_mlflow.testing.local_server is server.local_server
    assert rlm_mlflow.testing.MemoryTransport is memory.MemoryTransport
    for name in rlm_mlflow.testing.__all__:
        assert getattr(rlm_mlflow.testing, name) is not None, name
        assert name in dir(rlm_mlflow.testing), name
    with pytest.raises(AttributeError, match="no_such_helper"):
        _ = rlm_mlflow.testing.no_such_helper


SERVER_OWNER = textwrap.dedent(
    """
    import json, signal, sys
    from rlm_mlflow.testing import local_server
    with local_server(sys.argv[1]) as server:
        print(json.dumps({"group": server.process.pid, "uri": server.uri}), flush=True)
        while True:
            signal.pause()
    """
)


def group_members(group: int) -> set[int]:
    """The live (not zombie) processes of a process group, read from ``/proc``."""
    members = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while being read
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            members.add(int(stat.parent.name))
    return members


@pytest.mark.integration
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_server_stops_when_the_process_that_started_it_is_killed(
    sig: signal.Signals, tmp_path: Path
) -> None:
    """A test run killed before its fixtures' teardown (CI's timeout, a developer's kill) leaves
    no ``mlflow server`` behind: neither the server's command nor the uvicorn it starts."""
    owner = subprocess.Popen(
        [sys.executable, "-c", SERVER_OWNER, str(tmp_path / "server")],
        env=child_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    group = 0
    try:
        assert owner.stdout is not None
        line = owner.stdout.readline()
        assert line, "the server never started"
        started = json.loads(line)
        group = started["group"]
        members = group_members(group)
        assert len(members) >= 2, members  # mlflow's command and the uvicorn it starts
        with urllib.request.urlopen(f"{started['uri']}/health", timeout=10) as answer:
            assert answer.status == 200
        owner.send_signal(sig)
        assert owner.wait(30) == -sig
        deadline = time.monotonic() + 60
        while group_members(group) and time.monotonic() < deadline:
            time.sleep(0.2)  # waiting for processes that have no other signal of their end
        assert not group_members(group), "the server outlived the process that started it"
        with pytest.raises(urllib.error.URLError, match="refused"):
            urllib.request.urlopen(f"{started['uri']}/health", timeout=5)
    finally:
        owner.kill()
        owner.wait()
        if group:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)

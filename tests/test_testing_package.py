"""``rlm_mlflow.testing``: the memory transport on import, the server launcher and the fault
proxy (and what they bring: subprocess, asyncio, HTTP clients) only when asked for."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
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

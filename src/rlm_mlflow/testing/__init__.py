"""Helpers for testing code that uses the sink.

- :class:`MemoryTransport` stands in for MLflow in fast unit tests: no network, no server, no
  mlflow import. Pass it as ``MLflowSink(transport=...)`` and read back what was sent
  (:class:`MemoryRun`). :func:`wait_for` waits on a condition with a deadline.
- :func:`local_server` runs a real ``mlflow server`` on a free loopback port
  (:class:`MlflowServer`) and stops it, with every child process, afterwards; :func:`free_port`
  finds a port nobody listens on.
- :class:`FaultProxy` sits between a client and a server and refuses, resets, stalls or answers
  errors on demand.

Importing this package loads only the memory transport. The server launcher and the fault proxy,
which bring subprocess, asyncio and HTTP client modules with them, are loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .memory import MemoryRun, MemoryTransport, wait_for

if TYPE_CHECKING:
    from .faultproxy import FaultProxy
    from .server import MlflowServer, free_port, local_server
    from .server import wait_healthy as wait_healthy  # public, outside the short list

__all__ = [
    "FaultProxy",
    "MemoryRun",
    "MemoryTransport",
    "MlflowServer",
    "free_port",
    "local_server",
    "wait_for",
]

#: Names loaded on first access, and the module of this package each one lives in.
_LAZY = {
    "FaultProxy": "faultproxy",
    "MlflowServer": "server",
    "free_port": "server",
    "local_server": "server",
    "wait_healthy": "server",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups find it without coming here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})

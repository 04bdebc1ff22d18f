"""``rlm-mlflow run -- COMMAND [ARGS...]``: run a command with rlm-mlflow's sink inside RLM Code.

Like ``opentelemetry-instrument`` or ``ddtrace-run``: the command replaces this process (same
pid, and its exit status is the status), with the folder of a small ``sitecustomize`` first on
``PYTHONPATH``. Every Python process it starts, and theirs in turn, runs that ``sitecustomize``
at start-up: see ``_bootstrap/sitecustomize.py`` and :mod:`rlm_mlflow._rlm_code`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

#: The folder whose ``sitecustomize`` installs the import hook.
BOOTSTRAP = Path(__file__).resolve().parent / "_bootstrap"


def launcher_environment(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with the bootstrap folder first on ``PYTHONPATH`` (once).

    Every other entry is kept as it was, empty ones included: Python reads an empty entry as the
    working directory, and programs that import from there rely on it."""
    result = dict(env)
    folder = str(BOOTSTRAP)
    given = result.get("PYTHONPATH", "")
    entries = [p for p in given.split(os.pathsep) if p != folder] if given else []
    result["PYTHONPATH"] = os.pathsep.join([folder, *entries])
    return result


def check_configuration(env: Mapping[str, str]) -> list[str]:
    """Notes for the user about the sink the command will get; empty when all is well."""
    from ._config import config_from_env, parse_bool, why_disabled

    notes: list[str] = []
    try:
        config = config_from_env(env)
    except ValueError as exc:
        return [f"configuration error: {exc}; RLM Code will use its own MLflow sink"]
    if not config.enabled:
        notes.append(
            f"the sink is off ({why_disabled(env)}): RLM Code's runs are not sent to MLflow"
        )
    if not parse_bool(env.get("DSPY_RLM_OBS_ENABLED"), default=True):
        notes.append("DSPY_RLM_OBS_ENABLED is false: RLM Code builds no sinks at all")
    return notes


def run(command: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    """Replace this process with ``command``; return only if it cannot be started."""
    args = list(command)
    if args and args[0] == "--":
        args = args[1:]
    if not args:
        print("rlm-mlflow run: no command given", file=sys.stderr)
        print("usage: rlm-mlflow run -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    base = os.environ if env is None else env
    for note in check_configuration(base):
        print(f"rlm-mlflow run: {note}", file=sys.stderr)
    child = launcher_environment(base)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvpe(args[0], args, child)
    except FileNotFoundError:
        print(f"rlm-mlflow run: {args[0]}: command not found", file=sys.stderr)
        return 127
    except OSError as exc:
        print(f"rlm-mlflow run: {args[0]}: cannot run: {exc.strerror or exc}", file=sys.stderr)
        return 126

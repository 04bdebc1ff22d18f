"""A program that uses RLM Code the way its CLI, TUI and MCP server do, knowing nothing of us.

Usage: rlm_code_default.py RUN_DIR EXIT_STATUS

It builds RLM Code's real ``RLMRunner`` without an ``observability`` argument, so the runner
builds its sinks itself with ``RLMObservability.default()`` from the environment, and runs one
task whose root delegates two children in parallel, the first of which delegates a grandchild
(4 runs). The model and the code execution engine are scripted, so it runs offline. It never
imports rlm_mlflow and never closes a sink: the program just ends, with ``EXIT_STATUS``. Only
the run ids are made unique (see :func:`unique_run_ids`).

Its last line on stdout is a JSON object: which MLflow sinks the runner got (name, module,
class), whether rlm_mlflow had been imported before RLM Code was, and the root run's id.
"""

from __future__ import annotations

import json
import re
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any


class ScriptedModel:
    """``root``: code, then children A and B at once, then final. ``child A``: delegates a
    ``leaf``, then final. The others: code, then final."""

    current_model = "scripted"

    def generate_response(
        self, prompt: str, system_prompt: str | None = None, context: Any = None
    ) -> str:
        task = re.search(r"Task: (.*)", prompt)
        step = re.search(r"Step: (\d+)", prompt)
        assert task is not None
        assert step is not None
        kind = task.group(1).split(" of ", 1)[0].split(":", 1)[0]
        number = int(step.group(1))
        plan: dict[str, Any] = {"action": "run_python", "code": "print(1)", "done": False}
        if kind == "root" and number == 2:
            children = [f"child A of {task.group(1)}", f"child B of {task.group(1)}"]
            plan = {"action": "delegate_batch", "tasks": children}
        elif kind == "child A" and number == 1:
            plan = {"action": "delegate", "task": f"leaf of {task.group(1)}"}
        elif number >= 3 or (kind == "leaf" and number >= 2):
            plan = {"action": "final", "done": True, "final_response": "done"}
        return json.dumps(plan)


class FakeExecutionEngine:
    """RLM Code's execution engine interface: validates and 'runs' code instantly."""

    def __init__(self) -> None:
        sandbox = SimpleNamespace(
            runtime="local",
            default_timeout_seconds=5,
            pure_rlm_backend="exec",
            pure_rlm_allow_unsafe_exec=True,
            pure_rlm_strict=False,
            pure_rlm_output_mode="summarize",
            pure_rlm_max_iteration_output_chars=4000,
            monty_type_check=False,
            monty_max_allocations=None,
            monty_max_memory=None,
            docker=SimpleNamespace(
                image="python:3.11-slim", network_enabled=False, memory_limit_mb=512, cpus=1.0
            ),
        )
        self.config_manager = SimpleNamespace(config=SimpleNamespace(sandbox=sandbox))

    def validate_code(self, code: str) -> Any:
        return SimpleNamespace(is_valid=True, errors=[], warnings=[])

    def execute_code(self, code: str, timeout: int = 30) -> Any:
        return SimpleNamespace(success=True, stdout="ok", stderr="", execution_time=0.01)


def unique_run_ids(runner: Any) -> None:
    """RLM Code's run ids are microsecond timestamps: two children started in the same
    microsecond would share one. The test compares runs by id, so ask again for a new one."""
    original = runner._new_run_id
    seen: set[str] = set()
    lock = threading.Lock()

    def new_run_id() -> str:
        with lock:
            while (run_id := original()) in seen:
                pass
            seen.add(run_id)
            return str(run_id)

    runner._new_run_id = staticmethod(new_run_id)


def main() -> int:
    run_dir, status = Path(sys.argv[1]), int(sys.argv[2])
    imported_before = "rlm_mlflow" in sys.modules
    from rlm_code.rlm.runner import RLMRunner

    unique_run_ids(RLMRunner)
    workdir = run_dir.parent / "work"  # empty: delegated tasks get no context snippets
    workdir.mkdir(parents=True, exist_ok=True)
    runner = RLMRunner(
        llm_connector=ScriptedModel(),
        execution_engine=FakeExecutionEngine(),
        run_dir=run_dir,
        workdir=workdir,
    )
    result = runner.run_task("root: split the work", max_steps=5, environment="generic")
    sinks = [
        {"name": s.name, "module": type(s).__module__, "class": type(s).__name__}
        for s in runner.observability.sinks
        if "mlflow" in s.name.lower() or "mlflow" in type(s).__module__.lower()
    ]
    report = {"sinks": sinks, "imported_before": imported_before, "root": result.run_id}
    sys.stdout.write(json.dumps(report) + "\n")
    sys.stdout.flush()
    return status


if __name__ == "__main__":
    sys.exit(main())

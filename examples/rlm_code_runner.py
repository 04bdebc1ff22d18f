"""RLM Code's own ``RLMRunner`` sending its runs to MLflow through rlm-mlflow.

From the checkout, with ``.venv`` made by ``bash scripts/demo`` (or ``python3.11 -m venv .venv &&
.venv/bin/pip install '.[full]'``):

    .venv/bin/pip install rlm-code
    export DSPY_RLM_MLFLOW_ENABLED=true MLFLOW_TRACKING_URI=http://127.0.0.1:5000
    .venv/bin/python examples/rlm_code_runner.py                     # a scripted planner, offline
    .venv/bin/python examples/rlm_code_runner.py --model openai/gpt-4o-mini   # OPENAI_API_KEY
    # the runner built as RLM Code's CLI builds it, our sink put in by the launcher:
    .venv/bin/rlm-mlflow run -- .venv/bin/python examples/rlm_code_runner.py --default-observability

The code runs for real, in RLM Code's own local sandbox (``ExecutionEngine``). With the scripted
planner the root run delegates two sub-tasks, which RLM Code runs in parallel as child runs: MLflow
shows them nested under the root, each with its reward curve and its trajectory file.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from pathlib import Path
from typing import Any

from rlm_code.execution import ExecutionEngine
from rlm_code.rlm.observability import RLMObservability
from rlm_code.rlm.runner import RLMRunner

from rlm_mlflow import MLflowSink


class ScriptedPlanner:
    """Stands in for the LLM: answers the planner prompt with a fixed plan, no network needed."""

    current_model = "scripted-planner"

    def generate_response(
        self, prompt: str, system_prompt: str | None = None, context: Any = None
    ) -> str:
        found = re.search(r"Step: (\d+)", prompt)
        step = int(found.group(1)) if found else 1
        child = "(part " in prompt
        if step == 1:
            action = {"action": "run_python", "code": "print(sum(range(10)))", "done": False}
        elif step == 2 and not child:
            parts = [f"Check the sum of range({n}) (part {n})" for n in (1, 2)]
            action = {"action": "delegate_batch", "tasks": parts}
        else:
            action = {"action": "final", "done": True, "final_response": "45"}
        return json.dumps(action)


def real_model(name: str) -> Any:
    """A real RLM Code model connection, e.g. ``openai/gpt-4o-mini`` or ``ollama/llama3``."""
    from rlm_code.core.config import ConfigManager
    from rlm_code.models.llm_connector import LLMConnector

    connector = LLMConnector(ConfigManager())
    connector.connect_to_model(name)
    return connector


def main(model: str, run_dir: Path, default_observability: bool) -> None:
    connector = ScriptedPlanner() if model == "scripted" else real_model(model)
    if default_observability:
        # As RLM Code's CLI, TUI and MCP server do: the runner builds its sinks from the
        # environment (RLMObservability.default()). Under 'rlm-mlflow run', that is our sink.
        runner = RLMRunner(
            llm_connector=connector, execution_engine=ExecutionEngine(), run_dir=run_dir
        )
    else:
        runner = RLMRunner(
            llm_connector=connector,
            execution_engine=ExecutionEngine(),
            run_dir=run_dir,
            observability=RLMObservability(sinks=[MLflowSink.from_env()]),  # <- the line
        )
    sink = runner.observability.get_sink("mlflow")
    result = runner.run_task("Sum the numbers below 10", max_steps=4, environment="generic")
    print(f"run {result.run_id}: completed={result.completed} reward={result.total_reward}")
    print(f"trajectories in {run_dir}")
    print(f"MLflow sink: {type(sink).__module__}.{type(sink).__name__}")
    if isinstance(sink, MLflowSink):
        sink.close()  # optional: the sink also closes itself when the program exits
        print(sink.status())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="scripted", help="provider/model, or 'scripted'")
    parser.add_argument(
        "--run-dir", type=Path, default=None, help="trajectory files (default: a new temp folder)"
    )
    parser.add_argument(
        "--default-observability",
        action="store_true",
        help="let RLM Code build its sinks, as its CLI does (run it under 'rlm-mlflow run')",
    )
    args = parser.parse_args()
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="rlm-mlflow-example-")) / "runs"
    main(args.model, run_dir, args.default_observability)

"""RLM Code's own ``run_benchmark``, as its CLI runs it, knowing nothing of us.

Usage: rlm_code_benchmark.py RUN_DIR PACK

Builds RLM Code's real ``RLMRunner`` without an ``observability`` argument (its sinks come from
the environment) with the scripted model and engine of ``rlm_code_default.py``, and runs the
preset ``mini`` of the benchmark pack ``PACK`` natively. Prints the result's summary path.
"""

from __future__ import annotations

import sys
from pathlib import Path

from rlm_code_default import FakeExecutionEngine, ScriptedModel, unique_run_ids


def main() -> None:
    run_dir, pack = Path(sys.argv[1]), sys.argv[2]
    from rlm_code.rlm.runner import RLMRunner

    unique_run_ids(RLMRunner)
    workdir = run_dir.parent / "work"
    workdir.mkdir(parents=True, exist_ok=True)
    runner = RLMRunner(
        llm_connector=ScriptedModel(),
        execution_engine=FakeExecutionEngine(),
        run_dir=run_dir,
        workdir=workdir,
    )
    result = runner.run_benchmark(preset="mini", mode="native", pack_paths=[pack], max_steps=5)
    sys.stdout.write(f"SUMMARY {result.summary_path} {result.completed_cases}\n")


if __name__ == "__main__":
    main()

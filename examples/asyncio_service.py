"""An asyncio service that runs many agents as tasks, all sending to MLflow through one sink.

    pip install rlm-mlflow
    export DSPY_RLM_MLFLOW_ENABLED=true
    export MLFLOW_TRACKING_URI=http://127.0.0.1:5000     # unset: ./mlflow.db, no server needed
    python examples/asyncio_service.py --agents 20

``async with`` runs the sink's worker as a task of this event loop: MLflow's blocking calls go to
worker threads, so the loop is never blocked, and leaving the block sends what is queued (within
``shutdown_timeout``) and ends every run. The hooks are plain, non-blocking calls: call them from
any task, any thread.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

from agents import report, run_agent
from rlm_mlflow import MLflowSink


async def main(agents: int, run_dir: Path, think: float) -> bool:
    run_dir.mkdir(parents=True, exist_ok=True)
    # One sink for the whole service; its worker is a task of this event loop.
    async with MLflowSink.from_env() as sink, asyncio.TaskGroup() as group:
        for n in range(agents):
            group.create_task(
                run_agent(sink, f"agent-{n}", f"task {n}", run_dir=run_dir, think=think)
            )
    # Leaving the block sent what was queued and ended every run.
    print(f"trajectories in {run_dir}")
    return report(sink)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=8, help="agents to run at once")
    parser.add_argument(
        "--run-dir", type=Path, default=None, help="trajectory files (default: a new temp folder)"
    )
    parser.add_argument("--think", type=float, default=0.02, help="most seconds a step thinks")
    args = parser.parse_args()
    args.run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="rlm-mlflow-runs-"))
    raise SystemExit(0 if asyncio.run(main(args.agents, args.run_dir, args.think)) else 1)

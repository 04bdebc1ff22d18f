"""The asyncio service again, under trio: many agents in a nursery, sharing one sink.

    pip install rlm-mlflow trio
    export DSPY_RLM_MLFLOW_ENABLED=true
    export MLFLOW_TRACKING_URI=http://127.0.0.1:5000
    python examples/trio_service.py --agents 20

The sink is built on anyio, so ``async with`` runs its worker in trio's loop just as in asyncio's.
"""

from __future__ import annotations

import argparse
import tempfile
from functools import partial
from pathlib import Path

import trio

from agents import report, run_agent
from rlm_mlflow import MLflowSink


async def main(agents: int, run_dir: Path, think: float) -> bool:
    run_dir.mkdir(parents=True, exist_ok=True)
    async with MLflowSink.from_env() as sink, trio.open_nursery() as nursery:
        for n in range(agents):
            agent = partial(run_agent, run_dir=run_dir, think=think)
            nursery.start_soon(agent, sink, f"agent-{n}", f"task {n}")
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
    raise SystemExit(0 if trio.run(main, args.agents, args.run_dir, args.think) else 1)

"""A simulated RLM agent, shared by the examples: it calls the sink's hooks as RLM Code does.

The agent is a coroutine written with anyio, so the same code runs under asyncio and trio. Each
step "thinks" (sleeps, so that the other agents run meanwhile), picks a reward, writes the step
to its trajectory file and calls ``on_step``. At step 1 a root agent delegates two sub-tasks,
which run as tasks of their own at the same time, each a child run under its parent. At the end
it calls ``on_run_end`` with the trajectory file, which MLflow keeps as the run's artifact.

Replace this with your agent: the three hook calls are all the sink needs.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import anyio

from rlm_mlflow import MLflowSink


@dataclass
class Result:
    """What RLM Code's runner hands to ``on_run_end``; the sink reads these three fields."""

    completed: bool
    steps: int
    total_reward: float


async def run_agent(
    sink: MLflowSink,
    run_id: str,
    task: str,
    *,
    run_dir: Path,
    steps: int = 6,
    children: int = 2,
    think: float = 0.01,
    depth: int = 0,
    parent: str | None = None,
) -> Result:
    """Run one simulated agent (and its children), reporting every step to ``sink``."""
    rng = random.Random(run_id)
    sink.on_run_start(
        run_id,
        task=task,
        environment="pure_rlm",
        params={"max_steps": steps, "depth": depth, "parent_run_id": parent, "model": "simulated"},
    )
    total = 0.0
    path = run_dir / f"{run_id}.jsonl"
    with path.open("w", encoding="utf-8") as trajectory:
        for step in range(steps):
            await anyio.sleep(rng.uniform(0, think))  # the model thinking: other agents run now
            if step == 1 and depth == 0 and children:
                results = await delegate(sink, run_id, task, children, run_dir=run_dir, think=think)
                action = "delegate"
                reward = round(sum(r.total_reward for r in results) / children, 3)
            else:
                action = "code"
                reward = round(rng.uniform(-0.2, 1.0), 3)
            total += reward
            event = {
                "type": "step",
                "run_id": run_id,
                "step": step,
                "action": {"action": action},
                "reward": reward,
                "depth": depth,
                "parent_run_id": parent,
            }
            trajectory.write(json.dumps(event) + "\n")
            sink.on_step(run_id, event=event, cumulative_reward=total)
    result = Result(completed=total > 0, steps=steps, total_reward=round(total, 3))
    sink.on_run_end(run_id, result=result, run_path=path)
    return result


async def delegate(
    sink: MLflowSink, run_id: str, task: str, children: int, *, run_dir: Path, think: float
) -> list[Result]:
    """Run ``children`` sub-tasks at once, each a child run of ``run_id``."""
    results: list[Result] = []

    async def child(i: int) -> None:
        part = f"{task} (part {i + 1})"
        results.append(
            await run_agent(
                sink,
                f"{run_id}.{i}",
                part,
                run_dir=run_dir,
                steps=3,
                think=think,
                depth=1,
                parent=run_id,
            )
        )

    async with anyio.create_task_group() as group:
        for i in range(children):
            group.start_soon(child, i)
    return results


def report(sink: MLflowSink) -> bool:
    """Print what the sink did; True if everything it accepted reached MLflow."""
    status = sink.status()
    if not status["enabled"]:
        print("the sink is off: set DSPY_RLM_MLFLOW_ENABLED=true to send runs to MLflow")
        return True
    print(
        f"runs {status['runs_created']} created / {status['runs_ended']} ended, "
        f"events {status['sent']} sent / {status['accepted']} accepted, "
        f"{status['deferred']} kept for 'rlm-mlflow replay', "
        f"dropped {status['dropped'] or 'none'}, {status['requests']} requests "
        f"to {status['detail']} (experiment {status['experiment']})"
    )
    return status["pending"] == 0 and not status["dropped"]

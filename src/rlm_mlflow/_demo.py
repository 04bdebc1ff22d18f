"""A simulated RLM benchmark driven through the sink, the way RLM Code's runner calls it.

Several tasks run at once on a thread pool; some steps delegate to recursive child runs, which run
in parallel on the pool or nested on the parent's own thread; every run writes a trajectory file.
With ``MLFLOW_TRACKING_URI`` unset, everything lands in MLflow's embedded default store
(``./mlflow.db``), so no server is needed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shlex
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ._sink import MLflowSink

ENVIRONMENTS = ("pure_rlm", "generic", "dspy")
TASKS = (
    "Sum the prime numbers below 10,000 and explain the method.",
    "Find the longest palindromic substring of a 2,000-character string.",
    "Summarise a 40-page design document into five bullet points.",
    "Write and test a function that parses ISO-8601 durations.",
    "Locate the bug in a recursive descent parser and patch it.",
    "Plan a three-step data migration with rollback.",
)


@dataclass
class RunResult:
    """What RLM Code's runner hands to ``on_run_end``."""

    run_id: str
    run_path: Path
    completed: bool
    steps: int
    total_reward: float
    final_response: str = ""
    usage_summary: dict[str, int] = field(default_factory=dict)


FAILURE = (
    "Traceback (most recent call last):\n"
    '  File "<repl>", line 4, in <module>\n'
    "ZeroDivisionError: division by zero\n"
)


def sample_code(task: str, step: int, success: bool) -> tuple[str, str, str]:
    """A few lines of Python a model might write for a step, why, and what running it printed."""
    size = 1000 + (len(task) * 37 + step * 101) % 9000
    code = (
        f"# step {step}: {task[:40]}\n"
        f"data = list(range({size}))\n"
        "chunks = [data[i : i + 100] for i in range(0, len(data), 100)]\n"
        f"ratio = sum(map(len, chunks)) / {0 if not success else len(task)}\n"
        "print(len(chunks), ratio)\n"
    )
    rationale = f"measure the input before answering ({size} items)"
    stdout = f"{(size + 99) // 100} {size / max(1, len(task)):.3f}\n" if success else ""
    return code, rationale, stdout


_ids = threading.Lock()
_last_id = [""]


def new_run_id() -> str:
    """``run_%Y%m%d_%H%M%S_%f``, like RLM Code; unique within this process."""
    with _ids:
        while True:
            run_id = datetime.now(UTC).strftime("run_%Y%m%d_%H%M%S_%f")
            if run_id != _last_id[0]:
                _last_id[0] = run_id
                return run_id


class SimulatedRunner:
    """Just enough of an RLM runner to exercise every path of a sink."""

    def __init__(self, sink: Any, run_dir: Path, pool: ThreadPoolExecutor, seed: int) -> None:
        self.sink = sink
        self.run_dir = run_dir
        self.pool = pool
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.runs: list[RunResult] = []

    def _rand(self) -> float:
        with self.lock:
            return self.random.random()

    def run(
        self,
        task: str,
        *,
        depth: int = 0,
        parent: str | None = None,
        max_steps: int = 6,
        parallelism: int = 2,
        step_delay: float = 0.01,
    ) -> RunResult:
        run_id = new_run_id()
        environment = ENVIRONMENTS[len(task) % len(ENVIRONMENTS)]
        params: dict[str, Any] = {
            "max_steps": max_steps,
            "exec_timeout": 30,
            "branch_width": 1,
            "framework": "native",
            "sub_model": "demo-small",
            "sub_provider": "simulated",
            "max_depth": 2,
            "effective_max_depth": 2,
            "depth": depth,
            "parallelism": parallelism,
            "max_children_per_step": 2,
            "parent_run_id": parent,
            "pure_rlm_backend": "exec",
            "pure_rlm_strict": False,
            "context_files": ["README.md"],
            "context_profile": {"budget": 4096},
            "pure_rlm_profile": "default",
        }
        self.sink.on_run_start(run_id, task=task, environment=environment, params=params)
        path = self.run_dir / f"{run_id}.jsonl"
        total = 0.0
        steps = 0
        used = {"prompt_tokens": 0, "completion_tokens": 0, "total_calls": 0}
        with path.open("w", encoding="utf-8") as trajectory:
            for step in range(max_steps):
                time.sleep(step_delay)  # the model thinking
                delegate = depth < 2 and step == 1 and self._rand() < 0.7
                observation: dict[str, Any]
                if delegate:
                    subtasks = [f"{task} (part {i + 1})" for i in range(2)]
                    if parallelism > 1:
                        futures = [
                            self.pool.submit(
                                self.run,
                                sub,
                                depth=depth + 1,
                                parent=run_id,
                                max_steps=3,
                                parallelism=1,
                            )
                            for sub in subtasks
                        ]
                        children = [f.result() for f in futures]
                    else:  # nested on this thread, while this run is still open
                        children = [
                            self.run(
                                sub, depth=depth + 1, parent=run_id, max_steps=3, parallelism=1
                            )
                            for sub in subtasks
                        ]
                    observation = {
                        "success": all(c.completed for c in children),
                        "children": len(children),
                        "completed": sum(c.completed for c in children),
                    }
                    reward = 0.5 * sum(c.completed for c in children)
                    code, rationale = "", f"split the task into {len(subtasks)} sub-tasks"
                else:
                    success = self._rand() < 0.8
                    code, rationale, stdout = sample_code(task, step, success)
                    began = time.perf_counter()
                    time.sleep(step_delay / 2)  # the code running, timed as a runtime times it
                    observation = {
                        "success": success,
                        "stdout": stdout,
                        "stderr": "" if success else FAILURE,
                        "execution_time": round(time.perf_counter() - began, 4),
                    }
                    reward = round(self._rand(), 3) if success else -0.1
                # What the model connector counted during the step: the step's own call, and
                # (RLM Code measures on a connector its children share) the children's calls.
                usage = {
                    "prompt_tokens": 600 + int(self._rand() * 400),
                    "completion_tokens": 80 + int(self._rand() * 120),
                    "total_calls": 1,
                }
                if delegate:
                    for child in children:
                        for key in usage:
                            usage[key] += child.usage_summary.get(key, 0)
                for key in used:
                    used[key] += usage[key]
                total += reward
                steps += 1
                event = {
                    "type": "step",
                    "run_id": run_id,
                    "environment": environment,
                    "timestamp": datetime.now(UTC).isoformat(),
                    "step": step,
                    "action": {
                        "action": "delegate" if delegate else "run_python",
                        **({"code": code} if code else {}),
                        "rationale": rationale,
                    },
                    "depth": depth,
                    "parent_run_id": parent,
                    "observation": observation,
                    "reward": reward,
                    "usage": usage,
                }
                trajectory.write(json.dumps(event) + "\n")
                self.sink.on_step(run_id, event=event, cumulative_reward=total)
                if total > 3.0:
                    break
        result = RunResult(
            run_id,
            path,
            completed=total > 0,
            steps=steps,
            total_reward=round(total, 3),
            final_response=f"Answer to '{task}': see the last step's output." if total > 0 else "",
            usage_summary=used,
        )
        self.sink.on_run_end(run_id, result=result, run_path=path)
        with self.lock:
            self.runs.append(result)
        return result


def run_demo(
    *,
    tasks: int = 6,
    experiment: str = "rlm-mlflow-demo",
    tracking_uri: str | None = None,
    workdir: Path | None = None,
    seed: int = 7,
) -> dict[str, Any]:
    """Run the simulated benchmark through an :class:`MLflowSink`; return what happened."""
    workdir = Path(workdir or Path.cwd()).resolve()
    run_dir = workdir / "demo-output" / "runs"
    run_dir.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{workdir}/mlflow.db"
    hook_ns: list[int] = []

    sink = MLflowSink(enabled=True, experiment=experiment, tracking_uri=uri)
    timed = _TimedSink(sink, hook_ns)
    started = time.perf_counter()
    # Children get a pool of their own: roots blocked on children queued behind other roots
    # in one shared pool would wait for each other forever.
    with sink, ThreadPoolExecutor(4) as pool, ThreadPoolExecutor(4) as children:
        runner = SimulatedRunner(timed, run_dir, children, seed)
        roots = [
            pool.submit(runner.run, TASKS[i % len(TASKS)], parallelism=1 if i % 3 == 2 else 2)
            for i in range(tasks)
        ]
        for root in roots:
            root.result()
        agent_seconds = time.perf_counter() - started
        flushed = sink.flush(60)
    hook_ns.sort()
    return {
        "uri": uri,
        "experiment": experiment,
        "runs": len(runner.runs),
        "roots": tasks,
        "steps": sum(r.steps for r in runner.runs),
        "agent_seconds": agent_seconds,
        "total_seconds": time.perf_counter() - started,
        "flushed": flushed,
        "hook_p50_us": hook_ns[len(hook_ns) // 2] / 1000 if hook_ns else 0.0,
        "hook_p99_us": hook_ns[int(len(hook_ns) * 0.99)] / 1000 if hook_ns else 0.0,
        "status": sink.status(),
        "experiment_id": experiment_id(uri, experiment),
    }


class _TimedSink:
    """Forwards hooks to the sink and records how long each call kept the agent."""

    def __init__(self, sink: MLflowSink, durations: list[int]) -> None:
        self._sink = sink
        self._durations = durations

    def on_run_start(self, run_id: str, **kwargs: Any) -> None:
        t = time.perf_counter_ns()
        self._sink.on_run_start(run_id, **kwargs)
        self._durations.append(time.perf_counter_ns() - t)

    def on_step(self, run_id: str, **kwargs: Any) -> None:
        t = time.perf_counter_ns()
        self._sink.on_step(run_id, **kwargs)
        self._durations.append(time.perf_counter_ns() - t)

    def on_run_end(self, run_id: str, **kwargs: Any) -> None:
        t = time.perf_counter_ns()
        self._sink.on_run_end(run_id, **kwargs)
        self._durations.append(time.perf_counter_ns() - t)


def print_report(report: dict[str, Any]) -> None:
    status = report["status"]
    print(
        f"Simulated RLM benchmark: {report['roots']} tasks, {report['runs']} runs "
        f"(recursive children included), {report['steps']} steps"
    )
    print(f"  agent wall time        {report['agent_seconds']:.2f} s")
    print(
        f"  hook time p50 / p99    {report['hook_p50_us']:.1f} us / {report['hook_p99_us']:.1f} us"
    )
    print(
        f"  events sent / accepted {status['sent']} / {status['accepted']}"
        f"  (dropped: {status['dropped'] or 'none'})"
    )
    print(f"  MLflow requests        {status['requests']}")
    print(f"  runs created / ended   {status['runs_created']} / {status['runs_ended']}")
    print(f"  all data in MLflow     {'yes' if report['flushed'] else 'NO'}")
    print(f"  experiment             {report['experiment']} at {status['detail']}")
    uri = report["uri"]
    print()
    served = uri.startswith(("http://", "https://"))
    port = UI_PORT if served else ui_port()
    links = ui_links(uri, report.get("experiment_id"), port)
    if served:
        print("See them in MLflow's UI:")
    elif importlib.util.find_spec("flask") is None:
        print("MLflow's UI needs the full mlflow package, which this install leaves out:")
        print("  pip install mlflow   (from rlm-mlflow's checkout: pip install '.[full]')")
        print("then start it on this store (Ctrl-C stops it)")
        print(f"  {mlflow_command()} ui --backend-store-uri {shlex.quote(uri)} --port {port}")
        print("and open")
    else:
        print("See them in MLflow's UI: start it on this store (Ctrl-C stops it)")
        print(f"  {mlflow_command()} ui --backend-store-uri {shlex.quote(uri)} --port {port}")
        print("then open")
    print(f"  the runs, nested, with reward curves:  {links['runs']}")
    print(f"  the traces, one per task:              {links['traces']}")
    print("A run page opens under GenAI > Evaluation runs until MLflow's toggle at the top left")
    print("is switched to Model training once (the browser keeps that; the link's does not).")


def mlflow_command() -> str:
    """The ``mlflow`` program of this Python, as a command that works wherever it is typed."""
    script = Path(sys.executable).with_name("mlflow")
    if script.is_file():
        return shlex.quote(str(script))
    return f"{shlex.quote(sys.executable)} -m mlflow"


#: The port the demo suggests for ``mlflow ui`` on its store: not 5000, which the docs give a
#: tracking server (two servers on one port: the second never starts).
UI_PORT = 5001


def ui_port() -> int:
    """:data:`UI_PORT`, or the next port free on this machine when something listens there."""
    for port in range(UI_PORT, UI_PORT + 50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.settimeout(0.2)
            if probe.connect_ex(("127.0.0.1", port)) != 0:
                return port
    return UI_PORT


def ui_links(uri: str, experiment_id: str | None, port: int = UI_PORT) -> dict[str, str]:
    """MLflow 3's UI pages of an experiment: its runs (the "model training" view, where runs
    nest) and its traces. The UI of an embedded store is the one ``mlflow ui`` serves."""
    served = uri.startswith(("http://", "https://"))
    base = uri.rstrip("/") if served else f"http://127.0.0.1:{port}"
    if experiment_id is None:
        return {"runs": f"{base}/#/experiments", "traces": f"{base}/#/experiments"}
    page = f"{base}/#/experiments/{experiment_id}"
    return {"runs": f"{page}/runs?workflowType=machine_learning", "traces": f"{page}/traces"}


def experiment_id(uri: str, name: str) -> str | None:
    """The id of experiment ``name`` in the store at ``uri``; None if it cannot be read."""
    try:
        from mlflow import MlflowClient

        found = MlflowClient(tracking_uri=uri).get_experiment_by_name(name)
    except Exception:
        return None
    return None if found is None else str(found.experiment_id)

"""Workloads describe the hook calls an agent makes; drivers replay them through any sink.

A workload is data: for each top-level run it yields a script of :class:`Call` objects (the hook,
its arguments, and the agent's own work before it). A driver replays scripts through a sink on a
number of agent threads and times every hook call with ``perf_counter_ns``. Any object with the
three hooks is a sink here (``rlm_mlflow.MLflowSink``, the baselines in ``baselines.py``), so a new
workload (a trace workload with large step payloads, say) only has to describe its events.

Scripts are generators: events are built lazily, between hook calls and outside the timed region,
as an agent builds them. Nothing here imports mlflow or rlm_mlflow.
"""

from __future__ import annotations

import itertools
import json
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

HOOKS = ("on_run_start", "on_step", "on_run_end")
STEP_KEYS = ("step_reward", "cumulative_reward")
SUMMARY_KEYS = ("completed", "steps", "total_reward")
TASK = "Write a function that returns the n-th prime, then test it on n = 1..50. " * 4
#: Logged params per run: RLM Code's 15 keys plus environment and task_chars.
PARAMS_PER_RUN = 17


@dataclass(frozen=True, slots=True)
class Call:
    """One hook call: ``getattr(sink, hook)(run_id, **kwargs)``.

    ``think_s`` is the agent's own work before the call (slept, as an LLM call would be);
    ``at_s``, when set, paces the call: not before that many seconds after its script began.
    """

    hook: str
    run_id: str
    kwargs: Mapping[str, Any]
    think_s: float = 0.0
    at_s: float | None = None


@dataclass(frozen=True)
class RunResult:
    """What RLM Code passes as ``result`` to ``on_run_end``."""

    completed: bool
    steps: int
    total_reward: float


@dataclass(frozen=True)
class Expected:
    """What a workload should leave in MLflow, to compare with what was read back."""

    runs: int
    step_points: int
    summary_points: int
    nested: int
    artifacts: int

    @property
    def points(self) -> int:
        return self.step_points + self.summary_points


class Workload(Protocol):
    """What a driver needs from a workload."""

    kind: ClassVar[str]

    @property
    def threads(self) -> int:
        """Agent threads the driver runs the scripts on."""
        ...

    def scripts(self, folder: Path, prefix: str) -> list[Iterator[Call]]:
        """One script per top-level run; the driver spreads them over ``threads`` threads."""
        ...

    def expected(self) -> Expected: ...

    def describe(self) -> str: ...


def plural(n: int, noun: str) -> str:
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}s"


def rlm_params(parent: str | None, depth: int, steps: int) -> dict[str, Any]:
    """The params RLM Code's runner passes to ``on_run_start`` (15 keys)."""
    return {
        "max_steps": steps,
        "exec_timeout": 60,
        "branch_width": 1,
        "framework": "native",
        "model": "gpt-4o",
        "sub_model": "gpt-4o-mini",
        "sub_provider": "openai",
        "max_depth": 2,
        "effective_max_depth": 2,
        "depth": depth,
        "parallelism": 1,
        "max_children_per_step": 2,
        "parent_run_id": parent,
        "pure_rlm_backend": "exec",
        "pure_rlm_strict": False,
    }


def start_call(run_id: str, parent: str | None = None, steps: int = 10) -> Call:
    params = rlm_params(parent, 0 if parent is None else 1, steps)
    return Call("on_run_start", run_id, {"task": TASK, "environment": "pure_rlm", "params": params})


def step_call(run_id: str, step: int, reward: float, cumulative: float, **extra: Any) -> Call:
    event = {"step": step, "reward": reward, "action": "run_python", **extra}
    return Call("on_step", run_id, {"event": event, "cumulative_reward": cumulative})


def end_call(run_id: str, result: RunResult, run_path: Path | None) -> Call:
    return Call("on_run_end", run_id, {"result": result, "run_path": run_path})


@dataclass(frozen=True)
class RlmWorkload:
    """RLM Code's runner, simulated: ``runs`` parent runs of ``steps`` steps on ``threads`` agent
    threads; half way through each parent, a nested child run of ``child_steps`` steps is started
    and ended on the parent's thread while the parent is open (a recursive sub-task).

    ``think_ms`` is the agent's work before each step; ``steps_per_s`` paces each run instead
    (0: as fast as the hooks allow). ``interleave`` merges all runs into one script, round robin,
    for a single producer thread. ``artifacts`` writes each run's trajectory file and passes it to
    ``on_run_end``.
    """

    kind: ClassVar[str] = "rlm"
    runs: int
    threads: int
    steps: int
    child_steps: int = 0
    think_ms: float = 0.0
    steps_per_s: float = 0.0
    interleave: bool = False
    artifacts: bool = True

    @property
    def total_runs(self) -> int:
        return self.runs * (2 if self.child_steps else 1)

    @property
    def total_steps(self) -> int:
        return self.runs * (self.steps + self.child_steps)

    def expected(self) -> Expected:
        return Expected(
            runs=self.total_runs,
            step_points=len(STEP_KEYS) * self.total_steps,
            summary_points=len(SUMMARY_KEYS) * self.total_runs,
            nested=self.runs if self.child_steps else 0,
            artifacts=self.total_runs if self.artifacts else 0,
        )

    def describe(self) -> str:
        child = (
            f", each with a nested child run of {self.child_steps} steps"
            if self.child_steps
            else ""
        )
        if self.steps_per_s:
            pace = f"{self.steps_per_s:g} steps/s per run"
        elif self.think_ms:
            pace = f"{self.think_ms:g} ms agent work per step"
        else:
            pace = "no agent work between steps"
        where = (
            "interleaved on 1 thread" if self.interleave else f"on {plural(self.threads, 'thread')}"
        )
        return (
            f"{plural(self.runs, 'run')} x {plural(self.steps, 'step')}{child} {where}, {pace} "
            f"({self.total_steps:,} steps, {self.expected().points:,} metric points, "
            f"{plural(self.total_runs, 'run')})"
        )

    def scripts(self, folder: Path, prefix: str) -> list[Iterator[Call]]:
        if self.artifacts:
            folder.mkdir(parents=True, exist_ok=True)
        scripts = [
            self._run(f"{prefix}-{index:04d}", None, self.steps, self.child_steps, folder)
            for index in range(self.runs)
        ]
        return [round_robin(scripts)] if self.interleave else scripts

    def _run(
        self, run_id: str, parent: str | None, steps: int, child_steps: int, folder: Path
    ) -> Iterator[Call]:
        yield start_call(run_id, parent, steps)
        think = self.think_ms / 1000.0
        child_at = steps // 2 if child_steps else -1
        trajectory: list[str] = []
        cumulative = 0.0
        for step in range(1, steps + 1):
            reward = ((step * 7) % 11) / 10.0
            cumulative += reward
            call = step_call(run_id, step, reward, cumulative, done=step == steps)
            if think:
                call = Call(call.hook, run_id, call.kwargs, think_s=think)
            elif self.steps_per_s:
                call = Call(call.hook, run_id, call.kwargs, at_s=step / self.steps_per_s)
            yield call
            if self.artifacts:
                trajectory.append(json.dumps(call.kwargs["event"]))
            if step == child_at:
                yield from self._run(f"{run_id}.sub1", run_id, child_steps, 0, folder)
        path = None
        if self.artifacts:
            path = folder / f"{run_id}.jsonl"
            path.write_text("\n".join(trajectory) + "\n", encoding="utf-8")
        yield end_call(run_id, RunResult(True, steps, cumulative), path)


def round_robin(scripts: Iterable[Iterator[Call]]) -> Iterator[Call]:
    """One call from each script in turn, until all are done."""
    live = list(scripts)
    while live:
        still = []
        for script in live:
            call = next(script, None)
            if call is not None:
                yield call
                still.append(script)
        live = still


WORKLOADS: dict[str, type[RlmWorkload]] = {RlmWorkload.kind: RlmWorkload}


def workload_spec(workload: RlmWorkload) -> dict[str, Any]:
    """A JSON form of ``workload`` that :func:`workload_from_spec` turns back into it."""
    return {"kind": workload.kind, **asdict(workload)}


def workload_from_spec(spec: Mapping[str, Any]) -> RlmWorkload:
    fields = dict(spec)
    return WORKLOADS[fields.pop("kind", "rlm")](**fields)


# ---------------------------------------------------------------------------------------------
# Drivers
# ---------------------------------------------------------------------------------------------


@dataclass
class Timings:
    """Nanoseconds spent inside each hook call, by hook."""

    ns: dict[str, list[int]] = field(default_factory=lambda: {hook: [] for hook in HOOKS})

    def extend(self, other: Timings) -> None:
        for hook, values in other.ns.items():
            self.ns.setdefault(hook, []).extend(values)

    def all(self) -> list[int]:
        return list(itertools.chain.from_iterable(self.ns.values()))


def replay(
    sink: Any,
    calls: Iterable[Call],
    timings: Timings | None = None,
    on_call: Callable[[Call], None] | None = None,
) -> None:
    """Make each call on ``sink``, in order; time it into ``timings`` when given.

    Only the hook call itself is inside the timer: building the event, the agent's work and
    pacing are not. ``on_call`` runs after each call (progress counters, checkpoints).
    """
    pc = time.perf_counter_ns
    begin = time.monotonic()
    ns = timings.ns if timings is not None else None
    for call in calls:
        if call.think_s:
            time.sleep(call.think_s)
        elif call.at_s is not None:
            delay = begin + call.at_s - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        hook = getattr(sink, call.hook)
        kwargs = call.kwargs
        t0 = pc()
        hook(call.run_id, **kwargs)
        elapsed = pc() - t0
        if ns is not None:
            ns[call.hook].append(elapsed)
        if on_call is not None:
            on_call(call)


@dataclass
class Progress:
    """Step calls made so far, one counter per agent thread (each written by its own thread)."""

    counts: list[int]

    @property
    def steps(self) -> int:
        return sum(self.counts)


def drive(
    sink: Any,
    workload: Workload,
    folder: Path,
    prefix: str,
    progress: Progress | None = None,
) -> Timings:
    """Replay ``workload`` through ``sink`` on its agent threads; every hook call timed.

    The threads start together (a barrier) and take the next run's script when one is done.
    An exception in an agent thread is raised here once every thread has stopped.
    """
    scripts = iter(workload.scripts(folder, prefix))
    threads = max(1, workload.threads)
    take = threading.Lock()
    barrier = threading.Barrier(threads)
    per_thread = [Timings() for _ in range(threads)]
    errors: list[BaseException] = []
    if progress is not None:
        progress.counts[:] = [0] * threads

    def agent(index: int) -> None:
        def count(call: Call) -> None:
            if call.hook == "on_step":
                progress.counts[index] += 1  # type: ignore[union-attr]

        try:
            barrier.wait()
            while True:
                with take:
                    script = next(scripts, None)
                if script is None:
                    return
                replay(sink, script, per_thread[index], count if progress is not None else None)
        except BaseException as exc:  # re-raised by the driver
            errors.append(exc)
            barrier.abort()

    pool = [threading.Thread(target=agent, args=(i,), name=f"agent-{i}") for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    if errors:
        raise errors[0]
    merged = Timings()
    for timings in per_thread:
        merged.extend(timings)
    return merged


def steps_for(duration_s: float, steps_per_s: float) -> int:
    """Steps a paced run needs to last ``duration_s``."""
    return max(1, math.ceil(duration_s * steps_per_s))

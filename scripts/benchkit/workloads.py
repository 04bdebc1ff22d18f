"""Workloads describe the hook calls an agent makes; drivers replay them through any sink.

A workload is data: for each top-level run it yields a script of :class:`Call` objects (the hook,
its arguments, and the agent's own work before it). A driver replays scripts through a sink on a
number of agent threads and times every hook call with ``perf_counter_ns``. Any object with the
three hooks is a sink here (``rlm_mlflow.MLflowSink``, the baselines in ``baselines.py``), so a
workload only has to describe its events: :class:`RlmWorkload` (plain steps, for metrics) and
:class:`TraceWorkload` (RLM Code's rich step events, for traces).

Scripts are generators: events are built lazily, between hook calls and outside the timed region,
as an agent builds them. Nothing here imports mlflow or rlm_mlflow.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import random
import threading
import time
import zlib
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

HOOKS = ("on_run_start", "on_step", "on_run_end")
#: The run id of the untimed run that starts a sink's worker before the timed hooks.
WARM_UP = "warm-up"
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


# ---------------------------------------------------------------------------------------------
# Rich step events, for traces
# ---------------------------------------------------------------------------------------------

RATIONALE = (
    "The helper returned the wrong count for the last window, so I will print the intermediate "
    "table, check the boundary case by hand and only then rewrite the accumulation step. "
)

TRACEBACK = "Traceback (most recent call last):\nZeroDivisionError: division by zero\n"


def code_text(run_id: str, step: int, chars: int) -> str:
    """Python source of ``chars`` characters, different for every run and step (the bulk is
    made once per step and size: building an event costs the agent thread little CPU)."""
    header = f"# {run_id}, step {step}: count primes in sliding windows\n"
    return (header + _code_body(step, chars))[:chars]


@functools.lru_cache(maxsize=256)
def _code_body(step: int, chars: int) -> str:
    lines = [
        "import math",
        "",
        "def is_prime(n: int) -> bool:",
        "    if n < 2:",
        "        return False",
        "    return all(n % d for d in range(2, math.isqrt(n) + 1))",
        "",
    ]
    size = sum(len(line) + 1 for line in lines)
    index = 0
    while size < chars:
        line = (
            f"window_{index} = [n for n in range({step * 100 + index * 37}, "
            f"{step * 100 + index * 37 + 50}) if is_prime(n)]; print({index}, len(window_{index}))"
        )
        lines.append(line)
        size += len(line) + 1
        index += 1
    return "\n".join(lines)[:chars]


def stdout_text(run_id: str, step: int, chars: int) -> str:
    """Printed output of ``chars`` characters, different for every run and step and as
    compressible as real printed output (the same text twice would flatter a sender that
    compresses). The bulk is made once per step and size; each run permutes its digits."""
    return _stdout_body(step, chars).translate(_digit_table(run_id)).decode("ascii")


@functools.lru_cache(maxsize=256)
def _stdout_body(step: int, chars: int) -> bytes:
    base = step * 1_000
    lines = [
        f"window {i:4d}: {(base + i * 37) % 11} primes in [{base + i * 37}, {base + i * 37 + 50})"
        for i in range(chars // 30 + 1)
    ]
    return ("\n".join(lines) + "\n")[:chars].encode("ascii")


@functools.lru_cache(maxsize=1024)
def _digit_table(run_id: str) -> bytes:
    digits = list(b"0123456789")
    random.Random(zlib.crc32(run_id.encode())).shuffle(digits)
    table = bytearray(range(256))
    for digit, replacement in zip(b"0123456789", digits, strict=True):
        table[digit] = replacement
    return bytes(table)


def step_tokens(step: int, depth: int) -> tuple[int, int]:
    """Prompt and completion tokens of one model call: a prompt that grows with the run."""
    return 900 + 120 * step + 300 * depth, 160 + (step * 37) % 240


@dataclass(frozen=True)
class TraceWorkload:
    """RLM Code's runner with the step events it really sends, for traces.

    ``runs`` root runs of ``steps`` steps on ``threads`` agent threads. Every step but the
    delegating ones wrote code: ``action`` holds ``code`` (``code_chars`` characters) and a
    rationale, ``observation`` ``stdout`` (``stdout_chars``), ``stderr``, ``success`` and
    ``execution_time``; each step has ``usage`` (prompt and completion tokens, calls) and
    ``depth``. ``delegations`` steps per root run, evenly spaced, delegate: their ``children``
    child runs of ``child_steps`` such steps start and end on the parent's thread first, then
    the delegating step is reported, its usage counting the children's, as RLM Code does.
    ``think_ms`` is the agent's work before each step (slept).

    As traces, a root run is one trace: its span, a span per step, and under each delegating
    step a model span (the step's own tokens) and each child run's span with its steps' spans.
    """

    kind: ClassVar[str] = "trace"
    runs: int
    threads: int
    steps: int
    delegations: int = 1
    children: int = 2
    child_steps: int = 3
    think_ms: float = 0.0
    code_chars: int = 2_000
    stdout_chars: int = 8_000

    @property
    def delegating(self) -> int:
        """Delegating steps per root run."""
        return len(self.delegating_steps())

    @property
    def total_runs(self) -> int:
        return self.runs * (1 + self.delegating * self.children)

    @property
    def total_steps(self) -> int:
        return self.runs * (self.steps + self.delegating * self.children * self.child_steps)

    @property
    def spans_per_trace(self) -> int:
        child = 1 + self.child_steps  # its span and its steps'
        return 1 + self.steps + self.delegating * (1 + self.children * child)

    @property
    def spans(self) -> int:
        return self.runs * self.spans_per_trace

    def delegating_steps(self) -> list[int]:
        """The root run's steps that delegate, evenly spaced, never the first."""
        count = min(self.delegations, max(0, self.steps - 1))
        return sorted({max(2, (i + 1) * self.steps // (count + 1)) for i in range(count)})

    def expected(self) -> Expected:
        return Expected(
            runs=self.total_runs,
            step_points=len(STEP_KEYS) * self.total_steps,
            summary_points=len(SUMMARY_KEYS) * self.total_runs,
            nested=self.runs * self.delegating * self.children,
            artifacts=0,
        )

    def describe(self) -> str:
        pace = f"{self.think_ms:g} ms agent work per step" if self.think_ms else "no agent work"
        return (
            f"{plural(self.runs, 'root run')} x {plural(self.steps, 'step')} on "
            f"{plural(self.threads, 'thread')}, {self.delegating} delegating step(s) per root "
            f"run with {plural(self.children, 'child run')} of {plural(self.child_steps, 'step')} "
            f"each, {pace} ({self.total_steps:,} step events, {plural(self.spans, 'span')} in "
            f"{plural(self.runs, 'trace')})"
        )

    def scripts(self, folder: Path, prefix: str) -> list[Iterator[Call]]:
        return [self._root(f"{prefix}-{index:04d}") for index in range(self.runs)]

    def _root(self, run_id: str) -> Iterator[Call]:
        yield self._start(run_id, None, self.steps)
        delegating = set(self.delegating_steps())
        cumulative = 0.0
        for step in range(1, self.steps + 1):
            reward = ((step * 7) % 11) / 10.0
            cumulative += reward
            if step not in delegating:
                yield self._code_step(run_id, None, step, reward, cumulative)
                continue
            used = [0, 0, 0]
            for index in range(self.children):
                child = f"{run_id}.s{step}c{index}"
                child_used = yield from self._child(child, run_id)
                used = [a + b for a, b in zip(used, child_used, strict=True)]
            yield self._delegate_step(run_id, step, reward, cumulative, used)
        yield end_call(run_id, RunResult(True, self.steps, cumulative), None)

    def _child(self, run_id: str, parent: str) -> Generator[Call, None, list[int]]:
        yield self._start(run_id, parent, self.child_steps)
        used = [0, 0, 0]
        cumulative = 0.0
        for step in range(1, self.child_steps + 1):
            reward = ((step * 5) % 11) / 10.0
            cumulative += reward
            yield self._code_step(run_id, parent, step, reward, cumulative)
            prompt, completion = step_tokens(step, 1)
            used = [used[0] + prompt, used[1] + completion, used[2] + 1]
        yield end_call(run_id, RunResult(True, self.child_steps, cumulative), None)
        return used

    @staticmethod
    def _start(run_id: str, parent: str | None, steps: int) -> Call:
        params = rlm_params(parent, 0 if parent is None else 1, steps)
        kwargs = {"task": TASK, "environment": "pure_rlm", "params": params}
        return Call("on_run_start", run_id, kwargs)

    @staticmethod
    def _event(run_id: str, parent: str | None, step: int, reward: float) -> dict[str, Any]:
        return {
            "type": "step",
            "run_id": run_id,
            "environment": "pure_rlm",
            "framework": "native",
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "step": step,
            "depth": 0 if parent is None else 1,
            "parent_run_id": parent,
            "reward": reward,
        }

    def _code_step(
        self, run_id: str, parent: str | None, step: int, reward: float, cumulative: float
    ) -> Call:
        event = self._event(run_id, parent, step, reward)
        code = code_text(run_id, step, self.code_chars)
        failed = step % 9 == 0
        prompt, completion = step_tokens(step, event["depth"])
        event.update(
            action={"action": "run_python", "code": code, "rationale": RATIONALE},
            planner_raw=f'{{"action": "run_python", "rationale": "{RATIONALE}"}}',
            observation={
                "success": not failed,
                "stdout": stdout_text(run_id, step, self.stdout_chars),
                "stderr": TRACEBACK if failed else "",
                "execution_time": 0.02 + (step % 7) / 100,
            },
            usage={"prompt_tokens": prompt, "completion_tokens": completion, "total_calls": 1},
        )
        return Call(
            "on_step",
            run_id,
            {"event": event, "cumulative_reward": cumulative},
            think_s=self.think_ms / 1000.0,
        )

    def _delegate_step(
        self, run_id: str, step: int, reward: float, cumulative: float, children: list[int]
    ) -> Call:
        event = self._event(run_id, None, step, reward)
        prompt, completion = step_tokens(step, 0)
        event.update(
            action={"action": "delegate", "rationale": RATIONALE},
            planner_raw=f'{{"action": "delegate", "rationale": "{RATIONALE}"}}',
            observation={
                "success": True,
                "children": self.children,
                "completed_children": self.children,
                "execution_time": 0.05,
            },
            usage={
                "prompt_tokens": prompt + children[0],
                "completion_tokens": completion + children[1],
                "total_calls": 1 + children[2],
            },
        )
        return Call(
            "on_step",
            run_id,
            {"event": event, "cumulative_reward": cumulative},
            think_s=self.think_ms / 1000.0,
        )


AnyWorkload = RlmWorkload | TraceWorkload

WORKLOADS: dict[str, type[RlmWorkload] | type[TraceWorkload]] = {
    RlmWorkload.kind: RlmWorkload,
    TraceWorkload.kind: TraceWorkload,
}


def workload_spec(workload: AnyWorkload) -> dict[str, Any]:
    """A JSON form of ``workload`` that :func:`workload_from_spec` turns back into it."""
    return {"kind": workload.kind, **asdict(workload)}


def workload_from_spec(spec: Mapping[str, Any]) -> AnyWorkload:
    fields = dict(spec)
    return WORKLOADS[fields.pop("kind", "rlm")](**fields)


def trace_workload_from_spec(spec: Mapping[str, Any]) -> TraceWorkload:
    workload = workload_from_spec(spec)
    if not isinstance(workload, TraceWorkload):
        raise TypeError(f"not a trace workload: {spec.get('kind')!r}")
    return workload


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

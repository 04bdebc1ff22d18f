"""How big each measurement is: the full plan, the quick one and the smoke test's."""

from __future__ import annotations

from dataclasses import dataclass

from .workloads import RlmWorkload, TraceWorkload

#: The sink's documented defaults (README, configuration table). The benchmark does not read
#: them from the core: it only uses the sink's public API. Used to size the steady-state window
#: and to explain its request counts.
DEFAULT_FLUSH_INTERVAL_S = 5.0
DEFAULT_BATCH_TRIGGER = 5_000
DEFAULT_QUEUE_SIZE = 10_000


#: When the timed hooks of a regime may begin, after the untimed producer filled the queue.
QUEUE_FULL = "queue full"
WORKER_SENDING = "worker sending"  # it has sent events: it is draining while the hooks come
WORKER_READING_BACK = "worker reading back"  # it has sent more events than the queue holds


@dataclass(frozen=True)
class Regime:
    """A condition the hooks must hold their latency in.

    ``latency_s`` is added by the FaultProxy to every request; ``unreachable`` sends to a closed
    port instead of the proxy; ``queue_size`` replaces the default. Before the timed hooks, an
    untimed producer fills the queue (at least ``backlog_factor`` x queue_size steps), then waits
    until ``ready_when`` holds.
    """

    name: str
    ready_when: str = WORKER_SENDING
    latency_s: float = 0.0
    unreachable: bool = False
    queue_size: int | None = None
    backlog_factor: int = 1


REGIMES = (
    Regime("server up"),
    Regime("200 ms latency", latency_s=0.2),
    Regime("unreachable", ready_when=QUEUE_FULL, unreachable=True),
    Regime("queue spilling", ready_when=WORKER_READING_BACK, queue_size=1_000, backlog_factor=10),
)

ALL_REGIMES = tuple(regime.name for regime in REGIMES)


@dataclass(frozen=True)
class Plan:
    name: str
    main: RlmWorkload
    main_nojournal: bool  # also run our sink with journal=False on the main workload
    sweep_sync: RlmWorkload  # the seed pays two round trips per step: a smaller workload
    sweep: RlmWorkload  # MLflow async and ours in the latency sweep
    latencies: tuple[float, ...]
    sweep_reuses_main: bool  # the 0 ms row is the main workload (when main ran)
    hook_runs: int  # runs of 1 start, 10 steps, 1 end in the hook micro-benchmark
    hook_think_variants: bool  # also with 2 ms agent work per step
    regimes: tuple[str, ...]  # which of REGIMES to run
    regime_threads: int
    regime_steps: int  # per agent thread
    regime_reference: bool  # each regime also with journal=False
    regime_drain: bool  # wait (up to 120 s) until a regime has sent everything, or close at once
    drain_runs: int
    drain_steps: int  # per run
    ceiling_batches: int
    ceiling_reps: int
    ceiling_before: bool  # the raw ceiling before the drain as well as after it
    ceiling_parallel: bool  # also two log_batch loops at once
    steady: tuple[tuple[int, float], ...]  # (runs, steps per second per run)
    steady_warmup_s: float
    steady_window_s: float
    memory_steps: int
    close_pending: int
    concurrency: tuple[int, ...]
    concurrency_steps: int
    concurrency_nojournal: bool
    trace: TraceWorkload  # the shape of a root run (its runs and threads are set by trace_sizes)
    trace_sizes: tuple[tuple[int, int], ...]  # (agent threads, root runs) of each trace variant
    trace_think_ms: float  # agent work per step of the variants with some (0: none of those)
    trace_exit: TraceWorkload  # the process ends right after its last hook
    trace_endings: tuple[str, ...]  # "exit" (normal, no flush) and "sigterm"


#: How a trace workload's process ends in the exit comparison.
TRACE_ENDINGS = ("exit", "sigterm")

FULL = Plan(
    name="full",
    main=RlmWorkload(runs=8, threads=4, steps=100, child_steps=20, think_ms=1.0),
    main_nojournal=True,
    sweep_sync=RlmWorkload(runs=2, threads=2, steps=10, child_steps=4, think_ms=1.0),
    sweep=RlmWorkload(runs=4, threads=2, steps=50, child_steps=10, think_ms=1.0),
    latencies=(0.0, 0.05, 0.2, 1.0),
    sweep_reuses_main=False,
    hook_runs=2_000,
    hook_think_variants=True,
    regimes=ALL_REGIMES,
    regime_threads=8,
    regime_steps=2_000,
    regime_reference=True,
    regime_drain=True,
    drain_runs=10,
    drain_steps=6_000,
    # Loops of 30,000 points (a quarter of the drain's 120,030): a sustained rate, not the best
    # burst of a few requests, which a noisy machine flatters.
    ceiling_batches=30,
    ceiling_reps=2,
    ceiling_before=True,
    ceiling_parallel=True,
    steady=((1, 400.0), (4, 100.0), (16, 25.0)),
    steady_warmup_s=1.0 + DEFAULT_FLUSH_INTERVAL_S,
    steady_window_s=3 * DEFAULT_FLUSH_INTERVAL_S,
    memory_steps=1_000_000,
    close_pending=10_000,
    concurrency=(1, 10, 100),
    concurrency_steps=50,
    concurrency_nojournal=True,
    trace=TraceWorkload(runs=1, threads=1, steps=30, delegations=2, children=2, child_steps=4),
    trace_sizes=((1, 6), (8, 32)),
    trace_think_ms=2.0,
    trace_exit=TraceWorkload(
        runs=16, threads=8, steps=30, delegations=2, children=2, child_steps=4, think_ms=2.0
    ),
    trace_endings=TRACE_ENDINGS,
)

QUICK = Plan(
    name="quick",
    main=RlmWorkload(runs=4, threads=2, steps=10, child_steps=3, think_ms=1.0),
    main_nojournal=False,
    sweep_sync=RlmWorkload(runs=1, threads=1, steps=3, think_ms=1.0),
    sweep=RlmWorkload(runs=2, threads=2, steps=5, child_steps=2, think_ms=1.0),
    latencies=(0.0, 0.2),
    sweep_reuses_main=True,
    hook_runs=500,
    hook_think_variants=False,
    regimes=ALL_REGIMES,
    regime_threads=8,
    regime_steps=2_000,
    regime_reference=True,
    regime_drain=False,
    drain_runs=10,
    drain_steps=2_000,
    ceiling_batches=2,
    ceiling_reps=2,
    ceiling_before=False,
    ceiling_parallel=False,
    steady=((4, 100.0),),
    steady_warmup_s=0.5 + DEFAULT_FLUSH_INTERVAL_S,
    steady_window_s=1.5 * DEFAULT_FLUSH_INTERVAL_S,
    memory_steps=25_000,
    close_pending=2_000,
    concurrency=(1, 10),
    concurrency_steps=20,
    concurrency_nojournal=False,
    trace=TraceWorkload(runs=1, threads=1, steps=12, delegations=1, children=2, child_steps=3),
    trace_sizes=((1, 2), (8, 8)),
    trace_think_ms=2.0,
    trace_exit=TraceWorkload(runs=8, threads=8, steps=12, think_ms=2.0),
    trace_endings=TRACE_ENDINGS,
)

#: Every section at its smallest, for the test suite: checks the harness, not the figures.
SMOKE = Plan(
    name="smoke",
    main=RlmWorkload(runs=2, threads=2, steps=4, child_steps=2, think_ms=1.0),
    main_nojournal=False,
    sweep_sync=RlmWorkload(runs=1, threads=1, steps=3, child_steps=0, think_ms=1.0),
    sweep=RlmWorkload(runs=1, threads=1, steps=3, child_steps=0, think_ms=1.0),
    latencies=(0.0, 0.05),
    sweep_reuses_main=True,
    hook_runs=50,
    hook_think_variants=False,
    regimes=("unreachable", "queue spilling"),  # both ways of waiting, both journal modes
    regime_threads=4,
    regime_steps=300,
    regime_reference=True,
    regime_drain=False,
    drain_runs=4,
    drain_steps=300,
    ceiling_batches=1,
    ceiling_reps=1,
    ceiling_before=False,
    ceiling_parallel=False,
    steady=((2, 50.0),),
    steady_warmup_s=0.5,
    steady_window_s=1.0,
    memory_steps=25_000,
    close_pending=200,
    concurrency=(2,),
    concurrency_steps=5,
    concurrency_nojournal=False,
    trace=TraceWorkload(runs=1, threads=1, steps=4, delegations=1, children=1, child_steps=2),
    trace_sizes=((2, 2),),
    trace_think_ms=0.0,
    trace_exit=TraceWorkload(runs=2, threads=2, steps=4, delegations=1, children=1, child_steps=2),
    trace_endings=("sigterm",),
)

PLANS = {plan.name: plan for plan in (FULL, QUICK, SMOKE)}

"""The hook side of a sink: a hook call becomes one record in the journal and in the queue.

Hooks are called from many threads at once, from inside running event loops and from signal
handlers' neighbourhood, so nothing here takes a lock, waits, or makes a system call in the
common case. A hook reads a few fields, encodes one record (:mod:`._codec`), writes it to its
thread's journal lane (a memory copy into a mapped file, :mod:`._journal`) and appends it to a
``deque`` (one C-level, atomic call). The worker takes from the deques and reads spilled records
back from the journal.

Capacity: ``queue_size`` step records wait in memory (run starts and ends, rare, come on
top). When memory is full, a record goes to the journal
only ("spilled") and the worker reads it back once it has caught up, in order: a lane that has
spilled keeps spilling until the worker has read it all, so one thread's events never overtake
each other. Without a journal, a full queue drops step records by the overflow policy; run starts
and ends are never dropped.

Ordering between the two deques: run starts and ends go to ``ctl``, steps to ``steps``; the worker
empties ``ctl`` first, then ``steps``, so a run's end is never taken before the steps that came
before it. A step may be taken before its run's start (it was appended in between): the worker
holds it until the start arrives.
"""

from __future__ import annotations

import enum
import itertools
import logging
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from . import _codec, _fork, _session
from ._config import Overflow, SinkConfig
from ._events import VERDICT, case_figures, verdict_score
from ._journal import (
    HFLAG_SPILLED,
    HFLAG_TRACES,
    SMALL_RECORD,
    Journal,
    Segment,
    default_journal_dir,
)
from ._stats import AtomicCounter, RateLimitedWarnings, Tally

logger = logging.getLogger("rlm_mlflow")

Item = tuple[Segment | None, int, bytes | None]  # None: read the record back from the segment

#: A record larger than this waits in memory by reference only (the journal holds its bytes,
#: and the worker sums them as it reads them back).
BY_REFERENCE = SMALL_RECORD

#: Ended run ids remembered, so that a hook for one of them after its ``on_run_end`` (a
#: straggler step, a second end from a ``finally:``) is dropped, not taken for a new run.
ENDED_KEPT = 10_000

#: While spilling, a hook yields the interpreter once per this many records (+1, a power of two).
YIELD_EVERY = 255  # (journal segment, offset, record) - no journal: None


class State(enum.Enum):
    IDLE = "idle"  # nothing happened yet: no thread, no file
    THREAD = "thread"  # the worker runs on the process's background thread
    TASK = "task"  # the worker runs in the caller's event loop (``async with``)
    CLOSING = "closing"
    CLOSED = "closed"


class OpenRun:
    """A run between its start and its end, as the hooks know it."""

    __slots__ = (
        "children",
        "implicit",
        "last_ns",
        "no",
        "parent",
        "previous",
        "root",
        "run_id",
        "started_ns",
        "steps",
        "thread",
        "tokens",
    )

    def __init__(self, no: int, run_id: str, thread: int, implicit: bool = False) -> None:
        self.no = no
        self.root = no  # the top run of its recursion tree
        self.run_id = run_id
        self.thread = thread
        self.implicit = implicit
        self.steps = 0
        self.last_ns = time.time_ns()  # its previous step, or its start: where a step began
        self.started_ns = self.last_ns
        # The run with the same id this one hides (started again on this thread while open).
        self.previous: OpenRun | None = None
        self.parent: OpenRun | None = None
        # Tokens used so far (input, output, total, calls), by this run's thread only; and what
        # child runs that ended since its last step used (appended by their threads: a deque).
        self.tokens = [0, 0, 0, 0]
        self.children: deque[_codec.Counts] = deque()

    def drain_children(self) -> _codec.Counts | None:
        """What the child runs that ended since the last step used, added up (and forgotten)."""
        children = self.children
        if not children:
            return None
        total = [0, 0, 0, 0]
        pop = children.popleft
        for _ in range(len(children)):
            for index, count in enumerate(pop()):
                total[index] += count
        return (total[0], total[1], total[2], total[3])


now_ns = time.time_ns


def text_of(value: object) -> str:
    """``str(value)`` for a run id, never raising."""
    if type(value) is str:
        return value
    try:
        return str(value)
    except Exception:
        return f"<unprintable {type(value).__name__}>"


def read_field(obj: object, name: str) -> tuple[Any, bool]:
    """``(obj.name or obj[name], ok)``: other runtimes pass other objects, some hostile."""
    try:
        if type(obj) is dict:
            return obj.get(name), True
        if isinstance(obj, Mapping):
            return obj.get(name), True
        return getattr(obj, name, None), True
    except Exception:
        return None, False


class Pipeline:
    """Everything of one sink that hooks touch, and what the worker takes from it."""

    def __init__(self, config: SinkConfig, warnings: RateLimitedWarnings) -> None:
        self.config = config
        self.warnings = warnings
        self.capacity = config.queue_size
        self.trigger = min(config.batch_trigger, config.queue_size)
        self.drop_oldest = config.overflow is Overflow.DROP_OLDEST
        self.texts = config.traces == "full"  # code, output and task text go into traces
        self.record_flags = HFLAG_TRACES if config.traces != "off" else 0
        self.on_first_event: Callable[[], None] | None = None
        self.reset()
        _fork.register(self, Pipeline.after_fork_in_child)

    def reset(self) -> None:
        """A fresh state: at construction, and in a forked child."""
        self.generation = _fork.generation()  # the fork this state belongs to
        self.state = State.IDLE
        self.active = self.config.enabled
        self.off = not self.config.enabled  # disabled (or unusable): every hook returns at once
        self.prefix = _fork.new_prefix()
        self.run_numbers = itertools.count(1)
        self.ctl: deque[Item] = deque()
        self.steps: deque[Item] = deque()
        self.journal: Journal | None = None
        self.retired: list[Journal] = []  # replaced while idle; closed once all of it is done
        self.spilled_before = 0  # records spilled to journals closed since
        self.journal_wanted = self.config.enabled and self.config.journal
        self.journal_problem: str | None = None
        self._opening = threading.Lock()  # only while the journal does not exist yet
        self.accepted = AtomicCounter()
        self.entered = AtomicCounter()
        self.exited = AtomicCounter()  # hook calls that saw ``active`` and returned
        self.turned_away = AtomicCounter()  # hook calls that found ``active`` false
        self.door = Tally()  # events dropped before they reached the queue
        self.deferred_door = AtomicCounter()  # evicted from memory, still in the journal
        self.rejected = Tally()
        self.by_id: dict[str, OpenRun] = {}  # the latest open run of each run id
        self.by_thread: dict[tuple[str, int], OpenRun] = {}
        self.ended: OrderedDict[str, None] = OrderedDict()  # the latest ENDED_KEPT, oldest first
        # Every benchmark open (their root runs are their cases), with the thread that opened
        # it, in the order they were opened (replaced whole, never changed in place: hooks read
        # it unlocked); and the cases: run id -> (the benchmark's run, the case's run)
        self.benches: list[tuple[int, OpenRun]] = []
        self.cases: dict[str, tuple[int, int]] = {}
        # What the hooks saw of each case: benchmark's run no -> case's run no -> its figures
        # (written with the benchmark's end: see RunEnd.cases).
        self.case_figures: dict[int, dict[int, dict[str, float]]] = {}
        self.end_status = "FAILED"  # for runs still open at close; KILLED after a signal
        # Waking the worker costs a system call: only when it sleeps and a batch is ready.
        self.worker_asleep = False
        self.wake_sent = False
        self.waker: Callable[[], None] | None = None

    # -- the hooks -------------------------------------------------------------------------------

    def start(
        self,
        run_id: object,
        task: object,
        environment: object,
        params: object,
        *,
        benchmark: bool = False,
        dataset: dict[str, Any] | None = None,
    ) -> None:
        if self.off:
            return
        self.entered.incr()  # before looking at ``active``: close() waits for us (see quiet)
        if not self.active:
            self.refuse()
            return
        try:
            rid = run_id if type(run_id) is str else text_of(run_id)
            try:
                task_chars: int | None = len(task)  # type: ignore[arg-type]
            except Exception:
                task_chars = None
            parent = self._parent_of(rid, params)
            self.ended.pop(rid, None)  # started again: a new run
            me = threading.get_ident()
            run = self.by_thread.get((rid, me))
            if run is not None and run.implicit:  # its steps came first: this completes it
                run.implicit = False
            else:
                if run is not None or rid in self.by_id:
                    self.bad_input(
                        "duplicate_run_id", rid, "started again while still open; a new run"
                    )
                new = OpenRun(next(self.run_numbers), rid, me)
                new.previous = run
                run = self.by_thread[(rid, me)] = self.by_id[rid] = new
            bench_no = None
            if parent is not None:
                run.root = parent.root
                run.parent = parent
            elif self.benches and not benchmark:  # a case of an open benchmark
                bench = self._bench_of(me)
                if bench is not None:
                    bench_no = bench.no
                    self.cases[rid] = (bench_no, run.no)
            run.last_ns = run.started_ns = now = now_ns()
            depth = params.get("depth") if type(params) is dict else None
            session = user = None
            if parent is None:  # a child is in its root's trace, and so in its session
                config = self.config
                session, user = _session.of_root_run(task, config.session, config.user)
            payload = _codec.encode_start(
                run.no,
                now,
                run_id=rid,
                environment=environment,
                task_chars=task_chars,
                params=params,
                parent_no=parent.no if parent is not None else None,
                root_no=run.root,
                parent_step=parent.steps if parent is not None else None,
                depth=depth,
                task=_codec.text_document(task, "task", self.texts) if task is not None else None,
                session=session,
                user=user,
                benchmark=benchmark,
                dataset=dataset,
                bench_no=bench_no,
            )
            self.admit(payload, ctl=True, start=True)
        except Exception:
            self.hook_failed("on_run_start")
        finally:
            self.exited.incr()

    def step(self, run_id: object, event: object, cumulative: object) -> None:
        if self.off:
            return
        self.entered.incr()  # before looking at ``active``: close() waits for us (see quiet)
        if not self.active:
            self.refuse()
            return
        try:
            run = self.by_id.get(run_id) if type(run_id) is str else None
            if run is None or run.thread != threading.get_ident():
                run = self.route(run_id)
                if run is None:
                    return
            children = run.drain_children() if run.children else None
            if type(event) is dict:
                step, reward = event.get("step"), event.get("reward")
                try:
                    detail, used = _codec.step_detail(event, self.texts, children)
                except Exception:  # one bad field: read them one by one, keep the rest
                    detail, used = self._careful_detail(event, run.run_id, children)
            else:
                step, reward, detail, used = self._read_event(event, run.run_id, children)
            if used is not None:
                tokens = run.tokens
                tokens[0] += used[0]
                tokens[1] += used[1]
                tokens[2] += used[2]
                tokens[3] += used[3]
            now = time.time_ns()
            ordinal, since = run.steps, run.last_ns
            run.steps, run.last_ns = ordinal + 1, now
            self.admit(
                b"".join(
                    _codec.step_parts(run.no, now, step, reward, cumulative, ordinal, since, detail)
                ),
                ctl=False,
            )
        except Exception:
            self.hook_failed("on_step")
        finally:
            self.exited.incr()

    def end(
        self,
        run_id: object,
        result: object,
        run_path: object,
        *,
        cases: dict[int, dict[str, float]] | None = None,
        status: str = "FINISHED",
    ) -> None:
        if self.off:
            return
        self.entered.incr()  # before looking at ``active``: close() waits for us (see quiet)
        if not self.active:
            self.refuse()
            return
        try:
            run = self.route(run_id)
            if run is None:
                return
            values = []
            for name in ("completed", "steps", "total_reward", "final_response"):
                value, ok = read_field(result, name)
                if not ok:
                    self.bad_input("result_unreadable", run.run_id, f"result.{name} raised")
                values.append(value)
            final = values[3]
            path = _codec.path_text(run_path)
            if path is not None and path.startswith("\x00"):
                self.bad_input("artifact", run.run_id, f"run_path {path[1:]} is not a path")
                path = None
            tokens = run.tokens
            usage = (tokens[0], tokens[1], tokens[2], tokens[3])
            # What the runtime says the run used in all (RLM Code's ``usage_summary``) also
            # holds the calls it made outside any step, such as its closing summary.
            summary, _ = read_field(result, "usage_summary")
            if summary is not None:
                reported = _codec.usage_counts(summary)
                if reported is not None and reported[2] >= usage[2]:
                    usage = reported
            now = now_ns()
            case = self.cases.get(run.run_id)
            if case is not None and case[1] == run.no:
                figures = self.case_figures.setdefault(case[0], {}).setdefault(run.no, {})
                figures.update(case_figures(values[0], values[2], usage[2], run.started_ns, now))
            payload = _codec.encode_end(
                run.no,
                now,
                run_id=run.run_id,
                status=status,
                completed=values[0],
                steps=values[1],
                total_reward=values[2],
                run_path=path,
                final=(
                    _codec.text_document(final, "final", self.texts) if final is not None else None
                ),
                usage=usage,
                cases=cases,
            )
            self.admit(payload, ctl=True)
            self._forget(run)
            if run.run_id not in self.by_id:
                self._ended(run.run_id)
            if run.parent is not None and any(usage):
                run.parent.children.append(usage)  # counted once: in the parent's next step
        except Exception:
            self.hook_failed("on_run_end")
        finally:
            self.exited.incr()

    def case(
        self,
        bench_no: int,
        run_id: object,
        *,
        expected: object,
        verdict: object,
        rationale: object,
        judge: str,
    ) -> None:
        """A benchmark's word on one of its cases (its run ``run_id``), like a hook: one
        record, never raising."""
        if self.off:
            return
        self.entered.incr()
        if not self.active:
            self.refuse()
            return
        try:
            rid = run_id if type(run_id) is str else text_of(run_id)
            found = self.cases.get(rid)
            if found is None or found[0] != bench_no:
                self.bad_input("case_unknown", rid, "is not a run of this benchmark; not recorded")
                return
            score = verdict_score(verdict)
            if score is not None:
                figures = self.case_figures.setdefault(bench_no, {}).setdefault(found[1], {})
                figures[VERDICT + judge] = score
            payload = _codec.encode_case(
                bench_no,
                now_ns(),
                case_no=found[1],
                expected=expected,
                verdict=verdict,
                rationale=rationale,
                judge=judge,
            )
            self.admit(payload, ctl=True)
        except Exception:
            self.hook_failed("benchmark case")
        finally:
            self.exited.incr()

    # -- routing ---------------------------------------------------------------------------------

    def _parent_of(self, run_id: str, params: object) -> OpenRun | None:
        parent: object = None
        if type(params) is dict:
            parent = params.get("parent_run_id")
        elif isinstance(params, Mapping):
            try:
                parent = params.get("parent_run_id")
            except Exception:
                parent = None
        else:
            self.bad_input("params_not_mapping", run_id, f"params is a {type(params).__name__}")
        if parent is None or (type(parent) is str and not parent):  # never bool() a user value
            return None
        found = self.find(text_of(parent))
        if found is None:
            self.bad_input(
                "parent_unknown", run_id, f"parent run {text_of(parent)!r} is not open here"
            )
        return found

    def find(self, run_id: str) -> OpenRun | None:
        """The open run ``run_id``: the one this thread started, else the latest."""
        run = self.by_thread.get((run_id, threading.get_ident()))
        return run if run is not None else self.by_id.get(run_id)

    def route(self, run_id: object) -> OpenRun | None:
        """The run a step or an end belongs to; a run never started is opened for it. None for
        a run that ended (the event is dropped, counted as ``after_end``)."""
        rid = run_id if type(run_id) is str else text_of(run_id)
        run = self.find(rid)
        if run is not None:
            return run
        if rid in self.ended:
            self.accepted.incr()
            self.door.add("after_end")
            self.warnings.warn(
                "after_end",
                "rlm-mlflow run %s: hook called after its on_run_end; event dropped",
                rid,
            )
            return None
        me = threading.get_ident()
        run = OpenRun(next(self.run_numbers), rid, me, implicit=True)
        self.by_thread[(rid, me)] = run
        self.by_id[rid] = run
        self.bad_input("not_started", rid, "hook called before on_run_start; run opened for it")
        payload = _codec.encode_start(
            run.no,
            now_ns(),
            run_id=rid,
            environment=None,
            task_chars=None,
            params={},
            parent_no=None,
            implicit=True,
            flags=_codec.FLAG_INTERNAL,
        )
        self.admit(payload, ctl=True, start=True, internal=True)
        return run

    def _bench_of(self, thread: int) -> OpenRun | None:
        """The benchmark a root run started on ``thread`` is a case of: the latest opened on
        that thread, else the latest opened (cases may run on a pool's threads)."""
        benches = self.benches
        for opener, bench in reversed(benches):
            if opener == thread:
                return bench
        return benches[-1][1] if benches else None  # the last one closed meanwhile

    def open_bench(self, run: OpenRun) -> None:
        me = threading.get_ident()
        if any(opener != me for opener, _ in self.benches):
            self.warnings.warn(
                "benchmarks_at_once",
                "rlm-mlflow: benchmark %s opened while another thread's is open: a root run "
                "is a case of the latest benchmark opened on its own thread, else of the "
                "latest opened",
                run.run_id,
            )
        self.benches = [*self.benches, (me, run)]

    def close_bench(self, run: OpenRun) -> None:
        self.benches = [entry for entry in self.benches if entry[1] is not run]

    def _ended(self, run_id: str) -> None:
        ended = self.ended
        ended[run_id] = None
        ended.move_to_end(run_id)
        while len(ended) > ENDED_KEPT:
            try:
                ended.popitem(last=False)
            except KeyError:  # another thread's end took the last one over the bound
                break

    def _forget(self, run: OpenRun) -> None:
        key = (run.run_id, run.thread)
        previous = run.previous
        if previous is not None:
            self.by_thread[key] = previous
            self.by_id[run.run_id] = previous
            return
        self.by_thread.pop(key, None)
        if self.by_id.get(run.run_id) is run:
            self.by_id.pop(run.run_id, None)

    def _read_event(
        self, event: object, run_id: str, children: _codec.Counts | None
    ) -> tuple[Any, Any, _codec.Parts, _codec.Counts | None]:
        if not isinstance(event, Mapping):
            self.bad_input("event_not_mapping", run_id, f"event is a {type(event).__name__}")
            return None, None, (), None
        step, ok = read_field(event, "step")
        reward, ok2 = read_field(event, "reward")
        try:
            detail, used = _codec.step_detail(event, self.texts, children)
        except Exception:  # a Mapping whose reads raise: its numbers are what matters
            detail, used = self._careful_detail(event, run_id, children)
        if not (ok and ok2):
            self.bad_input("event_unreadable", run_id, "reading the event raised")
        return step, reward, detail, used

    def _careful_detail(
        self, event: Mapping[str, Any], run_id: str, children: _codec.Counts | None
    ) -> tuple[_codec.Parts, _codec.Counts | None]:
        detail, used, problems = _codec.careful_step_detail(event, self.texts, children)
        for problem in problems:
            self.bad_input("bad_step_field", run_id, f"{problem}; left out of the step")
        return detail, used

    # -- admission -------------------------------------------------------------------------------

    def admit(
        self,
        payload: bytes,
        *,
        ctl: bool,
        start: bool = False,
        internal: bool = False,
    ) -> None:
        """Put one record in the journal and the queue (or spill it, or drop it: counted); the
        queue holds a journaled record by reference unless it is small."""
        if not internal:
            self.accepted.incr()
        if self.state is State.IDLE:
            self._first_event()
        journal = self.journal
        if (journal is None or journal.retiring) and self.journal_wanted:
            journal = self._open_journal()
        if journal is not None:
            lane = journal.lane_for_thread()
            if lane is not None:
                spill = lane.spill_written != lane.spill_read or len(self.steps) >= self.capacity
                where = lane.write(payload, self.record_flags | (HFLAG_SPILLED if spill else 0))
                if where is not None:
                    if start:
                        where[0].starts += 1
                    if spill:
                        if lane.spill_written == lane.spill_read:
                            lane.spill_from = where
                        if internal:
                            lane.spill_internal += 1
                        lane.spill_written += 1
                        if not lane.spill_written & YIELD_EVERY:
                            # The worker is behind: let it have the interpreter now and then.
                            # Threads that never block keep the GIL for up to 5 ms each, and
                            # every request the worker makes needs it back a dozen times.
                            time.sleep(0)
                        self.wake()
                        return
                    kept = payload if len(payload) <= BY_REFERENCE else None
                    (self.ctl if ctl else self.steps).append((where[0], where[1], kept))
                    if len(self.steps) >= self.trigger:
                        self.wake()
                    return
        # In memory only: no journal, or the disk refused it.
        if ctl:
            self.ctl.append((None, 0, payload))
            return
        steps = self.steps
        if len(steps) >= self.capacity:
            evicted = None
            if self.drop_oldest:
                try:
                    evicted = steps.popleft()
                except IndexError:
                    evicted = None
            if evicted is None:
                self.dropped_at_door("queue_full", internal)
                return
            if evicted[0] is None:
                self.door.add("queue_full")
            else:  # still in the journal: replay sends it
                self.deferred_door.incr()
            self.warn_full()
        steps.append((None, 0, payload))
        if len(steps) >= self.trigger:
            self.wake()

    def dropped_at_door(self, reason: str, internal: bool = False) -> None:
        if not internal:
            self.door.add(reason)
        if reason == "queue_full":
            self.warn_full()

    def warn_full(self) -> None:
        self.warnings.warn(
            "queue_full",
            "rlm-mlflow queue is full (%d events) and there is no journal to spill to: %s "
            "step events; the tracking server is slower than the agent or unreachable",
            self.capacity,
            "dropping the oldest" if self.drop_oldest else "refusing new",
        )

    def wake(self) -> None:
        if self.worker_asleep and not self.wake_sent and self.waker is not None:
            self.wake_sent = True
            self.waker()

    def _first_event(self) -> None:
        callback = self.on_first_event
        if callback is not None:
            callback()

    def _open_journal(self) -> Journal | None:
        """The first event's journal (hook side: before it, the sink holds no file)."""
        with self._opening:
            current = self.journal
            if (current is not None and not current.retiring) or not self.journal_wanted:
                return current
            try:
                self.journal = self._new_journal()
                if current is not None:
                    self.retired.append(current)
            except OSError as exc:
                self._no_journal(exc)
            return self.journal

    def _new_journal(self) -> Journal:
        config = self.config
        journal = Journal(
            self._journal_root(),
            prefix=self.prefix,
            experiment=config.experiment,
            tracking_uri=config.tracking_uri,
            fsync=config.journal_fsync,
            span_budget=config.span_budget,
        )
        return journal

    def _journal_root(self) -> Path:
        config = self.config
        return Path(config.journal_dir) if config.journal_dir else default_journal_dir()

    def journal_trouble(self) -> str | None:
        """Why events are not all written to a journal now: none could be opened, or the disk
        refused a segment of the current one (full): new events are then in memory only."""
        if self.journal_problem:
            return self.journal_problem
        journal = self.journal
        if journal is not None and journal.failed is not None:
            return f"the journal in {journal.folder} took no more segments: {journal.failed}"
        return None

    def _no_journal(self, exc: OSError) -> None:
        self.journal_wanted = False
        self.journal_problem = f"cannot open a journal in {self._journal_root()}: {exc}"
        logger.warning(
            "rlm-mlflow: %s; going on without one (a full queue drops step events)",
            self.journal_problem,
        )

    def prepare_journal(self) -> Journal | None:
        """Worker, on a thread: a fresh journal, its lanes' pages faulted in, to take the place
        of an idle one (so the next hook finds it ready and makes no file); None if the disk
        refuses it."""
        try:
            journal = self._new_journal()
        except OSError as exc:
            logger.warning("rlm-mlflow: cannot make a new journal (%s); keeping the old one", exc)
            return None
        for lane in list(journal.lanes):
            lane.segment.populate()
        return journal

    def replace_journal(self, old: Journal, fresh: Journal) -> bool:
        """Worker: ``fresh`` takes the place of ``old`` (idle), which goes once nothing is left
        in it and no hook runs. False (``fresh`` is removed) if ``old`` is not current anymore."""
        with self._opening:
            closing = self.state in (State.CLOSING, State.CLOSED)
            if self.journal is old and not old.retiring and not closing:
                self.journal = fresh
                self.retired.append(old)
                old.retiring = True  # a hook that still sees it finds the new one
                return True
        fresh.close(keep=False)
        return False

    # -- the rare paths ----------------------------------------------------------------------

    def refuse(self) -> None:
        self.turned_away.incr()  # first: from here on, closing does not wait for this call
        if self.state in (State.CLOSING, State.CLOSED):
            self.accepted.incr()
            self.door.add("after_close")
            self.warnings.warn(
                "after_close", "rlm-mlflow: hook called after close(); event dropped"
            )

    def bad_input(self, reason: str, run_id: str, message: str) -> None:
        self.rejected.add(reason)
        self.warnings.warn(reason, "rlm-mlflow run %s: %s", run_id, message)

    def hook_failed(self, hook: str) -> None:
        self.rejected.add("hook_error")
        self.warnings.warn("hook_error", "rlm-mlflow %s failed; event dropped", hook)
        logger.debug("rlm-mlflow %s failed", hook, exc_info=sys.exc_info())

    # -- the owner's side --------------------------------------------------------------------

    def quiet(self) -> bool:
        """No hook is running: every hook that saw ``active`` true has appended its record.

        A hook counts itself in (``entered``) before it reads ``active``, then counts itself
        either turned away (found it false) or, on return, ``exited``. Once ``active`` is false
        and this is true, no record can be appended any more (closing relies on it). Hooks that
        keep coming after the close are turned away and never make this wait: ``exited`` is
        read first, so ``entered - turned_away`` read after it can only be larger while one
        hook that saw ``active`` true is still running."""
        exited = self.exited.value
        turned_away = self.turned_away.value
        return self.entered.value - turned_away == exited

    def end_open_runs(self, status: str, *, thread: int | None = None) -> int:
        """Queue an end for every open run (of one thread only, when given); how many."""
        ended = 0
        for (rid, tid), top in list(self.by_thread.items()):
            if thread is not None and tid != thread:
                continue
            run: OpenRun | None = top
            while run is not None:
                payload = _codec.encode_end(
                    run.no, now_ns(), run_id=rid, status=status, flags=_codec.FLAG_INTERNAL
                )
                self.admit(payload, ctl=True, internal=True)
                ended += 1
                run = run.previous
            self.by_thread.pop((rid, tid), None)
            if self.by_id.get(rid) is top:
                self.by_id.pop(rid, None)
        return ended

    def runs_open(self) -> int:
        count = 0
        for top in list(self.by_thread.values()):
            run: OpenRun | None = top
            while run is not None:
                count += 1
                run = run.previous
        return count

    def take(self, limit: int) -> list[Item]:
        """What waits in memory (run starts and ends first), then spilled records from disk."""
        ctl, steps = self.ctl, self.steps
        out: list[Item] = []
        pop = ctl.popleft
        for _ in range(len(ctl)):
            out.append(pop())
        pop = steps.popleft
        for _ in range(len(steps)):
            out.append(pop())
        for journal in self.journals():
            if len(out) < limit and journal.spill_pending():
                out.extend(journal.read_spilled(limit - len(out)))
        return out

    def journals(self) -> list[Journal]:
        """Every journal records may still be read from: retired ones first, then the current."""
        current = self.journal
        return [*self.retired, current] if current is not None else list(self.retired)

    def waiting(self) -> int:
        """Records in memory and spilled records not read back yet."""
        spilled = 0
        for journal in self.journals():
            spilled += sum(lane.spill_written - lane.spill_read for lane in list(journal.lanes))
        return len(self.ctl) + len(self.steps) + spilled

    def release_idle_journals(self) -> None:
        """Close (and remove) every retiring journal with nothing left in it (worker, when no
        hook is running: a hook that saw the journal before it was retiring has finished)."""
        for journal in self.journals():
            if not journal.retiring or journal.backlog() or journal.spill_pending():
                continue
            with self._opening:
                if self.journal is journal:
                    self.journal = None
                elif journal in self.retired:
                    self.retired.remove(journal)
            self.spilled_before += sum(lane.spill_written for lane in list(journal.lanes))
            journal.close(keep=False)

    def after_fork_in_child(self) -> None:
        """A forked child: a new key prefix, run counter, queue and no journal (the parent's
        files stay the parent's). Used or not, registered with the runtime or not: two children
        of one parent must never write runs, traces or spans under the same keys. Once per fork."""
        if self.generation == _fork.generation():
            return
        for journal in self.journals():
            journal.forget()
        if self.state is State.CLOSED or not self.config.enabled:
            self.generation = _fork.generation()
            self.journal, self.retired = None, []
            return
        unavailable = self.off  # the sink found it cannot work at all: it stays off
        self.reset()
        if unavailable:
            self.off, self.active = True, False

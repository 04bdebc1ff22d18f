"""The process side: one background thread for every sink's worker, and how the process ends.

Sinks in a sync program share one background thread running one event loop (started by the first
event of the first sink, without waiting for it; it ends when no sink needs it). ``async with``
sinks run their worker in the caller's loop instead. Either way the worker *owns* its sink's
lifecycle: everyone else only asks it to close and, if they must, waits for it.

How the process ends, and what each way means for the runs still open:

- normal exit: the ``atexit`` hook asks every sink to close and waits for all of them together,
  against one deadline (the longest ``shutdown_timeout``); runs that never ended become FAILED.
- an uncaught exception: FAILED too (``sys.excepthook``); in a thread, that thread's open runs
  are ended FAILED at once (``threading.excepthook``), the program going on.
- SIGTERM / SIGINT: runs still open become KILLED. The handler only records the cause and wakes
  the background thread: it never waits, joins or takes a lock (the code it interrupted may hold
  any lock, a hook included). If the previous handler is a Python function (asyncio's, uvicorn's,
  the program's), it is called at once and the program shuts down its own way, closing the sinks
  on the way out. If the previous action is the default one (die), the program goes on until it
  dies, and its hooks with it: every sink keeps accepting and sending while the agent keeps
  stepping, until the agent has been silent for ``SIGNAL_SILENCE`` or the deadline is near (the
  last ``SIGNAL_RESERVE`` of it is kept for the ends, more when ending the open runs is
  expected to take longer: ``_ends_take``); then every sink closes in parallel (its
  open runs end KILLED after every step they accepted, the rest is sent or kept in the journal)
  and the signal is raised again with its default action, so the process still dies of it.
- fork: the child gets fresh sinks of its own (empty queue, no journal, no worker yet, a new key
  prefix and run counter), every sink built before the fork, used or not (:mod:`._fork`), and
  never sends what the parent had queued.

Every hook here is installed once per process, chains to what was there, and holds sinks weakly.
"""

from __future__ import annotations

import _thread
import atexit
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from types import CodeType, FrameType, TracebackType
from typing import Any

import anyio
from anyio.lowlevel import RunVar

from . import _fork
from ._pipeline import State
from ._worker import CloseReports, ClosingGates, Worker

logger = logging.getLogger("rlm_mlflow")

_HANDLED = (signal.SIGTERM, signal.SIGINT)
#: How long the background thread stays when no sink needs it, before it ends.
IDLE_EXIT = 2.0
#: After a signal whose action is to die: hooks are taken until the agent has accepted nothing
#: for this long (it stopped) ...
SIGNAL_SILENCE = 0.25
SIGNAL_SILENT_LOOKS = 10  # (looked every 20 ms)
#: ... or until this share of the shutdown timeout is left (bounds below) to end runs and send.
SIGNAL_RESERVE = 0.25
SIGNAL_RESERVE_BOUNDS = (0.5, 5.0)
#: ... or longer, as long as ending the open runs is expected to take: two requests each (the
#: last batch, the end), this many at a time (the transport's MAX_IN_FLIGHT, as a server that
#: queues allows), each as long as the latest answer took, with this margin.
SIGNAL_ENDS_AT_ONCE = 4
SIGNAL_ENDS_MARGIN = 1.5
#: What closing one sink takes the loop once its sending is over, and the most of a deadline
#: kept for that (see close_all), and how long past the deadline the exit waits at most.
FINISH_EACH = 0.008
FINISH_SHARE = 0.2
CLOSE_GRACE = 0.5
#: Threads the background loop may use for blocking calls, for every sink of the process: the
#: requests in flight while sinks close (``http.CLOSING_IN_FLIGHT``, 12) and the journals' upkeep
#: beside them. Not per sink: a thread, its HTTP session and its socket serve every sink.
THREADS = 64


class Waker:
    """A socket pair: writing one byte wakes whoever waits on the other end (any thread,
    a signal handler included: no lock)."""

    def __init__(self) -> None:
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)

    def wake(self) -> None:
        with contextlib.suppress(OSError):  # full: a wake-up is pending anyway; closed: gone
            self._w.send(b"\0")

    async def wait(self) -> None:
        await anyio.wait_readable(self._r)
        with contextlib.suppress(OSError):
            while self._r.recv(4096):
                pass

    def close(self) -> None:
        self._w.close()
        self._r.close()


class Loop:
    """The workers one event loop runs, and the task that wakes them."""

    def __init__(self, gates: ClosingGates | None = None) -> None:
        self.waker = Waker()
        self.workers: list[Worker] = []
        self.pending: list[Worker] = []
        # The closing sinks of this event loop, by server: every run ends first.
        self.gates = gates if gates is not None else ClosingGates()

    def wake(self, worker: Worker) -> None:
        worker.wake_flag = True
        self.waker.wake()

    def dispatch(self) -> None:
        for worker in list(self.workers):
            if worker.wake_flag or worker.close_requested:
                worker.wake_flag = False
                worker.notify()


_task_gates: RunVar[ClosingGates] = RunVar("rlm_mlflow_closing_gates")


def task_loop() -> Loop:
    """A ``Loop`` for a sink entered with ``async with`` in the running event loop: each such
    sink has its own, but the sinks of one event loop share the closing gate of their server
    (closing together, as a service's shutdown closes them, every run is ended first, and a
    run is created only if the time runs have taken to end there is left)."""
    try:
        gates = _task_gates.get()
    except LookupError:
        gates = ClosingGates()
        _task_gates.set(gates)
    return Loop(gates)


class Runtime:
    """The process's background thread and registry of sinks (one per process)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # never taken by a signal handler
        # The loop of the thread running now: a new one for each thread, none before the first
        # (a program whose sinks all run in its own event loop never opens its socket pair).
        self.loop: Loop | None = None
        self.running = False
        self.thread_ident: int | None = None
        self.workers: weakref.WeakSet[Worker] = weakref.WeakSet()  # every active worker
        self.snapshot: tuple[Worker, ...] = ()  # for the signal handler: no lock needed
        self.done = threading.Event()

    # -- registry ----------------------------------------------------------------------------

    def register(self, worker: Worker) -> None:
        with self.lock:
            self.workers.add(worker)
            self.snapshot = tuple(self.workers)
        _install_process_hooks()

    def unregister(self, worker: Worker) -> None:
        with self.lock:
            self.workers.discard(worker)
            self.snapshot = tuple(self.workers)

    # -- the background thread ---------------------------------------------------------------

    def attach(self, worker: Worker) -> None:
        """Run ``worker`` on the background thread (started if needed, without waiting)."""
        with self.lock:
            if not self.running:
                self.running = True
                self.done.clear()
                self.loop = Loop()
                _thread.start_new_thread(self._main, (self.loop,))
            loop = self.loop
            assert loop is not None
            worker.loop = loop
            loop.pending.append(worker)
        loop.waker.wake()

    def _main(self, loop: Loop) -> None:
        self.thread_ident = threading.get_ident()
        try:
            anyio.run(self._serve, loop)
        except BaseException:  # never let the thread die with a traceback at exit
            logger.exception("rlm-mlflow background thread failed")
            with self.lock:
                if self.loop is loop:
                    self.running = False
                orphans, loop.pending = loop.pending, []
            for worker in orphans:
                self.attach(worker)
        finally:
            loop.waker.close()
            self.done.set()

    async def _serve(self, loop: Loop) -> None:
        anyio.to_thread.current_default_thread_limiter().total_tokens = THREADS
        async with anyio.create_task_group() as tg:
            idle_since: float | None = None
            while True:
                with self.lock:
                    new, loop.pending = loop.pending, []
                    idle = not new and not loop.workers and idle_since is not None
                    if idle and time.monotonic() - (idle_since or 0.0) >= IDLE_EXIT:
                        self.running = False  # from now on attach() starts a new thread
                        break
                for worker in new:
                    loop.workers.append(worker)
                    tg.start_soon(self._run_worker, loop, worker)
                idle_since = None if loop.workers else (idle_since or time.monotonic())
                loop.dispatch()
                with anyio.move_on_after(IDLE_EXIT if not loop.workers else 60.0):
                    await loop.waker.wait()
            tg.cancel_scope.cancel()

    async def _run_worker(self, loop: Loop, worker: Worker) -> None:
        try:
            await worker.run()
        finally:
            with contextlib.suppress(ValueError):
                loop.workers.remove(worker)
            self.unregister(worker)
            loop.waker.wake()


_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


def runtime() -> Runtime:
    global _runtime
    found = _runtime
    if found is None:
        with _runtime_lock:
            if _runtime is None:
                _runtime = Runtime()
            found = _runtime
    return found


# -- closing many sinks at once --------------------------------------------------------------


def close_all(status: str | None = None, timeout: float | None = None) -> None:
    """Ask every active sink to close, and wait for all of them against one deadline."""
    current = _runtime
    if current is None:
        return
    workers = [w for w in current.snapshot if not w.stopped.is_set()]
    if not workers:
        return
    if timeout is None:
        timeout = max(w.config.shutdown_timeout for w in workers)
    deadline = time.monotonic() + timeout
    # Each sink's last steps after its deadline (counting, closing its journal) take the loop
    # a few milliseconds: with hundreds of sinks they stop sending that much earlier, so that
    # all of them are done by the deadline.
    sending = deadline - min(timeout * FINISH_SHARE, FINISH_EACH * len(workers))
    reports = CloseReports() if len(workers) > 1 else None
    # Every closing sink in its loop's gate before any is woken: the first one woken could
    # otherwise send its ends and pass the gate before the others have entered it.
    for worker in workers:
        if worker.pipeline.state not in (State.IDLE, State.CLOSED):
            worker.enter_gate()
    for worker in workers:
        if status is not None:
            worker.pipeline.end_status = status
        if worker.close_reports is None:
            worker.close_reports = reports
        request_close(worker, sending)
    last = deadline + CLOSE_GRACE  # one bound for all: never a grace per sink
    for worker in workers:
        worker.stopped.wait(max(0.0, last - time.monotonic()))
    if reports is not None:
        reports.say()  # one line for every sink closed here; a later closer speaks for itself


def request_close(worker: Worker, deadline: float | None) -> None:
    """Ask ``worker`` to close by ``deadline`` (time.monotonic(); None: send everything, in its
    own time); never waits. A later request may bring the deadline closer, never further."""
    from ._pipeline import State

    pipeline = worker.pipeline
    pipeline.active = False
    if pipeline.state in (State.IDLE, State.CLOSED):
        pipeline.state = State.CLOSED
        worker.stopped.set()
        return
    pipeline.state = State.CLOSING
    if deadline is not None and (worker.close_deadline is None or deadline < worker.close_deadline):
        worker.close_deadline = deadline
        worker.close_allowed = deadline - time.monotonic()
    worker.close_requested = True
    waker = pipeline.waker
    if waker is not None:
        waker()


def _close_all_at_exit() -> None:
    try:
        close_all()
    except Exception:  # never break the interpreter's exit
        logger.exception("rlm-mlflow: closing sinks at exit failed")
    signum = _reraise_after_exit
    if signum is not None:
        _reraise(signum)


# -- signals -----------------------------------------------------------------------------------

_previous_signal: dict[int, Any] = {}
# A signal whose handler raises (SIGINT's KeyboardInterrupt, a program's own handler) is not
# run in the middle of a hook, where it would cut a record in two: the hook runs it on return.
_hook_codes: frozenset[CodeType] = frozenset()
deferred_signal: tuple[Callable[[int, FrameType | None], Any], int] | None = None
_reraising: set[int] = set()
_reraise_after_exit: int | None = None
_signal_again = False  # a second signal while the sinks wait for the program to stop
_process_hooks = False
_process_hooks_lock = threading.Lock()


def install_signal_handlers() -> None:
    """Watch SIGTERM and SIGINT (main thread only; a no-op elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        logger.debug("rlm-mlflow: not on the main thread; SIGTERM/SIGINT are not watched")
        return
    for signum in _HANDLED:
        if signum in _previous_signal:
            continue
        try:
            current = signal.getsignal(signum)
            if current is signal.SIG_IGN or current is _on_signal:
                continue  # the program chose to ignore it: so do we
            # Known before ours is in place: a signal that comes the instant it is finds the
            # program's handler to call, not the default action (die).
            _previous_signal[signum] = current
            signal.signal(signum, _on_signal)
        except (ValueError, OSError):  # not the main interpreter, or not allowed
            _previous_signal.pop(signum, None)
            continue
    _fork.hold_through_fork(frozenset(_previous_signal))


def rearm_signal_handlers() -> None:
    """A sink's first event: watch SIGTERM and SIGINT if it is on the main thread and nobody
    does yet (a sink built before a fork, used in the child; see :func:`_after_fork_in_child`)."""
    if not _previous_signal:
        install_signal_handlers()


def protect(*functions: Callable[..., Any]) -> None:
    """Signals arriving while one of ``functions`` runs on the main thread wait for its end."""
    global _hook_codes
    _hook_codes = _hook_codes | {f.__code__ for f in functions}


def _inside_a_hook(frame: FrameType | None) -> bool:
    depth = 0
    while frame is not None and depth < 64:
        if frame.f_code in _hook_codes:
            return True
        frame, depth = frame.f_back, depth + 1
    return False


def run_deferred_signal() -> None:
    """Called by a hook as it returns: run the handler a signal during the hook was kept for."""
    global deferred_signal
    if threading.current_thread() is not threading.main_thread():
        return  # the hook the signal came in is on the main thread: it runs the handler
    deferred, deferred_signal = deferred_signal, None
    if deferred is not None:
        handler, signum = deferred
        handler(signum, sys._getframe(1))


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _on_signal(signum: int, frame: FrameType | None) -> None:
    global _reraise_after_exit, deferred_signal, _signal_again
    previous = _previous_signal.get(signum, signal.SIG_DFL)
    if signum in _reraising:  # the sinks are closed: die of the signal, as was asked
        _die(signum)
        return
    current = _runtime
    workers = current.snapshot if current is not None else ()
    for worker in workers:
        worker.pipeline.end_status = "KILLED"
    if callable(previous) and previous is not signal.default_int_handler:
        if _inside_a_hook(frame):
            deferred_signal = (previous, signum)
            return
        previous(signum, frame)  # the program's own handler decides; exit hooks close us
        return
    if signum == signal.SIGINT and previous is signal.default_int_handler:
        if _inside_a_hook(frame):
            deferred_signal = (_raise_interrupt, signum)
            return
        raise KeyboardInterrupt  # Python's default: unwinds, then the exit hook closes us
    # The default action (die): let the background thread close every sink, then die of it.
    if current is None or not any(not w.stopped.is_set() for w in workers):
        _die(signum)
        return
    if _reraise_after_exit is not None:  # a second signal: stop taking hooks, close now
        _signal_again = True
        return
    _reraise_after_exit = signum
    # A thread of its own does the waiting; starting it takes no lock the interrupted code
    # could hold (``_thread`` does not wait for the new thread, unlike ``threading``).
    _thread.start_new_thread(_close_after_signal, (signum,))


def _close_after_signal(signum: int) -> None:
    try:
        timeout = _go_on_after_signal()
        close_all("KILLED", timeout)
    finally:
        _reraise(signum)


def _go_on_after_signal() -> float | None:
    """The program goes on after the signal until it dies: keep taking its hooks while it
    steps (they must land, and the runs' ends come after them), until it has been silent for
    ``SIGNAL_SILENCE`` or only the reserve of the deadline is left. Returns the time left."""
    current = _runtime
    workers = [w for w in current.snapshot if not w.stopped.is_set()] if current else []
    if not workers:
        return None
    timeout = max(w.config.shutdown_timeout for w in workers)
    deadline = time.monotonic() + timeout
    for worker in workers:  # what waits goes now, while the program goes on
        worker.flush_requested = True
        waker = worker.pipeline.waker
        if waker is not None:
            waker()
    low, high = SIGNAL_RESERVE_BOUNDS
    reserve = min(max(timeout * SIGNAL_RESERVE, low), high, timeout)
    accepted = -1
    silent_since = time.monotonic()
    silent_looks = 0  # a stalled process stalls this thread too: silence is seen, not assumed
    while True:
        now = time.monotonic()
        if now >= deadline - min(max(reserve, _ends_take(workers)), timeout) or _signal_again:
            break
        seen = sum(w.pipeline.accepted.value for w in workers)
        if seen != accepted:
            accepted, silent_since, silent_looks = seen, now, 0
        else:
            silent_looks += 1
            if now - silent_since >= SIGNAL_SILENCE and silent_looks >= SIGNAL_SILENT_LOOKS:
                break
        if all(w.stopped.is_set() or not w.pipeline.active for w in workers):
            break  # closed meanwhile (by the program, or the sink was dropped)
        time.sleep(0.02)
    return max(0.0, deadline - time.monotonic())


def _ends_take(workers: Sequence[Worker]) -> float:
    """How long ending every open run of ``workers`` is expected to take (read from the
    signal's thread: a dict's size and a float per sink, no lock). Hundreds of runs open
    against a server that answers one request at a time need seconds, more than a fixed
    share of the deadline leaves them."""
    # Open runs, and runs whose start or end the worker has not taken yet (a backlog).
    runs = sum(len(w.pipeline.by_id) + len(w.pipeline.ctl) for w in workers)
    answered = max((w.caller.answered_in for w in workers), default=0.0)
    return SIGNAL_ENDS_MARGIN * 2 * runs * answered / SIGNAL_ENDS_AT_ONCE


def _die(signum: int) -> None:
    """Raise ``signum`` again with its default action (main thread)."""
    try:
        signal.signal(signum, signal.SIG_DFL)
    except ValueError:  # not the main thread
        os._exit(128 + signum)
    os.kill(os.getpid(), signum)


def _reraise(signum: int) -> None:
    """From any thread: have the main thread die of ``signum``; exit hard if it cannot."""
    _reraising.add(signum)
    if threading.current_thread() is threading.main_thread():
        _die(signum)
        return
    os.kill(os.getpid(), signum)  # our handler runs on the main thread and calls _die()
    time.sleep(2.0)  # the main thread is stuck in C code: do not hang the process
    os._exit(128 + signum)


def restore_signal_handlers() -> None:
    """Put back the handlers that were there before (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum, previous in list(_previous_signal.items()):
        with contextlib.suppress(ValueError, OSError, TypeError):
            if signal.getsignal(signum) is _on_signal:
                signal.signal(signum, previous)
            _previous_signal.pop(signum, None)
    _fork.hold_through_fork(frozenset(_previous_signal))


# -- uncaught exceptions, exit, fork ----------------------------------------------------------

_previous_excepthook: Callable[..., Any] | None = None
_previous_thread_excepthook: Callable[[threading.ExceptHookArgs], Any] | None = None


def _install_process_hooks() -> None:
    global _process_hooks, _previous_excepthook, _previous_thread_excepthook
    with _process_hooks_lock:
        if _process_hooks:
            return
        _process_hooks = True
        _previous_excepthook = sys.excepthook
        _previous_thread_excepthook = threading.excepthook
        sys.excepthook = _on_uncaught
        threading.excepthook = _on_thread_uncaught
        atexit.register(_close_all_at_exit)
        _close_at_multiprocessing_exit(None)


class _Forked:
    """What multiprocessing holds (weakly) for our after-fork hook in its children."""


_FORKED = _Forked()


def _close_at_multiprocessing_exit(_: object) -> None:
    """In a process multiprocessing started by forking (or from its fork server), which ends
    with ``os._exit()`` after multiprocessing's own exit finalizers and never runs ``atexit``'s:
    close the sinks among those finalizers (a program that imports no multiprocessing has
    none)."""
    util = sys.modules.get("multiprocessing.util")
    process = sys.modules.get("multiprocessing.process")
    if util is None or process is None or process.parent_process() is None:
        return
    with contextlib.suppress(Exception):
        util.Finalize(None, _close_all_at_exit, exitpriority=100)


def after_mlflow_import() -> None:
    """Run our exit hook before mlflow's (``atexit`` runs the latest first): mlflow's own marks
    its active fluent run FINISHED; ours must have ended our runs with the right status first."""
    if "mlflow" in sys.modules and _process_hooks:
        atexit.unregister(_close_all_at_exit)
        with contextlib.suppress(RuntimeError):  # "can't register atexit after shutdown"
            atexit.register(_close_all_at_exit)


def _on_uncaught(
    exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None
) -> None:
    status = "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED"
    current = _runtime
    for worker in current.snapshot if current is not None else ():
        worker.pipeline.end_status = status
    hook = _previous_excepthook or sys.__excepthook__
    hook(exc_type, exc, tb)


def _on_thread_uncaught(args: threading.ExceptHookArgs) -> None:
    thread = args.thread
    current = _runtime
    if thread is not None and thread.ident is not None and current is not None:
        for worker in current.snapshot:
            if worker.pipeline.active:
                worker.pipeline.end_open_runs("FAILED", thread=thread.ident)
    hook = _previous_thread_excepthook or threading.__excepthook__
    hook(args)


def _after_fork_in_child() -> None:
    """The child has no background thread: forget the parent's (each sink's pipeline and worker
    renew themselves, see :func:`follow_fork`).

    Nor does it keep the parent's signal handlers until one of its sinks is in use (see
    :func:`rearm_signal_handlers`). A Python handler only runs when the main thread runs Python:
    a pool's worker blocked in C on the lock a terminating pool holds never would, and a SIGTERM
    that the default action would end is kept forever (``Pool.terminate()`` hangs). The signals
    held through the fork are handled once this returns, by the program's own handlers."""
    global _runtime, _runtime_lock, _process_hooks_lock, deferred_signal
    global _reraise_after_exit, _signal_again
    _runtime = None
    _runtime_lock = threading.Lock()
    _process_hooks_lock = threading.Lock()
    deferred_signal, _reraise_after_exit, _signal_again = None, None, False
    _reraising.clear()
    restore_signal_handlers()
    util = sys.modules.get("multiprocessing.util")
    if util is not None and _process_hooks:
        # A multiprocessing child: its finalizers are cleared once this returns, then its
        # after-fork hooks run; ours registers the close among the new finalizers.
        with contextlib.suppress(Exception):
            util.register_after_fork(_FORKED, _close_at_multiprocessing_exit)


def _renew_worker(worker: Worker) -> None:
    pipeline = worker.pipeline
    pipeline.after_fork_in_child()  # first: the worker's exporters take its new key prefix
    if pipeline.config.enabled and pipeline.state is State.IDLE:
        worker.reset()


def follow_fork(worker: Worker) -> None:
    """Give ``worker`` (and its pipeline) fresh state in every forked child, used or not."""
    _fork.register(worker, _renew_worker)


_fork.at_fork_in_child(_after_fork_in_child)

"""How the process ends, and what each way means for the runs still open.

- clean exit: the ``atexit`` hook closes every sink; runs that never ended become FAILED.
- an uncaught exception: FAILED too (``sys.excepthook``); in a thread, that thread's open runs
  are ended FAILED at once (``threading.excepthook``), the program going on.
- SIGTERM / SIGINT: open runs become KILLED, with their end time. When the previous handler is
  the default, the sinks are closed (within ``shutdown_timeout``) and the signal is then raised
  again with the default action, so the process still dies of it; a Python handler that was there
  before is called after ours.
- fork: the child gets fresh sinks of its own (empty queue, new journal, no worker yet) and never
  sends what the parent had queued.

Every hook here is installed once per process, chains to what was there, and holds sinks weakly.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import threading
import weakref
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._sink import MLflowSink

logger = logging.getLogger("rlm_mlflow")

_sinks: weakref.WeakSet[MLflowSink] = weakref.WeakSet()
_lock = threading.Lock()
_installed = False
_previous_signal: dict[int, Any] = {}
_previous_excepthook: Callable[..., Any] | None = None
_previous_thread_excepthook: Callable[[threading.ExceptHookArgs], Any] | None = None
_HANDLED = (signal.SIGTERM, signal.SIGINT)


def register(sink: MLflowSink, *, signals: bool) -> None:
    """Watch over ``sink`` until it closes."""
    global _installed
    with _lock:
        _sinks.add(sink)
        if not _installed:
            _installed = True
            _install_excepthooks()
            os.register_at_fork(after_in_child=_after_fork_in_child)
            atexit.register(_close_all_at_exit)
    if signals:
        _install_signal_handlers()


def unregister(sink: MLflowSink) -> None:
    with _lock:
        _sinks.discard(sink)


def reorder_exit_hook() -> None:
    """Run our exit hook before any registered so far (``atexit`` runs the latest first).

    The worker calls this after importing mlflow, whose own exit hook marks its active fluent
    run FINISHED: ours must have ended our runs with the right status first.
    """
    atexit.unregister(_close_all_at_exit)
    atexit.register(_close_all_at_exit)


def _live() -> list[MLflowSink]:
    with _lock:
        return list(_sinks)


def _close_all_at_exit() -> None:
    for sink in _live():
        try:
            sink.close()
        except Exception:  # never break the interpreter's exit
            logger.exception("rlm-mlflow: closing a sink at exit failed")


# -- signals -----------------------------------------------------------------------------------


def _install_signal_handlers() -> None:
    if threading.current_thread() is not threading.main_thread():
        logger.debug("rlm-mlflow: not on the main thread; SIGTERM/SIGINT are not watched")
        return
    with _lock:
        for signum in _HANDLED:
            if signum in _previous_signal:
                continue
            try:
                current = signal.getsignal(signum)
                if current is signal.SIG_IGN:
                    continue  # the program chose to ignore it: so do we
                signal.signal(signum, _on_signal)
            except (ValueError, OSError):  # not the main interpreter, or not allowed
                continue
            _previous_signal[signum] = current


def _on_signal(signum: int, frame: FrameType | None) -> None:
    previous = _previous_signal.get(signum, signal.SIG_DFL)
    sinks = _live()
    for sink in sinks:
        sink._mark_interrupted("KILLED")
    if callable(previous) and previous is not signal.default_int_handler:
        previous(signum, frame)  # the program's own handler decides; exit hooks close us
        return
    if signum == signal.SIGINT:
        raise KeyboardInterrupt  # Python's default: unwinds, then the exit hook closes us
    # SIGTERM's default kills the process without exit hooks: close first, on a thread of its
    # own (this handler may have interrupted a hook holding a sink's lock), then die of it.
    closer = threading.Thread(target=_close_all_at_exit, name="rlm-mlflow-signal")
    closer.start()
    closer.join(max((s.config.shutdown_timeout for s in sinks), default=0.0) + 1.0)
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def restore_signal_handlers() -> None:
    """Put back the handlers that were there before, once no sink is left."""
    if threading.current_thread() is not threading.main_thread():
        return
    with _lock:
        if _sinks:
            return
        for signum, previous in list(_previous_signal.items()):
            try:
                if signal.getsignal(signum) is _on_signal:
                    signal.signal(signum, previous)
                _previous_signal.pop(signum, None)
            except (ValueError, OSError, TypeError):
                continue


# -- uncaught exceptions -----------------------------------------------------------------------


def _install_excepthooks() -> None:
    global _previous_excepthook, _previous_thread_excepthook
    _previous_excepthook = sys.excepthook
    _previous_thread_excepthook = threading.excepthook
    sys.excepthook = _on_uncaught
    threading.excepthook = _on_thread_uncaught


def _on_uncaught(
    exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None
) -> None:
    status = "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED"
    for sink in _live():
        sink._mark_interrupted(status)
    hook = _previous_excepthook or sys.__excepthook__
    hook(exc_type, exc, tb)


def _on_thread_uncaught(args: threading.ExceptHookArgs) -> None:
    thread = args.thread
    if thread is not None and thread.ident is not None:
        for sink in _live():
            sink._fail_runs_of_thread(thread.ident)
    hook = _previous_thread_excepthook or threading.__excepthook__
    hook(args)


# -- fork --------------------------------------------------------------------------------------


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()  # the parent's may have been held by a thread that is gone
    for sink in list(_sinks):
        sink._reset_after_fork()

"""Fork is an event: every object that holds per-process state renews it in a forked child.

A sink built before a fork (a module-level sink under a fork pool, ``gunicorn --preload``) is
copied into every child, used or not. Whatever identifies the process's data must be drawn again
there: the key prefix of its runs (``<prefix>-<run_no>``, from which trace and span ids are
derived too), the run counter, and the queue, journal and worker it had. Each holder registers
at construction, held weakly, with the function that renews it; one ``os.register_at_fork``
handler calls them all in the child, module-level resets first, then holders in the order they
were registered (a sink's pipeline before its worker).

:func:`generation` changes in each child, so a holder renewed by someone else first (a worker
renews its pipeline before itself) can tell it is already fresh.

Signals with a Python handler of ours (SIGTERM, SIGINT) are blocked in the forking thread from
just before the fork until the child has renewed everything. Python forgets, in a new child,
every signal that arrived before its own after-fork work (``_PySignal_AfterFork``): a SIGTERM
sent to a child that has not run yet (a fork pool terminated on a busy machine) would be lost and
the child would never die. Blocked, it stays pending and is handled once the child is ready.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import signal
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

logger = logging.getLogger("rlm_mlflow")

T = TypeVar("T")

#: A sink's key prefix: 64 random bits, drawn at construction and again in each forked child, so
#: that keys are unique across processes without relying on process ids (which repeat).
KEY_PREFIX = re.compile(r"[0-9a-f]{16}")


def new_prefix() -> str:
    """A new key prefix (:data:`KEY_PREFIX`)."""
    return secrets.token_hex(8)


_holders: weakref.WeakKeyDictionary[Any, Callable[[Any], None]] = weakref.WeakKeyDictionary()
_module_resets: list[Callable[[], None]] = []
_generation = 0


def generation() -> int:
    """How many forks separate this process from the first one that imported the package."""
    return _generation


def register(holder: T, renew: Callable[[T], None]) -> None:
    """Call ``renew(holder)`` in every child forked while ``holder`` is alive. ``renew`` must
    not hold ``holder`` itself (a plain function or an unbound method), or it never goes."""
    _holders[holder] = renew


def at_fork_in_child(reset: Callable[[], None]) -> None:
    """Call ``reset()`` in every forked child, before any holder is renewed (module state)."""
    if reset not in _module_resets:
        _module_resets.append(reset)


_held: frozenset[int] = frozenset()
_forking = threading.local()  # the signal mask of a thread that is forking


def hold_through_fork(signals: frozenset[int]) -> None:
    """Keep ``signals`` (those our Python handler takes) pending across every fork."""
    global _held
    _held = signals


def _hold_signals() -> None:
    if _held:
        try:
            _forking.mask = signal.pthread_sigmask(signal.SIG_BLOCK, _held)
        except (OSError, ValueError):  # not on this platform
            _forking.mask = None


def _release_signals() -> None:
    mask = getattr(_forking, "mask", None)
    _forking.mask = None
    if mask is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _after_fork_in_child() -> None:
    try:
        _renew_all()
    finally:
        _release_signals()  # a signal kept pending through the fork is handled now


def _renew_all() -> None:
    global _generation
    _generation += 1
    for reset in list(_module_resets):
        try:
            reset()
        except Exception:  # the child must go on: a sink left stale is better than no child
            logger.debug("rlm-mlflow: resetting %r after fork failed", reset, exc_info=True)
    for holder, renew in list(_holders.items()):
        try:
            renew(holder)
        except Exception:
            logger.debug("rlm-mlflow: renewing %r after fork failed", holder, exc_info=True)


os.register_at_fork(
    before=_hold_signals, after_in_parent=_release_signals, after_in_child=_after_fork_in_child
)

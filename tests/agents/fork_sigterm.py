"""SIGTERM sent to forked children of a process whose sink watches SIGTERM.

Usage: fork_sigterm.py TRACKING_URI EXPERIMENT CHILDREN MODE

Builds a sink (which watches SIGTERM with a Python handler), then forks CHILDREN children one by
one and sends each SIGTERM. MODE says when and what the child is doing:

- ``early``: at once after the fork, before the child may have run at all; the child waits up
  to 60 s in Python and exits 0.
- ``blocked``: once the child sleeps in C code that never returns to Python (a second lock of a
  locked pthread mutex), as a pool's worker can, waiting on the lock a terminating pool holds.
  A Python handler never runs there: only a default action ends the child.
- ``used``: once the child has called a hook on its main thread; it then waits in Python.

Prints ``ENDED <json>``: how each child ended (``signal 15``, ``exit N`` or ``hung`` if it was
still alive 60 s after the signal and was killed), then ``HANDLER <json>``: for ``used``, the
name of the SIGTERM handler each child had once its sink was in use.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import time

from agentkit import make_sink, say


def block_in_c() -> None:
    mutex = ctypes.create_string_buffer(64)  # zeroed: PTHREAD_MUTEX_INITIALIZER on Linux
    libc = ctypes.CDLL(None)
    libc.pthread_mutex_lock(mutex)
    libc.pthread_mutex_lock(mutex)  # never returns: signals do not interrupt it


def child(sink: object, mode: str, ready: int) -> None:
    if mode == "used":
        sink.on_run_start("child", task="t", environment="e", params={})  # type: ignore[attr-defined]
        handler = signal.getsignal(signal.SIGTERM)
        os.write(ready, getattr(handler, "__name__", str(handler)).encode())
    elif mode == "blocked":
        os.write(ready, b"blocking")
        block_in_c()
    else:
        os.write(ready, b"-")
    deadline = time.monotonic() + 60.0
    while time.monotonic() < deadline:
        time.sleep(0.01)
    os._exit(0)


def wait_blocked(pid: int) -> None:
    """Until the child sleeps in a futex (the mutex), within 60 s."""
    deadline = time.monotonic() + 60.0
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/wchan") as wchan:
            if "futex" in wchan.read():
                return
        time.sleep(0.01)


def reap(pid: int) -> str:
    deadline = time.monotonic() + 60.0
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            if os.WIFSIGNALED(status):
                return f"signal {os.WTERMSIG(status)}"
            return f"exit {os.WEXITSTATUS(status)}"
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return "hung"


def main() -> None:
    uri, experiment, count, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    sink = make_sink(uri, experiment, shutdown_timeout=1.0)
    ended, handlers = [], []
    for _ in range(count):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            try:
                child(sink, mode, write_end)
            finally:
                os._exit(3)
        os.close(write_end)
        if mode != "early":
            handlers.append(os.read(read_end, 100).decode())
        if mode == "blocked":
            wait_blocked(pid)
        os.kill(pid, signal.SIGTERM)
        os.close(read_end)
        ended.append(reap(pid))
    say("ENDED", json.dumps(ended))
    say("HANDLER", json.dumps(handlers if mode == "used" else []))
    sink.close()


if __name__ == "__main__":
    main()

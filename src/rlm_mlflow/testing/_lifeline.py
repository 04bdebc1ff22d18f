"""Run a command for as long as the process that asked for it lives.

``python -m rlm_mlflow.testing._lifeline PARENT -- COMMAND...`` starts COMMAND in its own process
group (this process leads it) and stops the whole group when PARENT is gone, however it went:
a test run killed with SIGTERM or SIGKILL skips its fixtures' teardown, and a server it started
(``mlflow server`` starts ``uvicorn`` as a child of its own) would otherwise run on, holding its
port and its files. A SIGTERM to the group (``MlflowServer.stop``) stops it as before.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from types import FrameType

#: How often the parent is looked for: a child of a dead process gets a new parent.
WATCH_EVERY = 0.5
#: How long the command has to stop after SIGTERM before the group is killed.
STOP_GRACE = 10.0


def _stop_group(child: subprocess.Popen[bytes], code: int) -> None:
    """SIGTERM to the group, a grace period for the command, then SIGKILL to what is left."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the group's signal reaches this one too
    with contextlib.suppress(ProcessLookupError):
        os.killpg(os.getpgrp(), signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.wait(STOP_GRACE)
    try:
        os.killpg(os.getpgrp(), signal.SIGKILL)  # the command's own children; this one too
    finally:
        os._exit(code)


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        sys.stderr.write("usage: python -m rlm_mlflow.testing._lifeline PARENT -- COMMAND...\n")
        return 2
    parent = int(argv[0])
    started: list[subprocess.Popen[bytes]] = []

    def on_term(signum: int, frame: FrameType | None) -> None:
        if not started:  # the command may be forked already: the group goes, this one too
            os.killpg(os.getpgrp(), signal.SIGKILL)
        _stop_group(started[0], 128 + signum)

    signal.signal(signal.SIGTERM, on_term)  # before the command starts: it is never orphaned
    if os.getppid() != parent:  # gone before this process began
        return 1
    child = subprocess.Popen(argv[2:])
    started.append(child)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(WATCH_EVERY)
        os.kill(os.getpid(), signal.SIGTERM)  # handled on the main thread: on_term

    threading.Thread(target=watch, name="lifeline", daemon=True).start()
    return child.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

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

#: How often the parent is looked for (a child of a dead process gets a new parent), and a
#: SIGTERM's mark.
WATCH_EVERY = 0.5
#: How long the command has to stop after SIGTERM before the group is killed.
STOP_GRACE = 10.0


def _stop_group(child: subprocess.Popen[bytes], code: int) -> int:
    """SIGTERM to the group, a grace period for the command, then SIGKILL to what is left."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the group's signal reaches this one too
    with contextlib.suppress(ProcessLookupError):
        os.killpg(os.getpgrp(), signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.wait(STOP_GRACE)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(os.getpgrp(), signal.SIGKILL)  # the command's own children; this one too
    return code


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        sys.stderr.write("usage: python -m rlm_mlflow.testing._lifeline PARENT -- COMMAND...\n")
        return 2
    parent = int(argv[0])
    # Only marked here: the main thread may be inside the wait for the command (holding its
    # lock) when the signal comes; the loop below stops the group.
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append(signum))
    if os.getppid() != parent:  # gone before this process began
        return 1
    child = subprocess.Popen(argv[2:])
    while True:
        with contextlib.suppress(subprocess.TimeoutExpired):
            return child.wait(WATCH_EVERY)
        if stopping:
            return _stop_group(child, 128 + stopping[0])
        if os.getppid() != parent:
            return _stop_group(child, 1)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

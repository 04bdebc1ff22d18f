"""SIGTERM sent to forked children at once, before they may have run at all.

Usage: fork_sigterm.py TRACKING_URI EXPERIMENT CHILDREN

Builds a sink (which watches SIGTERM with a Python handler), then forks CHILDREN children one by
one; each child waits up to 60 s and exits 0. The parent sends SIGTERM right after each fork and
prints ``ENDED <json>``: how each child ended (``signal 15`` or ``exit 0``).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

from agentkit import make_sink, say


def main() -> None:
    uri, experiment, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    sink = make_sink(uri, experiment)
    ended = []
    for _ in range(count):
        pid = os.fork()
        if pid == 0:
            deadline = time.monotonic() + 60.0
            while time.monotonic() < deadline:
                time.sleep(0.01)
            os._exit(0)
        os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            ended.append(f"signal {os.WTERMSIG(status)}")
        else:
            ended.append(f"exit {os.WEXITSTATUS(status)}")
    say("ENDED", json.dumps(ended))
    sink.close()


if __name__ == "__main__":
    main()

"""The child process: ``python -m benchkit.child SPEC`` runs one task and prints one result line.

Every measurement runs in a fresh interpreter, so one sink's threads, imports and memory cannot
colour the next one's figures.
"""

from __future__ import annotations

import json
import sys
import time

from .measure import HTTP
from .scale import SCALE_TASKS
from .tasks import LINGER_KEY, TASKS

RESULT_PREFIX = "BENCH-RESULT "


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    spec = json.loads(args[0])
    if spec["task"] != "construct":  # that one must not import anything before the sink does
        HTTP.install()
    result = {**TASKS, **SCALE_TASKS}[spec["task"]](spec)
    linger = float(result.pop(LINGER_KEY, 0.0))
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    if linger:  # the parent ends this process (a signal) while it waits
        time.sleep(linger)
    return 0


if __name__ == "__main__":
    sys.exit(main())

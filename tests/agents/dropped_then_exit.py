"""Many sinks, each logging one run, dropped without close(), then the process exits at once.

Usage: dropped_then_exit.py TRACKING_URI EXPERIMENT SINKS SHUTDOWN_TIMEOUT STEPS

Sink ``n`` logs run ``dropped-n`` with STEPS steps; even runs are ended (FINISHED), odd runs are
left open (the exit ends them FAILED). The sinks are dropped without close(). After the last
hook the agent prints ``HOOKED <json>`` (its file descriptors and threads then) and returns from
main: the exit hook must end every run within the shutdown timeout.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import threading

from agentkit import make_sink, say, step


def main() -> None:
    uri, experiment, count, timeout, steps = sys.argv[1:6]
    for n in range(int(count)):
        sink = make_sink(uri, experiment, flush_interval=1.0, shutdown_timeout=float(timeout))
        run = f"dropped-{n}"
        sink.on_run_start(run, task="t", environment="e", params={"n": n})
        for number in range(int(steps)):
            step(sink, run, number)
        if n % 2 == 0:
            sink.on_run_end(run, result={"completed": True, "steps": int(steps)}, run_path=None)
        del sink
    gc.collect()
    say(
        "HOOKED",
        json.dumps({"fds": len(os.listdir("/proc/self/fd")), "threads": threading.active_count()}),
    )


if __name__ == "__main__":
    main()

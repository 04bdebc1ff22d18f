"""Many sinks, each with runs open and sent, stepping until SIGTERM (whose action is to die).

Usage: many_sinks_sigterm.py TRACKING_URI EXPERIMENT SINKS RUNS

SINKS sinks (``shutdown_timeout`` 6 s), each with RUNS runs ``s<i>-r<k>`` open; once every sink
has sent them it prints ``READY`` and steps every run, one round every 0.1 s, until the signal's
default action ends the process.
"""

from __future__ import annotations

import sys
import time

from agentkit import make_sink, say, step


def main() -> None:
    uri, experiment, count, runs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    sinks = [make_sink(uri, experiment, shutdown_timeout=6.0) for _ in range(count)]
    names = {}
    for index, sink in enumerate(sinks):
        for k in range(runs):
            name = names[(index, k)] = f"s{index}-r{k}"
            sink.on_run_start(name, task="t", environment="e", params={})
    if not all(sink.flush(120) for sink in sinks):
        raise SystemExit("the runs were not sent")
    say("READY")
    number = 0
    while True:
        for (index, _), name in names.items():
            step(sinks[index], name, number)
        number += 1
        time.sleep(0.1)  # the model thinking


if __name__ == "__main__":
    main()

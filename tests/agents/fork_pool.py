"""A sink that is built and never used, and a forked pool whose workers never log.

Usage: fork_pool.py TRACKING_URI EXPERIMENT JOURNAL_DIR

Prints ``UNUSED <json>``: the threads the unused sink added and what its journal directory holds
right after it was built. Then runs two forked pools (one closed and joined, one terminated) and
prints ``DONE``; it exits normally without ever calling a hook.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import threading

from agentkit import make_sink, say


def square(n: int) -> int:
    return n * n


def main() -> None:
    uri, experiment, journal_dir = sys.argv[1:4]
    before = threading.active_count()
    sink = make_sink(uri, experiment)
    entries = sorted(os.listdir(journal_dir)) if os.path.isdir(journal_dir) else []
    say(
        "UNUSED",
        json.dumps({"threads_added": threading.active_count() - before, "journal": entries}),
    )
    context = multiprocessing.get_context("fork")
    pool = context.Pool(3)
    total = sum(pool.map(square, range(30)))
    pool.close()
    pool.join()
    with context.Pool(2) as pool:  # leaving the block terminates its workers (SIGTERM)
        total += sum(pool.map(square, range(10)))
    say("DONE", total, sink.status()["enabled"])


if __name__ == "__main__":
    main()

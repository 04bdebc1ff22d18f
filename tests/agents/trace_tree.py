"""An agent whose runs make a recursion tree with rich step events, until it is killed.

Usage: trace_tree.py TRACKING_URI EXPERIMENT [SPAN_BUDGET [FILE_LIMIT_BYTES]]

With a span budget, the sink first sends a run of its own and prints ``READY``; the tree begins
on a line from stdin (the test has set its faults). With a file limit, no file of the process
grows past that many bytes from then on (``ulimit -f``: the journal's segments are allocated
already, and the files beside it, such as the traces' shapes, can no longer be written).

The root run ``tree`` steps; every third step delegates to a child run of two steps. After each
hook of a step has returned it prints ``STEP n`` (n: the root's steps so far); from then on that
step, with its spans, is the sink's responsibility whatever happens to the process.
"""

from __future__ import annotations

import resource
import sys
import time
from typing import Any

from agentkit import make_sink, say, sink_with_a_first_run


def event(number: int, tokens: int, *, delegate: bool = False) -> dict[str, Any]:
    action: dict[str, Any] = (
        {"action": "delegate"}
        if delegate
        else {
            "action": "run_python",
            "code": f"print({number} * 2)\n" * 20,
            "rationale": "check the arithmetic",
        }
    )
    return {
        "step": number,
        "reward": 0.5,
        "depth": 0,
        "action": action,
        "observation": {"success": True, "stdout": f"{number * 2}\n" * 40, "execution_time": 0.01},
        "usage": {"prompt_tokens": tokens, "completion_tokens": tokens // 4, "total_calls": 1},
    }


def main() -> None:
    uri, experiment = sys.argv[1:3]
    if len(sys.argv) > 3:
        sink = sink_with_a_first_run(uri, experiment, span_budget=int(sys.argv[3]))
        if len(sys.argv) > 4:
            _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
            resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[4]), hard))
    else:
        sink = make_sink(uri, experiment, span_budget=1_000_000)  # every step as a span
    sink.on_run_start("tree", task="grow a tree", environment="pure_rlm", params={"depth": 0})
    number = 0
    while True:
        if number % 3 == 2:
            child = f"tree-child-{number}"
            params = {"parent_run_id": "tree", "depth": 1}
            sink.on_run_start(child, task="a branch", environment="pure_rlm", params=params)
            for inner in range(2):
                sink.on_step(child, event=event(inner, 40), cumulative_reward=0.5 * (inner + 1))
            result = {"completed": True, "steps": 2, "total_reward": 1.0}
            sink.on_run_end(child, result=result, run_path=None)
            sink.on_step("tree", event=event(number, 200, delegate=True), cumulative_reward=1.0)
        else:
            sink.on_step("tree", event=event(number, 100), cumulative_reward=1.0)
        say("STEP", number)
        number += 1
        time.sleep(0.004)  # the model thinking


if __name__ == "__main__":
    main()

"""A module-level sink built and never used, then two forked children that each log a run.

Usage: fork_children.py TRACKING_URI EXPERIMENT

Builds one sink, forks children ``a`` and ``b`` (each prints ``CHILD <name> <pid>``), then reads
commands from stdin, one a line, and passes each to its child:

- ``<name> log <n>``: the child starts run ``run-<name>`` and logs steps 0..n-1, then prints
  ``LOGGED <name>``;
- ``<name> end``: the child ends its run, closes its sink and prints ``CLOSED <name> <status>``
  (its ``status()`` as JSON), then exits.

A child whose parent is gone (its command pipe closed) exits at once, so nothing outlives the
test. The parent exits at the end of stdin.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

from agentkit import make_sink, say, step

sink = make_sink(sys.argv[1], sys.argv[2])


def child(name: str, commands: int) -> None:
    say("CHILD", name, os.getpid())
    run_id = f"run-{name}"
    with os.fdopen(commands, "r") as lines:
        for line in lines:
            words = line.split()
            if words[0] == "log":
                sink.on_run_start(run_id, task="a task", environment="pure_rlm", params={})
                for number in range(int(words[1])):
                    step(sink, run_id, number)
                say("LOGGED", name)
            elif words[0] == "end":
                result = {"completed": True, "steps": 0, "total_reward": 0.0}
                sink.on_run_end(run_id, result=result, run_path=None)
                sink.close(60)
                say("CLOSED", name, json.dumps(sink.status()))
                return


def main() -> None:
    pipes: dict[str, int] = {}
    children: list[int] = []
    for name in ("a", "b"):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(write)
            for other in pipes.values():
                os.close(other)
            code = 0
            try:
                child(name, read)
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                os._exit(code)
        os.close(read)
        pipes[name] = write
        children.append(pid)
    for line in sys.stdin:
        name, _, command = line.strip().partition(" ")
        os.write(pipes[name], command.encode() + b"\n")
    for write in pipes.values():
        os.close(write)
    for pid in children:
        os.waitpid(pid, 0)


if __name__ == "__main__":
    main()

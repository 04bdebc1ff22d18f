"""A real agent loop in a process of its own, for tests that kill it, signal it or let it crash.

Usage: python agent_process.py MODE TRACKING_URI EXPERIMENT

It prints ``READY`` on stdout once the events the test relies on have been handed to the sink
(every hook call before it has returned), then behaves according to MODE.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

from rlm_mlflow import MLflowSink


def steps(sink: MLflowSink, run_id: str, count: int, start: int = 0) -> None:
    for i in range(start, start + count):
        sink.on_step(run_id, event={"step": i, "reward": 1.0}, cumulative_reward=float(i + 1))


def large_output(number: int) -> str:
    """A step's 8 KB of stdout, different for each step."""
    return "".join(f"step {number} window {i:5d}: 3 primes\n" for i in range(300))


def large_step(number: int) -> dict[str, object]:
    return {
        "step": number,
        "reward": 1.0,
        "action": {"action": "run_python", "code": "x = 1\n" * 340, "rationale": "look"},
        "observation": {"success": True, "stdout": large_output(number), "stderr": ""},
    }


def ready() -> None:
    sys.stdout.write("READY\n")
    sys.stdout.flush()


def main() -> None:
    mode, uri, experiment = sys.argv[1:4]
    # SIGINT raises KeyboardInterrupt, as in a terminal, whatever this process inherited (a
    # program started in the background by a shell has SIGINT ignored, and so its children).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # "large-steps" is killed before its worker may read a record back: that worker sends
    # nothing until told (a worker draining every 0.1 s can get there first on a busy machine).
    asleep = mode == "large-steps"
    sink = MLflowSink(
        enabled=True,
        experiment=experiment,
        tracking_uri=uri,
        flush_interval=60.0 if asleep else 0.1,
        batch_trigger=10**9 if asleep else None,
        retry_initial=0.05,
        retry_max_wait=0.5,
        shutdown_timeout=5.0,
    )
    sink.on_run_start("main", task="t", environment="e", params={"mode": mode})
    steps(sink, "main", 5)

    if mode == "exit":  # ends without close(): the exit hook must end every run
        sink.on_run_start("left-open", task="t", environment="e", params={})
        steps(sink, "left-open", 2)
        sink.on_run_end("main", result={"completed": True, "steps": 5}, run_path=None)
        ready()
        return
    if mode == "raise":
        ready()
        raise RuntimeError("the model failed mid-run")
    if mode == "thread-raise":

        def crashing_agent() -> None:
            sink.on_run_start("thread-run", task="t", environment="e", params={})
            steps(sink, "thread-run", 3)
            raise RuntimeError("an agent thread failed")

        worker = threading.Thread(target=crashing_agent)
        worker.start()
        worker.join()
        sink.on_run_end("main", result={"completed": True, "steps": 5}, run_path=None)
        ready()
        sink.close()
        return
    if mode == "sigkill-after-flush":  # some data confirmed sent, then killed
        if not sink.flush(30):
            raise SystemExit("flush failed")
        steps(sink, "main", 5, start=5)
        ready()
        time.sleep(60)  # the agent thinking, until the test kills it
        return
    if mode == "fork":
        if not sink.flush(30):
            raise SystemExit("flush failed")
        sink.on_step("main", event={"step": 5, "reward": 2.0}, cumulative_reward=7.0)
        pid = os.fork()
        if pid == 0:  # the child: a sink of its own, the parent's queue is not its business
            sink.on_run_start("forked-child", task="t", environment="e", params={})
            steps(sink, "forked-child", 3)
            sink.on_run_end("forked-child", result={"completed": True}, run_path=None)
            sink.close()
            os._exit(0 if sink.status()["dropped"] == {} else 3)
        _, status = os.waitpid(pid, 0)
        sink.on_run_end("main", result={"completed": True, "steps": 6}, run_path=None)
        sink.close()
        ready()
        raise SystemExit(os.waitstatus_to_exitcode(status))
    if mode == "large-steps":  # RLM Code-sized steps, then killed at once: the worker, asleep
        # until told to send, has read no record back. Its first cycle (the first events, which
        # it takes as it starts) has taken what was queued, and waits on the dead end: on a
        # busy machine, a worker that starts late could otherwise take the large steps too.
        deadline = time.monotonic() + 30
        while sink.statistics().queue_depth and time.monotonic() < deadline:
            time.sleep(0.01)
        for i in range(5, 8):
            sink.on_step("main", event=large_step(i), cumulative_reward=float(i + 1))
        ready()
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "forever":  # an agent that runs until a signal stops it
        ready()
        step = 5
        while True:
            time.sleep(0.05)  # the model thinking
            steps(sink, "main", 1, start=step)
            step += 1
    raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()

"""An async agent inside ``async with MLflowSink(...)``, stepping until a signal stops it.

Usage: async_forever.py BACKEND TRACKING_URI EXPERIMENT

BACKEND is ``asyncio`` or ``trio``. After each ``on_step`` has returned it prints ``STEP n``.
"""

from __future__ import annotations

import sys

import anyio
from agentkit import say, step

from rlm_mlflow import MLflowSink


async def agent(uri: str, experiment: str) -> None:
    async with MLflowSink(
        enabled=True,
        experiment=experiment,
        tracking_uri=uri,
        flush_interval=0.2,
        shutdown_timeout=3.0,
    ) as sink:
        sink.on_run_start("async", task="t", environment="e", params={})
        number = 0
        while True:
            step(sink, "async", number)
            say("STEP", number)
            number += 1
            await anyio.sleep(0.01)  # the model thinking


def main() -> None:
    backend, uri, experiment = sys.argv[1:4]
    anyio.run(agent, uri, experiment, backend=backend)


if __name__ == "__main__":
    main()

"""Promises about the worker itself: it survives what it did not expect, a close that comes before
it could connect waits for the connection, and closing while hooks race it counts every event once.

Real ``mlflow server`` (behind the fault proxy where latency matters); the in-memory transport only
where the test needs a store that misbehaves on cue.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

from promises_support import (
    WAIT,
    Store,
    assert_accounted,
    assert_each_once,
    close_within,
    end,
    start,
    steps,
    wait_until,
)
from rlm_mlflow import MLflowSink
from rlm_mlflow._transports.rest import shared_transport
from rlm_mlflow.testing import FaultProxy, MlflowServer

pytestmark = pytest.mark.integration

FAST: dict[str, Any] = {"flush_interval": 0.2, "retry_initial": 0.05, "retry_max_wait": 0.5}


@pytest.fixture
def proxy(mlflow_server: MlflowServer) -> Iterator[FaultProxy]:
    with FaultProxy(mlflow_server.port) as proxy:
        yield proxy


# -- a close before the transport is ready ------------------------------------------------------


@pytest.mark.slow
def test_a_close_before_the_transport_is_ready_waits_for_it_and_sends_everything(
    proxy: FaultProxy,
    store: Store,
    experiment_name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Agent threads fill the queue (and spill to the journal) behind 200 ms of latency, then
    close() comes before the worker ever ran: closing waits for the transport within its
    deadline and sends every event, instead of dying on a transport that is not there yet."""
    proxy.set(latency=0.2)
    sink = MLflowSink(
        enabled=True,
        experiment=experiment_name,
        tracking_uri=proxy.uri,
        queue_size=50,
        **FAST,
    )
    worker = sink._worker
    run = worker.run

    async def late_run() -> None:  # the background thread gets the interpreter after close()
        while not worker.close_requested:
            await anyio.sleep(0.01)
        await run()

    worker.run = late_run  # type: ignore[method-assign]
    threads, count = 4, 200

    def agent(n: int) -> None:
        start(sink, f"late-{n}")
        steps(sink, f"late-{n}", range(count))
        end(sink, f"late-{n}", count)

    agents = [threading.Thread(target=agent, args=(n,)) for n in range(threads)]
    for thread in agents:
        thread.start()
    for thread in agents:
        thread.join(WAIT)
    assert sink.statistics().spilled > 0  # run starts and ends wait in the journal too
    with caplog.at_level(logging.WARNING, logger="rlm_mlflow"):
        close_within(sink, 120.0)
    status = sink.status()
    assert "not ready" not in caplog.text
    assert "worker failed" not in caplog.text
    assert_accounted(status)
    assert status["sent"] == status["accepted"] == threads * (count + 2), status
    runs = store.by_name(experiment_name)
    assert sorted(runs) == sorted(f"late-{n}" for n in range(threads))
    for n in range(threads):
        assert runs[f"late-{n}"].info.status == "FINISHED"
        assert_each_once(store.steps(runs[f"late-{n}"]), range(count))


# -- the worker is supervised -----------------------------------------------------------------


class Flaky:
    """The real REST transport, except that one call raises a plain ValueError (a bug in a
    custom transport, a library raising what nobody expected) while ``failing`` is set."""

    def __init__(self, uri: str, call: str) -> None:
        self.inner = shared_transport(uri, timeout=30.0)
        self.call = call
        self.failing = threading.Event()
        self.failing.set()
        self.raised = 0

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.inner, name)
        if name != self.call:
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.failing.is_set():
                self.raised += 1
                raise ValueError("an exception nobody expected")
            return attribute(*args, **kwargs)

        return call


@pytest.mark.parametrize("call", ["get_or_create_experiment", "export_spans"])
def test_an_unexpected_exception_in_the_worker_is_shown_and_the_worker_goes_on(
    mlflow_server: MlflowServer,
    store: Store,
    experiment_name: str,
    caplog: pytest.LogCaptureFixture,
    call: str,
) -> None:
    """A transport raising a plain ValueError (before any run is sent, or after the runs were
    sent, in the spans): the failure is logged once with its traceback, counted, status() says
    "failed" with the error, hooks go on, and once the call works again every event lands
    exactly once (what was taken when it failed is sent again, nothing twice)."""
    flaky = Flaky(mlflow_server.uri, call)
    sink = MLflowSink(
        enabled=True,
        experiment=experiment_name,
        tracking_uri=mlflow_server.uri,
        transport=lambda: flaky,
        **FAST,
    )
    try:
        with caplog.at_level(logging.WARNING, logger="rlm_mlflow"):
            start(sink, "supervised")
            steps(sink, "supervised", range(10))
            wait_until(lambda: sink.status()["health"] == "failed", WAIT, "health 'failed'")
            # The transport counts a raise before the supervisor counts the failure: wait on
            # the supervisor's count, which says the worker was started again and failed again.
            wait_until(
                lambda: sink.status()["worker_failures"] >= 2, WAIT, "the worker started again"
            )
            status = sink.status()
            assert "ValueError: an exception nobody expected" in status["last_error"]
            assert "ValueError" in status["detail"]
            assert status["worker_failures"] >= 2
            steps(sink, "supervised", range(10, 20))  # hooks go on meanwhile
            flaky.failing.clear()
            assert sink.flush(WAIT), sink.status()
            wait_until(lambda: sink.status()["health"] == "ok", WAIT, "health 'ok' again")
            end(sink, "supervised", 20)
            close_within(sink, WAIT)
    finally:
        flaky.failing.clear()
        sink.close(5.0)
    traced = [r for r in caplog.records if r.exc_info and "worker failed" in r.getMessage()]
    assert len(traced) == 1, [r.getMessage() for r in caplog.records]
    status = sink.status()
    assert_accounted(status)
    assert status["sent"] == status["accepted"] == 22, status
    run = store.run(experiment_name, "supervised")
    assert run.info.status == "FINISHED"
    assert_each_once(store.steps(run), range(20))
    assert_each_once(store.steps(run, "cumulative_reward"), range(20))

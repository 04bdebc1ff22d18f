"""Faults between the sink and a real ``mlflow server``: outages, latency, 429/5xx, resets.

A :class:`~rlm_mlflow.testing.FaultProxy` sits in front of the session's server; what landed is
read back from the server itself, not through the proxy, and checked point by point.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from promises_support import (
    GATEWAY_ANSWERS,
    asleep_until_woken,
    eventually,
    patient,
    span_label,
)
from rlm_mlflow import MLflowSink
from rlm_mlflow.testing import FaultProxy, MlflowServer, local_server

FAST: dict[str, Any] = {"flush_interval": 0.2, "retry_initial": 0.1, "retry_max_wait": 1.0}
#: For the scenarios that count what is lost: no journal, so what is not sent is dropped (and
#: counted) rather than kept on disk for replay.
NO_JOURNAL: dict[str, Any] = {"journal": False}
#: How long the outage lasts: the scenario's length, not a synchronisation.
OUTAGE_SECONDS = 30.0
#: Generous bounds for waits that normally end in a second or two.
WAIT = 60.0


class _Upstream(BaseHTTPRequestHandler):
    """A tiny upstream that answers in each HTTP/1.1 framing the proxy must relay."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self.path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b"hello ", b"chunked world"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
        elif self.path == "/close":
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"until the connection closes")
            self.close_connection = True
        else:
            self._answer(self.path.encode())

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        self._answer(self.rfile.read(length))

    def _answer(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def upstream() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="upstream")
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(WAIT)


@pytest.fixture
def proxy(mlflow_server: MlflowServer) -> Iterator[FaultProxy]:
    with FaultProxy(mlflow_server.port) as proxy:
        yield proxy


#: Where a sink reads part of a metric's history (the steps of a batch whose answer was lost).
RANGE_READ = "/ajax-api/2.0/mlflow/metrics/get-history-bulk-interval"


def make_sink(proxy: FaultProxy, experiment: str, **kwargs: Any) -> MLflowSink:
    return MLflowSink(
        enabled=True, experiment=experiment, tracking_uri=proxy.uri, **{**FAST, **kwargs}
    )


def start(sink: MLflowSink, run_id: str) -> None:
    sink.on_run_start(run_id, task="a task", environment="pure_rlm", params={"max_steps": 50})


def steps(sink: MLflowSink, run_id: str, numbers: range, reward: float = 1.0) -> None:
    """Steps whose reward is ``reward`` and whose cumulative reward is ``reward * (step + 1)``."""
    for i in numbers:
        sink.on_step(
            run_id, event={"step": i, "reward": reward}, cumulative_reward=reward * (i + 1)
        )


def end(sink: MLflowSink, run_id: str, count: int, reward: float = 1.0) -> None:
    result = {"completed": True, "steps": count, "total_reward": reward * count}
    sink.on_run_end(run_id, result=result, run_path=None)


def history(client: Any, run: Any, key: str) -> list[tuple[int, float]]:
    """Every stored point of a metric, duplicates included, ordered by step."""
    points = client.get_metric_history(run.info.run_id, key)
    return sorted((p.step, p.value) for p in points)


def assert_landed(client: Any, run: Any, count: int, reward: float = 1.0) -> None:
    """The run ended FINISHED with exactly ``count`` steps, each once, and its summary."""
    assert run.info.status == "FINISHED"
    assert history(client, run, "step_reward") == [(i, reward) for i in range(count)]
    assert history(client, run, "cumulative_reward") == [
        (i, reward * (i + 1)) for i in range(count)
    ]
    assert history(client, run, "steps") == [(0, float(count))]
    assert history(client, run, "completed") == [(0, 1.0)]
    assert history(client, run, "total_reward") == [(0, reward * count)]
    assert run.data.params == {"environment": "pure_rlm", "task_chars": "6", "max_steps": "50"}


def assert_one_run_sent_once(
    sink: MLflowSink,
    read_runs: Callable[[str], dict[str, Any]],
    client: Any,
    experiment: str,
    run_id: str,
    count: int,
    *,
    retries: int,
) -> None:
    """Nothing dropped, every event sent after exactly ``retries`` retries, and the only run of
    the experiment landed with its ``count`` steps, each once."""
    status = sink.status()
    assert status["dropped"] == {}
    assert status["accepted"] == status["sent"] == count + 2
    assert status["retries"] == retries
    runs = read_runs(experiment)
    assert list(runs) == [run_id]
    assert_landed(client, runs[run_id], count)


def close_in_thread(sink: MLflowSink, timeout: float) -> None:
    """``close(timeout)`` on another thread, waited for generously: proves that it returns."""
    closer = threading.Thread(target=sink.close, args=(timeout,), name="closer")
    closer.start()
    closer.join(WAIT)
    assert not closer.is_alive(), "close() did not return"
    assert sink._worker.stopped.is_set()


def lose_one_batch(
    sink: MLflowSink, proxy: FaultProxy, run_id: str, stored: int, more: int
) -> None:
    """Run ``run_id`` with ``stored`` steps in the store, then ``more`` steps whose batch the
    server commits while its answer is lost (the connection reset)."""
    start(sink, run_id)
    steps(sink, run_id, range(stored))
    assert sink.flush(WAIT)
    proxy.set(mode="commit_then_reset", count=1, path="/runs/log-batch")
    steps(sink, run_id, range(stored, stored + more))
    assert sink.flush(WAIT)


def end_and_check_sent_once(
    sink: MLflowSink,
    read_runs: Callable[[str], dict[str, Any]],
    client: Any,
    experiment: str,
    run_id: str,
    count: int,
) -> None:
    """End the run, close, and check that it landed once after the one lost answer."""
    end(sink, run_id, count)
    assert sink.flush(WAIT)
    close_in_thread(sink, 10.0)
    assert_one_run_sent_once(sink, read_runs, client, experiment, run_id, count, retries=1)


# -- the proxy itself ----------------------------------------------------------------------------


def test_proxy_relays_every_framing_on_one_keep_alive_connection(upstream: int) -> None:
    """Content-Length, chunked and close-delimited answers, and a chunked request body."""
    with FaultProxy(upstream) as proxy, requests.Session() as session:
        assert session.get(f"{proxy.uri}/plain", timeout=WAIT).content == b"/plain"
        assert session.get(f"{proxy.uri}/chunked", timeout=WAIT).content == b"hello chunked world"
        assert session.post(f"{proxy.uri}/echo", data=b"x" * 70_000, timeout=WAIT).content == (
            b"x" * 70_000
        )
        parts = iter([b"in ", b"chunks"])
        assert session.post(f"{proxy.uri}/echo", data=parts, timeout=WAIT).content == b"in chunks"
        answer = session.get(f"{proxy.uri}/close", timeout=WAIT)
        assert answer.content == b"until the connection closes"
        assert answer.headers["Content-Length"] == str(len(answer.content))
        assert session.get(f"{proxy.uri}/again", timeout=WAIT).content == b"/again"
        assert proxy.requests == proxy.forwarded == 6


def test_proxy_modes_counts_and_paths(upstream: int) -> None:
    """Each mode does what it says, ``count`` and ``path`` limit it, ``pass`` comes back."""
    with FaultProxy(upstream) as proxy, requests.Session() as session:
        proxy.set(mode="http", status=429, retry_after="7", count=2, path="/limited")
        assert session.get(f"{proxy.uri}/other", timeout=WAIT).status_code == 200
        for _ in range(2):
            answer = session.get(f"{proxy.uri}/limited", timeout=WAIT)
            assert answer.status_code == 429
            assert answer.headers["Retry-After"] == "7"
            assert answer.json()["error_code"] == "REQUEST_LIMIT_EXCEEDED"
        assert session.get(f"{proxy.uri}/limited", timeout=WAIT).status_code == 200
        assert (proxy.requests, proxy.forwarded) == (4, 2)

        proxy.set(mode="reset", count=1)
        with pytest.raises(requests.ConnectionError):
            session.get(f"{proxy.uri}/reset", timeout=WAIT)
        proxy.set(mode="commit_then_reset", count=1)
        with pytest.raises(requests.ConnectionError):
            session.post(f"{proxy.uri}/committed", data=b"1", timeout=WAIT)
        assert (proxy.requests, proxy.forwarded) == (6, 3)

        proxy.set(mode="refuse")
        with pytest.raises(requests.ConnectionError, match="refused"):
            session.get(f"{proxy.uri}/refused", timeout=WAIT)
        proxy.set(mode="stall")
        with pytest.raises(requests.Timeout):
            session.get(f"{proxy.uri}/stalled", timeout=0.5)
        proxy.set()
        assert session.get(f"{proxy.uri}/back", timeout=WAIT).content == b"/back"
        assert (proxy.requests, proxy.forwarded) == (8, 4)
        with pytest.raises(ValueError, match="refuse"):
            proxy.set(mode="refuse", count=1)


def test_proxy_late_mode_delays_only_its_requests_and_forwards_them_after_a_hang_up(
    upstream: int,
) -> None:
    """``late`` holds the requests it applies to for ``latency`` seconds, and forwards them even
    when the client has given up meanwhile; the others go at once."""
    with FaultProxy(upstream) as proxy, requests.Session() as session:
        proxy.set(mode="late", latency=5.0, count=1, path="/slow")
        with pytest.raises(requests.Timeout):
            session.post(f"{proxy.uri}/slow", data=b"1", timeout=0.5)
        assert session.get(f"{proxy.uri}/quick", timeout=WAIT).content == b"/quick"
        assert proxy.forwarded == 1  # the quick one; the late one is still held
        assert proxy.wait_until(lambda p: p.forwarded == 2 and p.in_flight == 0, WAIT)
        assert session.post(f"{proxy.uri}/slow", data=b"2", timeout=WAIT).content == b"2"


def test_proxy_handling_counts_requests_until_their_fate_even_from_a_client_gone(
    upstream: int,
) -> None:
    """``handling`` counts the requests read and not settled yet: one waiting out ``latency``
    for a client that has hung up meanwhile is still forwarded (as a proxy in front of a server
    does), and ``handling`` is back to 0 only once it has reached the server."""
    with FaultProxy(upstream) as proxy, requests.Session() as session:
        proxy.set(latency=5.0)
        with pytest.raises(requests.Timeout):
            session.post(f"{proxy.uri}/gone", data=b"1", timeout=0.5)
        session.close()  # the client is gone
        assert proxy.handling == 1
        assert proxy.forwarded == 0
        assert proxy.wait_until(lambda p: p.handling == 0, WAIT)
        assert (proxy.forwarded, proxy.in_flight) == (1, 0)


def test_proxy_answers_any_body_and_counts_requests_per_path(upstream: int) -> None:
    """``http`` with a body sends it as is (an HTML 401, an empty 200); ``paths`` counts every
    request read per path, query string left out; ``in_flight`` is back to 0 once answered."""
    with FaultProxy(upstream) as proxy, requests.Session() as session:
        page = b"<html><body><h1>401 Authorization Required</h1></body></html>"
        proxy.set(mode="http", status=401, body=page, count=1)
        answer = session.get(f"{proxy.uri}/api/x?experiment_name=a", timeout=WAIT)
        assert answer.status_code == 401
        assert answer.content == page
        assert answer.headers["Content-Type"].startswith("text/html")
        proxy.set(mode="http", status=200, body=b"", content_type="application/json", count=1)
        empty = session.post(f"{proxy.uri}/api/x", data=b"{}", timeout=WAIT)
        assert (empty.status_code, empty.content) == (200, b"")
        assert session.get(f"{proxy.uri}/api/y", timeout=WAIT).content == b"/api/y"
        assert dict(proxy.paths) == {"/api/x": 2, "/api/y": 1}
        assert proxy.in_flight == 0
        with pytest.raises(ValueError, match="body"):
            proxy.set(mode="stall", body=b"x")


# -- outage -------------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.slow
def test_outage_during_ten_concurrent_runs_loses_and_repeats_nothing(
    proxy: FaultProxy,
    experiment_name: str,
    read_runs: Callable[[str], dict[str, Any]],
    mlflow_client: Any,
) -> None:
    """The server is unreachable for 30 s while 10 threads log: every point lands exactly once."""
    sink = make_sink(proxy, experiment_name)
    phase_done = threading.Barrier(11)
    outage_on, outage_off = threading.Event(), threading.Event()
    failures: list[BaseException] = []

    def agent(n: int) -> None:
        run_id = f"run-{n}"
        try:
            start(sink, run_id)
            steps(sink, run_id, range(10), reward=float(n))
            phase_done.wait(WAIT)
            assert outage_on.wait(WAIT)
            steps(sink, run_id, range(10, 20), reward=float(n))  # logged while the server is down
            phase_done.wait(WAIT)
            assert outage_off.wait(WAIT)
            steps(sink, run_id, range(20, 30), reward=float(n))
            end(sink, run_id, 30, reward=float(n))
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    threads = [threading.Thread(target=agent, args=(n,), name=f"agent-{n}") for n in range(10)]
    for thread in threads:
        thread.start()
    try:
        phase_done.wait(WAIT)
        proxy.set(mode="refuse")
        outage_on.set()
        phase_done.wait(WAIT)
        threading.Event().wait(OUTAGE_SECONDS)  # the server stays down this long
        # ... and on, until the worker has retried (on a loaded machine its first attempt may
        # come late); a worker that never retries fails here, its status in the message.
        eventually(lambda: sink.status()["retries"] > 0, 60)
        during = sink.status()
        proxy.set(mode="pass")
    finally:
        outage_on.set()
        outage_off.set()
        for thread in threads:
            thread.join(WAIT)
    assert not failures
    # The outage bit: data was waiting and the worker was retrying when the server came back.
    assert during["pending"] > 0, during
    assert during["retries"] > 0, during  # (the whole status says what the worker was doing)
    assert during["dropped"] == {}

    assert sink.flush(WAIT)
    close_in_thread(sink, 10.0)
    status = sink.status()
    assert status["dropped"] == {}
    assert status["accepted"] == status["sent"] == 10 * (1 + 30 + 1)
    assert status["runs_created"] == status["runs_ended"] == 10
    assert status["runs_open"] == 0

    runs = read_runs(experiment_name)
    assert sorted(runs) == sorted(f"run-{n}" for n in range(10))
    for n in range(10):
        assert_landed(mlflow_client, runs[f"run-{n}"], 30, reward=float(n))


@pytest.mark.integration
@pytest.mark.slow
def test_a_server_restart_mid_run_loses_nothing(tmp_path: Path, experiment_name: str) -> None:
    """The real server is stopped while two runs log, then started again on the same data."""
    from mlflow import MlflowClient

    with local_server(tmp_path / "server") as server:
        sink = MLflowSink(enabled=True, experiment=experiment_name, tracking_uri=server.uri, **FAST)
        for run_id in ("a", "b"):
            start(sink, run_id)
            steps(sink, run_id, range(10))
        assert sink.flush(WAIT)
        server.stop()
        for run_id in ("a", "b"):
            steps(sink, run_id, range(10, 20))
        assert sink.status()["pending"] == 20  # nowhere to send them
        server.restart()
        for run_id in ("a", "b"):
            steps(sink, run_id, range(20, 30))
            end(sink, run_id, 30)
        assert sink.flush(WAIT)
        close_in_thread(sink, 10.0)

        status = sink.status()
        assert status["retries"] > 0
        assert status["dropped"] == {}
        assert status["accepted"] == status["sent"] == 2 * (1 + 30 + 1)
        client = MlflowClient(tracking_uri=server.uri)
        experiment = client.get_experiment_by_name(experiment_name)
        assert experiment is not None
        runs = {r.data.tags["run_id"]: r for r in client.search_runs([experiment.experiment_id])}
        assert sorted(runs) == ["a", "b"]
        for run in runs.values():
            assert_landed(client, run, 30)


# -- latency --------------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.slow
def test_two_seconds_of_latency_on_every_request_loses_nothing(
    proxy: FaultProxy,
    experiment_name: str,
    read_runs: Callable[[str], dict[str, Any]],
    mlflow_client: Any,
) -> None:
    """Every request answered after 2 s: slow, but everything arrives and nothing is retried."""
    proxy.set(latency=2.0)
    sink = make_sink(proxy, experiment_name)
    start(sink, "slow")
    steps(sink, "slow", range(20))
    end(sink, "slow", 20)
    assert sink.flush(patient(120))
    close_in_thread(sink, 10.0)

    assert proxy.requests == proxy.forwarded
    assert_one_run_sent_once(sink, read_runs, mlflow_client, experiment_name, "slow", 20, retries=0)


# -- 429 and 503 ----------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.slow
def test_429_storm_honours_retry_after(
    proxy: FaultProxy,
    experiment_name: str,
    read_runs: Callable[[str], dict[str, Any]],
    mlflow_client: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Five 429s asking for 1 s: each is retried after the server's 1 s, then everything lands."""
    caplog.set_level(logging.WARNING, logger="rlm_mlflow")
    # On the API's paths: the sink's one look at /version (asked beside its first works, not
    # retried: asked again at its first spans) would take one of them.
    proxy.set(mode="http", status=429, retry_after="1", count=5, path="/api/")
    # The policy's own waits are at most 0.5 s: a 1.0 s wait can only come from Retry-After.
    sink = make_sink(proxy, experiment_name, retry_max_wait=0.5)
    start(sink, "storm")
    steps(sink, "storm", range(10))
    end(sink, "storm", 10)
    assert sink.flush(WAIT)
    close_in_thread(sink, 10.0)

    assert proxy.requests - proxy.forwarded == 5
    retry_logs = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert retry_logs  # the first is logged; the rest are rate limited
    assert all("HTTP 429" in m and "retrying in 1.0 s" in m for m in retry_logs)
    assert_one_run_sent_once(
        sink, read_runs, mlflow_client, experiment_name, "storm", 10, retries=5
    )


@pytest.mark.integration
def test_503_bursts_are_retried_and_everything_lands(
    proxy: FaultProxy,
    experiment_name: str,
    read_runs: Callable[[str], dict[str, Any]],
    mlflow_client: Any,
) -> None:
    """Two bursts of three 503s, one at the start and one mid-run: all data lands once."""
    sink = make_sink(proxy, experiment_name)
    proxy.set(mode="http", status=503, count=3, path="/api/")  # not the look at /version
    start(sink, "bursty")
    steps(sink, "bursty", range(10))
    assert sink.flush(WAIT)
    proxy.set(mode="http", status=503, count=3, path="/api/")
    steps(sink, "bursty", range(10, 20))
    end(sink, "bursty", 20)
    assert sink.flush(WAIT)
    close_in_thread(sink, 10.0)

    assert proxy.requests - proxy.forwarded == 6
    assert_one_run_sent_once(
        sink, read_runs, mlflow_client, experiment_name, "bursty", 20, retries=6
    )


# -- persistent failure ---------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.slow
def test_persistent_500_past_the_retry_deadline_is_counted_not_raised(
    proxy: FaultProxy,
    experiment_name: str,
    read_runs: Callable[[str], dict[str, Any]],
    mlflow_client: Any,
) -> None:
    """A server answering 500 to everything, its probe included, is an outage: past the 2 s
    retry budget the events wait for it, and close() counts them as ``send_failed`` (no
    journal); no hook ever raises."""
    sink = make_sink(proxy, experiment_name, retry_deadline=2.0, **NO_JOURNAL)
    start(sink, "doomed")
    assert sink.flush(WAIT)  # the run exists, with its params
    proxy.set(mode="http", status=500)
    steps(sink, "doomed", range(5))
    end(sink, "doomed", 5)
    assert sink.flush(5.0) is False  # past the retry budget: still waiting out the outage
    close_in_thread(sink, 10.0)

    status = sink.status()
    assert status["accepted"] == 7
    assert status["sent"] == 1  # the start
    assert status["dropped"] == {"send_failed": 6}  # 5 steps and the end
    assert status["retries"] > 0
    assert status["runs_created"] == 1
    assert status["runs_ended"] == 0
    assert "HTTP 500" in (status["last_error"] or "")
    runs = read_runs(experiment_name)
    assert list(runs) == ["doomed"]
    run = runs["doomed"]
    assert run.info.status == "RUNNING"  # its end never reached the server
    assert run.data.metrics == {}
    assert run.data.params == {"environment": "pure_rlm", "task_chars": "6", "max_steps": "50"}


@pytest.mark.integration
def test_a_lost_batch_of_a_long_run_is_checked_by_reading_only_the_steps_it_covers(
    proxy: FaultProxy,
    experiment_name: str,
    read_runs: Callable[[str], dict[str, Any]],
    mlflow_client: Any,
) -> None:
    """A run of 5,000 steps already stored; the answer to its next batch is lost after the
    server committed it. The retry checks what the server holds by reading the steps that
    batch covers (bounded requests), never the run's whole history, and stores no point
    twice."""
    sink = make_sink(proxy, experiment_name)
    lose_one_batch(sink, proxy, "long", 5_000, 300)
    assert proxy.paths[RANGE_READ] >= 1
    assert proxy.paths["/api/2.0/mlflow/metrics/get-history"] == 0  # never the whole history
    end_and_check_sent_once(sink, read_runs, mlflow_client, experiment_name, "long", 5_300)


@pytest.mark.integration
@pytest.mark.parametrize("status", [403, 404, 502])
def test_a_proxy_that_refuses_range_reads_costs_a_whole_history_read_never_a_block(
    mlflow_server: MlflowServer,
    experiment_name: str,
    read_runs: Callable[[str], dict[str, Any]],
    mlflow_client: Any,
    status: int,
) -> None:
    """A proxy that lets only ``/api/`` through answers the UI's range read with its own page
    (403, 404 or 502). A lost batch is then checked by reading the metric's whole history: the
    sink is not blocked, nothing waits for replay, and no point is stored twice."""
    with FaultProxy(mlflow_server.port) as inner, FaultProxy(inner.port) as outer:
        outer.set(mode="http", status=status, path="/ajax-api/", body=b"<html>no</html>")
        sink = MLflowSink(enabled=True, experiment=experiment_name, tracking_uri=outer.uri, **FAST)
        lose_one_batch(sink, inner, "guarded", 10, 10)
        assert outer.paths[RANGE_READ] >= 1
        assert inner.paths["/api/2.0/mlflow/metrics/get-history"] >= 1
        assert sink.status()["health"] == "ok"
        end_and_check_sent_once(sink, read_runs, mlflow_client, experiment_name, "guarded", 20)


# -- close with the server unreachable ------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["stall", "refuse"])
def test_close_returns_by_its_deadline_when_the_server_is_unreachable(
    proxy: FaultProxy, experiment_name: str, mode: str
) -> None:
    """``close(3)`` returns, the worker stops and every event is counted as dropped."""
    proxy.set(mode=mode)
    sink = make_sink(proxy, experiment_name, request_timeout=120.0, **NO_JOURNAL)
    start(sink, "stuck")
    steps(sink, "stuck", range(5))
    if mode == "stall":  # the worker's first request now hangs in the proxy
        assert proxy.wait_until(lambda p: p.requests >= 1, WAIT)
    close_in_thread(sink, 3.0)

    status = sink.status()
    assert status["accepted"] == 6  # the start and 5 steps (the sink's own FAILED end is not)
    assert status["sent"] == 0
    assert status["runs_created"] == status["runs_ended"] == 0
    assert set(status["dropped"]) <= {"send_failed", "shutdown"}
    assert sum(status["dropped"].values()) == 6
    assert status["pending"] == 0
    assert proxy.forwarded == 0


# -- committed, then reset ------------------------------------------------------------------------


@pytest.mark.integration
def test_a_retried_log_batch_that_was_committed_adds_no_duplicate_point(
    proxy: FaultProxy,
    experiment_name: str,
    read_runs: Callable[[str], dict[str, Any]],
    mlflow_client: Any,
) -> None:
    """The server stores a batch but the client sees a reset: the retry stores nothing twice."""
    sink = make_sink(proxy, experiment_name)
    start(sink, "twice")
    assert sink.flush(WAIT)
    batches = proxy.paths["/api/2.0/mlflow/runs/log-batch"]
    proxy.set(mode="commit_then_reset", count=1, path="/runs/log-batch")
    steps(sink, "twice", range(10))
    assert sink.flush(WAIT)
    # The batch reached the server and its answer was lost; the retry first read back what
    # the server held, so nothing in it was stored again (whatever the store does).
    assert proxy.paths["/api/2.0/mlflow/runs/log-batch"] - batches >= 1
    assert proxy.paths[RANGE_READ] >= 1
    end(sink, "twice", 10)
    assert sink.flush(WAIT)
    close_in_thread(sink, 10.0)

    assert_one_run_sent_once(
        sink, read_runs, mlflow_client, experiment_name, "twice", 10, retries=1
    )


@pytest.mark.integration
@pytest.mark.parametrize("path", ["/experiments/create", "/runs/create", "/runs/update"])
def test_a_retried_create_or_end_that_was_committed_duplicates_nothing(
    proxy: FaultProxy,
    experiment_name: str,
    read_runs: Callable[[str], dict[str, Any]],
    mlflow_client: Any,
    path: str,
) -> None:
    """The server commits but the client sees a reset: no second experiment or run (the worker
    finds the run by its ``rlm_mlflow.key`` tag), and an end sent twice is still one end."""
    proxy.set(mode="commit_then_reset", count=1, path=path)
    sink = make_sink(proxy, experiment_name)
    start(sink, "once")
    steps(sink, "once", range(5))
    end(sink, "once", 5)
    assert sink.flush(WAIT)
    close_in_thread(sink, 10.0)

    assert sink.status()["runs_created"] == sink.status()["runs_ended"] == 1
    experiment = mlflow_client.get_experiment_by_name(experiment_name)
    assert len(mlflow_client.search_runs([experiment.experiment_id])) == 1
    assert_one_run_sent_once(sink, read_runs, mlflow_client, experiment_name, "once", 5, retries=1)


# -- bounded queue --------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.slow
def test_a_producer_faster_than_a_slow_server_loses_steps_never_runs(
    proxy: FaultProxy,
    experiment_name: str,
    read_runs: Callable[[str], dict[str, Any]],
    mlflow_client: Any,
) -> None:
    """Queue of 100, 0.5 s per request: steps beyond capacity are refused and counted exactly;
    every run still starts and ends, and every accepted step lands once."""
    proxy.set(latency=0.5)
    sink = make_sink(proxy, experiment_name, queue_size=100, overflow="drop_newest", **NO_JOURNAL)
    run_count, step_count = 3, 300
    for n in range(run_count):
        start(sink, f"fast-{n}")
        steps(sink, f"fast-{n}", range(step_count))
        end(sink, f"fast-{n}", step_count)
    assert sink.flush(patient(120))
    close_in_thread(sink, 10.0)

    status = sink.status()
    produced = run_count * (1 + step_count + 1)
    assert set(status["dropped"]) == {"queue_full"}
    full = status["dropped"]["queue_full"]
    assert full > 0
    assert status["accepted"] == produced  # every event handed over, dropped ones included
    assert status["sent"] + full == status["accepted"]
    assert status["runs_created"] == status["runs_ended"] == run_count
    accepted_steps = status["sent"] - 2 * run_count

    runs = read_runs(experiment_name)
    assert sorted(runs) == [f"fast-{n}" for n in range(run_count)]
    landed = 0
    for run in runs.values():
        assert run.info.status == "FINISHED"
        points = history(mlflow_client, run, "step_reward")
        assert len({step for step, _ in points}) == len(points)  # no step twice
        assert history(mlflow_client, run, "cumulative_reward") == [
            (step, float(step + 1)) for step, _ in points
        ]
        assert history(mlflow_client, run, "steps") == [(0, float(step_count))]
        landed += len(points)
    assert landed == accepted_steps


# -- the same faults with the journal on (the default) -------------------------------------------


@pytest.mark.integration
@pytest.mark.slow
def test_persistent_500_goes_to_the_journal_and_replay_delivers_it(
    proxy: FaultProxy,
    experiment_name: str,
    journal_dir: Path,
    read_runs: Callable[[str], dict[str, Any]],
    mlflow_client: Any,
) -> None:
    """A server answering 500 to everything is an outage: past the retry budget nothing is
    dropped, close() leaves it in the journal, counted as deferred, and a later replay (the
    server healthy again) delivers it, each point once."""
    from rlm_mlflow import replay

    sink = make_sink(proxy, experiment_name, retry_deadline=2.0)
    start(sink, "deferred")
    assert sink.flush(WAIT)
    proxy.set(mode="http", status=500)
    steps(sink, "deferred", range(5))
    end(sink, "deferred", 5)
    assert sink.flush(5.0) is False  # past the retry budget: still waiting out the outage
    close_in_thread(sink, 10.0)
    status = sink.status()
    assert status["dropped"] == {}
    assert status["deferred"] == 6  # 5 steps and the end
    assert status["journal_backlog"] == 6
    assert len(list(journal_dir.iterdir())) == 1

    proxy.set(mode="pass")
    report = replay(journal_dir, tracking_uri=proxy.uri)
    assert report.ok, report
    assert report.runs_killed == 0  # its end was in the journal
    assert list(journal_dir.iterdir()) == []
    runs = read_runs(experiment_name)
    assert list(runs) == ["deferred"]
    assert_landed(mlflow_client, runs["deferred"], 5)


@pytest.mark.integration
@pytest.mark.slow
def test_a_producer_faster_than_a_slow_server_loses_nothing_with_the_journal(
    proxy: FaultProxy,
    experiment_name: str,
    read_runs: Callable[[str], dict[str, Any]],
    mlflow_client: Any,
) -> None:
    """Queue of 100, 0.5 s per request: the overflow spills to the journal, nothing is dropped,
    and every step of every run lands once, in order."""
    proxy.set(latency=0.5)
    sink = make_sink(proxy, experiment_name, queue_size=100)
    run_count, step_count = 3, 300
    for n in range(run_count):
        start(sink, f"spill-{n}")
        steps(sink, f"spill-{n}", range(step_count))
        end(sink, f"spill-{n}", step_count)
    assert sink.status()["spilled"] > 0
    assert sink.flush(patient(120))
    close_in_thread(sink, 10.0)

    status = sink.status()
    assert status["dropped"] == {}
    assert status["accepted"] == status["sent"] == run_count * (step_count + 2)
    runs = read_runs(experiment_name)
    assert sorted(runs) == [f"spill-{n}" for n in range(run_count)]
    for run in runs.values():
        assert_landed(mlflow_client, run, step_count)


@pytest.mark.integration
def test_a_close_while_a_runs_steps_wait_on_a_slow_answer_ends_it_and_replay_adds_each_once(
    proxy: FaultProxy,
    experiment_name: str,
    journal_dir: Path,
    read_runs: Callable[[str], dict[str, Any]],
    mlflow_client: Any,
) -> None:
    """A cycle carrying a run's 100 steps and its end (one round of requests) waits on a
    log_batch the server commits only after the sink has stopped. close(3) still ends the run
    FINISHED in time, and what it sends again (or keeps for replay) adds no point twice once
    the late batch is committed."""
    from rlm_mlflow import replay

    sink = make_sink(proxy, experiment_name, flush_interval=60.0, batch_trigger=10**9)
    start(sink, "late")
    assert sink.flush(WAIT)
    batches = proxy.paths["/api/2.0/mlflow/runs/log-batch"]
    proxy.set(mode="late", latency=8.0, count=1, path="/runs/log-batch")
    steps(sink, "late", range(100))
    end(sink, "late", 100)
    sink.flush(0.0)  # a cycle takes them all and waits for the late answer
    assert proxy.wait_until(lambda p: p.paths["/api/2.0/mlflow/runs/log-batch"] > batches, WAIT)
    close_in_thread(sink, 3.0)
    assert read_runs(experiment_name)["late"].info.status == "FINISHED"
    status = sink.status()
    assert status["dropped"] == {}
    assert status["accepted"] == status["sent"] + status["deferred"] == 102
    assert status["runs_ended"] == 1

    # The late batch reaches the server and is committed; replay reads what it holds.
    run = read_runs(experiment_name)["late"]
    assert eventually(lambda: len(history(mlflow_client, run, "step_reward")) == 100, WAIT)
    assert proxy.wait_until(lambda p: p.in_flight == 0, WAIT)
    report = replay(journal_dir, tracking_uri=proxy.uri)
    assert report.ok, report
    runs = read_runs(experiment_name)
    assert list(runs) == ["late"]
    assert_landed(mlflow_client, runs["late"], 100)


#: What a gateway in front of the server may answer a run's batches with, while the run's end
#: passes: its login page, its page when the server times out, a redirect to a login host.
BATCH_BLOCKED = [
    "401 login page",
    "504 gateway page",
    "302 to a login host",
    "413 page",
    "500 from MLflow",
]


@pytest.mark.integration
@pytest.mark.parametrize("blocked", BATCH_BLOCKED)
def test_a_close_whose_batch_meets_a_gateway_page_ends_the_run_in_time_and_replay_adds_each_once(
    proxy: FaultProxy,
    experiment_name: str,
    journal_dir: Path,
    read_runs: Callable[[str], dict[str, Any]],
    mlflow_client: Any,
    blocked: str,
) -> None:
    """Closing against a deadline, a run's end waits for its last batch's answer. A gateway
    answers every batch with its HTML login page, its 504 page, its 413 page, or a redirect to
    a login host, or MLflow answers it with a 500: the answer the end waits for never comes.
    The batch is kept, never taken as refused for good, until only what an end takes is left
    (the pages and the 500 are outages, tried again), or until the redirect or the 413 (down
    to one point) has refused it; then the end goes: close(3) ends the run FINISHED in time,
    with one request, its steps kept for replay. Once the gateway is well, replay adds each
    step once to the ended run, which stays FINISHED."""
    from rlm_mlflow import replay

    sink = make_sink(proxy, experiment_name, flush_interval=60.0, batch_trigger=10**9)
    start(sink, "paged")
    assert sink.flush(WAIT)  # the run exists; only its batches meet the page
    proxy.set(mode="http", path="/runs/log-batch", **GATEWAY_ANSWERS[blocked])
    steps(sink, "paged", range(50))
    end(sink, "paged", 50)
    close_in_thread(sink, 3.0)
    assert proxy.paths["/api/2.0/mlflow/runs/log-batch"] >= 1
    assert read_runs(experiment_name)["paged"].info.status == "FINISHED"
    status = sink.status()
    assert status["dropped"] == {}
    assert status["accepted"] == status["sent"] + status["deferred"]
    assert status["deferred"] >= 50  # the steps, and the summary with them
    assert status["runs_ended"] == 1
    assert proxy.paths["/api/2.0/mlflow/runs/update"] == 1  # the end went once

    proxy.set()
    report = replay(journal_dir, tracking_uri=proxy.uri)
    assert report.ok, report
    run = read_runs(experiment_name)["paged"]
    assert run.info.status == "FINISHED"
    assert_landed(mlflow_client, run, 50)
    assert proxy.paths["/api/2.0/mlflow/runs/update"] == 1  # replay found it ended: not again


@pytest.mark.integration
def test_a_close_too_short_for_a_new_run_against_a_far_server_leaves_none_running(
    proxy: FaultProxy,
    experiment_name: str,
    journal_dir: Path,
    read_runs: Callable[[str], dict[str, Any]],
    mlflow_client: Any,
) -> None:
    """Every request takes 0.5 s on its way to the server. A run not created yet waits when
    close(2.0) comes: its create, its batch and its end take 1.5 s one after another, 2.25 s
    with the closing margin, which the sink knows from its answers before any create of the
    close. Its create never goes out (without the guess it does, and the run ends only if
    nothing else is slow); the run left open is ended in time; replay then creates the new
    run ended, each step once."""
    from rlm_mlflow import replay

    proxy.set(latency=0.5)
    sink = make_sink(proxy, experiment_name, flush_interval=60.0, batch_trigger=10**9)
    start(sink, "open")
    assert sink.flush(WAIT)  # the sink has seen its server answer in 0.5 s
    # The worker asleep: the close, not a cycle already out, takes the new run.
    assert eventually(lambda: asleep_until_woken(sink), WAIT)
    start(sink, "new")
    steps(sink, "new", range(3))
    end(sink, "new", 3)
    close_in_thread(sink, 2.0)
    assert {name: run.info.status for name, run in read_runs(experiment_name).items()} == {
        "open": "FAILED"
    }
    status = sink.status()
    assert status["dropped"] == {}
    assert status["accepted"] == status["sent"] + status["deferred"]
    assert status["deferred"] >= 5  # the new run's start, three steps and end

    proxy.set(latency=0.0)
    report = replay(journal_dir, tracking_uri=proxy.uri)
    assert report.ok, report
    runs = read_runs(experiment_name)
    assert runs["open"].info.status == "FAILED"
    assert_landed(mlflow_client, runs["new"], 3)


@pytest.mark.integration
def test_a_close_during_a_cycle_whose_spans_are_slow_ends_the_open_run_and_replay_completes_it(
    proxy: FaultProxy,
    experiment_name: str,
    journal_dir: Path,
    read_runs: Callable[[str], dict[str, Any]],
    mlflow_client: Any,
) -> None:
    """The cycle carrying an open run's first steps is out, its batch held 1.5 s on the way,
    when close(3.0) comes; the server's span requests then take 5 s on the way. The rest of the
    cycle goes in the close's order: the open run is ended FAILED by the deadline, the cycle's
    spans are kept. Replay then writes the run's trace whole (a span per step, each once) and
    adds no point twice."""
    from rlm_mlflow import replay

    batches = "/api/2.0/mlflow/runs/log-batch"
    sink = make_sink(proxy, experiment_name, flush_interval=60.0, batch_trigger=10**9)
    start(sink, "open")
    steps(sink, "open", range(3))
    proxy.set(mode="late", latency=1.5, path=batches, count=1)
    flushing = threading.Thread(target=sink.flush, args=(WAIT,), daemon=True)
    flushing.start()
    assert proxy.wait_until(lambda p: p.paths[batches] >= 1, WAIT)  # the cycle is out
    closer = threading.Thread(target=sink.close, args=(3.0,), name="closer")
    closer.start()
    assert eventually(lambda: sink._worker.close_deadline is not None, WAIT)
    proxy.set(mode="late", latency=5.0, path="/v1/traces")
    closer.join(WAIT)
    assert not closer.is_alive(), "close() did not return"
    runs = read_runs(experiment_name)
    assert {name: run.info.status for name, run in runs.items()} == {"open": "FAILED"}
    assert history(mlflow_client, runs["open"], "step_reward") == [(i, 1.0) for i in range(3)]
    status = sink.status()
    assert status["dropped"] == {}
    assert status["accepted"] == status["sent"] + status["deferred"]
    assert status["deferred"] >= 3  # the steps' spans at least

    proxy.set()
    report = replay(journal_dir, tracking_uri=proxy.uri)
    assert report.ok, report
    runs = read_runs(experiment_name)
    assert runs["open"].info.status == "FAILED"
    assert history(mlflow_client, runs["open"], "step_reward") == [(i, 1.0) for i in range(3)]
    experiment_id = runs["open"].info.experiment_id
    traces = list(mlflow_client.search_traces(locations=[experiment_id]))
    assert len(traces) == 1, [t.info.trace_id for t in traces]
    labels = sorted(span_label(span) for span in traces[0].data.spans)
    assert len(labels) == len(set(labels)), labels
    assert [label for label in labels if label.startswith("step")] == [
        "step 0",
        "step 1",
        "step 2",
    ], labels


@pytest.mark.integration
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.anyio
async def test_an_async_service_stopping_while_a_runs_steps_wait_on_a_slow_answer_ends_it(
    anyio_backend: str,
    proxy: FaultProxy,
    experiment_name: str,
    read_runs: Callable[[str], dict[str, Any]],
) -> None:
    """The same in an asyncio or trio service: its sink (``async with``, shutdown_timeout 3 s)
    is left while the cycle carrying a run's steps and end waits on a batch the server takes
    8 s to commit; the run is ended FINISHED before the block returns."""
    import anyio

    batches = "/api/2.0/mlflow/runs/log-batch"
    sink = make_sink(
        proxy, experiment_name, flush_interval=60.0, batch_trigger=10**9, shutdown_timeout=3.0
    )
    async with sink:
        start(sink, "late")
        assert await sink.aflush(WAIT)
        before = proxy.paths[batches]
        proxy.set(mode="late", latency=8.0, count=1, path="/runs/log-batch")
        steps(sink, "late", range(100))
        end(sink, "late", 100)
        await sink.aflush(0.0)  # a cycle takes them all and waits for the late answer
        await anyio.to_thread.run_sync(proxy.wait_until, lambda p: p.paths[batches] > before, WAIT)
    runs = await anyio.to_thread.run_sync(read_runs, experiment_name)
    assert runs["late"].info.status == "FINISHED"
    status = sink.status()
    assert status["dropped"] == {}
    assert status["accepted"] == status["sent"] + status["deferred"] == 102

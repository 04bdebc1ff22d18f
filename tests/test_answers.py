"""What an HTTP answer means: one place (``_transports/http.classify``) decides, and every
caller follows it. A proxy's page, a redirect, a body limit, credentials refused for writes only,
a fork while requests are in flight: each against a real ``mlflow server`` behind the fault
proxy, read back from the server itself. Unit tests of ``classify`` and of a custom transport's
refusal first.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from promises_support import Store, eventually, wait_until
from rlm_mlflow import MLflowSink, PermanentError, StoreRefused, TransientError, TransportError
from rlm_mlflow._transports.http import REDIRECTED, TOO_LARGE, classify
from rlm_mlflow._transports.rest import RestTransport, shared_transport
from rlm_mlflow.testing import FaultProxy, MemoryTransport, MlflowServer

FAST: dict[str, Any] = {"flush_interval": 0.2, "retry_initial": 0.05, "retry_max_wait": 0.5}
WAIT = 60.0
HTML = b"<html><body><h1>404 Not Found</h1><p>nginx</p></body></html>"


# -- classify(): one answer, one meaning --------------------------------------------------------


def answer(
    status: int, body: bytes = b"", headers: dict[str, str] | None = None
) -> requests.Response:
    response = requests.Response()
    response.status_code = status
    response._content = body
    response.headers.update(headers or {})
    response.url = "http://tracking.example/api/2.0/mlflow/runs/log-batch"
    return response


def mlflow_json(code: str, message: str = "no") -> bytes:
    return json.dumps({"error_code": code, "message": message}).encode()


def test_classify_returns_mlflow_json_and_never_takes_another_2xx_for_a_success() -> None:
    assert classify(answer(200, b'{"run": {}}'), "x") == {"run": {}}
    assert classify(answer(200), "x", want_json=False) == {}
    protobuf = {"Content-Type": "application/x-protobuf"}
    assert classify(answer(200, b"", protobuf), "x", want_json=False) == {}
    for body in (b"", b"<html>login</html>", b"[1, 2]"):
        with pytest.raises(TransientError):
            classify(answer(200, body, {"Content-Type": "text/html"}), "x")
    # where no JSON is expected (spans, artifacts), a gateway's sign-in page is no success
    for headers in ({"Content-Type": "text/html; charset=utf-8"}, {}):
        with pytest.raises(TransientError):
            classify(
                answer(200, b"\n<!DOCTYPE html><html>Sign in</html>", headers), "x", want_json=False
            )


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (404, HTML),  # a proxy's page during a redeploy
        (404, b'{"message": "no Route matched with those values"}'),  # a gateway's JSON
        (405, b""),
        (400, b"<html>Bad Request</html>"),
        (501, HTML),
        (300, b""),
    ],
)
def test_an_answer_that_is_not_mlflows_is_transient(status: int, body: bytes) -> None:
    with pytest.raises(TransientError) as raised:
        classify(answer(status, body), "POST /runs/log-batch")
    assert not isinstance(raised.value, PermanentError)


def test_only_an_mlflow_error_code_refuses_a_request() -> None:
    with pytest.raises(PermanentError) as raised:
        classify(answer(400, mlflow_json("INVALID_PARAMETER_VALUE")), "x")
    assert raised.value.code == "INVALID_PARAMETER_VALUE"
    assert not isinstance(raised.value, StoreRefused)
    with pytest.raises(PermanentError) as raised:
        classify(answer(400, mlflow_json("INVALID_PARAMETER_VALUE", "must be 'active' state")), "x")
    assert raised.value.code == "RUN_NOT_ACTIVE"
    with pytest.raises(PermanentError) as raised:
        classify(answer(404, mlflow_json("RESOURCE_DOES_NOT_EXIST")), "x")
    assert raised.value.code == "RESOURCE_DOES_NOT_EXIST"


@pytest.mark.parametrize("body", [HTML, mlflow_json("BAD_REQUEST")])
def test_413_is_a_size_condition_whatever_its_body(body: bytes) -> None:
    with pytest.raises(PermanentError) as raised:
        classify(answer(413, body), "x")
    assert raised.value.code == TOO_LARGE


@pytest.mark.parametrize("status", [401, 403])
def test_refused_credentials_refuse_the_whole_store(status: int) -> None:
    with pytest.raises(StoreRefused) as raised:
        classify(answer(status, b"<html>login</html>"), "x")
    assert raised.value.status == status


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_reaching_classify_is_a_configuration_error_with_its_location_redacted(
    status: int,
) -> None:
    location = "https://alice:s3cret@tracking.example/api/2.0/mlflow/runs/log-batch"
    with pytest.raises(StoreRefused) as raised:
        classify(answer(status, b"", {"Location": location}), "POST /runs/log-batch")
    assert raised.value.code == REDIRECTED
    assert "tracking.example" in str(raised.value)
    assert "s3cret" not in str(raised.value)


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_overload_and_server_errors_are_transient_with_retry_after(status: int) -> None:
    with pytest.raises(TransientError) as raised:
        classify(answer(status, HTML, {"Retry-After": "7"}), "x")
    assert raised.value.retry_after == 7.0
    # Only a gateway that gave up waiting leaves the request possibly still at work upstream.
    assert raised.value.unanswered is (status == 504)


class _OldServer(BaseHTTPRequestHandler):
    """A server without OTLP ingest: /v1/traces is a plain 404 page; /version says which."""

    protocol_version = "HTTP/1.1"
    version = "3.1.4"

    def do_GET(self) -> None:
        if self.path == "/version":
            self._send(200, self.version.encode())
        else:
            self._send(404, HTML)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self._send(404, HTML)

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain" if status == 200 else "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.mark.parametrize(("version", "unsupported"), [("3.1.4", True), ("3.7.0", False)])
def test_a_404_page_on_v1_traces_means_no_ingest_only_from_a_server_older_than_3_6(
    version: str, unsupported: bool
) -> None:
    handler = type("Handler", (_OldServer,), {"version": version})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="old-server")
    thread.start()
    transport = RestTransport(f"http://127.0.0.1:{server.server_address[1]}", timeout=10.0)
    try:
        with pytest.raises(TransportError) as raised:
            transport.export_spans("1", None, b"")
    finally:
        transport.close()
        server.shutdown()
        server.server_close()
        thread.join(WAIT)
    if unsupported:
        assert isinstance(raised.value, PermanentError)
        assert raised.value.code == "TRACES_UNSUPPORTED"
    else:
        assert isinstance(raised.value, TransientError)


class SlowVersion:
    """A server whose ``/version`` (3.17.2) answers only once ``answer`` is set; ``reads``:
    the reads it got."""

    def __init__(self) -> None:
        self.reads: list[str] = []
        self.answer = threading.Event()
        outer = self

        class Slow(_OldServer):
            version = "3.17.2"

            def do_GET(self) -> None:
                outer.reads.append(self.path)
                outer.answer.wait(WAIT)
                super().do_GET()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
        self.server.daemon_threads = True
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def slow_version() -> Iterator[SlowVersion]:
    slow = SlowVersion()
    thread = threading.Thread(target=slow.server.serve_forever, args=(0.05,), name="slow")
    thread.start()
    try:
        yield slow
    finally:
        slow.answer.set()
        slow.server.shutdown()
        slow.server.server_close()
        thread.join(WAIT)


def test_the_servers_version_is_read_once_by_the_sinks_asking_for_it_at_once(
    slow_version: SlowVersion,
) -> None:
    """Eight transport threads (hundreds of sinks closing at once share one transport) ask
    whether the server writes a trace's info with its assessments while /version is slow to
    answer: one read goes out, the others wait for its answer rather than send their own."""
    reads = slow_version.reads
    transport = RestTransport(slow_version.uri, timeout=WAIT)
    said: list[bool | None] = []
    askers = [
        threading.Thread(target=lambda: said.append(transport.upserts_traces())) for _ in range(8)
    ]
    try:
        for asker in askers:
            asker.start()
        wait_until(lambda: bool(reads), WAIT, "a read of /version")
        # Before the change, every asker had sent its own read by now.
        assert not eventually(lambda: len(reads) > 1, 2.0), reads
        slow_version.answer.set()
        for asker in askers:
            asker.join(WAIT)
    finally:
        transport.close()
    assert said == [True] * 8
    assert reads == ["/version"]


def test_a_child_forked_while_the_servers_version_is_read_reads_it_itself(
    slow_version: SlowVersion,
) -> None:
    """A process forks while one of its threads reads /version (holding the one-read lock).
    That thread does not exist in the child: the child's first look at the version is a read
    of its own, answered, never a wait for a lock nobody will release."""
    transport = RestTransport(slow_version.uri, timeout=WAIT)
    asker = threading.Thread(target=transport.upserts_traces, name="asker")
    asker.start()
    try:
        wait_until(lambda: bool(slow_version.reads), WAIT, "the parent's read of /version")
        pid = os.fork()
        if pid == 0:  # the child: 0 once it has the version, killed by the alarm if it hangs
            code = 1
            try:
                signal.alarm(int(WAIT))
                code = 0 if transport.upserts_traces() is True else 2
            finally:
                os._exit(code)
        slow_version.answer.set()
        ended: list[int] = []

        def child_ended() -> bool:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                ended.append(status)
            return bool(ended)

        if not eventually(child_ended, WAIT):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child waited for the parent's read of /version")
        assert os.waitstatus_to_exitcode(ended[0]) == 0, ended
        asker.join(WAIT)
    finally:
        slow_version.answer.set()
        transport.close()
    assert slow_version.reads == ["/version", "/version"]


# -- a custom transport's refusal ---------------------------------------------------------------


@pytest.mark.parametrize(("code", "status"), [("UNAUTHENTICATED", 401), ("PERMISSION_DENIED", 403)])
def test_a_custom_transports_credentials_refusal_holds_everything_and_deletes_nothing(
    code: str, status: int
) -> None:
    """``PermanentError(code="UNAUTHENTICATED", status=401)`` from a custom transport is the
    whole store refused: nothing counted refused or dropped, the journal keeps it, the status
    says blocked; once the credentials are taken again, everything lands."""
    memory = MemoryTransport()
    sink = MLflowSink(enabled=True, experiment="custom", transport=memory, **FAST)
    try:
        sink.on_run_start("r", task="t", environment="e", params={})
        assert sink.flush(WAIT)
        refusing = True

        def fail(call: str) -> Exception | None:
            if refusing and call in ("log_batch", "set_terminated"):
                return PermanentError("token refused", code=code, status=status)
            return None

        memory.fail = fail
        sink.on_step("r", event={"step": 0, "reward": 1.0}, cumulative_reward=1.0)
        sink.on_run_end("r", result={"completed": True}, run_path=None)
        wait_until(lambda: sink.status()["health"] == "blocked", WAIT, "the store blocked")
        status_now = sink.status()
        assert status_now["dropped"] == {}
        assert status_now["refused"] == 0
        assert status_now["journal_backlog"] >= 2
        refusing = False
        assert sink.flush(WAIT)
    finally:
        sink.close(WAIT)
    run = memory.one("r")
    assert run.status == "FINISHED"
    assert run.history("step_reward") == [(0, 1.0)]
    assert sink.status()["dropped"] == {}


# -- against a real server behind the fault proxy ---------------------------------------------


@pytest.fixture
def proxy(mlflow_server: MlflowServer) -> Iterator[FaultProxy]:
    with FaultProxy(mlflow_server.port) as proxy:
        yield proxy


def sink_for(proxy: FaultProxy, experiment: str, **kwargs: Any) -> MLflowSink:
    return MLflowSink(
        enabled=True, experiment=experiment, tracking_uri=proxy.uri, **{**FAST, **kwargs}
    )


def steps(sink: MLflowSink, run_id: str, count: int) -> None:
    for i in range(count):
        sink.on_step(run_id, event={"step": i, "reward": 1.0}, cumulative_reward=float(i + 1))


def assert_run_landed(store: Store, experiment: str, run_id: str, count: int) -> None:
    run = store.run(experiment, run_id)
    assert run.info.status == "FINISHED"
    points = store.client.get_metric_history(run.info.run_id, "step_reward")
    assert sorted(p.step for p in points) == list(range(count))


@pytest.mark.integration
def test_a_proxy_html_404_on_log_batch_is_retried_never_refused(
    proxy: FaultProxy, store: Store, experiment_name: str
) -> None:
    """A redeploy's HTML 404 page on log-batch: retried, every point lands, none refused."""
    with sink_for(proxy, experiment_name) as sink:
        sink.on_run_start("blip", task="t", environment="e", params={"a": 1})
        assert sink.flush(WAIT)
        proxy.set(mode="http", status=404, body=HTML, path="/runs/log-batch", count=3)
        steps(sink, "blip", 50)
        sink.on_run_end("blip", result={"completed": True}, run_path=None)
        assert sink.flush(WAIT)
        status = sink.status()
    assert status["dropped"] == {}
    assert status["refused"] == 0
    assert status["retries"] >= 3
    assert_run_landed(store, experiment_name, "blip", 50)


@pytest.mark.integration
def test_a_proxy_404_on_v1_traces_does_not_turn_traces_off(
    proxy: FaultProxy, store: Store, experiment_name: str
) -> None:
    """One HTML 404 from a proxy on /v1/traces is a blip: retried, traces stay on, all three
    traces land."""
    with sink_for(proxy, experiment_name) as sink:
        proxy.set(mode="http", status=404, body=HTML, path="/v1/traces", count=1)
        for name in ("t1", "t2", "t3"):
            sink.on_run_start(name, task="t", environment="e", params={})
            steps(sink, name, 2)
            sink.on_run_end(name, result={"completed": True}, run_path=None)
            assert sink.flush(WAIT)
        status = sink.status()
    assert status["traces"] == "full" or not status["traces"].startswith("off")
    assert status["dropped"] == {}
    experiment_id = store.experiment_id(experiment_name)
    traces = store.client.search_traces(locations=[experiment_id])
    assert len(traces) == 3


def big_step(number: int) -> dict[str, Any]:
    """A step whose texts do not compress (about 12 KB of spans once gzipped)."""
    noise = os.urandom(6_000).hex()
    return {
        "type": "step",
        "step": number,
        "reward": 0.5,
        "action": {"action": "run_python", "code": f"print({number})", "rationale": "go"},
        "observation": {"success": True, "stdout": noise, "stderr": "", "execution_time": 0.1},
    }


@pytest.mark.integration
def test_413_on_v1_traces_splits_the_spans_until_they_fit(
    proxy: FaultProxy, store: Store, experiment_name: str
) -> None:
    """A proxy with a 64 KB body limit in front of the server: span requests are split down to
    what fits, every span lands, nothing is dropped, traces stay on."""
    with sink_for(proxy, experiment_name) as sink:
        sink.on_run_start("big", task="t", environment="e", params={})
        assert sink.flush(WAIT)
        proxy.set(body_limit=64_000)
        for i in range(40):
            sink.on_step("big", event=big_step(i), cumulative_reward=0.5 * (i + 1))
        sink.on_run_end("big", result={"completed": True}, run_path=None)
        assert sink.flush(WAIT)
        status = sink.status()
    assert status["dropped"] == {}
    assert not status["traces"].startswith("off")
    assert proxy.paths["/v1/traces"] > 2
    experiment_id = store.experiment_id(experiment_name)
    (trace,) = store.client.search_traces(locations=[experiment_id])
    step_spans = [s for s in trace.data.spans if s.name.startswith("step")]
    assert len(step_spans) == 40
    assert_run_landed(store, experiment_name, "big", 40)


HTML_502 = b"<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"
#: What stands between a replay and the server: a body limit (a 413 page for what is larger),
#: a gateway's HTML error page on the span requests, on the metric batches.
REPLAY_WAYS: dict[str, dict[str, Any]] = {
    "64 KB body limit": {"body_limit": 64_000},
    "502 pages on span requests": {
        "mode": "http",
        "status": 502,
        "body": HTML_502,
        "path": "/v1/traces",
        "count": 3,
    },
    "502 pages on metric batches": {
        "mode": "http",
        "status": 502,
        "body": HTML_502,
        "path": "/runs/log-batch",
        "count": 3,
    },
}


@pytest.mark.integration
@pytest.mark.parametrize("way", list(REPLAY_WAYS))
def test_replay_through_a_body_limit_or_gateway_pages_sends_every_span_and_point_once(
    proxy: FaultProxy, store: Store, experiment_name: str, journal_dir: Path, way: str
) -> None:
    """A root run of 30 steps of 12 KB each and a child run of 5 are journaled while every
    answer is a 503 (the server is away), then the sink is closed. Replay goes through what
    stands between it and the server: a 64 KB body limit, or a gateway's HTML 502 pages on the
    span requests or on the metric batches. One invocation sends it all: one trace holding
    every span, every point once, both runs FINISHED, nothing dropped, the journal gone."""
    from rlm_mlflow import replay

    sink = sink_for(proxy, experiment_name, retry_deadline=1.0)
    proxy.set(mode="http", status=503)
    sink.on_run_start("root", task="t", environment="e", params={})
    for i in range(30):
        if i == 10:
            sink.on_run_start("child", task="t", environment="e", params={"parent_run_id": "root"})
            for j in range(5):
                sink.on_step("child", event=big_step(j), cumulative_reward=0.5 * (j + 1))
            sink.on_run_end("child", result={"completed": True}, run_path=None)
        sink.on_step("root", event=big_step(i), cumulative_reward=0.5 * (i + 1))
    sink.on_run_end("root", result={"completed": True}, run_path=None)
    sink.close(2.0)
    kept = sink.status()
    assert kept["deferred"] > 0, kept
    assert kept["dropped"] == {}, kept

    fault = REPLAY_WAYS[way]
    answered = fault.get("status", 413)  # what the proxy answers itself: a page, or a 413
    proxy.set(**fault)
    report = replay(journal_dir, tracking_uri=proxy.uri, retry_deadline=30.0)
    assert report.ok, report
    assert proxy.made_up[answered] > 0, proxy.made_up  # the replay met the way
    assert_run_landed(store, experiment_name, "root", 30)
    assert_run_landed(store, experiment_name, "child", 5)
    root, child = store.run(experiment_name, "root"), store.run(experiment_name, "child")
    assert child.data.tags.get("mlflow.parentRunId") == root.info.run_id
    experiment_id = store.experiment_id(experiment_name)
    (trace,) = store.client.search_traces(locations=[experiment_id])
    names = [s.name for s in trace.data.spans]
    assert len(names) == len(set(s.span_id for s in trace.data.spans)), names
    steps_of = [s for s in trace.data.spans if s.name.startswith("step")]
    assert len(steps_of) == 35, sorted(names)
    assert not [p for p in journal_dir.rglob("*") if p.is_file()], list(journal_dir.rglob("*"))


@pytest.mark.integration
def test_413_on_log_batch_splits_down_to_one_item_and_counts_the_one_too_large(
    proxy: FaultProxy, store: Store, experiment_name: str
) -> None:
    """A 4 KB body limit (an HTML 413 from the proxy): metric batches are split until they fit
    and every point lands; the one param too large alone is refused and counted, the params
    beside it land."""
    with sink_for(proxy, experiment_name) as sink:
        proxy.set(body_limit=4_000)
        params = {"small": 1, "big": "x" * 5_000, "other": "y"}
        sink.on_run_start("limited", task="t", environment="e", params=params)
        steps(sink, "limited", 200)
        sink.on_run_end("limited", result={"completed": True}, run_path=None)
        sink.flush(WAIT)
        status = sink.status()
    assert status["dropped"] == {}
    assert status["refused"] == 1
    assert_run_landed(store, experiment_name, "limited", 200)
    run = store.run(experiment_name, "limited")
    assert run.data.params["small"] == "1"
    assert run.data.params["other"] == "y"
    assert "big" not in run.data.params


@pytest.mark.integration
def test_a_gateway_answering_every_request_with_a_413_page_loses_and_refuses_nothing(
    proxy: FaultProxy, store: Store, experiment_name: str, journal_dir: Path
) -> None:
    """A gateway answers every request, however small, with its 413 page (a broken body limit,
    a filter that answers so). Split down to one metric point or one small span, the request
    is still refused: the 413 says nothing about that item. Nothing is refused or counted too
    large; the run's work and its spans are kept, after a few requests, not one per item; once
    the gateway is well, replay sends every point and span once. The spans refused do not
    count against the trace's budget in replay: 64 steps are more than half of the default
    budget, and counted twice, some would go into a summary span."""
    from promises_support import GATEWAY_ANSWERS
    from rlm_mlflow import replay

    sink = sink_for(proxy, experiment_name)
    sink.on_run_start("gated", task="t", environment="e", params={"small": 1})
    assert sink.flush(WAIT)  # the run exists
    proxy.set(mode="http", **GATEWAY_ANSWERS["413 page"])
    steps(sink, "gated", 64)
    sink.on_run_end("gated", result={"completed": True}, run_path=None)
    sink.close(WAIT)
    status = sink.status()
    assert status["dropped"] == {}, status
    assert status["refused"] == 0, status
    assert status["rejected"] == {}, status
    assert status["deferred"] >= 64, status
    # halved down to one item once (log2 of the items, and a few more), not once per item
    assert proxy.made_up[413] < 40, dict(proxy.paths)

    proxy.set()
    report = replay(journal_dir, tracking_uri=proxy.uri)
    assert report.ok, report
    assert_run_landed(store, experiment_name, "gated", 64)
    (trace,) = store.client.search_traces(locations=[store.experiment_id(experiment_name)])
    assert len([s for s in trace.data.spans if s.name.startswith("step")]) == 64


@pytest.mark.integration
def test_a_sign_in_page_answered_200_to_span_requests_is_no_success(
    proxy: FaultProxy, store: Store, experiment_name: str, journal_dir: Path
) -> None:
    """A gateway answers the span requests with its sign-in page and a 200 (MLflow answers
    them with an empty protobuf body). No span counts as sent: they are kept, and replay sends
    them once the gateway lets them through. Before, the page was taken for a success and
    the spans were lost."""
    from rlm_mlflow import replay

    page = b"<!DOCTYPE html><html><body><h1>Sign in</h1><form></form></body></html>"
    sink = sink_for(proxy, experiment_name, retry_deadline=1.0)
    proxy.set(mode="http", status=200, body=page, path="/v1/traces")
    sink.on_run_start("signed", task="t", environment="e", params={})
    steps(sink, "signed", 5)
    sink.on_run_end("signed", result={"completed": True}, run_path=None)
    sink.close(WAIT)
    status = sink.status()
    assert proxy.made_up[200] > 0, dict(proxy.paths)
    assert status["spans_sent"] == 0, status
    assert status["deferred"] > 0, status
    assert status["dropped"] == {}, status
    assert_run_landed(store, experiment_name, "signed", 5)  # the run's part went through
    proxy.set()
    report = replay(journal_dir, tracking_uri=proxy.uri)
    assert report.ok, report
    (trace,) = store.client.search_traces(locations=[store.experiment_id(experiment_name)])
    assert len([s for s in trace.data.spans if s.name.startswith("step")]) == 5


@pytest.mark.integration
def test_a_301_never_turns_a_post_into_a_get_and_is_said_once(
    proxy: FaultProxy,
    store: Store,
    experiment_name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """runs/create answered 301: the request is not sent again as a GET (MLflow would answer
    405, and the run would be dropped as refused); the redirect blocks the store, said once,
    and when the server stops redirecting everything lands."""
    caplog.set_level(logging.WARNING, logger="rlm_mlflow")
    with sink_for(proxy, experiment_name) as sink:
        sink.on_run_start("warmup", task="t", environment="e", params={})
        assert sink.flush(WAIT)
        proxy.set(mode="redirect", status=301, path="/runs/create", count=1)
        sink.on_run_start("moved", task="t", environment="e", params={})
        steps(sink, "moved", 5)
        sink.on_run_end("moved", result={"completed": True}, run_path=None)
        assert sink.flush(WAIT)
        status = sink.status()
        sink.on_run_end("warmup", result={"completed": True}, run_path=None)
    assert status["dropped"] == {}
    assert status["refused"] == 0
    assert_run_landed(store, experiment_name, "moved", 5)
    said = [r for r in caplog.records if "HTTP 301" in r.getMessage()]
    assert len(said) == 1
    assert said[0].levelno == logging.ERROR


@pytest.mark.integration
def test_a_tracking_uri_that_redirects_elsewhere_blocks_with_the_location_redacted(
    proxy: FaultProxy, store: Store, experiment_name: str
) -> None:
    """Every request answered 302 to another host (http -> https behind a load balancer):
    nothing is sent there, nothing is dropped, status() says where it redirects (without the
    credentials in that address); fixed, everything lands."""
    with sink_for(proxy, experiment_name) as sink:
        sink.on_run_start("warmup", task="t", environment="e", params={})
        assert sink.flush(WAIT)
        proxy.set(mode="redirect", status=302, location="https://bob:pw123@elsewhere.invalid/x")
        sink.on_run_start("moved", task="t", environment="e", params={})
        steps(sink, "moved", 3)
        sink.on_run_end("moved", result={"completed": True}, run_path=None)
        wait_until(lambda: sink.status()["health"] == "blocked", WAIT, "the store blocked")
        status = sink.status()
        assert "elsewhere.invalid" in status["detail"]
        assert "pw123" not in json.dumps(status, default=str)
        assert status["dropped"] == {}
        proxy.set(mode="pass")
        assert sink.flush(WAIT)
        sink.on_run_end("warmup", result={"completed": True}, run_path=None)
    assert_run_landed(store, experiment_name, "moved", 3)


@pytest.mark.integration
def test_a_307_is_followed_with_its_method_and_body(
    proxy: FaultProxy, store: Store, experiment_name: str
) -> None:
    with sink_for(proxy, experiment_name) as sink:
        sink.on_run_start("kept", task="t", environment="e", params={})
        assert sink.flush(WAIT)
        proxy.set(mode="redirect", status=307, path="/runs/log-batch", count=2)
        steps(sink, "kept", 4)
        sink.on_run_end("kept", result={"completed": True}, run_path=None)
        assert sink.flush(WAIT)
        status = sink.status()
    assert status["dropped"] == {}
    assert status["health"] == "ok"
    assert_run_landed(store, experiment_name, "kept", 4)


@pytest.mark.integration
def test_writes_refused_while_reads_pass_block_once_and_probe_slowly(
    proxy: FaultProxy,
    store: Store,
    experiment_name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """401 on every POST, GETs pass (a token that may read, not write): one ERROR, health
    blocked every time it is asked, writes tried again only now and then; the token fixed,
    everything lands."""
    caplog.set_level(logging.WARNING, logger="rlm_mlflow")
    with sink_for(proxy, experiment_name, retry_max_wait=1.0) as sink:
        sink.on_run_start("ro", task="t", environment="e", params={})
        assert sink.flush(WAIT)
        proxy.set(mode="http", status=401, method="POST", body=b"<html>sign in</html>")
        steps(sink, "ro", 5)
        sink.on_run_end("ro", result={"completed": True}, run_path=None)
        wait_until(lambda: sink.status()["health"] == "blocked", WAIT, "the store blocked")
        first, began = proxy.requests, time.monotonic()
        # Several rounds of probes and write tries: never "ok" in between.
        while proxy.requests < first + 6:
            assert sink.status()["health"] == "blocked"
            seen = proxy.requests
            proxy.wait_until(lambda p: p.requests > seen, WAIT)  # noqa: B023
        # Not a loop of requests: a pause of retry_max_wait (1 s) at least between write tries
        # (a lower bound, which a slow machine only makes easier to meet).
        assert time.monotonic() - began >= 1.0
        assert sink.status()["health"] == "blocked"
        refusals = [r for r in caplog.records if "refuses our writes" in r.getMessage()]
        assert len(refusals) == 1
        proxy.set(mode="pass")
        assert sink.flush(WAIT)
        status = sink.status()
    assert status["dropped"] == {}
    assert status["refused"] == 0
    assert_run_landed(store, experiment_name, "ro", 5)


def _child_logs_a_run(uri: str, experiment: str, timeout: float) -> None:
    """In a forked child: one run through a new sink, closed; exit 0 when it was all sent."""
    code = 1
    try:
        sink = MLflowSink(
            enabled=True,
            experiment=experiment,
            tracking_uri=uri,
            request_timeout=timeout,
            journal=False,
            **FAST,
        )
        sink.on_run_start("child", task="t", environment="e", params={})
        steps(sink, "child", 3)
        sink.on_run_end("child", result={"completed": True}, run_path=None)
        sink.close(30.0)
        status = sink.status()
        code = 0 if status["sent"] == status["accepted"] == 5 else 2
    finally:
        os._exit(code)


@pytest.mark.integration
def test_a_child_forked_while_requests_are_in_flight_has_its_own_slots(
    proxy: FaultProxy, store: Store, experiment_name: str
) -> None:
    """The parent has as many requests in flight as the in-flight limit allows (stalled by the
    proxy) when it forks: the child's sink still sends its run (its slots, locks and
    connections are its own)."""
    timeout = 45.0
    transport = shared_transport(proxy.uri, timeout=timeout)
    proxy.set(mode="stall", path="/runs/get")
    errors: list[BaseException] = []

    def stalled() -> None:
        try:
            transport.request("GET", "/api/2.0/mlflow/runs/get", params={"run_id": "x"})
        except BaseException as exc:  # the stall is reset at the end of the test
            errors.append(exc)

    threads = [threading.Thread(target=stalled, name=f"stalled-{i}") for i in range(4)]
    child: multiprocessing.process.BaseProcess | None = None
    try:
        for thread in threads:
            thread.start()
        assert proxy.wait_until(lambda p: p.paths["/api/2.0/mlflow/runs/get"] >= 4, WAIT)
        context = multiprocessing.get_context("fork")
        child = context.Process(
            target=_child_logs_a_run, args=(proxy.uri, experiment_name, timeout)
        )
        child.start()
        child.join(WAIT * 2)
        assert child.exitcode == 0, f"the child's run was not sent (exit {child.exitcode})"
    finally:
        if child is not None and child.is_alive():
            child.kill()
            child.join(WAIT)
        proxy.set(mode="pass")  # resets the stalled connections
        for thread in threads:
            thread.join(WAIT)
        transport.close()
    assert_run_landed(store, experiment_name, "child", 3)

"""A root run's outcome as MLflow assessments on its trace, against a real server: written
once whatever is lost or replayed, filterable in ``search_traces``, degraded with one warning on
a server without the endpoint."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from promises_support import Agent, replay_cli
from rlm_mlflow import MLflowSink
from rlm_mlflow._exceptions import PermanentError, TransientError
from rlm_mlflow._transports.base import TraceEnd
from rlm_mlflow.testing import FaultProxy, MemoryTransport, MlflowServer, wait_for

pytestmark = pytest.mark.integration

FAST: dict[str, Any] = {"flush_interval": 0.2, "retry_initial": 0.05, "retry_max_wait": 0.5}
WAIT = 60.0
#: Where a trace's info is written (``StartTraceV3``), with the assessments on MLflow 3.13+.
TRACE_INFO = "/api/3.0/mlflow/traces"


@pytest.fixture
def proxy(mlflow_server: MlflowServer) -> Iterator[FaultProxy]:
    with FaultProxy(mlflow_server.port) as proxy:
        yield proxy


def run_scored(sink: MLflowSink, count: int) -> None:
    """``scored-<i>``: two steps, ``total_reward = i``, ``completed = i is even``; and a child
    run under ``scored-0`` (its figures stay on the root's trace)."""
    for index in range(count):
        run_id = f"scored-{index}"
        sink.on_run_start(run_id, task="t", environment="e", params={})
        if index == 0:
            sink.on_run_start("child", task="c", environment="e", params={"parent_run_id": run_id})
            sink.on_run_end("child", result={"completed": True, "total_reward": 9.0}, run_path=None)
        for number in range(2):
            sink.on_step(run_id, event={"step": number, "reward": 1.0}, cumulative_reward=1.0)
        result = {"completed": index % 2 == 0, "steps": 2, "total_reward": float(index)}
        sink.on_run_end(run_id, result=result, run_path=None)


def search_traces(
    client: Any, experiment: str, filter_string: str | None = None, *, spans: bool = True
) -> list[Any]:
    """The experiment's traces (``spans`` False: their info only)."""
    found = client.get_experiment_by_name(experiment)
    assert found is not None
    return list(
        client.search_traces(
            locations=[found.experiment_id],
            filter_string=filter_string,
            max_results=500,
            include_spans=spans,
        )
    )


def traces_of(client: Any, experiment: str, filter_string: str | None = None) -> dict[str, Any]:
    """The experiment's traces by their run id tag."""
    traces = search_traces(client, experiment, filter_string)
    return {trace.info.tags["run_id"]: trace for trace in traces}


def ours(trace: Any) -> dict[str, list[Any]]:
    """The trace's assessments written by the sink, by name (every copy)."""
    named: dict[str, list[Any]] = {}
    for assessment in trace.info.assessments:
        if assessment.source.source_id == "rlm-mlflow":
            named.setdefault(assessment.name, []).append(assessment)
    return named


def assert_each_once(client: Any, experiment: str, count: int) -> None:
    traces = {k: v for k, v in traces_of(client, experiment).items() if k.startswith("scored-")}
    assert sorted(traces) == sorted(f"scored-{i}" for i in range(count))
    for index in range(count):
        named = ours(traces[f"scored-{index}"])
        assert sorted(named) == ["completed", "total_reward"], named
        assert [a.value for a in named["total_reward"]] == [float(index)]
        assert [a.value for a in named["completed"]] == [index % 2 == 0]
        source = named["total_reward"][0].source
        assert (source.source_type, source.source_id) == ("CODE", "rlm-mlflow")


def test_a_root_runs_reward_and_completion_are_feedback_on_its_trace_and_filterable(
    mlflow_server: MlflowServer, mlflow_client: Any, experiment_name: str
) -> None:
    sink = MLflowSink(
        enabled=True, experiment=experiment_name, tracking_uri=mlflow_server.uri, **FAST
    )
    run_scored(sink, 4)
    sink.close(WAIT)
    assert sink.status()["deferred"] == 0, sink.status()
    assert_each_once(mlflow_client, experiment_name, 4)
    high = traces_of(mlflow_client, experiment_name, "feedback.total_reward > 1.5")
    assert sorted(high) == ["scored-2", "scored-3"]
    done = traces_of(mlflow_client, experiment_name, "feedback.completed = 'true'")
    assert sorted(done) == ["scored-0", "scored-2"]


def test_a_trace_that_begins_and_ends_in_one_drain_has_its_info_stored_before_its_spans(
    mlflow_server: MlflowServer, mlflow_client: Any, experiment_name: str
) -> None:
    """A short root run's trace info with its assessments goes before its spans: the store
    creates the trace in one insert instead of merging into what the spans made. While every
    span request is refused, the trace is already there with its Feedback; once spans pass,
    they land under it and nothing is written twice."""
    with FaultProxy(mlflow_server.port) as proxy:
        proxy.set(mode="http", status=503, path="/v1/traces")
        sink = MLflowSink(enabled=True, experiment=experiment_name, tracking_uri=proxy.uri, **FAST)
        run_scored(sink, 2)
        assert wait_for(lambda: proxy.paths[TRACE_INFO] >= 2, WAIT), proxy.paths
        # No span yet, so none of the tags its root span carries: the info and its Feedback
        # (read once the server has stored the second: the proxy counts it as it reads it).
        found: list[Any] = []

        def both_stored() -> bool:
            found[:] = search_traces(mlflow_client, experiment_name, spans=False)
            return len(found) == 2

        assert wait_for(both_stored, WAIT), [t.info for t in found]
        before = found
        rewards = sorted(a.value for t in before for a in ours(t)["total_reward"])
        assert rewards == [0.0, 1.0], [t.info for t in before]
        proxy.set(mode="pass")
        sink.close(WAIT)
        status = sink.status()
        assert status["deferred"] == 0, status
        assert proxy.paths[TRACE_INFO] == 2, proxy.paths  # not again after the spans
    assert_each_once(mlflow_client, experiment_name, 2)
    after = traces_of(mlflow_client, experiment_name)
    # The state the info gave (a run not completed is an ERROR) is kept when the spans land.
    assert {k: t.info.state for k, t in after.items()} == {"scored-0": "OK", "scored-1": "ERROR"}
    assert {t.info.trace_id: t.info.state for t in before} == {
        t.info.trace_id: t.info.state for t in after.values()
    }
    assert len(after["scored-1"].data.spans) == 1 + 2  # the run and its two steps


def test_the_servers_version_is_read_beside_the_first_runs_requests_not_after_them(
    proxy: FaultProxy, mlflow_client: Any, experiment_name: str
) -> None:
    """A sink asks the server's version (whether a trace's info and its assessments go in one
    request) at its first works, beside their runs' requests, not once their spans come: with
    hundreds of sinks whose cycles were still at their runs when the close at exit came, the
    read went out there, behind every run's request, and held every trace up. Here the run's
    create is held and ``/version`` is read meanwhile; then ``/version`` stalls, and the close
    still writes the trace's info with its assessments in one request."""
    create = "/api/2.0/mlflow/runs/create"
    proxy.set(mode="stall", path=create)
    sink = MLflowSink(
        enabled=True,
        experiment=experiment_name,
        tracking_uri=proxy.uri,
        flush_interval=60.0,
        batch_trigger=10**9,
        retry_initial=0.05,
        retry_max_wait=0.5,
    )
    try:
        sink.on_run_start("scored-0", task="t", environment="e", params={})
        sink.on_step("scored-0", event={"step": 0, "reward": 1.0}, cumulative_reward=1.0)
        assert not sink.flush(0.0)  # a cycle begins: its run's create is held
        assert proxy.wait_until(lambda p: p.paths[create] >= 1, WAIT)
        assert proxy.wait_until(lambda p: p.paths["/version"] >= 1, 10.0), (
            f"the version was not read beside the held create: {dict(proxy.paths)}"
        )
        proxy.set(mode="stall", path="/version")  # (the held create is let go: reset)
        result = {"completed": True, "steps": 1, "total_reward": 0.0}
        sink.on_run_end("scored-0", result=result, run_path=None)
        sink.close(WAIT)
        assert sink.status()["deferred"] == 0, sink.status()
    finally:
        sink.close(1.0)
    assert proxy.paths["/version"] == 1
    assert proxy.paths[TRACE_INFO] == 1
    assert not any(path.endswith("/assessments") for path in proxy.paths), dict(proxy.paths)
    assert_each_once(mlflow_client, experiment_name, 1)


@pytest.mark.parametrize("way", ["with the trace info", "one by one"])
def test_a_write_whose_answer_was_lost_is_not_written_twice(
    way: str, mlflow_server: MlflowServer, mlflow_client: Any, experiment_name: str
) -> None:
    """The server stores the assessments, the answer is lost, twice. With the trace's info
    (MLflow 3.13+), the retry writes the same ids again; one by one (the server's version
    hidden by a proxy), the retry reads the trace's assessments first and writes only what is
    missing."""
    with FaultProxy(mlflow_server.port) as inner, FaultProxy(inner.port) as outer:
        if way == "one by one":
            outer.set(mode="http", status=404, body=b"<html>Not Found</html>", path="/version")
            inner.set(mode="commit_then_reset", count=2, path="/assessments", method="POST")
        else:
            inner.set(mode="commit_then_reset", count=2, path=TRACE_INFO, method="POST")
        sink = MLflowSink(enabled=True, experiment=experiment_name, tracking_uri=outer.uri, **FAST)
        run_scored(sink, 2)
        sink.close(WAIT)
        status = sink.status()
        assert status["deferred"] == 0, status
        assert status["retries"] >= 2, status  # the two lost answers were retried
        one_by_one = sum(n for path, n in inner.paths.items() if path.endswith("/assessments"))
        if way == "one by one":
            assert inner.paths[TRACE_INFO] == 0, inner.paths
            assert one_by_one >= 4, inner.paths  # each trace: a create per name
        else:
            assert not one_by_one, inner.paths
            assert inner.paths[TRACE_INFO] == 2 + 2, inner.paths  # a request per trace, twice
    assert_each_once(mlflow_client, experiment_name, 2)


@pytest.mark.parametrize("replayed", ["one by one", "with the trace info"])
def test_an_assessment_a_queue_stores_after_the_sink_gave_up_on_it_is_never_written_twice(
    replayed: str,
    mlflow_server: MlflowServer,
    mlflow_client: Any,
    experiment_name: str,
    journal_dir: Path,
) -> None:
    """One by one (the server's version hidden by a proxy), a queue before the server holds
    the first assessment's create past the 1 s request timeout and stores it 2.5 s after it was
    sent. The sink's retry reads the trace's assessments before that: it does not create the
    missing one again (it may still be stored), it keeps that trace's assessments for replay,
    and the replay, reading first, writes only what is missing: through the same proxy, one by
    one; straight to the server, with the trace's info. Each lands once."""
    with FaultProxy(mlflow_server.port) as inner, FaultProxy(inner.port) as outer:
        outer.set(mode="http", status=404, body=b"<html>Not Found</html>", path="/version")
        inner.set(mode="late", latency=2.5, count=1, path="/assessments", method="POST")
        sink = MLflowSink(
            enabled=True,
            experiment=experiment_name,
            tracking_uri=outer.uri,
            request_timeout=1.0,
            **FAST,
        )
        run_scored(sink, 2)
        sink.close(WAIT)
        assert wait_for(lambda: inner.handling == 0, WAIT), "the queue forwarded what it held"
        assert sink.status()["deferred"] > 0, sink.status()
        uri = outer.uri if replayed == "one by one" else mlflow_server.uri
        done = replay_cli(journal_dir, tracking_uri=uri)
        assert done.returncode == 0, done.stderr[-2000:]
    assert_each_once(mlflow_client, experiment_name, 2)


@pytest.mark.parametrize(
    "answer",
    ["500 twice", "401 login page twice", "302 to a login host twice", "413 page always"],
)
def test_what_stands_before_the_trace_info_request_loses_and_repeats_no_assessment(
    answer: str,
    proxy: FaultProxy,
    mlflow_client: Any,
    experiment_name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The one request that carries a trace's info and its assessments meets what a proxy or
    the server answers: a 500 is retried; a 401 (a login page) or a redirect to another host
    holds the writes until it passes; a body limit's 413 page, which a retry would meet again,
    sends the assessments one by one instead, with one warning. Each lands once."""
    page = b"<html><body><h1>Sign in</h1></body></html>"
    if answer == "500 twice":
        proxy.set(mode="http", status=500, count=2, path=TRACE_INFO, exact_path=True)
    elif answer == "401 login page twice":
        proxy.set(mode="http", status=401, body=page, count=2, path=TRACE_INFO, exact_path=True)
    elif answer == "302 to a login host twice":
        proxy.set(
            mode="redirect",
            status=302,
            location="https://login.example.com/sso",
            count=2,
            path=TRACE_INFO,
            exact_path=True,
        )
    else:  # as a proxy's body limit answers the largest request (the others pass)
        page = b"<html><body><h1>413 Request Entity Too Large</h1></body></html>"
        proxy.set(mode="http", status=413, body=page, path=TRACE_INFO, exact_path=True)
    with caplog.at_level(logging.WARNING, logger="rlm_mlflow"):
        sink = MLflowSink(enabled=True, experiment=experiment_name, tracking_uri=proxy.uri, **FAST)
        run_scored(sink, 3)
        sink.close(WAIT)
    status = sink.status()
    assert status["deferred"] == 0, status
    assert status["dropped"] == {}, status
    assert status["runs_open"] == 0, status
    assert_each_once(mlflow_client, experiment_name, 3)
    one_by_one = sum(n for path, n in proxy.paths.items() if path.endswith("/assessments"))
    refusals = [r for r in caplog.records if "refused a trace's info" in r.getMessage()]
    if answer == "413 page always":
        assert one_by_one >= 6, proxy.paths  # each of the 3 traces: a create per name
        assert len(refusals) == 1, [r.getMessage() for r in caplog.records]
    else:
        assert not one_by_one, proxy.paths
        assert proxy.paths[TRACE_INFO] >= 3 + 2, proxy.paths  # each trace, and the two answers
        assert not refusals


def test_a_413_page_on_every_assessment_request_keeps_them_for_replay(
    proxy: FaultProxy, mlflow_client: Any, experiment_name: str, journal_dir: Path
) -> None:
    """A gateway answers every write of a trace's info (with its run link) and of its
    assessments with its 413 page: requests of a few hundred bytes, which no body limit
    refuses, so the 413 says nothing about them. Nothing is refused or counted lost: the
    assessments are kept, and once the gateway is well, replay writes each once."""
    from rlm_mlflow import replay

    page = b"<html><body><h1>413 Request Entity Too Large</h1></body></html>"
    proxy.set(mode="http", status=413, body=page, path=TRACE_INFO, method="POST")
    sink = MLflowSink(enabled=True, experiment=experiment_name, tracking_uri=proxy.uri, **FAST)
    run_scored(sink, 3)
    sink.close(WAIT)
    status = sink.status()
    assert status["rejected"] == {}, status
    assert status["dropped"] == {}, status
    assert status["deferred"] > 0, status
    assert proxy.made_up[413] > 0, dict(proxy.paths)
    assert not any(ours(t) for t in traces_of(mlflow_client, experiment_name).values())
    proxy.set()
    report = replay(journal_dir, tracking_uri=proxy.uri)
    assert report.ok, report
    assert_each_once(mlflow_client, experiment_name, 3)


def test_an_outage_as_the_runs_end_loses_and_repeats_no_assessment(
    proxy: FaultProxy, mlflow_client: Any, experiment_name: str
) -> None:
    """The server is unreachable when the runs end (connections refused) and comes back: runs,
    spans and assessments all land, each assessment once."""
    sink = MLflowSink(enabled=True, experiment=experiment_name, tracking_uri=proxy.uri, **FAST)
    sink.on_run_start("warm-up", task="t", environment="e", params={})
    sink.on_run_end("warm-up", result={"completed": True}, run_path=None)
    assert sink.flush(WAIT)  # the experiment exists
    proxy.set(mode="refuse")
    run_scored(sink, 3)
    assert wait_for(lambda: sink.status()["retries"] > 0, WAIT)  # the worker met the outage
    proxy.set(mode="pass")
    sink.close(WAIT)
    status = sink.status()
    assert status["deferred"] == 0, status
    assert not status["dropped"], status
    assert_each_once(mlflow_client, experiment_name, 3)


def refused_until_kill_9_then_replayed(
    agents: Callable[..., Agent],
    server: MlflowServer,
    experiment: str,
    journal_dir: Path,
    refused: str,
    before_replay: Callable[[FaultProxy], None],
) -> None:
    """Three scored runs whose requests to ``refused`` get a 503 until the agent is killed
    (``before_replay`` looks at what the server holds then). The first replay goes through a
    proxy that loses the answer of each such request the server stored; a second replay, to
    the server itself, must add nothing."""
    with FaultProxy(server.port) as proxy:
        proxy.set(mode="http", status=503, path=refused)
        agent = agents("assessed_runs.py", proxy.uri, experiment, "3")
        status = json.loads(agent.expect("FLUSHED", 120).split(" ", 1)[1])
        assert status["deferred"] > 0, status  # not confirmed: kept
        agent.kill9()
        before_replay(proxy)
        proxy.set(mode="commit_then_reset", count=3, path=refused, method="POST")
        sent = proxy.paths[refused]
        done = replay_cli(journal_dir, tracking_uri=proxy.uri)
        assert done.returncode == 0, f"replay through the proxy: {done.stdout}{done.stderr}"
        assert proxy.paths[refused] > sent  # the replay went through it
    done = replay_cli(journal_dir, tracking_uri=server.uri)
    assert done.returncode == 0, f"second replay: {done.stdout}{done.stderr}"


def test_assessments_lost_at_kill_9_are_written_once_by_replay(
    agents: Callable[..., Agent],
    mlflow_server: MlflowServer,
    mlflow_client: Any,
    experiment_name: str,
    journal_dir: Path,
) -> None:
    """The server answers 503 to every assessment request until the agent is killed: runs and
    spans are sent, the assessments kept. Replayed (the first replay losing answers), each
    assessment is there once."""

    def none_yet(proxy: FaultProxy) -> None:
        assert not traces_of(mlflow_client, experiment_name)["scored-0"].info.assessments

    refused_until_kill_9_then_replayed(
        agents, mlflow_server, experiment_name, journal_dir, TRACE_INFO, none_yet
    )
    assert_each_once(mlflow_client, experiment_name, 3)


def test_a_trace_whose_info_went_before_its_spans_is_completed_by_replay_after_kill_9(
    agents: Callable[..., Agent],
    mlflow_server: MlflowServer,
    mlflow_client: Any,
    experiment_name: str,
    journal_dir: Path,
) -> None:
    """Short root runs have their trace info and Feedback stored before their spans; every span
    request is refused (503) until the agent is killed. Replayed (the first replay losing the
    answer of each span request the server stored), each trace holds its spans once, under the
    info stored before the kill, its state kept, and each assessment once."""
    before: list[Any] = []

    def info_only(proxy: FaultProxy) -> None:
        assert proxy.paths[TRACE_INFO] == 3, proxy.paths  # each trace's info, before its spans
        before.extend(search_traces(mlflow_client, experiment_name, spans=False))
        assert sorted(t.info.state for t in before) == ["ERROR", "OK", "OK"]
        assert all(ours(t) for t in before)  # their Feedback is there already

    refused_until_kill_9_then_replayed(
        agents, mlflow_server, experiment_name, journal_dir, "/v1/traces", info_only
    )
    assert_each_once(mlflow_client, experiment_name, 3)
    after = traces_of(mlflow_client, experiment_name)
    assert {t.info.trace_id: t.info.state for t in before} == {
        t.info.trace_id: t.info.state for t in after.values()
    }
    for trace in after.values():
        names = sorted(span.name for span in trace.data.spans)
        assert len(names) == 1 + 2, names  # the run and its two steps, each once
        assert len({span.span_id for span in trace.data.spans}) == 3


def test_a_server_without_assessments_says_so_once_and_everything_else_goes_on(
    proxy: FaultProxy,
    mlflow_client: Any,
    experiment_name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    body = json.dumps({"error_code": "ENDPOINT_NOT_FOUND", "message": "No such endpoint"})
    proxy.set(
        mode="http",
        status=404,
        body=body.encode(),
        content_type="application/json",
        path=TRACE_INFO,
    )
    sink = MLflowSink(enabled=True, experiment=experiment_name, tracking_uri=proxy.uri, **FAST)
    with caplog.at_level(logging.WARNING, logger="rlm_mlflow"):
        run_scored(sink, 3)
        sink.close(WAIT)
    status = sink.status()
    assert status["deferred"] == 0, status
    assert not status["dropped"], status
    assert status["rejected"].get("assessments_unsupported") == 6, status
    off = [r for r in caplog.records if "assessments are off" in r.getMessage()]
    assert len(off) == 1, [r.getMessage() for r in caplog.records]
    traces = traces_of(mlflow_client, experiment_name)
    assert sorted(traces) == ["scored-0", "scored-1", "scored-2"]  # spans went on
    assert all(not ours(trace) for trace in traces.values())


def test_a_transport_without_assessment_calls_counts_them_unsupported() -> None:
    """A transport written before assessments (no such methods) still works."""

    class Older:
        """Every call of the transport interface, and none of the assessment calls."""

        def __init__(self) -> None:
            self.inner = MemoryTransport()

        def __getattr__(self, name: str) -> Any:
            if name in ("assessment_keys", "create_assessment", "link_traces"):
                raise AttributeError(name)
            return getattr(self.inner, name)

    older = Older()
    transport = lambda: older  # noqa: E731 - a factory: the class has no methods of its own
    sink = MLflowSink(enabled=True, experiment="e", transport=transport, **FAST)
    run_scored(sink, 2)
    sink.close(WAIT)
    status = sink.status()
    assert status["rejected"].get("assessments_unsupported") == 4, status
    assert status["deferred"] == 0, status
    assert not status["dropped"], status


def test_memory_transport_holds_each_assessment_once() -> None:
    transport = MemoryTransport()
    sink = MLflowSink(enabled=True, experiment="e", transport=transport, **FAST)
    run_scored(sink, 3)
    sink.close(WAIT)
    assert len(transport.assessments) == 3
    for held in transport.assessments.values():
        assert sorted(a.name for _, a in held) == ["completed", "total_reward"]


class LosesFirstAnswers(MemoryTransport):
    """Stores each trace's info, then loses the answer of the first ``lose`` such writes."""

    def __init__(self, lose: int) -> None:
        super().__init__(trace_upserts=True)
        self.lose = lose

    def finish_trace(self, experiment_id: str, end: TraceEnd) -> None:
        super().finish_trace(experiment_id, end)
        if self.lose > 0:
            self.lose -= 1
            raise TransientError("the answer was lost", maybe_committed=True)


def test_with_the_trace_info_each_trace_takes_one_request_and_a_lost_answer_no_copy() -> None:
    transport = LosesFirstAnswers(lose=2)
    sink = MLflowSink(enabled=True, experiment="e", transport=transport, **FAST)
    for index in range(3):
        sink.on_run_start(f"run-{index}", task="t", environment="e", params={})
    for index in range(3):  # three traces end in one cycle
        result = {"completed": index == 0, "steps": 0, "total_reward": float(index)}
        sink.on_run_end(f"run-{index}", result=result, run_path=None)
    sink.close(WAIT)
    status = sink.status()
    assert status["deferred"] == 0, status
    assert "create_assessment" not in transport.calls
    assert transport.calls.count("finish_trace") == 3 + 2  # two answers lost, written again
    assert transport.calls.count("export_spans") == 1  # the three traces' spans together
    runs = {run.tags["run_id"]: run.run_uuid for run in transport.runs.values()}
    assert len(transport.assessments) == 3
    for end in transport.trace_ends.values():
        index = int(next(k for k, v in runs.items() if v == end.run_uuid).split("-")[1])
        held = {a.name: a.value for _, a in transport.assessments[end.trace_id]}
        assert held == {"completed": index == 0, "total_reward": float(index)}
        assert end.state == ("OK" if index == 0 else "ERROR")  # not completed: an error
        trace = bytes.fromhex(end.trace_id.removeprefix("tr-"))
        assert transport.trace_links[trace] == end.run_uuid


def test_a_store_that_refuses_the_trace_info_gets_links_and_assessments_one_by_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    transport = MemoryTransport(trace_upserts=True)
    refused = PermanentError("no such thing", code="INVALID_STATE", status=400)
    transport.fail = lambda call: refused if call == "finish_trace" else None
    sink = MLflowSink(enabled=True, experiment="e", transport=transport, **FAST)
    with caplog.at_level(logging.WARNING, logger="rlm_mlflow"):
        run_scored(sink, 3)
        sink.close(WAIT)
    status = sink.status()
    assert status["deferred"] == 0, status
    assert not status["rejected"], status
    assert transport.calls.count("finish_trace") == 1  # refused once, never asked again
    assert transport.calls.count("create_assessment") == 6
    for held in transport.assessments.values():
        assert sorted(a.name for _, a in held) == ["completed", "total_reward"]
    runs = {run.tags["run_id"]: run.run_uuid for run in transport.runs.values()}
    linked = {run for links in transport.run_links.values() for run in links}
    linked |= set(transport.trace_links.values())
    assert {runs[f"scored-{i}"] for i in range(3)} <= linked
    refusals = [r for r in caplog.records if "refused a trace's info" in r.getMessage()]
    assert len(refusals) == 1


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param({"status": 200, "body": b"<html><form>Sign in</form></html>"}, id="login-200"),
        pytest.param({"status": 404, "body": b"<html>Not Found</html>"}, id="page-404"),
    ],
)
def test_a_proxy_page_for_the_server_version_keeps_assessments_one_by_one(
    answer: dict[str, Any], mlflow_server: MlflowServer, mlflow_client: Any, experiment_name: str
) -> None:
    """A proxy that answers ``/version`` with its own page hides the server's version: the
    trace info is never written with the assessments (an older server would replace the
    trace's tags and assessments), and each assessment is created once."""
    with FaultProxy(mlflow_server.port) as inner, FaultProxy(inner.port) as outer:
        outer.set(mode="http", content_type="text/html", path="/version", **answer)
        sink = MLflowSink(enabled=True, experiment=experiment_name, tracking_uri=outer.uri, **FAST)
        run_scored(sink, 2)
        sink.close(WAIT)
        status = sink.status()
        assert status["deferred"] == 0, status
        assert outer.paths["/version"] == 1, outer.paths  # asked once, the answer kept
        assert inner.paths[TRACE_INFO] == 0, inner.paths
    assert_each_once(mlflow_client, experiment_name, 2)

"""RLM runs as MLflow traces, read back from a real server (and from the embedded store).

One trace per root run, every descendant's spans in it, the recursion as the span tree, the code
and the output of each step, token totals counted once, the link to the MLflow run, ERROR for a
run that failed; exactly once through a kill and two replays; what a server without trace ingest
does to the sink (nothing but one warning).
"""

from __future__ import annotations

import logging
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from promises_support import Agent, Store, patient, replay_cli, span_label, wait_until
from rlm_mlflow import MLflowSink
from rlm_mlflow.testing import FaultProxy, MlflowServer

pytestmark = pytest.mark.integration

FAST: dict[str, Any] = {"flush_interval": 0.2, "retry_initial": 0.05, "retry_max_wait": 0.5}


def rich(
    number: int,
    tokens: tuple[int, int],
    *,
    ok: bool = True,
    stdout: str = "4\n",
    action: str = "run_python",
) -> dict[str, Any]:
    """A step event as RLM Code's runner makes it."""
    act: dict[str, Any] = {"action": action}
    if action != "delegate":
        act.update(code=f"print(2 + 2)  # {number}", rationale="add")
    return {
        "type": "step",
        "step": number,
        "reward": 0.5,
        "depth": 0,
        "action": act,
        "observation": {"success": ok, "stdout": stdout, "stderr": "", "execution_time": 0.02},
        "usage": {"total_calls": 1, "prompt_tokens": tokens[0], "completion_tokens": tokens[1]},
    }


def traces_of(store: Store, experiment: str, **filters: Any) -> list[Any]:
    experiment_id = store.experiment_id(experiment)
    assert experiment_id is not None
    found: list[Any] = store.client.search_traces(locations=[experiment_id], **filters)
    return found


def build_tree(sink: MLflowSink) -> None:
    """root: step 1, then step 2 delegating to child a (one step) and child b (which itself
    delegates to a grandchild, and fails); then the root ends. Tokens (input, output):
    root step 1 (100, 20); a (10, 5); grandchild (3, 1); b's own (20, 5) + grandchild;
    root step 2's own (30, 10) + both children."""
    sink.on_run_start("root", task="solve it all", environment="pure_rlm", params={"max_steps": 4})
    sink.on_step("root", event=rich(1, (100, 20)), cumulative_reward=0.5)
    sink.on_run_start(
        "a", task="branch a", environment="pure_rlm", params={"parent_run_id": "root"}
    )
    sink.on_step("a", event=rich(1, (10, 5)), cumulative_reward=0.5)
    sink.on_run_end("a", result={"completed": True, "final_response": "a done"}, run_path=None)
    sink.on_run_start(
        "b", task="branch b", environment="pure_rlm", params={"parent_run_id": "root"}
    )
    sink.on_run_start("g", task="leaf", environment="pure_rlm", params={"parent_run_id": "b"})
    sink.on_step("g", event=rich(1, (3, 1)), cumulative_reward=0.5)
    sink.on_run_end("g", result={"completed": True}, run_path=None)
    sink.on_step("b", event=rich(1, (23, 6), ok=False, action="delegate"), cumulative_reward=0.0)
    sink.on_run_end("b", result={"completed": False}, run_path=None)
    sink.on_step("root", event=rich(2, (63, 21), action="delegate"), cumulative_reward=1.0)
    sink.on_run_end("root", result={"completed": True, "final_response": "42"}, run_path=None)


def test_one_trace_per_root_run_holds_the_whole_recursion(
    mlflow_server: MlflowServer, store: Store, experiment_name: str
) -> None:
    """One trace for the root run with every descendant's spans: AGENT spans for runs, each
    child under the parent step that spawned it, code in, output out, tokens counted once,
    linked to the root's MLflow run, tagged, and a failed child marked ERROR."""
    with MLflowSink(
        enabled=True, experiment=experiment_name, tracking_uri=mlflow_server.uri, **FAST
    ) as sink:
        build_tree(sink)
        assert sink.flush(patient(60))
        assert sink.status()["traces"] == "full"
    (trace,) = traces_of(store, experiment_name)
    spans = {span_label(span): span for span in trace.data.spans}
    by_id = {span.span_id: span for span in trace.data.spans}
    assert Counter(span.span_type for span in trace.data.spans) == {
        "AGENT": 4,  # root, a, b, g
        "TOOL": 3,  # root step 1, a step 1, g step 1
        "CHAIN": 2,  # the delegating steps of root and b
        "LLM": 2,  # their own share of the tokens
    }
    root = spans["root"]
    assert root.parent_id is None
    assert by_id[spans["a"].parent_id].name == "step 2: delegate"
    assert by_id[spans["g"].parent_id].name == "step 1: delegate"
    assert span_label(by_id[by_id[spans["g"].parent_id].parent_id]) == "b"
    code_step = by_id[spans["root"].span_id]
    assert code_step is root
    first = next(
        s
        for s in trace.data.spans
        if s.name == "step 1: run_python" and s.parent_id == root.span_id
    )
    assert first.inputs == {"code": "```python\nprint(2 + 2)  # 1\n```", "rationale": "add"}
    assert first.outputs == {"stdout": "```\n4\n```", "stderr": "", "success": True}
    assert root.inputs == {"task": "solve it all"}
    assert root.outputs["final_response"] == "42"
    assert spans["b"].status.status_code == "ERROR"
    assert trace.info.state == "OK"
    # Each token once: the root's steps report everything their children used.
    assert trace.info.token_usage == {"input_tokens": 163, "output_tokens": 41, "total_tokens": 204}
    assert trace.info.tags["run_id"] == "root"
    assert trace.info.tags["component"] == "rlm-code-rlm"
    run = store.run(experiment_name, "root")
    linked = traces_of(store, experiment_name, run_id=run.info.run_id)
    assert [t.info.trace_id for t in linked] == [trace.info.trace_id]
    assert run.data.metrics["total_tokens"] == 204.0


def delegating(number: int, tokens: tuple[int, int]) -> dict[str, Any]:
    """A delegating step as RLM Code reports it: no code, no execution time."""
    event = rich(number, tokens, action="delegate")
    event["observation"] = {"success": True, "children": 2, "completed": 2}
    return event


def test_what_the_mlflow_ui_shows_read_back_from_a_server(
    mlflow_server: MlflowServer, store: Store, experiment_name: str
) -> None:
    """Read back from a real server: code and output as fenced code blocks (what the trace
    view's default Pretty view shows as written), the execution time with its unit, a
    delegating step's "model" span ending where its first child started, and every run named
    by its task with its run id in the ``run_id`` tag."""
    with MLflowSink(
        enabled=True, experiment=experiment_name, tracking_uri=mlflow_server.uri, **FAST
    ) as sink:
        sink.on_run_start("root", task="solve it all", environment="e", params={})
        sink.on_step("root", event=rich(1, (100, 20)), cumulative_reward=0.5)
        for child in ("a", "b"):
            sink.on_run_start(
                child, task=f"branch {child}", environment="e", params={"parent_run_id": "root"}
            )
            sink.on_step(child, event=rich(1, (10, 5)), cumulative_reward=0.5)
            sink.on_run_end(child, result={"completed": True}, run_path=None)
        sink.on_step("root", event=delegating(2, (50, 20)), cumulative_reward=1.0)
        sink.on_run_end("root", result={"completed": True}, run_path=None)
        assert sink.flush(patient(60))
    (trace,) = traces_of(store, experiment_name)
    spans = {(span_label(span), span.parent_id): span for span in trace.data.spans}
    code_steps = [s for s in trace.data.spans if s.span_type == "TOOL"]
    assert len(code_steps) == 3
    for step in code_steps:
        code = step.inputs["code"]
        assert code.startswith("```python\nprint(2 + 2)  # ")
        assert code.endswith("\n```")
        assert step.outputs["stdout"] == "```\n4\n```"
        assert step.attributes["rlm.execution_time_s"] == 0.02
        assert "rlm.execution_time" not in step.attributes
    root = spans["root", None]
    step = spans["step 2: delegate", root.span_id]
    model = spans["model", step.span_id]
    a, b = spans["a", step.span_id], spans["b", step.span_id]
    assert step.start_time_ns == model.start_time_ns < model.end_time_ns == a.start_time_ns
    assert a.end_time_ns <= b.start_time_ns < b.end_time_ns <= step.end_time_ns
    names = {r.data.tags["run_id"]: r.info.run_name for r in store.runs(experiment_name)}
    assert names == {"root": "solve it all · root", "a": "branch a · a", "b": "branch b · b"}


def test_a_run_that_never_ended_makes_an_error_trace(
    mlflow_server: MlflowServer, store: Store, experiment_name: str
) -> None:
    """A root run still open when the sink closes ends FAILED, and its trace is ERROR."""
    sink = MLflowSink(
        enabled=True, experiment=experiment_name, tracking_uri=mlflow_server.uri, **FAST
    )
    sink.on_run_start("abandoned", task="t", environment="e", params={})
    sink.on_step("abandoned", event=rich(1, (5, 5)), cumulative_reward=0.5)
    sink.close(30)
    (trace,) = traces_of(store, experiment_name)
    assert trace.info.state == "ERROR"
    assert store.run(experiment_name, "abandoned").info.status == "FAILED"


def test_metadata_traces_carry_no_text(
    mlflow_server: MlflowServer, store: Store, experiment_name: str
) -> None:
    """traces="metadata": sizes, timings, tokens and status, but no code, output or task."""
    with MLflowSink(
        enabled=True,
        experiment=experiment_name,
        tracking_uri=mlflow_server.uri,
        traces="metadata",
        **FAST,
    ) as sink:
        sink.on_run_start("quiet", task="secret task", environment="e", params={})
        sink.on_step("quiet", event=rich(1, (7, 3), stdout="secret output"), cumulative_reward=0.5)
        sink.on_run_end(
            "quiet", result={"completed": True, "final_response": "secret"}, run_path=None
        )
    (trace,) = traces_of(store, experiment_name)
    text = repr([(s.inputs, s.outputs, s.attributes) for s in trace.data.spans])
    assert "secret" not in text
    assert "print(2 + 2)" not in text
    step = next(s for s in trace.data.spans if s.span_type == "TOOL")
    assert step.inputs["code_chars"] == len("print(2 + 2)  # 1")
    assert step.outputs["stdout_chars"] == len("secret output")
    assert trace.info.token_usage["total_tokens"] == 10


def test_long_output_is_cut_and_says_so(
    mlflow_server: MlflowServer, store: Store, experiment_name: str
) -> None:
    """A 50,000-character stdout keeps its head and its tail, and the span says it was cut."""
    stdout = "".join(f"line {i}\n" for i in range(6000))
    with MLflowSink(
        enabled=True, experiment=experiment_name, tracking_uri=mlflow_server.uri, **FAST
    ) as sink:
        sink.on_run_start("long", task="t", environment="e", params={})
        sink.on_step("long", event=rich(1, (1, 1), stdout=stdout), cumulative_reward=0.5)
        sink.on_run_end("long", result={"completed": True}, run_path=None)
    (trace,) = traces_of(store, experiment_name)
    step = next(s for s in trace.data.spans if s.span_type == "TOOL")
    shown = step.outputs["stdout"]
    assert shown.startswith("```\nline 0\n")
    assert shown.endswith("line 5999\n```")
    assert "characters cut]" in shown
    assert len(shown) < 17_000
    assert step.attributes["rlm.truncated"] == ["stdout"]


def test_traces_off_sends_no_trace(
    mlflow_server: MlflowServer, store: Store, experiment_name: str
) -> None:
    with MLflowSink(
        enabled=True,
        experiment=experiment_name,
        tracking_uri=mlflow_server.uri,
        traces="off",
        **FAST,
    ) as sink:
        build_tree(sink)
    assert traces_of(store, experiment_name) == []
    assert store.run(experiment_name, "root").info.status == "FINISHED"


def test_a_server_without_trace_ingest_turns_traces_off_once(
    mlflow_server: MlflowServer,
    store: Store,
    experiment_name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """/v1/traces answering MLflow's JSON 404 (an older server): one warning, status says why,
    runs land; the spans of that cycle are counted as rejected, never as sent."""
    caplog.set_level(logging.WARNING, logger="rlm_mlflow")
    with FaultProxy(mlflow_server.port) as proxy:
        proxy.set(mode="http", status=404, path="/v1/traces")
        with MLflowSink(
            enabled=True, experiment=experiment_name, tracking_uri=proxy.uri, **FAST
        ) as sink:
            build_tree(sink)
            assert sink.flush(patient(60))
            status = sink.status()
            sink.on_run_start("later", task="t", environment="e", params={})
            sink.on_step("later", event=rich(1, (1, 1)), cumulative_reward=0.5)
            sink.on_run_end("later", result={"completed": True}, run_path=None)
        traces_requests = proxy.paths["/v1/traces"]
    assert status["traces"].startswith("off: ")
    assert "404" in status["traces"]
    assert status["dropped"] == {}
    assert status["spans_sent"] == 0
    assert status["rejected"]["traces_unsupported"] > 0
    assert traces_requests == 1
    warnings = [r for r in caplog.records if "traces are off" in r.getMessage()]
    assert len(warnings) == 1
    runs = store.by_name(experiment_name)
    assert {name: run.info.status for name, run in runs.items()} == {
        "root": "FINISHED",
        "a": "FINISHED",
        "b": "FINISHED",
        "g": "FINISHED",
        "later": "FINISHED",
    }


def test_the_embedded_store_gets_traces_too(tmp_path: Path, experiment_name: str) -> None:
    """With a sqlite:/// store (the demo's) the spans are written in-process, no server."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with MLflowSink(enabled=True, experiment=experiment_name, tracking_uri=uri, **FAST) as sink:
        build_tree(sink)
        # A new sqlite store is migrated first: slow on a busy machine, longer than close()'s
        # own deadline, which is not what this test is about.
        assert sink.flush(patient(120)), sink.status()
    store = Store(uri)
    (trace,) = traces_of(store, experiment_name)
    assert len(trace.data.spans) == 11
    assert trace.info.token_usage["total_tokens"] == 204
    run = store.run(experiment_name, "root")
    assert len(traces_of(store, experiment_name, run_id=run.info.run_id)) == 1
    # The trace's info went with its Feedback in one write (MLflow 3.13+ database store).
    assert trace.info.trace_metadata["mlflow.sourceRun"] == run.info.run_id
    assert [(a.name, a.value) for a in trace.info.assessments] == [("completed", True)]
    assert trace.info.state.value == "OK"


@pytest.mark.slow
def test_kill_9_then_two_replays_give_every_span_once(
    agents: Any, mlflow_server: MlflowServer, store: Store, experiment_name: str, journal_dir: Path
) -> None:
    """An agent killed mid-tree: after two replays the trace holds every step whose hook had
    returned, each span once (same ids each time), children under their steps, root KILLED."""
    agent: Agent = agents("trace_tree.py", mlflow_server.uri, experiment_name)
    last = -1
    while last < 40:
        line = agent.expect("STEP ")
        last = int(line.split()[1])
    agent.process.send_signal(signal.SIGKILL)
    agent.wait(30)
    for _ in range(2):
        done = replay_cli(journal_dir, tracking_uri=mlflow_server.uri)
        assert done.returncode == 0, done.stdout + done.stderr
    wait_until(
        lambda: len(traces_of(store, experiment_name)) == 1, 30, "the trace of the killed agent"
    )
    (trace,) = traces_of(store, experiment_name)
    spans = trace.data.spans
    ids = Counter(span.span_id for span in spans)
    assert max(ids.values()) == 1
    root_steps = [s for s in spans if s.parent_id is not None and s.name.startswith("step ")]
    numbers = {
        int(s.name.split()[1].rstrip(":"))
        for s in root_steps
        if s.attributes.get("rlm.run_id") == "tree"
    }
    assert set(range(last + 1)) <= numbers
    assert trace.info.state == "ERROR"  # the root never ended: KILLED
    assert store.run(experiment_name, "tree").info.status == "KILLED"
    children = [s for s in spans if s.span_type == "AGENT" and s.parent_id is not None]
    by_id = {span.span_id: span for span in spans}
    assert children
    assert all(by_id[c.parent_id].name.endswith("delegate") for c in children)


def test_a_run_past_the_span_budget_opens_as_a_small_trace_with_exact_figures(
    mlflow_server: MlflowServer, store: Store, experiment_name: str
) -> None:
    """A run of three budgets of steps with a child run early (in the trace, under the step
    that spawned it) and one late (past the budget, folded into the summary): the trace read
    back holds at most the budget of spans, every parent there; its token total, and the
    tokens of the spans under the root (steps and summary), are what every step used; every
    step's metric is in the run's history; each child run is an MLflow run."""
    budget = 60
    count = 3 * budget
    with MLflowSink(
        enabled=True,
        experiment=experiment_name,
        tracking_uri=mlflow_server.uri,
        span_budget=budget,
        **FAST,
    ) as sink:
        sink.on_run_start("root", task="a long run", environment="e", params={})
        for child in ("early", "late"):
            if child == "late":
                for number in range(2, count):
                    sink.on_step("root", event=rich(number, (number, 1)), cumulative_reward=0.5)
            sink.on_run_start(child, task=child, environment="e", params={"parent_run_id": "root"})
            sink.on_step(child, event=rich(1, (10, 5)), cumulative_reward=0.5)
            sink.on_run_end(child, result={"completed": True}, run_path=None)
            if child == "early":  # the step that delegated reports its child's tokens too
                sink.on_step("root", event=delegating(1, (11, 6)), cumulative_reward=0.5)
        sink.on_step("root", event=delegating(count, (count + 10, 6)), cumulative_reward=0.5)
        sink.on_run_end("root", result={"completed": True}, run_path=None)
        assert sink.flush(patient(120))
    (trace,) = traces_of(store, experiment_name)
    spans = trace.data.spans
    assert len(spans) <= budget
    ids = {span.span_id for span in spans}
    assert all(span.parent_id in ids for span in spans if span.parent_id is not None)
    labels = {span_label(span): span for span in spans}
    assert "late" not in labels
    by_id = {span.span_id: span for span in spans}
    assert by_id[labels["early"].parent_id].name == "step 1: delegate"
    (summary,) = [s for s in spans if s.name.endswith("(summary)")]
    assert summary.outputs["child_runs"] == 1
    expected = 11 + sum(range(2, count)) + count + 10
    assert trace.info.token_usage["input_tokens"] == expected
    root = labels["root"]
    under_root = [s for s in spans if s.parent_id == root.span_id]
    counted = sum(s.attributes["mlflow.chat.tokenUsage"]["input_tokens"] for s in under_root)
    assert counted == expected
    run = store.run(experiment_name, "root")
    assert store.steps(run) == list(range(1, count + 1))
    assert {r.data.tags["run_id"] for r in store.runs(experiment_name)} == {
        "root",
        "early",
        "late",
    }


@pytest.mark.slow
@pytest.mark.parametrize("shapes", ["kept", "disk full"])
def test_a_tree_killed_while_the_server_was_away_is_replayed_within_its_span_budget(
    agents: Any,
    mlflow_server: MlflowServer,
    store: Store,
    experiment_name: str,
    journal_dir: Path,
    shapes: str,
) -> None:
    """A tree with a span budget of 30 sends its first spans, then the server goes away (503s)
    while the agent steps on and delegates, and the agent is killed with ``kill -9``. After one
    replay the trace read back holds at most 30 spans, live and replayed together, every span's
    parent is in it, and the root is KILLED with every step's metric once.

    "disk full": from the tree's start no file of the agent grows past 16 bytes (``ulimit -f``;
    the journal's first segment is allocated already and holds the whole tree), so the traces'
    shapes are never written beside the journal (a shape of a root and one child takes 48).
    Replay then shapes the trace afresh: it may hold more than its budget (docs/traces.md), but
    no span without its parent, every step once."""
    budget = 30
    limit = ["16"] if shapes == "disk full" else []
    with FaultProxy(mlflow_server.port) as proxy:
        agent: Agent = agents(
            "trace_tree.py", proxy.uri, experiment_name, str(budget), *limit, stdin=True
        )
        agent.expect("READY", patient(120))
        before = proxy.paths["/v1/traces"]
        agent.send("go")
        assert proxy.wait_until(lambda p: p.paths["/v1/traces"] > before, patient(60))
        proxy.set(mode="http", status=503)
        refused = proxy.requests
        first = int(agent.expect("STEP ").split()[1])
        last = first
        while last < first + 60:  # the tree goes on, journaled only
            last = int(agent.expect("STEP ").split()[1])
        assert proxy.wait_until(lambda p: p.requests > refused, patient(60))
        agent.process.send_signal(signal.SIGKILL)
        agent.wait(30)
    kept_shapes = list(journal_dir.rglob("trace-shapes.json"))
    assert kept_shapes if shapes == "kept" else not kept_shapes, kept_shapes  # the way was met
    done = replay_cli(journal_dir, tracking_uri=mlflow_server.uri)
    assert done.returncode == 0, done.stdout + done.stderr
    (trace,) = [
        t
        for t in traces_of(store, experiment_name)
        if any(
            s.parent_id is None and s.attributes.get("rlm.run_id") == "tree" for s in t.data.spans
        )
    ]
    spans = trace.data.spans
    if shapes == "kept":
        assert len(spans) <= budget, len(spans)
    ids = {span.span_id for span in spans}
    assert [s for s in spans if s.parent_id is not None and s.parent_id not in ids] == []
    assert trace.info.state == "ERROR"  # the root never ended: KILLED
    run = store.run(experiment_name, "tree")
    assert run.info.status == "KILLED"
    steps = store.steps(run)
    assert sorted(steps) == list(range(len(steps)))  # each step once, none missing
    assert len(steps) > last

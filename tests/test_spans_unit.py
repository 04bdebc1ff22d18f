"""The OTLP messages encoded by hand are the ones protobuf writes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from rlm_mlflow import MLflowSink
from rlm_mlflow._events import RunEnd, RunStart, Step, StepDetail, Text, Usage
from rlm_mlflow._exporters import otlp
from rlm_mlflow._exporters.convert import run_name
from rlm_mlflow._exporters.spans import Ids, RunInfo, SpanBuilder
from rlm_mlflow._exporters.traces import TracesExporter
from rlm_mlflow._exporters.work import RunWork
from rlm_mlflow._transports.base import parse_spans_request
from rlm_mlflow.testing import MemoryTransport


def reference_value(value: Any) -> common_pb2.AnyValue:
    """What the exporter means by each kind of attribute value, built with protobuf."""
    if isinstance(value, bool):
        return common_pb2.AnyValue(bool_value=value)
    if isinstance(value, int) and -(2**63) <= value < 2**63:
        return common_pb2.AnyValue(int_value=value)
    if isinstance(value, float):
        return common_pb2.AnyValue(double_value=value)
    if isinstance(value, dict):
        return common_pb2.AnyValue(
            kvlist_value=common_pb2.KeyValueList(
                values=[
                    common_pb2.KeyValue(key=str(k), value=reference_value(v))
                    for k, v in value.items()
                    if v is not None
                ]
            )
        )
    if isinstance(value, list | tuple):
        return common_pb2.AnyValue(
            array_value=common_pb2.ArrayValue(values=[reference_value(v) for v in value])
        )
    return common_pb2.AnyValue(string_value=str(value))


ATTRIBUTES: dict[str, Any] = {
    "text": "print('héllo ✓')\n" * 50,
    "empty": "",
    "yes": True,
    "no": False,
    "zero": 0,
    "negative": -5,
    "int64 max": 2**63 - 1,
    "beyond int64": 2**70,
    "double": 0.25,
    "nan": float("nan"),
    "nested": {"code": "x = 1", "usage": {"input_tokens": 3, "output_tokens": 0}, "gone": None},
    "empty mapping": {},
    "list": ["a", 1, 2.5, None, ["b"]],
    "skipped": None,
    "long": "x" * 70_000,  # a three-byte length prefix
}


@pytest.mark.parametrize(
    ("parent", "start", "code", "message"),
    [
        (b"p" * 8, 1_700_000_000_000_000_000, otlp.STATUS_OK, None),
        (None, 0, otlp.STATUS_UNSET, None),
        (b"q" * 8, 5, otlp.STATUS_ERROR, "the step failed"),
    ],
)
def test_a_span_encoded_by_hand_is_the_span_protobuf_writes(
    parent: bytes | None, start: int, code: int, message: str | None
) -> None:
    ours = otlp.span(
        trace_id=b"t" * 16,
        span_id=b"s" * 8,
        parent_id=parent,
        name="step 3: run_python",
        start_ns=start,
        end_ns=start + 10,
        attributes=ATTRIBUTES,
        status_code=code,
        status_message=message,
    )
    reference = trace_pb2.Span(
        trace_id=b"t" * 16,
        span_id=b"s" * 8,
        parent_span_id=parent or b"",
        name="step 3: run_python",
        kind=trace_pb2.Span.SPAN_KIND_INTERNAL,
        start_time_unix_nano=start,
        end_time_unix_nano=start + 10,
        attributes=[
            common_pb2.KeyValue(key=key, value=reference_value(value))
            for key, value in ATTRIBUTES.items()
            if value is not None
        ],
        status=trace_pb2.Status(code=code, message=message or ""),  # type: ignore[arg-type]
    )
    assert ours == reference.SerializeToString()
    parsed = trace_pb2.Span.FromString(ours)
    assert parsed.attributes[0].value.string_value == ATTRIBUTES["text"]


def test_a_lone_surrogate_in_a_text_is_replaced_not_raised() -> None:
    encoded = otlp.any_value("bad \udcff text")
    assert common_pb2.AnyValue.FromString(encoded).string_value == "bad \ufffd text"


def test_a_request_framed_by_hand_parses_as_the_one_protobuf_builds() -> None:
    builder = SpanBuilder(Ids("t"))
    spans = [
        trace_pb2.Span(
            trace_id=n.to_bytes(16, "big"),
            span_id=n.to_bytes(8, "big"),
            name=f"step {n}",
            attributes=[
                common_pb2.KeyValue(key="out", value=common_pb2.AnyValue(string_value="x" * size))
            ],
        )
        # Sizes around each length-prefix boundary (1, 2 and 3 byte varints).
        for n, size in enumerate((0, 100, 127, 128, 16_383, 16_384, 70_000))
    ]
    for chosen in ([], spans[:1], spans):
        body = builder.request([s.SerializeToString() for s in chosen])
        expected = trace_service_pb2.ExportTraceServiceRequest(
            resource_spans=[
                trace_pb2.ResourceSpans(
                    resource=resource_pb2.Resource(
                        attributes=[
                            common_pb2.KeyValue(
                                key="service.name",
                                value=common_pb2.AnyValue(string_value="rlm-mlflow"),
                            )
                        ]
                    ),
                    scope_spans=[
                        trace_pb2.ScopeSpans(
                            scope=common_pb2.InstrumentationScope(name="rlm_mlflow"), spans=chosen
                        )
                    ],
                )
            ]
        )
        assert parse_spans_request(body) == expected
        assert body == expected.SerializeToString()


def test_int_subclasses_and_huge_ints_encode_at_once_and_never_raise() -> None:
    """An IntEnum is an int subclass: it is written as its plain int (a ``range`` membership
    test on a subclass walks the whole range, holding the interpreter); an int beyond int64 as
    its text; a value whose ``__str__`` raises as its type's name. In a child process, so a
    hang is a failure, not a stuck suite."""
    program = textwrap.dedent(
        """
        import enum, sys
        from opentelemetry.proto.common.v1 import common_pb2
        from rlm_mlflow._exporters import otlp

        class Level(enum.IntEnum):
            HIGH = 3

        class Hostile(int):
            def __eq__(self, other):
                raise RuntimeError("no")
            __hash__ = int.__hash__

        class Unprintable:
            def __str__(self):
                raise RuntimeError("no")

        sys.set_int_max_str_digits(4300)
        for value in (Level.HIGH, Hostile(-5), 2**70, 10**5000, Unprintable()):
            parsed = common_pb2.AnyValue.FromString(otlp.any_value(value))
            print(parsed.WhichOneof("value"), getattr(parsed, parsed.WhichOneof("value")))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "int_value 3",
        "int_value -5",
        f"string_value {2**70}",
        f"string_value <int of {(10**5000).bit_length()} bits>",
        "string_value <Unprintable>",
    ]


# -- what the MLflow UI shows: span shapes --------------------------------------------------------


def decoded(value: common_pb2.AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "kvlist_value":
        return {kv.key: decoded(kv.value) for kv in value.kvlist_value.values}
    if kind == "array_value":
        return [decoded(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


def spans_of(memory: MemoryTransport) -> dict[str, Any]:
    """Every span the sink sent, by name (a run's AGENT span by its RLM run id): its attributes
    decoded, its times."""
    out: dict[str, Any] = {}
    for span in memory.spans.values():
        attributes = {kv.key: decoded(kv.value) for kv in span.attributes}
        name = span.name
        if attributes.get("mlflow.spanType") == "AGENT":
            name = attributes["rlm.run_id"]
        out[name] = (attributes, span.start_time_unix_nano, span.end_time_unix_nano)
    return out


def code_event(number: int, code: str, stdout: str, stderr: str = "") -> dict[str, Any]:
    return {
        "type": "step",
        "step": number,
        "reward": 0.5,
        "action": {"action": "run_python", "code": code, "rationale": "a *first* look"},
        "observation": {
            "success": not stderr,
            "stdout": stdout,
            "stderr": stderr,
            "execution_time": 0.004,
        },
        "usage": {"total_calls": 1, "prompt_tokens": 10, "completion_tokens": 2},
    }


def test_code_and_output_are_fenced_code_blocks_the_pretty_view_shows_as_written() -> None:
    """MLflow's default trace view renders a string as Markdown (``# step 0`` a heading, lines
    run together) but a fenced code block as written: code goes as a python block, stdout and
    stderr as plain blocks, a fence longer than any backticks inside; prose stays prose."""
    code = "# step 0: look at the data\nx = [1, 2]\nfor v in x:\n    print(v)\n"
    tricky = "print('```')\n```\n````"
    memory = MemoryTransport()
    with MLflowSink(enabled=True, transport=memory, flush_interval=0.05) as sink:
        sink.on_run_start("r", task="# look at the data", environment="e", params={})
        sink.on_step("r", event=code_event(0, code, "1\n2\n"), cumulative_reward=0.5)
        sink.on_step("r", event=code_event(1, tricky, "", "Traceback: *boom*"), cumulative_reward=0)
        sink.on_run_end("r", result={"completed": True}, run_path=None)
    spans = spans_of(memory)
    first = spans["step 0: run_python"][0]
    assert first["mlflow.spanInputs"] == {
        "code": "```python\n" + code + "```",
        "rationale": "a *first* look",
    }
    assert first["mlflow.spanOutputs"] == {
        "stdout": "```\n1\n2\n```",
        "stderr": "",  # nothing to show: no empty block
        "success": True,
    }
    second = spans["step 1: run_python"][0]
    assert second["mlflow.spanInputs"]["code"] == "`````python\n" + tricky + "\n`````"
    assert second["mlflow.spanOutputs"]["stderr"] == "```\nTraceback: *boom*\n```"
    assert second["mlflow.spanOutputs"]["stdout"] == ""
    assert spans["r"][0]["mlflow.spanInputs"] == {"task": "# look at the data"}
    # The run's span, and its trace, are named as its MLflow run is: by the task, then the id.
    agent = spans["r"][0]
    assert agent["mlflow.traceTag.mlflow.traceName"] == "# look at the data · r"
    assert "# look at the data · r" in {span.name for span in memory.spans.values()}


def test_a_model_calls_prompt_and_response_are_shown_as_sent() -> None:
    """A model call's prompt and response (DSPy's ``[[ ## field ## ]]`` blocks, line by line)
    are code blocks too; a response holding the model's own fenced code keeps it, inside a
    longer fence."""
    prompt = "[[ ## query ## ]]\nWhat is it about?\n\n# not a heading"
    response = "[[ ## code ## ]]\n```python\nprint(1)\n```"
    call = {
        "model": "lm/main",
        "input": prompt,
        "output": response,
        "usage": {"prompt_tokens": 5, "completion_tokens": 3},
    }
    event = {**code_event(0, "print(1)", "1\n"), "llm_calls": [call]}
    memory = MemoryTransport()
    with MLflowSink(enabled=True, transport=memory, flush_interval=0.05) as sink:
        sink.on_run_start("r", task="t", environment="e", params={})
        sink.on_step("r", event=event, cumulative_reward=0.5)
        sink.on_run_end("r", result={"completed": True}, run_path=None)
    attributes = spans_of(memory)["lm/main"][0]
    assert attributes["mlflow.spanInputs"] == {"prompt": "```\n" + prompt + "\n```"}
    assert attributes["mlflow.spanOutputs"] == {"response": "````\n" + response + "\n````"}


def test_execution_time_says_its_unit() -> None:
    memory = MemoryTransport()
    with MLflowSink(enabled=True, transport=memory, flush_interval=0.05) as sink:
        sink.on_run_start("r", task="t", environment="e", params={})
        sink.on_step("r", event=code_event(0, "x = 1", ""), cumulative_reward=0.5)
        sink.on_run_end("r", result={"completed": True}, run_path=None)
    attributes = spans_of(memory)["step 0: run_python"][0]
    assert attributes["rlm.execution_time_s"] == 0.004
    assert "rlm.execution_time" not in attributes


def test_a_delegating_steps_model_span_ends_where_its_first_child_started() -> None:
    """The model span of a step that spawned child runs covers the model's turn only: from the
    step's start to the first child's start, never the children's time as well."""
    memory = MemoryTransport()
    delegate = {
        "type": "step",
        "step": 1,
        "reward": 0.5,
        "action": {"action": "delegate", "rationale": "split"},
        "observation": {"success": True, "children": 1},
        "usage": {"total_calls": 2, "prompt_tokens": 50, "completion_tokens": 10},
    }
    with MLflowSink(enabled=True, transport=memory, flush_interval=0.05) as sink:
        sink.on_run_start("root", task="t", environment="e", params={})
        sink.on_run_start("kid", task="part", environment="e", params={"parent_run_id": "root"})
        sink.on_step("kid", event=code_event(0, "x = 1", ""), cumulative_reward=0.5)
        sink.on_run_end("kid", result={"completed": True}, run_path=None)
        sink.on_step("root", event=delegate, cumulative_reward=0.5)
        sink.on_run_end("root", result={"completed": True}, run_path=None)
    spans = spans_of(memory)
    _, step_start, step_end = spans["step 1: delegate"]
    model, model_start, model_end = spans["model"]
    _, kid_start, kid_end = spans["kid"]
    assert model["mlflow.chat.tokenUsage"]["input_tokens"] == 40  # its own share
    assert step_start == model_start <= model_end == kid_start < kid_end <= step_end


def test_child_starts_are_learnt_whatever_order_runs_come_in_and_kept_on_a_retry() -> None:
    """A cycle can list a child's run before its parent's (a journal replayed lane by lane):
    the parent's step still knows when its first child started, and a retry of the parent's
    start keeps it."""
    traces = TracesExporter(
        caller=None,  # type: ignore[arg-type]
        warnings=None,  # type: ignore[arg-type]
        prefix="t",
        runs=None,  # type: ignore[arg-type]
        transport=lambda: None,  # type: ignore[arg-type,return-value]
        mode="full",
    )
    parent = RunWork(no=1, starts=[RunStart(1, 100, "parent", root_no=1)])
    children = [
        RunWork(no=n, starts=[RunStart(n, at, f"c{n}", parent_no=1, root_no=1, parent_step=2)])
        for n, at in ((2, 500), (3, 400))
    ]
    traces.learn([*children, parent])
    assert traces.info[1].child_start_ns == {2: 400}
    traces.learn([parent])
    assert traces.info[1].child_start_ns == {2: 400}


def test_a_code_steps_model_span_ends_where_the_code_began() -> None:
    """A step that ran code and called sub-agents from it: the model spoke before the code
    ran, so its span ends at the earlier of the code's start and the first child's start."""
    builder = SpanBuilder(Ids("t"))
    run = RunInfo(no=1, run_id="r", root_no=1, start_ns=1_000)
    usage = Usage(input_tokens=30, output_tokens=5, total_tokens=35, calls=2)
    children = Usage(input_tokens=10, output_tokens=1, total_tokens=11, calls=1)
    detail = StepDetail(
        code=Text("llm_query('x')", 14), execution_time=2e-6, usage=usage, children_usage=children
    )
    step = Step(1, 10_000, 0, 0.5, 0.5, detail=detail, ordinal=0, since_ns=1_000)

    def model_bounds() -> tuple[int, int]:
        (model,) = [
            s
            for s in (trace_pb2.Span.FromString(b) for b in builder.step_spans(run, step))
            if s.name == "model"
        ]
        return model.start_time_unix_nano, model.end_time_unix_nano

    assert model_bounds() == (1_000, 8_000)  # the code ran for the last 2 us
    run.child_started(0, 5_000)
    run.child_started(0, 6_000)
    assert model_bounds() == (1_000, 5_000)  # the first child started before that


# -- run names ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("run_id", "task", "name"),
    [
        (
            "run_20261204_190112_123456",
            "Sum the primes below 100",
            "Sum the primes below 100 · 123456",
        ),
        ("a", "  two\n words  ", "two words · a"),
        (
            "run_20261204_190112_654321",
            "Summarize the quarterly report, then list every risk it names with its page",
            "Summarize the quarterly report… · 654321",
        ),
        ("rlm-0123456789ab", "x" * 100, "x" * 32 + "… · 6789ab"),
        ("run_20261204_190112_123456", None, "run_20261204_190112_123456"),
        ("run_20261204_190112_123456", " \n", "run_20261204_190112_123456"),
    ],
)
def test_a_run_is_named_by_its_task_and_the_end_of_its_id(
    run_id: str, task: str | None, name: str
) -> None:
    assert run_name(run_id, task) == name
    assert len(run_name(run_id * 20, (task or "") * 20)) <= 250


def test_runs_are_named_by_their_task_keep_their_id_as_a_tag_and_stay_unique_by_key() -> None:
    """Two runs of one task read apart; the run id is the ``run_id`` tag; a run whose task was
    not recorded (metadata traces) keeps its id as its name; a replay finds runs by their key,
    so the new names never make a second run."""
    memory = MemoryTransport()
    ids = ["run_20261204_190112_000001", "run_20261204_190112_000002"]
    with MLflowSink(enabled=True, transport=memory, flush_interval=0.05) as sink:
        for run_id in ids:
            sink.on_run_start(run_id, task="sum the primes", environment="e", params={})
            sink.on_run_end(run_id, result={"completed": True}, run_path=None)
    with MLflowSink(enabled=True, transport=memory, flush_interval=0.05, traces="metadata") as sink:
        sink.on_run_start("quiet", task="a secret task", environment="e", params={})
        sink.on_run_end("quiet", result={"completed": True}, run_path=None)
    runs = sorted(memory.runs.values(), key=lambda run: run.tags["run_id"])
    assert [(run.name, run.tags["run_id"]) for run in runs] == [
        ("quiet", "quiet"),
        ("sum the primes · 000001", ids[0]),
        ("sum the primes · 000002", ids[1]),
    ]
    assert memory.one(ids[0]).tags["run_id"] == ids[0]  # found by its run id, as before


# -- the span budget ------------------------------------------------------------------------------


def budget_step(number: int, *, ok: bool = True) -> dict[str, Any]:
    """A step with its own tokens and reward (number, 1) and (number / 10)."""
    return {
        "type": "step",
        "step": number,
        "reward": number / 10,
        "action": {"action": "run_python", "code": f"x = {number}", "rationale": "r"},
        "observation": {"success": ok, "stdout": "", "stderr": "", "execution_time": 0.001},
        "usage": {"total_calls": 1, "prompt_tokens": number, "completion_tokens": 1},
    }


def budget_sink(memory: MemoryTransport, budget: int) -> MLflowSink:
    """A sink into ``memory`` with a span budget, draining often."""
    return MLflowSink(enabled=True, transport=memory, flush_interval=0.01, span_budget=budget)


def decoded_spans(memory: MemoryTransport) -> list[dict[str, Any]]:
    """Every span the store holds: its ids, name and decoded attributes."""
    return [
        {
            "id": bytes(span.span_id),
            "parent": bytes(span.parent_span_id) or None,
            "name": span.name,
            "attributes": {kv.key: decoded(kv.value) for kv in span.attributes},
        }
        for span in memory.spans.values()
    ]


def assert_tree_whole(spans: list[dict[str, Any]]) -> None:
    """One root; every other span's parent is in the trace."""
    ids = {span["id"] for span in spans}
    assert [span for span in spans if span["parent"] is None] == [
        next(span for span in spans if span["parent"] is None)
    ]
    assert all(span["parent"] in ids for span in spans if span["parent"] is not None)


def test_past_the_span_budget_a_long_run_keeps_its_head_its_tail_and_one_exact_summary() -> None:
    """A run of three budgets of steps: at most the budget of spans, its first steps in full,
    one summary span for the range between (count, reward range and sum, failures, tokens),
    its last steps in full; every step's metric still logged; the steps' tokens add up to the
    run's, counting the summary's; ``spans_sent`` counts the spans the store holds."""
    budget, count = 40, 120
    memory = MemoryTransport()
    with budget_sink(memory, budget) as sink:
        sink.on_run_start("long", task="t", environment="e", params={})
        for number in range(1, count + 1):
            event = budget_step(number, ok=number % 7 != 0)
            sink.on_step("long", event=event, cumulative_reward=float(number))
            if number % 20 == 0:  # drains while it runs: the summary is sent as it grows
                assert sink.flush(30)
        sink.on_run_end("long", result={"completed": True}, run_path=None)
        assert sink.flush(30)
        status = sink.status()
    spans = decoded_spans(memory)
    assert len(spans) <= budget
    assert status["spans_sent"] == len(spans)  # a summary sent again is counted once
    assert_tree_whole(spans)
    (root,) = [s for s in spans if s["parent"] is None]
    steps = sorted(
        int(s["name"].split(":")[0].removeprefix("step "))
        for s in spans
        if s["name"].startswith("step ") and "(summary)" not in s["name"]
    )
    (summary,) = [s for s in spans if s["attributes"].get("rlm.summary")]
    tail = 4  # a tenth of the budget
    head = steps[: len(steps) - tail]
    assert head == list(range(1, len(head) + 1))
    assert steps[-tail:] == list(range(count - tail + 1, count + 1))
    elided = range(len(head) + 1, count - tail + 1)
    assert summary["name"] == f"steps {elided[0]:,}-{elided[-1]:,} (summary)"
    assert summary["parent"] == root["id"]
    figures = summary["attributes"]["mlflow.spanOutputs"]
    assert figures["steps"] == len(elided)
    assert figures["failures"] == sum(1 for n in elided if n % 7 == 0)
    assert figures["reward_min"] == elided[0] / 10
    assert figures["reward_max"] == elided[-1] / 10
    assert figures["reward_sum"] == pytest.approx(sum(n / 10 for n in elided))
    assert figures["tokens"]["input_tokens"] == sum(elided)
    under_root = [s for s in spans if s["parent"] == root["id"]]
    counted = sum(s["attributes"]["mlflow.chat.tokenUsage"]["input_tokens"] for s in under_root)
    assert counted == sum(range(1, count + 1))
    assert root["attributes"]["mlflow.chat.tokenUsage"]["input_tokens"] == counted
    (run,) = memory.runs.values()
    assert [step for step, _ in run.history("step_reward")] == list(range(1, count + 1))


def test_child_runs_count_against_the_trace_budget_and_every_span_keeps_its_parent() -> None:
    """A child run started while the budget has room is in the trace, and the step of its
    parent that spawned it is sent in full however late it comes; a child started past the
    budget is folded into its parent's summary (counted, its steps counted), and its own
    child with it: no span of theirs, no span whose parent is missing."""
    budget = 40
    memory = MemoryTransport()
    with budget_sink(memory, budget) as sink:
        sink.on_run_start("root", task="t", environment="e", params={})
        sink.on_run_start("early", task="e", environment="e", params={"parent_run_id": "root"})
        sink.on_step("early", event=budget_step(1), cumulative_reward=0.1)
        sink.on_run_end("early", result={"completed": True}, run_path=None)
        for number in range(1, 60):
            sink.on_step("root", event=budget_step(number), cumulative_reward=float(number))
        sink.on_run_start("late", task="l", environment="e", params={"parent_run_id": "root"})
        sink.on_run_start("deep", task="d", environment="e", params={"parent_run_id": "late"})
        sink.on_step("deep", event=budget_step(1), cumulative_reward=0.1)
        sink.on_run_end("deep", result={"completed": False}, run_path=None)
        for number in range(1, 4):
            sink.on_step("late", event=budget_step(number), cumulative_reward=0.1)
        sink.on_run_end("late", result={"completed": True}, run_path=None)
        for number in range(60, 70):
            sink.on_step("root", event=budget_step(number), cumulative_reward=float(number))
        sink.on_run_end("root", result={"completed": True}, run_path=None)
    spans = decoded_spans(memory)
    assert len(spans) <= budget
    assert_tree_whole(spans)
    agents = {
        s["attributes"]["rlm.run_id"]: s
        for s in spans
        if s["name"] != "model" and s["attributes"].get("mlflow.spanType") == "AGENT"
    }
    assert set(agents) == {"root", "early"}
    by_id = {s["id"]: s for s in spans}
    assert by_id[agents["early"]["parent"]]["name"] == "step 1: run_python"
    (summary,) = [s for s in spans if s["attributes"].get("rlm.summary")]
    figures = summary["attributes"]["mlflow.spanOutputs"]
    assert (figures["child_runs"], figures["child_steps"]) == (2, 4)
    assert len(memory.runs) == 4  # every run is still an MLflow run of its own


class _Refs:
    """What the traces exporter asks of the runs exporter, for building requests alone."""

    replaying = False

    def key_of(self, no: int) -> str:
        return f"p-{no}"

    def ref_of(self, no: int) -> None:
        return None


def budget_exporter() -> TracesExporter:
    traces = TracesExporter(
        caller=None,  # type: ignore[arg-type]
        warnings=None,  # type: ignore[arg-type]
        prefix="p",
        runs=_Refs(),  # type: ignore[arg-type]
        transport=lambda: None,  # type: ignore[arg-type,return-value]
        mode="full",
        span_budget=30,
    )
    traces._builder = SpanBuilder(traces.ids)
    return traces


def budget_works(cycles: int) -> list[list[RunWork]]:
    """A root run of 100 steps and its end, cut into ``cycles`` drain cycles."""
    start = RunStart(1, 1_000, "root", root_no=1)
    steps = [
        Step(
            1,
            2_000 + n,
            n + 1,
            0.5,
            float(n),
            detail=StepDetail(usage=Usage(n, 1, n + 1, 1), success=n % 3 != 0),
            ordinal=n,
            since_ns=1_999 + n,
        )
        for n in range(100)
    ]
    end = RunEnd(1, 9_000, "root", "FINISHED", usage=Usage(4950, 100, 5050, 100))
    size = -(-len(steps) // cycles)
    works = [RunWork(1, span_steps=steps[i : i + size]) for i in range(0, len(steps), size)]
    works[0].starts.append(start)
    works[-1].span_end = end
    return [[work] for work in works]


def stored(traces: TracesExporter, cycles: list[list[RunWork]]) -> dict[bytes, bytes]:
    """What a store upserting spans by id holds after these cycles: span id -> span."""
    held: dict[bytes, bytes] = {}
    for works in cycles:
        traces.learn(works)
        for _, spans, _ in traces._requests_of(works):
            for span in spans:
                held[bytes(trace_pb2.Span.FromString(span).span_id)] = span
        traces._settle_summaries({work.no: "sent" for work in works})
        traces._forget_ended(works)
    return held


def test_span_ids_and_the_final_summary_do_not_depend_on_cycles_or_retries() -> None:
    """Exporters of the same key prefix, taking a run in one cycle, in one cycle twice (a
    replay of what was sent), in seven cycles (its summary re-sent as it grows), in seven with
    some taken twice (a worker retrying what it had taken): the store ends up with the same
    spans, one summary with the same figures."""
    once = stored(budget_exporter(), budget_works(1))
    assert stored(budget_exporter(), budget_works(1) * 2) == once
    assert stored(budget_exporter(), budget_works(7)) == once
    c = budget_works(7)
    assert stored(budget_exporter(), [c[0], c[1], c[1], c[2], c[3], c[2], c[4], c[5], c[6]]) == once
    summaries = [
        s for s in map(trace_pb2.Span.FromString, once.values()) if s.name.endswith("(summary)")
    ]
    assert len(summaries) == 1
    assert len(once) <= 30


def test_a_cycle_kept_for_replay_leaves_the_summary_as_it_was() -> None:
    """The steps of a cycle whose spans were not sent are replayed from the journal (and
    summarised there); the live summary goes back to what it was without them, so no step is
    counted in two summaries."""
    traces = budget_exporter()
    first, second, _ = budget_works(3)
    stored(traces, [first])
    before = traces.shapes[1].elided
    assert before is not None
    assert before.count > 0
    figures = (before.count, before.usage)
    traces.learn(second)
    traces._requests_of(second)
    traces._settle_summaries({1: "deferred"})
    after = traces.shapes[1].elided
    assert after is not None
    assert (after.count, after.usage) == figures


def test_no_request_carries_more_than_a_thousand_spans_or_two_mebibytes() -> None:
    """Many running traces' steps in one cycle: each request stays small enough for a busy
    store to take well within the request timeout (a 5,000-span request took more than
    30 s), and together they carry every span once, in order."""
    from rlm_mlflow._exporters.traces import _chunks

    small = [bytes([n % 256]) * 300 for n in range(4_500)]
    large = [bytes([n % 256]) * 100_000 for n in range(50)]
    for spans in (small, large, small[:10] + large[:3] + small[10:2_000]):
        chunks = _chunks(spans)
        assert [span for chunk in chunks for span in chunk] == spans
        for chunk in chunks:
            assert len(chunk) <= 1_000
            assert sum(map(len, chunk)) <= 2 << 20


def test_a_replay_of_what_the_live_sink_kept_completes_the_trace_exactly() -> None:
    """The live exporter sends two cycles (past the budget: a summary), the third is kept for
    replay (its summary put back); a replay's exporter sends the third and the run's end.
    Together: two summaries of disjoint steps under different ids, and the tokens under the
    root, steps and summaries, are every step's exactly once."""
    first, second, third = budget_works(3)
    held = stored(budget_exporter(), [first, second])
    live = budget_exporter()
    stored(live, [first, second])
    live.learn(third)
    live._requests_of(third)  # not sent: kept in the journal
    live._settle_summaries({1: "deferred"})
    replay = budget_exporter()
    replay.learn(first[:1])  # a replay knows every run's start
    held.update(
        stored(replay, [[RunWork(1, span_steps=third[0].span_steps, span_end=third[0].span_end)]])
    )
    spans = list(map(trace_pb2.Span.FromString, held.values()))
    root = next(s for s in spans if not s.parent_span_id)
    under = [s for s in spans if s.parent_span_id == root.span_id]
    tokens = 0
    for span in under:
        attributes = {kv.key: decoded(kv.value) for kv in span.attributes}
        tokens += attributes["mlflow.chat.tokenUsage"]["input_tokens"]
    assert tokens == sum(range(100))
    assert len([s for s in under if s.name.endswith("(summary)")]) == 2


def test_a_run_just_past_its_budget_keeps_its_few_elided_steps_in_its_summary() -> None:
    """Fewer steps past the budget than the root's tail: they are in the summary sent while
    the run went on (so a process that dies keeps them in the trace) and stay there, never
    also in full: the tokens under the root are each step's once."""
    memory = MemoryTransport()
    with MLflowSink(enabled=True, transport=memory, flush_interval=0.01, span_budget=40) as sink:
        sink.on_run_start("r", task="t", environment="e", params={})
        for number in range(1, 37):
            sink.on_step("r", event=budget_step(number), cumulative_reward=float(number))
        sink.on_run_end("r", result={"completed": True}, run_path=None)
    spans = decoded_spans(memory)
    (root,) = [s for s in spans if s["parent"] is None]
    (summary,) = [s for s in spans if s["attributes"].get("rlm.summary")]
    assert summary["name"] == "steps 35-36 (summary)"
    under_root = [s for s in spans if s["parent"] == root["id"]]
    counted = sum(s["attributes"]["mlflow.chat.tokenUsage"]["input_tokens"] for s in under_root)
    assert counted == sum(range(1, 37))


def test_steps_with_model_calls_stay_within_the_budget_their_tail_cut_to_fit() -> None:
    """Steps of three spans each (two model calls): the trace still holds at most the budget,
    the last steps that fit in full, the rest of the tail in the summary; tokens exact."""
    budget = 40
    call = {"model": "lm", "input": "q", "output": "a", "usage": {"prompt_tokens": 1}}
    memory = MemoryTransport()
    with budget_sink(memory, budget) as sink:
        sink.on_run_start("r", task="t", environment="e", params={})
        for number in range(1, 101):
            event = {**budget_step(number), "llm_calls": [call, call]}
            sink.on_step("r", event=event, cumulative_reward=float(number))
        sink.on_run_end("r", result={"completed": True}, run_path=None)
    spans = decoded_spans(memory)
    assert len(spans) <= budget
    assert_tree_whole(spans)
    (root,) = [s for s in spans if s["parent"] is None]
    under_root = [s for s in spans if s["parent"] == root["id"]]
    assert any(s["name"] == "step 100: run_python" for s in under_root)
    counted = sum(s["attributes"]["mlflow.chat.tokenUsage"]["input_tokens"] for s in under_root)
    assert counted == sum(range(1, 101))


def test_the_span_budget_is_a_setting_and_an_environment_variable() -> None:
    """``span_budget`` (default 100) from the constructor or ``RLM_MLFLOW_SPAN_BUDGET``; a
    budget that is not a whole number of at least one is refused where it enters."""
    from rlm_mlflow._config import SinkConfig, config_from_env

    assert SinkConfig().span_budget == 100
    assert config_from_env({"RLM_MLFLOW_SPAN_BUDGET": " 500 "}).span_budget == 500
    assert config_from_env({"RLM_MLFLOW_SPAN_BUDGET": "500"}, span_budget=7).span_budget == 7
    assert MLflowSink(span_budget=250).config.span_budget == 250
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="span_budget"):
            SinkConfig(span_budget=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="RLM_MLFLOW_SPAN_BUDGET"):
        config_from_env({"RLM_MLFLOW_SPAN_BUDGET": "many"})


def test_a_replay_shapes_the_trace_with_the_span_budget_its_sink_had(tmp_path: Path) -> None:
    """The journal records the sink's span budget: a replay of a run its sink never sent keeps
    the trace within that budget, not replay's default, with every step's tokens once."""
    from rlm_mlflow import TransientError, replay

    down = MemoryTransport()
    down.fail = lambda call: TransientError("down")
    sink = MLflowSink(
        enabled=True,
        transport=down,
        journal_dir=tmp_path,
        span_budget=30,
        retry_initial=5,
        retry_max_wait=5,
    )
    sink.on_run_start("r", task="t", environment="e", params={})
    for number in range(1, 61):
        sink.on_step("r", event=budget_step(number), cumulative_reward=float(number))
    sink.on_run_end("r", result={"completed": True}, run_path=None)
    sink.close(0.5)
    memory = MemoryTransport()
    report = replay(tmp_path, transport=memory)
    assert report.ok
    spans = decoded_spans(memory)
    assert len(spans) <= 30
    (root,) = [s for s in spans if s["parent"] is None]
    under_root = [s for s in spans if s["parent"] == root["id"]]
    counted = sum(s["attributes"]["mlflow.chat.tokenUsage"]["input_tokens"] for s in under_root)
    assert counted == sum(range(1, 61))
    assert memory.one("r").history("cumulative_reward")[-1] == (60, 60.0)


class _Hostile:
    """A value whose every conversion raises."""

    def __float__(self) -> float:
        raise RuntimeError("no float")

    def __str__(self) -> str:
        raise RuntimeError("no str")

    __repr__ = __str__


def test_hostile_values_folded_into_the_summary_leave_its_figures_and_the_good_steps_exact() -> (
    None
):
    """Past the budget, steps whose reward is NaN, infinite, a string or an object whose every
    conversion raises, whose step number is not one, whose usage is negative or not a number:
    no hook raises, each bad value is counted, the summary's figures are those of the good
    values, every good step's metric lands, and the trace stays whole and within its budget."""
    budget, count = 40, 120
    hostile: dict[int, dict[str, Any]] = {
        60: {"reward": float("nan")},
        61: {"reward": float("inf")},
        62: {"reward": "high"},
        63: {"reward": _Hostile()},
        64: {"usage": {"total_calls": 1, "prompt_tokens": -5, "completion_tokens": "many"}},
        65: {"usage": _Hostile()},
        66: {"action": _Hostile(), "observation": {"stdout": _Hostile(), "success": _Hostile()}},
    }
    memory = MemoryTransport()
    with budget_sink(memory, budget) as sink:
        sink.on_run_start("long", task="t", environment="e", params={})
        for number in range(1, count + 1):
            event = {**budget_step(number), **hostile.get(number, {})}
            sink.on_step("long", event=event, cumulative_reward=float(number))
        sink.on_run_end("long", result={"completed": True}, run_path=None)
        assert sink.flush(30)
        status = sink.status()
    assert status["worker_failures"] == 0
    assert status["rejected"]["bad_metric"] == 4  # the rewards of steps 60 to 63
    assert status["rejected"]["bad_step_field"] >= 2  # the usage of 65, the action of 66
    spans = decoded_spans(memory)
    assert len(spans) <= budget
    assert_tree_whole(spans)
    (summary,) = [s for s in spans if s["attributes"].get("rlm.summary")]
    figures = summary["attributes"]["mlflow.spanOutputs"]
    first, last = (int(n.replace(",", "")) for n in summary["name"].split()[1].split("-"))
    assert first < 60  # the hostile steps are among the folded ones
    assert last > 66
    good = [n for n in range(first, last + 1) if n not in (60, 61, 62, 63)]
    assert figures["steps"] == last - first + 1
    assert figures["reward_min"] == good[0] / 10
    assert figures["reward_max"] == good[-1] / 10
    assert figures["reward_sum"] == pytest.approx(sum(n / 10 for n in good))
    assert all(isinstance(v, int) and v >= 0 for v in figures["tokens"].values()), figures["tokens"]
    (run,) = memory.runs.values()
    landed = [step for step, _ in run.history("step_reward")]
    assert landed == [n for n in range(1, count + 1) if n not in (60, 61, 62, 63)]


@pytest.mark.parametrize("how", ["closed", "killed", "answers-lost"])
def test_a_trace_sent_in_part_before_an_outage_keeps_its_budget_and_its_parents_after_replay(
    how: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A three-deep tree sends its first steps, then the store goes down and the rest waits in
    the journal (the sink closed, or its process killed with every run open). Replay sends the
    rest into the same store: the trace still holds at most the budget of spans, live and
    replayed together, every span's parent is in it, and every step's metric landed once.
    ``answers-lost``: a first replay's span requests are stored and their answers lost (kept
    for the next replay, which sends them again)."""
    import copy
    import shutil

    from rlm_mlflow import TransientError, replay

    budget = 30
    memory = MemoryTransport()
    sink = MLflowSink(
        enabled=True,
        transport=memory,
        journal_dir=tmp_path / "journal",
        span_budget=budget,
        flush_interval=0.01,
        retry_deadline=0.2,
        retry_initial=0.01,
        retry_max_wait=0.05,
    )
    tree = [("r", None, 60), ("c", "r", 20), ("g", "c", 20)]
    for run, parent, _ in tree:
        params = {} if parent is None else {"parent_run_id": parent}
        sink.on_run_start(run, task="t", environment="e", params=params)

    def steps(first: int, last: int) -> None:
        for run, _, count in tree:
            for number in range(first, min(last, count) + 1):
                sink.on_step(run, event=budget_step(number), cumulative_reward=float(number))

    steps(1, 8)
    assert sink.flush(10)
    live = len(memory.spans)
    assert 0 < live < budget
    memory.fail = lambda call: TransientError("the store is down")
    # A child started before its parent's next step: replay meets it before its parent.
    sink.on_run_start("late", task="t", environment="e", params={"parent_run_id": "r"})
    sink.on_step("late", event=budget_step(1), cumulative_reward=0.1)
    sink.on_run_end("late", result={"completed": True, "steps": 1}, run_path=None)
    steps(9, 60)
    kept = tmp_path / "journal"
    store = memory
    if how != "closed":  # the files and the store as a process killed now leaves them
        assert sink.flush(0.5) is False
        kept = tmp_path / "killed"
        shutil.copytree(tmp_path / "journal", kept)
        store = copy.copy(memory)  # its run ids go on from the same count
        store.experiments = copy.deepcopy(memory.experiments)
        store.runs = copy.deepcopy(memory.runs)
        store.spans = copy.deepcopy(memory.spans)
    else:
        for run, _, count in reversed(tree):
            sink.on_run_end(run, result={"completed": True, "steps": count}, run_path=None)
    sink.close(0.5)
    store.fail = None
    if how == "answers-lost":
        export_spans = store.export_spans

        def committed_then_lost(*args: Any) -> None:
            export_spans(*args)
            raise TransientError("the answer was lost")

        with monkeypatch.context() as patch:
            patch.setattr(store, "export_spans", committed_then_lost)
            first = replay(kept, transport=store, retry_deadline=0.2)
        assert not first.ok, first
        assert len(decoded_spans(store)) > live
    report = replay(kept, transport=store)
    assert report.ok, report
    spans = decoded_spans(store)
    assert len(spans) <= budget, (live, len(spans))
    assert_tree_whole(spans)
    for run, _, count in tree:
        (found,) = store.by_name(run)
        assert [s for s, _ in found.history("step_reward")] == list(range(1, count + 1))


def test_spans_an_outage_kept_from_the_store_count_once_against_the_budget_in_replay(
    tmp_path: Path,
) -> None:
    """A root run sends 5 steps, then its span requests are refused before they reach the store
    (the connection refused: certainly not stored) for its other 15 steps and its end, whose
    spans are kept for replay (their metrics land). Replay builds those 15 steps' spans again:
    they count once against the trace's budget, not once for the live attempt and again for
    replay, so the trace is what a run without the outage has (all 20 steps in full, no
    summary). Spans whose request may have been stored (an answer lost, an HTTP 5xx) stay
    counted, and the budget is never exceeded
    (``test_a_trace_sent_in_part_before_an_outage_keeps_...``)."""
    from rlm_mlflow import TransientError, replay

    def run(memory: MemoryTransport, journal: Path, down_after: int | None) -> None:
        sink = MLflowSink(
            enabled=True,
            transport=memory,
            journal_dir=journal,
            span_budget=30,
            flush_interval=0.01,
            retry_deadline=0.2,
            retry_initial=0.01,
            retry_max_wait=0.05,
        )
        refused = TransientError("connection refused", maybe_committed=False)
        sink.on_run_start("r", task="t", environment="e", params={})
        for number in range(1, 21):
            if number == down_after:
                assert sink.flush(10)
                memory.fail = lambda call: refused if call == "export_spans" else None
            sink.on_step("r", event={"step": number, "reward": 1.0}, cumulative_reward=1.0)
        sink.on_run_end("r", result={"completed": True, "steps": 20}, run_path=None)
        sink.close(2.0)

    clean = MemoryTransport()
    run(clean, tmp_path / "clean", None)
    expected = sorted(span["name"] for span in decoded_spans(clean))
    assert not [name for name in expected if "summary" in name], expected

    memory = MemoryTransport()
    run(memory, tmp_path / "journal", 6)
    assert len(memory.spans) == 5  # the first 5 steps; the root's span waits for its end
    memory.fail = None
    report = replay(tmp_path / "journal", transport=memory)
    assert report.ok, report
    assert sorted(span["name"] for span in decoded_spans(memory)) == expected


def test_a_trace_shape_kept_beside_the_journal_grows_with_the_open_runs_only(
    tmp_path: Path,
) -> None:
    """A root that delegates to one child after another keeps, beside its journal, the places
    of its open runs (not of every child it ever had), and the file goes once the root's
    trace is stored."""
    import json

    memory = MemoryTransport()
    sink = MLflowSink(
        enabled=True, transport=memory, journal_dir=tmp_path, span_budget=30, flush_interval=0.01
    )
    sink.on_run_start("root", task="t", environment="e", params={})
    for number in range(40):
        child = f"child-{number}"
        sink.on_run_start(child, task="c", environment="e", params={"parent_run_id": "root"})
        sink.on_step(child, event=budget_step(1), cumulative_reward=0.1)
        sink.on_run_end(child, result={"completed": True}, run_path=None)
        sink.on_step("root", event=budget_step(number + 1), cumulative_reward=float(number))
        assert sink.flush(10)
    (shapes,) = tmp_path.glob("*/trace-shapes.json")
    (trace,) = json.loads(shapes.read_text()).values()
    # The root, and at most the child of the last drain (the file is written as a drain's
    # spans go out, before they are stored): not the 40 children.
    assert "1" in trace["runs"]
    assert len(trace["runs"]) <= 2, trace
    sink.on_run_end("root", result={"completed": True}, run_path=None)
    assert sink.flush(10)
    assert not shapes.exists()
    sink.close()
    assert len(decoded_spans(memory)) <= 30

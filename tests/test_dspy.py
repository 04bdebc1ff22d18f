"""DSPy's real ``dspy.RLM`` reporting through ``RLMCallback``, offline, against a real server.

The RLM, its adapters, its REPL loop and its sub-agents are DSPy's own (dspy 3.4); the code runs
in DSPy's ``LocalInterpreter`` (a local Python subprocess: no Deno, no network). Only the LM is
scripted: a ``DummyLM`` whose engine also reports token usage, as a real provider does (DummyLM's
own engine reports 0 tokens for every call). What that engine reported is the ground truth the
MLflow figures are checked against.
"""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import dspy
import pytest
from dspy.clients.engines.dummy_engine import DummyEngine
from dspy.lm15 import Usage
from dspy.primitives.local_interpreter import LocalInterpreter
from dspy.utils.dummies import DummyLM

from promises_support import Store, patient, span_label
from rlm_mlflow import MLflowSink
from rlm_mlflow._exporters.spans import code_block
from rlm_mlflow.dspy import RLMCallback
from rlm_mlflow.testing import MlflowServer

pytestmark = [
    pytest.mark.integration,
    # DSPy's own sub-agent bridge (SandboxLM) calls the LM the way DSPy 3.4 deprecates.
    pytest.mark.filterwarnings(
        "ignore:Passing OpenAI-style message dictionaries:DeprecationWarning"
    ),
]

FAST: dict[str, Any] = {"flush_interval": 0.2, "retry_initial": 0.05, "retry_max_wait": 0.5}
#: How DSPy's chat adapter shows the iteration input: "[[ ## iteration ## ]]\n2/4".
ITERATION = "[[ ## iteration ## ]]\n"
#: Only the extract fallback's prompt asks for the answer field first.
EXTRACT = "starting with the field `[[ ## answer ## ]]`"


# -- a scripted LM that reports usage ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Reported:
    """One LM call as the engine answered it: the ground truth."""

    model: str
    prompt: str
    input_tokens: int
    output_tokens: int


class MeteredEngine:
    """DummyLM's answers, with the token usage a real provider would report (a canonical DSPy
    engine: ``complete(Request) -> Response``)."""

    def __init__(self, lm: MeteredLM) -> None:
        self.lm = lm
        self.inner = DummyEngine(lm)

    def complete(self, request: Any) -> Any:
        response = self.inner.complete(request)
        prompt = "\n".join(message.text or "" for message in request.messages)
        usage = Usage(input_tokens=len(prompt) // 4 + 1, output_tokens=len(response.text) // 4 + 1)
        assert usage.input_tokens is not None
        assert usage.output_tokens is not None
        self.lm.reported.append(
            Reported(self.lm.model, prompt, usage.input_tokens, usage.output_tokens)
        )
        return dataclasses.replace(response, usage=usage, model=self.lm.model)


class AsyncMeteredEngine:
    def __init__(self, engine: MeteredEngine) -> None:
        self.engine = engine

    async def complete(self, request: Any) -> Any:
        return self.engine.complete(request)


class MeteredLM(DummyLM):  # type: ignore[misc]
    """``DummyLM`` (dict mode: the answer whose key the last message contains), named, and
    reporting usage through its engine."""

    def __init__(self, answers: Mapping[str, dict[str, Any]], model: str) -> None:
        super().__init__(dict(answers))
        self.model = model
        self.reported: list[Reported] = []  # appended from any thread (atomic)
        self._engine_spec = MeteredEngine(self)
        self._async_engine_spec = AsyncMeteredEngine(self._engine_spec)

    def tokens(self, where: Callable[[Reported], bool] = lambda _: True) -> int:
        return sum(r.input_tokens + r.output_tokens for r in self.reported if where(r))


def act(code: str, reasoning: str = "next") -> dict[str, str]:
    return {"reasoning": reasoning, "code": code}


def tokens_of(*lms: MeteredLM) -> dict[str, int]:
    """Input, output and total tokens of every call the LMs answered."""
    calls = [r for lm in lms for r in lm.reported]
    given = sum(r.input_tokens for r in calls)
    made = sum(r.output_tokens for r in calls)
    return {"input_tokens": given, "output_tokens": made, "total_tokens": given + made}


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture
def configure() -> Iterator[Callable[..., None]]:
    """``dspy.configure(...)`` for one test; DSPy's settings are reset afterwards."""
    yield dspy.configure
    dspy.configure(lm=None, callbacks=[])


@pytest.fixture
def sink(mlflow_server: MlflowServer, experiment_name: str) -> Iterator[MLflowSink]:
    with MLflowSink(
        enabled=True, experiment=experiment_name, tracking_uri=mlflow_server.uri, **FAST
    ) as opened:
        yield opened


def settle(sink: MLflowSink) -> None:
    """Everything the sink accepted is in MLflow, every run ended."""
    assert sink.flush(patient(60))
    sink.close()
    status = sink.status()
    assert status["dropped"] == {}
    assert status["rejected"] == {}
    assert status["runs_open"] == 0


def trace_of(store: Store, experiment: str, run: Any) -> Any:
    experiment_id = store.experiment_id(experiment)
    assert experiment_id is not None
    (trace,) = store.client.search_traces(locations=[experiment_id], run_id=run.info.run_id)
    return trace


def steps_of(trace: Any, parent: Any) -> list[Any]:
    """The step spans under a run's span, in step order."""
    steps = [s for s in trace.data.spans if s.parent_id == parent.span_id]
    return sorted(steps, key=lambda s: s.attributes["rlm.step"])


def children_of(trace: Any, span: Any) -> list[Any]:
    return [s for s in trace.data.spans if s.parent_id == span.span_id]


# -- one run ----------------------------------------------------------------------------------


def test_one_run_per_call_with_params_steps_and_model_calls(
    configure: Callable[..., None], sink: MLflowSink, store: Store, experiment_name: str
) -> None:
    """One RLM call: one MLflow run with its params, one step per iteration with the code and
    the output in the trace, an LLM span per LM call (the main LM's and llm_query's), tokens
    equal to what the LM reported, counted once; completed and steps; no reward metric."""
    main = MeteredLM(
        {
            ITERATION + "1/5": act("print(len(context))", "look at the data"),
            ITERATION + "2/5": act(
                "```python\nr = llm_query('summarize: ' + query)\nprint(r)\n```"
            ),
            ITERATION + "3/5": act("rs = llm_query_batched(['first?', 'second?'])\nprint(rs)"),
            ITERATION + "4/5": act("SUBMIT(answer='forty-two')", "done"),
        },
        "scripted/main",
    )
    sub = MeteredLM(
        {
            "summarize": {"response": "a summary"},
            "first?": {"response": "one"},
            "second?": {"response": "two"},
        },
        "scripted/sub",
    )
    configure(lm=main, callbacks=[RLMCallback(sink)])
    rlm = dspy.RLM(
        "context, query -> answer", max_iters=5, sub_lm=sub, interpreter_factory=LocalInterpreter
    )
    dspy.Predict("question -> answer")  # built, never called: nothing to log
    context = "lorem ipsum " * 50
    result = rlm(context=context, query="what is it about?")
    assert result.answer == "forty-two"
    settle(sink)

    (run,) = store.runs(experiment_name)  # its inner Predict calls are not runs
    params = run.data.params
    assert params["environment"] == "dspy"
    assert params["signature"] == "context, query -> answer"
    assert params["max_iters"] == "5"
    assert params["max_llm_calls"] == "50"
    assert params["lm_model"] == "scripted/main"
    assert params["sub_lm_model"] == "scripted/sub"
    assert params["interpreter"] == "LocalInterpreter"
    assert params["depth"] == "0"
    task = f"query: what is it about?\n\ncontext: {context}"  # the short input first
    assert params["task_chars"] == str(len(task))
    assert "parent_run_id" not in params
    metrics = run.data.metrics
    assert metrics["completed"] == 1.0
    assert metrics["steps"] == 4.0
    assert "step_reward" not in metrics
    assert "total_reward" not in metrics
    assert {k: metrics[k] for k in ("input_tokens", "output_tokens", "total_tokens")} == tokens_of(
        main, sub
    )
    assert store.steps(run, "step_total_tokens") == [1, 2, 3, 4]
    assert run.info.status == "FINISHED"

    trace = trace_of(store, experiment_name, run)
    assert trace.info.token_usage == tokens_of(main, sub)
    root = next(s for s in trace.data.spans if s.parent_id is None)
    assert root.span_type == "AGENT"
    assert root.inputs == {"task": task}
    assert root.outputs["final_response"] == "forty-two"
    steps = steps_of(trace, root)
    assert [s.name for s in steps] == [f"step {n}: iteration" for n in (1, 2, 3, 4)]
    assert all(s.span_type == "TOOL" for s in steps)
    assert steps[0].inputs == {
        "code": code_block("print(len(context))", "python"),
        "rationale": "look at the data",
    }
    assert steps[0].outputs == {
        "stdout": code_block(str(len(context))),
        "stderr": "",
        "success": True,
    }
    # What ran: the model's own fences taken off, the span's code block around it.
    assert steps[1].inputs["code"] == code_block(
        "r = llm_query('summarize: ' + query)\nprint(r)", "python"
    )
    assert "a summary" in steps[1].outputs["stdout"]
    assert steps[3].outputs["stdout"] == code_block("SUBMIT({'answer': 'forty-two'})")
    models = [sorted(c.name for c in children_of(trace, s)) for s in steps]
    assert models == [
        ["scripted/main"],
        ["scripted/main", "scripted/sub"],
        ["scripted/main", "scripted/sub", "scripted/sub"],
        ["scripted/main"],
    ]
    calls = [c for s in steps for c in children_of(trace, s)]
    assert all(c.span_type == "LLM" for c in calls)
    summary = next(c for c in calls if "summarize" in c.inputs.get("prompt", ""))
    assert summary.inputs == {"prompt": code_block("summarize: what is it about?")}
    assert "a summary" in summary.outputs["response"]
    by_prompt = {r.prompt: r for r in sub.reported}
    usage = summary.attributes["mlflow.chat.tokenUsage"]
    reported = by_prompt["summarize: what is it about?"]
    assert (usage["input_tokens"], usage["output_tokens"]) == (
        reported.input_tokens,
        reported.output_tokens,
    )
    # The main LM's prompt is its last user message: this iteration's inputs.
    first_call = children_of(trace, steps[0])[0]
    assert "1/5" in first_call.inputs["prompt"]


def test_extract_fallback_and_an_exception_end_runs_not_completed(
    configure: Callable[..., None], sink: MLflowSink, store: Store, experiment_name: str
) -> None:
    """max_iters reached: an ``extract`` step holds the extract call, completed 0. An LM that
    breaks mid-run: the run ends all the same, completed 0, the failed step marked ERROR."""
    main = MeteredLM(
        {
            ITERATION + "1/2": act("print('one')"),
            ITERATION + "2/2": act("print('two')"),
            EXTRACT: {"answer": "best guess"},
        },
        "scripted/main",
    )
    broken = MeteredLM({ITERATION + "1/3": act("x = 1\nprint(x)")}, "scripted/broken")
    events: list[tuple[str, str, Any]] = []
    recorder = Recorder(events)
    configure(lm=main, callbacks=[RLMCallback(sink), RLMCallback(recorder)])
    rlm = dspy.RLM("query -> answer", max_iters=2, interpreter_factory=LocalInterpreter)
    assert rlm(query="q").answer == "best guess"
    with dspy.context(lm=broken), pytest.raises(Exception, match="No more responses"):
        dspy.RLM("query -> answer", max_iters=3, interpreter_factory=LocalInterpreter)(query="q")
    settle(sink)

    runs = sorted(store.runs(experiment_name), key=lambda r: r.info.start_time)
    assert [r.data.metrics["completed"] for r in runs] == [0.0, 0.0]
    assert [r.data.metrics["steps"] for r in runs] == [3.0, 2.0]
    assert [r.info.status for r in runs] == ["FINISHED", "FINISHED"]
    extracted, failed = runs
    assert extracted.data.metrics["total_tokens"] == main.tokens()
    assert failed.data.metrics["total_tokens"] == broken.tokens()
    trace = trace_of(store, experiment_name, extracted)
    root = next(s for s in trace.data.spans if s.parent_id is None)
    assert root.outputs["final_response"] == "best guess"
    steps = steps_of(trace, root)
    assert [s.name for s in steps] == ["step 1: iteration", "step 2: iteration", "step 3: extract"]
    (extract_call,) = children_of(trace, steps[2])
    assert "best guess" in extract_call.outputs["response"]
    trace = trace_of(store, experiment_name, failed)
    root = next(s for s in trace.data.spans if s.parent_id is None)
    assert root.status.status_code == "ERROR"  # the run did not complete
    last = steps_of(trace, root)[-1]
    assert last.status.status_code == "ERROR"
    assert "No more responses" in last.outputs["stderr"]

    # What the hooks were given: a step's usage is the sum of its model calls.
    steps_seen = [event for kind, _, event in events if kind == "step"]
    assert steps_seen
    for event in steps_seen:
        calls = event["llm_calls"]
        assert event["reward"] is None
        assert event["usage"] == {
            "prompt_tokens": sum(c["usage"]["prompt_tokens"] for c in calls),
            "completion_tokens": sum(c["usage"]["completion_tokens"] for c in calls),
            "total_calls": len(calls),
        }
        assert all(c["end_ns"] >= c["start_ns"] > 0 for c in calls)


class Recorder:
    """A sink that keeps what the hooks were given."""

    def __init__(self, events: list[tuple[str, str, Any]]) -> None:
        self.events = events
        self.cumulative: list[object] = []

    def on_run_start(
        self, run_id: str, *, task: str, environment: str, params: dict[str, Any]
    ) -> None:
        self.events.append(("start", run_id, {"task": task, "params": params}))

    def on_step(
        self, run_id: str, *, event: dict[str, Any], cumulative_reward: float | None
    ) -> None:
        self.cumulative.append(cumulative_reward)
        self.events.append(("step", run_id, event))

    def on_run_end(self, run_id: str, *, result: Any, run_path: Any) -> None:
        self.events.append(("end", run_id, result))


# -- recursion --------------------------------------------------------------------------------


def test_a_sub_agent_is_a_child_run_under_the_step_that_called_it(
    configure: Callable[..., None], sink: MLflowSink, store: Store, experiment_name: str
) -> None:
    """An RLM built and called in the RLM's own code: a child run (parent link, depth 1), its
    trace under the iteration that called it; each token counted once, the parent's totals
    including the child's as RLM Code's do."""
    main = MeteredLM(
        {
            ITERATION + "1/3": act("print('looking')"),
            ITERATION + "2/3": act(
                "sub = dspy.RLM('text -> summary', max_iters=3)\n"
                "r = sub(text='a long text to digest')\n"
                "print(r.summary)",
                "delegate",
            ),
            ITERATION + "3/3": act("SUBMIT(answer='digested')"),
        },
        "scripted/main",
    )
    # The sub-agent runs on the parent's sub LM: every call of this LM is the child's.
    sub = MeteredLM(
        {
            ITERATION + "1/3": act("print(llm_query('gist of: ' + text))"),
            ITERATION + "2/3": act("SUBMIT(summary='the gist')"),
            "gist of": {"response": "gist"},
        },
        "scripted/sub",
    )
    configure(lm=main, callbacks=[RLMCallback(sink)])
    rlm = dspy.RLM(
        "context, query -> answer", max_iters=3, sub_lm=sub, interpreter_factory=LocalInterpreter
    )
    assert rlm(context="c", query="q").answer == "digested"
    settle(sink)

    runs = store.by_name(experiment_name)
    assert len(runs) == 2
    (parent,) = [r for r in runs.values() if "parent_run_id" not in r.data.params]
    (child,) = [r for r in runs.values() if "parent_run_id" in r.data.params]
    assert child.data.params["parent_run_id"] == parent.data.tags["run_id"]
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert child.data.params["depth"] == "1"
    assert child.data.params["signature"] == "text -> summary"
    assert child.data.params["lm_model"] == "scripted/sub"
    assert child.data.metrics["completed"] == 1.0
    assert child.data.metrics["steps"] == 2.0
    assert child.data.metrics["total_tokens"] == sub.tokens()
    assert parent.data.metrics["total_tokens"] == main.tokens() + sub.tokens()

    trace = trace_of(store, experiment_name, parent)
    assert trace.info.token_usage == tokens_of(main, sub)
    spans = trace.data.spans
    by_id = {s.span_id: s for s in spans}
    agent = next(s for s in spans if span_label(s) == child.data.tags["run_id"])
    assert agent.span_type == "AGENT"
    assert by_id[agent.parent_id].name == "step 2: iteration"
    assert span_label(by_id[by_id[agent.parent_id].parent_id]) == parent.data.tags["run_id"]
    child_steps = steps_of(trace, agent)
    assert [s.name for s in child_steps] == ["step 1: iteration", "step 2: iteration"]
    assert sorted(c.name for c in children_of(trace, child_steps[0])) == ["scripted/sub"] * 2
    assert child_steps[0].outputs["stdout"].endswith("gist\n```")
    assert agent.outputs["final_response"] == "the gist"


# -- concurrency ------------------------------------------------------------------------------


def concurrent_lms(count: int) -> tuple[MeteredLM, MeteredLM]:
    """Every call: print its query, ask the sub LM to echo it, submit it in capitals."""
    main = MeteredLM(
        {
            ITERATION + "1/4": act("print(query)"),
            ITERATION + "2/4": act("print(llm_query('echo ' + query))"),
            ITERATION + "3/4": act("SUBMIT(answer=query.upper())"),
        },
        "scripted/main",
    )
    sub = MeteredLM(
        {f"echo task-{n}": {"response": f"echoed task-{n}"} for n in range(count)}, "scripted/sub"
    )
    return main, sub


def check_separate_runs(
    store: Store, experiment: str, count: int, main: MeteredLM, sub: MeteredLM
) -> None:
    """One run per call, each with its own three steps, output, model calls and tokens."""
    runs = store.by_name(experiment)
    assert len(runs) == count
    seen = set()
    for run in runs.values():
        trace = trace_of(store, experiment, run)
        root = next(s for s in trace.data.spans if s.parent_id is None)
        task = root.outputs["final_response"].lower()
        seen.add(task)
        steps = steps_of(trace, root)
        assert [s.name for s in steps] == [f"step {n}: iteration" for n in (1, 2, 3)]
        assert steps[0].outputs["stdout"] == code_block(task)
        (echo,) = [c for c in children_of(trace, steps[1]) if c.name == "scripted/sub"]
        assert echo.inputs == {"prompt": code_block(f"echo {task}")}
        assert f"echoed {task}" in steps[1].outputs["stdout"]
        assert run.data.metrics["steps"] == 3.0
        assert run.data.metrics["completed"] == 1.0

        def mine(reported: Reported, task: str = task) -> bool:
            return task in reported.prompt

        assert run.data.metrics["total_tokens"] == main.tokens(mine) + sub.tokens(mine)
    assert seen == {f"task-{n}" for n in range(count)}


def test_concurrent_aforward_calls_in_one_event_loop(
    configure: Callable[..., None], sink: MLflowSink, store: Store, experiment_name: str
) -> None:
    """Eight ``acall``s of one RLM at once in one event loop: eight runs, none mixed up."""
    count = 8
    main, sub = concurrent_lms(count)
    configure(lm=main, callbacks=[RLMCallback(sink)])
    rlm = dspy.RLM("query -> answer", max_iters=4, sub_lm=sub, interpreter_factory=LocalInterpreter)

    async def run_all() -> list[Any]:
        return await asyncio.gather(*(rlm.acall(query=f"task-{n}") for n in range(count)))

    results = asyncio.run(run_all())
    assert sorted(r.answer for r in results) == sorted(f"TASK-{n}" for n in range(count))
    settle(sink)
    check_separate_runs(store, experiment_name, count, main, sub)


def test_calls_from_a_thread_pool(
    configure: Callable[..., None], sink: MLflowSink, store: Store, experiment_name: str
) -> None:
    """Eight calls of one RLM on four threads: eight runs, none mixed up."""
    count = 8
    main, sub = concurrent_lms(count)
    configure(lm=main, callbacks=[RLMCallback(sink)])
    rlm = dspy.RLM("query -> answer", max_iters=4, sub_lm=sub, interpreter_factory=LocalInterpreter)
    threads: set[int] = set()

    def call(n: int) -> Any:
        threads.add(threading.get_ident())
        return rlm(query=f"task-{n}")

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(call, range(count)))
    assert [r.answer for r in results] == [f"TASK-{n}" for n in range(count)]
    assert len(threads) > 1
    settle(sink)
    check_separate_runs(store, experiment_name, count, main, sub)


# -- what is not a run ----------------------------------------------------------------------


def test_modules_that_are_not_rlms_make_no_run(configure: Callable[..., None]) -> None:
    """Predict, ChainOfThought and a user's module around them: no hook is called."""
    events: list[tuple[str, str, Any]] = []
    lm = MeteredLM({"question": {"reasoning": "r", "answer": "a"}}, "scripted/main")
    configure(lm=lm, callbacks=[RLMCallback(Recorder(events))])

    class Pipeline(dspy.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.think = dspy.ChainOfThought("question -> answer")

        def forward(self, question: str) -> Any:
            return self.think(question=question)

    assert dspy.Predict("question -> answer")(question="q").answer == "a"
    assert Pipeline()(question="q").answer == "a"
    assert len(lm.reported) == 2
    assert events == []


def test_a_disabled_sink_costs_nothing(configure: Callable[..., None]) -> None:
    """A sink that is off: the callback does no bookkeeping at all."""
    off = MLflowSink(enabled=False)
    callback = RLMCallback(off)
    lm = MeteredLM({ITERATION + "1/2": act("SUBMIT(answer='a')")}, "scripted/main")
    configure(lm=lm, callbacks=[callback])
    dspy.RLM("query -> answer", max_iters=2, interpreter_factory=LocalInterpreter)(query="q")
    assert off.status()["enabled"] is False
    assert callback._runs == {}
    assert callback._owner == {}


def test_importing_rlm_mlflow_does_not_import_dspy() -> None:
    code = "import sys, rlm_mlflow; assert 'dspy' not in sys.modules, 'dspy was imported'"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr

"""DSPy's ``dspy.RLM`` in MLflow through one DSPy callback.

::

    import dspy
    from rlm_mlflow import MLflowSink
    from rlm_mlflow.dspy import RLMCallback

    dspy.configure(lm=..., callbacks=[RLMCallback(MLflowSink.from_env())])

Each call of a ``dspy.RLM`` (``rlm(...)``, ``await rlm.acall(...)``) becomes one run of the sink,
each REPL iteration one step, the LM calls of an iteration the step's model calls, and an RLM
called from inside an RLM's code (a sub-agent) a child run under the iteration that called it.
The RLM's own inner modules (its ``Predict`` calls) and every module that is not a ``dspy.RLM``
never become runs.

How DSPy's callbacks are told apart: DSPy gives each call an id and, while the call runs, keeps it
in a context variable (``ACTIVE_CALL_ID``), which threads DSPy starts and asyncio tasks inherit.
A start callback reads it to know which call made this one, so every call made inside an RLM call
is mapped to that RLM's run, however deep (a ``Predict`` inside the RLM, the interpreter's
execution, a tool call on another thread, an LM call of ``llm_query_batched``). State is kept per
call id, never per thread: concurrent calls in one event loop or in a thread pool stay apart.

Every handler does a few dictionary operations and calls a sink hook, which returns in
microseconds; nothing here blocks, takes a lock or raises into DSPy.

DSPy is imported by this module only: ``import rlm_mlflow`` never imports it. Install it with
``pip install 'rlm-mlflow[dspy]'``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from collections.abc import Mapping
from typing import Any, Protocol

try:
    from dspy.dsp.utils.settings import settings as _settings
    from dspy.predict.rlm import RLM as _RLM
    from dspy.primitives.code_interpreter import FinalOutput as _FinalOutput
    from dspy.primitives.code_interpreter import resolve_interpreter_factory as _resolve_factory
    from dspy.utils.callback import ACTIVE_CALL_ID as _ACTIVE_CALL_ID
    from dspy.utils.callback import BaseCallback as _BaseCallback
except ImportError as _missing:  # pragma: no cover - depends on the environment
    raise ImportError(
        "rlm_mlflow.dspy needs DSPy 3.4 or later (dspy.RLM): pip install 'rlm-mlflow[dspy]'"
    ) from _missing

from ._benchmark import Benchmark

__all__ = ["RLMCallback", "RunSink"]

logger = logging.getLogger("rlm_mlflow")

#: LM history entries searched (newest first) for the usage of a call that just ended.
HISTORY_WINDOW = 64


class RunSink(Protocol):
    """The hooks :class:`RLMCallback` calls: those of :class:`rlm_mlflow.MLflowSink` (and of
    RLM Code's other sinks)."""

    def on_run_start(
        self, run_id: str, *, task: str, environment: str, params: dict[str, Any]
    ) -> None: ...

    def on_step(
        self, run_id: str, *, event: dict[str, Any], cumulative_reward: float | None
    ) -> None: ...

    def on_run_end(self, run_id: str, *, result: Any, run_path: Any) -> None: ...


class _Iteration:
    """One step of a run while it is being made: an REPL iteration, the extract fallback, or
    model calls that came outside both ("other")."""

    __slots__ = (
        "action_id",
        "calls",
        "children",
        "code",
        "emitted",
        "exec_id",
        "exec_started",
        "kind",
        "rationale",
    )

    def __init__(self, kind: str, action_id: str | None) -> None:
        self.kind = kind
        self.action_id = action_id  # the call id of the module that began it
        self.code: str | None = None
        self.rationale: str | None = None
        self.exec_id: str | None = None  # the interpreter execution of this iteration
        self.exec_started = 0.0
        # Appended to from any thread (list.append is atomic); read once, when emitted.
        self.calls: list[dict[str, Any]] = []
        self.children: list[tuple[int, int, int]] = []  # what sub-agent runs used in all
        self.emitted = False


class _Run:
    """One ``dspy.RLM`` call."""

    __slots__ = (
        "call_id",
        "depth",
        "extracted",
        "iteration",
        "module",
        "parent",
        "run_id",
        "steps",
        "tokens",
    )

    def __init__(
        self, call_id: str, run_id: str, module: Any, parent: _Run | None, depth: int
    ) -> None:
        self.call_id = call_id
        self.run_id = run_id
        self.module = module
        self.parent = parent
        self.depth = depth
        self.iteration: _Iteration | None = None
        self.steps = 0
        self.extracted = False
        self.tokens = [0, 0, 0]  # input, output tokens and LM calls, sub-agents included


class _LMCall:
    """What ``on_lm_start`` saw of one LM call made inside a run."""

    __slots__ = ("input", "iteration", "lm", "model", "run", "start_ns")

    def __init__(self, run: _Run, iteration: _Iteration, lm: Any, text: str | None) -> None:
        self.run = run
        self.iteration = iteration
        self.lm = lm
        model = getattr(lm, "model", None)
        self.model = model if isinstance(model, str) else None
        self.input = text
        self.start_ns = time.time_ns()


class RLMCallback(_BaseCallback):  # type: ignore[misc]  # DSPy ships no type information
    """A DSPy callback that reports every ``dspy.RLM`` call to a sink.

    Set it once, globally: ``dspy.configure(callbacks=[RLMCallback(sink)])`` (or in a
    ``dspy.context(callbacks=[...])``). Per call it makes:

    - ``on_run_start(run_id, task=<the inputs as text>, environment="dspy", params=...)`` with
      the signature, ``max_iters``, ``max_llm_calls``, ``max_output_chars``, the main and the
      sub LM's model names, the interpreter, the depth, DSPy's call id and, for a sub-agent,
      ``parent_run_id``;
    - ``on_step`` per iteration (and one ``extract`` step when ``max_iters`` ran out), with the
      code, the reasoning, the interpreter's output, success and execution time, the LM calls
      and their token usage; DSPy has no reward, so ``reward`` and ``cumulative_reward`` are
      None;
    - ``on_run_end`` with ``completed`` (SUBMIT was reached), ``steps`` and the final output.

    A ``dspy.Evaluate`` call becomes a benchmark (:func:`rlm_mlflow.benchmark`: one MLflow
    evaluation run) when the sink is an :class:`rlm_mlflow.MLflowSink`: each example's
    ``dspy.RLM`` run is a case, its trace linked to the evaluation run with the example's labels
    as Expectation ``expected_response`` and the metric's score as Feedback named after the
    metric; the evaluation run gets ``<metric>/mean`` and the other aggregates, the devset as
    its input, ``save_as_json`` as its artifact.

    Args:
        sink: Where runs go: an :class:`rlm_mlflow.MLflowSink` (or anything with its hooks).
            A sink that is not enabled makes every handler return at once.
        environment: The ``environment`` param of every run.
    """

    def __init__(self, sink: RunSink, *, environment: str = "dspy") -> None:
        self._run_start = sink.on_run_start
        self._step = sink.on_step  # called with cumulative_reward=None: DSPy has no reward
        self._run_end = sink.on_run_end
        self._sink = sink
        self._environment = environment
        config = getattr(sink, "config", None)
        self._off = getattr(config, "enabled", True) is False
        self._runs: dict[str, _Run] = {}  # RLM call id -> its run
        self._owner: dict[str, _Run] = {}  # id of a call made inside an RLM call -> that run
        self._lm_calls: dict[str, _LMCall] = {}
        self._failures = 0
        self._usage_unknown = False
        # Evaluate calls open, and the runs of their examples: id of an RLM run's prediction ->
        # its run id (the prediction lives in the evaluation's results until it ends)
        self._evaluations: dict[str, tuple[Benchmark, str]] = {}
        self._answers: dict[int, str] = {}

    # -- modules ----------------------------------------------------------------------------

    def on_module_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        if self._off:
            return
        try:
            parent_id = _ACTIVE_CALL_ID.get()
            owner = self._owner.get(parent_id) if parent_id is not None else None
            if isinstance(instance, _RLM):
                self._open(call_id, instance, inputs, owner)
                return
            if owner is None:
                return
            self._owner[call_id] = owner
            if parent_id == owner.call_id:  # called by the RLM itself
                module = owner.module
                if instance is getattr(module, "generate_action", None):
                    self._begin(owner, "iteration", call_id)
                elif instance is getattr(module, "extract", None):
                    owner.extracted = True
                    self._begin(owner, "extract", call_id)
        except Exception:
            self._failed("on_module_start")

    def on_module_end(
        self, call_id: str, outputs: Any | None, exception: BaseException | None = None
    ) -> None:
        if self._off:
            return
        try:
            run = self._runs.pop(call_id, None)
            if run is not None:
                self._owner.pop(call_id, None)
                self._close(run, outputs, exception)
                if self._evaluations and run.parent is None and outputs is not None:
                    self._answers[id(outputs)] = run.run_id
                return
            owner = self._owner.pop(call_id, None)
            if owner is None:
                return
            iteration = owner.iteration
            if iteration is None or iteration.action_id != call_id:
                return
            if iteration.kind == "extract":
                observation = None if exception is None else _failure(exception)
                self._emit(owner, iteration, observation)
            elif outputs is not None:
                iteration.code = _text_or_none(getattr(outputs, "code", None))
                iteration.rationale = _text_or_none(getattr(outputs, "reasoning", None))
        except Exception:
            self._failed("on_module_end")

    # -- evaluations ------------------------------------------------------------------------

    def on_evaluate_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        if self._off or not hasattr(self._sink, "_pipeline"):
            return
        try:
            devset = inputs.get("devset") or getattr(instance, "devset", None) or []
            metric = inputs.get("metric") or getattr(instance, "metric", None)
            program = inputs.get("program")
            metric_name = _name_of(metric) or "metric"
            params: dict[str, Any] = {
                "program": type(program).__name__,
                "metric": metric_name,
                "devset_size": len(devset),
                "num_threads": inputs.get("num_threads") or getattr(instance, "num_threads", None),
                "lm_model": _model_name(_settings.get("lm")),
            }
            if isinstance(program, _RLM):
                signature = getattr(program, "signature", None)
                text = getattr(signature, "signature", None)
                params["signature"] = text if isinstance(text, str) else str(signature)
                params["max_iters"] = getattr(program, "max_iters", None)
            report = inputs.get("save_as_json") or getattr(instance, "save_as_json", None)
            bench = Benchmark(
                self._sink,
                f"evaluate-{metric_name}-{call_id[:8]}",
                params={k: v for k, v in params.items() if v is not None},
                dataset=[_record_of(example) for example in devset],
                report=report if isinstance(report, str) else None,
            )
            bench.__enter__()
            self._evaluations[call_id] = (bench, metric_name)
        except Exception:
            self._failed("on_evaluate_start")

    def on_evaluate_end(
        self, call_id: str, outputs: Any | None, exception: BaseException | None = None
    ) -> None:
        found = self._evaluations.pop(call_id, None)
        if found is None:
            return
        bench, metric_name = found
        try:
            for example, prediction, score in getattr(outputs, "results", None) or ():
                run_id = self._answers.pop(id(prediction), None)
                if run_id is not None:
                    bench.record(
                        run_id, expected=_expected_of(example), verdict=score, judge=metric_name
                    )
        except Exception:
            self._failed("on_evaluate_end")
        finally:
            if not self._evaluations:
                self._answers.clear()
            with contextlib.suppress(Exception):
                failed = type(exception) if exception is not None else None
                bench.__exit__(failed, exception, None)

    # -- language models --------------------------------------------------------------------

    def on_lm_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        if self._off:
            return
        try:
            parent_id = _ACTIVE_CALL_ID.get()
            owner = self._owner.get(parent_id) if parent_id is not None else None
            if owner is None:
                return
            iteration = owner.iteration
            if iteration is None:
                iteration = self._begin(owner, "other", None)
            self._lm_calls[call_id] = _LMCall(owner, iteration, instance, _prompt_of(inputs))
            self._owner[call_id] = owner
        except Exception:
            self._failed("on_lm_start")

    def on_lm_end(
        self, call_id: str, outputs: Any | None, exception: BaseException | None = None
    ) -> None:
        if self._off:
            return
        try:
            call = self._lm_calls.pop(call_id, None)
            if call is None:
                return
            self._owner.pop(call_id, None)
            end_ns = time.time_ns()
            tokens = _usage_of(call.lm, outputs)
            if tokens is None:
                tokens = (0, 0)
                if outputs is not None and not self._usage_unknown:
                    self._usage_unknown = True
                    logger.info(
                        "rlm-mlflow: DSPy did not report token usage for an LM call "
                        "(is dspy.settings.disable_history set?); counted as 0 tokens"
                    )
            output = _output_of(outputs) if exception is None else None
            record: dict[str, Any] = {
                "model": call.model,
                "input": call.input,
                "output": output,
                "usage": {"prompt_tokens": tokens[0], "completion_tokens": tokens[1]},
                "start_ns": call.start_ns,
                "end_ns": end_ns,
            }
            iteration = call.iteration
            if iteration.emitted:  # ended after its step was sent (a call left running)
                current = call.run.iteration
                if current is None:
                    return
                iteration = current
            iteration.calls.append(record)
        except Exception:
            self._failed("on_lm_end")

    # -- the interpreter ---------------------------------------------------------------------

    def on_interpreter_execute_start(
        self, call_id: str, instance: Any, inputs: dict[str, Any]
    ) -> None:
        if self._off:
            return
        try:
            parent_id = _ACTIVE_CALL_ID.get()
            owner = self._owner.get(parent_id) if parent_id is not None else None
            if owner is None:
                return
            self._owner[call_id] = owner
            iteration = owner.iteration
            if (
                parent_id == owner.call_id
                and iteration is not None
                and iteration.kind == "iteration"
                and iteration.exec_id is None
            ):
                iteration.exec_id = call_id
                iteration.exec_started = time.perf_counter()
                code = inputs.get("code")
                if isinstance(code, str):
                    iteration.code = code  # what ran: the model's code without its fences
        except Exception:
            self._failed("on_interpreter_execute_start")

    def on_interpreter_execute_end(
        self, call_id: str, outputs: Any | None, exception: BaseException | None = None
    ) -> None:
        if self._off:
            return
        try:
            owner = self._owner.pop(call_id, None)
            if owner is None:
                return
            iteration = owner.iteration
            if iteration is None or iteration.exec_id != call_id:
                return
            elapsed = time.perf_counter() - iteration.exec_started
            if exception is not None:
                observation = _failure(exception)
            else:
                observation = {"success": True, "stdout": _printed(outputs), "stderr": ""}
            observation["execution_time"] = elapsed
            self._emit(owner, iteration, observation)
        except Exception:
            self._failed("on_interpreter_execute_end")

    # Calls that only need to be known as made inside a run (a sub-agent or an LM call may
    # be made inside them, on another thread).

    def _enter(self, call_id: str, instance: Any = None, inputs: Any = None) -> None:
        if self._off:
            return
        parent_id = _ACTIVE_CALL_ID.get()
        if parent_id is not None:
            owner = self._owner.get(parent_id)
            if owner is not None:
                self._owner[call_id] = owner

    def _leave(
        self, call_id: str, outputs: Any | None = None, exception: BaseException | None = None
    ) -> None:
        if not self._off:
            self._owner.pop(call_id, None)

    on_interpreter_tool_call_start = on_tool_start = _enter
    on_adapter_format_start = on_adapter_parse_start = _enter
    on_interpreter_tool_call_end = on_tool_end = _leave
    on_adapter_format_end = on_adapter_parse_end = _leave

    # -- runs and steps ---------------------------------------------------------------------

    def _open(
        self, call_id: str, module: Any, inputs: Mapping[str, Any], parent: _Run | None
    ) -> None:
        depth = parent.depth + 1 if parent is not None else 0
        run = _Run(call_id, f"rlm-{call_id[:12]}", module, parent, depth)
        given = inputs.get("kwargs")
        arguments: Mapping[str, Any] = given if isinstance(given, Mapping) else {}
        params = _params_of(module, arguments, depth, call_id)
        if parent is not None:
            params["parent_run_id"] = parent.run_id
        self._runs[call_id] = run
        self._owner[call_id] = run
        self._run_start(
            run.run_id, task=_task_of(arguments), environment=self._environment, params=params
        )

    def _begin(self, run: _Run, kind: str, action_id: str | None) -> _Iteration:
        pending = run.iteration
        if pending is not None:
            self._emit(run, pending, _not_run(pending))
        iteration = run.iteration = _Iteration(kind, action_id)
        return iteration

    def _emit(self, run: _Run, iteration: _Iteration, observation: dict[str, Any] | None) -> None:
        if run.iteration is iteration:
            run.iteration = None
        iteration.emitted = True
        calls = list(iteration.calls)
        tokens_in = tokens_out = 0
        for call in calls:
            usage = call["usage"]
            tokens_in += usage["prompt_tokens"]
            tokens_out += usage["completion_tokens"]
        made = len(calls)
        for child_in, child_out, child_calls in list(iteration.children):
            tokens_in += child_in
            tokens_out += child_out
            made += child_calls
        totals = run.tokens
        totals[0] += tokens_in
        totals[1] += tokens_out
        totals[2] += made
        run.steps += 1
        action: dict[str, Any] = {"action": iteration.kind}
        if iteration.code is not None:
            action["code"] = iteration.code
        if iteration.rationale is not None:
            action["rationale"] = iteration.rationale
        event: dict[str, Any] = {
            "step": run.steps,
            "reward": None,
            "depth": run.depth,
            "action": action,
            "usage": {
                "prompt_tokens": tokens_in,
                "completion_tokens": tokens_out,
                "total_calls": made,
            },
            "llm_calls": calls,
        }
        if observation is not None:
            event["observation"] = observation
        self._step(run.run_id, event=event, cumulative_reward=None)

    def _close(self, run: _Run, outputs: Any, exception: BaseException | None) -> None:
        pending = run.iteration
        if pending is not None:
            observation = _failure(exception) if exception is not None else _not_run(pending)
            self._emit(run, pending, observation)
        completed = exception is None and not run.extracted
        final = _final_of(run.module, outputs) if exception is None else None
        self._run_end(
            run.run_id,
            result={"completed": completed, "steps": run.steps, "final_response": final},
            run_path=None,
        )
        parent = run.parent
        if parent is not None and any(run.tokens):
            iteration = parent.iteration
            if iteration is None:
                iteration = self._begin(parent, "other", None)
            iteration.children.append((run.tokens[0], run.tokens[1], run.tokens[2]))

    def _failed(self, where: str) -> None:
        self._failures += 1
        if self._failures == 1:
            logger.warning(
                "rlm-mlflow: the DSPy callback failed in %s; its runs may be incomplete",
                where,
                exc_info=sys.exc_info(),
            )
        else:
            logger.debug(
                "rlm-mlflow: the DSPy callback failed in %s", where, exc_info=sys.exc_info()
            )


# -- reading DSPy's objects (never raising past the handlers, which catch) --------------------


def _text_or_none(value: object) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else str(value)


def _int(value: object) -> int:
    if type(value) is int and value >= 0:
        return value
    if isinstance(value, int | float) and math.isfinite(value) and value >= 0:
        return int(value)
    return 0


def _failure(exception: BaseException) -> dict[str, Any]:
    return {"success": False, "stdout": "", "stderr": f"{type(exception).__name__}: {exception}"}


def _not_run(iteration: _Iteration) -> dict[str, Any] | None:
    """The observation of an iteration whose code never reached the interpreter."""
    if iteration.kind != "iteration":
        return None
    return {
        "success": False,
        "stdout": "",
        "stderr": "not run: no Python code could be taken from the model's answer",
    }


def _printed(outputs: Any) -> str:
    """What an execution showed, as ``dspy.RLM`` puts it into its REPL history."""
    if outputs is None:
        return ""
    if isinstance(outputs, str):
        return outputs
    if isinstance(outputs, _FinalOutput):
        return f"SUBMIT({outputs.output!r})"
    if isinstance(outputs, list):
        return "\n".join(map(str, outputs))
    return str(outputs)


def _content_text(content: object) -> str | None:
    """A chat message's content: a string, or the text of its parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, Mapping):
                text = part.get("text")
                if isinstance(text, str):
                    texts.append(text)
            elif isinstance(part, str):
                texts.append(part)
        return "\n".join(texts)
    text = getattr(content, "text", None)  # an lm15 message or part
    return text if isinstance(text, str) else None


def _prompt_of(inputs: Mapping[str, Any]) -> str | None:
    """The prompt of an LM call: the prompt string, else the last user message (a chat call's
    instructions, the same at every iteration, are left out). Never copies the text."""
    prompt = inputs.get("prompt")
    if isinstance(prompt, str):
        return prompt
    messages = inputs.get("messages")
    if messages is None:
        messages = prompt if isinstance(prompt, list) else getattr(prompt, "messages", None)
    if isinstance(messages, list | tuple) and messages:
        for message in reversed(messages):
            if isinstance(message, Mapping):
                if message.get("role") == "user":
                    return _content_text(message.get("content"))
            elif getattr(message, "role", None) == "user":
                return _content_text(message)
        last = messages[-1]
        return _content_text(last.get("content") if isinstance(last, Mapping) else last)
    return None


def _output_of(outputs: Any) -> str | None:
    """The text an LM call answered: DSPy's list of outputs, or an lm15 ``Response``."""
    if isinstance(outputs, list):
        if not outputs:
            return None
        first = outputs[0]
        if isinstance(first, str):
            return first
        if isinstance(first, Mapping):
            text = first.get("text")
            return text if isinstance(text, str) else None
        return None
    text = getattr(outputs, "text", None)
    return text if isinstance(text, str) else None


def _usage_of(lm: Any, outputs: Any) -> tuple[int, int] | None:
    """(input, output) tokens of the LM call that returned ``outputs``, as DSPy recorded them.

    DSPy gives end callbacks the outputs only; the usage is in the LM's history entry of the
    call, whose ``outputs`` is the very object returned. An lm15 ``Response`` (a call with an
    explicit ``Request``) carries its usage itself.
    """
    if outputs is None:
        return None
    usage = getattr(outputs, "usage", None)
    if usage is not None and not isinstance(outputs, list):
        return (
            _int(getattr(usage, "input_tokens", None)),
            _int(getattr(usage, "output_tokens", None)),
        )
    history = getattr(lm, "history", None)
    if not isinstance(history, list):
        return None
    size = len(history)
    for index in range(size - 1, max(-1, size - 1 - HISTORY_WINDOW), -1):
        try:
            entry = history[index]
        except IndexError:  # trimmed meanwhile by another thread
            continue
        if isinstance(entry, dict) and entry.get("outputs") is outputs:
            found = entry.get("usage")
            if not isinstance(found, Mapping):
                return (0, 0)
            return (
                _int(found.get("prompt_tokens", found.get("input_tokens"))),
                _int(found.get("completion_tokens", found.get("output_tokens"))),
            )
    return None


def _model_name(lm: Any) -> str | None:
    model = getattr(lm, "model", None)
    return model if isinstance(model, str) else None


def _params_of(
    module: Any, arguments: Mapping[str, Any], depth: int, call_id: str
) -> dict[str, Any]:
    signature = getattr(module, "signature", None)
    text = getattr(signature, "signature", None)
    main = _settings.get("lm")
    sub = getattr(module, "sub_lm", None)
    params: dict[str, Any] = {
        "signature": text if isinstance(text, str) else str(signature),
        "max_iters": getattr(module, "max_iters", None),
        "max_llm_calls": getattr(module, "max_llm_calls", None),
        "max_output_chars": getattr(module, "max_output_chars", None),
        "lm_model": _model_name(main),
        "sub_lm_model": _model_name(sub if sub is not None else main),
        "interpreter": _interpreter_of(module, arguments),
        "depth": depth,
        "dspy_call_id": call_id,
    }
    tools = getattr(module, "tools", None)
    if isinstance(tools, Mapping) and tools:
        params["tools"] = ", ".join(sorted(str(name) for name in tools))
    return params


def _name_of(function: object) -> str | None:
    name = getattr(function, "__name__", None)
    if not isinstance(name, str):
        name = type(function).__name__ if function is not None else None
    return name


def _record_of(example: Any) -> Any:
    """An example as plain data (for the dataset's digest)."""
    to_dict = getattr(example, "toDict", None)
    return to_dict() if callable(to_dict) else example


def _expected_of(example: Any) -> Any:
    """An example's labels: the value of its one label, or the labels as JSON text."""
    labels = example.labels().toDict()
    if len(labels) == 1:
        return next(iter(labels.values()))
    return json.dumps(labels, default=str, sort_keys=True) if labels else None


def _interpreter_of(module: Any, arguments: Mapping[str, Any]) -> str | None:
    factory = arguments.get("interpreter_factory") or getattr(module, "_interpreter_factory", None)
    with contextlib.suppress(Exception):  # a bad dspy.settings.interpreter_factory
        factory = _resolve_factory(factory)
    if factory is None:
        return None
    name = getattr(factory, "__name__", None)
    return name if isinstance(name, str) else type(factory).__name__


def _task_of(arguments: Mapping[str, Any]) -> str:
    """The inputs of the call as one text: ``name: value`` blocks, shortest first, so that the
    question shows before a long context wherever the text is cut."""
    parts = []
    for name, value in arguments.items():
        if name == "interpreter_factory":
            continue
        text = value if isinstance(value, str) else _text_or_none(value) or ""
        parts.append((len(text), name, text))
    if len(parts) == 1:
        return parts[0][2]
    parts.sort(key=lambda part: part[0])
    return "\n\n".join(f"{name}: {text}" for _, name, text in parts)


def _final_of(module: Any, outputs: Any) -> str | None:
    """The output fields of the RLM's prediction, as text."""
    if outputs is None:
        return None
    signature = getattr(module, "signature", None)
    fields = getattr(signature, "output_fields", None)
    names = list(fields) if isinstance(fields, Mapping) else []
    values = [(name, getattr(outputs, name, None)) for name in names]
    if len(values) == 1:
        return _text_or_none(values[0][1])
    if not values:
        return _text_or_none(outputs)
    return "\n".join(f"{name}: {value}" for name, value in values)

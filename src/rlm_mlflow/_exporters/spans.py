"""Spans: an RLM run tree as OpenTelemetry spans in MLflow's conventions (pure functions).

One trace per root run. Its root span is the root run (AGENT); every step is a span under its
run (TOOL when the model wrote code, CHAIN otherwise); a child run is an AGENT span under the
parent step that spawned it, so the whole recursion is one tree. Ids are derived from the run's
key, never drawn at random: a retry or a replay writes the same spans again, and MLflow stores a
span once per (trace id, span id).

Token usage: RLM Code measures a step's usage on the model connector its runs share, as the
difference of the connector's totals before and after the step, so a step that delegated reports
its children's tokens too (and a child running beside a sibling on another thread reports some of
the sibling's). MLflow adds a trace's usage up over the span tree, counting the topmost spans that
carry ``mlflow.chat.tokenUsage`` and skipping everything under them. So every step span carries
the usage its runtime reported: the steps of the root run, measured one after the other on one
thread, make the total, and the spans under them show their own figures without being counted
twice. A run span carries what its run used in all once it ended, which for the root is the
trace's total (the calls the run made outside any step included). Model calls listed by the
runtime carry their own usage, counted only under a step that reported none; a step with child
runs or model calls also gets a leaf "model" span showing the model's own share (its usage less
the children's and the calls'), counted within the step's.

What the MLflow UI reads: ``mlflow.spanType``, ``mlflow.spanInputs``/``mlflow.spanOutputs``
(structured values, not JSON strings), ``mlflow.chat.tokenUsage``, and on the root span
``mlflow.traceTag.<key>`` (trace tags) and the status (ERROR makes the trace ERROR).

How it shows them: the trace view's default ("Pretty") view renders a string input or output as
Markdown, where a ``# comment`` is a heading and lines run together. A step's code, stdout and
stderr, and a model call's prompt and response, are therefore sent as fenced code blocks, which
it shows as written, line by line; the fence is longer than any run of backticks in the text, so
no text can close it early.

Times: a step span runs from the run's previous step (or its start) to this step, as the hooks
saw them: the model's turn and the code's execution. ``rlm.execution_time_s`` is what the
runtime measured running the code alone, in seconds. The "model" span of a step that had child
runs ends where the first child started (or, for code, where its execution began).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .._codec import CAPS, is_odd
from .._config import COMPONENT_TAG
from .._events import ModelCall, RunEnd, RunStart, Step, Text, Usage
from .._session import MAX_ID_CHARS
from .._transports.base import KEY_TAG
from . import otlp
from .convert import MAX_TRACE_TAG_VALUE_LENGTH, run_name, step_number

_KEEP_TAIL = frozenset({"stdout", "stderr"})
_BACKTICKS = re.compile(r"`{3,}")


@dataclass(slots=True)
class RunInfo:
    """What the spans of one run need to know about it (from its start record)."""

    no: int
    run_id: str
    root_no: int
    parent_no: int | None = None
    parent_step: int | None = None
    start_ns: int = 0
    # When the first child run spawned by each of its steps started (step ordinal -> ns).
    child_start_ns: dict[int, int] = field(default_factory=dict)
    depth: int | None = None
    environment: Any = None
    task: Text | None = None
    task_chars: int | None = None
    params: dict[str, Any] = field(default_factory=dict)
    session: str | None = None
    user: str | None = None

    @classmethod
    def of(cls, start: RunStart) -> RunInfo:
        root = start.root_no if start.root_no is not None else start.run_no
        return cls(
            no=start.run_no,
            run_id=start.run_id,
            root_no=root,
            parent_no=start.parent_no,
            parent_step=start.parent_step,
            start_ns=start.timestamp_ns,
            depth=start.depth,
            environment=start.environment,
            task=start.task,
            task_chars=start.task_chars,
            params=start.params if isinstance(start.params, dict) else {},
            session=start.session,
            user=start.user,
        )

    @property
    def is_root(self) -> bool:
        return self.root_no == self.no

    def child_started(self, step_ordinal: int, start_ns: int) -> None:
        """A child run of this run's step ``step_ordinal`` started at ``start_ns``."""
        known = self.child_start_ns.get(step_ordinal)
        if start_ns > 0 and (known is None or start_ns < known):
            self.child_start_ns[step_ordinal] = start_ns


class Ids:
    """Deterministic trace and span ids for one sink's runs (its key prefix)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def _digest(self, text: str, size: int) -> bytes:
        digest = hashlib.blake2b(f"{self.prefix}/{text}".encode(), digest_size=size).digest()
        return digest if any(digest) else b"\x01" + digest[1:]  # all-zero ids are invalid

    def trace(self, root_no: int) -> bytes:
        return self._digest(f"trace/{root_no}", 16)

    def run(self, no: int) -> bytes:
        return self._digest(f"run/{no}", 8)

    def step(self, no: int, ordinal: int) -> bytes:
        return self._digest(f"step/{no}/{ordinal}", 8)

    def model(self, no: int, ordinal: int) -> bytes:
        return self._digest(f"model/{no}/{ordinal}", 8)

    def call(self, no: int, ordinal: int, index: int) -> bytes:
        return self._digest(f"call/{no}/{ordinal}/{index}", 8)

    def summary(self, no: int, first: str) -> bytes:
        """The summary span of run ``no`` whose elided range begins with ``first`` (``s`` and a
        step's ordinal, or ``r`` and a folded child run's number)."""
        return self._digest(f"summary/{no}/{first}", 8)

    def trace_hex(self, root_no: int) -> str:
        """MLflow's trace id for the trace of ``root_no`` (``tr-`` and the OTLP id in hex)."""
        return "tr-" + self.trace(root_no).hex()


@dataclass(slots=True)
class Elided:
    """The figures of the steps (and folded child runs) of one run that its trace leaves out
    past the span budget: what its summary span says and carries."""

    first: str  # what the range begins with: "s<step ordinal>" or "r<folded child run's no>"
    count: int = 0
    first_step: int | None = None  # step numbers of the range, as the hooks gave them
    last_step: int | None = None
    rewarded: int = 0
    reward_min: float = math.inf
    reward_max: float = -math.inf
    reward_sum: float = 0.0
    usage: Usage = field(default_factory=Usage)
    failures: int = 0
    start_ns: int = 0
    end_ns: int = 0
    child_runs: int = 0  # child runs folded into this run's summary, and their steps
    child_steps: int = 0
    child_failures: int = 0

    def add(self, step: Step) -> None:
        """One elided step of the run."""
        number = step_number(step.step)
        number = number if number is not None else step.ordinal + 1
        if self.first_step is None:
            self.first_step = number
        self.last_step = number
        self.count += 1
        reward = _number(step.reward)
        if reward is not None:
            self.rewarded += 1
            self.reward_min = min(self.reward_min, reward)
            self.reward_max = max(self.reward_max, reward)
            self.reward_sum += reward
        detail = step.detail
        if detail is not None:
            if detail.usage is not None:
                self.usage = self.usage + detail.usage
            if detail.success is False:
                self.failures += 1
        self._span_time(step.since_ns or step.timestamp_ns, step.timestamp_ns)

    def _span_time(self, start_ns: int, end_ns: int) -> None:
        if start_ns > 0 and (self.start_ns == 0 or start_ns < self.start_ns):
            self.start_ns = start_ns
        self.end_ns = max(self.end_ns, end_ns)

    def add_child_step(self, step: Step) -> None:
        """A step of a child run folded into this run: counted, its tokens already in the
        usage of the step of this run that delegated (RLM Code measures it that way)."""
        self.child_steps += 1
        self._span_time(step.since_ns or step.timestamp_ns, step.timestamp_ns)

    def merge(self, other: Elided) -> Elided:
        """These figures and ``other``'s (a later range), as new figures."""
        out = Elided(
            first=self.first,
            count=self.count + other.count,
            first_step=self.first_step if self.first_step is not None else other.first_step,
            last_step=other.last_step if other.last_step is not None else self.last_step,
            rewarded=self.rewarded + other.rewarded,
            reward_min=min(self.reward_min, other.reward_min),
            reward_max=max(self.reward_max, other.reward_max),
            reward_sum=self.reward_sum + other.reward_sum,
            usage=self.usage + other.usage,
            failures=self.failures + other.failures,
            child_runs=self.child_runs + other.child_runs,
            child_steps=self.child_steps + other.child_steps,
            child_failures=self.child_failures + other.child_failures,
        )
        out._span_time(self.start_ns, self.end_ns)
        out._span_time(other.start_ns, other.end_ns)
        return out

    def copy(self) -> Elided:
        return self.merge(Elided(first=self.first))

    def __bool__(self) -> bool:
        return bool(self.count or self.child_runs or self.child_steps)

    @property
    def name(self) -> str:
        if self.count and self.first_step is not None and self.last_step is not None:
            return f"steps {self.first_step:,}-{self.last_step:,} (summary)"
        return f"{self.child_runs:,} child runs (summary)"

    def figures(self) -> dict[str, Any]:
        """The span's outputs: the range's figures."""
        out: dict[str, Any] = {
            "steps": self.count,
            "first_step": self.first_step,
            "last_step": self.last_step,
            "failures": self.failures,
        }
        if self.rewarded:
            out.update(
                reward_min=self.reward_min, reward_max=self.reward_max, reward_sum=self.reward_sum
            )
        if self.usage:
            out["tokens"] = _usage(self.usage)
        if self.child_runs or self.child_steps:
            out.update(
                child_runs=self.child_runs,
                child_steps=self.child_steps,
                child_runs_failed=self.child_failures,
            )
        return {k: v for k, v in out.items() if v is not None}


def shown(text: Text, name: str) -> str:
    """A recorded text as a span shows it: a cut one says where and how much was cut."""
    value = text.text or ""
    if not text.cut:
        return value
    name = {"prompt": "llm_input", "response": "llm_output"}.get(name, name)
    marker = f"\n…[{text.length - len(value):,} of {text.length:,} characters cut]…\n"
    if name in _KEEP_TAIL:
        head = CAPS[name] * 3 // 4
        return value[:head] + marker + value[head:]
    return value + marker


def _texts(fields: Mapping[str, Text | None], out: dict[str, Any], cut: list[str]) -> None:
    """Each text into ``out``: the text itself, or its size when it was not recorded."""
    for name, text in fields.items():
        if text is None:
            continue
        if text.text is None:
            out[f"{name}_chars"] = text.length
            continue
        out[name] = shown(text, name)
        if text.cut:
            cut.append(name)


def code_block(text: str, language: str = "") -> str:
    """``text`` as a Markdown fenced code block, shown as written by MLflow's "Pretty" view.

    The fence is one backtick longer than the longest run of three or more in the text (at
    least three), so nothing in the text can end the block; an empty text stays empty."""
    if not text:
        return text
    longest = max((len(run) for run in _BACKTICKS.findall(text)), default=2)
    fence = "`" * (longest + 1)
    newline = "" if text.endswith("\n") else "\n"
    return f"{fence}{language}\n{text}{newline}{fence}"


def _as_code(out: dict[str, Any], name: str, language: str = "") -> None:
    """The text ``out[name]`` (when it was recorded) as a fenced code block."""
    value = out.get(name)
    if isinstance(value, str):
        out[name] = code_block(value, language)


def _number(value: object) -> float | None:
    if type(value) in (int, float, bool) and not is_odd(value):
        number = float(value)  # type: ignore[arg-type]
        return number if math.isfinite(number) else None
    return None


def _usage(usage: Usage) -> dict[str, int]:
    return {
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "total_tokens": usage.total_tokens,
    }


def _session_attributes(run: RunInfo) -> dict[str, str | None]:
    """OpenTelemetry's names for the session and user, which MLflow reads from a trace's spans
    into its ``mlflow.trace.session`` and ``mlflow.trace.user``."""
    return {
        "session.id": run.session[:MAX_ID_CHARS] if run.session else None,
        "user.id": run.user[:MAX_ID_CHARS] if run.user else None,
    }


def run_error(end: RunEnd) -> str | None:
    """Why a run's span (and, for a root, its trace) is an error: it did not finish, or it
    says it did not complete; None when it is not."""
    if end.status != "FINISHED":
        return f"the run ended {end.status}"
    if end.completed is False:
        return "the run did not complete"
    return None


def run_times_ms(run: RunInfo, end: RunEnd) -> tuple[int, int]:
    """A run span's start and duration in milliseconds, as MLflow reads them from it."""
    start_ns = max(0, run.start_ns or end.timestamp_ns)
    end_ns = max(start_ns, end.timestamp_ns)
    return start_ns // 1_000_000, end_ns // 1_000_000 - start_ns // 1_000_000


class SpanBuilder:
    """Builds serialized OTLP spans (:mod:`.otlp`)."""

    def __init__(self, ids: Ids) -> None:
        self.ids = ids
        # The parts of every request but its spans, serialized once.
        self._resource = otlp.resource_field({"service.name": "rlm-mlflow"})
        self._scope = otlp.scope_field("rlm_mlflow")

    def _span(
        self,
        *,
        trace_id: bytes,
        span_id: bytes,
        parent_id: bytes | None,
        name: str,
        start_ns: int,
        end_ns: int,
        attributes: Mapping[str, Any],
        error: str | None = None,
        ok: bool = True,
    ) -> bytes:
        code = otlp.STATUS_UNSET
        if error is not None:
            code = otlp.STATUS_ERROR
        elif ok:
            code = otlp.STATUS_OK
        return otlp.span(
            trace_id=trace_id,
            span_id=span_id,
            parent_id=parent_id,
            name=name[:250] or "span",
            start_ns=max(0, start_ns),
            end_ns=max(start_ns, end_ns),
            attributes=attributes,
            status_code=code,
            status_message=error,
        )

    # -- spans ---------------------------------------------------------------------------------

    def step_spans(self, run: RunInfo, step: Step) -> list[bytes]:
        """The span of one step, one span for each model call it lists, and the leaf "model"
        span of a step that had child runs or model calls."""
        ids, detail = self.ids, step.detail
        number = step_number(step.step)
        label = f"step {number if number is not None else step.ordinal + 1}"
        inputs: dict[str, Any] = {}
        outputs: dict[str, Any] = {}
        cut: list[str] = []
        attributes: dict[str, Any] = {
            "rlm.run_id": run.run_id,
            "rlm.step": number,
            "rlm.reward": _number(step.reward),
            "rlm.cumulative_reward": _number(step.cumulative_reward),
            "rlm.depth": run.depth,
        }
        span_type, error = "CHAIN", None
        if detail is not None:
            action = detail.action.text if detail.action is not None else None
            if action:
                label = f"{label}: {action}"
                attributes["rlm.action"] = action
            _texts({"code": detail.code, "rationale": detail.rationale}, inputs, cut)
            _texts({"stdout": detail.stdout, "stderr": detail.stderr}, outputs, cut)
            _as_code(inputs, "code", "python")
            _as_code(outputs, "stdout")
            _as_code(outputs, "stderr")
            if detail.success is not None:
                outputs["success"] = detail.success
                if not detail.success:
                    error = "the step failed"
            attributes["rlm.execution_time_s"] = detail.execution_time
            if detail.depth is not None:
                attributes["rlm.depth"] = detail.depth
            if detail.code is not None:
                span_type = "TOOL"
            if detail.usage is not None:
                attributes["rlm.usage"] = _usage(detail.usage)
                if detail.usage:  # everything under this span is in it: MLflow counts it alone
                    attributes["mlflow.chat.tokenUsage"] = _usage(detail.usage)
            if detail.children_usage is not None:
                attributes["rlm.children_usage"] = _usage(detail.children_usage)
        if cut:
            attributes["rlm.truncated"] = cut
        if run.is_root and (run.session or run.user):  # the trace is in its session while it runs
            attributes.update(_session_attributes(run))
        attributes["mlflow.spanType"] = span_type
        attributes["mlflow.spanInputs"] = inputs or None
        attributes["mlflow.spanOutputs"] = outputs or None
        trace_id = ids.trace(run.root_no)
        step_id = ids.step(run.no, step.ordinal)
        start = step.since_ns or step.timestamp_ns
        calls = detail.calls if detail is not None else ()
        spans = [self._call_span(run, step, index, call) for index, call in enumerate(calls)]
        children = detail.children_usage if detail is not None else None
        own = detail.usage if detail is not None else None
        if own is not None and (children is not None or calls):
            # The model's own share, on a leaf of its own beside the children and the calls:
            # shown, not counted again (the step above carries the whole usage).
            own = own - children if children is not None else own
            for call in calls:
                own = own - call.usage
            if own:
                spans.append(self._model_span(run, step, own))
        spans.insert(
            0,
            self._span(
                trace_id=trace_id,
                span_id=step_id,
                parent_id=ids.run(run.no),
                name=label,
                start_ns=start,
                end_ns=step.timestamp_ns,
                attributes=attributes,
                error=error,
                ok=detail is not None and detail.success is True,
            ),
        )
        return spans

    def _model_span(self, run: RunInfo, step: Step, own: Usage) -> bytes:
        """The "model" leaf of a step with child runs or model calls: the model's turn, from
        the step's start to where the code's execution or the first child began."""
        start = step.since_ns or step.timestamp_ns
        model_end = step.timestamp_ns
        detail = step.detail
        elapsed = detail.execution_time if detail is not None else None
        if elapsed is not None and elapsed >= 0:  # the model spoke before the code ran
            model_end = step.timestamp_ns - int(elapsed * 1e9)
        first_child = run.child_start_ns.get(step.ordinal)
        if first_child is not None:  # ... and before the children it asked for ran
            model_end = min(model_end, first_child)
        return self._span(
            trace_id=self.ids.trace(run.root_no),
            span_id=self.ids.model(run.no, step.ordinal),
            parent_id=self.ids.step(run.no, step.ordinal),
            name="model",
            start_ns=start,
            end_ns=max(start, model_end),
            attributes={"mlflow.spanType": "LLM", "mlflow.chat.tokenUsage": _usage(own)},
        )

    def _call_span(self, run: RunInfo, step: Step, index: int, call: ModelCall) -> bytes:
        """One model call of a step, as an LLM span with its own tokens."""
        inputs: dict[str, Any] = {}
        outputs: dict[str, Any] = {}
        cut: list[str] = []
        _texts({"prompt": call.input}, inputs, cut)
        _texts({"response": call.output}, outputs, cut)
        _as_code(inputs, "prompt")  # as sent: its line breaks and markers kept
        _as_code(outputs, "response")
        start = call.start_ns or step.since_ns or step.timestamp_ns
        return self._span(
            trace_id=self.ids.trace(run.root_no),
            span_id=self.ids.call(run.no, step.ordinal, index),
            parent_id=self.ids.step(run.no, step.ordinal),
            name=call.model or "model",
            start_ns=start,
            end_ns=call.end_ns or step.timestamp_ns,
            attributes={
                "mlflow.spanType": "LLM",
                "mlflow.spanInputs": inputs or None,
                "mlflow.spanOutputs": outputs or None,
                "mlflow.chat.tokenUsage": _usage(call.usage) if call.usage else None,
                "mlflow.llm.model": call.model,
                "rlm.truncated": cut or None,
            },
        )

    def summary_span(self, run: RunInfo, elided: Elided) -> bytes:
        """The span standing for a run's steps left out past the span budget: their count,
        reward range, failures and time range, and their token usage (MLflow adds it to the
        trace's total as it would have the steps')."""
        attributes: dict[str, Any] = {
            "mlflow.spanType": "CHAIN",
            "mlflow.spanOutputs": elided.figures(),
            "rlm.run_id": run.run_id,
            "rlm.summary": True,
            "rlm.depth": run.depth,
        }
        if elided.usage:
            attributes["rlm.usage"] = _usage(elided.usage)
            attributes["mlflow.chat.tokenUsage"] = _usage(elided.usage)
        failed = elided.failures + elided.child_failures
        return self._span(
            trace_id=self.ids.trace(run.root_no),
            span_id=self.ids.summary(run.no, elided.first),
            parent_id=self.ids.run(run.no),
            name=elided.name,
            start_ns=elided.start_ns,
            end_ns=elided.end_ns,
            attributes=attributes,
            error=f"{failed:,} of the summarised steps or child runs failed" if failed else None,
            ok=not failed,
        )

    def run_span(self, run: RunInfo, end: RunEnd) -> bytes:
        """The AGENT span of a run: the trace's root for a root run."""
        ids = self.ids
        inputs: dict[str, Any] = {}
        cut: list[str] = []
        _texts({"task": run.task}, inputs, cut)
        if "task" not in inputs and "task_chars" not in inputs and run.task_chars is not None:
            inputs["task_chars"] = run.task_chars
        outputs: dict[str, Any] = {}
        _texts({"final_response": end.final}, outputs, cut)
        completed = end.completed if type(end.completed) is bool else None
        outputs.update(
            {
                "completed": completed,
                "steps": _number(end.steps),
                "total_reward": _number(end.total_reward),
            }
        )
        params = {
            str(k): v
            for k, v in run.params.items()
            if isinstance(k, str) and not k.startswith("\x00") and type(v) in (str, int, float)
        }
        attributes: dict[str, Any] = {
            "mlflow.spanType": "AGENT",
            "mlflow.spanInputs": inputs or None,
            "mlflow.spanOutputs": {k: v for k, v in outputs.items() if v is not None} or None,
            "rlm.run_id": run.run_id,
            "rlm.status": end.status,
            "rlm.environment": run.environment if type(run.environment) is str else None,
            "rlm.depth": run.depth,
            "rlm.params": params or None,
            "rlm.truncated": cut or None,
        }
        if end.usage is not None and end.usage:
            attributes["rlm.usage"] = _usage(end.usage)
            attributes["mlflow.chat.tokenUsage"] = _usage(end.usage)
        name = run_name(run.run_id, run.task.text if run.task is not None else None)
        if run.is_root:
            attributes.update(
                {
                    "mlflow.traceTag.run_id": run.run_id[:MAX_TRACE_TAG_VALUE_LENGTH],
                    "mlflow.traceTag.component": COMPONENT_TAG,
                    "mlflow.traceTag.mlflow.traceName": name,
                    f"mlflow.traceTag.{KEY_TAG}": f"{ids.prefix}-{run.no}",
                    **_session_attributes(run),
                }
            )
        error = run_error(end)
        parent = None
        if run.parent_no is not None and run.parent_step is not None and not run.is_root:
            parent = ids.step(run.parent_no, run.parent_step)
        return self._span(
            trace_id=ids.trace(run.root_no),
            span_id=ids.run(run.no),
            parent_id=parent,
            name=name,
            start_ns=run.start_ns or end.timestamp_ns,
            end_ns=end.timestamp_ns,
            attributes=attributes,
            error=error,
        )

    def request(self, spans: Sequence[bytes]) -> bytes:
        """A serialized ``ExportTraceServiceRequest`` carrying ``spans`` (each serialized)."""
        return otlp.request(self._resource, self._scope, spans)

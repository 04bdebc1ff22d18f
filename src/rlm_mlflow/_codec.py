"""Records: the bytes a hook writes to the journal and hands to the worker.

A hook encodes what it read into one compact record and never builds an object graph: the common
step (an int step, float rewards) is one ``struct.pack``; anything unusual, and run starts and
ends, carry a small JSON document. The same bytes go to the journal (durability) and to the
in-memory queue (speed), and the worker decodes both the same way.

Every value a caller passes is made plain here, without trusting it: numbers from other libraries
are converted (their ``__float__``/``__int__`` may raise: caught), integers too large to be a step
or a metric are marked rather than printed (``str()`` of a 5,000-digit int raises), long strings
are cut, and anything else is kept as a short description the worker can report. Encoding never
raises. A text holding a lone surrogate (a ``str`` that is not valid UTF-8) is written as it came,
at no cost to the hook; decoding, the one way records reach the worker (live, spilled or
replayed), replaces it with U+FFFD and marks the event, so no text MLflow sees is invalid.

Layout of a record (all little-endian)::

    prefix   kind u8 | flags u8 | run_no u32 | timestamp_ns i64                   14 bytes
    step     prefix | step i64 | reward f64 | cumulative_reward f64 | ordinal u32
             | since_ns i64 (when the run's previous step, or its start, was)           50 bytes
             (+ detail when FLAG_DETAIL: bits u8 | success u8 | depth i16 | input, output,
                total tokens, calls i64 x4 | execution_time f64 | the same four counts for
                the child runs that ended during this step, then five texts - action, code,
                rationale, stdout, stderr - each length u32 | flags u8 | bytes u32 | UTF-8,
                then, with model calls, length u32 | JSON [[model, input, output, input
                tokens, output tokens, start ns, end ns], ...])
             (+ JSON [step, reward, cumulative_reward] when FLAG_ODD)
    start    prefix | JSON {run_id, environment, task_chars, params, parent_no, implicit,
                            root_no, parent_step, depth, task}
    end      prefix | JSON {run_id, status, completed, steps, total_reward, run_path, final,
                            usage}
    case     prefix (the benchmark's run) | JSON {case_no, expected, verdict, rationale, judge}

Texts are cut where they enter (the caps are in :data:`CAPS`): code and prose keep their head,
printed output keeps its head and its tail (an error is usually at the end).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
import struct
from collections.abc import Mapping, Sequence
from typing import Any

from ._events import (
    CaseResult,
    Event,
    ModelCall,
    RunEnd,
    RunStart,
    Step,
    StepDetail,
    Text,
    Usage,
)

KIND_START = 1
KIND_STEP = 2
KIND_END = 3
KIND_CASE = 4

FLAG_ODD = 1  # a step whose values did not fit the fixed layout: they follow as JSON
FLAG_INTERNAL = 2  # made by the sink itself, not by a hook call
FLAG_DETAIL = 4  # a step with its action, observation and usage (the detail block)

_PREFIX = struct.Struct("<BBIq")
_STEP = struct.Struct("<BBIqqddIq")
_DETAIL = struct.Struct("<BBhqqqqdqqqq")
_TEXT = struct.Struct("<IBI")
_U32 = struct.Struct("<I")
PREFIX_SIZE = _PREFIX.size
STEP_SIZE = _STEP.size

#: The most characters kept of each text field; longer ones are cut, and the span says so.
CAPS = {
    "action": 200,
    "code": 16_000,
    "rationale": 4_000,
    "stdout": 16_000,
    "stderr": 8_000,
    "task": 8_000,
    "final": 8_000,
    "llm_input": 4_000,
    "llm_output": 4_000,
}
#: Model calls kept per step (the others are counted in the step's usage all the same).
MAX_CALLS = 50
_TEXTS = ("action", "code", "rationale", "stdout", "stderr")
_KEEP_TAIL = frozenset({"stdout", "stderr"})
# detail bits
_USAGE, _EXEC_TIME, _SUCCESS, _DEPTH, _CHILDREN, _CALLS = 1, 2, 4, 8, 16, 32

Counts = tuple[int, int, int, int]  # input, output and total tokens, model calls
#: A record in pieces, written one after the other (a hook never joins them).
Parts = Sequence[bytes]
# text flags
_CUT, _NOT_RECORDED, _ABSENT = 1, 2, 4

#: Strings longer than this in a value that is not text by nature (a step, a reward) are cut.
MAX_ODD_TEXT = 200
#: A param value longer than this is cut in the hook (MLflow's own limit, 6,000, is applied later).
MAX_PARAM_TEXT = 8_000
#: Params beyond this many are not read (the run logs a warning).
MAX_PARAMS = 1_000
_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, check_circular=False).encode


def odd(kind: str, text: str = "") -> list[str]:
    """How a value that cannot be kept is described in a record: ``["$", kind, text]``."""
    return ["$", kind, text]


def is_odd(value: object) -> bool:
    return type(value) is list and len(value) == 3 and value[0] == "$"


def describe(value: object) -> str:
    """A short text for a value, for messages: never raises, never prints a huge int."""
    if is_odd(value):
        assert isinstance(value, list)
        return f"<{value[1]}{' ' + value[2] if value[2] else ''}>"
    if type(value) is str:
        return repr(value if len(value) <= 60 else value[:57] + "...")
    try:
        text = repr(value)
    except Exception:
        return f"<{type(value).__name__}>"
    return text if len(text) <= 60 else text[:57] + "..."


def plain(value: object) -> Any:
    """``value`` as JSON-safe data, never raising: see the module docstring."""
    kind = type(value)
    if value is None or kind is bool or kind is float:
        return value
    if kind is int:
        assert isinstance(value, int)
        if _INT64_MIN <= value <= _INT64_MAX:
            return value
        return odd("int", f"of {value.bit_length()} bits")
    if kind is str:
        assert isinstance(value, str)
        return value if len(value) <= MAX_ODD_TEXT else value[:MAX_ODD_TEXT]
    try:
        if isinstance(value, bool):
            return bool(value)
        if isinstance(value, numbers.Integral):
            return plain(int(value))
        if isinstance(value, numbers.Real):
            return float(value)
        if isinstance(value, str):
            return plain(str.__str__(value))
    except Exception as exc:  # a caller's number type whose conversion raises
        return odd(kind.__name__, f"conversion failed: {type(exc).__name__}")
    return odd(kind.__name__, _short_repr(value))


def _short_repr(value: object) -> str:
    try:
        text = object.__repr__(value) if isinstance(value, type) else repr(value)
    except Exception:
        return ""
    return text if len(text) <= 80 else text[:77] + "..."


def _param(value: object) -> Any:
    """A param value: scalars kept (long text cut), anything else described."""
    kind = type(value)
    if kind is str:
        assert isinstance(value, str)
        return value if len(value) <= MAX_PARAM_TEXT else value[:MAX_PARAM_TEXT] + "\x00cut"
    if value is None or kind is bool or kind is int or kind is float:
        return plain(value)
    if isinstance(value, str | int | float):  # subclasses (enums, numpy scalars)
        return plain(value)
    return odd(kind.__name__)


def _params(params: object) -> Any:
    if type(params) is not dict and not isinstance(params, Mapping):
        return odd(type(params).__name__)
    out: dict[str, Any] = {}
    try:
        for index, (key, value) in enumerate(params.items()):
            if index >= MAX_PARAMS:
                out["\x00more"] = len(params) - MAX_PARAMS
                break
            name = key if type(key) is str else "\x00" + describe(key)
            out[name] = _param(value)
    except Exception as exc:  # a Mapping whose iteration raises
        out["\x00error"] = f"reading params failed: {type(exc).__name__}"
    return out


def path_text(path: object) -> str | None:
    if path is None:
        return None
    try:
        text = os.fsdecode(path)  # type: ignore[arg-type]
    except Exception:
        return "\x00" + describe(path)
    return text[:4096]


def _json(document: object) -> bytes:
    try:
        return _dumps(document).encode("utf-8", "surrogatepass")
    except Exception:  # defensive: plain() values always encode
        return b"{}"


# -- hook side ------------------------------------------------------------------------------


def step_parts(  # noqa: PLR0917 - positional on purpose: a hook calls it on every step
    run_no: int,
    timestamp_ns: int,
    step: object,
    reward: object,
    cumulative: object,
    ordinal: int = 0,
    since_ns: int = 0,
    detail: Parts = (),
    flags: int = 0,
) -> list[bytes]:
    """A step record in pieces, to be written one after the other: the fixed layout when the
    values fit it, else with a JSON tail. The pieces are never joined on the hook: the journal
    copies each where it belongs, so a step's texts are copied once, not once per layer."""
    if detail:
        flags |= FLAG_DETAIL
    if type(step) is int and type(reward) is float and type(cumulative) is float:
        try:
            head = _STEP.pack(
                KIND_STEP, flags, run_no, timestamp_ns, step, reward, cumulative, ordinal, since_ns
            )
        except struct.error:  # a step beyond int64: described in the tail
            pass
        else:
            return [head, *detail] if detail else [head]
    tail = _json([plain(step), plain(reward), plain(cumulative)])
    head = _STEP.pack(
        KIND_STEP, flags | FLAG_ODD, run_no, timestamp_ns, 0, 0.0, 0.0, ordinal, since_ns
    )
    return [head, *detail, tail]


def cut(value: object, name: str) -> tuple[str, int, bool]:
    """``(text, original length, cut)`` of a text field, within its cap (see :data:`CAPS`)."""
    if type(value) is not str:
        value = _as_text(value)
    assert isinstance(value, str)
    length, cap = len(value), CAPS[name]
    if length <= cap:
        return value, length, False
    if name in _KEEP_TAIL:
        head = cap * 3 // 4
        return value[:head] + value[length - (cap - head) :], length, True
    return value[:cap], length, True


def _as_text(value: object) -> str:
    if isinstance(value, str):
        return str.__str__(value)
    try:
        text = str(value)
    except Exception:
        return f"<{type(value).__name__}>"
    return text if type(text) is str else f"<{type(value).__name__}>"


_ABSENT_SLOT = _TEXT.pack(0, _ABSENT, 0)


def _text_slot(value: object, name: str, record: bool, out: list[bytes]) -> None:
    """Append a text's slot to ``out``: its header, then its UTF-8 bytes (two pieces, so that
    the text is not copied to join them)."""
    if value is None:
        out.append(_ABSENT_SLOT)
        return
    if type(value) is str and len(value) <= CAPS[name]:  # the usual text: as it is
        text, length, was_cut = value, len(value), False
    else:
        text, length, was_cut = cut(value, name)
    if not record:
        out.append(_TEXT.pack(length, _NOT_RECORDED, 0))
        return
    data = text.encode("utf-8", "surrogatepass")
    out.append(_TEXT.pack(length, _CUT if was_cut else 0, len(data)))
    if data:
        out.append(data)


class BadField(ValueError):
    """A field of a step holds a value that cannot be kept (the careful path says which)."""


def _count(value: object) -> int:
    """A token or call count, or a time in nanoseconds: 0 when absent; BadField when present
    but not a whole number from 0 to 2**62 (the careful path then reads the fields one by one)."""
    if type(value) is int and 0 <= value < 2**62:
        return value
    if value is None:
        return 0
    if type(value) is float and value.is_integer() and 0 <= value < 2**62:
        return int(value)
    raise BadField


def usage_counts(usage: object) -> Counts | None:
    """The token counts of a usage mapping (``prompt_tokens``/``completion_tokens`` or
    ``input_tokens``/``output_tokens``, ``total_tokens``, ``total_calls``), None when it is not
    one or a count is not a whole number: never raises."""
    if not isinstance(usage, Mapping):
        return None
    try:
        tokens_in = _count(usage.get("prompt_tokens", usage.get("input_tokens")))
        tokens_out = _count(usage.get("completion_tokens", usage.get("output_tokens")))
        total = _count(usage.get("total_tokens")) or tokens_in + tokens_out
        calls = _count(usage.get("total_calls", usage.get("calls")))
    except Exception:
        return None
    return (tokens_in, tokens_out, total, calls)


def step_detail(
    event: Mapping[str, Any], texts: bool, children: Counts | None = None
) -> tuple[Parts, Counts | None]:
    """The detail block of a step event, in pieces (none when it has none), and its token counts:
    RLM Code's ``action`` (code, rationale), ``observation`` (stdout, stderr, success, execution
    time), ``usage`` and ``depth``; ``children``: what child runs that ended during the step
    used (RLM Code counts it in the step's own usage too). ``texts`` False records the texts'
    lengths only (metadata-only traces)."""
    action = event.get("action")
    observation = event.get("observation")
    usage = event.get("usage")
    depth = event.get("depth")
    model_calls = event.get("llm_calls")
    if action is None and observation is None and usage is None and depth is None:  # noqa: SIM102
        if model_calls is None:  # the common plain step: no detail at all
            return [], None
    if not isinstance(action, Mapping):
        action = {"action": action} if action is not None else {}
    if not isinstance(observation, Mapping):
        observation = {}
    bits = 0
    tokens_in = tokens_out = total = calls = 0
    if isinstance(usage, Mapping):
        bits |= _USAGE
        tokens_in = _count(usage.get("prompt_tokens", usage.get("input_tokens")))
        tokens_out = _count(usage.get("completion_tokens", usage.get("output_tokens")))
        total = _count(usage.get("total_tokens")) or tokens_in + tokens_out
        calls = _count(usage.get("total_calls", usage.get("calls")))
    success = observation.get("success")
    succeeded = 0
    if type(success) is bool:
        bits |= _SUCCESS
        succeeded = 1 if success else 2
    elif success is not None:
        raise BadField
    elapsed = observation.get("execution_time")
    seconds = 0.0
    if type(elapsed) is float or type(elapsed) is int:
        bits |= _EXEC_TIME
        seconds = float(elapsed)  # an int beyond a double raises: the careful path drops it
    elif elapsed is not None:
        raise BadField
    level = 0
    if type(depth) is int and -32768 <= depth < 32768:
        bits |= _DEPTH
        level = depth
    elif depth is not None:
        raise BadField
    if children is None:
        children = (0, 0, 0, 0)
    else:
        bits |= _CHILDREN
    head = _DETAIL.pack(
        bits, succeeded, level, tokens_in, tokens_out, total, calls, seconds, *children
    )
    counts = (tokens_in, tokens_out, total, calls) if bits & _USAGE else None
    parts = [head]
    tail = None
    if model_calls is not None:
        made = _model_calls(model_calls, texts)
        if made:
            tail = _U32.pack(len(made)) + made
            parts[0] = bytes([head[0] | _CALLS]) + head[1:]
    _text_slot(action.get("action"), "action", True, parts)
    _text_slot(action.get("code"), "code", texts, parts)
    _text_slot(action.get("rationale"), "rationale", texts, parts)
    _text_slot(observation.get("stdout"), "stdout", texts, parts)
    _text_slot(observation.get("stderr"), "stderr", texts, parts)
    if tail is not None:
        parts.append(tail)
    return parts, counts


#: The fields of a step event that the detail block reads, by the mapping they sit in.
_DETAIL_FIELDS = {
    "action": ("action", "code", "rationale"),
    "observation": ("stdout", "stderr", "success", "execution_time"),
    "usage": (
        "prompt_tokens",
        "input_tokens",
        "completion_tokens",
        "output_tokens",
        "total_tokens",
        "total_calls",
        "calls",
    ),
}
_CALL_FIELDS = ("model", "input", "output", "usage", "start_ns", "end_ns")
_ABSENT_FIELD = object()


def careful_step_detail(
    event: Mapping[str, Any], texts: bool, children: Counts | None = None
) -> tuple[Parts, Counts | None, list[str]]:
    """:func:`step_detail` for an event on which it raised: each field is read on its own into
    plain dicts, a field that cannot be read or kept is left out, and what was left out is said
    (``problems``). The rest of the step (its rewards first) is kept. Never raises."""
    problems: list[str] = []

    def read(mapping: Any, name: str, where: str, default: Any = None) -> Any:
        try:
            return mapping.get(name, default)
        except Exception as exc:
            problems.append(f"{where}{name} could not be read ({type(exc).__name__})")
            return None

    def plain_mapping(value: Any, names: tuple[str, ...], where: str) -> Any:
        """The fields of ``value`` that it has (absent ones stay absent: some fall back to
        others), as a plain dict."""
        if not isinstance(value, Mapping):
            return value
        found = {name: read(value, name, where, _ABSENT_FIELD) for name in names}
        return {name: field for name, field in found.items() if field is not _ABSENT_FIELD}

    clean: dict[str, Any] = {}
    for name, names in _DETAIL_FIELDS.items():
        clean[name] = plain_mapping(read(event, name, ""), names, f"{name}.")
    clean["depth"] = _checked(read(event, "depth", ""), "depth", _depth, problems)
    observation = clean["observation"]
    if isinstance(observation, dict):
        for name, check in (("execution_time", _seconds), ("success", _flag)):
            if name in observation:
                where = f"observation.{name}"
                observation[name] = _checked(observation[name], where, check, problems)
    _check_counts(clean["usage"], "usage.", problems)
    calls = read(event, "llm_calls", "")
    if isinstance(calls, list | tuple):
        try:
            kept = []
            for index, given in enumerate(calls[:MAX_CALLS]):
                if isinstance(given, Mapping):
                    where = f"llm_calls[{index}]."
                    call = plain_mapping(given, _CALL_FIELDS, where)
                    usage = call.get("usage")
                    call["usage"] = plain_mapping(usage, _DETAIL_FIELDS["usage"], where + "usage.")
                    _check_counts(call["usage"], where + "usage.", problems)
                    _check_counts(call, where, problems, ("start_ns", "end_ns"))
                    kept.append(call)
                else:
                    kept.append(given)
            clean["llm_calls"] = kept
        except Exception as exc:
            problems.append(f"llm_calls could not be read ({type(exc).__name__})")
    try:
        detail, used = step_detail(clean, texts, children)
    except Exception as exc:  # defensive: every field above is plain
        problems.append(f"the step's detail could not be read ({type(exc).__name__})")
        detail, used = [], None
    return detail, used, problems


def _checked(value: Any, where: str, check: Any, problems: list[str]) -> Any:
    """``check(value)`` (a plain value, or None for one that cannot be kept, which is said)."""
    if value is None:
        return None
    try:
        kept = check(value)
    except Exception:
        kept = None
    if kept is None:
        problems.append(f"{where} is {describe(value)}")
    return kept


def _whole(value: Any) -> int | None:
    if type(value) is float and value.is_integer():
        value = int(value)
    elif type(value) is not int and isinstance(value, numbers.Integral):
        value = int(value)  # a numpy int: kept
    return value if type(value) is int else None


def _count_of(value: Any) -> int | None:
    number = _whole(value)
    return number if number is not None and 0 <= number < 2**62 else None


def _depth(value: Any) -> int | None:
    number = _whole(value) if type(value) is not bool else None
    return number if number is not None and -32768 <= number < 32768 else None


def _seconds(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)  # an int beyond a double raises: not kept


def _flag(value: Any) -> bool | None:
    return value if type(value) is bool else None


def _check_counts(
    mapping: Any, where: str, problems: list[str], names: tuple[str, ...] = _DETAIL_FIELDS["usage"]
) -> None:
    if isinstance(mapping, dict):
        for name in names:
            if name in mapping:
                mapping[name] = _checked(mapping[name], where + name, _count_of, problems)


def _model_calls(calls: object, texts: bool) -> bytes:
    """Model calls of a step (``llm_calls``: dicts with model, input, output, usage, start_ns,
    end_ns) as compact JSON, texts cut; b"" when there is nothing usable."""
    if not isinstance(calls, list | tuple):
        return b""
    out = []
    for call in calls[:MAX_CALLS]:
        if not isinstance(call, Mapping):
            continue
        usage = call.get("usage")
        tokens_in = tokens_out = 0
        if isinstance(usage, Mapping):
            tokens_in = _count(usage.get("prompt_tokens", usage.get("input_tokens")))
            tokens_out = _count(usage.get("completion_tokens", usage.get("output_tokens")))
        model = call.get("model")
        given_in, given_out = call.get("input"), call.get("output")
        out.append(
            [
                cut(model, "action")[0] if model is not None else None,
                text_document(given_in, "llm_input", texts) if given_in is not None else None,
                text_document(given_out, "llm_output", texts) if given_out is not None else None,
                tokens_in,
                tokens_out,
                _count(call.get("start_ns")),
                _count(call.get("end_ns")),
            ]
        )
    return _json(out) if out else b""


def text_document(value: object, name: str, record: bool) -> list[Any] | None:
    """A text for a start or end record's JSON: ``[text or None, length, cut]``."""
    if value is None:
        return None
    text, length, was_cut = cut(value, name)
    return [text if record else None, length, was_cut]


def encode_start(
    run_no: int,
    timestamp_ns: int,
    *,
    run_id: str,
    environment: object,
    task_chars: int | None,
    params: object,
    parent_no: int | None,
    implicit: bool = False,
    root_no: int | None = None,
    parent_step: int | None = None,
    depth: object = None,
    task: list[Any] | None = None,
    flags: int = 0,
    session: str | None = None,
    user: str | None = None,
    benchmark: bool = False,
    dataset: dict[str, Any] | None = None,
    bench_no: int | None = None,
) -> bytes:
    document: dict[str, Any] = {
        "run_id": run_id,
        "environment": plain(environment) if type(environment) is not str else environment,
        "task_chars": task_chars,
        "params": _params(params),
        "parent_no": parent_no,
        "implicit": implicit,
        "root_no": root_no,
        "parent_step": parent_step,
        "depth": depth if type(depth) is int else None,
        "task": task,
    }
    if session is not None:
        document["session"] = session
    if user is not None:
        document["user"] = user
    if benchmark:
        document["benchmark"] = True
    if dataset is not None:
        document["dataset"] = dataset
    if bench_no is not None:
        document["bench_no"] = bench_no
    return _PREFIX.pack(KIND_START, flags, run_no, timestamp_ns) + _json(document)


def encode_end(
    run_no: int,
    timestamp_ns: int,
    *,
    run_id: str,
    status: str,
    completed: object = None,
    steps: object = None,
    total_reward: object = None,
    run_path: str | None = None,
    final: list[Any] | None = None,
    usage: Counts | None = None,
    flags: int = 0,
    cases: dict[int, dict[str, float]] | None = None,
) -> bytes:
    document: dict[str, Any] = {
        "run_id": run_id,
        "status": status,
        "completed": plain(completed),
        "steps": plain(steps),
        "total_reward": plain(total_reward),
        "run_path": run_path,
        "final": final,
        "usage": usage,
    }
    if cases:
        document["cases"] = {str(no): figures for no, figures in cases.items()}
    return _PREFIX.pack(KIND_END, flags, run_no, timestamp_ns) + _json(document)


def encode_case(
    bench_no: int,
    timestamp_ns: int,
    *,
    case_no: int,
    expected: object = None,
    verdict: object = None,
    rationale: object = None,
    judge: str = "judge",
) -> bytes:
    """A benchmark's word on one case (not a hook: its values are cut like a final answer)."""
    document = {
        "case_no": case_no,
        "expected": _case_value(expected),
        "verdict": _case_value(verdict),
        "rationale": cut(rationale, "rationale")[0] if rationale is not None else None,
        "judge": judge,
    }
    return _PREFIX.pack(KIND_CASE, 0, bench_no, timestamp_ns) + _json(document)


def _case_value(value: object) -> Any:
    """A bool, a number or None as it is; anything else as its text, cut."""
    if value is None or type(value) in (bool, int, float):
        return plain(value)
    return cut(value, "final")[0]


# -- worker side -----------------------------------------------------------------------------


def peek(payload: bytes | memoryview) -> tuple[int, int, int]:
    """``(kind, flags, run_no)`` of a record without decoding it."""
    kind, flags, run_no, _ = _PREFIX.unpack_from(payload)
    return kind, flags, run_no


def decode(payload: bytes | memoryview) -> Event:
    """The event of one record. Raises ValueError for bytes that are not a record."""
    try:
        kind, flags, run_no, timestamp = _PREFIX.unpack_from(payload)
        internal = bool(flags & FLAG_INTERNAL)
        if kind == KIND_STEP:
            _, _, _, _, step, reward, cumulative, ordinal, since = _STEP.unpack_from(payload)
            offset = STEP_SIZE
            detail = None
            if flags & FLAG_DETAIL:
                detail, offset = _decode_detail(payload, offset)
            if flags & FLAG_ODD:
                step, reward, cumulative = _load(payload[offset:])[0]
            return Step(
                run_no, timestamp, step, reward, cumulative, internal, detail, ordinal, since
            )
        document, replaced = _load(payload[PREFIX_SIZE:])
        if kind == KIND_START:
            return RunStart(
                run_no,
                timestamp,
                str(document["run_id"]),
                document.get("environment"),
                document.get("task_chars"),
                document.get("params") or {},
                document.get("parent_no"),
                bool(document.get("implicit")),
                internal,
                document.get("root_no"),
                document.get("parent_step"),
                document.get("depth"),
                _text_of(document.get("task")),
                replaced,
                _id_of(document.get("session")),
                _id_of(document.get("user")),
                bool(document.get("benchmark")),
                document.get("dataset") if isinstance(document.get("dataset"), dict) else None,
                document.get("bench_no") if type(document.get("bench_no")) is int else None,
            )
        if kind == KIND_END:
            return RunEnd(
                run_no,
                timestamp,
                str(document["run_id"]),
                str(document["status"]),
                document.get("completed"),
                document.get("steps"),
                document.get("total_reward"),
                document.get("run_path"),
                internal,
                _text_of(document.get("final")),
                _usage_of(document.get("usage")),
                replaced,
                _cases_of(document.get("cases")),
            )
        if kind == KIND_CASE:
            rationale = document.get("rationale")
            return CaseResult(
                run_no,
                timestamp,
                int(document["case_no"]),
                document.get("expected"),
                document.get("verdict"),
                str(rationale) if rationale is not None else None,
                str(document.get("judge") or "judge"),
                internal,
            )
    except (struct.error, ValueError, KeyError, TypeError, IndexError) as exc:
        raise ValueError(f"not a record: {type(exc).__name__}: {exc}") from None
    raise ValueError(f"unknown record kind {kind}")


def _cases_of(value: object) -> dict[int, dict[str, float]] | None:
    """A benchmark end's case figures, what of them is well formed."""
    if not isinstance(value, dict):
        return None
    cases: dict[int, dict[str, float]] = {}
    for no, figures in value.items():
        if not (isinstance(no, str) and no.isdigit() and isinstance(figures, dict)):
            continue
        cases[int(no)] = {
            str(name): float(figure)
            for name, figure in figures.items()
            if type(figure) in (int, float) and math.isfinite(figure)
        }
    return cases or None


def _id_of(value: object) -> str | None:
    return value if type(value) is str and value else None


_SURROGATE = re.compile("[\ud800-\udfff]")


def valid_text(text: str) -> str:
    """``text`` with every lone surrogate (a str that is not valid UTF-8) replaced by U+FFFD."""
    return _SURROGATE.sub("\ufffd", text)


def _decode_text(data: bytes) -> tuple[str, bool]:
    """UTF-8 written by a hook (lone surrogates passed through): ``(valid text, replaced)``."""
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return valid_text(data.decode("utf-8", "surrogatepass")), True


def _load(data: bytes | memoryview) -> tuple[Any, bool]:
    """A JSON part of a record, its texts valid UTF-8: ``(document, replaced)``."""
    text, replaced = _decode_text(bytes(data))
    return json.loads(text), replaced


def _usage_of(value: Any) -> Usage | None:
    if not isinstance(value, list) or len(value) != 4:
        return None
    return Usage(*(int(v) for v in value))


def _text_of(value: Any) -> Text | None:
    if not isinstance(value, list) or len(value) != 3:
        return None
    text, length, was_cut = value
    return Text(text if isinstance(text, str) else None, int(length), bool(was_cut))


def _decode_detail(payload: bytes | memoryview, offset: int) -> tuple[StepDetail, int]:
    (bits, succeeded, level, tokens_in, tokens_out, total, count, seconds, *children) = (
        _DETAIL.unpack_from(payload, offset)
    )
    offset += _DETAIL.size
    texts: list[Text | None] = []
    for _ in _TEXTS:
        length, text_flags, size = _TEXT.unpack_from(payload, offset)
        offset += _TEXT.size
        if text_flags & _ABSENT:
            texts.append(None)
            continue
        text = None
        if not text_flags & _NOT_RECORDED:
            text = _decode_text(bytes(payload[offset : offset + size]))[0]
        offset += size
        texts.append(Text(text, length, bool(text_flags & (_CUT | _NOT_RECORDED))))
    action, code, rationale, stdout, stderr = texts
    model_calls: tuple[ModelCall, ...] = ()
    if bits & _CALLS:
        (size,) = _U32.unpack_from(payload, offset)
        offset += _U32.size
        listed = _load(payload[offset : offset + size])[0]
        offset += size
        model_calls = tuple(
            ModelCall(
                model=model,
                input=_text_of(given_in),
                output=_text_of(given_out),
                usage=Usage(tokens_in, tokens_out, tokens_in + tokens_out, 1),
                start_ns=start,
                end_ns=end,
            )
            for model, given_in, given_out, tokens_in, tokens_out, start, end in listed
        )
    detail = StepDetail(
        action=action,
        code=code,
        rationale=rationale,
        stdout=stdout,
        stderr=stderr,
        success=None if not bits & _SUCCESS else succeeded == 1,
        execution_time=seconds if bits & _EXEC_TIME else None,
        usage=Usage(tokens_in, tokens_out, total, count) if bits & _USAGE else None,
        depth=level if bits & _DEPTH else None,
        children_usage=Usage(*children) if bits & _CHILDREN else None,
        calls=model_calls,
    )
    return detail, offset

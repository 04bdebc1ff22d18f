"""Records: the bytes a hook writes to the journal and hands to the worker.

A hook encodes what it read into one compact record and never builds an object graph: the common
step (an int step, float rewards) is one ``struct.pack``; anything unusual, and run starts and
ends, carry a small JSON document. The same bytes go to the journal (durability) and to the
in-memory queue (speed), and the worker decodes both the same way.

Every value a caller passes is made plain here, without trusting it: numbers from other libraries
are converted (their ``__float__``/``__int__`` may raise: caught), integers too large to be a step
or a metric are marked rather than printed (``str()`` of a 5,000-digit int raises), long strings
are cut, and anything else is kept as a short description the worker can report. Encoding never
raises.

Layout of a record (all little-endian)::

    prefix   kind u8 | flags u8 | run_no u32 | timestamp_ms i64                   14 bytes
    step     prefix | step i64 | reward f64 | cumulative_reward f64             38 bytes
             (+ JSON [step, reward, cumulative_reward] when FLAG_ODD)
    start    prefix | JSON {run_id, environment, task_chars, params, parent_no, implicit}
    end      prefix | JSON {run_id, status, completed, steps, total_reward, run_path}
"""

from __future__ import annotations

import json
import numbers
import os
import struct
from collections.abc import Mapping
from typing import Any

from ._events import Event, RunEnd, RunStart, Step

KIND_START = 1
KIND_STEP = 2
KIND_END = 3

FLAG_ODD = 1  # a step whose values did not fit the fixed layout: they follow as JSON
FLAG_INTERNAL = 2  # made by the sink itself, not by a hook call

_PREFIX = struct.Struct("<BBIq")
_STEP = struct.Struct("<BBIqqdd")
PREFIX_SIZE = _PREFIX.size
STEP_SIZE = _STEP.size

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


def encode_step(  # noqa: PLR0917 - positional on purpose: a hook calls it on every step
    run_no: int,
    timestamp_ms: int,
    step: object,
    reward: object,
    cumulative: object,
    flags: int = 0,
) -> bytes:
    """A step record; the fixed layout when the values fit it, else with a JSON tail."""
    if type(step) is int and type(reward) is float and type(cumulative) is float:
        try:
            return _STEP.pack(KIND_STEP, flags, run_no, timestamp_ms, step, reward, cumulative)
        except struct.error:  # a step beyond int64: described in the tail
            pass
    tail = _json([plain(step), plain(reward), plain(cumulative)])
    head = _STEP.pack(KIND_STEP, flags | FLAG_ODD, run_no, timestamp_ms, 0, 0.0, 0.0)
    return head + tail


def encode_start(
    run_no: int,
    timestamp_ms: int,
    *,
    run_id: str,
    environment: object,
    task_chars: int | None,
    params: object,
    parent_no: int | None,
    implicit: bool = False,
    flags: int = 0,
) -> bytes:
    document = {
        "run_id": run_id,
        "environment": plain(environment) if type(environment) is not str else environment,
        "task_chars": task_chars,
        "params": _params(params),
        "parent_no": parent_no,
        "implicit": implicit,
    }
    return _PREFIX.pack(KIND_START, flags, run_no, timestamp_ms) + _json(document)


def encode_end(
    run_no: int,
    timestamp_ms: int,
    *,
    run_id: str,
    status: str,
    completed: object = None,
    steps: object = None,
    total_reward: object = None,
    run_path: str | None = None,
    flags: int = 0,
) -> bytes:
    document = {
        "run_id": run_id,
        "status": status,
        "completed": plain(completed),
        "steps": plain(steps),
        "total_reward": plain(total_reward),
        "run_path": run_path,
    }
    return _PREFIX.pack(KIND_END, flags, run_no, timestamp_ms) + _json(document)


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
            _, _, _, _, step, reward, cumulative = _STEP.unpack_from(payload)
            if flags & FLAG_ODD:
                step, reward, cumulative = json.loads(bytes(payload[STEP_SIZE:]))
            return Step(run_no, timestamp, step, reward, cumulative, internal)
        document = json.loads(bytes(payload[PREFIX_SIZE:]).decode("utf-8", "surrogatepass"))
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
            )
    except (struct.error, ValueError, KeyError, TypeError, IndexError) as exc:
        raise ValueError(f"not a record: {type(exc).__name__}: {exc}") from None
    raise ValueError(f"unknown record kind {kind}")

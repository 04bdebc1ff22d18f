"""Turn what callers passed into values MLflow accepts, rejecting the rest one item at a time.

Everything here runs on the worker, on values the hooks made plain (:mod:`._codec`). Each
rejection is counted under a reason and logged (rate limited) with the run it belongs to; the
valid data beside it goes on.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from .._codec import describe, is_odd

# MLflow's own limits (mlflow/utils/validation.py).
MAX_KEY_LENGTH = 250
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
MAX_TAGS_PER_BATCH = 100
MAX_ENTITIES_PER_BATCH = 1000
#: Run, trace and span names are cut to this many characters (names, not documents).
MAX_NAME_LENGTH = 250
#: The longest trace tag value every MLflow store keeps (``mlflow/tracing/constant.py``); a
#: longer trace name makes MLflow refuse the trace's spans.
MAX_TRACE_TAG_VALUE_LENGTH = 4096
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

_KEY_PATTERN = re.compile(r"^[/\w.\- :]*$")

Reject = Callable[[str, str], None]  # (reason, message)

#: Said when a record's texts held a lone surrogate (a Python str that is not valid UTF-8).
REPLACED = (
    "a lone surrogate (text that is not valid UTF-8) in its run id, params or texts was "
    "replaced by U+FFFD; MLflow would have stored an empty value and lost the values after it"
)


def key_problem(key: object) -> str | None:
    """Why MLflow would refuse ``key`` as a param, metric or tag name, or None if it is fine."""
    if not isinstance(key, str):
        return f"key {describe(key)} is not a string"
    if key.startswith("\x00"):
        return f"key {key[1:]} is not a string"
    if not key:
        return "key is empty"
    if len(key) > MAX_KEY_LENGTH:
        return f"key {key[:40]!r}... is {len(key)} characters long (MLflow allows {MAX_KEY_LENGTH})"
    if not _KEY_PATTERN.match(key):
        return (
            f"key {key!r} has characters MLflow refuses (allowed: letters, digits, _ - . / : space)"
        )
    if key.startswith("/") or ".." in key.split("/") or "//" in key:
        return f"key {key!r} is not a relative path MLflow accepts"
    return None


def metric_value(raw: object) -> tuple[float | None, str | None]:
    """``(value, None)`` for a finite real number, else ``(None, why)``."""
    if type(raw) is float:
        value = raw
    elif type(raw) is int or type(raw) is bool:
        value = float(raw)
    elif raw is None:
        return None, "it is None"
    else:
        return None, f"{describe(raw)} is not a number"
    if math.isfinite(value):
        return value, None
    return None, f"{value!r} is not finite"


def step_number(raw: object) -> int | None:
    """The step as an int64, or None when it is missing, not whole, or out of range."""
    if type(raw) is int:
        return raw if INT64_MIN <= raw <= INT64_MAX else None
    if type(raw) is float and raw.is_integer() and INT64_MIN <= raw <= INT64_MAX:
        return int(raw)
    return None


def out_of_range(raw: object) -> bool:
    """A whole number, but one no int64 holds (a huge int comes described: ``["$", "int"]``)."""
    if is_odd(raw):
        assert isinstance(raw, list)
        return bool(raw[1] == "int")
    if type(raw) is int:
        return not INT64_MIN <= raw <= INT64_MAX
    return type(raw) is float and raw.is_integer() and not INT64_MIN <= raw <= INT64_MAX


def _scalar_text(value: object) -> str | None:
    """MLflow's text for a scalar param value (str, int, float, bool, None), else None."""
    if value is None or type(value) in (str, bool, int, float):
        return str(value)
    return None


def params_of(
    *,
    environment: object,
    task_chars: object,
    params: Mapping[Any, Any],
    reject: Reject,
    skip: Callable[[str, object], None],
) -> Iterator[tuple[str, str]]:
    """The run's params: ``environment``, ``task_chars`` and every valid scalar param.

    The caller's own ``environment``/``task_chars`` entries yield to the sink's, with a warning when
    they differ; non-scalar values are skipped (as the seed documents), with a count.
    """
    own: dict[str, str] = {}
    if environment is not None or task_chars is not None:  # None for a run opened by a step
        env_text = _scalar_text(environment)
        if env_text is None:
            reject("param_not_scalar", f"environment {describe(environment)} is not a scalar")
        else:
            own["environment"] = env_text
        if type(task_chars) is int:
            own["task_chars"] = str(task_chars)
    seen: dict[str, str] = dict(own)
    yield from own.items()
    for key, value in params.items():
        if key == "\x00more":
            reject("params_too_many", f"{value} params beyond the first 1,000 were not read")
            continue
        if key == "\x00error":
            reject("params_unreadable", str(value))
            continue
        problem = key_problem(key)
        if problem:
            reject("param_bad_key", f"param skipped: {problem}")
            continue
        if is_odd(value):
            if value[1] == "int":
                reject("param_bad_value", f"param {key!r}: an int {value[2]} is not logged")
            else:  # documented behaviour, not an error: counted, logged at debug level
                skip(key, value)
            continue
        text = _scalar_text(value)
        if text is None:
            skip(key, value)
            continue
        if text.endswith("\x00cut"):
            text = text[: -len("\x00cut")]
        if len(text) > MAX_PARAM_VALUE_LENGTH:
            reject(
                "param_truncated",
                f"param {key!r}: value cut to {MAX_PARAM_VALUE_LENGTH} characters (MLflow's limit)",
            )
            text = text[:MAX_PARAM_VALUE_LENGTH]
        if key in seen:
            if seen[key] != text:
                reject(
                    "param_conflict",
                    f"param {key!r}={describe(text)} conflicts with {describe(seen[key])}; "
                    "first kept",
                )
            continue
        seen[key] = text
        yield key, text


def tag_value(value: str, key: str, reject: Reject) -> str:
    if len(value) > MAX_TAG_VALUE_LENGTH:
        reject(
            "tag_truncated",
            f"tag {key!r}: value of {len(value)} characters cut to {MAX_TAG_VALUE_LENGTH}",
        )
        return value[:MAX_TAG_VALUE_LENGTH]
    return value


def name_of(run_id: str) -> str:
    """The name of the MLflow run, and of the trace and the span, of an RLM run."""
    return run_id[:MAX_NAME_LENGTH] or "run"


#: How much of a run's task names its MLflow run (the runs list shows about this much).
RUN_NAME_WORDS = 32
#: A run id this short names a run whole after its task; a longer one by its last characters.
_SHORT_ID = 12
_ID_TAIL = 6


def run_name(run_id: str, task: str | None) -> str:
    """The name of an RLM run's MLflow run: what it did, told apart from its siblings.

    The first words of its task, then the end of its run id (``sum the primes below 100 ·
    986734``), so runs read apart in the runs list where every run id starts the same
    (``run_20261204_19...``); the run id alone when the task was not recorded. The run id stays
    whole in the run's ``run_id`` tag; runs are found by their key tag, never by name.
    """
    words = " ".join(task.split()) if task else ""
    if not words:
        return name_of(run_id)
    if len(words) > RUN_NAME_WORDS:
        head = words[: RUN_NAME_WORDS + 1]
        cut = head.rsplit(" ", 1)[0] if " " in head[RUN_NAME_WORDS // 2 :] else head[:-1]
        words = cut.rstrip(" ,.;:-") + "…"
    tail = run_id if len(run_id) <= _SHORT_ID else run_id[-_ID_TAIL:]
    return f"{words} · {tail}"[:MAX_NAME_LENGTH] if tail else words

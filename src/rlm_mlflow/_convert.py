"""Turn what callers passed into values MLflow accepts, rejecting the rest one item at a time.

Everything here runs on the worker. Each rejection is counted under a reason and logged (rate
limited) with the run it belongs to; the valid data beside it goes on.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

# MLflow's own limits (mlflow/utils/validation.py).
MAX_KEY_LENGTH = 250
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
MAX_TAGS_PER_BATCH = 100
MAX_ENTITIES_PER_BATCH = 1000

_KEY_PATTERN = re.compile(r"^[/\w.\- :]*$")

Reject = Callable[[str, str], None]  # (reason, message)


def key_problem(key: object) -> str | None:
    """Why MLflow would refuse ``key`` as a param, metric or tag name, or None if it is fine."""
    if not isinstance(key, str):
        return f"key {key!r} is a {type(key).__name__}, not a string"
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
    if type(raw) is float:  # the common case, first
        value = raw
    elif isinstance(raw, numbers.Real):
        try:
            value = float(raw)
        except (OverflowError, ValueError, TypeError):
            return None, f"{_show(raw)} does not fit in a float"
    elif raw is None:
        return None, "it is None"
    else:
        return None, f"{_show(raw)} ({type(raw).__name__}) is not a number"
    if math.isfinite(value):
        return value, None
    return None, f"{value!r} is not finite"


def step_number(raw: object) -> int | None:
    """The step as an int, or None when it is missing or not a whole number."""
    if type(raw) is int:
        return raw
    if isinstance(raw, bool) or raw is None:
        return None
    if isinstance(raw, numbers.Integral):
        return int(raw)
    if isinstance(raw, float) and raw.is_integer():
        return int(raw)
    return None


def _show(value: object, limit: int = 60) -> str:
    try:
        text = repr(value)
    except Exception:  # a caller's object whose repr raises
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _scalar_text(value: object) -> str | None:
    """MLflow's text for a scalar param value (str, int, float, bool, None), else None."""
    if value is None or isinstance(value, str | bool | int | float):
        return str(value)
    return None


def params_of(
    *,
    environment: object,
    task_chars: int | None,
    params: Mapping[Any, Any],
    reject: Reject,
    skip: Callable[[str, object], None],
) -> Iterator[tuple[str, str]]:
    """The run's params: ``environment``, ``task_chars`` and every valid scalar param.

    The caller's own ``environment``/``task_chars`` entries yield to the sink's, with a warning when
    they differ; non-scalar values are skipped (as the seed documents), with a count.
    """
    own: dict[str, str] = {}
    env_text = _scalar_text(environment)
    if env_text is None:
        reject("param_not_scalar", f"environment {_show(environment)} is not a scalar; skipped")
    else:
        own["environment"] = env_text
    if task_chars is not None:
        own["task_chars"] = str(task_chars)
    seen: dict[str, str] = dict(own)
    yield from own.items()
    for key, value in params.items():
        problem = key_problem(key)
        if problem:
            reject("param_bad_key", f"param skipped: {problem}")
            continue
        text = _scalar_text(value)
        if text is None:  # documented behaviour, not an error: counted, logged at debug level
            skip(key, value)
            continue
        if len(text) > MAX_PARAM_VALUE_LENGTH:
            reject(
                "param_truncated",
                f"param {key!r}: value of {len(text)} characters truncated to "
                f"{MAX_PARAM_VALUE_LENGTH} (MLflow's limit)",
            )
            text = text[:MAX_PARAM_VALUE_LENGTH]
        if key in seen:
            if seen[key] != text:
                reject(
                    "param_conflict",
                    f"param {key!r}={_show(text)} conflicts with {_show(seen[key])}; first kept",
                )
            continue
        seen[key] = text
        yield key, text


def tag_value(value: str, key: str, reject: Reject) -> str:
    if len(value) > MAX_TAG_VALUE_LENGTH:
        reject(
            "tag_truncated",
            f"tag {key!r}: value of {len(value)} characters truncated to {MAX_TAG_VALUE_LENGTH}",
        )
        return value[:MAX_TAG_VALUE_LENGTH]
    return value

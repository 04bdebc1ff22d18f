"""Configuration: keyword arguments, their defaults and the environment variables behind them."""

from __future__ import annotations

import enum
import math
import numbers
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ._session import check_id

DEFAULT_EXPERIMENT = "rlm-code-rlm"
COMPONENT_TAG = "rlm-code-rlm"

ENV_ENABLED = "DSPY_RLM_MLFLOW_ENABLED"
ENV_EXPERIMENT = "DSPY_RLM_MLFLOW_EXPERIMENT"
ENV_TRACKING_URI = "MLFLOW_TRACKING_URI"
ENV_QUEUE_SIZE = "RLM_MLFLOW_QUEUE_SIZE"
ENV_OVERFLOW = "RLM_MLFLOW_OVERFLOW"
ENV_FLUSH_INTERVAL = "RLM_MLFLOW_FLUSH_INTERVAL"
ENV_SHUTDOWN_TIMEOUT = "RLM_MLFLOW_SHUTDOWN_TIMEOUT"
ENV_REQUEST_TIMEOUT = "RLM_MLFLOW_REQUEST_TIMEOUT"
ENV_RETRY_DEADLINE = "RLM_MLFLOW_RETRY_DEADLINE"
ENV_JOURNAL = "RLM_MLFLOW_JOURNAL"
ENV_JOURNAL_DIR = "RLM_MLFLOW_JOURNAL_DIR"
ENV_JOURNAL_FSYNC = "RLM_MLFLOW_JOURNAL_FSYNC"
ENV_TRACES = "RLM_MLFLOW_TRACES"
ENV_SPAN_BUDGET = "RLM_MLFLOW_SPAN_BUDGET"
#: Spans in one trace at most (see docs/traces.md, "Span budget", for how it was chosen).
DEFAULT_SPAN_BUDGET = 100
TRACE_MODES = ("full", "metadata", "off")
ENV_HANDLE_SIGNALS = "RLM_MLFLOW_HANDLE_SIGNALS"
ENV_SESSION = "RLM_MLFLOW_SESSION"
ENV_USER = "RLM_MLFLOW_USER"

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


class Overflow(enum.StrEnum):
    """What the sink does with a step event when its queue is full.

    Run starts and run ends are never dropped, whatever the policy.
    """

    #: Evict the oldest queued step event to make room for the new one (keeps the latest data).
    DROP_OLDEST = "drop_oldest"
    #: Refuse the new step event (keeps the earliest data).
    DROP_NEWEST = "drop_newest"


@dataclass(frozen=True, slots=True)
class SinkConfig:
    """Every setting of an :class:`~rlm_mlflow.MLflowSink`, validated where it enters."""

    enabled: bool = False
    experiment: str = DEFAULT_EXPERIMENT
    tracking_uri: str | None = None
    queue_size: int = 10_000
    overflow: Overflow = Overflow.DROP_OLDEST
    flush_interval: float = 5.0
    shutdown_timeout: float = 10.0
    request_timeout: float = 30.0
    retry_deadline: float = 300.0
    retry_initial: float = 0.5
    retry_max_wait: float = 30.0
    batch_trigger: int = 5_000
    journal: bool = True
    journal_dir: str | None = None
    journal_fsync: bool = False
    handle_signals: bool = True
    traces: str = "full"
    span_budget: int = DEFAULT_SPAN_BUDGET  # past it, a trace's steps go into summary spans
    session: str | None = None  # root runs with no session of their own belong to this one
    user: str | None = None

    def __post_init__(self) -> None:
        for name, low, allow_zero in _DURATIONS:
            object.__setattr__(self, name, _seconds(name, getattr(self, name), low, allow_zero))
        for name in _COUNTS:
            object.__setattr__(self, name, _count(name, getattr(self, name)))
        if self.retry_max_wait < self.retry_initial:
            raise ValueError("retry_max_wait cannot be smaller than retry_initial")
        if not isinstance(self.experiment, str) or not self.experiment:
            raise ValueError("experiment must be a non-empty string")
        if self.traces not in TRACE_MODES:
            raise ValueError(f"traces must be one of {', '.join(TRACE_MODES)}, not {self.traces!r}")
        object.__setattr__(self, "overflow", Overflow(self.overflow))
        object.__setattr__(self, "session", check_id("session", self.session))
        object.__setattr__(self, "user", check_id("user", self.user))

    def with_changes(self, **changes: Any) -> SinkConfig:
        return replace(self, **changes)


#: The longest any duration may be: longer ones are a mistake, and some clocks overflow.
MAX_SECONDS = 7 * 24 * 3600.0
#: The largest queue size or batch trigger.
MAX_COUNT = 2**62
# (setting, smallest value, whether the smallest value itself is allowed)
_DURATIONS = (
    ("flush_interval", 0.0, False),
    ("shutdown_timeout", 0.0, True),
    ("request_timeout", 0.0, False),
    ("retry_deadline", 0.0, True),
    ("retry_initial", 0.0, True),
    ("retry_max_wait", 0.0, True),
)
_COUNTS = ("queue_size", "batch_trigger", "span_budget")


def _seconds(name: str, value: object, low: float, allow_low: bool) -> float:
    """``value`` as a float number of seconds within range, or ValueError saying why not."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number of seconds, not {type(value).__name__}")
    seconds = float(value)
    if not math.isfinite(seconds):
        raise ValueError(f"{name} must be a finite number of seconds, not {seconds!r}")
    if seconds < low or (seconds == low and not allow_low):
        bound = "positive" if not allow_low else "zero or more"
        raise ValueError(f"{name} must be {bound}, not {seconds!r}")
    if seconds > MAX_SECONDS:
        raise ValueError(f"{name} must be at most {MAX_SECONDS:.0f} seconds, not {seconds!r}")
    return seconds


def _count(name: str, value: object) -> int:
    """``value`` as an int from 1 to :data:`MAX_COUNT`, or ValueError saying why not."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be a whole number, not {type(value).__name__}")
    count = int(value)
    if not 1 <= count <= MAX_COUNT:
        raise ValueError(f"{name} must be at least 1 and at most {MAX_COUNT}, not {count}")
    return count


def duration(name: str, value: object) -> float:
    """A duration argument outside the sink's settings (``replay(retry_deadline=...)``): a
    finite number of seconds, zero or more, at most :data:`MAX_SECONDS`; ValueError otherwise."""
    return _seconds(name, value, 0.0, True)


def call_timeout(timeout: object, default: float) -> float:
    """The ``timeout`` argument of ``flush()`` or ``close()`` in seconds: ``default`` when None,
    a negative one as 0, an infinite one as :data:`MAX_SECONDS` (waiting as long as it takes);
    NaN or anything but a number is a ValueError, raised before anything is done."""
    if timeout is None:
        return default
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise ValueError(f"timeout must be a number of seconds, not {type(timeout).__name__}")
    seconds = float(timeout)
    if math.isnan(seconds):
        raise ValueError("timeout must be a number of seconds, not nan")
    return min(max(seconds, 0.0), MAX_SECONDS)


def parse_bool(value: str | None, *, default: bool = False) -> bool:
    """Read a boolean the way the seed does: true/1/yes/on (any case) are true."""
    if value is None:
        return default
    text = value.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    return default


def why_disabled(env: Mapping[str, str]) -> str:
    """Why ``DSPY_RLM_MLFLOW_ENABLED`` leaves the sink off, quoting a value that means nothing."""
    raw = env.get(ENV_ENABLED)
    if raw is None or not raw.strip():
        return f"{ENV_ENABLED} is not set"
    if raw.strip().lower() in _FALSE:
        return f"{ENV_ENABLED}={raw!r}"
    return f"{ENV_ENABLED}={raw!r} is not a value read as true (true, 1, yes, on)"


def _env_number(env: Mapping[str, str], name: str, kind: type[float] | type[int]) -> Any:
    raw = env.get(name)
    if raw is None or not raw.strip():
        return None
    try:
        number = kind(raw.strip())
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a valid {kind.__name__}") from None
    if not math.isfinite(number):
        raise ValueError(f"{name}={raw!r} is not a finite number")
    return number


def config_from_env(env: Mapping[str, str] | None = None, **overrides: Any) -> SinkConfig:
    """Build a :class:`SinkConfig` from environment variables; keyword overrides win."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {
        "enabled": parse_bool(env.get(ENV_ENABLED)),
        "experiment": (env.get(ENV_EXPERIMENT) or "").strip() or DEFAULT_EXPERIMENT,
        "tracking_uri": (env.get(ENV_TRACKING_URI) or "").strip() or None,
    }
    numbers: dict[str, tuple[str, type[float] | type[int]]] = {
        "queue_size": (ENV_QUEUE_SIZE, int),
        "flush_interval": (ENV_FLUSH_INTERVAL, float),
        "shutdown_timeout": (ENV_SHUTDOWN_TIMEOUT, float),
        "request_timeout": (ENV_REQUEST_TIMEOUT, float),
        "retry_deadline": (ENV_RETRY_DEADLINE, float),
        "span_budget": (ENV_SPAN_BUDGET, int),
    }
    for key, (name, kind) in numbers.items():
        number = _env_number(env, name, kind)
        if number is not None:
            values[key] = number
    for key, name, default in (
        ("journal", ENV_JOURNAL, True),
        ("handle_signals", ENV_HANDLE_SIGNALS, True),
        ("journal_fsync", ENV_JOURNAL_FSYNC, False),
    ):
        if env.get(name) is not None:
            values[key] = parse_bool(env.get(name), default=default)
    for key, name in (("session", ENV_SESSION), ("user", ENV_USER)):
        text = (env.get(name) or "").strip()
        if text:
            try:
                values[key] = check_id(key, text)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
    if env.get(ENV_JOURNAL_DIR):
        values["journal_dir"] = env[ENV_JOURNAL_DIR]
    traces = (env.get(ENV_TRACES) or "").strip().lower()
    if traces:
        values["traces"] = {"true": "full", "on": "full", "false": "off", "0": "off"}.get(
            traces, traces
        )
    overflow = (env.get(ENV_OVERFLOW) or "").strip().lower()
    if overflow:
        try:
            values["overflow"] = Overflow(overflow)
        except ValueError:
            choices = ", ".join(o.value for o in Overflow)
            raise ValueError(f"{ENV_OVERFLOW}={overflow!r}: expected one of {choices}") from None
    values.update({k: v for k, v in overrides.items() if v is not None})
    return SinkConfig(**values)


_SECRET_QUERY_KEYS = re.compile(r"(token|secret|password|passwd|pwd|key|sig|signature|auth)", re.I)


def redact_uri(uri: str | None) -> str | None:
    """Hide credentials in a URI: the password of the user part and secret-looking query values."""
    if uri is None:
        return None
    try:
        parts = urlsplit(uri)
    except ValueError:
        return "<unparseable uri>"
    netloc = parts.netloc
    if "@" not in netloc and not (parts.query and _SECRET_QUERY_KEYS.search(parts.query)):
        return uri
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{host}" if ":" in userinfo else f"***@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode(
            [(k, "***" if _SECRET_QUERY_KEYS.search(k) else v) for k, v in pairs], safe="*"
        )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str, uri: str | None) -> str:
    """Remove the secret parts of ``uri`` wherever they appear in ``text`` (an error message)."""
    if not uri:
        return text
    redacted = redact_uri(uri)
    if redacted and redacted != uri:
        text = text.replace(uri, redacted)
    try:
        parts = urlsplit(uri)
    except ValueError:
        return text
    if parts.password:
        text = text.replace(parts.password, "***")
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if value and _SECRET_QUERY_KEYS.search(key):
            text = text.replace(value, "***")
    for var in ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD"):
        secret = os.environ.get(var)
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text

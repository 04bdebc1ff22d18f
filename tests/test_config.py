"""Settings are checked where they enter: every duration finite and in range, every count whole
and positive, from keyword arguments and from environment variables alike."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from rlm_mlflow import MLflowSink
from rlm_mlflow._config import MAX_SECONDS, SinkConfig, config_from_env
from rlm_mlflow.testing import MemoryTransport

DURATIONS = (
    "flush_interval",
    "shutdown_timeout",
    "request_timeout",
    "retry_deadline",
    "retry_initial",
    "retry_max_wait",
)
ENVIRONMENT = {
    "flush_interval": "RLM_MLFLOW_FLUSH_INTERVAL",
    "shutdown_timeout": "RLM_MLFLOW_SHUTDOWN_TIMEOUT",
    "request_timeout": "RLM_MLFLOW_REQUEST_TIMEOUT",
    "retry_deadline": "RLM_MLFLOW_RETRY_DEADLINE",
    "queue_size": "RLM_MLFLOW_QUEUE_SIZE",
}


def build(**settings: Any) -> SinkConfig:
    return SinkConfig(**settings)


def valid(**changes: Any) -> dict[str, Any]:
    """Changes plus what keeps the others consistent (retry_max_wait >= retry_initial)."""
    if "retry_initial" in changes and "retry_max_wait" not in changes:
        changes["retry_max_wait"] = MAX_SECONDS
    return changes


@pytest.mark.parametrize("name", DURATIONS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, -1.0, MAX_SECONDS * 2])
def test_a_duration_that_is_not_finite_or_out_of_range_is_refused(name: str, bad: float) -> None:
    with pytest.raises(ValueError, match=name):
        build(**valid(**{name: bad}))
    with pytest.raises(ValueError, match=name):
        MLflowSink(enabled=False, **valid(**{name: bad}))


@pytest.mark.parametrize("name", DURATIONS)
@pytest.mark.parametrize("bad", [True, "5", None, [1.0]])
def test_a_duration_that_is_not_a_number_is_refused(name: str, bad: Any) -> None:
    with pytest.raises(ValueError, match=f"{name} must be a number of seconds"):
        build(**{name: bad})


@pytest.mark.parametrize("name", ["flush_interval", "request_timeout"])
def test_a_zero_flush_interval_or_request_timeout_is_refused(name: str) -> None:
    """A zero request timeout made the HTTP library raise inside the worker."""
    with pytest.raises(ValueError, match=f"{name} must be positive"):
        build(**{name: 0})


@pytest.mark.parametrize("name", ["shutdown_timeout", "retry_deadline", "retry_initial"])
def test_zero_is_a_valid_value_where_it_means_do_not_wait(name: str) -> None:
    assert getattr(build(**{name: 0}), name) == 0.0


def test_valid_durations_are_kept_as_floats() -> None:
    config = SinkConfig(request_timeout=2, shutdown_timeout=MAX_SECONDS, flush_interval=0.01)
    assert config.request_timeout == 2.0
    assert type(config.request_timeout) is float
    assert config.shutdown_timeout == MAX_SECONDS


@pytest.mark.parametrize("name", ["queue_size", "batch_trigger"])
@pytest.mark.parametrize("bad", [0, -3, 2**70, 1.5, math.nan, True, "10"])
def test_a_count_that_is_not_a_positive_whole_number_is_refused(name: str, bad: Any) -> None:
    with pytest.raises(ValueError, match=name):
        build(**{name: bad})


@pytest.mark.parametrize("name", sorted(ENVIRONMENT))
@pytest.mark.parametrize("raw", ["nan", "inf", "-inf", "NaN", "1e999"])
def test_an_environment_value_that_is_not_finite_is_refused_naming_the_variable(
    name: str, raw: str
) -> None:
    variable = ENVIRONMENT[name]
    with pytest.raises(ValueError, match=variable):
        config_from_env({variable: raw})
    with pytest.raises(ValueError, match=variable):
        MLflowSink.from_env({variable: raw})


def test_an_environment_request_timeout_of_zero_is_refused() -> None:
    with pytest.raises(ValueError, match="request_timeout must be positive"):
        config_from_env({"RLM_MLFLOW_REQUEST_TIMEOUT": "0"})


def test_valid_environment_values_are_read() -> None:
    config = config_from_env(
        {
            "RLM_MLFLOW_FLUSH_INTERVAL": "0.5",
            "RLM_MLFLOW_SHUTDOWN_TIMEOUT": "0",
            "RLM_MLFLOW_REQUEST_TIMEOUT": "7",
            "RLM_MLFLOW_RETRY_DEADLINE": "60",
            "RLM_MLFLOW_QUEUE_SIZE": "123",
        }
    )
    assert (config.flush_interval, config.shutdown_timeout, config.request_timeout) == (
        0.5,
        0.0,
        7.0,
    )
    assert (config.retry_deadline, config.queue_size) == (60.0, 123)


def test_flush_and_close_take_any_timeout_but_nan_and_return() -> None:
    """An infinite timeout waits as long as it takes (it made close() raise OverflowError), a
    negative one does not wait, NaN is refused before anything is done."""
    memory = MemoryTransport()
    sink = MLflowSink(enabled=True, experiment="x", transport=memory)
    sink.on_run_start("r", task="t", environment="e", params={})
    sink.on_step("r", event={"step": 0, "reward": 1.0}, cumulative_reward=1.0)
    sink.on_run_end("r", result={"completed": True}, run_path=None)
    with pytest.raises(ValueError, match="nan"):
        sink.flush(math.nan)
    with pytest.raises(ValueError, match="nan"):
        sink.close(math.nan)
    assert sink.flush(math.inf)
    sink.flush(-1.0)
    sink.close(math.inf)
    assert memory.one("r").status == "FINISHED"
    assert sink.status()["state"] == "closed"


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0])
def test_replay_refuses_a_retry_deadline_that_is_not_finite(bad: float, tmp_path: Path) -> None:
    from rlm_mlflow import replay

    with pytest.raises(ValueError, match="retry_deadline"):
        replay(tmp_path, transport=MemoryTransport(), retry_deadline=bad)

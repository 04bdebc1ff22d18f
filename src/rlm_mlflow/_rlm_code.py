"""rlm-mlflow's sink in place of RLM Code's own MLflow sink, for ``rlm-mlflow run``.

RLM Code builds its sinks itself: ``RLMObservability.default()`` (used by every ``RLMRunner``
given no ``observability``: its CLI, TUI and MCP server) calls the ``MLflowSink`` name of
``rlm_code.rlm.observability`` with ``enabled``, ``experiment`` and ``tracking_uri`` read from
the seed's environment variables. :func:`install` points that name at :func:`rlm_code_sink`,
which builds an :class:`~rlm_mlflow.MLflowSink` from the same variables (and the ``RLM_MLFLOW_*``
ones) instead. RLM Code's own sink is then never constructed, so a run is never logged twice.

The same switch makes RLM Code's benchmarks MLflow evaluation runs: :func:`install` wraps
``run_benchmark`` of RLM Code's ``BenchmarkManagerMixin`` (``RLMRunner``'s) in a
:class:`~rlm_mlflow.Benchmark` when the runner's observability holds an rlm-mlflow sink. The
preset, mode and limits are the evaluation run's params, each case's run one of its cases (its
expected answer an Expectation, RLM Code's ``answer_match`` a Feedback), RLM Code's summary file
its artifact. A runner without our sink runs its benchmark as before.

The launcher's import hook (``_bootstrap/sitecustomize.py``) calls :func:`install` as soon as
RLM Code's module is loaded, before anything can use it. Nothing here may break the program:
:func:`install` refuses (raises, and the hook logs a warning) when the module does not look like
the RLM Code it knows, and :func:`rlm_code_sink` falls back to RLM Code's own sink, with a
warning, if rlm-mlflow's cannot be built.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
from datetime import UTC, datetime
from types import ModuleType
from typing import Any

from ._benchmark import Benchmark
from ._config import config_from_env
from ._sink import MLflowSink

logger = logging.getLogger("rlm_mlflow")

#: The attribute of RLM Code's module that keeps its own sink class once it is replaced.
ORIGINAL = "_rlm_mlflow_replaced_sink"
#: RLM Code's module with ``BenchmarkManagerMixin.run_benchmark``.
BENCHMARKS = "rlm_code.rlm.benchmark_manager"
#: ``run_benchmark``'s keyword arguments logged as the evaluation run's params.
BENCHMARK_PARAMS = (
    "preset",
    "mode",
    "limit",
    "environment",
    "framework",
    "max_steps",
    "exec_timeout",
    "branch_width",
    "sub_model",
    "sub_provider",
    "harness_strategy",
    "include_mcp",
)
#: The parameters of RLM Code's ``MLflowSink`` that ``RLMObservability.default()`` passes.
EXPECTED = ("enabled", "experiment", "tracking_uri")


def rlm_code_sink(
    enabled: bool = False,
    experiment: str | None = None,
    tracking_uri: str | None = None,
    *args: Any,
    **kwargs: Any,
) -> Any:
    """RLM Code's ``MLflowSink(enabled, experiment, tracking_uri)``, answered by rlm-mlflow.

    The environment (``DSPY_RLM_MLFLOW_*``, ``MLFLOW_TRACKING_URI``, ``RLM_MLFLOW_*``) configures
    the sink as :meth:`MLflowSink.from_env` does; the arguments RLM Code passes (read from the
    same variables) win, as they would for its own sink. If the sink cannot be built (a bad
    ``RLM_MLFLOW_*`` value, say), RLM Code's own sink is built instead and a warning says why.
    """
    try:
        config = config_from_env(
            enabled=bool(enabled),
            experiment=experiment or None,
            tracking_uri=tracking_uri or None,
        )
        sink = MLflowSink(config=config)
    except Exception as exc:
        original = _original()
        logger.warning(
            "rlm-mlflow run: rlm-mlflow's sink could not be built (%s: %s); "
            "RLM Code's own MLflow sink is used instead",
            type(exc).__name__,
            exc,
        )
        if original is None:
            raise
        return original(enabled, experiment, tracking_uri, *args, **kwargs)
    name = kwargs.get("name", args[0] if args else None)
    if isinstance(name, str) and name != sink.name:
        sink.name = name
    return sink


_module: list[ModuleType] = []


def _original() -> Any:
    return getattr(_module[0], ORIGINAL, None) if _module else None


def install(module: ModuleType) -> None:
    """Point ``module.MLflowSink`` (RLM Code's) at :func:`rlm_code_sink`.

    Raises ``LookupError`` and changes nothing when the module lacks what this relies on: an
    ``MLflowSink`` taking ``enabled``, ``experiment`` and ``tracking_uri``, and
    ``RLMObservability.default``.
    """
    current = getattr(module, "MLflowSink", None)
    if current is rlm_code_sink:
        return
    observability = getattr(module, "RLMObservability", None)
    if current is None or not callable(getattr(observability, "default", None)):
        raise LookupError(
            f"{module.__name__} has no MLflowSink or no RLMObservability.default: "
            "this version of RLM Code is not supported"
        )
    try:
        parameters = inspect.signature(current).parameters
    except (TypeError, ValueError) as exc:
        raise LookupError(f"cannot read the signature of RLM Code's MLflowSink: {exc}") from None
    missing = [name for name in EXPECTED if name not in parameters]
    if missing:
        raise LookupError(
            f"RLM Code's MLflowSink takes no {', '.join(missing)}: "
            "this version of RLM Code is not supported"
        )
    setattr(module, ORIGINAL, current)
    module.MLflowSink = rlm_code_sink  # type: ignore[attr-defined]
    _module[:] = [module]
    logger.info("rlm-mlflow run: RLM Code's MLflow sink is rlm-mlflow's")
    try:
        install_benchmarks(importlib.import_module(BENCHMARKS))
    except Exception as exc:  # the sink is in place: benchmarks stay RLM Code's own
        logger.warning(
            "rlm-mlflow run: RLM Code's benchmarks are not logged as evaluation runs (%s: %s)",
            type(exc).__name__,
            exc,
        )


def install_benchmarks(module: ModuleType) -> None:
    """Wrap ``run_benchmark`` of ``module.BenchmarkManagerMixin`` (see the module docstring).

    Raises ``LookupError`` and changes nothing when there is no such method."""
    mixin = getattr(module, "BenchmarkManagerMixin", None)
    original = getattr(mixin, "run_benchmark", None)
    if mixin is None or not callable(original):
        raise LookupError(f"{module.__name__} has no BenchmarkManagerMixin.run_benchmark")
    if getattr(original, "_rlm_mlflow", False):
        return

    @functools.wraps(original)
    def run_benchmark(self: Any, *args: Any, **kwargs: Any) -> Any:
        bench = _benchmark_of(self, kwargs)
        if bench is None:
            return original(self, *args, **kwargs)
        with bench:
            result = original(self, *args, **kwargs)
            _record(bench, result)
        return result

    run_benchmark._rlm_mlflow = True  # type: ignore[attr-defined]
    mixin.run_benchmark = run_benchmark


def _benchmark_of(runner: Any, kwargs: dict[str, Any]) -> Benchmark | None:
    """A benchmark for this call of ``run_benchmark``, when the runner has our sink."""
    try:
        sinks = getattr(getattr(runner, "observability", None), "sinks", None) or []
        sink = next((s for s in sinks if isinstance(s, MLflowSink)), None)
        if sink is None:
            return None
        preset = str(kwargs.get("preset") or "dspy_quick")
        mode = str(kwargs.get("mode") or "native")
        params: dict[str, Any] = {
            name: kwargs[name]
            for name in BENCHMARK_PARAMS
            if kwargs.get(name) is not None and type(kwargs[name]) in (str, int, float, bool)
        }
        params.setdefault("preset", preset)
        params.setdefault("mode", mode)
        model = getattr(getattr(runner, "llm_connector", None), "current_model", None)
        if isinstance(model, str) and model:
            params["model"] = model
        packs = kwargs.get("pack_paths")
        if packs:
            params["pack_paths"] = ", ".join(str(path) for path in packs)
        # RLM Code names its benchmarks by the microsecond too: two in one second stay apart.
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S-%f")
        return Benchmark(sink, f"{preset}-{mode}-{stamp}", params=params, dataset=preset)
    except Exception as exc:
        logger.warning("rlm-mlflow: this benchmark is not logged as an evaluation run (%s)", exc)
        return None


def _record(bench: Benchmark, result: Any) -> None:
    """Each case's expected answer and RLM Code's ``answer_match``; the summary file."""
    try:
        for case in getattr(result, "case_results", None) or ():
            run_id = case.get("run_id") if isinstance(case, dict) else None
            if not isinstance(run_id, str):
                continue
            expected, match = case.get("expected_answer"), case.get("answer_match")
            rationale = None
            if expected is not None and isinstance(match, bool):
                rationale = "the expected answer is in the final response" if match else None
            bench.record(
                run_id, expected=expected, verdict=match, judge="answer_match", rationale=rationale
            )
        summary = getattr(result, "summary_path", None)
        if summary is not None:
            bench.report = summary
    except Exception as exc:
        logger.warning("rlm-mlflow: a benchmark's cases could not be read (%s)", exc)

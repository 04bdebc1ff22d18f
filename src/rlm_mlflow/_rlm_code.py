"""rlm-mlflow's sink in place of RLM Code's own MLflow sink, for ``rlm-mlflow run``.

RLM Code builds its sinks itself: ``RLMObservability.default()`` (used by every ``RLMRunner``
given no ``observability``: its CLI, TUI and MCP server) calls the ``MLflowSink`` name of
``rlm_code.rlm.observability`` with ``enabled``, ``experiment`` and ``tracking_uri`` read from
the seed's environment variables. :func:`install` points that name at :func:`rlm_code_sink`,
which builds an :class:`~rlm_mlflow.MLflowSink` from the same variables (and the ``RLM_MLFLOW_*``
ones) instead. RLM Code's own sink is then never constructed, so a run is never logged twice.

The launcher's import hook (``_bootstrap/sitecustomize.py``) calls :func:`install` as soon as
RLM Code's module is loaded, before anything can use it. Nothing here may break the program:
:func:`install` refuses (raises, and the hook logs a warning) when the module does not look like
the RLM Code it knows, and :func:`rlm_code_sink` falls back to RLM Code's own sink, with a
warning, if rlm-mlflow's cannot be built.
"""

from __future__ import annotations

import inspect
import logging
from types import ModuleType
from typing import Any

from ._config import config_from_env
from ._sink import MLflowSink

logger = logging.getLogger("rlm_mlflow")

#: The attribute of RLM Code's module that keeps its own sink class once it is replaced.
ORIGINAL = "_rlm_mlflow_replaced_sink"
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

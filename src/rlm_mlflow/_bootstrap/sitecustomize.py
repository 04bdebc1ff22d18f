"""Run by Python at start-up in every process that ``rlm-mlflow run`` starts.

``rlm-mlflow run`` puts this folder first on ``PYTHONPATH``, so Python's ``site`` module imports
this file instead of any other ``sitecustomize``. It registers an import hook and runs the
``sitecustomize`` it hides, if there is one; nothing else. The hook compares the name of each
module being imported with one string: a process that never imports RLM Code pays nothing more,
and imports nothing of rlm_mlflow. When ``rlm_code.rlm.observability`` is imported, the hook lets
it load as usual, then hands it to :func:`rlm_mlflow._rlm_code.install`, which puts rlm-mlflow's
sink in place of RLM Code's own MLflow sink. Whatever goes wrong is logged as a warning, and RLM
Code is left as it was: the program always runs.

This file uses the standard library only, and imports only what start-up has imported already.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from types import ModuleType
    from typing import Any

TARGET = "rlm_code.rlm.observability"
HERE = os.path.dirname(os.path.abspath(__file__))


def _warn(what: str, exc: BaseException) -> None:
    try:
        import logging

        logging.getLogger("rlm_mlflow").warning(
            "rlm-mlflow run: %s (%s: %s); RLM Code is left as it is",
            what,
            type(exc).__name__,
            exc,
        )
    except Exception:  # never let a warning break the program
        return


class _Loader:
    """The real loader of RLM Code's observability module, and then the swap."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: Any) -> ModuleType | None:
        create = getattr(self._loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)  # RLM Code's own errors are its own: not caught
        try:
            from rlm_mlflow._rlm_code import install

            install(module)
        except Exception as exc:
            _warn("could not put rlm-mlflow's sink in place of RLM Code's MLflow sink", exc)

    def __getattr__(self, name: str) -> Any:  # get_source, get_resource_reader, is_package, ...
        return getattr(self._loader, name)


class RLMCodeHook:
    """A meta path finder that answers for one module only, once."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != TARGET:
            return None
        try:
            if self in sys.meta_path:
                sys.meta_path.remove(self)  # once found, the hook is no longer needed
            for finder in sys.meta_path:
                find = getattr(finder, "find_spec", None)
                if find is None:
                    continue
                spec = find(fullname, path, target)
                if spec is not None:
                    break
            else:
                return None
            if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = _Loader(spec.loader)
            return spec
        except Exception as exc:
            _warn("the import hook failed", exc)
            return None


def _chain() -> None:
    """Run the ``sitecustomize`` that this one hides on ``sys.path``, as Python would have."""
    import importlib

    ours = sys.modules.pop("sitecustomize", None)
    # The program sees the sys.path it would have had without ``rlm-mlflow run``.
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]
    try:
        importlib.import_module("sitecustomize")  # the other one, if any
    except ImportError as exc:
        if exc.name != "sitecustomize":
            raise  # as without us: Python's site module reports it, and the program runs
        if ours is not None:
            sys.modules["sitecustomize"] = ours


if not any(type(f).__name__ == "RLMCodeHook" for f in sys.meta_path):
    sys.meta_path.insert(0, RLMCodeHook())
_chain()

"""Getting the real RLM Code (``rlm-code`` on PyPI) into the test virtualenv, once."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from typing import Any

import pytest

RLM_CODE = "rlm-code==0.1.13"


def _pip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def import_or_install() -> Any:
    """``rlm_code.rlm.runner``, installed into this virtualenv first when it is missing.

    ``--no-deps`` keeps CI fast: rlm-code's declared dependencies (dspy, mcp, ...) are not needed
    by the runner. On CI a failed install fails the test; elsewhere (no network) it skips.
    """
    try:
        return importlib.import_module("rlm_code.rlm.runner")
    except ImportError:
        pass
    for args in (("--no-deps", RLM_CODE), ("pyyaml", "rich")):
        done = _pip(*args)
        if done.returncode != 0:
            reason = f"pip install {' '.join(args)} failed: {done.stderr.strip()[-500:]}"
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail(reason)
            pytest.skip(reason)
    importlib.invalidate_caches()
    return importlib.import_module("rlm_code.rlm.runner")


def own_tests(folder: Any) -> Any:
    """RLM Code's own test folder, from its sdist (downloaded into ``folder`` once).

    On CI a failed download fails the test; elsewhere (no network) it skips.
    """
    import tarfile
    from pathlib import Path

    base = Path(folder)
    tests = base / RLM_CODE.replace("==", "-").replace("-", "_", 1) / "tests"
    if tests.is_dir():
        return tests
    download = ["download", "--quiet", "--no-deps", "--no-binary", ":all:", "--dest", str(base)]
    done = subprocess.run(
        [sys.executable, "-m", "pip", *download, RLM_CODE],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    archives = sorted(base.glob("rlm_code-*.tar.gz"))
    if done.returncode != 0 or not archives:
        reason = f"pip download {RLM_CODE} (sdist) failed: {done.stderr.strip()[-500:]}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    with tarfile.open(archives[0]) as archive:
        archive.extractall(base, filter="data")
    assert tests.is_dir(), f"no tests folder in {archives[0].name}"
    return tests

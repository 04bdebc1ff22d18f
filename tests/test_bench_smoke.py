"""The benchmark script runs end to end in quick mode and reports all three sinks.

No timing is asserted: the figures depend on the machine. This only checks that
``scripts/bench --quick`` works and writes the table it promises.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "scripts" / "bench"


@pytest.mark.slow
def test_quick_benchmark_writes_the_table_with_all_three_sinks(tmp_path: Path) -> None:
    output = tmp_path / "perf.md"
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    # The script prefers the project's .venv; fall back to the interpreter running the tests.
    if os.access(BENCH, os.X_OK):
        command = [str(BENCH)]
    else:
        command = [sys.executable, "-m", "benchkit"]
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(ROOT / "scripts"), env.get("PYTHONPATH")) if p
        )
    completed = subprocess.run(
        [*command, "--quick", "--output", str(output)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    text = output.read_text(encoding="utf-8")
    assert "## The three sinks on the same workload" in text
    section = text.split("## The three sinks on the same workload", 1)[1]
    table = next(block for block in section.split("\n\n") if block.startswith("| "))
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    for sink in (
        "seed: fluent API, synchronous",
        "MLflow async logging (synchronous=False)",
        "rlm_mlflow.MLflowSink",
    ):
        assert any(row.startswith(f"| {sink} |") for row in rows), f"no row for {sink}:\n{table}"
    assert "## Targets" in text
    assert "## Drain in the spilling regime" in text
    assert "| hook p99 <= 20 us in every regime |" in text
    regimes = text.split("## Hook latency under pressure, by regime", 1)[1]
    for regime in ("server up", "200 ms latency", "unreachable", "queue spilling"):
        assert f"| {regime} |" in regimes
        assert f"| {regime}, journal=False |" in regimes
    assert "| seed: fluent API, synchronous |" in completed.stdout  # the table is printed too

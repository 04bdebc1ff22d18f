"""The benchmark runs end to end and writes the tables it promises.

No timing is asserted: the figures depend on the machine. The end-to-end test runs every section
with the smallest plan (``--plan smoke``); the others check, without a server, how the report
decides whether a regime was entered.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "scripts" / "bench"
sys.path.insert(0, str(ROOT / "scripts"))

from benchkit import cli as bench_cli  # noqa: E402
from benchkit.measure import summarize_traces  # noqa: E402
from benchkit.targets import regime_entered  # noqa: E402
from benchkit.workloads import TraceWorkload  # noqa: E402

#: Generous: the smoke plan takes about a minute on a quiet machine, several on a busy one.
BENCH_TIMEOUT = 1200


def run_stopped_if_over(
    command: Sequence[str], env: dict[str, str], what: str
) -> subprocess.CompletedProcess[str]:
    """``command`` in its own session; past BENCH_TIMEOUT, SIGTERM, not SIGKILL: the script then
    stops the MLflow server it started (a server of its own session, which a kill of the script
    alone would leave running)."""
    process = subprocess.Popen(
        list(command),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=BENCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            out, err = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            out, err = process.communicate()
        pytest.fail(f"{what} ran over {BENCH_TIMEOUT} s and was stopped\n{out}\n{err}")
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def bench(*args: str) -> subprocess.CompletedProcess[str]:
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
    return run_stopped_if_over([*command, *args], env, "the bench")


def table_after(text: str, heading: str, index: int = 0) -> list[str]:
    """The rows of the ``index``-th table after ``heading``."""
    section = text.split(heading, 1)[1]
    tables = [block for block in section.split("\n\n") if block.startswith("| ")]
    return tables[index].splitlines()[2:]


@pytest.mark.slow
def test_smoke_plan_writes_every_table(tmp_path: Path) -> None:
    output, results = tmp_path / "perf.md", tmp_path / "results.json"
    completed = bench("--plan", "smoke", "--output", str(output), "--json", str(results))
    assert completed.returncode == 0, completed.stderr[-4000:]
    text = output.read_text(encoding="utf-8")
    assert "| seed: fluent API, synchronous |" in completed.stdout  # the report is printed too

    sinks = table_after(text, "## The three sinks on the same workload")
    for sink in (
        "seed: fluent API, synchronous",
        "MLflow async logging (synchronous=False)",
        "rlm_mlflow.MLflowSink",
    ):
        assert any(row.startswith(f"| {sink} |") for row in sinks), f"no row for {sink}"

    targets = "\n".join(table_after(text, "## Targets"))
    for target in ("hook p99 <= 20 us in every regime", "drain >= 90% of the raw ceiling"):
        assert target in targets

    regimes = "## Hook latency under pressure, by regime"
    latencies, proof = table_after(text, regimes, 0), table_after(text, regimes, 1)
    for name in ("unreachable", "queue spilling"):  # the smoke plan's regimes
        for label in (name, f"{name}, journal=False"):
            assert any(row.startswith(f"| {label} |") for row in latencies), label
            row = next(row for row in proof if row.startswith(f"| {label} |"))
            assert "| yes: " in row or "| NO: " in row, row

    drain = table_after(text, "## Drain in the spilling regime")
    assert [row.split(" | ")[:2] for row in drain] == [
        ["| spilling", "off"],
        ["| not spilling", "off"],
        ["| spilling, traces on", "on"],
    ]
    for heading in ("## Hook cost in isolation", "## Latency sweep", "## Concurrency sweep"):
        assert heading in text

    for target in (
        "hook p99 <= 30 us with rich step events (traces)",
        "every span read back exactly once (traces)",
        "SIGTERM right after the last hook: every span in MLflow",
    ):
        assert target in targets
    traces = "## Traces: RLM Code's step events as MLflow traces"
    hooks, drained, exits = (table_after(text, traces, i) for i in range(3))
    for rows in (hooks, drained):
        assert {row.split(" | ")[1] for row in rows} == {"MLflow tracing", "rlm_mlflow"}
    assert all(" traces, " in row.split(" | ")[-1] for row in drained)  # read back
    assert [row.split(" | ")[:2] for row in exits] == [
        ["| MLflow tracing", "SIGTERM"],
        ["| rlm_mlflow", "SIGTERM"],
    ]
    assert "replay sent" in exits[1]  # ours' journal was replayed after the SIGTERM

    # The report is rendered from the results alone: saved results give the same report.
    again = tmp_path / "again" / "perf.md"
    rendered = bench("--report-from", str(results), "--output", str(again))
    assert rendered.returncode == 0, rendered.stderr[-4000:]
    assert again.read_text(encoding="utf-8") == text
    assert json.loads(results.read_text(encoding="utf-8"))["meta"]["plan"] == "smoke"


def regime_row(**changes: Any) -> dict[str, Any]:
    """A regime result as the regime task returns it: the queue full, spilling, worker sending."""
    status = {"queue_capacity": 10_000, "queue_depth": 0, "sent": 1_253, "pending": 8_757}
    row: dict[str, Any] = {
        "status_before": status,
        "status_after": status,
        "status": status,
        "window": {"accepted": 16_016, "sent": 0, "spilled": 6_006, "dropped": 0, "requests": 0},
        "fill": {"ready_when": "worker sending", "ready": True},
        "queue_peak_sampled": 10_010,
        "unreachable": False,
    }
    row.update(changes)
    return row


def test_a_regime_whose_queue_spilled_under_the_timed_hooks_was_entered() -> None:
    entered, evidence = regime_entered(regime_row())
    assert entered
    assert "6,006 of the timed events spilled" in evidence


def test_a_regime_whose_queue_never_filled_is_flagged() -> None:
    quiet = {"accepted": 1_200, "sent": 1_200, "spilled": 0, "dropped": 0, "requests": 3}
    entered, evidence = regime_entered(regime_row(window=quiet, queue_peak_sampled=1_208))
    assert not entered
    assert evidence.startswith("NO: the queue was not full")


def test_an_unreachable_regime_that_sent_events_is_flagged() -> None:
    sent = {"queue_capacity": 10_000, "sent": 40}
    entered, evidence = regime_entered(regime_row(unreachable=True, status=sent))
    assert not entered
    assert "the server was reachable" in evidence


def test_a_spilling_regime_must_find_the_worker_reading_back() -> None:
    fill = {"ready_when": "worker reading back", "ready": False}
    entered, evidence = regime_entered(regime_row(fill=fill))
    assert not entered
    assert "gave up waiting for 'worker reading back'" in evidence


def test_a_trace_workload_makes_the_spans_it_promises() -> None:
    """One span per run and per step, and a model span per delegating step."""
    workload = TraceWorkload(runs=2, threads=1, steps=7, delegations=2, children=2, child_steps=3)
    calls = [call for script in workload.scripts(Path(), "t") for call in script]
    steps = [call.kwargs["event"] for call in calls if call.hook == "on_step"]
    delegating = [event for event in steps if event["action"]["action"] == "delegate"]
    starts = [call for call in calls if call.hook == "on_run_start"]
    assert len(starts) + len(steps) + len(delegating) == workload.spans
    assert len(steps) == workload.total_steps
    assert len(starts) == workload.total_runs
    code = next(event for event in steps if event["action"]["action"] == "run_python")
    assert len(code["action"]["code"]) == workload.code_chars
    assert len(code["observation"]["stdout"]) == workload.stdout_chars
    # A delegating step comes after its children ended, its usage counting theirs.
    first = delegating[0]
    children = [e for e in steps if e["parent_run_id"] == first["run_id"]]
    assert children
    used = sum(
        e["usage"]["prompt_tokens"] for e in children[: workload.children * workload.child_steps]
    )
    assert first["usage"]["prompt_tokens"] > used


def fake_trace(spans: Sequence[tuple[str, str | None, str]], run_id: str = "r") -> Any:
    """What search_traces returns, as far as the read-back looks: (span id, parent id, name)."""
    return SimpleNamespace(
        info=SimpleNamespace(tags={"run_id": run_id}, state="OK"),
        data=SimpleNamespace(
            spans=[SimpleNamespace(span_id=i, parent_id=p, name=n) for i, p, n in spans]
        ),
    )


def test_the_trace_read_back_counts_each_span_once_and_flags_repeats() -> None:
    tree = [("a", None, "r"), ("b", "a", "step 1"), ("c", "a", "step 2")]
    clean = summarize_traces([fake_trace(tree), fake_trace(tree, "warm-up")], 3, "warm-up")
    assert (clean["traces"], clean["spans"], clean["duplicates"]) == (1, 3, 0)
    assert clean["skipped"] == 1
    # The same step under another span id (a replay with fresh ids), and the same id twice.
    again = summarize_traces([fake_trace([*tree, ("d", "a", "step 2"), tree[1]])], 3, "warm-up")
    assert again["duplicates"] == 2
    assert again["incomplete_traces"] == 1


def test_spans_whose_parent_is_missing_are_not_taken_for_repeats() -> None:
    """A half-exported trace: two child runs' "step 1" with their parents not there."""
    half = [("s1", "child-a", "step 1"), ("s2", "child-b", "step 1")]
    summary = summarize_traces([fake_trace(half)], 5, "warm-up")
    assert summary["duplicates"] == 0
    assert summary["incomplete_traces"] == 1


# ---------------------------------------------------------------------------------------------
# scripts/bench_scale.py: the sink at the sizes services reach
# ---------------------------------------------------------------------------------------------

import bench_scale  # noqa: E402

SCALE = ROOT / "scripts" / "bench_scale.py"


def scale(*args: str) -> subprocess.CompletedProcess[str]:
    """``scripts/bench_scale.py`` in its own session, stopped by SIGTERM (which stops the
    server it started) if it runs over."""
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    return run_stopped_if_over([sys.executable, str(SCALE), *args], env, "bench_scale")


def scale_rows(text: str) -> dict[str, list[str]]:
    """The targets table of the scale section: target -> [measured, met?]."""
    section = text.split(bench_scale.MARK_BEGIN, 1)[1].split(bench_scale.MARK_END, 1)[0]
    rows = table_after(section, bench_scale.HEADING)
    cells = [row.strip("| ").split(" | ") for row in rows]
    return {cell[0]: cell[1:] for cell in cells}


@pytest.mark.slow
def test_scale_smoke_plan_measures_every_row_and_replaces_its_section(tmp_path: Path) -> None:
    output, results = tmp_path / "perf.md", tmp_path / "scale.json"
    stale = f"{bench_scale.MARK_BEGIN}\n{bench_scale.HEADING}\n\nstale figures\n"
    output.write_text(f"# Performance\n\nkept\n\n{stale}{bench_scale.MARK_END}\n\n## After\n")
    completed = scale("--plan", "smoke", "--output", str(output), "--json", str(results))
    assert completed.returncode == 0, completed.stderr[-4000:]
    text = output.read_text(encoding="utf-8")
    assert "stale figures" not in text
    assert text.startswith("# Performance\n\nkept\n\n")
    assert text.count(bench_scale.MARK_BEGIN) == 1
    assert text.rstrip().endswith("## After")

    rows = scale_rows(text)
    assert all(met in ("yes", "**no**") for _, met in rows.values()), rows  # each one measured
    for start in (
        "300-step run, traces on",
        "its trace opens",
        "hook p99 no worse",
        "replay of 3 runs x 10 steps",
        "replay: >=",
        "replay: <=",
        "16 runs x 5 steps from 8 threads",
        "3 sinks dropped without",
        "`on_step` p99 <= 30 us",
        "time to visibility at 2 concurrent run(s)",
    ):
        assert any(target.startswith(start) for target in rows), start
    # The rows bound by the server carry the same work done by a minimal MlflowClient loop.
    ended = next(v for t, v in rows.items() if t.startswith("... every run ended"))
    assert "a minimal `MlflowClient` loop ends" in ended[0], ended
    visible = next(v for t, v in rows.items() if t.startswith("time to visibility at 2"))
    assert "a minimal `MlflowClient` loop sending the same" in visible[0], visible
    # Correctness, not speed: what was journaled and killed is in MLflow once, after replay.
    once = {t: v for t, v in rows.items() if "exactly once" in t}
    assert len(once) == 3
    assert all(met == "yes" for _, met in once.values()), once
    assert json.loads(results.read_text(encoding="utf-8"))["meta"]["plan"] == "smoke"

    # The section renders from the saved results alone.
    again = tmp_path / "again.md"
    rendered = scale("--report-from", str(results), "--output", str(again))
    assert rendered.returncode == 0, rendered.stderr[-4000:]
    assert scale_rows(again.read_text(encoding="utf-8")) == rows


def test_the_scale_section_replaces_its_markers_or_goes_at_the_end() -> None:
    section = f"{bench_scale.MARK_BEGIN}\nnew\n{bench_scale.MARK_END}\n"
    old = f"intro\n\n{bench_scale.MARK_BEGIN}\nold\n{bench_scale.MARK_END}\n\n## Later\n"
    assert bench_scale.write_section(old, section) == f"intro\n\n{section}\n## Later\n"
    assert bench_scale.write_section("intro\n", section) == f"intro\n\n{section}"
    assert bench_scale.write_section("", section).strip() == section.strip()


def test_a_scale_section_that_failed_says_not_measured_instead_of_a_verdict() -> None:
    results = {
        "meta": {
            "command": "scripts/bench_scale.py --plan smoke",
            "when": "now",
            "plan": "smoke",
            "python": "3.11",
            "mlflow": "3",
        },
        "long": {"error": "RuntimeError: child long failed"},
    }
    text = bench_scale.render(results)
    rows = scale_rows(text)
    failed = next(v for t, v in rows.items() if t.startswith("300-step run"))
    assert failed == ["not measured (RuntimeError: child long failed)", "-"]
    assert all(met == "-" for _, met in rows.values())


def test_the_report_keeps_what_other_scripts_wrote_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """scripts/bench rewrites its own report and keeps what follows its end marker (the
    sections scripts/visibility.py and scripts/bench_scale.py write, with their prose)."""
    output = tmp_path / "perf.md"
    tail = "## Time to visibility\n\n<!-- visibility:begin -->\nrows\n<!-- visibility:end -->\n"
    output.write_text(f"# old report\n\n{bench_cli.REPORT_END}\n\n{tail}", encoding="utf-8")
    monkeypatch.setattr(bench_cli, "render", lambda results, plot_path=None: "# new report\n")
    monkeypatch.setattr(bench_cli, "plot", lambda results, path: False)
    bench_cli.write_report({}, output)
    text = output.read_text(encoding="utf-8")
    assert text.startswith("# new report\n")
    assert "# old report" not in text
    assert text.endswith(f"{bench_cli.REPORT_END}\n\n{tail}")
    bench_cli.write_report({}, output)  # again: the same file
    assert output.read_text(encoding="utf-8") == text

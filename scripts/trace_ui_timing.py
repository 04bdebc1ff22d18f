"""How long a trace of N spans takes to open: MLflow's REST ``get_trace`` and the real UI.

Starts a real ``mlflow server`` (sqlite) in a temporary folder, writes one RLM run of N - 1
RLM Code-shaped steps through the sink for each N (one trace of N spans: the run and its
steps, the span budget lifted), then times, for each trace:

- ``get_trace``: ``MlflowClient.get_trace`` (a REST call and the parse), median of three;
- the UI: headless Chromium (Playwright, as ``scripts/screenshot.py``) on the experiment's
  Traces page, from asking for the trace (``?traceId=``) until its span tree shows its first
  step; median of three, the drawer closed in between.

Prints a Markdown table (the one in docs/traces.md, "Span budget") with the date and the
machine's load. Run: ``python scripts/trace_ui_timing.py --sizes 500 1000 2000 5000 10000``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from screenshot import CHROMIUM_FLAGS, chromium, close_hints  # noqa: E402

EXPERIMENT = "trace-ui-timing"
STDOUT = "".join(f"line {i}: value {i * i}\n" for i in range(40))  # about 700 characters


def step_event(number: int) -> dict[str, Any]:
    """A step as RLM Code's runner makes it: code, output, usage."""
    return {
        "type": "step",
        "step": number,
        "reward": 0.1,
        "action": {
            "action": "run_python",
            "code": f"values = [i * i for i in range({number})]\nprint(len(values))",
            "rationale": "count the squares",
        },
        "observation": {"success": True, "stdout": STDOUT, "stderr": "", "execution_time": 0.01},
        "usage": {"total_calls": 1, "prompt_tokens": 120, "completion_tokens": 30},
    }


def write_trace(uri: str, spans: int) -> None:
    """One root run of ``spans - 1`` steps through the sink."""
    from rlm_mlflow import MLflowSink

    run_id = f"ui-{spans}"
    sink = MLflowSink(
        enabled=True,
        experiment=EXPERIMENT,
        tracking_uri=uri,
        journal=False,
        span_budget=10 * spans,
        flush_interval=1.0,
        shutdown_timeout=600.0,
        request_timeout=300.0,
        queue_size=1_000_000,
    )
    sink.on_run_start(run_id, task="time the UI", environment="pure_rlm", params={})
    cumulative = 0.0
    for number in range(1, spans):
        cumulative += 0.1
        sink.on_step(run_id, event=step_event(number), cumulative_reward=cumulative)
    sink.on_run_end(run_id, result={"completed": True, "final_response": "done"}, run_path=None)
    if not sink.flush(600.0):
        sys.exit(f"the sink did not send the trace of {spans} spans: {sink.status()}")
    sink.close()


def find_trace(client: Any, experiment_id: str, run_id: str, spans: int) -> str:
    """The trace of ``run_id`` once all its ``spans`` are stored."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        for info in client.search_traces(
            locations=[experiment_id], include_spans=False, max_results=100
        ):
            if info.info.tags.get("run_id") == run_id:
                trace = client.get_trace(info.info.trace_id)
                if len(trace.data.spans) == spans and trace.info.state == "OK":
                    return str(info.info.trace_id)
        time.sleep(1.0)  # the server commits the last request
    sys.exit(f"the trace of {run_id} did not reach {spans} spans")


def time_rest(client: Any, trace_id: str) -> float:
    times = []
    for _ in range(3):
        began = time.perf_counter()
        client.get_trace(trace_id)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def time_ui(page: Any, traces_url: str, trace_id: str) -> float:
    """From asking for the trace to its span tree showing the first step, median of three."""
    times = []
    for _ in range(3):
        page.goto(traces_url)
        page.get_by_text("Traces").first.wait_for(timeout=120_000)
        began = time.perf_counter()
        page.goto(f"{traces_url}?traceId={trace_id}")
        drawer = page.get_by_role("dialog").last
        drawer.get_by_text(re.compile(r"^step 1: run_python$")).first.wait_for(timeout=300_000)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 1000, 2000, 5000, 10000])
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

    from mlflow import MlflowClient
    from playwright.sync_api import sync_playwright

    from rlm_mlflow.testing import local_server

    load_before = os.getloadavg()
    rows = []
    with (
        tempfile.TemporaryDirectory(prefix="rlm-mlflow-ui-timing-") as folder,
        local_server(Path(folder) / "server") as server,
    ):
        client = MlflowClient(server.uri)
        for spans in args.sizes:
            began = time.perf_counter()
            write_trace(server.uri, spans)
            written = time.perf_counter() - began
            experiment = client.get_experiment_by_name(EXPERIMENT)
            assert experiment is not None
            trace_id = find_trace(client, experiment.experiment_id, f"ui-{spans}", spans)
            rows.append([spans, trace_id, written, time_rest(client, trace_id)])
            print(f"{spans} spans: written in {written:.1f} s, get_trace {rows[-1][3]:.2f} s")
        experiment_id = experiment.experiment_id
        traces_url = f"{server.uri}/#/experiments/{experiment_id}/traces"
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium(), args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.goto(traces_url)
            page.get_by_text("Traces").first.wait_for(timeout=120_000)
            page.wait_for_timeout(2000)  # first-visit hints appear
            close_hints(page)
            for row in rows:
                row.append(time_ui(page, traces_url, row[1]))
                print(f"{row[0]} spans: UI {row[4]:.2f} s")
            browser.close()
    load_after = os.getloadavg()
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print()
    print(
        f"{now}, {os.cpu_count()} cores, load average {load_before[0]:.1f} before, "
        f"{load_after[0]:.1f} after"
    )
    print()
    print("| spans in the trace | `get_trace` (s) | UI, span tree shown (s) |")
    print("| ---: | ---: | ---: |")
    for spans, _, _, rest, ui in rows:
        print(f"| {spans:,} | {rest:.2f} | {ui:.2f} |")


if __name__ == "__main__":
    main()

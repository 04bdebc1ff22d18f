"""Take the MLflow UI screenshots of the docs: the demo's nested runs, and one RLM trace tree.

Starts a real ``mlflow server`` in a temporary folder, runs the demo into it through the sink,
and opens it in a real headless Chromium (Debian's ``chromium``, driven by Playwright):

- ``docs/img/mlflow-ui.png``: the runs view, every parent run expanded, the reward charts;
- ``docs/img/mlflow-trace.png``: the Traces view of the experiment, with the trace of a root run
  whose children delegated again open: the recursion as a span tree, one of a child's steps
  selected (the code it ran, what it printed), in the view MLflow opens by default (Pretty).

Runs are reached as a user does: the experiment, then the *Model training* toggle (the browser
remembers it, so the run pages the list links to open there too).

Run it with ``bash scripts/screenshot``; it installs what it needs.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: The run name cell's expand button, while collapsed (its icon is a plus in a square).
COLLAPSED = 'button[data-component-id$="runnamecellrenderer.tsx_46"]:has(path[d^="M7.25 7.25V4.5"])'


def chromium() -> str:
    """Debian's Chromium; installed with apt-get when missing and we are root."""
    found = shutil.which("chromium")
    if found:
        return found
    if os.geteuid() != 0:
        sys.exit("Chromium is missing: sudo apt-get install chromium")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "chromium"], check=True, env=env)
    found = shutil.which("chromium")
    if not found:
        sys.exit("apt-get installed chromium, but no chromium command was found")
    return found


def expand_all(page: Any) -> int:
    """Click every collapsed parent run until none is left (children may be parents too)."""
    clicks = 0
    while page.locator(COLLAPSED).count() and clicks < 100:
        page.locator(COLLAPSED).first.click()
        page.wait_for_timeout(200)  # let the grid re-render the rows it inserted
        clicks += 1
    return clicks


def close_hints(page: Any) -> None:
    """Close what a first visit shows: the "Detect issues" hint, the Assistant panel."""
    for name in ("Got it", "Close"):
        found = page.get_by_role("button", name=name)
        if found.count():
            found.last.click()


def capture(url: str, out: Path, width: int, height: int) -> None:
    """The runs of the experiment at ``url``, reached through the Model training toggle."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": width, "height": height})
        page.goto(url)
        page.get_by_text("Model training", exact=True).first.wait_for(timeout=60_000)
        page.wait_for_timeout(2000)  # first-visit hints appear
        close_hints(page)
        page.get_by_text("Model training", exact=True).first.click()  # remembered by the browser
        page.wait_for_selector('[data-testid="experiment-view-table-run-color"]', timeout=60_000)
        close_hints(page)
        page.locator('label:has(input[name="runs-view-mode"][value="TABLE"])').click()
        expanded = expand_all(page)
        page.locator('label:has(input[name="runs-view-mode"][value="CHART"])').click()
        page.wait_for_selector("text=cumulative_reward", timeout=60_000)
        page.wait_for_timeout(1500)  # the charts animate in
        out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out))
        browser.close()
    print(f"{out}: {width}x{height}, {expanded} parent runs expanded")


def _agents_above(span_id: str, parents: dict[str, str], agents: set[str]) -> int:
    """How many AGENT spans (runs) lie above a span: its depth in the recursion."""
    level = 0
    while span_id in parents:
        span_id = parents[span_id]
        level += span_id in agents
    return level


def deepest_trace(client: Any, experiment_id: str) -> str:
    """The trace whose recursion is the deepest (then the largest) of the experiment."""
    best: tuple[int, int, str] = (-1, -1, "")
    for trace in client.search_traces(locations=[experiment_id], max_results=200):
        spans = trace.data.spans
        parents = {span.span_id: span.parent_id for span in spans}
        agents = {span.span_id for span in spans if span.span_type == "AGENT"}

        depth = max((_agents_above(s.span_id, parents, agents) for s in spans), default=0)
        best = max(best, (depth, len(agents), trace.info.trace_id))
    if best[0] < 0:
        sys.exit("the demo made no trace")
    return best[2]


def capture_trace(server_uri: str, experiment_id: str, trace_id: str, out: Path) -> None:
    """The trace's span tree, with the deepest run's first code step selected."""
    from playwright.sync_api import sync_playwright

    traces = f"{server_uri}/#/experiments/{experiment_id}/traces"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1100})
        page.goto(traces)
        page.wait_for_selector("text=Traces", timeout=60_000)
        page.wait_for_timeout(2000)  # first-visit hints appear
        close_hints(page)
        page.goto(f"{traces}?traceId={trace_id}")
        drawer = page.get_by_role("dialog").last
        drawer.get_by_text("Spans").wait_for(timeout=60_000)
        steps = drawer.get_by_text(re.compile(r"^step \d+: run_python$"))
        boxes = [(steps.nth(i).bounding_box() or {"x": 0.0}, i) for i in range(steps.count())]
        deepest = max(boxes, key=lambda pair: (pair[0]["x"], -pair[1]))[1]
        steps.nth(deepest).click()  # its code and what it printed
        drawer.get_by_text("stdout").first.wait_for(timeout=30_000)
        # The default view (Pretty) shows the code as a code block, a comment as a comment.
        drawer.get_by_text(re.compile(r"^# step \d+: ")).first.wait_for(timeout=30_000)
        page.wait_for_timeout(800)  # the span panel settles
        out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out))
        browser.close()
    print(f"{out}: trace {trace_id}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "mlflow-ui.png")
    parser.add_argument(
        "--trace-out", type=Path, default=ROOT / "docs" / "img" / "mlflow-trace.png"
    )
    parser.add_argument("--tasks", type=int, default=6, help="root tasks of the demo")
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=1000)
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

    from mlflow import MlflowClient

    from rlm_mlflow._demo import print_report, run_demo
    from rlm_mlflow.testing import local_server

    with tempfile.TemporaryDirectory(prefix="rlm-mlflow-screenshot-") as folder:
        work = Path(folder)
        with local_server(work / "server") as server:
            report = run_demo(
                tasks=args.tasks,
                experiment="rlm-mlflow-demo",
                tracking_uri=server.uri,
                workdir=work,
            )
            print_report(report)
            experiment = MlflowClient(server.uri).get_experiment_by_name("rlm-mlflow-demo")
            assert experiment is not None
            url = f"{server.uri}/#/experiments/{experiment.experiment_id}"
            capture(url, args.out.resolve(), args.width, args.height)
            trace_id = deepest_trace(MlflowClient(server.uri), experiment.experiment_id)
            capture_trace(server.uri, experiment.experiment_id, trace_id, args.trace_out.resolve())


if __name__ == "__main__":
    main()

"""Take the MLflow UI screenshot of the docs: the demo's nested runs and their reward curves.

Starts a real ``mlflow server`` in a temporary folder, runs the demo into it through the sink,
opens the experiment in a real headless Chromium (Debian's ``chromium``, driven by Playwright),
expands every parent run, switches to the chart view and saves a PNG. Run it with
``bash scripts/screenshot``; it installs what it needs.
"""

from __future__ import annotations

import argparse
import os
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


def capture(url: str, out: Path, width: int, height: int) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": width, "height": height})
        page.goto(url)
        page.wait_for_selector('[data-testid="experiment-view-table-run-color"]', timeout=60_000)
        assistant = page.get_by_role("button", name="Close")
        if assistant.count():
            assistant.last.click()  # the MLflow Assistant side panel
        page.locator('label:has(input[name="runs-view-mode"][value="TABLE"])').click()
        expanded = expand_all(page)
        page.locator('label:has(input[name="runs-view-mode"][value="CHART"])').click()
        page.wait_for_selector("text=cumulative_reward", timeout=60_000)
        page.wait_for_timeout(1500)  # the charts animate in
        out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out))
        browser.close()
    print(f"{out}: {width}x{height}, {expanded} parent runs expanded")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "mlflow-ui.png")
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
            runs = f"#/experiments/{experiment.experiment_id}/runs"
            url = f"{server.uri}/{runs}?workflowType=machine_learning"  # "Model training"
            capture(url, args.out.resolve(), args.width, args.height)


if __name__ == "__main__":
    main()

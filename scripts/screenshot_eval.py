"""Take the docs' screenshots of rewards and benchmarks in MLflow's GenAI pages.

Starts a real ``mlflow server`` in a temporary folder, runs two benchmarks of two models (five
cases each, a scripted agent sending its hooks to the sink) through ``rlm_mlflow.benchmark``, and
opens MLflow in a real headless Chromium (Debian's ``chromium``, driven by Playwright):

- ``docs/img/mlflow-rewards.png``: the Traces table with the ``total_reward``, ``completed``,
  ``expected_response`` and ``judge`` columns;
- ``docs/img/mlflow-evaluation-compare.png``: the Evaluation runs page comparing the two
  benchmarks case by case.

Run it with ``python scripts/screenshot_eval.py`` in a virtualenv with the ``screenshot`` and
``full`` extras (``bash scripts/screenshot`` sets one up).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from screenshot import CHROMIUM_FLAGS, chromium  # noqa: E402

EXPERIMENT = "rlm-benchmarks"
CASES = [("2+2", "4"), ("3*3", "9"), ("10-7", "3"), ("12/4", "3"), ("2**5", "32")]
#: Each model's wrong answers (case indexes) and its tokens per step.
MODELS = {"model-a": ({2}, 120), "model-b": ({1, 2, 4}, 80)}


def agent(sink: Any, run_id: str, question: str, right: bool, tokens: int) -> None:
    """A scripted RLM run: three steps of code, then its answer."""
    sink.on_run_start(
        run_id, task=f"What is {question}?", environment="pure_rlm", params={"max_steps": 4}
    )
    reward = 0.0
    for step in range(3):
        usage = {"input_tokens": tokens, "output_tokens": tokens // 3}
        code = f"print({question})" if step < 2 else "FINAL(answer)"
        reward += 0.5 if right and step > 0 else 0.0
        event = {
            "step": step,
            "reward": 0.5 if right and step > 0 else 0.0,
            "usage": usage,
            "action": {"action": "run_python", "code": code},
            "observation": {"success": True, "stdout": "ok"},
        }
        sink.on_step(run_id, event=event, cumulative_reward=reward)
    result = {"completed": True, "steps": 3, "total_reward": reward, "final_response": "done"}
    sink.on_run_end(run_id, result=result, run_path=None)


def populate(uri: str) -> str:
    from mlflow import MlflowClient

    import rlm_mlflow

    sink = rlm_mlflow.MLflowSink(enabled=True, experiment=EXPERIMENT, tracking_uri=uri)
    dataset = [{"question": q, "answer": a} for q, a in CASES]
    for model, (wrong, tokens) in MODELS.items():
        params = {"model": model, "preset": "arith", "max_steps": 4}
        with rlm_mlflow.benchmark(sink, f"arith-{model}", params=params, dataset=dataset) as bench:
            for index, (question, answer) in enumerate(CASES):
                run_id = f"{model}-case-{index}"
                right = index not in wrong
                agent(sink, run_id, question, right, tokens)
                why = "the final answer matches" if right else "the final answer differs"
                bench.record(run_id, expected=answer, verdict=right, rationale=why)
    sink.close(60)
    status = sink.status()
    if status["deferred"] or status["dropped"]:
        sys.exit(f"the benchmarks did not all reach the server: {status}")
    experiment = MlflowClient(uri).get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    return str(experiment.experiment_id)


def dismiss_hints(page: Any) -> None:
    page.wait_for_timeout(2000)  # first-visit hints appear
    for name in ("Got it", "Close"):  # the "Detect issues" hint, the Assistant panel
        found = page.get_by_role("button", name=name)
        if found.count():
            found.last.click()


def capture(uri: str, experiment_id: str, rewards: Path, compare: Path) -> None:
    from playwright.sync_api import sync_playwright

    base = f"{uri}/#/experiments/{experiment_id}"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1800, "height": 640})
        page.goto(f"{base}/traces")
        page.get_by_text("10 of 10").wait_for(timeout=60_000)
        dismiss_hints(page)
        for column in ("Output", "Tags"):  # room for the rewards
            header = page.locator('[role="columnheader"]').filter(has_text=column).first
            header.get_by_role("button", name="Column options").click()
            page.get_by_role("menuitem", name="Hide column").click()
            page.wait_for_timeout(500)
        rewards.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(rewards))

        page = browser.new_page(viewport={"width": 2000, "height": 820})
        page.goto(f"{base}/evaluation-runs")
        page.get_by_text("arith-model-a").first.wait_for(timeout=60_000)
        dismiss_hints(page)
        for name in ("arith-model-a", "arith-model-b"):
            row = page.locator('[role="row"], tr').filter(has_text=name).first
            row.locator('input[type="checkbox"], [role="checkbox"]').first.click()
        page.get_by_role("button", name="Actions").first.click()
        page.get_by_role("menuitem", name="Compare").click()
        page.get_by_text("Comparing").first.wait_for(timeout=60_000)
        page.wait_for_timeout(3000)  # the cases load
        page.screenshot(path=str(compare))
        browser.close()
    print(f"{rewards}\n{compare}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    images = ROOT / "docs" / "img"
    parser.add_argument("--rewards-out", type=Path, default=images / "mlflow-rewards.png")
    parser.add_argument(
        "--compare-out", type=Path, default=images / "mlflow-evaluation-compare.png"
    )
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

    from rlm_mlflow.testing import local_server

    with tempfile.TemporaryDirectory(prefix="rlm-mlflow-screenshot-") as folder:
        os.environ["RLM_MLFLOW_JOURNAL_DIR"] = str(Path(folder) / "journal")
        with local_server(Path(folder) / "server") as server:
            experiment_id = populate(server.uri)
            capture(server.uri, experiment_id, args.rewards_out, args.compare_out)


if __name__ == "__main__":
    main()

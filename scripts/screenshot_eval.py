"""Take the docs' screenshots of rewards and benchmarks in MLflow's GenAI pages.

Starts a real ``mlflow server`` in a temporary folder, runs two benchmarks of two models (five
cases each, a scripted agent sending its hooks to the sink) through ``rlm_mlflow.benchmark``, and
opens MLflow in a real headless Chromium (Debian's ``chromium``, driven by Playwright):

- ``docs/img/mlflow-rewards.png``: the Traces table with the ``total_reward``, ``completed``,
  ``expected_response`` and ``judge`` columns;
- ``docs/img/mlflow-evaluation-compare.png``: the Evaluation runs page comparing the two
  benchmarks case by case.

In a second experiment, two chat sessions (three turns, then two: one root run each, inside
``rlm_mlflow.session``) of a scripted agent answering questions about a dataset and a log:

- ``docs/img/mlflow-sessions.png``: the sessions list (MLflow 3.17's *Sessions* entry sends to the
  Traces table grouped by session), the three-turn session's turns unfolded;
- ``docs/img/mlflow-session.png``: that session opened, its turns in order, each with its question
  and answer.

Run it with ``python scripts/screenshot_eval.py`` in a virtualenv with the ``screenshot`` and
``full`` extras (``bash scripts/screenshot`` sets one up).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from screenshot import CHROMIUM_FLAGS, chromium  # noqa: E402

EXPERIMENT = "rlm-benchmarks"
CASES = [("2+2", "4"), ("3*3", "9"), ("10-7", "3"), ("12/4", "3"), ("2**5", "32")]
#: Each model's wrong answers (case indexes) and its tokens per step.
MODELS = {"model-a": ({2}, 120), "model-b": ({1, 2, 4}, 80)}

#: A chat turn: the question, its steps (code, what it printed), the answer.
Turn = tuple[str, list[tuple[str, str]], str]
CHAT_EXPERIMENT = "rlm-chat"
STEP_SECONDS = 0.3
#: Two chat sessions, (id, user): their turns.
CHATS: dict[tuple[str, str], list[Turn]] = {
    ("chat-sales-2024", "ada"): [
        (
            "How many orders are in sales.csv, and which columns does it have?",
            [
                (
                    "import pandas as pd\ndf = pd.read_csv('sales.csv')\nprint(df.shape)",
                    "(1248, 5)",
                ),
                ("print(list(df.columns))", "['date', 'region', 'product', 'units', 'revenue']"),
            ],
            "1,248 orders, with the columns date, region, product, units and revenue.",
        ),
        (
            "Which region had the highest revenue in 2024?",
            [
                (
                    "df['date'] = pd.to_datetime(df['date'])\n"
                    "y24 = df[df['date'].dt.year == 2024]\n"
                    "by_region = y24.groupby('region')['revenue'].sum()\n"
                    "print(by_region.sort_values(ascending=False))",
                    "region\nNorth    412300\nWest     301950\nSouth    255400\nEast     210870",
                ),
                ("print(round(by_region['North'] / by_region.sum(), 3))", "0.349"),
            ],
            "North: $412,300, 35% of the year's $1.18M.",
        ),
        (
            "How much did North grow against 2023?",
            [
                (
                    "y23 = df[df['date'].dt.year == 2023]\n"
                    "north23 = y23[y23['region'] == 'North']['revenue'].sum()\n"
                    "print(north23)",
                    "349410",
                ),
                ("print(round(412300 / north23 - 1, 3))", "0.18"),
            ],
            "North grew 18%: from $349,410 in 2023 to $412,300 in 2024.",
        ),
    ],
    ("chat-incident-0412", "grace"): [
        (
            "How many requests failed in yesterday's access.log?",
            [
                (
                    "lines = open('access.log').read().splitlines()\n"
                    "codes = [int(line.split()[8]) for line in lines]\n"
                    "print(len(codes), sum(c >= 500 for c in codes))",
                    "48210 312",
                ),
            ],
            "312 of 48,210 requests (0.65%) ended in a 5xx error.",
        ),
        (
            "Which endpoint failed the most, and when?",
            [
                (
                    "from collections import Counter\n"
                    "failed = [l.split() for l in lines if int(l.split()[8]) >= 500]\n"
                    "print(Counter(f[6] for f in failed).most_common(2))",
                    "[('/api/checkout', 204), ('/api/cart', 61)]",
                ),
                (
                    "times = [f[3][13:18] for f in failed if f[6] == '/api/checkout']\n"
                    "print(min(times), max(times))",
                    "14:02 14:19",
                ),
            ],
            "/api/checkout: 204 of the 312 failures, all between 14:02 and 14:19.",
        ),
    ],
}


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


def chat_turn(sink: Any, run_id: str, number: int, turn: Turn) -> None:
    """Turn ``number`` (from 0) of a chat: a scripted RLM run whose steps run code, then answer.
    Each step takes a moment (the model's turn): the turns last and follow each other in time."""
    question, steps, answer = turn
    sink.on_run_start(run_id, task=question, environment="pure_rlm", params={"max_steps": 6})
    context = 900 + 400 * number  # the chat so far is part of the prompt
    for step, (code, stdout) in enumerate([*steps, (f"FINAL({answer!r})", "")]):
        time.sleep(STEP_SECONDS)
        context += 350
        event = {
            "step": step,
            "reward": 1.0 if step == len(steps) else 0.0,
            "usage": {"input_tokens": context, "output_tokens": 60 + len(code) // 3},
            "action": {"action": "run_python" if stdout else "final", "code": code},
            "observation": {"success": True, "stdout": stdout},
        }
        sink.on_step(run_id, event=event, cumulative_reward=event["reward"])
    result = {
        "completed": True,
        "steps": len(steps) + 1,
        "total_reward": 1.0,
        "final_response": answer,
    }
    sink.on_run_end(run_id, result=result, run_path=None)


def populate_chats(uri: str) -> str:
    """The chat sessions of :data:`CHATS`, one root run per turn; the experiment's id."""
    from mlflow import MlflowClient

    import rlm_mlflow

    sink = rlm_mlflow.MLflowSink(enabled=True, experiment=CHAT_EXPERIMENT, tracking_uri=uri)
    for (session_id, user), turns in CHATS.items():
        with rlm_mlflow.session(session_id, user=user):
            for number, turn in enumerate(turns):
                chat_turn(sink, f"{session_id}-turn-{number + 1}", number, turn)
    sink.close(60)
    status = sink.status()
    if status["deferred"] or status["dropped"]:
        sys.exit(f"the chat sessions did not all reach the server: {status}")
    experiment = MlflowClient(uri).get_experiment_by_name(CHAT_EXPERIMENT)
    assert experiment is not None
    return str(experiment.experiment_id)


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


def capture_sessions(uri: str, experiment_id: str, sessions: Path, one: Path) -> None:
    """The sessions list, then the first session of :data:`CHATS` opened from it."""
    from playwright.sync_api import expect, sync_playwright

    (session_id, _), turns = next(iter(CHATS.items()))
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1980, "height": 460})
        # A first visit's "Detect issues" hint covers the page: close it whenever it shows.
        hint = page.get_by_role("button", name="Got it")
        page.add_locator_handler(hint, lambda button: button.click())
        page.goto(f"{uri}/#/experiments/{experiment_id}")
        page.get_by_role("link", name="Sessions").click()
        # MLflow 3.17's Sessions page points to the Traces table grouped by session.
        page.get_by_text("View Sessions in Traces tab").click()
        assistant = page.locator('[data-component-id="mlflow.assistant.chat_panel.close"]')
        assistant.click()  # the Assistant panel a first visit opens
        assistant.wait_for(state="hidden")
        page.get_by_label(f"Expand session {session_id}").click()
        page.get_by_text(turns[-1][0]).first.wait_for(timeout=60_000)
        headers = page.locator('[role="columnheader"]')
        # Room for the whole session id, and for the reward columns instead of the tags.
        grip = headers.filter(has_text="Session").first.get_by_label("Resize Column")
        box = grip.bounding_box()
        assert box is not None
        y = box["y"] + box["height"] / 2
        page.mouse.move(box["x"] + box["width"] / 2, y)
        page.mouse.down()
        page.mouse.move(box["x"] + 70, y, steps=5)
        page.mouse.up()
        headers.filter(has_text="Tags").first.get_by_role("button", name="Column options").click()
        page.get_by_role("menuitem", name="Hide column").click()
        headers.filter(has_text="Tags").wait_for(state="detached")
        page.mouse.move(900, 440)  # off the rows: no hover
        sessions.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(sessions))

        page.get_by_text(session_id, exact=True).first.click()
        page.set_viewport_size({"width": 1500, "height": 1360})
        page.get_by_text(f"Turn {len(turns)}", exact=True).first.wait_for(timeout=60_000)
        last = page.get_by_text(turns[-1][2]).first
        expect(last).to_be_in_viewport(ratio=1, timeout=60_000)  # every turn's answer on screen
        page.screenshot(path=str(one))
        browser.close()
    print(f"{sessions}\n{one}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    images = ROOT / "docs" / "img"
    parser.add_argument("--rewards-out", type=Path, default=images / "mlflow-rewards.png")
    parser.add_argument(
        "--compare-out", type=Path, default=images / "mlflow-evaluation-compare.png"
    )
    parser.add_argument("--sessions-out", type=Path, default=images / "mlflow-sessions.png")
    parser.add_argument("--session-out", type=Path, default=images / "mlflow-session.png")
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

    from rlm_mlflow.testing import local_server

    with tempfile.TemporaryDirectory(prefix="rlm-mlflow-screenshot-") as folder:
        os.environ["RLM_MLFLOW_JOURNAL_DIR"] = str(Path(folder) / "journal")
        with local_server(Path(folder) / "server") as server:
            experiment_id = populate(server.uri)
            capture(server.uri, experiment_id, args.rewards_out, args.compare_out)
            chats = populate_chats(server.uri)
            capture_sessions(server.uri, chats, args.sessions_out, args.session_out)


if __name__ == "__main__":
    main()

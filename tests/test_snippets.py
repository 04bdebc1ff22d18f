"""Every code block of the README and of ``docs/*.md`` runs, pasted as is.

Each fenced block is taken from the Markdown (inside MkDocs content tabs too) and handled by its
language:

- ``python``: saved as a file and run with this virtualenv's Python (``.venv/bin/python``);
- ``bash``, ``sh``, ``shell``: run by ``bash -e -o pipefail``, so a failing command fails;
- ``console``: its ``$ `` lines are the commands, run the same way (the rest is sample output);
- ``text`` and blocks without a language are diagrams and output: not run.

A comment on the line before the fence changes that:

- ``<!-- no-run: REASON -->``: not run, for the reason given (it needs a remote server, starts
  one that runs until stopped, installs packages, ...). A reason is required;
- ``<!-- excerpt: PATH -->``: a piece of a file of the checkout that the tests run (an example):
  the block must appear in that file word for word.

Each block runs in a fresh temporary folder laid out like a checkout (``.venv`` links to this
virtualenv, ``examples`` to the checkout's), with a fresh ``HOME``, a ``PATH`` without this
virtualenv (so a bare ``rlm-mlflow`` fails as it would for a new user), and the environment the
docs tell the reader to set: ``DSPY_RLM_MLFLOW_ENABLED=true`` and ``MLFLOW_TRACKING_URI``
naming the session's MLflow server, which also stands in wherever a block names the docs'
server, ``http://127.0.0.1:5000`` or ``http://localhost:5000``.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from promises_support import child_env, patient
from rlm_code_support import import_or_install
from rlm_mlflow import MLflowSink
from rlm_mlflow.testing import MlflowServer

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN = {"python", "bash", "sh", "shell", "console"}
NOT_RUN = {"text", ""}
DOCS_SERVERS = ("http://127.0.0.1:5000", "http://localhost:5000")

FENCE = re.compile(r"^(?P<indent> *)(?P<fence>```+|~~~+)(?P<lang>[\w+-]*)\s*$")
MARK = re.compile(r"^\s*<!--\s*(?P<kind>no-run|excerpt):\s*(?P<value>.*?)\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    mark: str | None  # "no-run" or "excerpt"
    value: str  # the reason, or the excerpt's file

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, with the mark on the line before each."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    number = 0
    while number < len(lines):
        opening = FENCE.match(lines[number])
        if not opening:
            number += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        body: list[str] = []
        end = number + 1
        while end < len(lines) and lines[end].strip() != fence:
            body.append(lines[end][len(indent) :] if lines[end].startswith(indent) else lines[end])
            end += 1
        assert end < len(lines), f"{path}:{number + 1}: the block is never closed"
        before = lines[number - 1] if number else ""
        mark = MARK.match(before)
        found.append(
            Block(
                path,
                number + 1,
                opening["lang"].lower(),
                "\n".join(body) + "\n",
                mark["kind"] if mark else None,
                mark["value"] if mark else "",
            )
        )
        number = end + 1
    return found


ALL = [block for document in DOCUMENTS for block in blocks(document)]
RUNNABLE = [b for b in ALL if b.mark is None and b.lang in RUN]
EXCERPTS = [b for b in ALL if b.mark == "excerpt"]


def test_every_block_is_run_checked_or_says_why_not() -> None:
    """No block escapes: each is run, an excerpt checked against its file, a diagram or output
    (text), or marked no-run with a reason. Unknown languages are an error, not a silent skip."""
    assert len(RUNNABLE) >= 20
    for block in ALL:
        if block.mark == "no-run":
            assert len(block.value) >= 10, f"{block.name}: no-run needs a reason"
        elif block.mark is None:
            assert block.lang in RUN | NOT_RUN, f"{block.name}: unknown language {block.lang!r}"


@pytest.mark.parametrize("block", EXCERPTS, ids=[b.name for b in EXCERPTS])
def test_an_excerpt_is_word_for_word_in_its_file(block: Block) -> None:
    source = ROOT / block.value
    assert source.is_file(), f"{block.name}: {block.value} does not exist"
    text = source.read_text(encoding="utf-8")
    assert textwrap.dedent(block.code).strip() in text, f"{block.name} differs from {block.value}"


def _commands(block: Block) -> str:
    if block.lang != "console":
        return block.code
    lines = [line[2:] for line in block.code.splitlines() if line.startswith("$ ")]
    assert lines, f"{block.name}: a console block without a '$ ' line"
    return "\n".join(lines) + "\n"


def _path_without_this_venv() -> str:
    venv_bin = Path(sys.executable).parent.resolve()
    entries = os.environ.get("PATH", "").split(os.pathsep)
    return os.pathsep.join(p for p in entries if p and Path(p).resolve() != venv_bin)


@pytest.mark.integration
@pytest.mark.parametrize("block", RUNNABLE, ids=[b.name for b in RUNNABLE])
def test_the_block_runs_as_pasted(
    block: Block, mlflow_server: MlflowServer, experiment_name: str, tmp_path: Path
) -> None:
    code = _commands(block)
    for address in DOCS_SERVERS:
        code = code.replace(address, mlflow_server.uri)
    if "rlm_code" in code:
        import_or_install()
    work = tmp_path / "checkout"
    work.mkdir()
    (work / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    (work / "examples").symlink_to(ROOT / "examples", target_is_directory=True)
    home = tmp_path / "home"
    home.mkdir()
    env = child_env(
        HOME=str(home),
        PATH=_path_without_this_venv(),
        DSPY_RLM_MLFLOW_ENABLED="true",
        MLFLOW_TRACKING_URI=mlflow_server.uri,
        DSPY_RLM_MLFLOW_EXPERIMENT=experiment_name,
        PYTHONWARNINGS="ignore:PureRLMEnvironment is using exec:UserWarning",
    )
    for name in ("RLM_MLFLOW_JOURNAL_DIR", "XDG_STATE_HOME", "VIRTUAL_ENV", "PYTHONPATH"):
        env.pop(name, None)
    if block.lang == "python":
        script = work / "snippet.py"
        script.write_text(code, encoding="utf-8")
        command = [str(work / ".venv" / "bin" / "python"), str(script)]
    else:
        script = work / "snippet.sh"
        script.write_text(code, encoding="utf-8")
        command = ["bash", "-e", "-o", "pipefail", str(script)]
    done = subprocess.run(
        command, cwd=work, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, (
        f"{block.name} failed ({done.returncode}):\n{code}\n--- stdout\n{done.stdout}"
        f"\n--- stderr\n{done.stderr}"
    )


@pytest.mark.integration
def test_the_readme_shows_what_status_really_returns(
    mlflow_server: MlflowServer, experiment_name: str
) -> None:
    """The README's sample of ``status()`` has exactly the keys a real sink's status has."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    sample = re.search(r"```text\n(\{'name': 'mlflow',.*?\})\n```", readme, re.S)
    assert sample is not None, "the README shows no status() output"
    shown = ast.literal_eval(sample.group(1))
    with MLflowSink(
        enabled=True, experiment=experiment_name, tracking_uri=mlflow_server.uri
    ) as sink:
        sink.on_run_start("r", task="t", environment="e", params={})
        assert sink.flush(patient(60))
        real = sink.status()
    assert list(shown) == list(real)
    assert {k: type(v) for k, v in shown.items()} == {
        k: type(v) for k, v in real.items() if k != "last_error"
    } | {"last_error": type(None)}

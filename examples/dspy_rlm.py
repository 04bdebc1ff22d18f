"""DSPy's ``dspy.RLM`` sending its runs to MLflow through rlm-mlflow's one callback.

    pip install 'rlm-mlflow[dspy]'
    python examples/dspy_rlm.py                              # scripted LM, MLflow's default store
    MLFLOW_TRACKING_URI=http://127.0.0.1:5000 python examples/dspy_rlm.py
    python examples/dspy_rlm.py --model openai/gpt-4o-mini   # a real model (OPENAI_API_KEY)

Several questions about a text are answered at once, as ``acall``s in one event loop. Each RLM
call is a run; each REPL iteration a step with its code, output and LM calls (the main LM's and
``llm_query``'s); the sub-agent that the RLM builds in its own code (``dspy.RLM`` inside the
REPL) is a child run under the iteration that called it. The code runs in DSPy's
``LocalInterpreter``, a local Python process (not a security sandbox: fine for this script).
Without ``--model`` a scripted ``DummyLM`` plays the model, so it runs offline.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
from typing import Any

import dspy
from dspy.clients.engines.dummy_engine import DummyEngine
from dspy.lm15 import Usage
from dspy.primitives.local_interpreter import LocalInterpreter
from dspy.utils.dummies import DummyLM

from rlm_mlflow import MLflowSink
from rlm_mlflow.dspy import RLMCallback

TEXT = (
    "Recursive language models keep long inputs out of the prompt. The model writes code that "
    "looks at the input in pieces, asks smaller models about the pieces, and submits an answer "
    "when it has one. "
) * 20
QUESTIONS = [
    "What do recursive language models keep out of the prompt?",
    "Who looks at the input in pieces?",
    "When is the answer submitted?",
    "What are smaller models asked about?",
]

ITERATION = "[[ ## iteration ## ]]\n"
PLAN = {  # what the scripted model answers at each iteration of the top-level RLM
    ITERATION + "1/6": {
        "reasoning": "Look at the data first.",
        "code": "print(len(context), context[:80])",
    },
    ITERATION + "2/6": {
        "reasoning": "Ask a sub-LLM about the relevant part.",
        "code": "```python\nnote = llm_query('Answer from the text: ' + query)\nprint(note)\n```",
    },
    ITERATION + "3/6": {
        "reasoning": "Have a sub-agent check the note.",
        "code": (
            "checker = dspy.RLM('note -> verdict', max_iters=3)\n"
            "verdict = checker(note=note).verdict\n"
            "print(verdict)"
        ),
    },
    ITERATION + "4/6": {"reasoning": "Done.", "code": "SUBMIT(answer=note.splitlines()[-1])"},
}
SUB_PLAN = {  # the sub LM: llm_query's answers, and the checker sub-agent's iterations
    "Answer from the text": {"response": "long inputs, looked at in pieces by code"},
    ITERATION + "1/3": {
        "reasoning": "Check it.",
        "code": "print(llm_query('Is it right? ' + note))",
    },
    ITERATION + "2/3": {"reasoning": "It is.", "code": "SUBMIT(verdict='consistent')"},
    "Is it right?": {"response": "yes"},
}


class CountingEngine:
    """DummyLM's scripted answers, with token usage as a real provider reports it (about four
    characters a token; DummyLM's own engine reports 0)."""

    def __init__(self, lm: ScriptedLM) -> None:
        self.lm = lm
        self.inner = DummyEngine(lm)

    def complete(self, request: Any) -> Any:
        response = self.inner.complete(request)
        prompt = sum(len(message.text or "") for message in request.messages)
        usage = Usage(input_tokens=prompt // 4 + 1, output_tokens=len(response.text) // 4 + 1)
        return dataclasses.replace(response, usage=usage, model=self.lm.model)


class AsyncCountingEngine:
    def __init__(self, engine: CountingEngine) -> None:
        self.engine = engine

    async def complete(self, request: Any) -> Any:
        return self.engine.complete(request)


class ScriptedLM(DummyLM):  # type: ignore[misc]
    """A named ``DummyLM`` (answers by the key its prompt contains) that reports usage."""

    def __init__(self, answers: dict[str, dict[str, str]], model: str) -> None:
        super().__init__(answers)
        self.model = model
        self._engine_spec = CountingEngine(self)
        self._async_engine_spec = AsyncCountingEngine(self._engine_spec)


async def answer_all(rlm: Any, questions: list[str]) -> list[Any]:
    return await asyncio.gather(*(rlm.acall(context=TEXT, query=q) for q in questions))


def main(model: str, tasks: int) -> None:
    sink = MLflowSink.from_env(
        enabled=True, experiment=os.environ.get("DSPY_RLM_MLFLOW_EXPERIMENT") or "dspy-rlm"
    )
    if model == "scripted":
        lm: Any = ScriptedLM(PLAN, "scripted/main")
        sub_lm: Any = ScriptedLM(SUB_PLAN, "scripted/sub")
    else:
        lm = sub_lm = dspy.LM(model)
    dspy.configure(lm=lm, callbacks=[RLMCallback(sink)])  # <- the line that matters
    rlm = dspy.RLM(
        "context, query -> answer", max_iters=6, sub_lm=sub_lm, interpreter_factory=LocalInterpreter
    )
    questions = (QUESTIONS * tasks)[:tasks]
    for question, result in zip(questions, asyncio.run(answer_all(rlm, questions)), strict=True):
        print(f"{question} -> {result.answer}")
    sink.close()  # optional: the sink also closes itself when the program exits
    stats = sink.statistics()
    dropped = ", ".join(f"{k} {v}" for k, v in stats.dropped.items()) or "none"
    print(
        f"runs {stats.runs_created} created / {stats.runs_ended} ended; events {stats.sent} sent, "
        f"{stats.deferred} kept for 'rlm-mlflow replay', dropped {dropped}"
    )
    print(f"MLflow: {sink.config.tracking_uri or 'the default store'}, {sink.config.experiment}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="scripted", help="provider/model, or 'scripted'")
    parser.add_argument("--tasks", type=int, default=3, help="questions answered at once")
    args = parser.parse_args()
    main(args.model, args.tasks)

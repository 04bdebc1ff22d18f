"""Benchmarks as MLflow evaluation runs.

``with rlm_mlflow.benchmark(sink, "gsm8k-mini", params={...}) as bench:`` opens one MLflow run
marked the way ``mlflow.genai.evaluate`` marks its runs (tag ``mlflow.runType`` =
``genai_evaluate``), so MLflow's **Evaluation runs** page lists it and compares two of them case
by case. Every root run the sink sees while the benchmark is open, on any thread, is one of its
cases: its trace is linked to the evaluation run (its own MLflow run stays a run of its own) and
carries ``total_reward`` and ``completed`` as Feedback. ``bench.record(run_id,
expected=..., verdict=...)`` adds the case's expected answer (Expectation ``expected_response``)
and a judge's verdict (Feedback ``judge``, with its rationale). At the end the evaluation run
gets the aggregates: ``reward/mean``, ``completed/mean``, ``judge/mean`` (when verdicts are bools
or numbers), ``tokens/total``, ``tokens/mean``, ``duration/mean`` (seconds), ``cases``; and the
benchmark's report file as an artifact when given, and its dataset (a name, or its records) as
the run's input.

Everything goes through the sink's queue and journal like any hook: nothing here waits for
MLflow, and what the worker could not send is sent by ``rlm-mlflow replay``. The aggregates are
computed by the worker from the cases it sent; a benchmark cut by ``kill -9`` is ended KILLED by
replay, without them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

logger = logging.getLogger("rlm_mlflow")


class Benchmark:
    """One benchmark: see the module docstring. Made by :func:`benchmark`."""

    def __init__(
        self,
        sink: Any,
        name: str,
        *,
        params: Mapping[str, Any] | None = None,
        dataset: str | Sequence[Any] | None = None,
        report: str | os.PathLike[str] | None = None,
    ) -> None:
        self.name = str(name)
        self.params = dict(params or {})
        self.dataset = _dataset(self.name, dataset)
        #: The benchmark's own report (a file or a folder), logged as an artifact at the end;
        #: may be set inside the ``with`` block.
        self.report = report
        self.cases = 0
        self._pipeline = getattr(sink, "_pipeline", None)
        self._run: Any = None
        if self._pipeline is None:
            logger.warning(
                "rlm-mlflow: benchmark %r: %s is not an MLflow sink; nothing is logged",
                self.name,
                type(sink).__name__,
            )

    def __enter__(self) -> Benchmark:
        pipeline = self._pipeline
        if pipeline is None:
            return self
        pipeline.start(self.name, None, None, self.params, benchmark=True, dataset=self.dataset)
        self._run = pipeline.find(self.name)
        if self._run is not None:
            pipeline.open_bench(self._run)
        return self

    def record(
        self,
        run_id: str,
        *,
        expected: Any = None,
        verdict: Any = None,
        rationale: str | None = None,
        judge: str = "judge",
    ) -> None:
        """What the benchmark says of its case ``run_id`` (the id its agent's hooks used):
        the expected answer, a judge's verdict (a bool, a number or a label) and why. Call it
        once the case's run has ended. Never raises."""
        pipeline, run = self._pipeline, self._run
        if pipeline is None or run is None:
            return
        if expected is None and verdict is None:
            return
        self.cases += 1
        pipeline.case(
            run.no,
            run_id,
            expected=expected,
            verdict=verdict,
            rationale=rationale,
            judge=judge,
        )

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        pipeline, run = self._pipeline, self._run
        if pipeline is None or run is None:
            return
        pipeline.close_bench(run)
        for run_id, (bench_no, _) in list(pipeline.cases.items()):
            if bench_no == run.no:
                pipeline.cases.pop(run_id, None)
        report = os.fspath(self.report) if self.report is not None else None
        cases = pipeline.case_figures.pop(run.no, None)
        # Left by an exception, the benchmark did not finish: FAILED (KILLED by Ctrl-C).
        status = "FINISHED"
        if exc_type is not None:
            status = "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED"
        pipeline.end(self.name, {"completed": exc_type is None}, report, cases=cases, status=status)


def _dataset(name: str, dataset: str | Sequence[Any] | None) -> dict[str, Any] | None:
    """The run input of a dataset given by its name, or by its records (named after the
    benchmark, its digest computed from them)."""
    if dataset is None:
        return None
    try:
        if isinstance(dataset, str):
            rows: int | None = None
            named, text = dataset, dataset
        else:
            rows, named = len(dataset), name
            text = json.dumps(list(dataset), sort_keys=True, default=repr)
    except Exception:
        logger.warning("rlm-mlflow: benchmark %r: its dataset cannot be read; not logged", name)
        return None
    digest = hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=4).hexdigest()
    profile = json.dumps({"num_rows": rows} if rows is not None else {})
    source = json.dumps({"benchmark": name})
    return {"name": named[:500], "digest": digest, "source": source, "profile": profile}


def benchmark(
    sink: Any,
    name: str,
    *,
    params: Mapping[str, Any] | None = None,
    dataset: str | Sequence[Any] | None = None,
    report: str | os.PathLike[str] | None = None,
) -> Benchmark:
    """A benchmark as one MLflow evaluation run (see :mod:`rlm_mlflow._benchmark`)::

    with rlm_mlflow.benchmark(sink, "gsm8k-mini", params={"model": "gpt-4o"}) as bench:
        for case in cases:
            result = agent.run(case.question)  # its root run is a case
            bench.record(result.run_id, expected=case.answer, verdict=result.ok)
    """
    return Benchmark(sink, name, params=params, dataset=dataset, report=report)

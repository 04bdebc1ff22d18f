"""Benchmarks as MLflow evaluation runs, against a real server: the evaluation run found by its
``mlflow.runType``, its cases' traces linked to it with their assessments, the aggregates, the
report; every assessment once after lost answers and after ``kill -9`` + replay."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

import rlm_mlflow
from rlm_mlflow import MLflowSink
from rlm_mlflow._events import RunEnd
from rlm_mlflow.testing import FaultProxy, MemoryTransport, MlflowServer, wait_for

FAST: dict[str, Any] = {"flush_interval": 0.2, "retry_initial": 0.05, "retry_max_wait": 0.5}
WAIT = 60.0
QUESTIONS = ["2+2", "3*3", "10-7"]
ANSWERS = ["4", "9", "3"]


def run_case(sink: Any, run_id: str, reward: float) -> None:
    """One case: a root run with a child run and two steps that used 10 tokens each."""
    sink.on_run_start(run_id, task=run_id, environment="e", params={"max_steps": 5})
    sink.on_run_start(
        f"{run_id}/child", task="sub", environment="e", params={"parent_run_id": run_id}
    )
    sink.on_run_end(f"{run_id}/child", result={"completed": True}, run_path=None)
    for number in range(2):
        usage = {"input_tokens": 6, "output_tokens": 4, "total_tokens": 10}
        sink.on_step(
            run_id, event={"step": number, "reward": reward, "usage": usage}, cumulative_reward=0
        )
    result = {"completed": reward > 0, "steps": 2, "total_reward": reward}
    sink.on_run_end(run_id, result=result, run_path=None)


def run_benchmark(
    sink: Any,
    name: str,
    *,
    model: str,
    rewards: Sequence[float],
    report: Path | None = None,
) -> None:
    """Three cases ``<name>-<i>``; the judge says right when the reward is 1."""
    dataset = [{"question": q, "answer": a} for q, a in zip(QUESTIONS, ANSWERS, strict=True)]
    with rlm_mlflow.benchmark(
        sink, name, params={"model": model, "preset": "arith"}, dataset=dataset, report=report
    ) as bench:
        for index, reward in enumerate(rewards):
            run_id = f"{name}-{index}"
            run_case(sink, run_id, reward)
            bench.record(
                run_id,
                expected=ANSWERS[index],
                verdict=reward == 1.0,
                rationale=f"case {index}: the answer is {ANSWERS[index]}",
            )


@pytest.fixture
def proxy(mlflow_server: MlflowServer) -> Iterator[FaultProxy]:
    with FaultProxy(mlflow_server.port) as proxy:
        yield proxy


def evaluation_runs(client: Any, experiment: str) -> dict[str, Any]:
    found = client.get_experiment_by_name(experiment)
    assert found is not None
    runs = client.search_runs(
        [found.experiment_id], filter_string="tags.`mlflow.runType` = 'genai_evaluate'"
    )
    return {run.info.run_name: run for run in runs}


def by_name(trace: Any) -> dict[str, list[Any]]:
    named: dict[str, list[Any]] = {}
    for assessment in trace.info.assessments:
        named.setdefault(assessment.name, []).append(assessment)
    return named


def linked_traces(client: Any, run: Any, filter_string: str | None = None) -> dict[str, Any]:
    traces = client.search_traces(
        locations=[run.info.experiment_id],
        run_id=run.info.run_id,
        filter_string=filter_string,
        max_results=100,
    )
    return {trace.info.tags["run_id"]: trace for trace in traces}


def assert_benchmark(client: Any, run: Any, name: str, rewards: Sequence[float]) -> None:
    """The evaluation run holds its cases, each with its assessments once."""
    traces = linked_traces(client, run)
    assert sorted(traces) == [f"{name}-{i}" for i in range(len(rewards))]
    for index, reward in enumerate(rewards):
        named = by_name(traces[f"{name}-{index}"])
        assert sorted(named) == ["completed", "expected_response", "judge", "total_reward"]
        assert [a.value for a in named["total_reward"]] == [reward]
        assert [a.value for a in named["completed"]] == [reward > 0]
        assert [a.value for a in named["expected_response"]] == [ANSWERS[index]]
        (judge,) = named["judge"]
        assert judge.value is (reward == 1.0)
        assert judge.rationale == f"case {index}: the answer is {ANSWERS[index]}"
        assert named["expected_response"][0].expectation is not None


@pytest.mark.integration
def test_a_benchmark_is_an_evaluation_run_with_its_cases_traces_and_their_assessments(
    mlflow_server: MlflowServer, mlflow_client: Any, experiment_name: str, tmp_path: Path
) -> None:
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"accuracy": 2 / 3}), encoding="utf-8")
    sink = MLflowSink(
        enabled=True, experiment=experiment_name, tracking_uri=mlflow_server.uri, **FAST
    )
    run_benchmark(sink, "model-a", model="m1", rewards=[1.0, 0.0, 1.0], report=report)
    run_benchmark(sink, "model-b", model="m2", rewards=[0.0, 0.0, 1.0])
    sink.close(WAIT)
    status = sink.status()
    assert status["deferred"] == 0, status
    assert not status["dropped"], status
    assert not status["rejected"], status

    runs = evaluation_runs(mlflow_client, experiment_name)
    assert sorted(runs) == ["model-a", "model-b"]
    a, b = runs["model-a"], runs["model-b"]
    assert a.data.params["model"] == "m1"
    assert a.data.params["preset"] == "arith"
    assert set(a.data.params) == {"model", "preset"}
    (dataset,) = [d.dataset for d in a.inputs.dataset_inputs]
    assert dataset.name == "model-a"
    assert json.loads(dataset.profile) == {"num_rows": 3}
    (same,) = [d.dataset for d in b.inputs.dataset_inputs]
    assert same.digest == dataset.digest  # the same cases
    assert a.info.status == "FINISHED"
    assert_benchmark(mlflow_client, a, "model-a", [1.0, 0.0, 1.0])
    assert_benchmark(mlflow_client, b, "model-b", [0.0, 0.0, 1.0])
    assert a.data.metrics["reward/mean"] == pytest.approx(2 / 3)
    assert a.data.metrics["completed/mean"] == pytest.approx(2 / 3)
    assert a.data.metrics["judge/mean"] == pytest.approx(2 / 3)
    assert a.data.metrics["cases"] == 3
    assert a.data.metrics["tokens/total"] == 60  # the case roots' own steps, children none
    assert a.data.metrics["tokens/mean"] == 20
    assert a.data.metrics["duration/mean"] >= 0
    assert b.data.metrics["reward/mean"] == pytest.approx(1 / 3)
    assert "total_reward" not in a.data.metrics  # an evaluation run has its aggregates only
    artifacts = [f.path for f in mlflow_client.list_artifacts(a.info.run_id)]
    assert any("report.json" in path for path in artifacts), artifacts
    # The case runs are runs of their own (the Evaluation runs page compares two runs, and
    # selecting a parent selects its children); a reward filter on the evaluation run's traces
    # finds the right cases.
    (case,) = mlflow_client.search_runs(
        [a.info.experiment_id], filter_string="tags.run_id = 'model-a-0'"
    )
    assert "mlflow.parentRunId" not in case.data.tags
    assert "mlflow.runType" not in case.data.tags
    good = linked_traces(mlflow_client, a, "feedback.total_reward > 0.5")
    assert sorted(good) == ["model-a-0", "model-a-2"]


@pytest.mark.integration
@pytest.mark.parametrize("made", ["before", "in-the-same-cycle"])
def test_a_benchmark_taken_before_a_case_run_ends_writes_that_cases_assessments_after_it(
    mlflow_server: MlflowServer,
    mlflow_client: Any,
    experiment_name: str,
    journal_dir: Path,
    made: str,
) -> None:
    """The worker takes a benchmark's end while one of its cases' runs is still open, no span
    of it sent (the hooks of several threads go to lanes of their own, taken in any order:
    DSPy's ``Evaluate`` ends its benchmark right after its threads' last runs). A benchmark
    whose evaluation run was made before waits for that run's end, whose trace its case's
    assessments go on. One begun in the same cycle goes (its evaluation run is needed by its
    cases), and what it says of the open case is kept for replay, which writes it. Before,
    those assessments were written at once, refused by MLflow (no such trace), and lost."""
    from promises_support import asleep_until_woken, replay_cli

    # No cycle but those asked for: "in the same cycle" must not depend on how fast the hooks
    # run (on a busy machine a timed cycle could take the benchmark's start alone). A worker
    # sends what waits as soon as it is set up, so it is set up first, with a run of its own,
    # and asleep before the benchmark begins.
    sink = MLflowSink(
        enabled=True,
        experiment=experiment_name,
        tracking_uri=mlflow_server.uri,
        **{**FAST, "flush_interval": 60.0},
    )
    run_case(sink, "warm", 1.0)
    assert sink.flush(WAIT)
    assert wait_for(lambda: asleep_until_woken(sink), WAIT)
    with rlm_mlflow.benchmark(sink, "late") as bench:
        if made == "before":
            assert sink.flush(WAIT)
        run_case(sink, "late-0", 1.0)
        bench.record("late-0", expected=ANSWERS[0], verdict=True, rationale="case 0")
        sink.on_run_start("late-1", task="late-1", environment="e", params={})
        bench.record("late-1", expected=ANSWERS[1], verdict=False, rationale="case 1")
    sink.flush(0.0)  # one cycle takes it all now
    assert wait_for(lambda: sink.statistics().queue_depth == 0, WAIT)  # the worker took it all
    sink.on_step("late-1", event={"step": 0, "reward": 0.0}, cumulative_reward=0.0)
    result = {"completed": False, "steps": 1, "total_reward": 0.0}
    sink.on_run_end("late-1", result=result, run_path=None)
    sink.close(WAIT)
    status = sink.status()
    assert not status["rejected"], status
    assert not status["dropped"], status
    if made == "before":
        assert status["deferred"] == 0, status
    else:
        assert status["deferred"] > 0, status
        done = replay_cli(journal_dir, tracking_uri=mlflow_server.uri)
        assert done.returncode == 0, f"{done.stdout}{done.stderr}"

    run = evaluation_runs(mlflow_client, experiment_name)["late"]
    assert run.info.status == "FINISHED"
    traces = linked_traces(mlflow_client, run)
    assert sorted(traces) == ["late-0", "late-1"]
    for name, answer, verdict in (("late-0", ANSWERS[0], True), ("late-1", ANSWERS[1], False)):
        named = by_name(traces[name])
        assert [a.value for a in named["expected_response"]] == [answer]
        assert [a.value for a in named["judge"]] == [verdict]
    assert run.data.metrics["cases"] == 2
    assert run.data.metrics["judge/mean"] == pytest.approx(0.5)


@pytest.mark.integration
def test_lost_answers_write_no_assessment_or_link_twice(
    proxy: FaultProxy, mlflow_client: Any, experiment_name: str
) -> None:
    proxy.set(mode="commit_then_reset", count=6, path="/api/", method="POST")
    sink = MLflowSink(enabled=True, experiment=experiment_name, tracking_uri=proxy.uri, **FAST)
    run_benchmark(sink, "bench", model="m1", rewards=[1.0, 0.0, 1.0])
    sink.close(WAIT)
    assert sink.status()["deferred"] == 0, sink.status()
    (run,) = evaluation_runs(mlflow_client, experiment_name).values()
    assert_benchmark(mlflow_client, run, "bench", [1.0, 0.0, 1.0])
    assert run.data.metrics["reward/mean"] == pytest.approx(2 / 3)


@pytest.mark.integration
@pytest.mark.parametrize(
    "failing",
    [
        pytest.param("/api/3.0/mlflow/traces", id="every-assessment"),
        pytest.param("/assessments", id="the-cases-records-only"),
    ],
)
def test_a_benchmark_killed_before_its_assessments_is_completed_once_by_replay(
    failing: str,
    agents: Callable[..., Any],
    mlflow_server: MlflowServer,
    mlflow_client: Any,
    experiment_name: str,
    journal_dir: Path,
) -> None:
    """Every assessment request fails until the agent is killed (or only those of the cases'
    expected answers and verdicts: the cases' own traces are done then, and their rewards
    known only to the killed process): replay writes each once (a second replay adds
    nothing), links the cases and logs the aggregates, every figure in them."""
    from promises_support import replay_cli

    with FaultProxy(mlflow_server.port) as proxy:
        proxy.set(mode="http", status=503, path=failing)
        agent = agents("benchmark_cases.py", proxy.uri, experiment_name)
        status = json.loads(agent.expect("FLUSHED", 120).split(" ", 1)[1])
        assert status["deferred"] > 0, status
        agent.kill9()
    for attempt in range(2):
        done = replay_cli(journal_dir, tracking_uri=mlflow_server.uri)
        assert done.returncode == 0, f"replay {attempt + 1}: {done.stdout}{done.stderr}"
    (run,) = evaluation_runs(mlflow_client, experiment_name).values()
    assert_benchmark(mlflow_client, run, "bench", [1.0, 0.0, 1.0])
    assert_aggregates_of_three_cases(run.data.metrics)


@pytest.mark.integration
def test_a_benchmark_killed_before_it_ends_is_ended_by_replay_with_every_cases_figures(
    agents: Callable[..., Any],
    mlflow_server: MlflowServer,
    mlflow_client: Any,
    experiment_name: str,
    journal_dir: Path,
) -> None:
    """The cases ran and were sent (their records done: replay does not read them again), and
    the process was killed inside the benchmark. Replay ends the evaluation run KILLED with the
    aggregates of all three cases, kept beside the journal by the killed process's worker."""
    from promises_support import replay_cli

    agent = agents("benchmark_cases.py", mlflow_server.uri, experiment_name, "open")
    status = json.loads(agent.expect("FLUSHED", 120).split(" ", 1)[1])
    assert status["sent"] == status["accepted"], status  # every case's records done
    agent.kill9()
    (folder,) = journal_dir.iterdir()
    assert len(list(folder.glob("bench-*.json"))) == 1
    done = replay_cli(journal_dir, tracking_uri=mlflow_server.uri)
    assert done.returncode == 0, f"{done.stdout}{done.stderr}"
    (run,) = evaluation_runs(mlflow_client, experiment_name).values()
    assert run.info.status == "KILLED"
    assert_aggregates_of_three_cases(run.data.metrics)
    assert list(journal_dir.iterdir()) == []


def assert_aggregates_of_three_cases(metrics: dict[str, float]) -> None:
    """The aggregates of the three cases of ``benchmark_cases.py`` (rewards 1, 0, 1)."""
    assert metrics["cases"] == 3
    assert metrics["reward/mean"] == pytest.approx(2 / 3)
    assert metrics["completed/mean"] == pytest.approx(2 / 3)
    assert metrics["judge/mean"] == pytest.approx(2 / 3)
    assert metrics["tokens/total"] == 60
    assert "duration/mean" in metrics


def test_a_disk_that_refuses_the_benchmark_figures_file_costs_nothing_but_a_warning(
    monkeypatch: pytest.MonkeyPatch, journal_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The figures kept beside the journal are for a kill only: a disk that refuses them (full)
    is said, and the live sink's aggregates and everything else go through."""
    import errno
    import logging

    from rlm_mlflow import _journal_format

    def full(path: Path, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_journal_format, "write_private", full)
    transport = MemoryTransport()
    with caplog.at_level(logging.WARNING, logger="rlm_mlflow"):
        sink = MLflowSink(enabled=True, experiment="e", transport=transport, **FAST)
        with rlm_mlflow.benchmark(sink, "bench") as bench:
            for index, reward in enumerate([1.0, 0.0, 1.0]):
                run_case(sink, f"bench-{index}", reward)
                bench.record(f"bench-{index}", expected=ANSWERS[index], verdict=reward == 1.0)
            assert sink.flush(WAIT)  # the cases are sent while the benchmark is open
        sink.close(WAIT)
    status = sink.status()
    assert status["sent"] == status["accepted"], status
    bench_run = transport.one("bench")
    assert bench_run.history("cases") == [(0, 3.0)]
    ((step, judged),) = bench_run.history("judge/mean")
    assert step == 0
    assert judged == pytest.approx(2 / 3)
    assert any("cannot keep a benchmark's figures" in r.getMessage() for r in caplog.records)
    assert list(journal_dir.iterdir()) == []


def test_a_record_for_a_run_outside_the_benchmark_is_refused_and_counted() -> None:
    transport = MemoryTransport()
    sink = MLflowSink(enabled=True, experiment="e", transport=transport, **FAST)
    run_case(sink, "before", 1.0)
    with rlm_mlflow.benchmark(sink, "bench", dataset="arith-v1") as bench:
        run_case(sink, "inside", 1.0)
        bench.record("before", expected="x")
        bench.record("inside", expected="y", verdict=0.5)
    sink.close(WAIT)
    status = sink.status()
    assert status["rejected"] == {"case_unknown": 1}, status
    bench_run = transport.one("bench")
    assert bench_run.tags["mlflow.runType"] == "genai_evaluate"
    assert "mlflow.parentRunId" not in transport.one("inside").tags
    assert "mlflow.parentRunId" not in transport.one("before").tags
    linked = [t for t, runs in transport.run_links.items() if bench_run.run_uuid in runs]
    assert len(linked) == 1
    held = sorted(a.name for _, a in transport.assessments[linked[0]])
    assert held == ["completed", "expected_response", "judge", "total_reward"]
    assert bench_run.history("judge/mean") == [(0, 0.5)]
    (dataset,) = transport.datasets[bench_run.run_uuid]
    assert dataset.name == "arith-v1"


def test_a_case_that_never_ended_counts_as_not_completed_and_a_raising_benchmark_fails() -> None:
    """Three cases: one completed, one not, one whose agent raised before its end, out of the
    benchmark's ``with`` block. The case the close ends (FAILED) did not complete: its trace
    says ``completed`` False, and the aggregates count it (``completed/mean`` 1/3 over 3
    cases, not 1/2); the benchmark, left by an exception, ends FAILED, not FINISHED."""
    transport = MemoryTransport()
    sink = MLflowSink(enabled=True, experiment="e", transport=transport, **FAST)

    def evaluate() -> None:
        with rlm_mlflow.benchmark(sink, "bench") as bench:
            for case in range(3):
                run_id = f"case-{case}"
                sink.on_run_start(run_id, task=run_id, environment="e", params={})
                sink.on_step(run_id, event={"step": 0, "reward": 1.0}, cumulative_reward=1.0)
                if case == 2:
                    raise RuntimeError("the agent crashed")
                result = {"completed": case == 0, "total_reward": 1.0}
                sink.on_run_end(run_id, result=result, run_path=None)
                bench.record(run_id, expected="x", verdict=True)

    with pytest.raises(RuntimeError, match="the agent crashed"):
        evaluate()
    sink.close(WAIT)
    bench_run = transport.one("bench")
    assert bench_run.status == "FAILED"
    assert bench_run.history("cases") == [(0, 3.0)]
    ((_, completed_mean),) = bench_run.history("completed/mean")
    assert completed_mean == pytest.approx(1 / 3)
    assert transport.one("case-2").status == "FAILED"
    completed = {}
    for trace, held in transport.assessments.items():
        run_uuid = transport.trace_links[bytes.fromhex(trace.removeprefix("tr-"))]
        name = transport.runs[run_uuid].tags["run_id"]
        completed[name] = [a.value for _, a in held if a.name == "completed"]
    assert completed == {"case-0": [True], "case-1": [False], "case-2": [False]}


class LastCaseEndHeld(MemoryTransport):
    """The end of run ``case-1`` waits until ``release`` is set (``held`` once it waits)."""

    def __init__(self) -> None:
        super().__init__()
        self.held, self.release = threading.Event(), threading.Event()

    def set_terminated(self, run_uuid: str, *, status: str, end_time_ms: int) -> None:
        if self.runs[run_uuid].tags.get("run_id") == "case-1":
            self.held.set()
            self.release.wait(WAIT)
        super().set_terminated(run_uuid, status=status, end_time_ms=end_time_ms)


def test_a_close_that_takes_a_benchmarks_cycle_over_still_writes_its_aggregates() -> None:
    """The benchmark's start and its cases go in a cycle the server holds (the last case's
    end) when the benchmark ends and the sink closes: the close takes that cycle over as it
    turns to its spans, and sends the benchmark's end ahead of them; the spans of the cycle
    still go before the end's own, so the benchmark is known as one when its end is: its
    aggregates are written (before, they were left out, its end taken for an ordinary
    run's)."""
    transport = LastCaseEndHeld()
    sink = MLflowSink(enabled=True, experiment="e", transport=transport, **FAST)
    closing = threading.Thread(target=sink.close, args=(WAIT,))
    try:
        with rlm_mlflow.benchmark(sink, "bench") as bench:
            for case in range(2):
                run_id = f"case-{case}"
                sink.on_run_start(run_id, task=run_id, environment="e", params={})
                sink.on_step(run_id, event={"step": 0, "reward": 1.0}, cumulative_reward=1.0)
                result = {"completed": True, "total_reward": 1.0}
                sink.on_run_end(run_id, result=result, run_path=None)
                bench.record(run_id, expected="x", verdict=case == 0)
            assert transport.held.wait(WAIT)  # the cycle with the cases is out, held
        closing.start()
        assert wait_for(lambda: sink._worker.close_requested, WAIT)
    finally:
        transport.release.set()
    closing.join(WAIT)
    bench_run = transport.one("bench")
    assert bench_run.status == "FINISHED"
    assert bench_run.history("cases") == [(0, 2.0)]
    ((_, completed_mean),) = bench_run.history("completed/mean")
    assert completed_mean == 1.0
    assert sink.status()["deferred"] == 0


def test_two_benchmarks_on_two_threads_each_keep_their_own_cases_and_verdicts() -> None:
    """Two models evaluated at once, each benchmark opened on a thread of its own, their cases
    interleaved: each case is one of its own thread's benchmark, each verdict is kept (none
    refused as ``case_unknown``), and each evaluation run's aggregates are its own cases'."""
    transport = MemoryTransport()
    sink = MLflowSink(enabled=True, experiment="e", transport=transport, **FAST)
    both_open = threading.Barrier(2, timeout=WAIT)
    cases_started = threading.Barrier(2, timeout=WAIT)

    def evaluate(model: str, reward: float) -> None:
        with rlm_mlflow.benchmark(sink, f"eval-{model}") as bench:
            both_open.wait()
            for case in range(3):
                run_id = f"{model}-{case}"
                sink.on_run_start(run_id, task=run_id, environment="e", params={})
                cases_started.wait()  # the other model's case is open too
                sink.on_step(run_id, event={"step": 0, "reward": reward}, cumulative_reward=0)
                result = {"completed": True, "total_reward": reward}
                sink.on_run_end(run_id, result=result, run_path=None)
                bench.record(run_id, expected="x", verdict=reward == 1.0)
            both_open.wait()  # neither closes before the other's last case

    threads = [
        threading.Thread(target=evaluate, args=(model, reward))
        for model, reward in (("a", 1.0), ("b", 0.0))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    sink.close(WAIT)
    assert "case_unknown" not in sink.status()["rejected"]
    for model, reward in (("a", 1.0), ("b", 0.0)):
        bench_run = transport.one(f"eval-{model}")
        assert bench_run.history("cases") == [(0, 3.0)]
        assert bench_run.history("reward/mean") == [(0, reward)]
        assert bench_run.history("judge/mean") == [(0, reward)]
        linked = [t for t, runs in transport.run_links.items() if bench_run.run_uuid in runs]
        names = set()
        for trace in linked:
            run_uuid = transport.trace_links[bytes.fromhex(trace.removeprefix("tr-"))]
            names.add(transport.runs[run_uuid].tags["run_id"])
        assert names == {f"{model}-{case}" for case in range(3)}


def test_a_benchmark_on_a_sink_that_is_not_mlflows_logs_nothing_and_never_raises() -> None:
    with rlm_mlflow.benchmark(object(), "bench") as bench:
        bench.record("any", expected="x")


# -- DSPy's dspy.Evaluate ---------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.filterwarnings("ignore:Passing OpenAI-style message dictionaries:DeprecationWarning")
def test_dspy_evaluate_of_an_rlm_is_an_evaluation_run_with_its_examples_as_cases(
    mlflow_server: MlflowServer, mlflow_client: Any, experiment_name: str, tmp_path: Path
) -> None:
    """The real ``dspy.Evaluate`` of a real ``dspy.RLM`` (a scripted DummyLM, two threads):
    one evaluation run; each example's run is a case whose trace has the example's answer as
    its expectation and the metric's score as Feedback; ``exact_match/mean`` is the score."""
    dspy = pytest.importorskip("dspy")
    from dspy.primitives.local_interpreter import LocalInterpreter
    from dspy.utils.dummies import DummyLM

    from rlm_mlflow.dspy import RLMCallback

    said = {"2+2": "4", "3*3": "9", "10-7": "2"}  # the last one is wrong
    lm = DummyLM({q: {"reasoning": "r", "code": f"SUBMIT(answer='{a}')"} for q, a in said.items()})
    sink = MLflowSink(
        enabled=True, experiment=experiment_name, tracking_uri=mlflow_server.uri, **FAST
    )
    devset = [
        dspy.Example(question=q, answer=a).with_inputs("question")
        for q, a in zip(QUESTIONS, ANSWERS, strict=True)
    ]

    def exact_match(example: Any, prediction: Any, trace: Any = None) -> bool:
        return bool(example.answer == prediction.answer)

    report = tmp_path / "evaluate.json"
    try:
        dspy.configure(lm=lm, callbacks=[RLMCallback(sink)])
        rlm = dspy.RLM("question -> answer", max_iters=3, interpreter_factory=LocalInterpreter)
        evaluate = dspy.Evaluate(
            devset=devset, metric=exact_match, num_threads=2, save_as_json=str(report)
        )
        result = evaluate(rlm)
    finally:
        dspy.configure(lm=None, callbacks=[])
    sink.close(WAIT)
    assert result.score == pytest.approx(200 / 3, abs=0.01)
    status = sink.status()
    assert status["deferred"] == 0, status
    assert not status["rejected"], status

    (run,) = evaluation_runs(mlflow_client, experiment_name).values()
    assert run.data.params["metric"] == "exact_match"
    assert run.data.params["program"] == "RLM"
    assert run.data.params["devset_size"] == "3"
    assert run.data.metrics["exact_match/mean"] == pytest.approx(2 / 3)
    assert run.data.metrics["completed/mean"] == 1.0
    assert run.data.metrics["cases"] == 3
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == [run.info.run_name]
    artifacts = [f.path for f in mlflow_client.list_artifacts(run.info.run_id)]
    assert any("evaluate.json" in path for path in artifacts), artifacts
    traces = list(linked_traces(mlflow_client, run).values())
    assert len(traces) == 3
    by_answer = {}
    for trace in traces:
        named = by_name(trace)
        assert sorted(named) == ["completed", "exact_match", "expected_response"], named
        (expected,) = named["expected_response"]
        (score,) = named["exact_match"]
        by_answer[expected.value] = score.value
    assert by_answer == {"4": True, "9": True, "3": False}


# -- RLM Code's run_benchmark -----------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.filterwarnings("ignore:PureRLMEnvironment is using exec:UserWarning")
def test_rlm_code_run_benchmark_under_rlm_mlflow_run_is_an_evaluation_run(
    mlflow_server: MlflowServer, mlflow_client: Any, experiment_name: str, tmp_path: Path
) -> None:
    """RLM Code's real runner and ``run_benchmark`` (a pack of two cases with expected answers,
    a scripted model), switched on by ``rlm-mlflow run`` only: one evaluation run with the
    preset, mode and model as params, each case's trace linked to it with its reward,
    completion, expected answer and RLM Code's ``answer_match``; RLM Code's summary file as its
    artifact."""
    import subprocess
    import sys

    from promises_support import child_env
    from rlm_code_support import import_or_install

    import_or_install()
    pack = tmp_path / "pack.json"
    cases = [
        {"id": "right", "task": "plain one", "environment": "generic", "expected_answer": "done"},
        {"id": "wrong", "task": "plain two", "environment": "generic", "expected_answer": "42"},
    ]
    pack.write_text(json.dumps({"presets": {"mini": {"cases": cases}}}), encoding="utf-8")
    script = Path(__file__).resolve().parent / "agents" / "rlm_code_benchmark.py"
    launcher = str(Path(sys.executable).with_name("rlm-mlflow"))
    env = child_env(
        DSPY_RLM_MLFLOW_ENABLED="true",
        DSPY_RLM_MLFLOW_EXPERIMENT=experiment_name,
        MLFLOW_TRACKING_URI=mlflow_server.uri,
    )
    done = subprocess.run(
        [launcher, "run", "--", sys.executable, str(script), str(tmp_path / "runs"), str(pack)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    summary = Path(done.stdout.split("SUMMARY ", 1)[1].split()[0])

    (run,) = evaluation_runs(mlflow_client, experiment_name).values()
    params = run.data.params
    assert (params["preset"], params["mode"], params["model"]) == ("mini", "native", "scripted")
    assert params["max_steps"] == "5"
    assert run.data.metrics["answer_match/mean"] == 0.5
    assert run.data.metrics["completed/mean"] == 1.0
    assert run.data.metrics["cases"] == 2
    artifacts = [f.path for f in mlflow_client.list_artifacts(run.info.run_id)]
    assert summary.name in artifacts, artifacts
    traces = list(linked_traces(mlflow_client, run).values())
    assert len(traces) == 2
    found = {}
    for trace in traces:
        named = by_name(trace)
        assert sorted(named) == [
            "answer_match",
            "completed",
            "expected_response",
            "total_reward",
        ], named
        found[named["expected_response"][0].value] = named["answer_match"][0].value
    assert found == {"done": True, "42": False}


def test_a_benchmarks_end_record_keeps_its_cases_figures_and_only_well_formed_ones() -> None:
    from rlm_mlflow import _codec

    cases: dict[Any, Any] = {3: {"reward": 1.0, "completed": 1.0, "verdict:judge": 0.0}, 4: {}}
    payload = _codec.encode_end(1, 2, run_id="bench", status="FINISHED", cases=cases)
    end = _codec.decode(payload)
    assert isinstance(end, RunEnd)
    assert end.cases == {3: {"reward": 1.0, "completed": 1.0, "verdict:judge": 0.0}, 4: {}}
    odd: dict[Any, Any] = {"x": {"reward": 1.0}, 4: {"reward": "a", "tokens": 5, "ok": True}}
    damaged = _codec.encode_end(1, 2, run_id="bench", status="FINISHED", cases=odd)
    assert _codec.decode(damaged).cases == {4: {"tokens": 5.0}}  # type: ignore[union-attr]
    plain = _codec.decode(_codec.encode_end(1, 2, run_id="run", status="FINISHED"))
    assert plain.cases is None  # type: ignore[union-attr]

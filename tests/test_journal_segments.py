"""Journal segments go as soon as everything in them is sent, while the sink is still busy."""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from promises_support import WAIT, Agent, Store, assert_each_once, replay_cli, wait_until
from rlm_mlflow import MLflowSink, TransientError
from rlm_mlflow._journal import Segment
from rlm_mlflow.testing import MemoryTransport, MlflowServer


@pytest.mark.integration
def test_a_segment_sealed_after_its_records_were_sent_is_removed_while_the_sink_runs(
    mlflow_server: MlflowServer,
    store: Store,
    experiment_name: str,
    journal_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each step is sent before the next one is made, so every segment fills up (and is
    sealed) after all its records were confirmed sent: those files must still go, and their
    mappings be released, while the process goes on."""
    import rlm_mlflow._journal

    monkeypatch.setattr(rlm_mlflow._journal, "FIRST_SEGMENT", 4096)  # many segments
    monkeypatch.setattr(rlm_mlflow._journal, "MAX_SEGMENT", 4096)
    sink = MLflowSink(
        enabled=True, experiment=experiment_name, tracking_uri=mlflow_server.uri, flush_interval=5
    )
    try:
        sink.on_run_start("long", task="t", environment="e", params={})
        steps = 0

        seen: list[Segment] = []

        def lane_segments() -> list[Segment]:
            journal = sink._pipeline.journal
            assert journal is not None
            for segment in list(journal._local.lane.lane.segments):
                if segment not in seen:
                    seen.append(segment)
            return seen

        while len(lane_segments()) < 5:
            sink.on_step("long", event={"step": steps, "reward": 1.0}, cumulative_reward=1.0)
            steps += 1
            assert sink.flush(WAIT), sink.status()
            assert steps < 2000, "the segments never filled up"
        segments = lane_segments()
        # The first holds the open run's start (replay needs it); the last is being written.
        sealed = [s for s in segments[1:-1] if s.sealed]
        assert len(sealed) >= 3
        wait_until(
            lambda: all(s.removed and not s.path.exists() for s in sealed),
            WAIT,
            "the sealed segments whose records were all sent are removed",
        )
        assert segments[0].path.exists()
        journal = sink._pipeline.journal
        assert journal is not None
        wait_until(
            lambda: not [s for s in journal._local.lane.lane.segments if s in sealed],
            WAIT,
            "the removed segments are dropped from the lane",
        )
        assert sink.status()["state"] != "closed"
        sink.on_run_end("long", result={"completed": True}, run_path=None)
    finally:
        sink.close(WAIT)
    run = store.run(experiment_name, "long")
    assert_each_once(store.steps(run), range(steps))
    assert run.info.status == "FINISHED"
    assert list(journal_dir.iterdir()) == []


def root_states(store: Store, experiment: str) -> dict[str, str]:
    """The status of each trace's root span (when it was sent), by the root's RLM run id."""
    experiment_id = store.experiment_id(experiment)
    assert experiment_id is not None
    out: dict[str, str] = {}
    for trace in store.client.search_traces(locations=[experiment_id]):
        for root in [s for s in trace.data.spans if s.parent_id is None]:  # none while running
            out[str(root.attributes.get("rlm.run_id"))] = str(root.status.status_code.value)
    return out


@pytest.mark.integration
@pytest.mark.slow
def test_replay_never_kills_a_run_whose_end_was_sent_from_a_removed_segment(
    agents: Callable[..., Agent],
    mlflow_server: MlflowServer,
    store: Store,
    experiment_name: str,
    journal_dir: Path,
) -> None:
    """kill -9 after a run's end was sent and its segment removed, while its start is still in
    a segment kept for another run's start: replay ends only the open run, KILLED, and the
    ended run keeps its FINISHED status and its root span its OK status."""
    agent = agents("end_in_removed_segment.py", mlflow_server.uri, experiment_name)
    agent.expect("READY", 180)
    wait_until(
        lambda: store.run(experiment_name, "done").info.status == "FINISHED",
        WAIT,
        "the ended run is FINISHED on the server",
    )
    wait_until(
        lambda: root_states(store, experiment_name).get("done") == "OK",
        WAIT,
        "the ended run's root span is OK",
    )
    agent.kill9()
    done = replay_cli(journal_dir, tracking_uri=mlflow_server.uri)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "runs ended KILLED 1" in done.stdout, done.stdout
    runs = store.by_name(experiment_name)
    assert runs["done"].info.status == "FINISHED"
    assert runs["open"].info.status == "KILLED"
    assert_each_once(store.steps(runs["done"]), range(3))
    states = root_states(store, experiment_name)
    assert states["done"] == "OK", states
    assert states["open"] == "ERROR", states


class _Refusing(MemoryTransport):
    """Answers ``(call, RLM run id)`` pairs in ``refused`` with a transient failure (for
    ``log_batch``: batches with metric points)."""

    def __init__(self, refused: set[tuple[str, str]]) -> None:
        super().__init__()
        self.refused = refused

    def _check(self, call: str, run_uuid: str) -> None:
        with self.lock:
            name = self.runs[run_uuid].tags.get("run_id", "")
        if (call, name) in self.refused:
            raise TransientError(f"{call} of {name} failed this time")

    def log_batch(self, run_uuid: str, **kwargs: Any) -> None:
        if kwargs.get("metrics"):  # a start's params and tags go through
            self._check("log_batch", run_uuid)
        super().log_batch(run_uuid, **kwargs)

    def set_terminated(self, run_uuid: str, *, status: str, end_time_ms: int) -> None:
        self._check("set_terminated", run_uuid)
        super().set_terminated(run_uuid, status=status, end_time_ms=end_time_ms)


def small_segments_sink(
    transport: MemoryTransport, monkeypatch: pytest.MonkeyPatch, **settings: Any
) -> MLflowSink:
    """A sink into ``transport`` whose journal segments hold 4 KiB (many of them), draining
    often and giving up on a failing request quickly (kept for replay)."""
    import rlm_mlflow._journal

    monkeypatch.setattr(rlm_mlflow._journal, "FIRST_SEGMENT", 4096)
    monkeypatch.setattr(rlm_mlflow._journal, "MAX_SEGMENT", 4096)
    return MLflowSink(
        transport=transport,
        enabled=True,
        experiment="unit",
        flush_interval=0.05,
        retry_deadline=0.2,
        retry_initial=0.01,
        retry_max_wait=0.05,
        **settings,
    )


@pytest.mark.parametrize("traces", ["full", "off"])
@pytest.mark.parametrize("ended", ["ended", "killed"])
def test_a_replay_that_fails_a_runs_steps_keeps_its_sent_start_for_the_next_replay(
    ended: str, traces: str, journal_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run "a" was created live (its start record done), then its steps failed and were kept.
    A first replay fails them again while it finishes every other record of the segment that
    holds a's start: that segment must stay, and the next replay ends a with each of its steps
    once. ``killed``: the process died with a open, and only its start says so (without it, a
    stayed RUNNING for good); ``ended``: a's end is in the journal beside its steps."""
    from rlm_mlflow import replay

    live = _Refusing({("log_batch", "a"), ("set_terminated", "b")})
    sink = small_segments_sink(live, monkeypatch, traces=traces)
    sink.on_run_start("a", task="t", environment="e", params={})
    sink.on_run_start("b", task="t", environment="e", params={})
    sink.on_step("b", event={"step": 0, "reward": 1.0}, cumulative_reward=1.0)
    sink.on_run_end("b", result={"completed": True, "steps": 1}, run_path=None)
    assert sink.flush(1.0) is False  # b's end is refused: kept
    journal = sink._pipeline.journal
    assert journal is not None
    lane = journal._local.lane.lane
    first = lane.segments[0]
    filler = 0
    while lane.segment is first:  # c's steps fill the segment: a's steps go to another one
        sink.on_step("c", event={"step": filler, "reward": 1.0}, cumulative_reward=1.0)
        filler += 1
    for number in range(3):
        sink.on_step("a", event={"step": number, "reward": 1.0}, cumulative_reward=1.0)
    if ended == "ended":
        sink.on_run_end("a", result={"completed": True, "steps": 3}, run_path=None)
    assert sink.flush(1.0) is False
    assert live.one("a").status == "RUNNING"
    replayed = _Refusing({("log_batch", "a")})
    replayed.experiments = live.experiments
    replayed.runs = copy.deepcopy(live.runs)  # the store as the process left it
    kept = journal_dir
    if ended == "killed":  # the files as a process killed now leaves them: a open, no end
        kept = tmp_path / "killed"
        shutil.copytree(journal_dir, kept)
    sink.close(1.0)
    assert first.path.exists()

    first_replay = replay(kept, transport=replayed, retry_deadline=0.2)
    assert not first_replay.ok, first_replay
    assert first_replay.failed > 0, first_replay
    assert replayed.one("b").status == "FINISHED"

    replayed.refused = set()
    second = replay(kept, transport=replayed)
    assert second.ok, second
    run = replayed.one("a")
    assert run.status == ("FINISHED" if ended == "ended" else "KILLED")
    assert [m.step for m in run.metrics if m.key == "step_reward"] == [0, 1, 2]
    assert list(kept.iterdir()) == []


def test_a_run_ended_while_its_earlier_steps_wait_for_replay_keeps_its_start_for_it(
    journal_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Child run c's steps are kept for replay (their batch failed), then c ends and its end is
    sent. The segment holding c's start must stay while those steps wait: after a kill, replay
    logs them to c and puts their spans in the trace of c's root, under c."""
    from rlm_mlflow import replay

    live = _Refusing(set())
    sink = small_segments_sink(live, monkeypatch)
    filler = iter(range(10**6))

    def next_segment() -> None:
        """Steps of run d until the lane writes to a new segment."""
        journal = sink._pipeline.journal
        assert journal is not None
        lane = journal._local.lane.lane
        segment = lane.segment
        while lane.segment is segment:
            sink.on_step("d", event={"step": next(filler), "reward": 1.0}, cumulative_reward=1.0)

    sink.on_run_start("r", task="t", environment="e", params={})
    sink.on_run_start("d", task="t", environment="e", params={})  # its steps fill segments
    next_segment()
    sink.on_run_start("c", task="t", environment="e", params={"parent_run_id": "r"})
    assert sink.flush(WAIT)
    next_segment()
    assert sink.flush(WAIT)  # the segment with c's start: every record in it sent
    live.refused = {("log_batch", "c")}
    live.fail = lambda call: TransientError("down") if call == "export_spans" else None
    for number in range(3):
        sink.on_step("c", event={"step": number, "reward": 1.0}, cumulative_reward=1.0)
    assert sink.flush(WAIT) is False  # c's steps are kept for replay
    live.refused, live.fail = set(), None
    next_segment()
    sink.on_run_end("c", result={"completed": True, "steps": 3}, run_path=None)
    assert sink.flush(WAIT)  # c's end is sent; its steps still wait for replay
    assert sink.status()["deferred"] >= 3, sink.status()
    assert live.one("c").status == "FINISHED"
    store = copy.copy(live)  # the store and the files as a process killed now leaves them
    store.runs, store.spans = copy.deepcopy(live.runs), copy.deepcopy(live.spans)
    kept = tmp_path / "killed"
    shutil.copytree(journal_dir, kept)
    sink.close(1.0)

    report = replay(kept, transport=store)
    assert report.ok, report
    child = store.one("c")
    assert child.status == "FINISHED"
    assert [m.step for m in child.metrics if m.key == "step_reward"] == [0, 1, 2]
    of_run: dict[str, set[bytes]] = {}
    for (trace_id, _), span in store.spans.items():
        (run_id,) = [a.value.string_value for a in span.attributes if a.key == "rlm.run_id"]
        of_run.setdefault(run_id, set()).add(bytes(trace_id))
    of_run.pop("d")
    # c's spans, the replayed steps' too, are c's and in r's trace. Before: those steps went
    # to a trace of their own, named by c's key.
    assert set(of_run) == {"r", "c"}, of_run
    assert len(of_run["r"] | of_run["c"]) == 1, of_run

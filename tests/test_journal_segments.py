"""Journal segments go as soon as everything in them is sent, while the sink is still busy."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from promises_support import WAIT, Agent, Store, assert_each_once, replay_cli, wait_until
from rlm_mlflow import MLflowSink
from rlm_mlflow._journal import Segment
from rlm_mlflow.testing import MlflowServer


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

"""An idle sink's journal is swapped by the worker for a fresh one: the first hook after the
idle time finds a journal ready and makes no file on the agent's thread."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from promises_support import patient
from rlm_mlflow import MLflowSink
from rlm_mlflow._journal import Journal
from rlm_mlflow.testing import MemoryTransport, wait_for


def run_one(sink: MLflowSink, run_id: str) -> None:
    sink.on_run_start(run_id, task="t", environment="e", params={})
    for i in range(3):
        sink.on_step(run_id, event={"step": i, "reward": 0.5}, cumulative_reward=0.5 * (i + 1))
    sink.on_run_end(run_id, result={"completed": True, "steps": 3}, run_path=None)


def test_the_first_hook_after_idle_makes_no_journal_on_the_agent_thread(
    journal_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import rlm_mlflow._pipeline
    import rlm_mlflow._worker

    monkeypatch.setattr(rlm_mlflow._worker, "JOURNAL_IDLE", 0.0)
    made: list[tuple[threading.Thread, Path]] = []

    class Watched(Journal):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append((threading.current_thread(), self.folder))

    monkeypatch.setattr(rlm_mlflow._pipeline, "Journal", Watched)
    agent = threading.current_thread()
    memory = MemoryTransport()
    sink = MLflowSink(enabled=True, experiment="idle", transport=memory, flush_interval=0.05)
    try:
        run_one(sink, "first")  # the first event of a sink makes its journal: in the hook
        assert [thread for thread, _ in made] == [agent]
        first = made[0][1]
        assert sink.flush(patient(10))
        assert wait_for(lambda: not first.exists(), 10), "the idle journal never went"
        in_hooks = sum(thread is agent for thread, _ in made)

        run_one(sink, "second")  # the first hooks after the idle time

        assert sum(thread is agent for thread, _ in made) == in_hooks, made
        assert sink.flush(patient(10))
        current = sink.status()["journal"]
        assert current is not None
        (maker,) = [thread for thread, folder in made if folder == Path(current)]
        assert maker is not agent  # made ahead, by the worker
    finally:
        sink.close(10)
    assert [r.status for r in memory.runs.values()] == ["FINISHED", "FINISHED"]
    assert list(journal_dir.iterdir()) == []


def test_a_journal_never_written_to_is_not_swapped_again(
    journal_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fresh journal of an idle sink stays as it is: idling makes no new folders."""
    import rlm_mlflow._pipeline
    import rlm_mlflow._worker

    monkeypatch.setattr(rlm_mlflow._worker, "JOURNAL_IDLE", 0.0)
    made: list[Path] = []

    class Watched(Journal):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self.folder)

    monkeypatch.setattr(rlm_mlflow._pipeline, "Journal", Watched)
    sink = MLflowSink(
        enabled=True, experiment="idle", transport=MemoryTransport(), flush_interval=0.01
    )
    try:
        run_one(sink, "first")
        assert sink.flush(patient(10))
        # The journal the hooks wrote is swapped once for a fresh one (it may already be).
        assert wait_for(lambda: len(made) >= 2 and not made[0].exists(), 10), made
        fresh = made[1]
        assert wait_for(lambda: sink.status()["journal"] == str(fresh), 10)
        # Idle for many worker cycles (0.01 s each): the fresh journal stays.
        assert not wait_for(lambda: len(made) > 2 or sink.status()["journal"] != str(fresh), 1.0)
        assert [p.name for p in journal_dir.iterdir()] == [fresh.name]
    finally:
        sink.close(10)


def test_a_process_making_journals_all_day_remembers_only_the_latest_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sink idle all day lets go of its journal and makes a new one thousands of times: the
    names remembered (so that none is given twice within a second) stay bounded, and a name
    made in the same second as a removed one is still never reused."""
    from rlm_mlflow import _journal

    seconds = iter(["20261205T100000"] * 6 + ["20261205T100001"] * 4)
    monkeypatch.setattr(_journal, "_second", lambda: next(seconds))
    monkeypatch.setattr(_journal, "MADE_KEPT", 4)
    monkeypatch.setattr(_journal, "_MADE", {})
    folders = []
    for _ in range(10):
        journal = Journal(tmp_path, prefix="0123456789abcdef", experiment="e", tracking_uri=None)
        folders.append(journal.folder)
        journal.close(keep=False)
        assert not journal.folder.exists()
    assert len(set(folders)) == 10  # six of one second, past the bound, and four of the next
    assert list(_journal._MADE) == folders[-4:]

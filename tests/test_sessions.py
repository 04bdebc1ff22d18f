"""Sessions: root runs carry the session (and user) MLflow's Sessions page groups traces by.

Against a real server, read back with ``MlflowClient``: trace metadata ``mlflow.trace.session``
and ``mlflow.trace.user``, and ``search_traces`` filtered by session. The session comes from
``rlm_mlflow.session`` (sync, threads started inside it, asyncio and trio tasks), RLM Code's chat
session (its real runner, two turns), the sink's settings, and survives ``kill -9`` + replay.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import rlm_mlflow
from promises_support import Store, replay_cli, wait_until
from rlm_mlflow import MLflowSink
from rlm_mlflow.testing import MlflowServer
from test_rlm_code import FakeExecutionEngine, ScriptedModel, rlm_code  # noqa: F401

pytestmark = pytest.mark.integration

FAST: dict[str, Any] = {"flush_interval": 0.1, "retry_initial": 0.05, "retry_max_wait": 0.5}
SESSION = "mlflow.trace.session"
USER = "mlflow.trace.user"


def sessions_of(store: Store, experiment: str) -> dict[str, tuple[str | None, str | None]]:
    """Each trace's root run id -> (session, user) as MLflow holds them."""
    experiment_id = store.experiment_id(experiment)
    assert experiment_id is not None
    found = {}
    for trace in store.client.search_traces(locations=[experiment_id]):
        metadata = trace.info.trace_metadata
        found[trace.info.tags["run_id"]] = (metadata.get(SESSION), metadata.get(USER))
    return found


def in_session(store: Store, experiment: str, session: str) -> set[str]:
    """The root run ids of the traces ``search_traces`` finds in ``session``."""
    experiment_id = store.experiment_id(experiment)
    found = store.client.search_traces(
        locations=[experiment_id], filter_string=f"metadata.`{SESSION}` = '{session}'"
    )
    return {trace.info.tags["run_id"] for trace in found}


def one_run(sink: MLflowSink, run_id: str, parent: str | None = None) -> None:
    params = {"parent_run_id": parent} if parent else {}
    sink.on_run_start(run_id, task=f"task of {run_id}", environment="generic", params=params)
    sink.on_step(run_id, event={"step": 1, "reward": 1.0}, cumulative_reward=1.0)
    sink.on_run_end(run_id, result={"completed": True}, run_path=None)


def test_a_session_context_and_the_setting(
    mlflow_server: MlflowServer, store: Store, experiment_name: str
) -> None:
    """Runs inside ``rlm_mlflow.session`` carry it (and its user); a thread started inside it
    too; a nested context gives what it names and keeps the rest; a run outside any context
    takes the sink's setting; a child run stays in its root's trace."""
    with MLflowSink(
        enabled=True,
        experiment=experiment_name,
        tracking_uri=mlflow_server.uri,
        session="default-session",
        **FAST,
    ) as sink:
        one_run(sink, "outside")
        with rlm_mlflow.session("chat-1", user="ada"):
            sink.on_run_start("turn-1", task="first", environment="generic", params={})
            one_run(sink, "child-1", parent="turn-1")
            sink.on_run_end("turn-1", result={"completed": True}, run_path=None)
            worker = threading.Thread(target=one_run, args=(sink, "in-a-thread"))
            worker.start()
            worker.join(60)
            with rlm_mlflow.session(user="grace"):
                one_run(sink, "nested")
        one_run(sink, "after")
        assert sink.flush(60)
    wait_until(lambda: len(sessions_of(store, experiment_name)) == 5, 60, "five traces")
    assert sessions_of(store, experiment_name) == {
        "outside": ("default-session", None),
        "turn-1": ("chat-1", "ada"),
        "in-a-thread": ("chat-1", "ada"),
        "nested": ("chat-1", "grace"),
        "after": ("default-session", None),
    }
    assert in_session(store, experiment_name, "chat-1") == {"turn-1", "in-a-thread", "nested"}
    experiment_id = store.experiment_id(experiment_name)
    for found in store.client.search_traces(locations=[experiment_id]):
        trace = store.client.get_trace(found.info.trace_id)
        assert trace.info.trace_metadata.get(SESSION) == found.info.trace_metadata.get(SESSION)
        (root,) = [span for span in trace.data.spans if span.parent_id is None]
        assert root.attributes.get("session.id") == found.info.trace_metadata.get(SESSION)


def test_asyncio_and_trio_tasks_each_keep_their_own_session(
    mlflow_server: MlflowServer, store: Store, experiment_name: str
) -> None:
    """Tasks that open sessions of their own and interleave on one thread never take each
    other's; a task started inside a session takes it; in asyncio and in trio."""
    import trio

    sink = MLflowSink(
        enabled=True, experiment=experiment_name, tracking_uri=mlflow_server.uri, **FAST
    )

    def start(run_id: str) -> None:
        sink.on_run_start(run_id, task="a turn", environment="generic", params={})

    def end(run_id: str) -> None:
        sink.on_step(run_id, event={"step": 1, "reward": 1.0}, cumulative_reward=1.0)
        sink.on_run_end(run_id, result={"completed": True}, run_path=None)

    async def asyncio_turn(name: str, both_started: asyncio.Barrier) -> None:
        with rlm_mlflow.session(name, user=f"user of {name}"):
            await both_started.wait()  # the other task opened its session meanwhile
            start(name)
            await both_started.wait()
            end(name)

    async def asyncio_main() -> None:
        both_started = asyncio.Barrier(2)
        await asyncio.gather(
            asyncio_turn("asyncio-a", both_started), asyncio_turn("asyncio-b", both_started)
        )
        with rlm_mlflow.session("asyncio-outer"):
            await asyncio.create_task(asyncio.to_thread(one_run, sink, "asyncio-to-thread"))
            await asyncio.create_task(asyncio_run("asyncio-inherited"))
        one_run(sink, "asyncio-none")

    async def asyncio_run(run_id: str) -> None:
        one_run(sink, run_id)

    async def trio_turn(name: str, opened: trio.Event, other: trio.Event) -> None:
        with rlm_mlflow.session(name):
            opened.set()
            await other.wait()
            start(name)
            await trio.lowlevel.checkpoint()
            end(name)

    async def trio_main() -> None:
        a, b = trio.Event(), trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio_turn, "trio-a", a, b)
            nursery.start_soon(trio_turn, "trio-b", b, a)
        with rlm_mlflow.session("trio-outer"):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio_run, "trio-inherited")

    async def trio_run(run_id: str) -> None:
        one_run(sink, run_id)

    try:
        asyncio.run(asyncio_main())
        trio.run(trio_main)
        assert sink.flush(60)
    finally:
        sink.close()
    wait_until(lambda: len(sessions_of(store, experiment_name)) == 8, 60, "eight traces")
    assert sessions_of(store, experiment_name) == {
        "asyncio-a": ("asyncio-a", "user of asyncio-a"),
        "asyncio-b": ("asyncio-b", "user of asyncio-b"),
        "asyncio-to-thread": ("asyncio-outer", None),
        "asyncio-inherited": ("asyncio-outer", None),
        "asyncio-none": (None, None),
        "trio-a": ("trio-a", None),
        "trio-b": ("trio-b", None),
        "trio-inherited": ("trio-outer", None),
    }


# -- DSPy -------------------------------------------------------------------------------------


def test_dspy_calls_inside_a_session(
    mlflow_server: MlflowServer, store: Store, experiment_name: str
) -> None:
    """The real ``dspy.RLM`` (DummyLM) through ``RLMCallback``: a call inside a session, calls
    on a thread pool started inside one, concurrent ``acall``s each in a session of its own, and
    a call outside any."""
    from concurrent.futures import ThreadPoolExecutor

    import dspy
    from dspy.primitives.local_interpreter import LocalInterpreter

    from rlm_mlflow.dspy import RLMCallback
    from test_dspy import concurrent_lms

    count = 6
    main, sub = concurrent_lms(count)
    sink = MLflowSink(
        enabled=True, experiment=experiment_name, tracking_uri=mlflow_server.uri, **FAST
    )
    dspy.configure(lm=main, callbacks=[RLMCallback(sink)])
    try:
        rlm = dspy.RLM(
            "query -> answer", max_iters=4, sub_lm=sub, interpreter_factory=LocalInterpreter
        )
        with rlm_mlflow.session("dspy-sync", user="ada"):
            rlm(query="task-0")
        with rlm_mlflow.session("dspy-pool"), ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda n: rlm(query=f"task-{n}"), (1, 2)))

        async def turn(n: int) -> Any:
            with rlm_mlflow.session(f"dspy-async-{n}"):
                return await rlm.acall(query=f"task-{n}")

        async def both() -> None:
            await asyncio.gather(turn(3), turn(4))

        asyncio.run(both())
        rlm(query="task-5")
        assert sink.flush(60)
    finally:
        sink.close()
        dspy.configure(lm=None, callbacks=[])
    experiment_id = store.experiment_id(experiment_name)

    def by_task() -> dict[str, tuple[str | None, str | None]]:
        found = {}
        for trace in store.client.search_traces(locations=[experiment_id]):
            root = next(s for s in trace.data.spans if s.parent_id is None)
            metadata = trace.info.trace_metadata
            found[root.outputs["final_response"]] = (metadata.get(SESSION), metadata.get(USER))
        return found

    wait_until(lambda: len(by_task()) == count, 60, "a trace per call")
    assert by_task() == {
        "TASK-0": ("dspy-sync", "ada"),
        "TASK-1": ("dspy-pool", None),
        "TASK-2": ("dspy-pool", None),
        "TASK-3": ("dspy-async-3", None),
        "TASK-4": ("dspy-async-4", None),
        "TASK-5": (None, None),
    }


# -- RLM Code's chat turns ----------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:PureRLMEnvironment is using exec:UserWarning")
def test_two_chat_turns_of_one_rlm_code_session_share_it(
    rlm_code: Any,  # noqa: F811
    mlflow_server: MlflowServer,
    store: Store,
    experiment_name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """RLM Code's real runner, ``run_chat_turn`` twice in session ``support-42`` and once in
    another: MLflow holds each turn's trace in its chat session; a user given around the turns
    goes with them."""
    from rlm_code.rlm.observability import RLMObservability

    workdir = tmp_path / "work"
    workdir.mkdir()
    sink = MLflowSink(
        enabled=True, experiment=experiment_name, tracking_uri=mlflow_server.uri, **FAST
    )
    try:
        runner = rlm_code.RLMRunner(
            llm_connector=ScriptedModel(),
            execution_engine=FakeExecutionEngine(),
            run_dir=tmp_path / "runs",
            workdir=workdir,
            observability=RLMObservability(sinks=[sink]),
        )
        with rlm_mlflow.session(user="ada"):
            first = runner.run_chat_turn("what is in the repo?", session_id="support-42")
            second = runner.run_chat_turn("and in the tests?", session_id="support-42")
        other = runner.run_chat_turn("hello", session_id="other-7")
        assert runner.get_chat_session("support-42")["history_count"] == 2
        assert sink.flush(60)
    finally:
        sink.close()
    wait_until(lambda: len(sessions_of(store, experiment_name)) == 3, 60, "three traces")
    assert sessions_of(store, experiment_name) == {
        first.run_id: ("support-42", "ada"),
        second.run_id: ("support-42", "ada"),
        other.run_id: ("other-7", None),
    }
    assert in_session(store, experiment_name, "support-42") == {first.run_id, second.run_id}
    # What the Sessions page shows: MLflow's own grouping of the experiment's traces.
    import mlflow
    from mlflow.tracking import _tracking_service

    monkeypatch.setattr(_tracking_service.utils, "_tracking_uri", mlflow_server.uri)
    experiment_id = store.experiment_id(experiment_name)
    assert experiment_id is not None
    sessions = mlflow.search_sessions(locations=[experiment_id])
    turns = {found.id: sorted(t.info.tags["run_id"] for t in found) for found in sessions}
    assert turns == {
        "support-42": sorted([first.run_id, second.run_id]),
        "other-7": [other.run_id],
    }


# -- kill -9 and replay -------------------------------------------------------------------------


def test_replay_after_kill_9_keeps_the_session(
    agents: Callable[..., Any],
    mlflow_server: MlflowServer,
    store: Store,
    experiment_name: str,
    journal_dir: Path,
) -> None:
    """An agent killed with ``kill -9`` inside a session, its root run still open (its root
    span, which carries the session, never sent): the replay sends it with its session and user."""
    agent = agents("session_turns.py", mlflow_server.uri, experiment_name)
    agent.expect("STEP 3")
    agent.process.send_signal(signal.SIGKILL)
    agent.wait(30)
    done = replay_cli(journal_dir, tracking_uri=mlflow_server.uri)
    assert done.returncode == 0, done.stdout + done.stderr
    wait_until(lambda: len(sessions_of(store, experiment_name)) == 2, 60, "two traces")
    assert sessions_of(store, experiment_name) == {
        "ended": ("night-shift", "ada"),
        "killed": ("night-shift", "ada"),
    }
    assert store.run(experiment_name, "killed").info.status == "KILLED"


# -- settings and ids (no server) -----------------------------------------------------------------


def test_the_setting_from_the_environment_and_bad_ids() -> None:
    """``RLM_MLFLOW_SESSION``/``RLM_MLFLOW_USER`` set the setting; an id MLflow cannot keep is a
    ValueError where it is given (the constructor, ``from_env`` naming the variable, the
    context), never in a hook."""
    from rlm_mlflow._config import config_from_env

    config = config_from_env({"RLM_MLFLOW_SESSION": " nightly ", "RLM_MLFLOW_USER": "ci"})
    assert (config.session, config.user) == ("nightly", "ci")
    assert config_from_env({}).session is None
    with pytest.raises(ValueError, match="RLM_MLFLOW_SESSION"):
        config_from_env({"RLM_MLFLOW_SESSION": "x" * 251})
    for bad, why in (
        ("", "empty"),
        ("   ", "empty"),
        ("x" * 251, "at most 250"),
        ("lone \ud800", "surrogate"),
        (7, "must be a string"),
    ):
        with pytest.raises(ValueError, match=why):
            rlm_mlflow.SinkConfig(session=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=why):
            rlm_mlflow.session(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="session id, a user, or both"):
        rlm_mlflow.session()


def test_rlm_code_chat_turn_tasks_name_their_session() -> None:
    from rlm_mlflow._session import chat_session_of

    assert chat_session_of("RLM persistent chat session: support-42\nEnvironment: x") == (
        "support-42"
    )
    assert chat_session_of("RLM persistent chat session: s" + "x" * 400) == ("s" + "x" * 249)
    for other in ("plain task", "RLM persistent chat session: \nrest", None, 42, b"bytes"):
        assert chat_session_of(other) is None


def test_a_context_is_left_the_way_it_was_found() -> None:
    """Nesting and leaving restore the outer session; a context cannot be opened twice."""
    from rlm_mlflow._session import current

    outer = rlm_mlflow.session("outer", user="ada")
    with outer:
        with rlm_mlflow.session("inner") as inner:
            assert current() is inner
            assert (inner.id, inner.user) == ("inner", "ada")
            with pytest.raises(RuntimeError):
                inner.__enter__()
        assert current() is outer
        assert (inner.id, inner.user) == ("inner", None)
    assert current() is None


def test_a_running_turn_is_in_its_session_before_it_ends(
    mlflow_server: MlflowServer, store: Store, experiment_name: str
) -> None:
    """The steps of a root run carry its session too: its trace is in the session while it
    runs, not only once its root span is sent at its end."""
    with MLflowSink(
        enabled=True, experiment=experiment_name, tracking_uri=mlflow_server.uri, **FAST
    ) as sink:
        with rlm_mlflow.session("live", user="ada"):
            sink.on_run_start("running", task="a long turn", environment="generic", params={})
        sink.on_step("running", event={"step": 1, "reward": 1.0}, cumulative_reward=1.0)
        assert sink.flush(60)
        wait_until(
            lambda: sessions_of_running(store, experiment_name) == [("live", "ada")],
            60,
            "the running trace in its session",
        )
        sink.on_run_end("running", result={"completed": True}, run_path=None)


def sessions_of_running(store: Store, experiment: str) -> list[tuple[str | None, str | None]]:
    experiment_id = store.experiment_id(experiment)
    if experiment_id is None:
        return []
    return [
        (t.info.trace_metadata.get(SESSION), t.info.trace_metadata.get(USER))
        for t in store.client.search_traces(locations=[experiment_id])
    ]

"""A FastAPI app that runs agents in the background; its lifespan opens and closes the sink.

    pip install rlm-mlflow fastapi uvicorn
    export DSPY_RLM_MLFLOW_ENABLED=true
    export MLFLOW_TRACKING_URI=http://127.0.0.1:5000
    uvicorn --app-dir examples fastapi_app:app --port 8000

    curl -X POST localhost:8000/runs -H 'content-type: application/json' -d '{"task": "Sum primes"}'
    curl localhost:8000/runs/<run_id>            # {"run_id": ..., "done": true, "result": {...}}
    curl localhost:8000/sink                     # the sink's status(): queue, sent, dropped, ...

The sink's worker runs in uvicorn's event loop for as long as the app lives. On shutdown (Ctrl-C,
SIGTERM) the agents still running are cancelled, then leaving the sink's block sends what is
queued, within ``RLM_MLFLOW_SHUTDOWN_TIMEOUT`` (10 s by default), and ends every run: FINISHED if
it reached ``on_run_end``; KILLED if the signal that stopped the server cut it short (FAILED if
the app stopped any other way).
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, HTTPException, Request
from pydantic import BaseModel, Field

from agents import Result, run_agent
from rlm_mlflow import MLflowSink


class RunRequest(BaseModel):
    task: str
    steps: int = Field(default=6, ge=1, le=1000)
    children: int = Field(default=2, ge=0, le=8)
    think: float = Field(default=0.05, ge=0, le=60)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    run_dir = Path(os.environ.get("RLM_RUN_DIR") or tempfile.mkdtemp(prefix="rlm-mlflow-runs-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    async with MLflowSink.from_env() as sink, anyio.create_task_group() as agents:
        app.state.sink = sink
        app.state.agents = agents
        app.state.run_dir = run_dir
        app.state.results = {}
        yield
        agents.cancel_scope.cancel()  # shutting down: stop the agents still running
    # Here the sink has flushed and ended every run (or given up at its shutdown deadline).


app = FastAPI(title="RLM agents", lifespan=lifespan)


@app.post("/runs", status_code=202)
async def start_run(body: RunRequest, request: Request) -> dict[str, str]:
    """Start an agent in the background; its run appears in MLflow at once."""
    state = request.app.state
    run_id = f"run-{uuid.uuid4().hex[:12]}"
    results: dict[str, Result | None] = state.results
    results[run_id] = None

    async def agent() -> None:
        results[run_id] = await run_agent(
            state.sink,
            run_id,
            body.task,
            run_dir=state.run_dir,
            steps=body.steps,
            children=body.children,
            think=body.think,
        )

    state.agents.start_soon(agent)
    return {"run_id": run_id}


@app.get("/runs/{run_id}")
async def get_run(run_id: str, request: Request) -> dict[str, Any]:
    results: dict[str, Result | None] = request.app.state.results
    if run_id not in results:
        raise HTTPException(status_code=404, detail="no such run")
    result = results[run_id]
    return {"run_id": run_id, "done": result is not None, "result": result and asdict(result)}


@app.get("/sink")
async def sink_status(request: Request) -> dict[str, Any]:
    """The sink's figures: is MLflow reachable, what is queued, sent, dropped."""
    sink: MLflowSink = request.app.state.sink
    return sink.status()


@app.post("/sink/flush")
async def flush(request: Request, timeout: float = 10.0) -> dict[str, bool]:
    """Wait (up to ``timeout`` seconds) until everything accepted so far is in MLflow."""
    sink: MLflowSink = request.app.state.sink
    return {"flushed": await sink.aflush(timeout)}

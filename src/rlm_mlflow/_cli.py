"""``rlm-mlflow``: the command line (demo, status)."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ._config import config_from_env, redact_uri


def _demo(args: argparse.Namespace) -> int:
    from ._demo import print_report, run_demo

    report = run_demo(
        tasks=args.tasks,
        experiment=args.experiment,
        tracking_uri=args.tracking_uri,
        workdir=Path(args.workdir),
    )
    print_report(report)
    return 0 if report["flushed"] else 1


def _status(args: argparse.Namespace) -> int:
    try:
        config = config_from_env()
    except ValueError as exc:
        print(f"configuration error: {exc}")
        return 2
    problems: list[str] = []
    print(f"enabled           {config.enabled}  (DSPY_RLM_MLFLOW_ENABLED)")
    print(f"experiment        {config.experiment}  (DSPY_RLM_MLFLOW_EXPERIMENT)")
    uri = config.tracking_uri
    print(
        f"tracking URI      {redact_uri(uri) or 'MLflow default (./mlflow.db)'}"
        "  (MLFLOW_TRACKING_URI)"
    )
    print(f"queue             {config.queue_size} steps, overflow {config.overflow.value}")
    print(f"shutdown timeout  {config.shutdown_timeout:g} s")
    if not config.enabled:
        problems.append("the sink is disabled: set DSPY_RLM_MLFLOW_ENABLED=true")
    if importlib.util.find_spec("mlflow") is None:
        problems.append("mlflow is not installed: pip install mlflow")
        print("mlflow            not importable")
    if uri and uri.startswith(("http://", "https://")):
        print(f"server            {_probe(uri, args.timeout, problems)}")
    for problem in problems:
        print(f"problem: {problem}")
    return 1 if problems else 0


def _probe(uri: str, timeout: float, problems: list[str]) -> str:
    """Ask the server's health endpoint, once, with a short timeout."""
    import requests

    try:
        response = requests.get(uri.rstrip("/") + "/health", timeout=timeout)
    except requests.RequestException as exc:
        problems.append(
            f"the tracking server does not answer ({type(exc).__name__}); "
            "is it running, and is MLFLOW_TRACKING_URI right?"
        )
        return "unreachable"
    if response.status_code != 200:
        problems.append(f"the tracking server answered HTTP {response.status_code} on /health")
        return f"HTTP {response.status_code}"
    return "answers (GET /health is OK)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlm-mlflow",
        description="Send recursive language-model agent runs to MLflow without slowing the agent.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the sink does")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser(
        "demo",
        help="run a simulated RLM benchmark into MLflow",
        description="Run a simulated RLM benchmark (concurrent runs, recursive children, rewards) "
        "through the sink. With MLFLOW_TRACKING_URI unset the runs land in ./mlflow.db, "
        "MLflow's default store; no server is needed.",
    )
    demo.add_argument("--tasks", type=int, default=6, help="root tasks to run (default: 6)")
    demo.add_argument(
        "--experiment", default="rlm-mlflow-demo", help="experiment name (default: rlm-mlflow-demo)"
    )
    demo.add_argument(
        "--tracking-uri",
        default=None,
        help="where to send runs (default: MLFLOW_TRACKING_URI, else ./mlflow.db)",
    )
    demo.add_argument(
        "--workdir",
        default=os.getcwd(),
        help="folder for mlflow.db and the trajectories (default: here)",
    )
    demo.set_defaults(handler=_demo)

    status = commands.add_parser(
        "status",
        help="show the configuration and check the tracking server",
        description="Show the sink's configuration from the environment and check that mlflow "
        "imports and the tracking server answers. Exits 1 when something is wrong.",
    )
    status.add_argument(
        "--timeout", type=float, default=3.0, help="seconds to wait for the server (default: 3)"
    )
    status.set_defaults(handler=_status)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())

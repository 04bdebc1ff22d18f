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


class _ProgressBar:
    """A one-line progress bar on a terminal's stderr; silent elsewhere."""

    def __init__(self) -> None:
        self.enabled = sys.stderr.isatty()
        self._last = -1

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled or total <= 0:
            return
        percent = done * 100 // total
        if percent == self._last:
            return
        self._last = percent
        filled = percent * 30 // 100
        bar = "#" * filled + "." * (30 - filled)
        sys.stderr.write(f"\r[{bar}] {percent:3d}%  {done}/{total} events")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _replay(args: argparse.Namespace) -> int:
    from ._journal import default_journal_dir
    from ._replay import replay

    directory = Path(args.directory) if args.directory else default_journal_dir()
    report = replay(
        directory,
        tracking_uri=args.tracking_uri,
        experiment=args.experiment,
        retry_deadline=args.retry_deadline,
        progress=_ProgressBar(),
    )
    print(f"journals found     {report.journals} in {directory}")
    print(f"events read        {report.events}  (torn records skipped: {report.torn})")
    print(f"events sent        {report.sent}")
    print(f"runs ended KILLED  {report.runs_killed}  (left open by a process that died)")
    if report.in_use:
        print(f"in use, left alone {len(report.in_use)}  (their sink is still running)")
    if report.failed or report.kept:
        print(f"NOT sent           {report.failed} events; kept for the next replay in:")
        for folder in report.kept:
            print(f"  {folder}")
        return 1
    return 0


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
        print(f"server            {_probe(uri, args.timeout, problems, config.experiment)}")
    print(f"journal           {_journal_summary(config.journal, config.journal_dir)}")
    for problem in problems:
        print(f"problem: {problem}")
    return 1 if problems else 0


def _journal_summary(enabled: bool, folder: str | None) -> str:
    from ._journal import ScanStats, default_journal_dir, journal_segments, scan_segment
    from ._replay import journal_folders

    root = Path(folder) if folder else default_journal_dir()
    if not enabled:
        return f"off  (RLM_MLFLOW_JOURNAL); directory {root}"
    journals = journal_folders(root)
    backlog = 0
    for journal in journals:
        stats = ScanStats()
        for path in journal_segments(journal):
            backlog += sum(1 for r in scan_segment(path, stats) if not r.finished)
    text = f"{root}  ({len(journals)} journals, {backlog} events not yet confirmed sent)"
    if journals:
        text += "; 'rlm-mlflow replay' sends those of processes that have ended"
    return text


def _probe(uri: str, timeout: float, problems: list[str], experiment: str) -> str:
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
    # /health needs no credentials: ask for the experiment the way the sink will.
    from ._exceptions import PermanentError, TransientError
    from ._rest import RestTransport

    transport = RestTransport(uri, timeout=timeout)
    try:
        transport.request(
            "GET", "/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": experiment}
        )
    except PermanentError as exc:
        if exc.code != "RESOURCE_DOES_NOT_EXIST":
            problems.append(f"the tracking server refuses the sink's requests: {exc}")
            return f"answers, but refuses requests (HTTP {exc.status})"
        return "answers; the experiment will be created"
    except TransientError as exc:
        problems.append(f"the tracking server fails requests: {exc}")
        return "answers /health, fails requests"
    finally:
        transport.close()
    return "answers; credentials accepted, experiment exists"


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

    replay = commands.add_parser(
        "replay",
        help="send what journals kept after a crash, a kill or an outage",
        description="Send every event that journals hold and that never reached MLflow, "
        "exactly once, then end the runs their process left open (KILLED) and remove the "
        "journals. Journals of sinks still running are left alone. Exits 1 if something could "
        "not be sent (it stays for the next replay).",
    )
    replay.add_argument(
        "directory",
        nargs="?",
        default=None,
        help="a journal directory or one journal (default: RLM_MLFLOW_JOURNAL_DIR, "
        "else ~/.local/state/rlm-mlflow/journal)",
    )
    replay.add_argument(
        "--tracking-uri", default=None, help="send there instead of where the journal was headed"
    )
    replay.add_argument(
        "--experiment", default=None, help="send into this experiment instead of the journal's"
    )
    replay.add_argument(
        "--retry-deadline",
        type=float,
        default=60.0,
        help="seconds to keep retrying a failing request (default: 60)",
    )
    replay.set_defaults(handler=_replay)
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

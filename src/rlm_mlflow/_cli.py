"""``rlm-mlflow``: the command line (demo, status, replay, run)."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ._config import config_from_env, redact_text, redact_uri, why_disabled

if TYPE_CHECKING:
    from ._replay import ReplayReport


def _demo(args: argparse.Namespace) -> int:
    from ._demo import print_report, run_demo

    workdir = Path(args.workdir).resolve()
    uri = (
        args.tracking_uri
        or os.environ.get("MLFLOW_TRACKING_URI")
        or f"sqlite:///{workdir}/mlflow.db"
    )
    problem = store_problem(uri, timeout=5.0)
    if problem:
        print(f"problem: {problem}")
        print(
            "the demo did not run: fix the above, or unset MLFLOW_TRACKING_URI to use ./mlflow.db"
        )
        return 2
    report = run_demo(
        tasks=args.tasks,
        experiment=args.experiment,
        tracking_uri=uri,
        workdir=workdir,
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
    named = args.directory and directory.expanduser().resolve() != default_journal_dir().resolve()
    if named and not directory.is_dir():  # the default folder is made by the first journal
        what = "is a file, not a journal folder" if directory.exists() else "does not exist"
        print(f"rlm-mlflow replay: {directory} {what}", file=sys.stderr)
        print(f"journals are kept in {default_journal_dir()} unless RLM_MLFLOW_JOURNAL_DIR says")
        return 2
    report = replay(
        directory,
        tracking_uri=args.tracking_uri,
        experiment=args.experiment,
        retry_deadline=args.retry_deadline,
        progress=_ProgressBar(),
    )
    return print_replay_report(report, directory)


def print_replay_report(report: ReplayReport, directory: Path) -> int:
    """Say what a replay did, one line per fate of an event; 1 if something did not land."""
    if report.journals == 0:
        print(f"nothing to replay: no journal in {directory}")
        return 0
    print(
        f"journals          {report.journals} in {directory}: {report.replayed} sent in full "
        f"and removed, {len(report.kept)} kept, {len(report.in_use)} left alone (in use)"
    )
    print(f"waiting           {report.events} events had not been confirmed sent")
    print(f"sent now          {report.sent} events")
    if report.runs_sent != report.sent or report.spans_sent:
        print(
            f"landed now        {report.runs_sent} events in their MLflow runs, "
            f"{report.spans_sent} spans in traces"
        )
    print(
        f"sent before       {report.already_sent} events had reached MLflow already "
        "(the journals still held them; not sent again)"
    )
    not_sent = report.failed
    print(f"not sent          {not_sent} events (kept for the next replay)")
    print(f"refused           {report.refused} events MLflow refused for good (see the log)")
    if report.torn:
        print(f"torn              {report.torn} records skipped (cut short by a crash)")
    for damage in report.damaged:
        print(f"damaged           {damage} skipped (unreadable; the journal is kept)")
    print(f"runs ended KILLED {report.runs_killed} (left open by a process that died)")
    for folder in report.in_use:
        print(f"in use            {folder} (its sink is still running, or another replay)")
    for folder in report.kept:
        print(f"kept              {folder} (run 'rlm-mlflow replay' again to send the rest)")
    for problem in report.problems:
        print(f"problem: {problem}")
    failed = not_sent or report.refused or report.kept or report.problems or report.damaged
    return 1 if failed else 0


def _run(args: argparse.Namespace) -> int:
    from ._launcher import run

    return run(args.command)


def _status(args: argparse.Namespace) -> int:
    try:
        config = config_from_env()
    except ValueError as exc:
        print(f"configuration error: {exc}")
        return 2
    problems: list[str] = []
    print(f"enabled           {config.enabled}  (DSPY_RLM_MLFLOW_ENABLED)")
    print(f"experiment        {config.experiment}  (DSPY_RLM_MLFLOW_EXPERIMENT)")
    if not config.enabled:
        problems.append(
            f"the sink is disabled ({why_disabled(os.environ)}): set DSPY_RLM_MLFLOW_ENABLED=true"
        )
    mlflow_found = importlib.util.find_spec("mlflow") is not None
    uri = config.tracking_uri
    if uri:
        print(f"tracking URI      {redact_uri(uri)}  (MLFLOW_TRACKING_URI)")
    elif mlflow_found:
        uri = _default_tracking_uri()
        print(
            f"tracking URI      {redact_uri(uri)}  (MLflow's default: MLFLOW_TRACKING_URI is unset)"
        )
    else:
        print("tracking URI      MLflow's default  (MLFLOW_TRACKING_URI is unset)")
    print(f"queue             {config.queue_size} steps, overflow {config.overflow.value}")
    print(f"shutdown timeout  {config.shutdown_timeout:g} s")
    if not mlflow_found:
        problems.append(
            "mlflow is not installed: pip install mlflow-skinny (rlm-mlflow's own dependency)"
        )
        print("mlflow            not importable")
    invalid = tracking_uri_problem(uri) if uri else None
    if invalid:
        problems.append(invalid)
    elif uri and uri.startswith(("http://", "https://")):
        print(f"server            {_probe(uri, args.timeout, problems, config.experiment)}")
    elif uri and mlflow_found:
        missing = store_problem(uri, timeout=args.timeout)
        if missing:
            problems.append(missing)
    print(f"journal           {_journal_summary(config.journal, config.journal_dir)}")
    for problem in problems:
        print(f"problem: {problem}")
    return 1 if problems else 0


def _default_tracking_uri() -> str | None:
    try:
        import mlflow

        return str(mlflow.get_tracking_uri())
    except Exception:
        return None


#: Tracking URI schemes MLflow knows without plugins (a database's may name a driver: "+...").
KNOWN_SCHEMES = frozenset(
    {
        "http",
        "https",
        "file",
        "sqlite",
        "postgresql",
        "mysql",
        "mssql",
        "databricks",
        "databricks-uc",
        "uc",
    }
)


def tracking_uri_problem(uri: str) -> str | None:
    """What is wrong with a tracking URI's form, if anything (the server is not asked)."""
    import re
    from urllib.parse import urlsplit

    shown = redact_uri(uri)
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 (raises on a port out of range)
    except ValueError as exc:
        return f"MLFLOW_TRACKING_URI={shown!r} is not a valid URI ({exc})"
    if re.fullmatch(r"[A-Za-z0-9.-]+:[0-9]{1,5}(/\S*)?", uri):
        return (
            f"MLFLOW_TRACKING_URI={shown!r} looks like a server's address without its scheme: "
            f"write http://{uri}"
        )
    scheme = parts.scheme.lower()
    if not scheme or len(scheme) == 1:  # a path (or a Windows drive letter): a file store
        return None
    base = scheme.split("+", 1)[0]
    if base not in KNOWN_SCHEMES and scheme not in _plugin_schemes():
        known = ", ".join(sorted(KNOWN_SCHEMES))
        return (
            f"MLFLOW_TRACKING_URI={shown!r}: unknown scheme {parts.scheme!r} "
            f"(MLflow knows {known}, a path, and the schemes of installed plugins)"
        )
    if base in ("http", "https") and not parts.hostname:
        return (
            f"MLFLOW_TRACKING_URI={shown!r} names no host: write {base}://HOST:PORT "
            f"(e.g. {base}://127.0.0.1:5000)"
        )
    if base in ("postgresql", "mysql", "mssql") and not parts.netloc:
        return f"MLFLOW_TRACKING_URI={shown!r} names no database server: {base}://USER@HOST/DB"
    if base == "sqlite" and not uri.lower().startswith("sqlite://"):
        return f"MLFLOW_TRACKING_URI={shown!r}: write sqlite:///relative.db or sqlite:////abs.db"
    if base == "file" and not parts.path:
        return f"MLFLOW_TRACKING_URI={shown!r} names no folder: file:///path/to/mlruns"
    return None


def store_problem(uri: str, *, timeout: float) -> str | None:
    """Why the store at ``uri`` cannot be used from here, if it cannot: a malformed URI, a
    server that does not answer, a database that cannot be reached, a file store that this
    MLflow refuses. Asks the store once, within about ``timeout`` seconds."""
    invalid = tracking_uri_problem(uri)
    if invalid:
        return invalid
    shown = redact_uri(uri) or uri
    if uri.startswith(("http://", "https://")):
        import requests

        try:
            requests.get(uri.rstrip("/") + "/health", timeout=timeout)
        except requests.RequestException as exc:
            return (
                f"the tracking server at {shown} does not answer ({type(exc).__name__}); "
                "is it running, and is the URI right?"
            )
        return None
    if importlib.util.find_spec("mlflow") is None:
        return None  # said on its own
    from ._transports.client import embedded_store_problem

    missing = embedded_store_problem(uri)
    if missing:
        return missing
    if uri.startswith(("postgresql", "mysql", "mssql")):
        return _database_problem(uri, shown, timeout)
    if uri.startswith("file:") or "://" not in uri:
        return _file_store_problem(shown)
    return None


def _database_problem(uri: str, shown: str, timeout: float) -> str | None:
    """Connect to the database once, on a thread that is left behind if it hangs."""
    import concurrent.futures

    def connect() -> None:
        import sqlalchemy

        engine = sqlalchemy.create_engine(uri)
        try:
            with engine.connect():
                pass
        finally:
            engine.dispose()

    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        pool.submit(connect).result(timeout=max(timeout, 1.0))
    except concurrent.futures.TimeoutError:
        return f"the database at {shown} does not answer within {timeout:g} s"
    except Exception as exc:
        reason = redact_text(str(exc).splitlines()[0] if str(exc) else "", uri)
        return f"the database at {shown} cannot be used ({type(exc).__name__}: {reason[:300]})"
    finally:
        pool.shutdown(wait=False)
    return None


def _file_store_problem(shown: str) -> str | None:
    try:
        from mlflow import environment_variables
    except Exception:
        return None
    allow = getattr(environment_variables, "MLFLOW_ALLOW_FILE_STORE", None)
    if allow is None or allow.get():
        return None
    return (
        f"MLFLOW_TRACKING_URI={shown!r} is a file store, which this MLflow refuses "
        "(it keeps file stores in maintenance mode): use sqlite:///mlflow.db, a server "
        "(http://...), or set MLFLOW_ALLOW_FILE_STORE=true"
    )


def _plugin_schemes() -> set[str]:
    from importlib.metadata import entry_points

    try:
        return {e.name.lower() for e in entry_points(group="mlflow.tracking_store")}
    except Exception:
        return set()


def _journal_summary(enabled: bool, folder: str | None) -> str:
    from ._journal import default_journal_dir
    from ._journal_format import ScanStats, journal_segments, read_late_runs, scan_segment
    from ._replay import journal_folders

    root = Path(folder) if folder else default_journal_dir()
    if not enabled:
        return f"off  (RLM_MLFLOW_JOURNAL); directory {root}"
    journals = journal_folders(root)
    backlog = damaged = late = 0
    for journal in journals:
        stats = ScanStats()
        for path in journal_segments(journal):
            backlog += sum(1 for r in scan_segment(path, stats) if not r.finished)
        damaged += len(stats.damaged)
        late += len(read_late_runs(journal))
    count = f"{len(journals)} journal{'' if len(journals) == 1 else 's'}"
    text = f"{root}  ({count}, {backlog} events not yet confirmed sent)"
    if late:
        text += f"; {late} run(s) to look for a duplicate MLflow run committed late"
    if damaged:
        text += f"; {damaged} damaged byte ranges (skipped by replay)"
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
    from ._transports.rest import RestTransport

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
        "journals. Journals of sinks still running are left alone. Exits 1 if an event could "
        "not be sent (it stays for the next replay) or MLflow refused one.",
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

    run = commands.add_parser(
        "run",
        help="run a command with rlm-mlflow's sink in place of RLM Code's own",
        usage="rlm-mlflow run [-h] -- COMMAND [ARGS...]",
        description="Run COMMAND (RLM Code's CLI, TUI or MCP server, or any program that uses "
        "RLM Code) in place of this process, with rlm-mlflow's sink wherever RLM Code builds "
        "its own MLflow sink (RLMObservability.default()). The sink is configured by the same "
        "environment variables: DSPY_RLM_MLFLOW_ENABLED, MLFLOW_TRACKING_URI, "
        "DSPY_RLM_MLFLOW_EXPERIMENT and RLM_MLFLOW_*. Python processes that COMMAND starts get "
        "it too. The exit status is COMMAND's (127: not found, 126: cannot be run).",
    )
    run.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        metavar="COMMAND [ARGS...]",
        help="the command to run, after --",
    )
    run.set_defaults(handler=_run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if args.command != "run":  # a command run by 'run' gets the environment as it is
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())

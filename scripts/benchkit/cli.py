"""The command line: which plan, which sections, where the report goes."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import shutil
import signal
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

from .harness import ROOT, Harness, Machine, log, server_and_proxy
from .plan import PLANS, REGIMES
from .report import plot, render
from .sections import SECTION_NAMES, SECTIONS, Context, scaled

DESCRIPTION = """\
Benchmark rlm_mlflow's MLflowSink against what users would pick instead: the seed's synchronous
fluent-API sink and MLflow's own async logging, against a real local mlflow server with a
FaultProxy in front of it. Each measurement runs in a fresh interpreter."""

EPILOG = "sections (for --only):\n" + "\n".join(
    f"  {section.name:<12} {section.summary}" for section in SECTIONS
)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _names(values: list[str] | None) -> list[str]:
    return [name.strip() for value in values or [] for name in value.split(",") if name.strip()]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick", action="store_true", help="the quick plan: about a minute (same as --plan quick)"
    )
    parser.add_argument(
        "--plan",
        choices=sorted(PLANS),
        default=None,
        help="how big each measurement is (default: full; smoke is for the test suite)",
    )
    parser.add_argument(
        "--only",
        action="append",
        metavar="SECTION[,SECTION]",
        help="run only these sections (repeatable); see the list below",
    )
    parser.add_argument(
        "--regime",
        action="append",
        metavar="NAME",
        help="with the regimes section, run only this regime (repeatable): "
        + ", ".join(f"'{r.name}'" for r in REGIMES),
    )
    parser.add_argument(
        "--regime-steps", type=int, default=None, help="steps per agent thread in the regimes"
    )
    parser.add_argument("--drain-steps", type=int, default=None, help="steps per run in the drain")
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="write the markdown report here (default for a full run of every section: "
        "docs/performance.md; otherwise print only); the latency plot goes beside it as "
        "<name>-latency.png",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    parser.add_argument(
        "--report-from",
        type=Path,
        default=None,
        metavar="JSON",
        help="run nothing: render the report from results saved with --json",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the work folder (server data, child logs)"
    )
    args = parser.parse_args(argv)
    if args.quick and args.plan not in (None, "quick"):
        parser.error("--quick and --plan disagree")
    args.plan = "quick" if args.quick else (args.plan or "full")
    args.only = _names(args.only)
    unknown = [name for name in args.only if name not in SECTION_NAMES]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {', '.join(SECTION_NAMES)}")
    args.regime = _names(args.regime)
    regimes = {r.name for r in REGIMES}
    if any(name not in regimes for name in args.regime):
        parser.error(f"unknown regime in {args.regime}; choose from {sorted(regimes)}")
    return args


#: Where this report ends in the file it writes: what follows (sections other scripts write,
#: such as scripts/visibility.py and scripts/bench_scale.py, and their prose) is kept.
REPORT_END = "<!-- bench:end -->"


def _kept_after(output: Path) -> str:
    """What follows this report in ``output`` now (from its end marker on, marker included)."""
    try:
        old = output.read_text(encoding="utf-8")
    except FileNotFoundError:
        return REPORT_END + "\n"
    at = old.find(REPORT_END)
    return old[at:] if at >= 0 else REPORT_END + "\n"


def write_report(results: dict[str, Any], output: Path | None) -> None:
    """Print the report; write it (and the latency plot beside it) to ``output`` if given."""
    plot_path = output.with_name(output.stem + "-latency.png") if output else None
    if plot_path is not None and not plot(results, plot_path):
        plot_path = None
    text = render(results, plot_path)
    print(text)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text + "\n" + _kept_after(output), encoding="utf-8")
        log(f"wrote {output}" + (f" and {plot_path}" if plot_path else ""))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.report_from is not None:
        write_report(json.loads(args.report_from.read_text(encoding="utf-8")), args.output)
        return 0
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    signal.signal(signal.SIGTERM, _interrupt)
    plan = scaled(PLANS[args.plan], args.regime, args.regime_steps, args.drain_steps)
    selected = [s for s in SECTIONS if not args.only or s.name in args.only]
    every = len(selected) == len(SECTIONS)
    output: Path | None = args.output
    if output is None and every and plan.name == "full":
        output = ROOT / "docs" / "performance.md"
    machine = Machine.now()
    started = time.monotonic()
    meta: dict[str, Any] = {
        "command": "scripts/bench" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:]),
        "when": time.strftime("%Y-%m-%d %H:%M %Z"),
        "plan": plan.name,
        "sections": [s.name for s in selected],
        "all_sections": every,
        "python": platform.python_version(),
        "mlflow": version("mlflow"),
        "cores": machine.cores,
    }
    results: dict[str, Any] = {"meta": meta}
    workdir = Path(tempfile.mkdtemp(prefix="rlm-mlflow-bench-"))
    try:
        with contextlib.ExitStack() as stack:
            server = proxy = None
            if any(section.needs_server for section in selected):
                log(f"starting mlflow server (work folder {workdir})")
                server, proxy = stack.enter_context(server_and_proxy(workdir))
            context = Context(Harness(workdir, server, proxy), plan, results)
            for section in selected:
                results[section.name] = section.run(context)
            machine.finish()  # while the server still runs: its CPU counts as ours
        meta["elapsed_s"] = time.monotonic() - started
        meta["machine"] = machine.describe()
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=1), encoding="utf-8")
            log(f"wrote {args.json}")
        write_report(results, output)
        return 0
    except KeyboardInterrupt:
        log("interrupted; servers and children stopped")
        return 130
    finally:
        if args.keep:
            log(f"work folder kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

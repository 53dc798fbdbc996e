"""The `syncbench` command line (DESIGN.md "Commands").

Exit codes: 0 when the work completed whatever its outcome, 1 when a run failed,
2 on bad input (with a one-paragraph message, before any run is created).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workspace", help="workspace directory (default ./syncbench-runs or $SYNCBENCH_WORKSPACE)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="syncbench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="train one config to its target and record it in MLflow")
    run.add_argument("config")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a dotted config key")
    run.add_argument("--tracking-uri")
    run.add_argument("--experiment")
    run.add_argument("--no-progress", action="store_true")
    _common(run)

    sweep = sub.add_parser("sweep", help="run a sweep spec with Optuna (resumable)")
    sweep.add_argument("spec")
    sweep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a base-config key")
    sweep.add_argument("--storage", help="Optuna storage URL (default: SQLite optuna.db in the workspace)")
    sweep.add_argument("--tracking-uri")
    sweep.add_argument("--jobs", type=int, default=1, help="trials run at once, in worker processes")
    sweep.add_argument("--no-progress", action="store_true")
    _common(sweep)

    report = sub.add_parser("report", help="write the analysis report of a sweep")
    report.add_argument("sweep_name")
    report.add_argument("--tracking-uri")
    report.add_argument("--out")
    _common(report)

    ui = sub.add_parser("ui", help="MLflow UI over the workspace store, on 127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--host", default="127.0.0.1", help="bind address; anything but loopback needs --allow-remote")
    ui.add_argument("--allow-remote", action="store_true")
    ui.add_argument("--tracking-uri")
    _common(ui)
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    from experiments.config import load_config
    from experiments.run import execute_run

    config = load_config(args.config, args.set)
    try:
        result = execute_run(config, workspace=args.workspace, tracking_uri=args.tracking_uri,
                             experiment=args.experiment, progress=not args.no_progress and sys.stderr.isatty())
    except Exception as exc:  # noqa: BLE001 - the run is recorded FAILED; say why and exit 1
        from experiments.config import ConfigError

        if isinstance(exc, ConfigError):
            raise
        print(f"syncbench: run failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if result.run_id is not None or os.environ.get("RANK", "0") == "0":  # under torchrun: rank 0 speaks
        print(result.summary_line())
    return EXIT_OK


def cmd_sweep(args: argparse.Namespace) -> int:
    from sweeps.launcher import run_sweep_command

    return run_sweep_command(args)


def cmd_report(args: argparse.Namespace) -> int:
    from analysis.report import run_report_command

    return run_report_command(args)


def cmd_ui(args: argparse.Namespace) -> int:
    from analysis.ui import run_ui_command

    return run_ui_command(args)


COMMANDS = {"run": cmd_run, "sweep": cmd_sweep, "report": cmd_report, "ui": cmd_ui}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "workspace", None):
        os.environ["SYNCBENCH_WORKSPACE"] = os.path.abspath(args.workspace)
    from experiments.config import ConfigError

    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        print(f"syncbench: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())

"""syncbench: time-to-accuracy of sync, local-SGD and async training of your Lightning module.

Exit codes: 0 when the work completed whatever its outcome, 1 when a run failed,
2 on bad input (with a one-paragraph message, before any run is created).

Bad input is answered fast: nothing on the way from the command line to a validated config
imports torch, Lightning, MLflow or DeepSpeed (each command imports them after validation;
benchmarks/first_error.py measures it). Keep it so: CLI start-up time.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Sequence

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
EPILOG = ("Reference (docs/ in the repository): config.md (every config key), metrics.md (what a run records), "
          "strategies.md, backends.md, adding-a-strategy.md, scaling-out.md, ui.md. "
          "`syncbench config --reference` prints the config reference for this installed version.")


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("syncbench")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workspace", help="workspace directory (default ./syncbench-runs or $SYNCBENCH_WORKSPACE)")


CONFIG_HELP = "a run config: a YAML file, or the name of a shipped config (`syncbench examples`, e.g. digits_mlp)"
SPEC_HELP = "a sweep spec: a YAML file, or the name of a shipped spec (`syncbench examples`, e.g. demo)"


def build_parser() -> argparse.ArgumentParser:
    from syncbench.experiments.workspace import STORAGE_HELP, TRACKING_URI_HELP

    parser = argparse.ArgumentParser(prog="syncbench", description=__doc__.splitlines()[0].split(": ", 1)[1],
                                     epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"syncbench {version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    init = sub.add_parser("init", help="write a task module, a run config and a sweep spec to start from",
                          epilog=EPILOG)
    init.add_argument("dir", help="directory to write into (created; existing files are never overwritten)")

    run = sub.add_parser("run", help="train one config to its target and record it in MLflow", epilog=EPILOG)
    run.add_argument("config", help=f"{CONFIG_HELP} (keys: docs/config.md or `syncbench config --reference`)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a dotted config key")
    run.add_argument("--tracking-uri", help=TRACKING_URI_HELP)
    run.add_argument("--experiment", help="MLflow experiment to record the run in (default: the config's name)")
    run.add_argument("--no-progress", action="store_true")
    _profile_option(run)
    _common(run)

    sweep = sub.add_parser("sweep", help="run a sweep spec with Optuna (resumable)", epilog=EPILOG)
    sweep.add_argument("spec", help=f"{SPEC_HELP} (keys: docs/config.md, section 'Sweep spec')")
    sweep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a base-config key")
    sweep.add_argument("--storage", help=STORAGE_HELP)
    sweep.add_argument("--tracking-uri", help=TRACKING_URI_HELP)
    sweep.add_argument("--jobs", type=int, default=1, help="trials run at once, in worker processes (--executor "
                       "slurm: launcher jobs submitted, one trial at a time each)")
    sweep.add_argument("--executor", choices=["local", "slurm"], default="local",
                       help="where trials run: this machine (default), or SLURM jobs submitted with submitit "
                       "(docs/scaling-out.md)")
    sweep.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                       help="override a key of the spec's slurm: section (partition, time_min, cpus_per_task, "
                       "gpus_per_task, mem_gb, nodes, sbatch.OPTION, ...); --executor slurm only")
    sweep.add_argument("--no-progress", action="store_true")
    _profile_option(sweep)
    _common(sweep)

    cal = sub.add_parser("calibrate", help="measure compute per step and the network on real processes; write "
                         "a cluster profile for --profile", epilog=EPILOG)
    cal.add_argument("config", help=f"{CONFIG_HELP}: the task (module, data, batch size) to time")
    cal.add_argument("--workers", type=int, help="processes running at once (default: the config's "
                     "cluster.workers; under torchrun: the job's WORLD_SIZE)")
    cal.add_argument("--out", help="profile YAML to write (default: <config name>.profile.yaml here)")
    cal.add_argument("--budget", type=float, default=3.0, help="seconds of training timed for the compute step")
    cal.add_argument("--repeats", type=int, default=3, help="interleaved passes of the dist loops; each "
                     "quantity is their median")
    cal.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a dotted config key")

    report = sub.add_parser("report", help="write the analysis report of a sweep")
    report.add_argument("sweep_name")
    report.add_argument("--tracking-uri", help=TRACKING_URI_HELP)
    report.add_argument("--out")
    _common(report)

    ui = sub.add_parser("ui", help="MLflow UI over the workspace store, on 127.0.0.1; prints the most recent "
                        "sweep's runs page", epilog=EPILOG)
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--host", default="127.0.0.1", help="bind address; anything but loopback needs --allow-remote")
    ui.add_argument("--allow-remote", action="store_true")
    ui.add_argument("--tracking-uri", help=f"serve this database store instead; {TRACKING_URI_HELP}")
    _common(ui)

    dash = sub.add_parser("dashboard", help="optuna-dashboard over the sweeps' Optuna studies, on 127.0.0.1",
                          epilog=EPILOG)
    dash.add_argument("sweep_name", nargs="?", help="print this sweep's study page (default: the most recent sweep)")
    dash.add_argument("--port", type=int, default=8080)
    dash.add_argument("--storage", help=STORAGE_HELP)
    _common(dash)

    config = sub.add_parser("config", help="print a config with its defaults, the config reference or its "
                            "JSON Schema", epilog=EPILOG)
    config.add_argument("config", nargs="?", help=f"{CONFIG_HELP}, or a sweep spec (a file or a shipped spec's "
                        f"name), to validate and print with every default")
    config.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a dotted key")
    config.add_argument("--schema", choices=["run", "sweep"], help="print the JSON Schema of a run config or a sweep spec")
    config.add_argument("--reference", action="store_true", help="print the Markdown reference of every key "
                        "(docs/config.md)")

    sub.add_parser("examples", help="list the shipped run configs and sweep specs, usable by name "
                   "(syncbench run digits_mlp, syncbench sweep demo)", epilog=EPILOG)
    return parser


def _profile_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", metavar="FILE", help="a cluster profile from `syncbench calibrate`, merged "
                        "into the config before --set (so --set wins)")


def _with_profile(args: argparse.Namespace) -> list[str]:
    """``--set`` items with the profile's keys first (bad profile: ConfigError, exit 2)."""
    if not getattr(args, "profile", None):
        return list(args.set)
    from syncbench.experiments.procs.calibrate import profile_overrides

    return [*profile_overrides(args.profile), *args.set]


def add_import_paths(*dirs: str | os.PathLike) -> None:
    """Let `task.module` / `task.data` name modules next to the config (and in the current
    directory), as in a project written by `syncbench init`: the console script's own
    sys.path has neither. PYTHONPATH carries them to sweep workers and dist processes."""
    wanted = [os.path.abspath(d) for d in (os.getcwd(), *dirs)]
    env = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    for path in reversed(wanted):
        if path not in sys.path:
            sys.path.insert(0, path)
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([*env, *wanted]))


def example(arg: str, kind: str) -> str:
    """A CONFIG ("config") or SPEC ("spec") argument as a file path: the file given, else the
    shipped example of that name (bad input otherwise, listing the shipped names)."""
    from syncbench.sweeps.spec import resolve_example

    return str(resolve_example(arg, kind))


def cmd_run(args: argparse.Namespace) -> int:
    from syncbench.experiments.config import load_config
    from syncbench.experiments.workspace import SpaceReserve, check_workspace, is_disk_full, workspace_dir

    args.config = example(args.config, "config")
    add_import_paths(os.path.dirname(os.path.abspath(args.config)))
    config = load_config(args.config, _with_profile(args))  # before torch is imported: bad input answers fast
    from syncbench.experiments.run import execute_run

    # under torchrun every rank runs this command: rank 0 owns the workspace checks and reserve
    rank0 = os.environ.get("RANK", "0") == "0" or "MASTER_ADDR" not in os.environ
    if rank0:
        check_workspace(args.workspace)
    tags = {"syncbench.profile": os.path.abspath(args.profile)} if args.profile else None
    reserve = SpaceReserve(workspace_dir(args.workspace))
    if rank0:
        reserve.hold()  # room to record the run FAILED should the disk fill while it trains
    try:
        result = execute_run(config, workspace=args.workspace, tracking_uri=args.tracking_uri,
                             experiment=args.experiment, tags=tags,
                             progress=not args.no_progress and sys.stderr.isatty())
    except Exception as exc:  # noqa: BLE001 - the run is recorded FAILED; say why and exit 1
        from syncbench.experiments.config import ConfigError

        if isinstance(exc, ConfigError):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if is_disk_full(exc):
            print(f"syncbench: run failed: the disk is full ({type(exc).__name__}: {first}); the run is recorded "
                  f"FAILED. Free space on the disk holding {workspace_dir(args.workspace)} (or the store) and run "
                  f"again.", file=sys.stderr)
        else:
            from syncbench.experiments.messages import describe

            print(f"syncbench: run failed: {describe(exc)}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        if rank0:
            reserve.release()
    if result.run_id is not None or os.environ.get("RANK", "0") == "0":  # under torchrun: rank 0 speaks
        print(result.summary_line())
        if result.run_id is not None:
            print(recorded_where(args.tracking_uri, result.run_id, args.workspace))
    return EXIT_OK


def recorded_where(tracking_uri: str | None, run_id: str, workspace: str | None) -> str:
    """The run's last words: the store it is recorded in (no password), its id and how to see
    it (the tracking server's page, or the `syncbench ui` command line)."""
    from syncbench.experiments.workspace import default_tracking_uri, redact_uri, ui_link, workspace_dir

    uri = tracking_uri or default_tracking_uri(workspace_dir(workspace))
    experiment_id = None
    if uri.startswith(("http://", "https://")):  # the server's page for the run needs its experiment
        with contextlib.suppress(Exception):
            from mlflow.tracking import MlflowClient

            experiment_id = MlflowClient(tracking_uri=uri).get_run(run_id).info.experiment_id
    return f"MLflow: run {run_id} in {redact_uri(uri)}; view it: {ui_link(uri, run_id, experiment_id, workspace)}"


def cmd_sweep(args: argparse.Namespace) -> int:
    args.spec = example(args.spec, "spec")
    from syncbench.sweeps.launcher import run_sweep_command

    from syncbench.sweeps.spec import base_config_dir

    base_dir = base_config_dir(args.spec)  # task modules next to the base config resolve too (docs)
    add_import_paths(os.path.dirname(os.path.abspath(args.spec)), *([base_dir] if base_dir else []))
    merged = _with_profile(args)
    args.profile_set = merged[:len(merged) - len(args.set)]  # the profile's keys: the grid may override them
    return run_sweep_command(args)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from syncbench.experiments.config import ConfigError, load_config

    if args.workers is not None and args.workers < 2:
        raise ConfigError(f"--workers {args.workers}: calibration times N processes running at once and the "
                          f"transfers between them; give at least 2")
    if args.budget <= 0:
        raise ConfigError(f"--budget {args.budget}: must be positive")
    if args.repeats < 1:
        raise ConfigError(f"--repeats {args.repeats}: must be at least 1")
    args.config = example(args.config, "config")
    add_import_paths(os.path.dirname(os.path.abspath(args.config)))
    config = load_config(args.config, args.set)
    from syncbench.experiments.procs.calibrate import calibrate, check_writable, profile_yaml
    from syncbench.experiments.procs.launcher import under_torchrun

    out = check_writable(args.out or f"{config.name}.profile.yaml")
    workers = args.workers or config.cluster.workers
    if workers < 2 and not under_torchrun():
        raise ConfigError(f"{args.config}: cluster.workers is {workers}; give --workers N (at least 2)")
    speaks = os.environ.get("RANK", "0") == "0"
    say = (lambda msg: print(f"calibrate: {msg}", file=sys.stderr, flush=True)) if speaks else None
    try:
        profile = calibrate(config, workers, budget_s=args.budget, repeats=args.repeats, log=say)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - a worker died, a transfer failed: say why, exit 1
        print(f"syncbench: calibration failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if speaks:
        out.write_text(profile_yaml(profile))
        c = profile["cluster"]
        print(f"wrote {out}: cluster.compute.step_s={c['compute']['step_s']:.6g} "
              f"cluster.network.latency_s={c['network']['latency_s']:.6g} "
              f"cluster.network.bandwidth_gbps={c['network']['bandwidth_gbps']:.6g} "
              f"cluster.network.server_latency_s={c['network']['server_latency_s']:.6g} "
              f"cluster.network.server_bandwidth_gbps={c['network']['server_bandwidth_gbps']:.6g} "
              f"(N={profile['calibration']['workers']}); use: syncbench run|sweep ... --profile {out}")
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from syncbench.analysis.report import run_report_command

    return run_report_command(args)


def cmd_ui(args: argparse.Namespace) -> int:
    from syncbench.analysis.ui import run_ui_command

    return run_ui_command(args)


def cmd_dashboard(args: argparse.Namespace) -> int:
    from syncbench.sweeps.dashboard import run_dashboard_command

    return run_dashboard_command(args)


def cmd_config(args: argparse.Namespace) -> int:
    import json

    from syncbench.experiments.config import ConfigError, load_config
    from syncbench.sweeps import reference

    chosen = [bool(args.config), bool(args.schema), args.reference]
    if sum(chosen) != 1:
        raise ConfigError("syncbench config: give one of CONFIG.yaml, --schema run|sweep or --reference")
    if args.schema:
        print(json.dumps(reference.json_schema(args.schema), indent=2))
    elif args.reference:
        sys.stdout.write(reference.markdown())
    else:
        from syncbench.experiments.config import read_yaml
        from syncbench.sweeps.spec import example_name, load_sweep, shipped

        named_spec = not os.path.isfile(args.config) and example_name(args.config) in shipped("spec")
        path = example(args.config, "spec" if named_spec else "config")
        raw = read_yaml(path)
        if named_spec or {"base", "seeds"} <= set(raw):  # a sweep spec: validated completely, with defaults
            import yaml

            sweep = load_sweep(path, args.set)
            sys.stdout.write(f"# sweep spec {path}: {len(sweep.cells)} cells, {sweep.total_trials()} trials; "
                             f"base {sweep.base_path}\n")
            sys.stdout.write(yaml.safe_dump(sweep.spec.model_dump(mode="json"), sort_keys=False))
        else:
            sys.stdout.write(load_config(path, args.set).to_yaml())
    return EXIT_OK


def cmd_examples(args: argparse.Namespace) -> int:
    from syncbench.sweeps.spec import describe_example, shipped

    for kind, title in (("config", "Run configs (syncbench run NAME, syncbench config NAME)"),
                        ("spec", "Sweep specs (syncbench sweep NAME, syncbench config NAME)")):
        examples = shipped(kind)
        width = max(map(len, examples), default=0)
        print(f"{title}:")
        for name, path in examples.items():
            print(f"  {name:<{width}}  {describe_example(path)}")
    return EXIT_OK


def cmd_init(args: argparse.Namespace) -> int:
    from syncbench.sweeps.init import init_project

    for path in init_project(args.dir):
        print(f"wrote {path}")
    print(f"next: syncbench run {os.path.join(args.dir, 'run.yaml')}   then: syncbench sweep "
          f"{os.path.join(args.dir, 'sweep.yaml')}")
    return EXIT_OK


COMMANDS = {"run": cmd_run, "sweep": cmd_sweep, "calibrate": cmd_calibrate, "report": cmd_report, "ui": cmd_ui,
            "dashboard": cmd_dashboard, "config": cmd_config, "init": cmd_init, "examples": cmd_examples}


def stores_from_environment(args: argparse.Namespace) -> None:
    """MLflow's convention for where runs are recorded: ``--tracking-uri``, else
    ``$MLFLOW_TRACKING_URI``, else the workspace store; Optuna's storage likewise: ``--storage``,
    else ``$SYNCBENCH_STORAGE``, else the workspace's. The defaults themselves are chosen in one
    place (``syncbench.experiments.workspace``); a variable that is set is made the option here, so
    that every command (ui and report check an explicit store) treats it as if it were given."""
    from syncbench.experiments.workspace import STORAGE_ENV, TRACKING_URI_ENV

    for option, variable in (("tracking_uri", TRACKING_URI_ENV), ("storage", STORAGE_ENV)):
        if hasattr(args, option) and not getattr(args, option) and os.environ.get(variable):
            setattr(args, option, os.environ[variable])


def main(argv: Sequence[str] | None = None) -> int:
    """Exit codes: 0, 1, 2 (module docstring), and 128 + the signal when SIGTERM or SIGINT
    stopped the work (130 for Ctrl-C, 143 for SIGTERM): runs are then recorded KILLED."""
    from syncbench.experiments import signals

    args = build_parser().parse_args(argv)
    if getattr(args, "workspace", None):
        os.environ["SYNCBENCH_WORKSPACE"] = os.path.abspath(args.workspace)
    stores_from_environment(args)
    if args.command == "run":  # stop wherever the run is; the run records itself KILLED
        handling = signals.handling(armed=True)
    elif args.command == "sweep":  # the launcher polls; trials arm themselves
        handling = signals.handling(armed=False)
    else:
        handling = contextlib.nullcontext()
    from syncbench.experiments.config import ConfigError

    try:
        with handling:
            return COMMANDS[args.command](args)
    except ConfigError as exc:
        print(f"syncbench: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except signals.Interrupted as exc:
        run_id = getattr(exc, "run_id", None)
        where = (f"; run {run_id} is recorded KILLED (outcome=killed, syncbench.signal={exc.name}) with what it "
                 f"measured" if run_id else "")
        print(f"syncbench: stopped by {exc.name}{where}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # Ctrl-C where no handler is installed: no traceback
        print("syncbench: interrupted", file=sys.stderr)
        return 128 + 2


if __name__ == "__main__":
    sys.exit(main())

"""`syncbench dashboard [SWEEP]`: optuna-dashboard over a sweep's Optuna study storage."""

from __future__ import annotations

import importlib.util

from syncbench.analysis.ui import dashboard_command, port_free, serve, sweep_studies
from syncbench.experiments.config import ConfigError
from syncbench.experiments.workspace import default_optuna_storage, workspace_dir
from syncbench.sweeps.storage import normalize_url, redact


def run_dashboard_command(args) -> int:
    """`syncbench dashboard [SWEEP]`: optuna-dashboard over the workspace's study storage
    (or --storage), bound to 127.0.0.1; prints the sweep's study page."""

    if importlib.util.find_spec("optuna_dashboard") is None:  # a dependency; fail clearly if missing
        raise ConfigError("syncbench dashboard needs optuna-dashboard: pip install optuna-dashboard")
    port = int(args.port)
    if not 0 < port < 65536:
        raise ConfigError(f"--port {port}: not a TCP port")
    if not port_free("127.0.0.1", port):
        raise ConfigError(f"--port {port}: already in use on 127.0.0.1; choose another with --port")
    if args.storage:
        storage = normalize_url(args.storage)
    else:
        ws = workspace_dir(getattr(args, "workspace", None))
        ws.mkdir(parents=True, exist_ok=True)
        storage = default_optuna_storage(ws)
    try:
        studies = sweep_studies(storage)
    except Exception as exc:  # noqa: BLE001 - an unreachable or foreign storage is bad input
        raise ConfigError(f"--storage {redact(storage)}: cannot read Optuna studies ({type(exc).__name__}: "
                          f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''})") from None
    if args.sweep_name:
        chosen = [s for s in studies if s[0] == args.sweep_name]
        if not chosen:
            raise ConfigError(f"no sweep {args.sweep_name!r} in {redact(storage)}; sweeps there: "
                              f"{', '.join(s[0] for s in studies) or 'none'}")
    else:
        chosen = studies[:1]
    url = f"http://127.0.0.1:{port}"

    def announce() -> None:
        print(f"optuna-dashboard for {redact(storage)}: {url}/dashboard  (Ctrl-C to stop)", flush=True)
        for name, study_id, _ in chosen:
            print(f"Sweep {name!r}: {url}/dashboard/studies/{study_id}", flush=True)
        if not chosen:
            print("No sweep recorded yet: run `syncbench sweep SPEC.yaml`, then reload.", flush=True)

    return serve(dashboard_command(storage, port), f"{url}/api/meta", "optuna-dashboard", announce)

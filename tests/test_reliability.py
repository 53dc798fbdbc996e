"""Reliability round two (issue 27), each item against real processes and real stores: options a
strategy does not read are refused (and a sweep that varies the strategy records only those each
run reads), values that can never work are refused before anything is recorded, ``--jobs`` is
capped by what the machine holds (a real pool, its live processes counted), the sim's
``cluster.workers`` is checked against memory before a replica is copied, and a single-node dist
run listens on the loopback address only (its sockets read from /proc/net/tcp*)."""

from __future__ import annotations

import ipaddress
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from syncbench.sweeps.cli import main
from tests.test_sweep_resume import _pool_workers
from tests.test_sweeps import SLOW, empty_stores, launcher, mlflow_runs, study, sweep, write_spec, ws  # noqa: F401

REPO = Path(__file__).resolve().parent.parent


def run_cli(capsys, ws: Path, *args: str) -> tuple[int, str]:
    """`syncbench run digits_mlp ARGS` in this process: its exit code and its stderr."""
    capsys.readouterr()
    code = main(["run", "digits_mlp", "--workspace", str(ws), "--no-progress", *args])
    return code, " ".join(capsys.readouterr().err.split())


# ------------------------------------------------------------------ no silent options (item 3)
@pytest.mark.parametrize(("sets", "key", "readers"), [
    (["strategy.name=async", "strategy.compression=fp16"], "strategy.compression", "sync, local_sgd"),
    (["strategy.name=sync", "strategy.local_steps=4"], "strategy.local_steps",
     "local_sgd, streaming_diloco, async_local_sgd"),
    (["strategy.name=local_sgd", "strategy.max_staleness=3"], "strategy.max_staleness", "async"),
    (["strategy.name=sync", "strategy.outer={lr: 0.7}"], "strategy.outer", "local_sgd"),
])
def test_an_option_the_strategy_does_not_read_is_refused_naming_who_reads_it(tmp_path, capsys, sets, key, readers):
    workspace = tmp_path / "ws"
    code, err = run_cli(capsys, workspace, *[a for s in sets for a in ("--set", s)])
    assert code == 2, err
    assert key in err and "is not read by strategy" in err and readers in err
    assert not (workspace / "mlflow.db").exists()  # refused before anything was recorded


def test_options_at_their_defaults_and_the_strategy_s_own_options_are_accepted(tmp_path):
    from syncbench.experiments.config import load_config

    # the shipped configs spell out every option with name: sync; the defaults change nothing anywhere
    config = load_config(REPO / "experiments/configs/digits_mlp.yaml", ["strategy.name=async",
                                                                       "strategy.max_staleness=2"])
    strategy = {k: v for k, v in config.flat().items() if k.startswith("strategy.")}
    assert strategy == {"strategy.name": "async", "strategy.lr_scaling": "none", "strategy.max_staleness": 2,
                        "strategy.staleness_lr": "none"}  # what is recorded: only what async reads


def test_a_sweep_varying_the_strategy_records_only_the_options_each_run_reads(ws, tmp_path):
    spec = write_spec(tmp_path / "opts.yaml", "opts", grid={"strategy.name": ["sync", "async"]}, seeds=[0],
                      set={"strategy.compression": "fp16", "cluster.workers": 2, "budget.train_time_s": 0.2,
                           "eval.every_s": 0.05})
    assert sweep(spec, ws) == 0
    _, children = mlflow_runs("opts", ws)
    by_name = {r.data.params["strategy.name"]: r.data.params for r in children}
    assert set(by_name) == {"sync", "async"}
    assert by_name["sync"]["strategy.compression"] == "fp16"
    assert "strategy.compression" not in by_name["async"] and "strategy.max_staleness" in by_name["async"]


def test_a_sweep_that_does_not_vary_the_strategy_refuses_an_unread_option(ws, tmp_path, capsys):
    spec = write_spec(tmp_path / "fixed.yaml", "fixed", grid={"cluster.workers": [1, 2]}, seeds=[0],
                      set={"strategy.max_staleness": 2})
    capsys.readouterr()
    assert sweep(spec, ws) == 2
    assert "strategy.max_staleness=2 is not read by strategy 'sync'" in " ".join(capsys.readouterr().err.split())


def test_a_tuned_strategy_option_is_tuned_only_where_the_grid_s_strategy_reads_it(tmp_path):
    from syncbench.sweeps.spec import load_sweep

    spec = write_spec(tmp_path / "tuned.yaml", "tuned", grid={"strategy.name": ["sync", "local_sgd"]}, seeds=[0],
                      tune={"n_trials": 2, "params": {"strategy.local_steps": {"choices": [2, 4]}}})
    sweep_ = load_sweep(spec)
    assert {cid: sorted(params) for cid, params in sweep_.tune_params.items()} == {
        "strategy.name=sync": [], "strategy.name=local_sgd": ["strategy.local_steps"]}


# ------------------------------------------------------------------ values that cannot work (item 5)
@pytest.mark.parametrize(("sets", "key"), [
    (["budget.train_time_s=.inf"], "budget.train_time_s"),
    (["target.value=.nan"], "target.value"),
    (["target.value=.inf"], "target.value"),
    (["target.value=-.inf"], "target.value"),
])
def test_infinite_budgets_and_targets_are_refused_before_anything_is_recorded(tmp_path, capsys, sets, key):
    workspace = tmp_path / "ws"
    code, err = run_cli(capsys, workspace, *[a for s in sets for a in ("--set", s)])
    assert code == 2 and f"{key}: Input should be a finite number" in err, err
    assert not (workspace / "mlflow.db").exists()


def test_a_batch_larger_than_a_worker_s_shard_is_refused_with_the_real_n(tmp_path, capsys):
    workspace = tmp_path / "ws"
    # scikit-learn's digits hold 1,797 samples, the training split fewer: 200 x 8 = 1,600 cannot fit
    code, err = run_cli(capsys, workspace, "--set", "batch_size=200", "--set", "cluster.workers=8")
    assert code == 2, err
    assert "cluster.workers (8)" in err and "cluster.workers=8" in err and "(1)" not in err
    assert not (workspace / "mlflow.db").exists()


def test_sim_workers_that_cannot_fit_in_memory_are_refused_before_a_replica_is_copied(tmp_path, capsys):
    from syncbench.experiments.workspace import available_memory_bytes

    available = available_memory_bytes()
    if available is None:
        pytest.skip("no /proc/meminfo")
    hidden = 200_000
    params = 64 * hidden + hidden + hidden * 10 + 10  # nn.Linear(64, H), nn.Linear(H, 10): weights + biases
    one = 4 * 4 * params  # float32 weights, gradients and Adam's two moments
    workers = math.ceil(2 * available / one)  # twice what the machine holds
    if workers > 1000:
        pytest.skip(f"{available / 1e9:.0f} GB available: the batch check would refuse first")
    workspace = tmp_path / "ws"
    start = time.perf_counter()
    code, err = run_cli(capsys, workspace, "--set", f"task.module_args.hidden={hidden}", "--set", "batch_size=1",
                        "--set", "strategy.name=local_sgd", "--set", f"cluster.workers={workers}")
    assert code == 2, err
    assert f"cluster.workers={workers}" in err and "GB available" in err and "workers fit here" in err
    assert not (workspace / "mlflow.db").exists()
    assert time.perf_counter() - start < 120  # not after building thousands of replicas


# ------------------------------------------------------------------ bounded --jobs (item 1)
def test_cap_jobs_takes_the_least_of_trials_cores_and_memory():
    from syncbench.sweeps.capacity import cap_jobs

    gib, mib = 1024**3, 1024**2
    assert cap_jobs(1000, 1, cores=16, available=64 * gib, per_worker=600 * mib).jobs == 1
    assert cap_jobs(1000, 100, cores=16, available=64 * gib, per_worker=600 * mib).jobs == 16
    # 80% of 2 GiB is 1638 MiB: two 600-MiB workers
    low = cap_jobs(8, 100, cores=16, available=2 * gib, per_worker=600 * mib)
    assert low.jobs == 2 and "GiB of memory" in low.reason
    assert cap_jobs(2, 100, cores=16, available=64 * gib, per_worker=600 * mib) == cap_jobs(2, 2, cores=2)
    assert cap_jobs(2, 100, cores=16, available=64 * gib, per_worker=600 * mib).reason is None


@pytest.mark.heavy
def test_jobs_far_beyond_the_machine_start_no_more_workers_than_trials_and_cores(ws, tmp_path):
    spec = write_spec(tmp_path / "many.yaml", "many-jobs", grid={"cluster.workers": [1, 2]}, seeds=[0],
                      set={**SLOW, "budget.train_time_s": 1.0})
    proc = launcher(spec, ws, "--jobs", "1000")
    most = 0
    while proc.poll() is None:
        most = max(most, len(_pool_workers(proc.pid)))
        time.sleep(0.05)
    out = " ".join(proc.communicate()[0].split())
    assert proc.returncode == 0, out
    cores = len(os.sched_getaffinity(0))
    assert 1 <= most <= min(2, cores), most  # two trials; never a thousand interpreters
    assert f"--jobs 1000: running {min(2, cores)} trial(s) at once" in out
    assert [t.state.name for t in study("many-jobs", ws).trials] == ["COMPLETE", "COMPLETE"]


# ------------------------------------------------------------------ loopback-only dist run (item 2)
def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = {pid}, [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _decode(hex_addr: str) -> str:
    """An address of /proc/net/tcp (IPv4: one little-endian word) or tcp6 (four of them)."""
    raw = bytes.fromhex(hex_addr)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(words))


def _listening(pids: set[int]) -> set[tuple[str, int]]:
    """(address, port) of every listening TCP socket the processes hold."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            continue
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.read().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    address, port = fields[1].split(":")
                    found.add((_decode(address), int(port, 16)))
    return found


@pytest.mark.heavy
def test_a_single_node_dist_run_listens_on_the_loopback_address_only(tmp_path):
    env = {**os.environ, "SYNCBENCH_WORKSPACE": str(tmp_path / "ws")}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen([sys.executable, "-m", "syncbench", "run", "digits_mlp", "--no-progress",
                             "--set", "cluster.backend=dist", "--set", "cluster.workers=2",
                             "--set", "budget.train_time_s=1", "--set", "target.value=1.01"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: set[tuple[str, int]] = set()
    while proc.poll() is None:
        seen |= _listening(_descendants(proc.pid) - {os.getpid()})
        time.sleep(0.05)
    out = proc.communicate()[0]
    assert proc.returncode == 0, out
    assert seen, "no listening socket seen: the rendezvous store was never observed"
    assert all(ipaddress.ip_address(addr).is_loopback for addr, _ in seen), seen


# ------------------------------------------------------------------ kill -9 of a dist run (item 6)
@pytest.mark.heavy
def test_a_dist_run_whose_launcher_is_killed_with_sigkill_is_marked_killed_by_its_watchdog(tmp_path):
    import signal
    import sqlite3

    from syncbench.experiments.procs.watchdog import MARK_WITHIN_S

    workspace = tmp_path / "ws"
    env = {**os.environ, "SYNCBENCH_WORKSPACE": str(workspace)}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen([sys.executable, "-m", "syncbench", "run", "digits_mlp", "--no-progress",
                             "--set", "cluster.backend=dist", "--set", "cluster.workers=2",
                             "--set", "budget.train_time_s=60", "--set", "target.value=1.01"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while not list(workspace.glob("dist/*/hb.1")):  # both ranks started
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "the ranks never started"
        time.sleep(0.1)
    (control,) = list(workspace.glob("dist/*"))
    ranks = [int(p) for p in yaml.safe_load((control / "workers.json").read_text())]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = time.monotonic()

    def status() -> str | None:
        with sqlite3.connect(f"file:{workspace / 'mlflow.db'}?mode=ro", uri=True, timeout=5) as con:
            row = con.execute("SELECT status FROM runs WHERE run_uuid = ?", (control.name,)).fetchone()
        return row[0] if row else None

    while status() == "RUNNING" and time.monotonic() - killed_at < MARK_WITHIN_S + 5:
        time.sleep(0.2)
    assert status() == "KILLED", f"still {status()} {time.monotonic() - killed_at:.0f} s after the kill"
    assert time.monotonic() - killed_at <= MARK_WITHIN_S
    while control.exists() and time.monotonic() - killed_at < MARK_WITHIN_S:
        time.sleep(0.1)
    assert not control.exists()
    for pid in ranks:  # no rank outlived its launcher
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


# ------------------------------------------------------------------ a locked store (item 6)
@pytest.mark.heavy
@pytest.mark.parametrize("store", ["mlflow.db", "optuna.db"])
def test_a_store_locked_by_another_process_is_exit_2_in_one_line(ws, tmp_path, store):
    """Another process holds the store's write lock (a sqlite3 shell left inside a transaction):
    the command says so in one line with exit 2 -- no SQL, no library help link -- and records nothing."""
    from syncbench.experiments.workspace import LOCK_WAIT_S

    locker = subprocess.Popen([sys.executable, "-c", "import sqlite3, sys, time\n"
                               f"con = sqlite3.connect({str(ws / store)!r}, isolation_level=None)\n"
                               "con.execute('BEGIN IMMEDIATE'); print('locked', flush=True); time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert locker.stdout.readline().strip() == "locked"
        env = {**os.environ, "SYNCBENCH_WORKSPACE": str(ws)}
        env.pop("MLFLOW_TRACKING_URI", None)
        env.pop("SYNCBENCH_STORAGE", None)
        argv = (["run", "digits_mlp"] if store == "mlflow.db" else ["sweep", "digits_smoke"])
        start = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "syncbench", *argv, "--no-progress"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        took = time.monotonic() - start
    finally:
        locker.kill()
        locker.wait()
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "the store is locked" in lines[0] and store in lines[0], done.stderr
    assert "SQL" not in done.stderr and "http" not in done.stderr
    assert took >= LOCK_WAIT_S  # it waited for the lock as long as it says before giving up


# ------------------------------------------------------------------ ui servers die with their parent (item 6)
@pytest.mark.heavy
def test_the_ui_server_dies_with_syncbench_ui_killed_by_sigkill(tmp_path):
    """`syncbench ui` killed with SIGKILL (no handler runs): its MLflow server, the server's
    uvicorn and job consumers included, goes too, and the port is free again."""
    import signal
    import socket

    from syncbench.analysis.server_guard import GRACE_S
    from syncbench.analysis.ui import port_free, wait_http_ok

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "syncbench", "ui", "--workspace", str(tmp_path / "ws"),
                             "--port", str(port)], cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert wait_http_ok(f"http://127.0.0.1:{port}/health", proc, 180), "the MLflow UI never answered"
        server = _descendants(proc.pid) - {proc.pid}
        assert server and not port_free("127.0.0.1", port)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + GRACE_S + 10
        while (_alive(server) or not port_free("127.0.0.1", port)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(server), f"left running: {_alive(server)}"
        assert port_free("127.0.0.1", port)
    finally:
        for pid in _alive(_descendants(proc.pid)):
            os.kill(pid, signal.SIGKILL)


def _alive(pids: set[int]) -> set[int]:
    """The processes of ``pids`` that still run (zombies, already dead, excluded)."""
    alive = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    alive.add(pid)
        except OSError:
            pass
    return alive


# ------------------------------------------------------------------ task modules next to the base config (item 6)
@pytest.mark.heavy
def test_a_sweep_imports_the_task_module_from_the_base_config_s_folder(tmp_path):
    """The project of `syncbench init` with its spec moved to a folder of its own: `task.module`
    (my_task.py, next to run.yaml) resolves from the base config's folder, as the docs say."""
    done = subprocess.run([sys.executable, "-m", "syncbench", "init", str(tmp_path / "proj")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    specs = tmp_path / "specs"
    specs.mkdir()
    spec = yaml.safe_load((tmp_path / "proj" / "sweep.yaml").read_text())
    spec.update(base=str(tmp_path / "proj" / "run.yaml"), grid={"cluster.workers": [1]}, seeds=[0],
                set={"budget.train_time_s": 0.2, "eval.every_s": 0.05, "cluster.compute.step_s": 0.001})
    spec.pop("tune", None)
    (specs / "s.yaml").write_text(yaml.safe_dump(spec))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "SYNCBENCH_WORKSPACE": str(tmp_path / "ws")}
    for key in ("MLFLOW_TRACKING_URI", "SYNCBENCH_STORAGE", "PYTHONPATH"):
        env.pop(key, None)
    done = subprocess.run([sys.executable, "-m", "syncbench", "sweep", str(specs / "s.yaml"), "--no-progress"],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "1/1 trials complete" in " ".join(done.stdout.split())


# ------------------------------------------------------------------ messages free of library chatter (item 6)
_GLOO_PEER_DIES = """
import datetime, os, sys, time
import torch, torch.distributed as dist
rank = int(sys.argv[1])
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=30))
dist.barrier()
if rank == 1:
    os._exit(0)
time.sleep(0.5)
try:
    dist.all_reduce(torch.ones(1000))
except Exception as exc:
    print(str(exc))
"""


@pytest.mark.heavy
def test_gloo_and_sqlalchemy_errors_reach_the_user_in_their_own_words_only(tmp_path):
    import socket

    import sqlalchemy

    from syncbench.experiments.messages import plain

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    script = tmp_path / "peer_dies.py"
    script.write_text(_GLOO_PEER_DIES)
    peer = subprocess.Popen([sys.executable, str(script), "1", port])
    survivor = subprocess.run([sys.executable, str(script), "0", port], capture_output=True, text=True, timeout=120)
    peer.wait(timeout=60)
    raw = survivor.stdout.strip()
    assert "Connection closed by peer" in raw, survivor.stderr  # a real gloo failure, as gloo words it
    said = plain(raw)
    assert said.startswith("Connection closed by peer") and "GLHF" not in said and ".cc:" not in said
    assert "before reporting an error" not in said

    engine = sqlalchemy.create_engine(f"sqlite:///{tmp_path / 'x.db'}")
    with pytest.raises(sqlalchemy.exc.OperationalError) as caught, engine.connect() as con:
        con.execute(sqlalchemy.text("SELECT * FROM nowhere"))
    assert "sqlalche.me" in str(caught.value) and "[SQL:" in str(caught.value)
    assert plain(str(caught.value)) == "(sqlite3.OperationalError) no such table: nowhere"

"""The dist backend on real processes: gloo over loopback, 2 workers, the digits task.

Every run uses a temporary workspace and SQLite MLflow store. Workers are forked from a
forkserver that stays up for the whole session, so only the first run pays the imports.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from syncbench.experiments.config import ConfigError, load_config
from syncbench.experiments.cluster_model import StragglerModel
from syncbench.experiments.procs.launcher import DistRunFailed, execute_dist_run

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "experiments" / "configs" / "digits_mlp.yaml"


def dist_config(*overrides: str):
    return load_config(DIGITS, ["cluster.backend=dist", "cluster.workers=2", "budget.train_time_s=20",
                                "eval.every_s=0.02", *overrides])


def mlflow_runs(workspace: Path, experiment: str = "digits-mlp"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    return client, ([] if exp is None else client.search_runs([exp.experiment_id]))


def assert_no_workers(pids: list[int]) -> None:
    deadline = time.time() + 5
    alive = pids
    while time.time() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return
        time.sleep(0.1)
    raise AssertionError(f"worker processes survived: {alive}")


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    return tmp_path / "ws"


# ------------------------------------------------------------------------------------------
# every strategy reaches the target; the replicas agree
# ------------------------------------------------------------------------------------------
def test_sync_reaches_target_and_replicas_are_equal(workspace: Path, tmp_path: Path) -> None:
    debug = tmp_path / "debug"
    result = execute_dist_run(dist_config("strategy.name=sync"), workspace=workspace, debug_dir=debug)
    assert result.outcome == "reached", result.summary_line()
    r0 = torch.load(debug / "rank0.pt", weights_only=False)
    r1 = torch.load(debug / "rank1.pt", weights_only=False)
    # after the last sync update both replicas hold bit-for-bit the same parameters
    assert torch.equal(r0["final"], r1["final"])
    assert r0["rows"][0]["steps"] == r1["rows"][1]["steps"] > 0

    client, runs = mlflow_runs(workspace)
    assert len(runs) == 1  # one MLflow run per trial, not per rank
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["outcome"] == "reached"
    assert run.data.tags["syncbench.backend"] == "dist"
    assert run.data.params["backend"] == "dist"
    assert run.data.params["cluster.workers"] == "2"
    m = run.data.metrics
    for key in ("tta_s", "reached", "samples_to_target", "updates_to_target", "best_val", "final_val", "init_s",
                "step_time_s", "activation_bytes", "val_acc", "val_loss", "train_loss", "clock_s", "samples",
                "time_compute_s", "time_comm_s", "time_wait_s", "time_compute_max_s", "time_comm_max_s",
                "time_wait_max_s", "comm_bytes"):
        assert key in m, key
    assert m["reached"] == 1.0 and m["tta_s"] == pytest.approx(result.tta_s)
    # counted independently: each rank's own optimizer steps, as its ledger recorded them (the run
    # stops at the evaluation that met the target), times its batch of 32
    steps = [r0["rows"][0]["steps"], r1["rows"][1]["steps"]]
    assert m["updates_to_target"] == steps[0] == steps[1]
    assert m["samples_to_target"] == sum(steps) * 32
    assert m["time_wait_max_s"] >= m["time_wait_s"] >= 0
    history = client.get_metric_history(run.info.run_id, "val_acc")
    assert len(history) >= 2 and history[-1].value >= 0.95
    # timestamp = run start + training clock
    clocks = {h.step: h.timestamp for h in client.get_metric_history(run.info.run_id, "clock_s")}
    assert all(ts >= run.info.start_time for ts in clocks.values())
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "curve.csv", "ranks.json"} <= artifacts


def test_local_sgd_reaches_target_and_average_is_the_mean(workspace: Path, tmp_path: Path) -> None:
    debug = tmp_path / "debug"
    result = execute_dist_run(dist_config("strategy.name=local_sgd", "strategy.local_steps=4",
                                          "strategy.warmup_sync_updates=3"), workspace=workspace, debug_dir=debug)
    assert result.outcome == "reached", result.summary_line()
    assert result.extra["averaging_rounds"] >= 1
    r0 = torch.load(debug / "rank0.pt", weights_only=False)
    r1 = torch.load(debug / "rank1.pt", weights_only=False)
    # after an average every replica equals the mean of the replicas before it
    mean = (r0["last_pre"] + r1["last_pre"]) / 2
    torch.testing.assert_close(r0["last_post"], mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(r1["last_post"], mean, rtol=0, atol=1e-6)
    assert not torch.equal(r0["last_pre"], r1["last_pre"])  # the replicas had drifted apart
    assert torch.equal(r0["final"], r1["final"])  # the run stops right after an average
    # one blocking round per H local steps after the 3 synchronous warm-up steps (the final
    # round may come early: rank 0 announces the stop out of band)
    local_events = [step for step, _ in r0["events"] if step > 3]
    assert [step for step, _ in r0["events"]][:3] == [1, 2, 3]
    assert local_events[:-1] and all((step - 3) % 4 == 0 for step in local_events[:-1])


def test_async_reaches_target_and_records_staleness(workspace: Path, tmp_path: Path) -> None:
    debug = tmp_path / "debug"
    result = execute_dist_run(dist_config("strategy.name=async"), workspace=workspace, debug_dir=debug)
    assert result.outcome == "reached", result.summary_line()
    assert result.extra["staleness_mean"] > 0
    r0 = torch.load(debug / "rank0.pt", weights_only=False)
    r1 = torch.load(debug / "rank1.pt", weights_only=False)
    # the server's version counts applied gradients; counted independently, the gradients the two
    # workers pushed (no bound: none is refused), less at most one per worker still in flight when
    # the run stopped -- and each applied one has a staleness
    pushed = r0["rows"][0]["steps"] + r1["rows"][1]["steps"]
    assert 0 <= pushed - r0["version"] <= 2, (r0["version"], pushed)
    assert sum(r0["staleness"].values()) == r0["version"]
    assert r1["rows"][1]["steps"] > 0  # the remote worker pushed gradients
    client, runs = mlflow_runs(workspace)
    m = runs[0].data.metrics
    assert m["staleness_mean"] > 0 and m["staleness_max"] >= 1
    # every push and every pull carries the whole state, rank 0's own included: 2 transfers
    # per applied gradient, plus at most one refused push per rank at the stop
    transfers = m["comm_bytes"] / (r0["final"].numel() * r0["final"].element_size())
    assert 2 * r0["version"] <= transfers <= 2 * (r0["version"] + 2), (transfers, r0["version"])
    assert "staleness.json" in {a.path for a in client.list_artifacts(runs[0].info.run_id)}


# ------------------------------------------------------------------------------------------
# no per-batch collective: a 4x straggler under local SGD
# ------------------------------------------------------------------------------------------
@pytest.mark.heavy
def test_local_sgd_straggler_waits_only_at_averaging_points(workspace: Path, tmp_path: Path) -> None:
    debug = tmp_path / "debug"
    config = dist_config("strategy.name=local_sgd", "strategy.local_steps=8", "task.module_args.hidden=512",
                         "cluster.stragglers={kind: persistent, slow_fraction: 0.5, slowdown: 4}",
                         "budget.train_time_s=1.5", "target.value=1.01", "eval.every_s=0.25")
    slow = StragglerModel(config.cluster.stragglers, 2, config.seed).slow
    assert len(slow) == 1
    slow_rank = next(iter(slow))
    fast_rank = 1 - slow_rank
    result = execute_dist_run(config, workspace=workspace, debug_dir=debug, emulate="stragglers")
    assert result.outcome == "budget"
    fast = torch.load(debug / f"rank{fast_rank}.pt", weights_only=False)
    slow_state = torch.load(debug / f"rank{slow_rank}.pt", weights_only=False)
    rows = fast["rows"]
    assert rows[slow_rank]["pad_compute"] > 0 and rows[fast_rank]["pad_compute"] == 0
    # the fast worker blocked exactly once per 8 local steps (the last round, at the budget,
    # may come early) ...
    steps = [s for s, _ in fast["events"]]
    assert len(steps) >= 3 and all(s % 8 == 0 for s in steps[:-1])
    assert len(steps) == fast["rounds"] == -(-int(rows[fast_rank]["steps"]) // 8)
    # ... its steps in between ran at its own pace (a per-batch collective would make them 4x) ...
    fast_times = [t for i, t in enumerate(fast["step_times"], start=1) if i % 8]
    slow_times = [t for i, t in enumerate(slow_state["step_times"], start=1) if i % 8]
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    assert median(fast_times) < 0.5 * median(slow_times)
    # ... and its waiting is concentrated at the averaging points
    waits = [b for _, b in fast["events"]]
    assert median(waits) > 3 * median(fast_times)
    assert rows[fast_rank]["wait"] > 2 * rows[slow_rank]["wait"]
    _, runs = mlflow_runs(workspace)
    assert runs[0].data.metrics["time_wait_max_s"] > runs[0].data.metrics["time_wait_s"]


# ------------------------------------------------------------------------------------------
# bad input: refused before any run exists
# ------------------------------------------------------------------------------------------
def test_backup_workers_are_refused_before_any_run(workspace: Path) -> None:
    with pytest.raises(ConfigError, match="backup_workers"):
        execute_dist_run(dist_config("strategy.backup_workers=1"), workspace=workspace)
    _, runs = mlflow_runs(workspace)
    assert runs == []


# ------------------------------------------------------------------------------------------
# faults: a killed or a stopped worker ends the run `failed`, naming the rank
# ------------------------------------------------------------------------------------------
def _run_in_thread(config, workspace: Path):
    box: dict = {}

    def target() -> None:
        t0 = time.time()
        try:
            box["result"] = execute_dist_run(config, workspace=workspace)
        except BaseException as exc:  # noqa: BLE001
            box["error"] = exc
        box["ended"] = time.time()
        box["started"] = t0

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def _wait_for_training(workspace: Path, min_steps: int = 20, limit: float = 90.0) -> list[int]:
    deadline = time.time() + limit
    while time.time() < deadline:
        for workers in workspace.glob("dist/*/workers.json"):
            control = workers.parent
            try:
                pids = json.loads(workers.read_text())
                beats = [json.loads((control / f"hb.{r}").read_text()) for r in range(len(pids))]
            except (OSError, ValueError):
                continue
            if all(b[1] >= min_steps for b in beats):
                return pids
        time.sleep(0.05)
    raise AssertionError("the workers never started training")


@pytest.mark.heavy
@pytest.mark.parametrize("how,strategy", [(signal.SIGKILL, "sync"), (signal.SIGSTOP, "sync"),
                                          (signal.SIGSTOP, "async")])
def test_worker_fault_fails_the_run(workspace: Path, how: signal.Signals, strategy: str) -> None:
    timeout_s = 5.0
    config = dist_config(f"strategy.name={strategy}", "target.value=1.01", "budget.train_time_s=120",
                         f"cluster.collective_timeout_s={timeout_s}", "eval.every_s=0.5")
    thread, box = _run_in_thread(config, workspace)
    pids = _wait_for_training(workspace)
    victim = pids[1]
    t_fault = time.time()
    os.kill(victim, how)
    thread.join(timeout_s + 30)
    assert not thread.is_alive(), "the launcher did not end the run"
    elapsed = box["ended"] - t_fault
    assert elapsed <= timeout_s + 10, f"took {elapsed:.1f} s"
    error = box.get("error")
    assert isinstance(error, DistRunFailed), box
    assert "rank 1" in str(error)
    assert ("SIGKILL" in str(error)) if how == signal.SIGKILL else ("hung" in str(error))
    assert_no_workers(pids)
    _, runs = mlflow_runs(workspace)
    assert len(runs) == 1
    assert runs[0].info.status == "FAILED"
    assert runs[0].data.tags["outcome"] == "failed"
    assert "rank 1" in runs[0].data.tags["syncbench.error"]


@pytest.mark.heavy
def test_killed_launcher_leaves_no_workers(workspace: Path, tmp_path: Path) -> None:
    """SIGKILL of `syncbench run` itself: its workers notice within a heartbeat and exit."""
    cli = subprocess.Popen(
        [sys.executable, "-m", "syncbench", "run", str(DIGITS), "--set", "cluster.backend=dist",
         "--set", "cluster.workers=2", "--set", "target.value=1.01", "--set", "budget.train_time_s=120",
         "--workspace", str(workspace), "--no-progress"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        pids = _wait_for_training(workspace, min_steps=5)
    finally:
        cli.kill()
        cli.wait()
    assert_no_workers(pids)


# ------------------------------------------------------------------------------------------
# multi-node through torchrun: two agents on loopback, one c10d rendezvous
# ------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_torchrun_agents(workspace: Path, logs_dir: Path, rdzv_id: str, *sets: str) -> list[subprocess.Popen]:
    """Two torchrun agents on loopback (one c10d rendezvous), each one worker of
    ``syncbench run digits_mlp.yaml --set cluster.backend=dist`` plus ``sets``."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    port = _free_port()
    uri = f"sqlite:///{workspace / 'mlflow.db'}"
    workspace.mkdir(parents=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        env.pop(key, None)
    overrides = [arg for kv in ("cluster.backend=dist", "cluster.workers=2", *sets) for arg in ("--set", kv)]
    agents = []
    for node in (0, 1):
        with open(logs_dir / f"node{node}.log", "w") as log:
            agents.append(subprocess.Popen(
                [torchrun, "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node),
                 "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", rdzv_id,
                 "--local-addr", "127.0.0.1", "-m", "syncbench", "run", str(DIGITS), *overrides,
                 "--workspace", str(workspace), "--tracking-uri", uri, "--no-progress"],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            ))
    return agents


@pytest.mark.heavy
def test_two_node_torchrun_reaches_target(workspace: Path, tmp_path: Path) -> None:
    agents = start_torchrun_agents(workspace, tmp_path, "syncbench-test", "budget.train_time_s=20",
                                   "eval.every_s=0.02")
    try:
        codes = [a.wait(timeout=180) for a in agents]
    finally:
        for a in agents:
            if a.poll() is None:
                os.killpg(a.pid, signal.SIGKILL)
    output = "\n".join((tmp_path / f"node{n}.log").read_text()[-3000:] for n in (0, 1))
    assert codes == [0, 0], output
    assert "outcome=reached" in output
    _, runs = mlflow_runs(workspace)
    assert len(runs) == 1, output
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["outcome"] == "reached"
    assert run.data.tags["syncbench.dist.launcher"] == "torchrun"
    assert run.data.params["cluster.workers"] == "2"


@pytest.mark.heavy
def test_torchrun_rank0_death_fails_its_run(workspace: Path, tmp_path: Path) -> None:
    """Under torchrun rank 0 owns the MLflow run; when it is SIGKILLed a surviving rank marks
    the run FAILED (it used to stay RUNNING forever)."""
    agents = start_torchrun_agents(workspace, tmp_path, "syncbench-kill", "budget.train_time_s=120",
                                   "target.value=1.01", "eval.every_s=0.5", "cluster.collective_timeout_s=15")
    try:
        deadline = time.time() + 120
        rank0 = None
        while time.time() < deadline and rank0 is None:
            time.sleep(0.5)
            runs = []
            with contextlib.suppress(Exception):  # the store may still be being created by rank 0
                _, runs = mlflow_runs(workspace)
            if not runs:
                continue
            time.sleep(3)  # the run exists: rank 0 is set up; let it train (metrics are buffered)
            for agent in agents:
                for child in psutil.Process(agent.pid).children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        if child.environ().get("RANK") == "0" and "python" in child.name():
                            rank0 = child
        assert rank0 is not None, "rank 0 never started training: " + (tmp_path / "node0.log").read_text()[-1500:] + (tmp_path / "node1.log").read_text()[-1500:]
        killed_at = time.time()
        rank0.send_signal(signal.SIGKILL)
        for a in agents:
            with contextlib.suppress(subprocess.TimeoutExpired):
                a.wait(timeout=60)
        _, runs = mlflow_runs(workspace)
        assert len(runs) == 1
        run = runs[0]
        assert run.info.status == "FAILED", (tmp_path / "node1.log").read_text()[-2000:]
        assert run.data.tags["outcome"] == "failed"
        assert "rank 0" in run.data.tags["syncbench.error"]
        assert run.info.end_time / 1000 - killed_at < 15 + 10  # collective_timeout_s + 10
    finally:
        for a in agents:
            if a.poll() is None:
                os.killpg(a.pid, signal.SIGKILL)


def test_rank_devices_map_one_rank_per_gpu_and_refuse_two_on_one():
    from syncbench.experiments.procs.devices import RankDevice, choose_rank_device

    assert choose_rank_device(0, 2, 0) == RankDevice("gloo", "cpu")  # no GPU: gloo on the CPU
    assert choose_rank_device(1, 2, 2) == RankDevice("nccl", "cuda:1")
    assert choose_rank_device(1, 2, 4, "cpu") == RankDevice("gloo", "cpu")
    with pytest.raises(ValueError, match="NCCL cannot put two ranks on one GPU.*SYNCBENCH_DIST_DEVICE=cpu"):
        choose_rank_device(1, 2, 1)
    with pytest.raises(ValueError, match="SYNCBENCH_DIST_DEVICE='gpu'"):
        choose_rank_device(0, 1, 1, "gpu")


def test_a_local_launch_checks_its_devices_before_any_run(monkeypatch):
    """On this CPU machine NCCL is never chosen: N ranks are fine; a bad SYNCBENCH_DIST_DEVICE
    is bad input naming the variable."""
    from syncbench.experiments.config import ConfigError
    from syncbench.experiments.procs.validation import check_local_devices

    check_local_devices(8)
    monkeypatch.setenv("SYNCBENCH_DIST_DEVICE", "gpu")
    with pytest.raises(ConfigError, match="SYNCBENCH_DIST_DEVICE='gpu'"):
        check_local_devices(2)

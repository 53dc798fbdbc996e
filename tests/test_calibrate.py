"""`syncbench calibrate` and `--profile`: the alpha-beta fits against closed-form timings, the
profile's validation and merging, bad input, and (heavy) a real calibration on 2 processes."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from syncbench.experiments.config import ConfigError, load_config
from syncbench.experiments.procs.calibrate import (
    META_KEY,
    fit_alpha_beta,
    fit_latency,
    fit_point_to_point,
    load_profile,
    predicted_per_update,
    profile_overrides,
)
from syncbench.sweeps.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
DIGITS = str(REPO / "experiments" / "configs" / "digits_mlp.yaml")
SIZES = [1 << 10, 8 << 10, 64 << 10, 512 << 10, 2 << 20, 8 << 20]


def write_profile(path: Path, **network) -> Path:
    profile = {"cluster": {"compute": {"step_s": 0.0012},
                           "network": {"latency_s": 0.0003, "bandwidth_gbps": 3.5, **network}},
               META_KEY: {"host": "test", "workers": 2}}
    path.write_text(yaml.safe_dump(profile))
    return path


# ------------------------------------------------------------------ fits, closed form
@pytest.mark.parametrize("world", [2, 3, 8])
def test_ring_fit_recovers_alpha_beta_from_closed_form_timings(world):
    alpha, beta = 7.5e-5, 1.25e9  # 75 us, 10 Gbit/s
    times = {s: 2 * (world - 1) * alpha + 2 * (world - 1) / world * s / beta for s in SIZES}
    a, b = fit_alpha_beta(times, world)
    assert a == pytest.approx(alpha, rel=1e-9)
    assert b == pytest.approx(beta, rel=1e-9)


def test_point_to_point_fit_recovers_alpha_beta():
    alpha, beta = 2.0e-4, 3.0e8
    a, b = fit_point_to_point({s: alpha + s / beta for s in SIZES})
    assert a == pytest.approx(alpha, rel=1e-9)
    assert b == pytest.approx(beta, rel=1e-9)


def test_fits_stay_physical_on_noise():
    # times falling with size: no bandwidth term is measurable; latency alone, never negative
    a, b = fit_alpha_beta({1024: 3e-4, 1 << 20: 2e-4}, 2)
    assert a > 0 and b > 1e12
    # pure bandwidth with a slightly negative intercept: alpha clamped at 0
    a, b = fit_point_to_point({1 << 20: 1.0e-3, 2 << 20: 2.0e-3, 4 << 20: 4.1e-3})
    assert a == 0.0 and b > 0


def test_fit_latency_recovers_the_alpha_of_the_closed_form():
    payload = {"gradient_bytes": 20000, "state_bytes": 20000}
    step, beta = 0.004, 1.25e9
    for strategy, alpha in (("sync", 8e-4), ("async", 3e-3)):  # async's at the link bound
        measured = predicted_per_update(strategy, 2, step, alpha, beta, payload)
        assert fit_latency(strategy, measured, 2, step, beta, payload) == pytest.approx(alpha, rel=1e-6)
    # a measurement that compute alone exceeds needs no alpha
    assert fit_latency("sync", step / 2, 2, step, beta, payload) is None


def test_the_closed_form_is_the_strategys_own_and_one_without_it_is_skipped():
    """calibrate reads each strategy's closed form from its class (Strategy.clock_per_update),
    with the strategy's options; a strategy that declares none predicts None and fits no alpha
    instead of raising."""
    from syncbench.strategies import STRATEGIES
    from syncbench.strategies.program import Strategy

    payload = {"gradient_bytes": 20000, "state_bytes": 40000}
    step, alpha, beta = 0.004, 1e-4, 1.25e9
    ring_state = 2 * alpha + 40000 / beta  # N = 2: 2(N-1)·α + 2(N-1)/N · S/β
    local_sgd = STRATEGIES["local_sgd"].options_model(local_steps=4)
    assert predicted_per_update("local_sgd", 2, step, alpha, beta, payload, local_sgd) == \
        pytest.approx(step + ring_state / 4)
    # the strategies' ring formula is the sim's (strategies/ cannot import experiments/)
    from syncbench.experiments.cluster_model import ring_allreduce_s
    from syncbench.experiments.config import NetworkConfig
    from syncbench.strategies.program import ring_allreduce_time

    net = NetworkConfig(latency_s=alpha, bandwidth_gbps=beta * 8 / 1e9)
    for n in (2, 3, 8):
        assert ring_allreduce_time(n, alpha, beta, 40000) == pytest.approx(ring_allreduce_s(n, 40000, net))
    no_closed_form = [n for n in STRATEGIES
                      if STRATEGIES[n].clock_per_update.__func__ is Strategy.clock_per_update.__func__]
    assert no_closed_form, "every shipped strategy has a closed form: pick another case for this test"
    for name in no_closed_form:
        assert predicted_per_update(name, 2, step, alpha, beta, payload) is None
        assert fit_latency(name, 0.01, 2, step, beta, payload) is None


@pytest.mark.parametrize("latency_s", [1e-4, 3e-3])
def test_async_closed_form_matches_the_sim_below_and_at_the_link_bound(workspace, latency_s):
    """predicted_per_update's async form (the worker cycle / N, or the server link's time per
    update once push and pull saturate it) against the sim backend itself, without stragglers;
    the sim's server link takes the server_* keys, not the all-reduce's."""
    from syncbench.experiments.procs.calibrate import payload_sizes
    from syncbench.experiments.run import execute_run

    step = 1e-3
    config = load_config(DIGITS, ["strategy.name=async", "cluster.workers=2", f"cluster.compute.step_s={step}",
                                  "cluster.network.latency_s=1e-6", "cluster.network.bandwidth_gbps=1",  # the all-reduce's: unused
                                  f"cluster.network.server_latency_s={latency_s}",
                                  "cluster.network.server_bandwidth_gbps=100",
                                  "budget.train_time_s=0.6", "eval.every_s=0.6", "target.value=2.0"])
    result = execute_run(config, workspace=workspace, tracking_uri=f"sqlite:///{workspace / 'm.db'}")
    sim = result.clock_s / result.evaluations[-1].updates
    beta = 100e9 / 8
    predicted = predicted_per_update("async", 2, step, latency_s, beta, payload_sizes(config))
    link = 2 * latency_s + sum(payload_sizes(config).values()) / beta
    assert (link > (step + link) / 2) == (latency_s > step)  # the two cases: below and at the link bound
    assert sim == pytest.approx(predicted, rel=0.05)


# ------------------------------------------------------------------ the profile
def test_profile_merges_dotted_or_nested_and_strips_metadata(tmp_path):
    nested = write_profile(tmp_path / "p.yaml")
    assert load_profile(nested) == {"cluster.compute.step_s": 0.0012, "cluster.network.latency_s": 0.0003,
                                    "cluster.network.bandwidth_gbps": 3.5}
    dotted = tmp_path / "d.yaml"
    dotted.write_text("cluster.network.latency_s: 1.0e-05\ncluster:\n  compute: {step_s: 0.002}\n")
    items = profile_overrides(dotted)
    config = load_config(DIGITS, [*items, "cluster.compute.step_s=0.005"])  # --set wins
    assert config.cluster.network.latency_s == 1.0e-05 and config.cluster.compute.step_s == 0.005


@pytest.mark.parametrize("body,named", [
    ("cluster: {network: {latency_s: 1.0e-4, jitter_s: 1.0}}", "cluster.network.jitter_s"),
    ("cluster: {compute: {step_s: 0.001}}\nhost: me", "host"),
    ("cluster: {workers: 8}", "cluster.workers"),
    ("cluster: {network: {bandwidth_gbps: -1}}", "cluster.network.bandwidth_gbps"),
])
def test_bad_profile_is_refused_naming_the_key(tmp_path, body, named):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_profile(path)


@pytest.mark.parametrize("command", ["run", "sweep"])
def test_profile_with_unknown_key_exits_2_before_any_run(workspace, tmp_path, capsys, command):
    bad = write_profile(tmp_path / "bad.yaml", jitter_s=0.1)
    target = DIGITS if command == "run" else str(REPO / "sweeps" / "specs" / "digits_smoke.yaml")
    code = cli_main([command, target, "--no-progress", "--profile", str(bad)])
    assert code == 2
    assert "cluster.network.jitter_s" in capsys.readouterr().err
    assert not (workspace / "mlflow.db").exists() and not (workspace / "optuna.db").exists()


def test_sweep_cells_take_the_profile_and_set_wins(tmp_path):
    from syncbench.sweeps.cli import _with_profile
    from syncbench.sweeps.spec import load_sweep

    class Args:
        profile, set = str(write_profile(tmp_path / "p.yaml")), ["cluster.network.latency_s=0.0009"]

    sweep = load_sweep(REPO / "sweeps" / "specs" / "digits_smoke.yaml", _with_profile(Args))
    for cell in sweep.cells:
        assert cell.config.cluster.compute.step_s == 0.0012
        assert cell.config.cluster.network.bandwidth_gbps == 3.5
        assert cell.config.cluster.network.latency_s == 0.0009


# ------------------------------------------------------------------ bad input of calibrate
@pytest.mark.parametrize("args,says", [
    (["--workers", "0"], "--workers 0"),
    (["--workers", "1"], "--workers 1"),
    (["--out", "/nonexistent-dir/x/p.yaml"], "does not exist"),
    (["--out", "/"], "is a directory"),
])
def test_calibrate_bad_input_exits_2_before_measuring(workspace, tmp_path, capsys, args, says):
    t0 = time.perf_counter()
    code = cli_main(["calibrate", DIGITS, *args])
    assert code == 2
    assert says in capsys.readouterr().err
    assert time.perf_counter() - t0 < 20  # nothing was measured


def test_calibrate_missing_config_or_readonly_out_exits_2(tmp_path, capsys):
    assert cli_main(["calibrate", str(tmp_path / "nope.yaml"), "--workers", "2"]) == 2
    assert "no such file" in capsys.readouterr().err
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        assert cli_main(["calibrate", DIGITS, "--workers", "2", "--out", str(ro / "p.yaml")]) == 2
        assert "not writable" in capsys.readouterr().err


# ------------------------------------------------------------------ real processes
def plain_step_s(config) -> float:
    """An independent timing: the module's own training step in a plain PyTorch loop, one thread."""
    import torch

    from syncbench.experiments.config import import_object

    torch.set_num_threads(1)
    module = import_object(config.task.module, "task.module")(**config.task.module_args)
    data = import_object(config.task.data, "task.data")(**config.task.data_args)
    data.prepare_data()
    data.setup("fit")
    optimizer = module.configure_optimizers()
    optimizer = optimizer[0] if isinstance(optimizer, (list, tuple)) else optimizer
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    loader = torch.utils.data.DataLoader(data.train_dataloader().dataset, batch_size=config.batch_size,
                                         shuffle=True)
    times = []
    for i, (x, y) in enumerate(loader):
        t0 = time.perf_counter()
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(module(x), y).backward()
        optimizer.step()
        times.append(time.perf_counter() - t0)
        if i == 60:
            break
    return statistics.median(times[10:])


@pytest.mark.heavy
@pytest.mark.timing  # compares the dist step it times with a plain loop timed apart: alone on the machine
def test_calibrate_on_two_processes_writes_a_plausible_profile(tmp_path):
    out = tmp_path / "digits.profile.yaml"
    proc = subprocess.run([sys.executable, "-m", "syncbench", "calibrate", DIGITS, "--workers", "2", "--out",
                           str(out), "--budget", "2", "--repeats", "2"], capture_output=True, text=True, cwd=REPO, timeout=400,
                          env={**os.environ, "SYNCBENCH_WORKSPACE": str(tmp_path / "ws")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"wrote {out}" in proc.stdout
    keys = load_profile(out)  # validates against the config model
    assert set(keys) == {"cluster.compute.step_s", "cluster.network.latency_s", "cluster.network.bandwidth_gbps",
                         "cluster.network.server_latency_s", "cluster.network.server_bandwidth_gbps"}
    config = load_config(DIGITS, profile_overrides(out))
    meta = yaml.safe_load(out.read_text())[META_KEY]
    assert meta["workers"] == 2 and meta["torch"] and meta["host"]
    step = config.cluster.compute.step_s
    independent = plain_step_s(config)
    assert 0.2 * independent <= step <= 5 * independent, (step, independent)
    assert 0 <= config.cluster.network.latency_s < 0.05
    assert 0.01 < config.cluster.network.bandwidth_gbps < 10_000
    assert 0 < meta["allreduce_fit"]["latency_s"] < 0.05 and meta["point_to_point_fit"]["bandwidth_gbps"] > 0.01
    assert all(v > 0 for v in meta["dist_clock_per_update_s"].values())
    # two interleaved passes; the profile holds their median (for two: the mean)
    assert len(meta["passes"]) == 2
    assert meta["step_s"]["mean"] == pytest.approx(statistics.mean(p["step_mean_s"] for p in meta["passes"]))
    assert meta["dist_clock_per_update_s"]["async"] == pytest.approx(
        statistics.mean(p["async_clock_per_update_s"] for p in meta["passes"]))
    # the profile writes 6 significant digits: "at least the fit" up to that rounding
    assert config.cluster.network.latency_s >= meta["allreduce_fit"]["latency_s"] * (1 - 1e-5)
    assert config.cluster.network.server_latency_s >= meta["point_to_point_fit"]["latency_s"] * (1 - 1e-5)
    assert config.cluster.network.server_bandwidth_gbps == pytest.approx(meta["point_to_point_fit"]["bandwidth_gbps"],
                                                                         rel=1e-5)
    # issue 24: the check on the user path, printed and recorded; the machine's load recorded
    for strategy in ("sync", "async"):
        assert f"check {strategy}: clock per update predicted (sim)" in proc.stderr
        row = meta["check"]["by_strategy"][strategy]
        assert row["ratio"] == pytest.approx(row["predicted_s"] / row["measured_s"])
    assert meta["machine"]["cores"] == os.cpu_count() and len(meta["machine"]["loads_after_passes"]) == 2
    assert ("WARNING: " in proc.stderr) == meta["machine"]["busy"]
    # every codec timed, none pinned for an uncompressed config
    assert set(meta["codec_s_per_mb"]["by_codec"]) == {"fp16", "bf16", "int8", "topk", "powersgd"}
    assert config.cluster.compute.codec_s_per_mb is None


@pytest.mark.heavy
def test_run_with_profile_records_it_and_set_overrides_it(workspace, tmp_path):
    profile = write_profile(tmp_path / "p.yaml")
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    code = cli_main(["run", DIGITS, "--no-progress", "--profile", str(profile), "--tracking-uri", uri,
                     "--set", "cluster.network.bandwidth_gbps=7", "--set", "budget.train_time_s=0.2",
                     "--set", "eval.every_s=0.05", "--set", "cluster.workers=2"])
    assert code == 0
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    params, tags = runs[0].data.params, runs[0].data.tags
    assert float(params["cluster.compute.step_s"]) == 0.0012
    assert float(params["cluster.network.latency_s"]) == 0.0003
    assert float(params["cluster.network.bandwidth_gbps"]) == 7.0  # --set wins over the profile
    assert tags["syncbench.profile"] == str(profile)
    assert tags["syncbench.step_s_source"] == "pinned"


# ------------------------------------------------------------------ the check at the end (issue 24)
def test_busy_machine_is_reported_with_its_numbers():
    """The load from other processes (before the measurement, and after each pass less the N
    calibration processes) against the free cores; passes more than 20% apart."""
    from syncbench.experiments.procs.calibrate_check import busy_report

    quiet = busy_report(0.2, [2.3, 2.1], cores=4, workers=2, passes={"compute step": [1.00e-3, 1.05e-3]})
    assert not quiet["busy"] and quiet["warnings"] == [] and quiet["free_cores"] == 2
    assert quiet["load_from_others_max"] == pytest.approx(0.3)  # 2.3 - the 2 calibration processes
    assert quiet["pass_spread"]["compute step"] == pytest.approx(0.05)
    busy = busy_report(1.8, [3.9], cores=2, workers=2, passes={"sync clock per update": [4.0e-3, 5.2e-3]})
    assert busy["busy"] and len(busy["warnings"]) == 2
    load, spread = busy["warnings"]
    assert "load average of 1.90" in load and "on 2 cores, 0 of them free" in load  # 3.9 - 2 > 1.8
    assert "4.000-5.200 ms over 2 passes (30% apart, limit 20%)" in spread
    assert busy_report(None, [None], cores=2, workers=2, passes={"x": [1.0]})["busy"] is False  # no load, one pass


@pytest.mark.heavy
def test_calibrate_check_prints_and_records_predicted_over_measured(tmp_path, monkeypatch):
    """The check on a hand-written profile (N = 2, digits): one dist and one sim run per fitted
    strategy, printed and recorded in the profile's metadata, which still loads as a profile.
    The sim side is the profile's own prediction: for sync without stragglers, a step plus a
    ring all-reduce of the 4,810 fp32 gradients, worked by hand."""
    from syncbench.experiments.procs.calibrate import profile_yaml
    from syncbench.experiments.procs.calibrate_check import finish

    monkeypatch.setenv("SYNCBENCH_WORKSPACE", str(tmp_path / "ws"))
    profile = {"cluster": {"compute": {"step_s": 0.0012},
                           "network": {"latency_s": 0.0003, "bandwidth_gbps": 3.5, "server_latency_s": 0.0004,
                                       "server_bandwidth_gbps": 3.5}},
               META_KEY: {"host": "test", "workers": 2}}
    said: list[str] = []
    config = load_config(DIGITS, ["eval.every_s=0.25"])
    finish(profile, META_KEY, config, 2, 0.1, [2.2], {"compute step": [1e-3]}, 1.0, said.append)
    check = profile[META_KEY]["check"]["by_strategy"]
    assert set(check) == {"sync", "async"}
    for strategy, row in check.items():
        assert row["predicted_s"] > 0 and row["measured_s"] > 0
        assert row["ratio"] == pytest.approx(row["predicted_s"] / row["measured_s"])
        assert any(line.startswith(f"check {strategy}: clock per update predicted (sim) "
                                   f"{row['predicted_s'] * 1e3:.3f} ms / measured (dist) {row['measured_s'] * 1e3:.3f} ms")
                   for line in said), said
    ring = 2 * (2 - 1) * 0.0003 + 2 * (2 - 1) / 2 * 4810 * 4 / (3.5e9 / 8)
    assert check["sync"]["predicted_s"] == pytest.approx(0.0012 + ring, rel=0.01)  # 1 s / whole updates
    assert profile[META_KEY]["machine"]["load_before"] == 0.1
    out = tmp_path / "p.yaml"
    out.write_text(profile_yaml(profile))
    assert load_profile(out)["cluster.compute.step_s"] == 0.0012  # metadata stripped
    assert yaml.safe_load(out.read_text())[META_KEY]["check"]["by_strategy"]["sync"]["ratio"] > 0


def test_calibrate_times_every_codec_and_pins_only_the_configs_own():
    """Every codec is timed for one worker of N on the task's gradients; the profile pins
    cluster.compute.codec_s_per_mb for the config's own codec only (none: nothing pinned)."""
    from syncbench.experiments.procs.calibrate_codecs import codec_profile_keys, measure_codecs

    int8 = load_config(DIGITS, ["strategy.compression=int8", "strategy.topk_ratio=0.05"])
    measured = measure_codecs(int8, 2)
    assert set(measured) == {"fp16", "bf16", "int8", "topk", "powersgd"} and all(v > 0 for v in measured.values())
    assert codec_profile_keys(int8, measured) == {"codec_s_per_mb": float(f"{measured['int8']:.6g}")}
    assert codec_profile_keys(load_config(DIGITS, []), measured) == {}
    assert codec_profile_keys(load_config(DIGITS, ["strategy.name=async"]), measured) == {}

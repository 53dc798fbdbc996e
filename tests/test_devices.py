"""``cluster.device`` on both backends (docs/config.md, docs/backends.md). This machine's plumbing
is tested on the CPU (``cpu``, and ``auto`` resolving to it); the tests that need a GPU are
marked ``cuda`` and skip, naming why, where there is none (benchmarks/device_check.sh runs them)."""

from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient

from syncbench.experiments.config import ConfigError, load_config
from syncbench.experiments.procs.devices import RankDevice, choose_rank_device, requested_device
from syncbench.experiments.run import execute_run
from syncbench.experiments.sim.device import resolve_sim_device
from syncbench.experiments.sim.driver import build_simulation
from syncbench.experiments.task import prepare_task
from syncbench.strategies.tensors import flat_state
from tests.conftest import CONFIGS

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine (run benchmarks/device_check.sh "
                                                     "where there is one)")


def config(*overrides: str):
    return load_config(CONFIGS / "digits_mlp.yaml", ["cluster.workers=4", *overrides])


def runs_in(uri: str) -> list:
    client = MlflowClient(tracking_uri=uri)
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


@pytest.mark.parametrize("value", ["auto", "cpu", "cuda", "cuda:3"])
def test_device_values_are_accepted(value):
    assert config(f"cluster.device={value}").cluster.device == value


@pytest.mark.parametrize("value", ["gpu", "cuda:", "cuda:x", "CPU", "mps"])
def test_a_bad_device_is_refused_naming_the_key(value):
    with pytest.raises(ConfigError, match="cluster.device"):
        config(f"cluster.device={value}")


def test_dist_refuses_one_numbered_gpu():
    with pytest.raises(ConfigError, match=r"cluster.device=cuda:1: the dist backend gives local rank r cuda:r"):
        config("cluster.backend=dist", "cluster.device=cuda:1")


@pytest.mark.parametrize("value", [False, "off", "auto"])
def test_sim_batching_values(value):
    """YAML 1.1 reads a bare ``off`` as false: it means off."""
    expected = "off" if value in (False, "off") else "auto"
    assert config(f"cluster.sim.batching={str(value).lower()}").cluster.sim.batching == expected


def test_bad_batching_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match="cluster.sim.batching"):
        config("cluster.sim.batching=sometimes")


def test_sim_device_resolution_here():
    assert resolve_sim_device("cpu") == "cpu"
    assert resolve_sim_device("auto") == ("cuda:0" if HAS_CUDA else "cpu")


@pytest.mark.skipif(HAS_CUDA, reason="this machine has a CUDA device: nothing to refuse")
def test_cuda_without_a_gpu_is_refused_before_any_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    with pytest.raises(ConfigError, match=r"cluster.device=cuda: this machine has 0 CUDA device"):
        execute_run(config("cluster.device=cuda"), workspace=tmp_path / "ws", tracking_uri=uri)
    assert runs_in(uri) == []
    with pytest.raises(ValueError, match="cluster.device=cuda but this node has no CUDA device"):
        choose_rank_device(0, 1, 0, "cuda")


def test_dist_device_choice_follows_the_config_unless_the_environment_says(monkeypatch):
    monkeypatch.delenv("SYNCBENCH_DIST_DEVICE", raising=False)
    assert requested_device("cpu") == "cpu" and requested_device("auto") == "auto"
    assert choose_rank_device(1, 2, 2, requested_device("cpu")) == RankDevice("gloo", "cpu")
    assert choose_rank_device(1, 2, 2, requested_device("cuda")) == RankDevice("nccl", "cuda:1")
    monkeypatch.setenv("SYNCBENCH_DIST_DEVICE", "cpu")
    assert requested_device("cuda") == "cpu"


def test_a_cpu_run_records_its_device_and_batching(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    execute_run(config("cluster.device=cpu", "budget.train_time_s=0.05", "eval.every_s=0.05"),
                workspace=tmp_path / "ws", tracking_uri=uri)
    (run,) = runs_in(uri)
    assert run.data.tags["syncbench.sim.device"] == "cpu"
    assert run.data.tags["syncbench.sim.batching"] == "batched"
    assert run.data.params["cluster.device"] == "cpu" and run.data.params["cluster.sim.batching"] == "auto"
    assert "peak_mem_bytes" not in run.data.metrics  # no per-step peak on the CPU (docs/metrics.md)
    assert run.data.metrics["activation_bytes"] > 0


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("batching", ["auto", "off"])
def test_sim_on_cuda_follows_the_cpu(batching):
    """The same 10 sync updates on cuda:0 and on the CPU: the replicas live on the GPU, the
    parameters agree within float32 rounding."""
    finals = {}
    for device in ("cpu", "cuda:0"):
        cfg = config("cluster.stragglers={kind: lognormal, sigma: 0.3}", f"cluster.sim.batching={batching}")
        task = prepare_task(cfg)
        engine = build_simulation(cfg, task, step_s=1e-3, device=device)
        while engine.counters()[0] < 10:
            engine.advance()
        assert next(engine.workers[0].module.parameters()).device.type == torch.device(device).type
        finals[device] = flat_state(engine.global_model()).cpu()
    torch.testing.assert_close(finals["cuda:0"], finals["cpu"], atol=1e-4, rtol=1e-4)


@pytest.mark.cuda
@needs_cuda
def test_a_cuda_run_end_to_end(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    result = execute_run(config("cluster.device=cuda", "budget.train_time_s=0.5", "eval.every_s=0.1"),
                         workspace=tmp_path / "ws", tracking_uri=uri)
    (run,) = runs_in(uri)
    assert run.data.tags["syncbench.sim.device"] == "cuda:0" and result.outcome in ("reached", "budget")
    params = sum(p.numel() * 4 for p in prepare_task(config()).module.parameters())
    # parameters and their gradients at least, on the GPU: the allocator's own count
    assert run.data.metrics["peak_mem_bytes"] >= 2 * params


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("impl", ["torch", "deepspeed"])
def test_checkpointing_lowers_cudas_own_peak(impl):
    """Activation checkpointing on a deep CharLM with a long context: CUDA's allocator peak over a
    step (``step_peak_bytes``, independent of ``activation_bytes``' graph walk) drops, by at least
    a third of what the graph walk says it saves."""
    from syncbench.experiments.charlm import VOCAB_SIZE, CharLM
    from syncbench.experiments.config import CheckpointingConfig
    from syncbench.strategies.checkpointing import activation_bytes, apply_checkpointing, step_peak_bytes

    torch.manual_seed(0)
    model = CharLM(d_model=128, n_layers=8, n_heads=4, context=256, dropout=0.0)
    g = torch.Generator().manual_seed(1)
    batch = tuple(torch.randint(0, VOCAB_SIZE, (16, 256), generator=g) for _ in range(2))
    off_peak, off_kept = step_peak_bytes(model, batch, "cuda:0"), activation_bytes(model, batch)
    apply_checkpointing(model, CheckpointingConfig(enabled=True, every=1, impl=impl))
    on_peak, on_kept = step_peak_bytes(model, batch, "cuda:0"), activation_bytes(model, batch)
    assert on_kept < off_kept
    assert off_peak - on_peak >= (off_kept - on_kept) / 3, (off_peak, on_peak, off_kept, on_kept)

"""Activation checkpointing (strategies/checkpointing.py) on a small CharLM: real forward and
backward passes through DeepSpeed's and torch's checkpoint functions, no mocks."""

from __future__ import annotations

import copy
import pickle

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from syncbench.experiments.charlm import VOCAB_SIZE, CharLM
from syncbench.experiments.config import CheckpointingConfig, ConfigError
from syncbench.strategies.lightning_bridge import capture_logs, training_loss
from syncbench.strategies.checkpointing import (
    CheckpointedForward,
    activation_bytes,
    apply_checkpointing,
    peak_memory_bytes,
    release_deepspeed_process_group,
    remove_checkpointing,
)

IMPLS = ["deepspeed", "torch"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread_and_cleanup():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    release_deepspeed_process_group()  # leave no default process group to later tests


def small_model(dropout: float = 0.2) -> CharLM:
    torch.manual_seed(0)
    model = CharLM(d_model=32, n_layers=4, n_heads=2, context=32, dropout=dropout)
    capture_logs(model)
    return model


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB_SIZE, (4, 32), generator=g), torch.randint(0, VOCAB_SIZE, (4, 32), generator=g)


def ckpt(every: int = 1, impl: str = "deepspeed", **kw) -> CheckpointingConfig:
    return CheckpointingConfig(enabled=True, every=every, impl=impl, **kw)


def gradients(model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat gradient of one training step from a fixed RNG state, and the next random draw
    (checkpointing must leave the RNG stream where the plain forward leaves it)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1234)
    training_loss(model, batch, 0).backward()
    flat = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    return flat, torch.rand(4)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("every", [1, 2])
def test_gradients_equal_with_dropout(impl, every, batch):
    model = small_model(dropout=0.2)
    reference, next_draw = gradients(model, batch)
    assert apply_checkpointing(model, ckpt(every, impl)) == (4 if every == 1 else 2)
    got, got_draw = gradients(model, batch)
    torch.testing.assert_close(got, reference, rtol=0, atol=1e-6)
    assert torch.equal(got_draw, next_draw)
    # dropout is really active: another RNG state gives other gradients
    model.zero_grad(set_to_none=True)
    torch.manual_seed(99)
    training_loss(model, batch, 0).backward()
    assert not torch.allclose(torch.cat([p.grad.reshape(-1) for p in model.parameters()]), reference)


def test_deepspeed_partitioned_activations_equal_gradients(batch):
    model = small_model()
    reference, _ = gradients(model, batch)
    apply_checkpointing(model, ckpt(1, "deepspeed", partition_activations=True))
    torch.testing.assert_close(gradients(model, batch)[0], reference, rtol=0, atol=1e-6)


def test_activation_bytes_shrink_with_checkpointing(batch):
    model = small_model()
    off = activation_bytes(model, batch)
    counts = {}
    for impl in IMPLS:
        for every in (1, 2):
            apply_checkpointing(model, ckpt(every, impl))
            counts[impl, every] = activation_bytes(model, batch)
    remove_checkpointing(model)
    assert activation_bytes(model, batch) == off  # measuring changes nothing
    for impl in IMPLS:
        assert counts[impl, 1] < 0.15 * off, (impl, counts[impl, 1], off)
        assert counts[impl, 1] < counts[impl, 2] < off
    for every in (1, 2):
        ds, pt = counts["deepspeed", every], counts["torch", every]
        assert abs(ds - pt) <= 0.05 * pt, (every, ds, pt)


def test_activation_bytes_sees_what_deepspeed_keeps_outside_save_for_backward(batch):
    """DeepSpeed keeps block inputs in ctx.deepspeed_saved_tensors: the graph walk must
    find them (4 blocks x batch x seq x d_model float32 at least)."""
    model = small_model()
    apply_checkpointing(model, ckpt(1, "deepspeed"))
    block_inputs = 4 * 4 * 32 * 32 * 4
    assert activation_bytes(model, batch) >= block_inputs


def test_activation_bytes_leaves_gradients_alone(batch):
    model = small_model()
    grads, _ = gradients(model, batch)
    activation_bytes(model, batch)
    assert torch.equal(torch.cat([p.grad.reshape(-1) for p in model.parameters()]), grads)


@pytest.mark.parametrize("impl", IMPLS)
def test_deepcopy_of_checkpointed_module(impl, batch):
    model = small_model()
    reference, _ = gradients(model, batch)
    apply_checkpointing(model, ckpt(1, impl))
    replica = copy.deepcopy(model)
    for original, copied in zip(model.blocks, replica.blocks):
        assert isinstance(copied.forward, CheckpointedForward)
        assert copied.forward.block is copied and original.forward.block is original
    torch.testing.assert_close(gradients(replica, batch)[0], reference, rtol=0, atol=1e-6)
    assert activation_bytes(replica, batch) == activation_bytes(model, batch)
    # the replica trains its own parameters, not the original's
    with torch.no_grad():
        for p in replica.parameters():
            p.add_(1.0)
    torch.testing.assert_close(gradients(model, batch)[0], reference, rtol=0, atol=1e-6)
    # pickling (e.g. to a spawned process) keeps the wrapping too
    plain = CharLM(d_model=32, n_layers=4, n_heads=2, context=32)
    apply_checkpointing(plain, ckpt(1, impl))
    restored = pickle.loads(pickle.dumps(plain))
    assert restored.blocks[0].forward.block is restored.blocks[0]


def test_state_dict_keys_unchanged():
    model = small_model()
    keys = list(model.state_dict())
    apply_checkpointing(model, ckpt(1, "torch"))
    assert list(model.state_dict()) == keys


def test_disabled_or_reapplied_replaces_previous_wrapping(batch):
    model = small_model()
    off = activation_bytes(model, batch)
    apply_checkpointing(model, ckpt(1, "torch"))
    assert apply_checkpointing(model, ckpt(3, "torch")) == 2  # blocks 0 and 3
    assert [isinstance(vars(b).get("forward"), CheckpointedForward) for b in model.blocks] == [True, False, False, True]
    assert apply_checkpointing(model, CheckpointingConfig(enabled=False)) == 0
    assert activation_bytes(model, batch) == off


def test_eval_forward_is_not_checkpointed(batch):
    model = small_model()
    model.eval()
    with torch.no_grad():
        expected = model(batch[0])
    apply_checkpointing(model, ckpt(1, "deepspeed"))
    with torch.no_grad():
        torch.testing.assert_close(model(batch[0]), expected, rtol=0, atol=0)


class NoBlocks(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(4, 2)


class EmptyBlocks(NoBlocks):
    def checkpoint_blocks(self):
        return []


@pytest.mark.parametrize("cls", [NoBlocks, EmptyBlocks])
def test_module_without_blocks_is_a_config_error(cls):
    with pytest.raises(ConfigError, match=rf"checkpointing\.enabled: {cls.__name__} exposes no blocks.*checkpoint_blocks"):
        apply_checkpointing(cls(), ckpt(1, "torch"))
    assert apply_checkpointing(cls(), CheckpointingConfig(enabled=False)) == 0


def test_unusable_option_combinations_are_config_errors():
    with pytest.raises(ConfigError, match="DeepSpeed options"):
        apply_checkpointing(small_model(), ckpt(1, "torch", partition_activations=True))
    with pytest.raises(ConfigError, match="cpu_checkpointing"):
        apply_checkpointing(small_model(), ckpt(1, "deepspeed", cpu_checkpointing=True))


def test_peak_memory_bytes_is_the_process_peak():
    before = peak_memory_bytes()
    big = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    after = peak_memory_bytes()
    del big
    assert before > 0 and after >= before

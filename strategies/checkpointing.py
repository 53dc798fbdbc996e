"""Activation checkpointing of a user's transformer blocks, and honest memory accounting.

Activation checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear Memory
Cost"; Griewank & Walther 2000 for the general idea) keeps only the *input* of a
checkpointed segment during the forward pass and recomputes the segment's internals
during the backward pass: memory for one extra forward of that segment.

Protocol
--------
A LightningModule opts in by defining::

    def checkpoint_blocks(self) -> Sequence[torch.nn.Module]:
        '''The repeated blocks (e.g. transformer layers) in forward order.'''

Each returned block must be called as ``block(*tensors, **kwargs)`` somewhere in the
module's forward pass and must not mutate its inputs. ``checkpointing.every = k`` wraps
blocks 0, k, 2k, ... (so ``every: 1`` wraps all of them, ``every: 2`` every other one):
a wrapped block keeps its input only; the blocks in between keep their activations as
usual (Chen et al.'s segments of length k). Whole blocks are the unit on purpose: the
recomputation then costs one no-grad forward of the wrapped blocks, which DeepSpeed
attains almost exactly (charlm, every=1: 1.33x step time against Chen et al.'s 1.28x,
for 0.11x the activation bytes; ``python -m benchmarks.checkpointing``). Recomputing less
(keeping matmul outputs, Korthikanti et al. 2022's selective recomputation) would keep
several activation-widths per block instead of one.

Which implementation
--------------------
``impl: deepspeed`` uses ``deepspeed.checkpointing.checkpoint`` (the reentrant
CheckpointFunction of Megatron-LM/DeepSpeed; ``partition_activations`` and
``cpu_checkpointing`` are passed to ``deepspeed.checkpointing.configure``). ``impl: torch``
uses ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``, the reference.
Both restore the forward's CPU (and device) RNG state for the recomputation, so dropout
draws the same masks and the gradients equal those without checkpointing. DeepSpeed keeps
the block inputs outside ``save_for_backward`` (``ctx.deepspeed_saved_tensors``), and with
``partition_activations`` it empties each input's ``.data`` in place (Megatron-LM's
assumption that nothing else saved a block's input). On a CPU model
``cpu_checkpointing`` is rejected: DeepSpeed's "copy" to the CPU is then the input
itself, which it empties, and the backward pass fails.

How the wrapping survives copies
--------------------------------
The sim's local SGD ``copy.deepcopy``-s the module into N replicas after checkpointing is
applied. The wrapper is an instance attribute ``block.forward`` holding a small object that
references its block (not a closure): deepcopy (and pickle) rebind it to the copied block
through the memo, parameter names and ``state_dict`` keys stay unchanged, and the block
is checkpointed however the user's forward reaches it.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import io
import logging
import resource
import sys
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from syncbench.strategies.lightning_bridge import LightningModuleLike, training_loss
# the options models live apart from torch (config validation does not import it)
from syncbench.strategies.options import CheckpointingConfig
from syncbench.strategies.program import ConfigError

# Options DeepSpeed's checkpointing module was last configured with in this process
# (``deepspeed.checkpointing.configure`` sets module globals: once per process).
_ds_options: tuple[bool, bool] | None = None
_own_group = False  # whether we created the default process group (world size 1)
_DS_MODULE = "deepspeed.runtime.activation_checkpointing.checkpointing"  # = deepspeed.checkpointing


def _blocks_of(module: nn.Module) -> list[nn.Module]:
    getter = getattr(module, "checkpoint_blocks", None)
    blocks = list(getter()) if callable(getter) else []
    if not blocks:
        raise ConfigError(
            f"checkpointing.enabled: {type(module).__name__} exposes no blocks; define "
            "checkpoint_blocks(self) -> Sequence[nn.Module] returning the blocks to checkpoint in "
            "forward order (see strategies/checkpointing.py), or set checkpointing.enabled: false"
        )
    for i, block in enumerate(blocks):
        if not isinstance(block, nn.Module):
            raise ConfigError(
                f"checkpointing.enabled: {type(module).__name__}.checkpoint_blocks()[{i}] is a "
                f"{type(block).__name__}, not an nn.Module"
            )
    return blocks


class CheckpointedForward:
    """``block.forward`` of a checkpointed block: the block's own (class) forward, run
    under activation checkpointing when a backward pass will follow."""

    def __init__(self, block: nn.Module, impl: str, partition_activations: bool, cpu_checkpointing: bool):
        self.block, self.impl = block, impl
        self.ds_options = (partition_activations, cpu_checkpointing)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        forward = type(self.block).forward.__get__(self.block)
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        if not torch.is_grad_enabled() or not tensors:
            return forward(*args, **kwargs)  # evaluation: nothing is kept for a backward
        if self.impl == "torch":
            return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
        if not any(t.requires_grad for t in tensors):
            # DeepSpeed's checkpoint is reentrant: with no input requiring grad its output
            # would not either, and the block's parameters would silently get no gradient.
            return forward(*args, **kwargs)
        if _ds_options != self.ds_options:  # e.g. a copy unpickled in a fresh process
            _configure_deepspeed(*self.ds_options)
        from deepspeed.runtime.activation_checkpointing import checkpointing as ds_checkpointing

        return ds_checkpointing.checkpoint(forward, *args, **kwargs)

    def __repr__(self) -> str:
        return f"CheckpointedForward({type(self.block).__name__}, impl={self.impl!r})"


def remove_checkpointing(module: nn.Module) -> None:
    """Undo ``apply_checkpointing`` on every submodule."""
    for sub in module.modules():
        if isinstance(vars(sub).get("forward"), CheckpointedForward):
            del sub.forward


def apply_checkpointing(module: LightningModuleLike, cfg: CheckpointingConfig) -> int:
    """Checkpoint blocks 0, k, 2k, ... of ``module.checkpoint_blocks()`` (k = ``cfg.every``).

    Returns how many blocks were wrapped (0 when ``cfg.enabled`` is false). Applying again
    replaces the previous wrapping. With ``impl: deepspeed`` this sets up DeepSpeed once per
    process (``ensure_deepspeed_checkpointing``); in the real-process backend call it after
    the process group exists, so that DeepSpeed joins that group.
    """
    remove_checkpointing(module)
    if not cfg.enabled:
        return 0
    blocks = _blocks_of(module)
    _check_options(module, cfg)
    if cfg.impl == "deepspeed":
        ensure_deepspeed_checkpointing(cfg)
    chosen = blocks[:: cfg.every]
    for block in chosen:
        block.forward = CheckpointedForward(block, cfg.impl, cfg.partition_activations, cfg.cpu_checkpointing)
    return len(chosen)


def _check_options(module: nn.Module, cfg: CheckpointingConfig) -> None:
    if cfg.impl == "torch" and (cfg.partition_activations or cfg.cpu_checkpointing):
        raise ConfigError(
            "checkpointing.partition_activations / checkpointing.cpu_checkpointing are DeepSpeed options: "
            "impl: torch has neither. Set impl: deepspeed, or set both to false."
        )
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    if cfg.impl == "deepspeed" and cfg.cpu_checkpointing and device.type == "cpu":
        # DeepSpeed copies the block input "to the CPU", gets the same tensor back, then
        # empties that tensor's storage: the backward pass fails (seen with DeepSpeed 0.19.8).
        raise ConfigError(
            "checkpointing.cpu_checkpointing: the model is on the CPU, where activations already live in "
            "CPU memory; DeepSpeed's CPU checkpointing needs an accelerator. Set it to false."
        )


def ensure_deepspeed_checkpointing(cfg: CheckpointingConfig) -> None:
    """Make ``deepspeed.checkpointing.checkpoint`` usable in this process (idempotent).

    DeepSpeed's checkpointing asks its communication layer for ranks, so it needs a process
    group: when torch.distributed is not initialised (the sim backend, tests), a
    single-process gloo group on an in-process store is created (no port, no environment
    variables that could leak into child processes). Then ``configure`` runs once, and
    again only when the options change.
    """
    _configure_deepspeed(cfg.partition_activations, cfg.cpu_checkpointing)


def _configure_deepspeed(partition_activations: bool, cpu_checkpointing: bool) -> None:
    global _ds_options, _own_group
    import deepspeed
    from deepspeed import comm as ds_comm
    from deepspeed.runtime.activation_checkpointing import checkpointing as ds_checkpointing

    if _ds_options == (partition_activations, cpu_checkpointing) and ds_comm.is_initialized():
        return
    ds_logger = logging.getLogger("DeepSpeed")
    level = ds_logger.level
    ds_logger.setLevel(logging.WARNING)  # its INFO banner would interleave with our progress display
    try:
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group(
                "gloo", store=torch.distributed.HashStore(), rank=0, world_size=1,
                timeout=datetime.timedelta(seconds=60),
            )
            _own_group = True
        if not ds_comm.is_initialized():
            # Checkpointing issues no DeepSpeed collective, but DeepSpeed's comm layer would
            # JIT-compile its CPU shared-memory all-reduce op with ninja (~1 min on a fresh
            # machine, then cached): mark that op unavailable so it is skipped.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
            with contextlib.redirect_stdout(io.StringIO()):  # it print()s a banner
                deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(),
                                           auto_mpi_discovery=False, verbose=False)
        ds_checkpointing.configure(
            None, partition_activations=partition_activations, contiguous_checkpointing=False,
            checkpoint_in_cpu=cpu_checkpointing, synchronize=False, profile=False,
        )
    finally:
        ds_logger.setLevel(level)
    _ds_options = (partition_activations, cpu_checkpointing)


def release_deepspeed_process_group() -> None:
    """Destroy the single-process group ``ensure_deepspeed_checkpointing`` created, if any
    (e.g. before code that initialises its own default group in this process). DeepSpeed
    sets itself up again on the next checkpointed forward."""
    global _ds_options, _own_group
    if _own_group and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _own_group, _ds_options = False, None


# --- memory accounting


class _Packed:
    """What our saved-tensor hook stores: a detached alias (no reference cycle through
    ``grad_fn``). A weak reference to it tells whether autograd still holds the tensor."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor.detach()


def _tensors_in(value: Any) -> Iterable[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
        saved = getattr(value, "saved_data", None)  # DeepSpeed's partitioned / CPU copy
        if isinstance(saved, torch.Tensor):
            yield saved
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors_in(item)


def _ctx_tensors(root: Any) -> list[torch.Tensor]:
    """Tensors kept as plain attributes of Python autograd Function contexts reachable
    from ``root`` (a grad_fn), e.g. DeepSpeed's ``ctx.deepspeed_saved_tensors``."""
    found: list[torch.Tensor] = []
    seen: dict[int, Any] = {}
    stack = [root]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen[id(node)] = node  # keeps the wrapper alive so its id is not reused during the walk
        attrs = getattr(node, "__dict__", None)  # only Python Function contexts have one
        if attrs:
            for name, value in attrs.items():
                # RNG generator states (DeepSpeed's fwd_cpu_rng_state, ~5 KB per checkpoint,
                # independent of the batch) are not activations; torch's checkpoint keeps the
                # same state out of sight, so counting them would also skew the comparison.
                if "rng_state" not in name:
                    found.extend(_tensors_in(value))
        stack.extend(fn for fn, _ in getattr(node, "next_functions", ()))
    return found


def _storage_key(t: torch.Tensor) -> tuple[str, int, int]:
    s = t.untyped_storage()
    return (str(t.device), s.data_ptr(), s.nbytes())


def activation_bytes(module: LightningModuleLike, batch: Any, batch_idx: int = 0) -> int:
    """Bytes one training step keeps for its backward pass, over unique storages.

    Two sources, together complete:
    * everything autograd saves (``save_for_backward`` of C++ and Python nodes, torch
      checkpoint's saved inputs), seen through ``torch.autograd.graph.saved_tensors_hooks``
      and counted only if still held when the forward pass ends. Inside a torch
      checkpoint region its own hooks take precedence: what it recomputes is not counted,
      as it is not kept. (Reading ``grad_fn._saved_*`` there instead would run the
      recomputation.)
    * tensors that custom Functions keep outside ``save_for_backward``, found by walking
      the graph from the loss (``next_functions``) and reading each Python node's context:
      DeepSpeed keeps the block inputs in ``ctx.deepspeed_saved_tensors`` (and, partitioned
      or on CPU, in their ``saved_data``), which saved-tensor hooks never see.

    Parameters, buffers and the batch's own tensors are excluded: they are not activations
    and live on without the backward pass (a batch that is a view into a dataset would
    otherwise count the whole dataset). A storage shared by several tensors (views, the
    same tensor saved twice) counts once, in full.
    """
    exclude = {_storage_key(t) for t in (*module.parameters(), *module.buffers(), *_tensors_in(batch))}
    boxes: list[weakref.ref] = []

    def pack(t: torch.Tensor) -> _Packed:
        box = _Packed(t)
        boxes.append(weakref.ref(box))
        return box

    was_training = module.training
    module.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.tensor):
            loss = training_loss(module, batch, batch_idx)
        kept = [box.tensor for ref in boxes if (box := ref()) is not None]
        kept += _ctx_tensors(loss.grad_fn)
        sizes = {}
        for t in kept:
            key = _storage_key(t)
            if key not in exclude and key[1] != 0:
                sizes[key] = key[2]
        del loss, kept  # frees the graph; gradients of the caller stay untouched
        if _DS_MODULE in sys.modules:
            sys.modules[_DS_MODULE].reset()  # its advice after a forward without backward
    finally:
        module.train(was_training)
    return int(sum(sizes.values()))


def step_peak_bytes(module: LightningModuleLike, batch: Any, device: torch.device | str, batch_idx: int = 0) -> int:
    """CUDA's own count of one training step's memory: the caching allocator's peak over a copy
    of ``module`` moved to ``device``, its batch, one forward and one backward -- parameters,
    gradients, activations (checkpointed or not, DeepSpeed's partitions included) and the kernels'
    temporaries; not optimizer state. Counted from what was allocated before, so other tensors on
    the device do not count; the module itself and the caller's random state are left alone.
    Independent of ``activation_bytes``' walk over the graph: a check of it where a GPU exists."""
    device = torch.device(device)
    assert device.type == "cuda", "the allocator's peak exists on CUDA only"
    with torch.random.fork_rng(devices=[device]):  # the caller's generators left as they were
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        replica = copy.deepcopy(module).to(device)
        replica.train()
        on_device = torch.utils._pytree.tree_map(
            lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, batch)
        training_loss(replica, on_device, batch_idx).backward()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del replica, on_device
    return int(peak)


def peak_memory_bytes(device: torch.device | str | None = None) -> int:
    """Peak memory: the CUDA caching allocator's peak on a GPU, else the process's peak
    resident set size (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    device = torch.device(device) if device is not None else None
    if (device is None or device.type == "cuda") and torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)

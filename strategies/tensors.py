"""Flat views of a module: trainable parameters, gradients and floating-point buffers
(BatchNorm statistics) as single vectors, the unit every strategy communicates in."""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch

# Walking a module's tree for its parameters costs more than averaging a small model's
# gradients; the lists are kept per module (a module's parameter set does not change during
# a run -- its optimizer holds them; ``copy.deepcopy`` of a module is a new key).
_TRAINABLE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    found = _TRAINABLE.get(module)
    if found is None:
        found = _TRAINABLE[module] = [p for p in module.parameters() if p.requires_grad]
    return found


def flat_params(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in trainable(module)])


@torch.no_grad()
def load_flat_params_(module: torch.nn.Module, flat: torch.Tensor) -> None:
    offset = 0
    for p in trainable(module):
        n = p.numel()
        p.copy_(flat[offset : offset + n].view_as(p))
        offset += n
    assert offset == flat.numel(), "flat vector does not match the module's parameters"


def flat_grads(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([
        (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in trainable(module)
    ])


@torch.no_grad()
def load_flat_grads_(module: torch.nn.Module, flat: torch.Tensor) -> None:
    """Gradients := ``flat`` (``flat_grads``' layout), copied into existing gradient tensors."""
    params = trainable(module)
    views = [v.view_as(p) for v, p in zip(torch.split(flat, [p.numel() for p in params]), params)]
    torch._foreach_copy_(_gradient_tensors(params), views)


def _gradient_tensors(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    """Each parameter's ``.grad``, allocated where missing: the tensors a gradient is copied into."""
    for p in params:
        if p.grad is None or p.grad.shape != p.shape:
            p.grad = torch.empty_like(p)
    return [p.grad for p in params]


@torch.no_grad()
def copy_state_(target: torch.nn.Module, source: torch.nn.Module) -> None:
    """``target``'s parameters and floating-point buffers := ``source``'s (same architecture);
    what ``load_flat_state_(target, flat_state(source))`` does, without the flat copy."""
    dst = trainable(target) + float_buffers(target)
    src = trainable(source) + float_buffers(source)
    assert len(dst) == len(src), "modules differ"
    torch._foreach_copy_([t.data for t in dst], [t.data for t in src])


@torch.no_grad()
def copy_gradients_(target: torch.nn.Module, source: torch.nn.Module) -> None:
    """``target``'s gradients and floating-point buffers := ``source``'s (same architecture);
    what ``load_gradient_payload_(target, gradient_payload(source))`` does, without the flat copy."""
    dst, src = trainable(target), trainable(source)
    assert len(dst) == len(src), "modules differ"
    torch._foreach_copy_(_gradient_tensors(dst),
                         [q.grad if q.grad is not None else torch.zeros_like(q) for q in src])
    bufs_dst, bufs_src = float_buffers(target), float_buffers(source)
    if bufs_dst:
        torch._foreach_copy_(bufs_dst, bufs_src)


# Where the floating-point buffers live, per module: (owning submodule, buffer name). A module
# may replace a buffer tensor (an EMA, ``self.running_mean = ...``), so the tensors themselves
# are looked up on every call; only the walk of the module tree, which costs more than
# averaging a small model, is kept.
_BUFFER_SLOTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def float_buffers(module: torch.nn.Module) -> list[torch.Tensor]:
    slots = _BUFFER_SLOTS.get(module)
    if slots is None:
        slots = _BUFFER_SLOTS[module] = [
            (owner, name) for _, owner in module.named_modules()
            for name, b in owner._buffers.items() if b is not None and b.is_floating_point()
        ]
    found = [owner._buffers[name] for owner, name in slots]
    return [b for b in found if b is not None and b.is_floating_point()]


def flat_state(module: torch.nn.Module) -> torch.Tensor:
    """Trainable parameters, then floating-point buffers, as one vector."""
    params = flat_params(module)
    buffers = [b.detach().reshape(-1).to(params.dtype) for b in float_buffers(module)]
    return torch.cat([params, *buffers]) if buffers else params


@torch.no_grad()
def load_params_then_buffers_(module: torch.nn.Module, flat: torch.Tensor,
                              load_params: Callable[[torch.nn.Module, torch.Tensor], None]) -> None:
    """``flat`` = trainable-parameter part (given to ``load_params``), then the float buffers."""
    n_params = sum(p.numel() for p in trainable(module))
    load_params(module, flat[:n_params])
    offset = n_params
    for b in float_buffers(module):
        n = b.numel()
        b.copy_(flat[offset : offset + n].view_as(b))
        offset += n
    assert offset == flat.numel(), "flat vector does not match the module"


def load_flat_state_(module: torch.nn.Module, flat: torch.Tensor) -> None:
    """Parameters and floating-point buffers from ``flat_state``'s layout."""
    load_params_then_buffers_(module, flat, load_flat_params_)


def state_numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in trainable(module)) + sum(b.numel() for b in float_buffers(module))


def param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in trainable(module))

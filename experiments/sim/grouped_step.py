"""The sim's grouped optimizer step on the stacked path (``syncbench.experiments.sim.stacked``):
when every worker reaches the ``Step`` operation at the same instant (local SGD, DiLoCo,
streaming DiLoCo and compressed sync without stragglers), their N optimizer steps run as one.

How: each trainable parameter of the N replicas lives in one tensor of shape ``[N, *shape]``
(each replica's parameter is a view of its row, so everything that reads or writes a replica
in place sees it), and so does each elementwise optimizer state (Adam's moments, SGD's momentum
buffer). One optimizer of the module's own class, whose parameters are those stacked tensors,
takes the N steps: the same elementwise arithmetic on tensors N times larger -- bit for bit the
per-worker steps for torch's SGD, Adam, AdamW, RMSprop, Adagrad, Adamax and Adadelta (tested
against per-worker optimizers). The vmapped gradient of the stacked path reads the stacked
parameters as they are, without stacking them again.

When not (then each worker's own optimizer steps, as before): another optimizer class (a
subclass included: its step may read anything); step hooks on an optimizer or on all
optimizers; param groups whose hyperparameters differ between the workers (learning-rate
schedules out of step); gradients that some workers have and others not; optimizer state that is
neither elementwise nor a scalar equal on every worker; a replica whose parameter no longer is a
view of its row (replaced by the module's own code). Which one applied is counted, not logged:
it changes the speed only.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

from syncbench.strategies.tensors import trainable

# torch's own optimizers, whose step is elementwise per parameter given its state (prefer_foreach_'s list)
GROUPABLE = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adagrad,
             torch.optim.Adamax, torch.optim.Adadelta)


class StackedReplicas:
    """N replicas of one module whose trainable parameters are rows of stacked tensors, and the
    optimizer that steps all N at once (``step``)."""

    def __init__(self, modules: Sequence[torch.nn.Module], optimizers: Sequence[torch.optim.Optimizer]):
        """``optimizers[i]``: replica i's torch optimizer (its state, if any, is adopted at the first step)."""
        self.n = len(modules)
        self.params = [trainable(m) for m in modules]
        with torch.no_grad():
            self.stacked = [torch.stack([ps[k].detach() for ps in self.params]) for k in range(len(self.params[0]))]
            for k, rows in enumerate(self.stacked):
                for i, ps in enumerate(self.params):
                    ps[k].data = rows[i]
        self.all_params = [p for ps in zip(*self.params) for p in ps]
        self.all_ptrs = [ptr for rows in self.stacked for ptr in _row_pointers(rows)]
        self.optimizers = list(optimizers)
        self.refusal = _static_refusal(self.params, self.optimizers)
        self.layout = _group_layout(self.params[0], self.optimizers[0]) if self.refusal is None else []
        self.grouped = copy.copy(self.optimizers[0])  # the class, its defaults; params and state our own
        self.grouped.param_groups = [dict(g, params=[self.stacked[k] for k in ks])
                                     for g, ks in zip(self.optimizers[0].param_groups, self.layout)]
        self.grouped.state = defaultdict(dict)
        self.rows: dict[tuple[int, str], torch.Tensor] = {}  # (param, state key) -> the workers' state as rows
        self.row_ptrs_of: dict[tuple[int, str], list[int]] = {}
        self.steps_grouped = 0
        self.steps_alone = 0

    def linked(self) -> bool:
        """Whether every replica's parameters still are views of their rows."""
        return [p.data_ptr() for p in self.all_params] == self.all_ptrs

    def stacked_params(self) -> list[torch.Tensor] | None:
        """The stacked parameters (for the vmapped gradient of all N workers), or None when a
        replica's parameter is no longer a view of its row."""
        return self.stacked if self.linked() else None

    def zero_grad(self, rank: int) -> None:
        """What ``zero_grad(set_to_none=True)`` does for replica ``rank``'s optimizer, whose
        parameters are the replica's trainable ones (``refusal`` is None), without its overhead."""
        for p in self.params[rank]:
            p.grad = None

    def step(self) -> bool:
        """Every worker's torch step, as one; False (nothing done) where it cannot be exact: then
        the caller steps each worker's optimizer."""
        if self.refusal is not None or _hooked(self.optimizers) or not self.linked():
            self.steps_alone += 1
            return False
        hyper = self._hyperparameters()
        grads = self._gradients()
        if hyper is None or grads is None or not self._gather_state(grads):
            self.steps_alone += 1
            return False
        for group, values in zip(self.grouped.param_groups, hyper):
            group.update(values)
        for rows, grad in zip(self.stacked, grads):
            rows.grad = grad
        self.grouped.step()
        for rows in self.stacked:
            rows.grad = None
        for opt in self.optimizers:  # what an LR scheduler's wrapper of opt.step records (else it warns)
            opt._opt_called = True  # type: ignore[attr-defined]
        self._scatter_state(grads)
        self.steps_grouped += 1
        return True

    # -- what must agree between the workers ---------------------------------------------------------------
    def _hyperparameters(self) -> list[dict[str, Any]] | None:
        first = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizers[0].param_groups]
        for opt in self.optimizers[1:]:
            if len(opt.param_groups) != len(first):
                return None
            for g, ref in zip(opt.param_groups, first):
                if len(g) != len(ref) + 1 or any(k not in g for k in ref):
                    return None
                values, expected = [g[k] for k in ref], list(ref.values())
                try:  # a list comparison: identity first, then ==, in C
                    same = values == expected
                except (RuntimeError, TypeError, ValueError):  # a multi-element tensor's ==: one by one
                    same = all(_same(a, b) for a, b in zip(values, expected))
                if not same:
                    return None
        return first

    def _gradients(self) -> list[torch.Tensor | None] | None:
        """Per stacked parameter: the workers' gradients as one tensor (the vmapped gradient
        itself when each worker's is still a view of its row), None where no worker has one;
        None overall when some have one and others not."""
        out: list[torch.Tensor | None] = []
        for ps in zip(*self.params):
            grads = [p.grad for p in ps]
            if all(g is None for g in grads):
                out.append(None)
                continue
            if any(g is None for g in grads):
                return None
            base = grads[0]._base  # type: ignore[union-attr]
            if base is not None and base.shape == (self.n, *grads[0].shape) and \
                    [g.data_ptr() for g in grads] == _row_pointers(base):  # type: ignore[union-attr]
                out.append(base)
            else:
                out.append(torch.stack(grads))  # type: ignore[arg-type]
        return out

    def _gather_state(self, grads: list[torch.Tensor | None]) -> bool:
        """The grouped optimizer's state := the workers' (rows already in place are reused)."""
        for k, ps in enumerate(zip(*self.params)):
            if grads[k] is None:
                continue
            states = [opt.state.get(p) or {} for opt, p in zip(self.optimizers, ps)]
            keys = states[0].keys()
            if any(s.keys() != keys for s in states[1:]):
                return False
            target = self.grouped.state[self.stacked[k]]
            target.clear()
            for key in keys:
                values = [s[key] for s in states]
                rows = self._rows(k, key, values, ps[0])
                if rows is None:
                    if isinstance(values[0], torch.Tensor) or any(not _same(v, values[0]) for v in values[1:]):
                        return False
                    target[key] = values[0]
                elif rows.dim() == 1 and ps[0].dim() != 0:  # a scalar (Adam's step count): equal on all
                    if not bool((rows == rows[0]).all()):
                        return False
                    target[key] = rows[0].clone()
                else:
                    target[key] = rows
        return True

    def _rows(self, k: int, key: str, values: list[Any], param: torch.Tensor) -> torch.Tensor | None:
        """The workers' state ``key`` of parameter ``k`` as one tensor whose rows they are views of
        (made so when they are not); None when it is not tensors that are elementwise or scalars."""
        known = self.rows.get((k, key))
        if known is not None:
            try:
                if [v.data_ptr() for v in values] == self.row_ptrs_of[(k, key)]:
                    return known
            except AttributeError:  # not tensors any more
                return None
        first = values[0]
        if not all(isinstance(v, torch.Tensor) and v.shape == first.shape for v in values):
            return None
        if first.shape != param.shape and first.dim() != 0:
            return None  # neither elementwise nor a scalar
        self._adopt(k, key, torch.stack(values), [opt.state[p] for opt, p in
                                                   zip(self.optimizers, (ps[k] for ps in self.params))])
        return self.rows[(k, key)]

    def _adopt(self, k: int, key: str, rows: torch.Tensor, states: list[dict[str, Any]]) -> None:
        self.rows[(k, key)] = rows
        self.row_ptrs_of[(k, key)] = _row_pointers(rows)
        for s, row in zip(states, rows):
            s[key] = row

    def _scatter_state(self, grads: list[torch.Tensor | None]) -> None:
        """The workers' state := the grouped optimizer's (its rows, its scalars)."""
        for k, ps in enumerate(zip(*self.params)):
            if grads[k] is None:
                continue
            for key, value in self.grouped.state[self.stacked[k]].items():
                rows = self.rows.get((k, key))
                if rows is value:
                    continue
                states = [opt.state[p] for opt, p in zip(self.optimizers, ps)]
                if not isinstance(value, torch.Tensor):
                    for s in states:
                        s[key] = value
                elif value.shape == (self.n, *ps[0].shape):  # elementwise, born in this step: its rows
                    self._adopt(k, key, value, states)
                elif rows is not None and rows.shape[1:] == value.shape:  # a scalar
                    rows.copy_(value.expand_as(rows))
                else:  # a scalar born in this step
                    self._adopt(k, key, torch.stack([value] * self.n), states)


def _row_pointers(rows: torch.Tensor) -> list[int]:
    base, stride = rows.data_ptr(), rows.stride(0) * rows.element_size()
    return [base + i * stride for i in range(rows.shape[0])]


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and \
            bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - a value that cannot say whether it is equal: not the same
        return False


def _hooked(optimizers: Sequence[torch.optim.Optimizer]) -> bool:
    return bool(_global_optimizer_pre_hooks or _global_optimizer_post_hooks) or any(
        opt._optimizer_step_pre_hooks or opt._optimizer_step_post_hooks for opt in optimizers)


def _group_layout(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> list[list[int]]:
    index = {id(p): k for k, p in enumerate(params)}
    return [[index[id(p)] for p in g["params"]] for g in optimizer.param_groups]


def _static_refusal(params: list[list[torch.nn.Parameter]], optimizers: list[torch.optim.Optimizer]) -> str | None:
    """Why these optimizers cannot step as one, whatever happens later; None if they can."""
    if any(type(opt) not in GROUPABLE for opt in optimizers):
        return f"{type(optimizers[0]).__name__} is not one of torch's elementwise optimizers"
    layouts = []
    for ps, opt in zip(params, optimizers):
        index = {id(p): k for k, p in enumerate(ps)}
        if any(id(p) not in index for g in opt.param_groups for p in g["params"]):
            return "the optimizer holds tensors that are not the module's trainable parameters"
        layouts.append([[index[id(p)] for p in g["params"]] for g in opt.param_groups])
    if any(layout != layouts[0] for layout in layouts[1:]):
        return "the workers' optimizers group the parameters differently"
    if any(len(set(k for g in layout for k in g)) != sum(len(g) for g in layout) for layout in layouts[:1]):
        return "a parameter is in two param groups"
    return None

"""The repair ladder's snapshots: copies of the model and optimizer state in host memory, and what a rollback may
put back.

A Guard owns one optimizer. When other optimizers train other parameters of the same model (a body with SGD and a
head with Adam, one Guard each), a rollback that rewound their weights would leave those optimizers' moments and
step counters at a later step than their weights: a state the run was never in. So a snapshot holds only what its
optimizer owns (see ``owned_model_state``), and a rollback restores only that; with one optimizer training every
parameter (the common case) it is the whole ``model.state_dict()``, as before.

Room: the repairer. It may touch: no other module.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class Snapshot:
    step: int
    model: dict[str, Any]
    optimizer: dict[str, Any]
    lr_mult: float
    partial: bool = False  # ``model`` holds only the entries this Guard's optimizer owns (see owned_model_state)


def to_host(obj: Any, reuse: Any = None, memo: dict[tuple[Any, ...], torch.Tensor] | None = None) -> Any:
    """A deep copy with every tensor in host memory.

    A tensor on an accelerator goes into page-locked (pinned) memory with an asynchronous copy, ordered on the
    stream before any later update of it: the host does not wait, and the copy engine runs several times faster
    than into pageable memory (on an H200 a 124 M-parameter AdamW snapshot took 0.44 s pageable, one blocking copy
    per tensor, which made repair="auto" cost 1.1x per step). The pinned buffers of the previous snapshot are
    reused (``reuse``): pinning is slow, and the old snapshot is replaced anyway. Read the copies on the host only
    after a sync (``Ladder.rollback`` does one). DTensors and CPU tensors are copied as before.

    Tensors that are views of the same memory (tied weights: a language model's input embedding and output layer
    appear twice in ``state_dict()``) are copied once (``memo``), so the snapshot keeps them tied and costs no more
    than the model: 49 MiB saved on the 4 x 256 GPT-2 of BENCHMARKS.md, whose vocabulary matrix is tied.
    """
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        key = None
        if type(t) is torch.Tensor and t.layout == torch.strided:
            key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            if key in memo:
                return memo[key]
        if t.device.type == "cpu" or type(t) is not torch.Tensor:  # CPU, or a DTensor (its own .to keeps shards)
            out = t.to("cpu", copy=True)
        else:
            same = (isinstance(reuse, torch.Tensor) and reuse.shape == t.shape and reuse.dtype == t.dtype
                    and reuse.is_pinned())
            out = reuse if same else torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            out.copy_(t, non_blocking=True)
        if key is not None:
            memo[key] = out
        return out
    if isinstance(obj, dict):
        old = reuse if isinstance(reuse, dict) else {}
        return {k: to_host(v, old.get(k), memo) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        old_seq = reuse if isinstance(reuse, type(obj)) and len(reuse) == len(obj) else [None] * len(obj)
        return type(obj)(to_host(v, r, memo) for v, r in zip(obj, old_seq))
    return copy.deepcopy(obj)


def foreign_keys(model: nn.Module, optimizer: torch.optim.Optimizer) -> set[str]:
    """The ``model.state_dict()`` keys a rollback of this optimizer must leave alone: the parameters another
    optimizer trains (trainable, and not in this one's groups), and the buffers and extra state of the modules that
    hold them (a BatchNorm's running statistics follow its weights). Empty when this optimizer trains every
    trainable parameter. Frozen parameters (no optimizer changes them) and the buffers of modules without foreign
    parameters stay in the snapshot."""
    owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
    out: set[str] = set()
    for prefix, module in model.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        foreign = [n for n, p in module._parameters.items()
                   if p is not None and p.requires_grad and id(p) not in owned]
        if foreign:
            out.update(dot + n for n in foreign)
            out.update(dot + n for n in module._buffers)
            out.add(dot + "_extra_state")
    return out


def owned_model_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], bool]:
    """``model.state_dict()`` without the entries another optimizer owns (``foreign_keys``); and whether any was
    left out. Computed at each snapshot (rare: every ``snapshot_every`` quiet steps), never per step."""
    state = model.state_dict()
    foreign = foreign_keys(model, optimizer)
    if not foreign:
        return state, False
    return {k: v for k, v in state.items() if k not in foreign}, True


def restore_model(model: nn.Module, snap: Snapshot) -> None:
    """Put the snapshot's model entries back; a partial snapshot leaves the other optimizers' entries alone."""
    model.load_state_dict(snap.model, strict=not snap.partial)


def holds_nonfinite(model: nn.Module, snap: Snapshot) -> bool:
    """Whether a parameter in the snapshot holds NaN/Inf: such a state is never a rollback target (a weight
    corrupted before the snapshot, while the loss could not see it). Parameters only: a buffer may hold -inf on
    purpose (an attention mask). Reads host memory (call it after the sync that completes the snapshot's copies);
    on the rare rollback path only."""
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    for name, value in snap.model.items():
        if name in names and isinstance(value, torch.Tensor):
            t = value.detach()
            t = getattr(t, "_local_tensor", t) if type(t) is not torch.Tensor else t  # a DTensor: its shard
            if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
                return True
    return False

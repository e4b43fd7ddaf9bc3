"""Several processes (torch.distributed): which parameters are shards, and the one small all-reduce per step.

Under DDP every rank holds the same averaged gradients after ``backward()``: per-layer norms measured locally are
already the global ones, and only the loss (each rank saw its own batch) needs averaging. Under FSDP2
(``fully_shard``) a parameter is a DTensor whose local part is a shard: each rank measures the squared norms of its
shards, and one all-reduce of a vector of ``num_layers + 2`` floats per step sums them (with the loss riding along).
Replicated parameters beside shards are counted on rank 0 only, so nothing is counted twice.

Everything here runs on the device (the all-reduce is enqueued on the stream like any kernel): no host read.

Room: the step recorder. It may touch: no other module.
"""

from __future__ import annotations

import functools
from typing import Any, cast

import torch
from torch import nn


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group; ``(0, 1)`` when torch.distributed is not in use."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@functools.cache  # looked up once: local() runs for every tensor of every step
def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


def local(t: Any) -> Any:
    """The part of ``t`` this rank holds (a DTensor's local shard, which aliases its storage); ``t`` otherwise."""
    dt = _dtensor_type()
    if dt is not None and isinstance(t, dt):
        # The shard itself (to_local() would go through autograd): in-place ops (clipping) reach the parameter.
        return cast(Any, t)._local_tensor
    return t


def is_sharded(p: torch.Tensor) -> bool:
    """Whether ``p`` is a DTensor split across ranks (FSDP2, tensor parallel): its local part is not all of it."""
    dt = _dtensor_type()
    if dt is None or not isinstance(p, dt):
        return False
    return any(pl.is_shard() or pl.is_partial() for pl in cast(Any, p).placements)


def has_collective_forward(model: nn.Module) -> bool:
    """Whether a forward of ``model`` talks to other ranks (SyncBatchNorm, FSDP2's all-gathers): a replay on one
    rank alone would then wait forever for the others."""
    if any(isinstance(m, nn.SyncBatchNorm) for m in model.modules()):
        return True
    return any(is_sharded(p) for p in model.parameters())


def all_reduce_sum(vec: torch.Tensor) -> torch.Tensor:
    """Sum ``vec`` over ranks in place (asynchronous on an accelerator: enqueued, not waited for on the host)."""
    import torch.distributed as dist

    dist.all_reduce(vec, op=dist.ReduceOp.SUM)
    return vec

"""Per-layer L2 norms of a list of tensors in one fused pass per (device, dtype), folded on the device.

Nothing here reads a value back from an accelerator: every function returns device tensors, except
``LayerNorms.host_with_total``, which is only used when the statistics live on the CPU (reading them is a memory
load there, not a sync) and folds the per-tensor norms in Python: a torch operator on a few numbers costs 2-7 us
of dispatch, and a tiny model pays that on every step.

Room: the step recorder. It may touch: ``stats``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import compress, repeat
from operator import is_not
from typing import cast

import torch

from .distributed import is_sharded, local
from .layers import LayerMap

#: Value written for a layer that had no gradient at a step (frozen this step, unused branch). Norms are >= 0,
#: and NaN/Inf are taken, so -1 cannot be confused with a measurement.
ABSENT = -1.0

_item = torch.Tensor.item


class LayerNorms:
    """Fold per-tensor norms into per-layer norms: ``layer_norm[l] = sqrt(sum_{p in l} ||p||^2)``.

    The index tensors depend only on which tracked parameters are present (have a gradient), a host-side fact, so
    they are built once per distinct pattern and cached; a steady loop builds them once.
    """

    def __init__(self, layers: LayerMap, device: torch.device, rank: int | None = None) -> None:
        """``rank`` set: distributed with shards. Then calls return this rank's share of the squared norms (sum
        them over ranks): shards count on every rank, replicated parameters on rank 0 only."""
        self.layers = layers
        self.device = device
        self.groups = layers.groups()
        self.rank = rank
        self.own = [rank is None or rank == 0 or is_sharded(p) for p in layers.params]
        # No DTensor among the parameters (checked once): their gradients and copies are plain tensors, and the
        # per-step path can hand them to the fused kernel without two Python calls per tensor (local, _dense).
        self._plain = all(local(p) is p for p in layers.params)
        self._cache: dict[tuple[int, ...], _Plan] = {}

    def _plan(self, present: tuple[int, ...]) -> _Plan:
        plan = self._cache.get(present)
        if plan is None:
            keep = set(present)
            per_group = []
            host_groups = []
            for g in self.groups:
                pos = [i for i in g.positions if i in keep and self.own[i]]
                if pos:
                    layer_of = [self.layers.layer_of[i] for i in pos]
                    per_group.append((pos, self._to_device(torch.tensor(layer_of))))
                    host_groups.append((pos, layer_of))
            seen = {self.layers.layer_of[i] for i in present}
            absent = [li not in seen for li in range(self.layers.num_layers)]
            mask = self._to_device(torch.tensor(absent)) if any(absent) else None
            plan = _Plan(per_group, mask, host_groups, [li for li, a in enumerate(absent) if a])
            if len(self._cache) > 64:  # a loop that changes its pattern every step must not grow memory
                self._cache.clear()
            self._cache[present] = plan
        return plan

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """Host-built index tensor to the statistics device without blocking: a copy from pageable memory would
        wait for the device, so stage it in pinned memory first."""
        if self.device.type == "cpu":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    def __call__(self, tensors: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """Per-layer L2 norms (fp32, on ``self.device``) of ``tensors``, aligned with ``layers.params``.

        Args:
            tensors: one tensor (or None when absent) per tracked parameter, e.g. the gradients.

        Returns:
            A float32 vector of length ``num_layers``; ``ABSENT`` for layers where every tensor is None.
        """
        sq, absent_mask = self.squares(tensors)
        return finish(sq, absent_mask)

    def squares(self, tensors: Sequence[torch.Tensor | None],
                wide: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-layer sums of squares (this rank's share when distributed with shards) and the absent-layer mask.

        Args:
            tensors: as for ``__call__``; DTensors are read through their local shard.
            wide: accumulate in float64 (squares returned in float64). A finite float32 entry above ~1.8e19 has a
                square beyond float32: only this keeps such finite gradients finite. Slow on the CPU (about 10x
                the float32 pass), so there only a re-measurement of a step that read non-finite uses it; on
                CUDA every step does (``StepRecorder.wide_norms``: the fused kernel stays memory-bound).

        Returns:
            ``(squares, absent_mask)``: a float32 vector of length ``num_layers``, and a bool vector (or None when
            every layer is present). ``finish`` turns them into norms.
        """
        plan = self._plan(_present(tensors))
        out = torch.float64 if wide else torch.float32
        sq = torch.zeros(self.layers.num_layers, dtype=out, device=self.device)
        for pos, idx in plan.groups:
            stacked = torch.stack(self._foreach_norms(tensors, pos, wide))
            if stacked.device != self.device or stacked.dtype != out:  # host metadata: no sync
                stacked = stacked.to(self.device, out, non_blocking=True)
            sq.index_add_(0, idx, stacked.square_())  # in place: the stack is ours
        return sq, plan.mask

    def _foreach_norms(self, tensors: Sequence[torch.Tensor | None], pos: list[int],
                       wide: bool) -> tuple[torch.Tensor, ...]:
        """The norms of the tensors at ``pos`` (one device and dtype): one fused kernel."""
        # positions in the plan are present ones: never None
        group = (cast(list[torch.Tensor], list(map(tensors.__getitem__, pos))) if self._plain
                 else [_dense(local(tensors[i])) for i in pos])
        # At least fp32 accumulation, so bf16/fp16 gradients neither overflow nor lose the small ones (float64
        # stays float64).
        acc = torch.float64 if wide else _ACC.get(group[0].dtype) or torch.promote_types(group[0].dtype,
                                                                                           torch.float32)
        try:
            norms = torch._foreach_norm(group, 2, dtype=acc)
        except (NotImplementedError, RuntimeError):
            # A sparse gradient (nn.Embedding(sparse=True)): the kernel has no sparse version; rare, so found by
            # its error rather than checked on every tensor of every step.
            norms = torch._foreach_norm([_dense(t) for t in group], 2, dtype=acc)
        return norms

    def host_with_total(self, tensors: Sequence[torch.Tensor | None]) -> tuple[list[float], float]:
        """``with_total`` for statistics on the CPU, folded in Python: the fused norm per (dtype) group is the only
        torch call (a NumPy call on a few numbers costs 1-3 us here, a torch operator 2-7 us, a float add 30 ns).

        Args:
            tensors: as for ``__call__``; CPU tensors only (the caller checks: ``self.device`` is the CPU).

        Returns:
            ``(layer_norms, total)``: per-layer norms as floats (``ABSENT`` for absent layers) and the global norm.
            Squares are summed in double precision, so per-tensor norms up to float32's maximum give a finite
            total.
        """
        plan = self._plan(_present(tensors))
        sq = [0.0] * self.layers.num_layers
        for pos, idx in plan.host_groups:
            norms = self._foreach_norms(tensors, pos, wide=False)
            # CPU tensors: reading them is a memory load, not a sync. One stack beats many reads past ~16.
            values = list(map(_item, norms)) if len(norms) <= 16 else torch.stack(norms).tolist()
            for layer, v in zip(idx, values):
                sq[layer] += v * v
        out = list(map(math.sqrt, sq))
        for layer in plan.host_absent:
            out[layer] = ABSENT
        return out, math.sqrt(sum(sq))

    def host_pair(self, first: Sequence[torch.Tensor], second: Sequence[torch.Tensor]) -> tuple[list[float],
                                                                                                 list[float]]:
        """Per-layer norms of two lists of CPU tensors, each aligned with ``layers.params`` and none absent (a
        sample step's update and weights after it), from one fused norm per (dtype) group: a torch operator and a
        plan lookup fewer than two ``host_with_total`` calls.

        Returns:
            The per-layer norms of ``first`` and of ``second``, as floats.
        """
        n, L = len(first), self.layers.num_layers
        plan = self._plan(tuple(range(n)))
        sq = [0.0] * (2 * L)  # first's layers, then second's
        both = [*first, *second]
        for pos, idx in plan.host_groups:
            norms = self._foreach_norms(both, pos + [i + n for i in pos], wide=False)
            values = torch.stack(norms).tolist()  # CPU tensors: a memory read, as in host_with_total
            for layer, v, w in zip(idx, values, values[len(pos):]):
                sq[layer] += v * v
                sq[L + layer] += w * w
        out = list(map(math.sqrt, sq))
        return out[:L], out[L:]

    def with_total(self, tensors: Sequence[torch.Tensor | None],
                   wide: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-layer norms and the global norm of ``tensors`` (what ``clip_grad_norm_`` measures), from one pass.

        Args:
            tensors: as for ``__call__``. wide: accumulate in float64 (see ``squares``); results are float32.

        Returns:
            ``(layer_norms, total)``: the total from the summed squares directly (two kernels fewer per step
            than ``total_norm(layer_norms)``, which squares the roots again).
        """
        sq, absent_mask = self.squares(tensors, wide)
        norms, total = finish(sq, absent_mask), sq.sum().sqrt()
        return (norms.float(), total.float()) if wide else (norms, total)


class _Plan:
    """How to fold one pattern of present tensors: per (device, dtype) group, the positions and the layer of each
    (a device index tensor, and a list for the host fold); the absent layers as a device mask (None: none absent)
    and as a list."""

    __slots__ = ("groups", "mask", "host_groups", "host_absent")

    def __init__(self, groups: list[tuple[list[int], torch.Tensor]], mask: torch.Tensor | None,
                 host_groups: list[tuple[list[int], list[int]]], host_absent: list[int]) -> None:
        self.groups, self.mask, self.host_groups, self.host_absent = groups, mask, host_groups, host_absent


# Accumulation dtype per gradient dtype, looked up instead of calling torch.promote_types (an operator call)
# every step: at least fp32.
_ACC = {torch.float16: torch.float32, torch.bfloat16: torch.float32, torch.float32: torch.float32,
        torch.float64: torch.float64}


def finish(sq: torch.Tensor, absent_mask: torch.Tensor | None) -> torch.Tensor:
    """Norms from summed squares, ``ABSENT`` where the mask says a layer had no tensor."""
    out = sq.sqrt()
    if absent_mask is not None:
        out = torch.where(absent_mask, torch.full_like(out, ABSENT), out)
    return out


def _present(tensors: Sequence[torch.Tensor | None]) -> tuple[int, ...]:
    """Positions of the tensors that are not None, through C iterators (this runs at every step)."""
    return tuple(compress(range(len(tensors)), map(is_not, tensors, repeat(None))))


def _dense(t: torch.Tensor) -> torch.Tensor:
    """A sparse gradient (nn.Embedding(sparse=True)) has the norm of its coalesced values."""
    return t.coalesce().values() if t.is_sparse else t


def total_norm(layer_norms: torch.Tensor) -> torch.Tensor:
    """Global L2 norm from per-layer norms (absent layers count as zero), as ``clip_grad_norm_`` computes it."""
    return layer_norms.clamp_min(0.0).square().sum().sqrt()

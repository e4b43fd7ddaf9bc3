"""Gradient clipping strategies that reuse the norms the Guard measured (no second norm pass) and never branch on a
device value: a clipping coefficient is clamped, not tested, so nothing waits for the device.

Each strategy is a small object with ``clip_(...)`` (used by ``Guard(clip=...)``, given the measured norms) and
``step(parameters)`` (standalone: measures, then clips). Stateful ones (ZClip, AutoClip) keep their state as
device tensors and have ``state_dict``/``load_state_dict``.

Room: the repairer. It may touch: no other module.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

Grads = Sequence[torch.Tensor]


def _present(params: Iterable[nn.Parameter]) -> tuple[list[nn.Parameter], list[torch.Tensor]]:
    ps = [p for p in params if p.grad is not None]
    return ps, [p.grad for p in ps]  # type: ignore[misc]


def _total(grads: Grads) -> torch.Tensor:
    """Global L2 norm with fp32 (or wider) accumulation, one fused pass per dtype."""
    if not grads:
        return torch.zeros(())
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    dev = grads[0].device
    norms = [torch.stack(torch._foreach_norm(gs, 2, dtype=torch.promote_types(dt, torch.float32))).float().to(dev)
             for dt, gs in by_dtype.items()]
    return torch.linalg.vector_norm(torch.cat(norms))


def _host(t: torch.Tensor | None) -> Any:
    return None if t is None else t.detach().cpu().tolist()  # checkpoint-time host read


def _plain(v: Any) -> Any:
    """A state value as plain Python (floats kept by the host path are already plain)."""
    return _host(v) if isinstance(v, torch.Tensor) else (list(v) if isinstance(v, list) else v)


def _as_tensor(v: Any) -> torch.Tensor | None:
    """A state value as a float32 tensor (on the CPU when it was kept as floats)."""
    return v if isinstance(v, torch.Tensor) or v is None else torch.tensor(v, dtype=torch.float32)


def _tensor(v: Any) -> torch.Tensor | None:
    return None if v is None else torch.tensor(v, dtype=torch.float32)  # moved to the norms' device on use


def _scale_(grads: Grads, coef: torch.Tensor) -> None:
    if grads:
        torch._foreach_mul_(list(grads), coef.to(grads[0].device))


class ClipMethod:
    """A clipping strategy.

    ``clip_`` receives the gradients that exist this step (in the Guard's parameter order), their parameters, the
    index of each one's layer, the per-layer norms and the total norm (device tensors), and returns the total norm
    after clipping (a device tensor; equal to ``total`` when nothing was clipped).
    """

    name = "clip"

    def clip_(self, params: Sequence[nn.Parameter], grads: Grads, layer_index: torch.Tensor,
              layer_norms: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def step(self, parameters: Iterable[nn.Parameter]) -> torch.Tensor:
        """Standalone use: measure the gradients of ``parameters`` and clip them in place.

        Returns:
            The total gradient norm before clipping (a device tensor).
        """
        ps, grads = _present(parameters)
        total = _total(grads)
        dev = total.device
        norms = torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]) if grads else torch.zeros(0)
        self.clip_(ps, grads, torch.arange(len(grads), device=dev), norms.to(dev), total)
        return total

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class ScalarClip(ClipMethod):
    """A strategy whose whole effect is one coefficient on all gradients: ``coefficient`` computes it (and moves
    the strategy's state on), ``clip_`` applies it with one fused multiply. With a fused optimizer the Guard hands
    the coefficient to the kernel instead (``grad_scale``), so the gradients are not read a second time."""

    def coefficient(self, total: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def host_coefficient(self, total: float) -> float | None:
        """The coefficient from a total already on the host (statistics on the CPU), or None where the strategy
        keeps device state and must go through ``coefficient``."""
        return None

    def clip_(self, params: Sequence[nn.Parameter], grads: Grads, layer_index: torch.Tensor,
              layer_norms: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
        coef = self.coefficient(total)
        _scale_(grads, coef)
        return total * coef


class GlobalNorm(ScalarClip):
    """Scale all gradients so their global L2 norm is at most ``max_norm``: the same numbers as
    ``torch.nn.utils.clip_grad_norm_`` (coefficient ``max_norm / (norm + 1e-6)``, clamped at 1).

    References:
        Pascanu, Mikolov & Bengio, "On the difficulty of training recurrent neural networks", ICML 2013.
    """

    name = "global_norm"

    def __init__(self, max_norm: float) -> None:
        if not max_norm > 0:
            raise ValueError(f"max_norm must be > 0, got {max_norm}")
        self.max_norm = float(max_norm)

    def coefficient(self, total: torch.Tensor) -> torch.Tensor:
        return (self.max_norm / (total + 1e-6)).clamp(max=1.0)  # clamped, not branched on: no host sync

    def host_coefficient(self, total: float) -> float | None:
        # NaN stays NaN (as clamp leaves it): the NaN step is then skipped or reported, never scaled to finite.
        coef = self.max_norm / (total + 1e-6)
        return coef if coef < 1.0 or math.isnan(coef) else 1.0


class ValueClip(ClipMethod):
    """Clamp every gradient element to ``[-value, value]``: the same as ``torch.nn.utils.clip_grad_value_``."""

    name = "value"

    def __init__(self, value: float) -> None:
        if not value > 0:
            raise ValueError(f"value must be > 0, got {value}")
        self.value = float(value)

    def clip_(self, params: Sequence[nn.Parameter], grads: Grads, layer_index: torch.Tensor,
              layer_norms: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
        if grads:
            torch._foreach_clamp_min_(list(grads), -self.value)
            torch._foreach_clamp_max_(list(grads), self.value)
        return _total(grads)


class LayerNorm(ClipMethod):
    """Scale each layer's gradients so that layer's L2 norm is at most ``max_norm`` (layers clipped
    independently; the direction within a layer is kept)."""

    name = "layer_norm"

    def __init__(self, max_norm: float) -> None:
        if not max_norm > 0:
            raise ValueError(f"max_norm must be > 0, got {max_norm}")
        self.max_norm = float(max_norm)

    def clip_(self, params: Sequence[nn.Parameter], grads: Grads, layer_index: torch.Tensor,
              layer_norms: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
        present = layer_norms >= 0  # absent layers are marked -1
        coef = torch.where(present, (self.max_norm / (layer_norms.clamp_min(0) + 1e-6)).clamp(max=1.0),
                           torch.ones_like(layer_norms))
        if grads:
            per_param = coef.index_select(0, layer_index).to(grads[0].device)
            torch._foreach_mul_(list(grads), list(per_param.unbind()))
        return (layer_norms.clamp_min(0) * coef).square().sum().sqrt()


def unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    """Norm per output unit: over all dimensions but the first for weights (rows of a Linear, filters of a Conv),
    over the whole tensor for vectors and scalars (biases, gains)."""
    x = x.float()
    if x.dim() <= 1:
        return torch.linalg.vector_norm(x)
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.dim())), keepdim=True)


class AGC(ClipMethod):
    """Adaptive gradient clipping, unit-wise: each unit's gradient norm is kept below ``clipping`` times that
    unit's weight norm (at least ``eps``).

    ``g_i <- g_i * (clipping * max(||w_i||, eps)) / ||g_i||`` when ``||g_i|| > clipping * max(||w_i||, eps)``.

    Args:
        clipping: the ratio lambda (0.01 in the paper for batch 4096; larger for smaller batches).
        eps: the floor on weight norms, so zero-initialised weights can still move.
        exclude: parameters left unclipped (the paper leaves the final classifier layer alone).

    References:
        Brock, De, Smith & Simonyan, "High-Performance Large-Scale Image Recognition Without Normalization",
        ICML 2021.
    """

    name = "agc"

    def __init__(self, clipping: float = 0.01, eps: float = 1e-3, exclude: Iterable[nn.Parameter] = ()) -> None:
        if not clipping > 0:
            raise ValueError(f"clipping must be > 0, got {clipping}")
        self.clipping, self.eps = float(clipping), float(eps)
        self.exclude = {id(p) for p in exclude}

    def clip_(self, params: Sequence[nn.Parameter], grads: Grads, layer_index: torch.Tensor,
              layer_norms: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
        for p, g in zip(params, grads):
            if id(p) in self.exclude:
                continue
            max_norm = self.clipping * unitwise_norm(p.detach()).clamp_min(self.eps)
            g_norm = unitwise_norm(g)
            factor = torch.where(g_norm > max_norm, max_norm / g_norm.clamp_min(1e-6), torch.ones_like(g_norm))
            g.mul_(factor.to(g.dtype))
        return _total(grads)

"""Gradient clipping strategies that reuse the norms the Guard measured (no second norm pass) and never branch on a
device value: a clipping coefficient is clamped, not tested, so nothing waits for the device.

Each strategy is a small object with ``clip_(...)`` (used by ``Guard(clip=...)``, given the measured norms) and
``step(parameters)`` (standalone: measures, then clips). Stateful ones (ZClip, AutoClip) keep their state as
device tensors and have ``state_dict``/``load_state_dict``.
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


class ZClip(ScalarClip):
    """Z-score adaptive clipping. For ``warmup_steps`` steps the norm is only recorded (and clipped at
    ``max_grad_norm`` if given); then mean and variance start from those norms and follow an EMA. A norm whose
    z-score exceeds ``z_thresh`` is clipped to ``mean + z_thresh * std / (z / z_thresh)`` (times ``clip_factor``):
    the larger the outlier, the harder it is cut. The EMA is fed the clipped value. Non-finite norms are left out
    of the statistics (a deliberate difference from the reference code, where one NaN would poison them).

    Args:
        alpha: EMA smoothing factor. z_thresh: z-score that triggers clipping. max_grad_norm: optional fixed cap on
        top. warmup_steps: steps before clipping starts. clip_factor: multiplier of the adaptive threshold.

    References:
        Kumar, Owen, Chowdhury & Güra, "ZClip: Adaptive Spike Mitigation for LLM Pre-Training", 2025.
    """

    name = "zclip"

    def __init__(self, alpha: float = 0.97, z_thresh: float = 2.5, max_grad_norm: float | None = None,
                 warmup_steps: int = 25, clip_factor: float = 1.0, eps: float = 1e-6) -> None:
        if not 0 < alpha < 1 or warmup_steps < 1:
            raise ValueError("alpha must be in (0, 1) and warmup_steps >= 1")
        self.alpha, self.z_thresh, self.max_grad_norm = float(alpha), float(z_thresh), max_grad_norm
        self.warmup_steps, self.clip_factor, self.eps = int(warmup_steps), float(clip_factor), float(eps)
        self.calls = 0  # host-side count: the warm-up branch depends on it, never on a device value
        self.buffer: torch.Tensor | None = None
        self.mean: torch.Tensor | None = None
        self.var: torch.Tensor | None = None

    def coefficient(self, total: torch.Tensor) -> torch.Tensor:
        g = total.float()
        if self.buffer is None:
            self.buffer = torch.zeros(self.warmup_steps, device=g.device)
        elif self.buffer.device != g.device:  # restored from a state dict
            self.buffer = self.buffer.to(g.device)
            self.mean = self.mean.to(g.device) if self.mean is not None else None
            self.var = self.var.to(g.device) if self.var is not None else None
        cap = torch.full_like(g, self.max_grad_norm) if self.max_grad_norm is not None else None
        if self.calls < self.warmup_steps:
            self.buffer[self.calls] = torch.where(torch.isfinite(g), g, torch.full_like(g, float("nan")))
            self.calls += 1
            if self.calls == self.warmup_steps:  # start the EMA from the finite warm-up norms (population var.)
                self.mean = self.buffer.nanmean()
                self.var = (self.buffer - self.mean).square().nanmean()
            effective = cap if cap is not None else g
        else:
            assert self.mean is not None and self.var is not None
            self.calls += 1
            std = self.var.sqrt()
            z = (g - self.mean) / (std + self.eps)
            adaptive = (self.mean + self.z_thresh * std / (z / self.z_thresh)) * self.clip_factor
            clip_val = torch.where(z > self.z_thresh, adaptive, g)
            effective = torch.minimum(clip_val, cap) if cap is not None else clip_val
            ok = torch.isfinite(clip_val)
            fresh = ~torch.isfinite(self.mean)  # a warm-up without one finite norm: start from this one
            new_mean = torch.where(fresh, clip_val, self.alpha * self.mean + (1 - self.alpha) * clip_val)
            new_var = torch.where(fresh, torch.zeros_like(clip_val),
                                  self.alpha * self.var + (1 - self.alpha) * (clip_val - new_mean).square())
            self.mean = torch.where(ok, new_mean, self.mean)
            self.var = torch.where(ok, new_var, self.var)
        return torch.where(g > effective, effective / (g + 1e-6), torch.ones_like(g))

    def threshold(self) -> torch.Tensor | None:
        """The adaptive cap a norm at ``z = z_thresh`` would get: ``mean + z_thresh * std`` (None in warm-up)."""
        if self.mean is None or self.var is None:
            return None
        return self.mean + self.z_thresh * self.var.sqrt()

    def state_dict(self) -> dict[str, Any]:
        """Plain values (a host read: at checkpoint time, not per step)."""
        return {"calls": self.calls, "buffer": _host(self.buffer), "mean": _host(self.mean), "var": _host(self.var)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls = int(state["calls"])
        self.buffer, self.mean, self.var = (_tensor(state["buffer"]), _tensor(state["mean"]), _tensor(state["var"]))


class AutoClip(ScalarClip):
    """Clip to the ``percentile``-th percentile of every gradient norm seen so far (the current one included),
    kept on the device in a ring of the last ``history`` norms.

    The percentile is linear interpolation between order statistics (``numpy.percentile``'s default), found by
    selection (``torch.kthvalue``, linear time) instead of a sort of the whole ring every step: 0.03 ms instead of
    0.65 ms for a full ring of 10,000 on one CPU thread. A non-finite norm enters the ring as +inf, a norm larger
    than every other, so the index of the percentile is known on the host and nothing is read from the device.

    References:
        Seetharaman, Wichern, Pardo & Le Roux, "AutoClip: Adaptive Gradient Clipping for Source Separation
        Networks", IEEE MLSP 2020.
    """

    name = "autoclip"

    def __init__(self, percentile: float = 10.0, history: int = 10_000) -> None:
        if not 0 < percentile <= 100 or history < 1:
            raise ValueError("percentile must be in (0, 100] and history >= 1")
        self.percentile, self.history = float(percentile), int(history)
        self.norms: torch.Tensor | None = None
        self.count = 0  # host-side: how many slots are filled (no device read needed to slice)

    def coefficient(self, total: torch.Tensor) -> torch.Tensor:
        g = total.float()
        if self.norms is None:
            self.norms = torch.full((self.history,), float("inf"), device=g.device)
        elif self.norms.device != g.device:  # restored from a state dict
            self.norms = self.norms.to(g.device)
        self.norms[self.count % self.history] = torch.where(torch.isfinite(g), g, torch.full_like(g, float("inf")))
        self.count += 1
        n = min(self.count, self.history)
        filled = self.norms[:n]
        pos = self.percentile / 100.0 * (n - 1)  # host arithmetic: the rank of the percentile
        lo = int(math.floor(pos))
        threshold = torch.kthvalue(filled, lo + 1).values
        if pos > lo:
            above = torch.kthvalue(filled, lo + 2).values
            # where both neighbours are +inf the difference is NaN: keep the lower one (+inf: no clipping)
            threshold = torch.where(above > threshold, threshold + (above - threshold) * (pos - lo), threshold)
        return (threshold / (g + 1e-6)).clamp(max=1.0)

    def state_dict(self) -> dict[str, Any]:
        """Plain values (a host read: at checkpoint time, not per step)."""
        return {"norms": _host(self.norms), "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        norms = _tensor(state["norms"])
        # older checkpoints stored non-finite norms and empty slots as NaN; the ring now holds +inf there
        self.norms = None if norms is None else torch.where(torch.isnan(norms), torch.full_like(norms, float("inf")),
                                                            norms)
        self.count = int(state["count"])


def make_clip(spec: float | str | ClipMethod | None) -> ClipMethod | None:
    """``Guard(clip=...)``: a max norm (global-norm clipping), "zclip", "autoclip", "agc", or a ClipMethod."""
    if spec is None or isinstance(spec, ClipMethod):
        return spec
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return GlobalNorm(float(spec))
    named = {"zclip": ZClip, "autoclip": AutoClip, "agc": AGC}
    if isinstance(spec, str) and spec in named:
        return named[spec]()
    raise ValueError(f"clip must be a max norm (float), 'zclip', 'autoclip', 'agc' or a gradguard.repair.ClipMethod, "
                     f"got {spec!r}")

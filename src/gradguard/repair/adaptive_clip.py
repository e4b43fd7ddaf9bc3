"""The adaptive clipping strategies, whose cap follows the run (ZClip, AutoClip), and ``make_clip``, which turns a
``Guard(clip=...)`` value into a strategy. Stateful: their state is kept as device tensors (or Python floats while
the statistics live on the CPU) and saved with ``state_dict``.

Room: the repairer. It may touch: ``repair``.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch

from .clip import AGC, ClipMethod, GlobalNorm, ScalarClip, _as_tensor, _host, _plain, _tensor


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
        # The state: device tensors, or Python floats while the Guard's statistics live on the CPU
        # (``host_coefficient``); each path converts what the other left, once, when it takes over.
        self._buffer: torch.Tensor | list[float] | None = None
        self._mean: torch.Tensor | float | None = None
        self._var: torch.Tensor | float | None = None

    @property
    def buffer(self) -> torch.Tensor | None:
        """The warm-up norms (NaN where a norm was not finite), as a tensor."""
        return _as_tensor(self._buffer)

    @buffer.setter
    def buffer(self, value: torch.Tensor | None) -> None:
        self._buffer = value

    @property
    def mean(self) -> torch.Tensor | None:
        """The EMA of the (clipped) norms, as a tensor (None in warm-up)."""
        return _as_tensor(self._mean)

    @mean.setter
    def mean(self, value: torch.Tensor | None) -> None:
        self._mean = value

    @property
    def var(self) -> torch.Tensor | None:
        """The EMA variance, as a tensor (None in warm-up)."""
        return _as_tensor(self._var)

    @var.setter
    def var(self, value: torch.Tensor | None) -> None:
        self._var = value

    def host_coefficient(self, total: float) -> float | None:
        """``coefficient`` on Python floats, for a total already on the host (statistics on the CPU): the same rule
        in double precision, without the ~20 tensor operators a step that the device path launches."""
        if isinstance(self._buffer, torch.Tensor) and self._buffer.device.type != "cpu":
            return None  # state restored onto an accelerator: stay there
        if not isinstance(self._buffer, (list, type(None))):  # tensors left by the device path (CPU: memory reads)
            self._buffer = self._buffer.tolist()
        for name in ("_mean", "_var"):
            v = getattr(self, name)
            if isinstance(v, torch.Tensor):
                setattr(self, name, v.item())
        g, cap = total, self.max_grad_norm
        if self.calls < self.warmup_steps:
            if self._buffer is None:
                self._buffer = [0.0] * self.warmup_steps
            self._buffer[self.calls] = g if math.isfinite(g) else math.nan
            self.calls += 1
            if self.calls == self.warmup_steps:  # start the EMA from the finite warm-up norms (population var.)
                seen = [v for v in self._buffer if v == v]  # NaN != NaN
                self._mean = sum(seen) / len(seen) if seen else math.nan
                self._var = sum((v - self._mean) ** 2 for v in seen) / len(seen) if seen else math.nan
            effective = cap if cap is not None else g
        else:
            mean, var = cast(float, self._mean), cast(float, self._var)
            self.calls += 1
            std = math.sqrt(var) if var >= 0 else math.nan
            z = (g - mean) / (std + self.eps)
            # z > z_thresh > 0 here, so the division is safe; NaN compares false and keeps the norm
            clip_val = (mean + self.z_thresh * std / (z / self.z_thresh)) * self.clip_factor if z > self.z_thresh else g
            effective = clip_val if cap is None or math.isnan(clip_val) else min(clip_val, cap)
            if math.isfinite(clip_val):
                if not math.isfinite(mean):  # a warm-up without one finite norm: start from this one
                    self._mean, self._var = clip_val, 0.0
                else:
                    new_mean = self.alpha * mean + (1 - self.alpha) * clip_val
                    self._mean = new_mean
                    self._var = self.alpha * var + (1 - self.alpha) * (clip_val - new_mean) ** 2
        return effective / (g + 1e-6) if g > effective else 1.0

    def coefficient(self, total: torch.Tensor) -> torch.Tensor:
        g = total.float()
        if self._buffer is not None and not isinstance(self._buffer, torch.Tensor):  # floats left by the host path
            self._buffer, self._mean, self._var = self.buffer, self.mean, self.var
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
        return {"calls": self.calls, "buffer": _plain(self._buffer), "mean": _plain(self._mean),
                "var": _plain(self._var)}

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

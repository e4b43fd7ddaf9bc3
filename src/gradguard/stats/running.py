"""Running statistics kept as device tensors, updated without reading anything back to the host."""

from __future__ import annotations

from typing import Any

import torch


class RunningMoments:
    """Exponential moving mean and variance of a scalar series, skipping non-finite values.

    ``mean <- beta * mean + (1 - beta) * x`` and ``var <- beta * var + (1 - beta) * (x - mean_prev)^2``
    (West's incremental EMA variance), the form ZClip uses for the gradient norm. The first finite value
    initialises the mean (variance 0). A non-finite value leaves the state unchanged, so one NaN step does not
    poison every later z-score. Everything is done with ``torch.where``: no branch on a device value.

    References:
        Kumar et al., "ZClip: Adaptive Spike Mitigation for LLM Pre-Training", 2025 (EMA mean/variance of the
        gradient norm). Finch, "Incremental calculation of weighted mean and variance", 2009.
    """

    def __init__(self, beta: float, device: torch.device) -> None:
        if not 0.0 < beta < 1.0:
            raise ValueError(f"beta must be in (0, 1), got {beta}")
        self.beta = beta
        self.mean = torch.zeros((), dtype=torch.float32, device=device)
        self.var = torch.zeros((), dtype=torch.float32, device=device)
        self.count = torch.zeros((), dtype=torch.float32, device=device)  # finite values seen

    def zscore(self, x: torch.Tensor) -> torch.Tensor:
        """z-score of ``x`` against the state *before* it is added; 0 until two finite values were seen."""
        std = self.var.sqrt()
        z = (x - self.mean) / std.clamp_min(1e-12)
        return torch.where((self.count >= 2) & (std > 0), z, torch.zeros_like(z))

    def update(self, x: torch.Tensor) -> None:
        """Fold one value in (a 0-d tensor); non-finite values are ignored."""
        x = x.to(torch.float32)
        ok = torch.isfinite(x)
        first = self.count == 0
        delta = x - self.mean
        new_mean = torch.where(first, x, self.mean + (1.0 - self.beta) * delta)
        new_var = torch.where(first, torch.zeros_like(x), self.beta * (self.var + (1.0 - self.beta) * delta * delta))
        self.mean = torch.where(ok, new_mean, self.mean)
        self.var = torch.where(ok, new_var, self.var)
        self.count = self.count + ok.to(torch.float32)

    def state_dict(self) -> dict[str, Any]:
        return {"beta": self.beta, "mean": self.mean.clone(), "var": self.var.clone(), "count": self.count.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        dev = self.mean.device
        self.beta = float(state["beta"])
        self.mean = state["mean"].to(dev, torch.float32).clone()
        self.var = state["var"].to(dev, torch.float32).clone()
        self.count = state["count"].to(dev, torch.float32).clone()

"""The host-side record the detectors read: every step's statistics since attach (a bounded window)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from ..stats.norms import ABSENT


@dataclass
class Thresholds:
    """Every number a detector compares against, in one place, so a user can tune them (``Guard(thresholds=)``).

    Defaults are calibrated on the scenarios in tests/ (healthy MLP/CNN/transformer runs stay silent).
    """

    window: int = 100  # steps of evidence behind window-based verdicts (vanishing, progress)
    warmup: int = 50  # finite steps before the z-score of the total norm is trusted
    spike_z: float = 10.0  # z-score of the total gradient norm against its EMA (ZClip's statistic)
    spike_ratio: float = 3.0  # ... and at least this many times its running mean
    growth_factor: float = 50.0  # total norm this many times above its early baseline ...
    loss_rise: float = 1.5  # ... while the loss is this many times its early level (or non-finite)
    update_ratio_high: float = 0.1  # ||dw||/||w|| per step; healthy training sits near 1e-3
    backward_growth: float = 1e3  # early-layer / late-layer RMS gradient: exploding toward the input
    vanish_ratio: float = 1e-3  # early-layer / late-layer RMS gradient: vanishing toward the input
    vanish_update: float = 1e-5  # largest layer ||dw||/||w|| below this: the weights do not move
    time_ratio: float = 1e-3  # gradient reaching the first 10% of time steps / the last 10%
    progress: float = 0.02  # relative loss improvement over the window that counts as learning
    dead_fraction: float = 0.5  # fraction of a layer's units never active
    saturated_fraction: float = 0.5  # fraction of a squashing layer's outputs on the flat part
    persist_samples: int = 3  # consecutive activation samples a unit condition must hold
    cooldown: int = 50  # steps a condition must be absent before it counts as gone


@dataclass
class History:
    """Per-step statistics on the host, trimmed to the last ``keep`` steps.

    Attributes:
        layers: layer names in forward order; numel: elements per layer; embedding: which layers are lookups.
        steps, total, z, mean, loss, loss_mean, loss_seen: per step. grad: (steps, layers) gradient norms, ABSENT=-1.
        sample_steps, weight, update: per sampled step, per layer weight norms and update norms.
        acts: (step, module, "active", per-unit 0/1 mask) or (step, module, "saturated", fraction).
        times: (step, module, early, late, T).
        baseline_total, baseline_loss: medians of the first finite values, the reference for growth.
    """

    layers: list[str]
    numel: np.ndarray
    embedding: np.ndarray
    keep: int = 512
    steps: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    total: np.ndarray = field(default_factory=lambda: np.zeros(0))
    z: np.ndarray = field(default_factory=lambda: np.zeros(0))
    mean: np.ndarray = field(default_factory=lambda: np.zeros(0))
    loss: np.ndarray = field(default_factory=lambda: np.zeros(0))
    loss_mean: np.ndarray = field(default_factory=lambda: np.zeros(0))
    loss_seen: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    grad: np.ndarray | None = None
    sample_steps: list[int] = field(default_factory=list)
    weight: list[np.ndarray] = field(default_factory=list)
    update: list[np.ndarray] = field(default_factory=list)
    acts: list[tuple[int, str, str, np.ndarray | float]] = field(default_factory=list)
    times: list[tuple[int, str, float, float, int]] = field(default_factory=list)
    finite_count: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    first_totals: list[float] = field(default_factory=list)
    first_grads: list[np.ndarray] = field(default_factory=list)
    first_losses: list[float] = field(default_factory=list)
    activation_order: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.grad is None:
            self.grad = np.zeros((0, len(self.layers)))

    def append(self, steps: np.ndarray, total: np.ndarray, z: np.ndarray, mean: np.ndarray, loss: np.ndarray,
               loss_mean: np.ndarray, loss_seen: np.ndarray, grad: np.ndarray) -> None:
        assert self.grad is not None
        prior = int(self.finite_count[-1]) if len(self.finite_count) else 0
        counts = prior + np.cumsum(np.isfinite(total))
        self.finite_count = np.concatenate([self.finite_count, counts])[-self.keep:]
        self.steps = np.concatenate([self.steps, steps])[-self.keep:]
        self.total = np.concatenate([self.total, total])[-self.keep:]
        self.z = np.concatenate([self.z, z])[-self.keep:]
        self.mean = np.concatenate([self.mean, mean])[-self.keep:]
        self.loss = np.concatenate([self.loss, loss])[-self.keep:]
        self.loss_mean = np.concatenate([self.loss_mean, loss_mean])[-self.keep:]
        self.loss_seen = np.concatenate([self.loss_seen, loss_seen])[-self.keep:]
        self.grad = np.concatenate([self.grad, grad])[-self.keep:]
        for t, g in zip(total, grad):
            if np.isfinite(t) and len(self.first_totals) < 10:
                self.first_totals.append(float(t))
                self.first_grads.append(g.copy())
        for v, seen in zip(loss, loss_seen):
            if seen and np.isfinite(v) and len(self.first_losses) < 10:
                self.first_losses.append(float(v))
        for lst in (self.sample_steps, self.weight, self.update):
            del lst[:-64]
        del self.acts[:-4096]
        del self.times[:-256]

    @property
    def baseline_total(self) -> float | None:
        return float(np.median(self.first_totals)) if len(self.first_totals) >= 3 else None

    @property
    def baseline_loss(self) -> float | None:
        return float(np.median(self.first_losses)) if len(self.first_losses) >= 3 else None

    @property
    def baseline_grad(self) -> np.ndarray | None:
        """Median of each layer's first finite gradient norms (NaN where absent)."""
        if len(self.first_grads) < 3:
            return None
        g = np.stack(self.first_grads)
        return np.nanmedian(np.where(g == ABSENT, np.nan, g), axis=0)

    def rms_grad(self, rows: slice | np.ndarray) -> np.ndarray:
        """Root-mean-square gradient per element, per layer (NaN where the layer had no gradient)."""
        assert self.grad is not None
        g = self.grad[rows]
        return np.where(g == ABSENT, np.nan, g) / np.sqrt(self.numel)

    def progress(self, end: int, window: int) -> float | None:
        """Relative loss improvement over the ``window`` steps ending at row ``end`` (exclusive).

        Returns:
            (mean of the first third - mean of the last third) / |mean of the first third|, or None when fewer
            than half the steps in the window observed a finite loss.
        """
        lo = max(0, end - window)
        seen = self.loss_seen[lo:end] & np.isfinite(self.loss[lo:end])
        if end - lo < window or seen.sum() < window // 2:
            return None
        vals = self.loss[lo:end][seen]
        third = max(1, len(vals) // 3)
        first, last = vals[:third].mean(), vals[-third:].mean()
        return float((first - last) / max(abs(first), 1e-12))


def update_ratios(h: History, n: int) -> np.ndarray | None:
    """(n, layers) update-to-weight ratios ||dw||/||w|| of the last ``n`` sampled steps inside the history window.

    Returns:
        The ratios (NaN where a layer had no weight or no update), or None when fewer than ``n`` samples exist.
    """
    if len(h.sample_steps) < n or h.sample_steps[-n] < h.steps[0]:
        return None
    rows = []
    for w, u in zip(h.weight[-n:], h.update[-n:]):
        ok = (w > 0) & (u >= 0)
        rows.append(np.where(ok, u / np.where(ok, w, 1.0), np.nan))
    r = np.stack(rows)
    return r if np.isfinite(r).any(axis=1).all() else None


def layer_flow(h: History, window: int) -> tuple[list[str], list[str], float | None, int]:
    """Early vs late layers' RMS gradient over the window (median per layer), lookup layers left out.

    Returns:
        (early layer names, late layer names, median early RMS / median late RMS, last step).
    """
    rows = slice(len(h.steps) - window, len(h.steps))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        rms = np.nanmedian(h.rms_grad(rows), axis=0)
    usable = [i for i in range(len(h.layers)) if not h.embedding[i] and np.isfinite(rms[i]) and rms[i] >= 0]
    step = int(h.steps[-1])
    if len(usable) < 2:
        return [], [], None, step
    q = max(1, len(usable) // 4)
    early_i, late_i = usable[:q], usable[-q:]
    late = float(np.median(rms[late_i]))
    early = float(np.median(rms[early_i]))
    if late <= 0:
        return [], [], None, step
    return [h.layers[i] for i in early_i], [h.layers[i] for i in late_i], early / late, step

"""Divergence from the first steps: a learning rate far too high throws the loss up by orders of magnitude, or the
gradient norm far above its first values, or doubles the loss while its first update moves the weights by a large
fraction of their norm, before any window of evidence exists (the window rules wait 50-100 steps; the run is
ruined by then). Judged on each of the first ``EARLY_STEPS`` steps against the first ones."""

from __future__ import annotations

import numpy as np

from ..types import Diagnosis
from .history import History
from .reporter import Verdict

EARLY_STEPS = 10  # the steps judged by this rule (a resumed run is past them)
LOSS_RISE = 10.0  # the loss an order of magnitude above its first value
GRAD_RISE = 1e3  # the gradient norm three orders above its first value, while the loss is not below its first
LOSS_DOUBLE = 2.0  # the loss twice its first value ...
UPDATE_RATIO = 0.1  # ... while the first sampled update moved the weights by this fraction of their norm (median
# over layers; healthy training sits near 1e-3, and Thresholds.update_ratio_high calls 0.1 far too large). A loss
# that swings 2-7x its first value under a clipped SGD with GradScaler and accumulation (tests/field/amp_accum.py
# at lr x100) never reaches LOSS_RISE, but its first update moves the weights by 0.3-2x their norm.

REMEDIES = ("lower the learning rate about 10x (or warm it up over the first hundred steps)",
            "clip the gradient norm (torch.nn.utils.clip_grad_norm_, or Guard(clip=1.0))",
            "Guard(repair='auto') backs the learning rate off and rolls back to the state at attach")


def detect_early_divergence(h: History, rows: range) -> Verdict | None:
    """The first of ``rows`` (row indices of ``h``) within the first ``EARLY_STEPS`` steps where the loss is
    ``LOSS_RISE`` times its first value, or the gradient norm ``GRAD_RISE`` times its first value without the loss
    having fallen, or the loss ``LOSS_DOUBLE`` times its first value after a first sampled update (at or before
    that step) of ``UPDATE_RATIO`` of the weights' norm or more.

    Args:
        h: the history. rows: the rows of this read.

    Returns:
        An ``exploding`` verdict naming the step and the layers whose gradient grew most, or None.
    """
    if h.count0 or not h.first_totals:
        return None  # a resumed run: its first steps were judged before
    s0, t0 = h.first_totals[0]
    first_loss = h.first_losses[0] if h.first_losses else None
    first_update = _first_update_ratio(h)
    for r in rows:
        step = int(h.steps[r])
        if step >= EARLY_STEPS:
            break
        total = float(h.total[r])
        loss = float(h.loss[r]) if h.loss_seen[r] else float("nan")
        loss_ratio = loss / first_loss[1] if first_loss and first_loss[1] > 0 and np.isfinite(loss) else None
        grad_ratio = total / t0 if t0 > 0 and np.isfinite(total) else None
        by_loss = loss_ratio is not None and loss_ratio >= LOSS_RISE
        by_grad = grad_ratio is not None and grad_ratio >= GRAD_RISE and (loss_ratio is None or loss_ratio >= 1.0)
        by_update = (first_update is not None and first_update[0] <= step and loss_ratio is not None
                     and loss_ratio >= LOSS_DOUBLE and first_update[1] >= UPDATE_RATIO)
        if not (by_loss or by_grad or by_update):
            continue
        growth = h.grad[r] / np.where(h.first_grads[0] > 0, h.first_grads[0], np.nan)
        order = np.argsort(-np.nan_to_num(growth, nan=-1.0))
        layers = [h.layers[i] for i in order[:3] if np.isfinite(growth[i]) and growth[i] > 1.0]
        parts = []
        if first_loss is not None and np.isfinite(loss):
            parts.append(f"the loss went from {first_loss[1]:.4g} (step {first_loss[0]}) to {loss:.4g}")
        parts.append(f"the gradient norm from {t0:.4g} (step {s0}) to {total:.4g} ({total / t0:.3g}x)"
                     if t0 > 0 else f"the gradient norm to {total:.4g}")
        if by_update and not (by_loss or by_grad):
            assert first_update is not None
            parts.append(f"the update of step {first_update[0]} moved the weights by {first_update[1]:.3g} of their "
                         "norm (median over layers; healthy training sits near 1e-3)")
        msg = (f"Training diverges from its first steps: by step {step}, " + " and ".join(parts) + ". The "
               "learning rate is most likely far too high for this model; the weights are being thrown away from "
               "their initialisation.")
        ev = {"step": float(step), "first_grad_norm": t0, "grad_norm": total,
              "grad_norm_ratio": total / t0 if t0 > 0 else float("inf")}
        if first_update is not None:
            ev["first_update_ratio"] = first_update[1]
        if first_loss is not None:
            ev.update(first_loss=first_loss[1], loss=loss, loss_ratio=loss_ratio if loss_ratio is not None
                      else float("nan"))
        return Verdict(("exploding", "early"), ("early",),
                       Diagnosis("exploding", "error", step, layers, msg, ev, list(REMEDIES)))
    return None


def _first_update_ratio(h: History) -> tuple[int, float] | None:
    """(step, median over layers of ||dw|| / ||w||) of the first sampled update, if it was within the first
    ``EARLY_STEPS`` steps; None otherwise (no sample yet, no optimizer, or no layer with both numbers)."""
    if not h.sample_steps or h.sample_steps[0] >= EARLY_STEPS:
        return None
    w, u = h.weight[0], h.update[0]
    ok = (w > 0) & (u >= 0) & np.isfinite(w) & np.isfinite(u)
    if not ok.any():
        return None
    return int(h.sample_steps[0]), float(np.median(u[ok] / w[ok]))

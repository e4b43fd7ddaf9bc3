"""Divergence from the first steps: a learning rate far too high throws the loss up by orders of magnitude, or the
gradient norm far above its first values, or both well above their first values on two steps, before any window of evidence exists (the window rules wait 50-100
steps; the run is ruined by then). Judged on each of the first ``EARLY_STEPS`` steps against the first ones."""

from __future__ import annotations

import math

import numpy as np

from ..types import Diagnosis
from .history import History
from .reporter import Verdict

EARLY_STEPS = 10  # the steps judged by this rule (a resumed run is past them)
LOSS_RISE = 10.0  # the loss an order of magnitude above its first value
GRAD_RISE = 1e3  # the gradient norm three orders above its first value, while the loss is not below its first
# Both at once, on two of the first steps: the loss twice its first value while the gradient norm is ten times its
# first. Either alone is common in healthy runs (a noisy first batch, a gradient that grows as the net leaves its
# initialisation); a loss that doubles *because* the gradients grew an order of magnitude is a step far too large.
# A clipped SGD with GradScaler and accumulation at a learning rate 100x too high (tests/field/amp_accum.py)
# swings 2-7x its first loss and never reaches LOSS_RISE, with its norm 6-30x its first from step 1 on. Two steps,
# not one: one outlier batch raises both its loss and its gradient.
BOTH_LOSS, BOTH_GRAD, BOTH_TIMES = 2.0, 10.0, 2

REMEDIES = ("lower the learning rate about 10x (or warm it up over the first hundred steps)",
            "clip the gradient norm (torch.nn.utils.clip_grad_norm_, or Guard(clip=1.0))",
            "Guard(repair='auto') backs the learning rate off and rolls back to the state at attach")


def detect_early_divergence(h: History, rows: range) -> Verdict | None:
    """The first of ``rows`` (row indices of ``h``) within the first ``EARLY_STEPS`` steps where the loss is
    ``LOSS_RISE`` times its first value, or the gradient norm ``GRAD_RISE`` times its first value without the loss
    having fallen, or the ``BOTH_TIMES``-th step where the loss is ``BOTH_LOSS`` times its first value and the norm
    ``BOTH_GRAD`` times its first.

    Args:
        h: the history. rows: the rows of this read.

    Returns:
        An ``exploding`` verdict naming the step and the layers whose gradient grew most, or None.
    """
    if h.count0 or not h.first_totals:
        return None  # a resumed run: its first steps were judged before
    s0, t0 = h.first_totals[0]
    first_loss = h.first_losses[0] if h.first_losses else None
    both = 0  # the steps so far where loss and norm both rose (the earlier rows of the first steps count too)
    for r in range(rows.start) if rows.start < EARLY_STEPS else ():
        if int(h.steps[r]) < EARLY_STEPS and _both_rose(h, r, t0, first_loss):
            both += 1
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
        both += _both_rose(h, r, t0, first_loss)
        if not (by_loss or by_grad or both >= BOTH_TIMES):
            continue
        growth = h.grad[r] / np.where(h.first_grads[0] > 0, h.first_grads[0], np.nan)
        order = np.argsort(-np.nan_to_num(growth, nan=-1.0))
        layers = [h.layers[i] for i in order[:3] if np.isfinite(growth[i]) and growth[i] > 1.0]
        parts = []
        if first_loss is not None and np.isfinite(loss):
            parts.append(f"the loss went from {first_loss[1]:.4g} (step {first_loss[0]}) to {loss:.4g}")
        parts.append(f"the gradient norm from {t0:.4g} (step {s0}) to {total:.4g} ({total / t0:.3g}x)"
                     if t0 > 0 else f"the gradient norm to {total:.4g}")
        msg = (f"Training diverges from its first steps: by step {step}, " + " and ".join(parts) + ". The "
               "learning rate is most likely far too high for this model; the weights are being thrown away from "
               "their initialisation.")
        ev = {"step": float(step), "first_grad_norm": t0, "grad_norm": total,
              "grad_norm_ratio": total / t0 if t0 > 0 else float("inf")}
        if first_loss is not None:
            ev.update(first_loss=first_loss[1], loss=loss, loss_ratio=loss_ratio if loss_ratio is not None
                      else float("nan"))
        return Verdict(("exploding", "early"), ("early",),
                       Diagnosis("exploding", "error", step, layers, msg, ev, list(REMEDIES)))
    return None


def _both_rose(h: History, r: int, t0: float, first_loss: tuple[int, float] | None) -> bool:
    """Row ``r``'s loss is ``BOTH_LOSS`` times the first loss and its norm ``BOTH_GRAD`` times the first norm."""
    if first_loss is None or first_loss[1] <= 0 or t0 <= 0 or not h.loss_seen[r]:
        return False
    loss, total = float(h.loss[r]), float(h.total[r])
    return (math.isfinite(loss) and math.isfinite(total) and loss >= BOTH_LOSS * first_loss[1]
            and total >= BOTH_GRAD * t0)

"""Divergence from the first steps: a learning rate far too high throws the loss up by orders of magnitude, or
the gradient norm far above its first values, before any window of evidence exists (the window rules wait 50-100
steps; the run is ruined by then). Judged on each of the first ``EARLY_STEPS`` steps against the first ones.

Room: the judge. It may touch: ``detect``, ``types``.
"""

from __future__ import annotations

import math

import numpy as np

from ..types import Diagnosis
from .history import History
from .reporter import Verdict

EARLY_STEPS = 10  # the steps judged by this rule (a resumed run is past them)
# A step "rose" where its loss is LOSS_RISE x the first loss, or BOTH_LOSS x while its gradient norm is BOTH_GRAD x
# the first norm. The rule fires on the RISES-th such step, or on a LOSS_RISE step that follows a step already
# BOTH_LOSS x the first (a climb), or where the loss stayed up after a LOSS_RISE step (the median of the STAY steps
# after it, or more, at least BOTH_LOSS x the first). One step is not enough: one outlier batch throws its own loss
# up 10-70x in a healthy regression on heavy-tailed targets, and the steps around it are near the first.
# Either half of the second test alone is common in healthy runs (a noisy first batch: the fault suite's Adagrad toy
# goes 0.43 -> 1.32; a norm that grows as the net leaves its initialisation); a loss that doubles because the
# gradients grew an order of magnitude is a step far too large. The field corpus has one of each: SGD at lr x100
# (tests/field/ema_checkpoint.py) goes 0.86, 14.9, 6.8, 3.4, 5.3 (one 10x step, then 4-8x); a clipped SGD with
# GradScaler and accumulation (tests/field/amp_accum.py) swings 2.3, 3.4, 7.4, 2.8 ... with its norm 6-30x its first.
LOSS_RISE = 10.0
BOTH_LOSS, BOTH_GRAD = 2.0, 10.0
RISES = 2
STAY = 2
GRAD_RISE = 1e3  # one step with the norm three orders above its first, while the loss is not below its first

REMEDIES = ("lower the learning rate about 10x (or warm it up over the first hundred steps)",
            "clip the gradient norm (torch.nn.utils.clip_grad_norm_, or Guard(clip=1.0))",
            "Guard(repair='auto') backs the learning rate off and rolls back to the state at attach")


def detect_early_divergence(h: History, rows: range) -> Verdict | None:
    """The first of ``rows`` (row indices of ``h``) within the first ``EARLY_STEPS`` steps that is the ``RISES``-th
    step to rise (see ``_rose``), or where the gradient norm is ``GRAD_RISE`` times its first value without the loss
    having fallen.

    Args:
        h: the history. rows: the rows of this read.

    Returns:
        An ``exploding`` verdict naming the step and the layers whose gradient grew most, or None.
    """
    if h.count0 or not h.first_totals:
        return None  # a resumed run: its first steps were judged before
    s0, t0 = h.first_totals[0]
    first_loss = h.first_losses[0] if h.first_losses else None
    # The rows so far that rose: the earlier rows of the first steps, read before, count too.
    rose = [r for r in (range(rows.start) if rows.start < EARLY_STEPS else ())
            if int(h.steps[r]) < EARLY_STEPS and _rose(h, r, t0, first_loss)]
    for r in rows:
        step = int(h.steps[r])
        if step >= EARLY_STEPS:
            break
        total = float(h.total[r])
        loss = float(h.loss[r]) if h.loss_seen[r] else float("nan")
        loss_ratio = loss / first_loss[1] if first_loss and first_loss[1] > 0 and np.isfinite(loss) else None
        grad_ratio = total / t0 if t0 > 0 and np.isfinite(total) else None
        if _rose(h, r, t0, first_loss):
            rose.append(r)
        by_grad = grad_ratio is not None and grad_ratio >= GRAD_RISE and (loss_ratio is None or loss_ratio >= 1.0)
        sustained = _sustained(h, rose, r, first_loss)
        if not (by_grad or sustained is not None):
            continue
        growth = h.grad[r] / np.where(h.first_grads[0] > 0, h.first_grads[0], np.nan)
        order = np.argsort(-np.nan_to_num(growth, nan=-1.0))
        layers = [h.layers[i] for i in order[:3] if np.isfinite(growth[i]) and growth[i] > 1.0]
        parts = []
        if first_loss is not None and np.isfinite(loss):
            parts.append(f"the loss went from {first_loss[1]:.4g} (step {first_loss[0]}) to {loss:.4g}")
        parts.append(f"the gradient norm from {t0:.4g} (step {s0}) to {total:.4g} ({total / t0:.3g}x)"
                     if t0 > 0 else f"the gradient norm to {total:.4g}")
        again = f" ({sustained})" if sustained and not by_grad else ""
        msg = (f"Training diverges from its first steps: by step {step}, " + " and ".join(parts) + again + ". The "
               "learning rate is most likely far too high for this model; the weights are being thrown away from "
               "their initialisation.")
        ev = {"step": float(step), "first_grad_norm": t0, "grad_norm": total,
              "grad_norm_ratio": total / t0 if t0 > 0 else float("inf"), "risen_steps": float(len(rose)),
              "first_rise_step": float(h.steps[rose[0]]) if rose else float("nan")}
        if first_loss is not None:
            ev.update(first_loss=first_loss[1], loss=loss, loss_ratio=loss_ratio if loss_ratio is not None
                      else float("nan"))
            if first_loss[0] < step:
                # The level to come back to is the loss at initialisation: while the loss stays above it, the run
                # has not recovered, and a stall then is this divergence's damage (``explained_by_explosion``), not
                # a new condition that would say the explosion was ruled out.
                h.mark_exploded(step, first_loss[1])
        return Verdict(("exploding", "early"), ("early",),
                       Diagnosis("exploding", "error", step, layers, msg, ev, list(REMEDIES)))
    return None


def _rose(h: History, r: int, t0: float, first_loss: tuple[int, float] | None) -> bool:
    """Row ``r``'s loss is ``LOSS_RISE`` times the first loss, or ``BOTH_LOSS`` times while its norm is ``BOTH_GRAD``
    times the first norm (non-finite values are the non-finite rule's)."""
    if first_loss is None or first_loss[1] <= 0 or not h.loss_seen[r]:
        return False
    loss, total = float(h.loss[r]), float(h.total[r])
    if not math.isfinite(loss):
        return False
    return loss >= LOSS_RISE * first_loss[1] or (loss >= BOTH_LOSS * first_loss[1] and t0 > 0
                                                  and math.isfinite(total) and total >= BOTH_GRAD * t0)


def _sustained(h: History, rose: list[int], r: int, first_loss: tuple[int, float] | None) -> str | None:
    """Why the rise by row ``r`` is not one batch, in words, or None: ``r`` is the ``RISES``-th row that rose; or a
    row whose loss is ``LOSS_RISE`` times the first right after a row already ``BOTH_LOSS`` times it (a climb); or
    ``STAY`` or more rows after the first ``LOSS_RISE`` row, the median loss since then ``BOTH_LOSS`` times the
    first (the rise stayed)."""
    if first_loss is None or first_loss[1] <= 0 or not rose:
        return None
    first, high = first_loss[1], BOTH_LOSS * first_loss[1]

    def loss(i: int) -> float:
        return float(h.loss[i]) if h.loss_seen[i] else math.nan

    steps = [int(h.steps[i]) for i in rose]
    if len(rose) >= RISES:
        before = [s for s, i in zip(steps, rose) if i < r]  # the other rises, named beside row r's own
        return f"it stood this far above its start at step{'s' if len(before) > 1 else ''} " + \
            ", ".join(map(str, before)) + " too"
    big = [i for i in rose if loss(i) >= LOSS_RISE * first]
    if not big:
        return None
    if big[0] == r and r >= 1 and loss(r - 1) >= high:
        return f"climbing: {loss(r - 1) / first:.3g}x its start the step before"
    # The median of the rows after the 10x one; a NaN among them counts as not high (the non-finite rule's case).
    if r - big[0] >= STAY and np.median([loss(i) for i in range(big[0] + 1, r + 1)]) >= high:
        return f"{loss(big[0]) / first:.3g}x its start at step {steps[0]}, and above {BOTH_LOSS:g}x on most steps since"
    return None

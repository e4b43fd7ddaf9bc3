"""``stalled``: the loss has stopped improving and no other kind explains it.

Raised only when the other families have nothing to say (no exploding, vanishing, non-finite, dead or saturated
condition active), so it is the answer to "nothing is flagged, yet the run does not learn". The evidence says what
was ruled out (gradient flow, update sizes, units) and what is most likely, from the numbers:

- updates tiny against the weights (median ||dw||/||w|| under 1e-4): the learning rate is too low;
- updates large (over 1e-2) and the loss swinging (its spread over the window above a tenth of its mean): the
  learning rate is too high and the run oscillates instead of descending;
- otherwise a plateau: a saddle or a badly scaled problem (output logits saturated, an identity-initialised RNN's
  long plateau), where a learning-rate schedule, normalisation or a different initialisation helps.

References:
    Karpathy, "A Recipe for Training Neural Networks", 2019 (update/weight near 1e-3). Le, Jaitly & Hinton, "A
    Simple Way to Initialize Recurrent Networks of Rectified Linear Units", 2015 (the IRNN's long plateaus).
"""

from __future__ import annotations

import numpy as np

from ..types import Diagnosis
from .flow import layer_flow, update_ratios
from .history import History, Thresholds, loss_stalled, nanmedian
from .reporter import Verdict

# Kinds whose activity explains a stalled loss already: their diagnosis says why, this one would only repeat it.
EXPLAINING = ("exploding", "vanishing", "nonfinite", "dead_units", "saturation")
# A run still at half its early loss level or above has not learned: a plateau lower down is where a healthy run
# ends (slowly converging, or converged at its noise floor), and is left alone.
STUCK_FRACTION = 0.5
LOW_UPDATE = 1e-4
HIGH_UPDATE = 1e-2


def detect_stalled(h: History, t: Thresholds, active: set[str]) -> Verdict | None:
    """A stalled loss over the last ``t.window`` steps that no active condition explains.

    Args:
        h: the history. t: thresholds (``window``, ``progress``, ``learned``).
        active: kinds whose conditions are active now (the reporter's).

    Returns:
        A ``stalled`` verdict at the newest step, or None (also without an observed loss: a stall needs one).
    """
    if active & set(EXPLAINING) or len(h.steps) < t.window:
        return None
    stalled, prog = loss_stalled(h, t)
    if not stalled or prog is None:
        return None
    window = slice(len(h.steps) - t.window, len(h.steps))
    seen = h.loss_seen[window] & np.isfinite(h.loss[window])
    vals = h.loss[window][seen]
    mean, spread = float(np.mean(vals)), float(np.std(vals))
    early = float(np.median([v for _, v in h.first_losses])) if h.first_losses else float("nan")
    if not (np.isfinite(early) and early > 0 and mean >= STUCK_FRACTION * early):
        return None
    r = update_ratios(h, 1)
    update = float(nanmedian(r, axis=1)[-1]) if r is not None else float("nan")
    _, _, flow, _ = layer_flow(h, t.window)
    ruled_out = ["non-finite values", "exploding and vanishing gradients",
                 "dead and saturated units (where sampled)"]
    ev: dict[str, float] = {"loss_mean": mean, "loss_spread": spread, "progress": prog, "early_loss": early,
                            "window_steps": float(t.window)}
    if np.isfinite(update):
        ev["median_update_ratio"] = update
    if flow is not None:
        ev["early_late_grad_ratio"] = float(flow)
    if np.isfinite(update) and update < LOW_UPDATE:
        likely = (f"The weights barely move: each step changes them by {update:.2g} of their norm (median over "
                  "layers; healthy training sits near 1e-3). The learning rate is most likely too low.")
        remedies = ["raise the learning rate (10x, then adjust)", "check that the scheduler did not decay it to ~0"]
    elif np.isfinite(update) and update > HIGH_UPDATE and spread > 0.1 * abs(mean):
        likely = (f"The steps are large ({update:.2g} of the weights' norm each, median over layers) and the loss "
                  f"swings around {mean:.4g} (spread {spread:.3g}) instead of descending: the learning rate is most "
                  "likely too high, the run oscillates across a valley.")
        remedies = ["lower the learning rate (3-10x) or decay it", "a larger batch evens the swings"]
    else:
        likely = ("Gradients flow and the updates are of a healthy size, so this is a plateau: a saddle, saturated "
                  "output logits, or the long plateau of an identity-initialised recurrent network.")
        remedies = ["a learning-rate schedule (warmup, then decay) or a larger learning rate for a while",
                    "normalisation (LayerNorm/BatchNorm) or another initialisation",
                    "check the labels and the loss against the output layer (a target the output cannot reach)"]
    msg = (f"Training has stalled: over the last {t.window} steps the loss {loss_change(prog)} "
           f"(mean {mean:.4g}, against {early:.4g} at the start). Ruled out: " + ", ".join(ruled_out) + ". " + likely)
    return Verdict(("stalled",), ("stalled",),
                   Diagnosis("stalled", "warning", int(h.steps[-1]), [], msg, ev, remedies))


def loss_change(progress: float) -> str:
    """The loss's change over a window in words, from ``History.progress`` (the relative improvement, negative when
    the loss rose): "improved by 0.53%", "rose by 30%", "did not change".

    Args:
        progress: (mean of the window's first third - mean of its last third) / |mean of its first third|.

    Returns:
        The words, with the size of the change as a positive percentage.
    """
    pct = 100 * abs(progress)
    if pct == 0:
        return "did not change"
    size = f"{pct:,.0f}" if pct >= 10 else f"{pct:.2g}"
    return f"improved by {size}%" if progress > 0 else f"rose by {size}%"

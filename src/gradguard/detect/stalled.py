"""``stalled``: the loss has stopped improving, the run never learned or gave its progress back, and no other kind
explains it.

Raised only when the other families have nothing to say (no exploding, vanishing, non-finite, dead or saturated
condition active), so it is the answer to "nothing is flagged, yet the run does not learn".

A flat loss alone is not a stall: a run that learned and then flattened is converging (to its data's noise floor,
or slowly), and is left alone. The rule compares the loss now with its level just after the first steps (the
*start level*: the median of the first ``window // 3`` losses after the ten that set the early level; the first
steps only find the trivial answer, the output bias or the label frequencies, as an identity-initialised RNN
reaching the mean of the adding problem in five steps does). The run has learned when the loss now stands below the
start level by at least ``LEARNED`` of it and by ``SIGNIFICANT`` standard errors of the two levels, and has kept at
least ``KEPT`` of the largest gain it reached. Otherwise it never learned, or gave its progress back.

The evidence says what was ruled out (gradient flow, units) and what is most likely, from what was measured:

- updates large (median ||dw||/||w|| over 1e-2, ten times the healthy 1e-3): the learning rate is too high;
- updates tiny (under 1e-4): the learning rate is too low;
- the loss rose over the window, or gave back its progress, with updates of a usual size or not measured: a
  learning rate too high for this stage of training is the likeliest cause;
- updates of a usual size and a flat loss: a plateau (a saddle, saturated output logits, an identity-initialised
  RNN's long plateau), where a schedule, normalisation or another initialisation helps;
- no update measured (a loop without a torch.optim optimizer changes its weights out of gradguard's sight): what
  was not measured is said, and no learning-rate direction is claimed.

References:
    Karpathy, "A Recipe for Training Neural Networks", 2019 (update/weight near 1e-3). Le, Jaitly & Hinton, "A
    Simple Way to Initialize Recurrent Networks of Rectified Linear Units", 2015 (the IRNN's long plateaus).

Room: the judge. It may touch: ``detect``, ``types``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..types import Diagnosis
from .flow import layer_flow, update_ratios
from .history import BASELINE_STEPS, History, Thresholds, explained_by_explosion, loss_stalled, nanmedian
from .reporter import Verdict

# Kinds whose activity explains a stalled loss already: their diagnosis says why, this one would only repeat it.
EXPLAINING = ("exploding", "vanishing", "nonfinite", "dead_units", "saturation")
# A run has learned when its loss stands at least this fraction of its start level below it: learning the label
# frequencies from a near-uniform output moves a classifier's loss by about 1% (random labels, a sigmoid net at
# chance), a real fit by 5-10% and more, even one ending at a noise floor as high as 30% label noise leaves.
LEARNED = 0.03
SIGNIFICANT = 3.0  # ... and by this many standard errors of the difference of the two levels (batch noise)
KEPT = 0.5  # ... keeping at least this fraction of the largest gain it reached (less: it gave its progress back)
LOW_UPDATE = 1e-4  # median ||dw||/||w|| under this: the weights barely move (healthy: near 1e-3)
HIGH_UPDATE = 1e-2  # ... over this: each step moves them ten times further than a healthy one
# Windows of steps after the start level before a run whose loss drifts down (by more than one standard error, not
# significantly) may be called stalled: one window's mean hides a slow descent in batch noise (a classifier fitting
# 30% label noise gains ~2% per 100 steps against a noise of ~3%), two show it. A flat or rising loss waits for none.
SETTLE = 2
MEDIAN_SE = math.sqrt(math.pi / 2)  # standard error of a median / that of a mean (normal noise)
# Why update sizes are unknown, as the rule can tell (advice.py says "no optimizer" where the Guard has none).
UNMEASURED = ("no update was seen at a sampled step: a loop without a torch.optim optimizer changes its weights out "
              "of gradguard's sight")
NO_OPTIMIZER = "no optimizer: the loop changes its weights itself, out of gradguard's sight"


@dataclass(frozen=True)
class Course:
    """The loss's course since the first steps, as the stall rule reads it.

    Attributes:
        start, start_steps: the start level and the steps it is the median of (None: only the early level known).
        now, best: the mean loss of the window; the lowest mean of ``window // 3`` consecutive losses still held.
        noise: ``SIGNIFICANT`` standard errors of (start - now).
        learned: the run learned and kept it (not a stall). gave_back: it had learned and lost it again.
        rose: the loss rose over the window, beyond its noise.
    """

    start: float
    start_steps: tuple[int, int] | None
    now: float
    best: float
    noise: float
    learned: bool
    gave_back: bool
    rose: bool


def start_level(h: History, t: Thresholds) -> tuple[float, float, int, int] | None:
    """The start level, once the first ``t.window // 3`` losses after the early ones exist (kept on
    ``h.stall_start``: measured once, while the history still holds the run's start).

    Returns:
        (level, its standard error, first and last step it is the median of); NaN level and error when the run's
        start is no longer held (a resumed run: the early level stands in); None while the losses are to come.
    """
    if h.stall_start is not None:
        return h.stall_start
    if len(h.first_losses) < BASELINE_STEPS or not len(h.steps):
        return None
    if int(h.steps[0]) > h.first_losses[0][0]:
        h.stall_start = (math.nan, math.nan, -1, -1)
        return h.stall_start
    ok = h.loss_seen & np.isfinite(h.loss) & (h.steps > h.first_losses[-1][0])
    n = max(3, t.window // 3)
    if ok.sum() < n:
        return None
    rows = np.flatnonzero(ok)[:n]
    vals = h.loss[rows]
    h.stall_start = (float(np.median(vals)), MEDIAN_SE * noise_sd(vals) / math.sqrt(n),
                     int(h.steps[rows[0]]), int(h.steps[rows[-1]]))
    return h.stall_start


def loss_course(h: History, t: Thresholds, window: np.ndarray, early: float) -> Course:
    """Read the course of the loss: start level against the window now and the best level reached.

    Args:
        h: the history. t: thresholds. window: the observed finite losses of the last ``t.window`` steps.
        early: the early level (median of the first losses), standing in for an unknown start level.
    """
    ref = start_level(h, t)
    start, start_se, steps = early, 0.0, None
    if ref is not None and math.isfinite(ref[0]):
        start, start_se, steps = ref[0], ref[1], (ref[2], ref[3])
    n = max(3, t.window // 3)
    now, sd = float(np.mean(window)), noise_sd(window)
    noise = SIGNIFICANT * math.hypot(start_se, sd / math.sqrt(len(window)))
    held = h.loss[h.loss_seen & np.isfinite(h.loss) & (h.steps > h.first_losses[-1][0])]  # from the start level on
    k = min(n, len(held))
    sums = np.cumsum(np.concatenate([[0.0], held]))
    best = min(float(np.min((sums[k:] - sums[:-k]) / k)), now) if k else now
    # The lowest of many block means lies below the level by chance: its noise is a block's, at SIGNIFICANT.
    best_noise = SIGNIFICANT * math.hypot(start_se, sd / math.sqrt(max(k, 1)))
    gain, top, least = start - now, start - best, LEARNED * abs(start)
    gave_back = top >= max(least, best_noise) and now - best >= best_noise and gain < KEPT * top
    # Learned: the loss now, or the best level it reached and mostly kept, stands clearly below the start level. The
    # best level counts too because a slow, noisy descent (a fit into label noise) hides in a window's mean.
    learned = (gain >= max(least, noise) or top >= max(least, best_noise)) and not gave_back
    third = max(1, len(window) // 3)
    first, last = window[:third], window[-third:]
    rise = float(last.mean() - first.mean())
    rose = rise > max(t.progress * abs(float(first.mean())), SIGNIFICANT * sd * math.sqrt(2 / third))
    return Course(start, steps, now, best, noise, learned, gave_back, rose)


def noise_sd(x: np.ndarray) -> float:
    """The batch-to-batch standard deviation of a loss series, from its successive differences: a trend through
    the series (a loss still falling) is not noise, as it would be in ``np.std``. Differences further than 5
    robust standard deviations from their median are cut there: one wild batch is not the noise of all.

    References:
        von Neumann et al., "The Mean Square Successive Difference", Ann. Math. Stat., 1941. Rousseeuw & Croux,
        "Alternatives to the Median Absolute Deviation", JASA, 1993 (1.4826 x MAD estimates a normal sd).
    """
    if len(x) < 3:
        return 0.0
    d = np.diff(x)
    mid = float(np.median(d))
    mad = 1.4826 * float(np.median(np.abs(d - mid)))
    if mad > 0:
        d = np.clip(d, mid - 5 * mad, mid + 5 * mad)
    return float(np.sqrt(np.mean((d - mid) ** 2) / 2))


def window_update(h: History, t: Thresholds) -> float:
    """The median update-to-weight ratio of the sampled steps inside the window (median over layers, then over the
    samples); NaN when no update was measured there (a loop without an optimizer, or no sample in the window)."""
    if not len(h.steps):
        return math.nan
    lo = int(h.steps[max(0, len(h.steps) - t.window)])
    k = sum(1 for s in h.sample_steps if s >= lo)
    for n in (k, 1):
        r = update_ratios(h, n) if n >= 1 else None
        if r is not None:
            per = nanmedian(r, axis=1)
            per = per[np.isfinite(per)]
            if len(per):
                return float(np.median(per))
    return math.nan


def detect_stalled(h: History, t: Thresholds, active: set[str]) -> Verdict | None:
    """A stalled loss over the last ``t.window`` steps on a run that never learned or gave its progress back, which
    no active condition explains.

    Args:
        h: the history. t: thresholds (``window``, ``progress``, ``learned``).
        active: kinds whose conditions are active now (the reporter's).

    Returns:
        A ``stalled`` verdict at the newest step, or None (also without an observed loss: a stall needs one).
    """
    start_level(h, t)  # measured as soon as its losses exist, whatever is decided below
    if active & set(EXPLAINING) or len(h.steps) < t.window:
        return None
    if explained_by_explosion(h, t) is not None:
        # The loss stays above its level before a reported explosion (an early divergence, a damaging spike) once
        # that report's cooldown has passed: the stall is the explosion's damage, said already, not a new condition
        # whose "ruled out: exploding" would contradict it.
        return None
    stalled, prog = loss_stalled(h, t)
    if not stalled or prog is None or not h.first_losses:
        return None
    window = slice(len(h.steps) - t.window, len(h.steps))
    vals = h.loss[window][h.loss_seen[window] & np.isfinite(h.loss[window])]
    early = float(np.median([v for _, v in h.first_losses]))
    if len(vals) < 3 or not math.isfinite(early):
        return None
    c = loss_course(h, t, vals, early)
    if c.learned:
        return None  # it learned and flattened: converging, not stalled
    # Down by more than one standard error but less than the noise: maybe a slow descent that the noise hides
    drifting = c.noise / SIGNIFICANT < c.start - c.now < c.noise
    # (Once reported, a stall stays until the run learns: the wait must not clear it and raise it again.)
    if (drifting and "stalled" not in active and c.start_steps is not None
            and int(h.steps[-1]) - c.start_steps[1] < SETTLE * t.window):
        return None  # too soon after the start level to tell a slow, noisy descent from none (see SETTLE)
    mean, spread = c.now, float(np.std(vals))
    update = window_update(h, t)
    _, _, flow, _ = layer_flow(h, t.window)
    ev: dict[str, float] = {"loss_mean": mean, "loss_spread": spread, "progress": prog, "early_loss": early,
                            "start_loss": c.start, "best_loss": c.best, "window_steps": float(t.window)}
    if math.isfinite(update):
        ev["median_update_ratio"] = update
    if flow is not None:
        ev["early_late_grad_ratio"] = float(flow)
    likely, remedies = _cause(c, update, mean, spread)
    where = (f"steps {c.start_steps[0]}\u2013{c.start_steps[1]}" if c.start_steps is not None
             else "the first steps")
    change = 100 * (c.start - mean) / abs(c.start) if c.start else 0.0
    if c.gave_back:
        course = (f"It had come down from {c.start:.4g} ({where}) to {c.best:.4g} and gave "
                  f"{100 * (mean - c.best) / (c.start - c.best):.0f}% of that back.")
    elif change > 0:
        noise = 100 * c.noise / abs(c.start)
        why = (f"within its batch-to-batch noise (\u00b1{noise:.2g}%)" if change < noise else
               f"under the {100 * LEARNED:.0f}% that counts as learning")
        course = f"Since its first steps it came down by {change:.2g}% (from {c.start:.4g}, median of {where}), {why}."
    else:
        course = f"It stands {-change:.2g}% above where it was after its first steps ({c.start:.4g}, {where})."
    msg = (f"Training has stalled: over the last {t.window} steps the loss {loss_change(prog)} (mean {mean:.4g}). "
           f"{course} Ruled out: non-finite values, exploding and vanishing gradients, dead and saturated units "
           f"(where sampled). {likely}")
    return Verdict(("stalled",), ("stalled",),
                   Diagnosis("stalled", "warning", int(h.steps[-1]), [], msg, ev, remedies))


def _cause(c: Course, update: float, mean: float, spread: float) -> tuple[str, list[str]]:
    """What most likely holds the run back, claiming only what was measured, and the remedies."""
    lower = ["lower the learning rate (3-10x) or decay it", "a larger batch evens the swings"]
    if math.isfinite(update) and update > HIGH_UPDATE:
        swings = f"; the loss swings around {mean:.4g} (spread {spread:.3g})" if spread > 0.1 * abs(mean) else ""
        return (f"The steps are large: each moves the weights by {update:.2g} of their norm (median over layers and "
                f"sampled steps; healthy training sits near 1e-3){swings}. The learning rate is most likely too high: "
                "the run bounces across the valley instead of descending into it.", lower)
    if math.isfinite(update) and update < LOW_UPDATE:
        return (f"The weights barely move: each step changes them by {update:.2g} of their norm (median over layers "
                "and sampled steps; healthy training sits near 1e-3). The learning rate is most likely too low.",
                ["raise the learning rate (10x, then adjust)", "check that the scheduler did not decay it to ~0"])
    size = (f"the updates are of a usual size ({update:.2g} of the weights per step, median; healthy near 1e-3)"
            if math.isfinite(update) else
            f"update sizes were not measured ({UNMEASURED})")
    if c.rose or c.gave_back:
        what = "rose over the window" if c.rose else "gave back its progress"
        return (f"The loss {what} while {size}: a learning rate too high for this stage of training is the "
                "likeliest cause (a schedule that raised it, or no decay).", lower[:1] + [
                    "check what changed when the loss turned (the data order, a schedule, a resumed optimizer)"])
    check = "check the labels and the loss against the output layer (a target the output cannot reach)"
    if math.isfinite(update):
        return (f"Gradients flow and {size}, so this is a plateau: a saddle, saturated output logits, or the long "
                "plateau of an identity-initialised recurrent network.",
                ["a learning-rate schedule (warmup, then decay)",
                 "normalisation (LayerNorm/BatchNorm) or another initialisation", check])
    return (f"Gradients flow, but {size}, so whether the learning rate is too low or too high is not known.",
            ["try the learning rate 10x higher and 10x lower for a few hundred steps and keep the one whose loss "
             "falls", "normalisation (LayerNorm/BatchNorm) or another initialisation", check])


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

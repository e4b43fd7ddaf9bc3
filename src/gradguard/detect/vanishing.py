"""``vanishing``: gradients too small to train the early layers (through depth) or the early steps (through time).

Three kinds of evidence, each gated on a lack of progress in the loss so that a healthy deep net, or an LSTM
whose gradients look small at initialisation but which learns, raises nothing:

- ratio: early layers' RMS gradient orders of magnitude below the late layers' (classic deep sigmoid nets);
- absolute: even the layer that moves most changes its weights by a negligible fraction per step (uniform
  vanishing, where the ratio looks fine: a deep ReLU net with Var(w)=1/n);
- through time: the gradient reaching the first time steps of a recurrent layer's input is orders of magnitude
  below what reaches the last ones.

Room: the judge. It may touch: ``detect``, ``types``.
"""

from __future__ import annotations

import numpy as np

from ..types import Diagnosis
from .flow import layer_flow, update_ratios
from .history import History, Thresholds, explained_by_explosion, loss_stalled, nanmedian
from .reporter import Verdict

REMEDIES_DEPTH = [
    "use a ReLU-family activation (ReLU, LeakyReLU, GELU) instead of sigmoid/tanh in hidden layers: "
    "gradguard.swap_activations(model) then gradguard.reinit(model, 'kaiming'); gradguard.doctor(...) tries the "
    "candidates in short runs and ranks them",
    "initialise with the gain of the activation that follows each layer: Kaiming for ReLU, Xavier for tanh "
    "(gradguard.reinit(model, 'kaiming')), or data-driven LSUV (gradguard.reinit(model, 'lsuv', data=x))",
    "add normalisation (BatchNorm/LayerNorm) or residual connections",
]
REMEDIES_TIME = [
    "use a gated recurrent layer (LSTM/GRU) instead of a plain RNN; for an LSTM set the forget-gate bias to 1",
    "initialise recurrent weights orthogonally or as the identity with ReLU (IRNN, Le et al. 2015): "
    "gradguard.reinit(model, 'orthogonal') or gradguard.reinit(model, 'identity')",
    "shorten the sequences the gradient must cross (truncated BPTT, attention, or a reversed input order)",
]


def detect_vanishing(h: History, t: Thresholds, active: bool = True) -> Verdict | None:
    """Window verdict on vanishing gradients, through time first (the most specific), then depth.

    Args:
        h: the history; t: thresholds.
        active: whether a vanishing condition may be active (the judge knows). When none is and the loss is
            still improving, the evidence can only give a verdict that raises nothing: it is not computed.

    Returns:
        A verdict or None.

    References:
        Hochreiter, "Untersuchungen zu dynamischen neuronalen Netzen", 1991; Bengio, Simard & Frasconi, "Learning
        long-term dependencies with gradient descent is difficult", 1994; Glorot & Bengio, "Understanding the
        difficulty of training deep feedforward neural networks", AISTATS 2010.
    """
    if len(h.steps) < t.window:
        return None
    stalled, prog = loss_stalled(h, t)
    if not stalled and not active:
        return None  # the verdict below would be emit=False, which keeps only an active condition alive
    # Without an observed loss the gate cannot see progress: ask for 10x stronger evidence instead.
    strict = 1.0 if prog is not None else 0.1
    step = int(h.steps[-1])
    prog_ev = {"loss_progress": prog} if prog is not None else {}
    prog_txt = ""
    if prog is not None:
        prog_txt = (f" The loss improved by only {100 * prog:.1f}% over the last {t.window} steps." if prog > 0
                    else f" The loss has not improved over the last {t.window} steps.")
    v = _evidence(h, t, strict, step, prog_ev, prog_txt)
    if v is not None and not stalled:
        # Learning goes on despite the evidence (an LSTM early in training): keep an active condition alive so a
        # flickering gate does not re-report it, but raise nothing new.
        return Verdict(v.key, v.signature, v.diagnosis, emit=False)
    if v is not None and explained_by_explosion(h, t) is not None:
        # The run stalls above the loss it had before a reported explosion: the saturated units and the vanished
        # gradient are that explosion's damage (a tanh RNN thrown over Pascanu et al.'s cliff), and its remedy is
        # the explosion's (clip, lower the learning rate), not a gated cell or another initialisation. Raise
        # nothing new; the exploding diagnosis already said what happened.
        return Verdict(v.key, v.signature, v.diagnosis, emit=False)
    return v


def _evidence(h: History, t: Thresholds, strict: float, step: int, prog_ev: dict[str, float],
              prog_txt: str) -> Verdict | None:

    v = _through_time(h, t, strict, step, prog_ev, prog_txt)
    if v is not None:
        return v

    early, late, ratio, rms = layer_flow(h, t.window)
    ratio_hit = ratio is not None and ratio < t.vanish_ratio * strict
    # The update across the weights: weight decay's uniform shrinking is movement, not learning (EXPERIMENTS.md F6).
    upd = update_ratios(h, 3, orthogonal=True)
    med_upd = float(np.max(nanmedian(upd, axis=1))) if upd is not None else None
    abs_hit = med_upd is not None and med_upd < t.vanish_update * strict
    whole = update_ratios(h, 3) if abs_hit else None
    med_whole = float(np.max(nanmedian(whole, axis=1))) if whole is not None else None
    if not (ratio_hit or abs_hit):
        return None
    tot = float(np.median(h.total[-t.window:]))
    ev: dict[str, float] = {"total_grad_norm": tot, **prog_ev}
    if med_upd is not None:
        ev["median_update_ratio"] = med_upd
    if ratio is not None:
        ev["early_late_ratio"] = ratio
    abs_txt = ""
    if abs_hit and med_upd is not None:
        abs_txt = (f" Half the layers change their weights by less than {med_upd:.2g} of their norm per step (healthy "
                   "training sits near 1e-3), so they effectively do not learn." if med_upd > 0 else
                   " Half the layers do not change their weights at all.")
        if med_whole is not None and med_whole >= t.vanish_update * strict:
            ev["median_update_ratio_with_decay"] = med_whole
            abs_txt += (f" (Counting the uniform shrinking of weight decay they move by {med_whole:.2g}: the decay "
                        "moves them, the gradient does not.)")
    if ratio_hit:
        assert ratio is not None
        late_rms = float(np.median([rms[h.layers.index(n)] for n in late]))
        rel = {n: float(rms[i]) / late_rms for i, n in enumerate(h.layers)
               if not h.embedding[i] and np.isfinite(rms[i])}
        layers = sorted((n for n, r in rel.items() if r < t.vanish_ratio * strict), key=lambda n: rel[n]) or early
        ev["min_layer_ratio"] = rel[layers[0]]
        msg = (f"Vanishing gradients through depth: the early layers receive {_times(ratio)} the gradient of the last "
               f"layers (RMS per element, median over {t.window} steps; {rel[layers[0]]:.2g}x for '{layers[0]}'). "
               f"The early layers have effectively stopped learning.{abs_txt}{prog_txt}")
        return Verdict(("vanishing", "depth"), ("depth",),
                       Diagnosis("vanishing", "warning", step, layers, msg, ev, list(REMEDIES_DEPTH)))
    assert upd is not None and med_upd is not None
    latest = upd[-1]
    order = np.argsort(np.nan_to_num(latest, nan=np.inf))
    layers = [h.layers[i] for i in order if np.isfinite(latest[i]) and latest[i] < t.vanish_update * strict]
    msg = (f"Vanishing gradients everywhere: the gradient ratio between layers looks normal, but the total "
           f"gradient norm is only {tot:.2g}.{abs_txt}{prog_txt}")
    return Verdict(("vanishing", "absolute"), ("absolute",),
                   Diagnosis("vanishing", "warning", step, layers, msg, ev, list(REMEDIES_DEPTH)))


def _through_time(h: History, t: Thresholds, strict: float, step: int, prog_ev: dict[str, float],
                  prog_txt: str) -> Verdict | None:
    lo = int(h.steps[0])
    by_module: dict[str, list[tuple[float, int]]] = {}
    for s, name, early, late, steps in h.times:
        if s >= lo and late > 0:
            by_module.setdefault(name, []).append((early / late, steps))
    worst: tuple[str, float, int] | None = None
    for name, recs in by_module.items():
        if len(recs) < 2:
            continue
        ratio = float(np.median([r for r, _ in recs[-3:]]))
        if ratio < t.time_ratio * strict and (worst is None or ratio < worst[1]):
            worst = (name, ratio, recs[-1][1])
    if worst is None:
        return None
    name, ratio, steps = worst
    msg = (f"Vanishing gradients through time in '{name}': the first 10% of its {steps} time steps receive "
           f"{_times(ratio)} the gradient that reaches the last 10%. The start of each sequence has no influence on "
           f"learning, so long-range dependencies cannot be learned.{prog_txt}")
    ev = {"early_late_time_ratio": ratio, "time_steps": float(steps), **prog_ev}
    return Verdict(("vanishing", "time"), ("time", name),
                   Diagnosis("vanishing", "warning", step, [name], msg, ev, list(REMEDIES_TIME)))


def _times(ratio: float) -> str:
    """'3.2e-05x', or words for a ratio that underflowed to zero in fp32."""
    return f"{ratio:.2g}x" if ratio > 0 else "a vanishing fraction (below fp32 range) of"

"""``dead_units`` and ``saturation``, from activation samples taken every ``sample_every`` steps."""

from __future__ import annotations

import numpy as np

from ..types import Diagnosis, Severity
from .history import History, Thresholds, loss_stalled
from .reporter import Verdict

DEAD_REMEDIES = [
    "lower the learning rate: one large step can push a ReLU's pre-activations below zero for every input",
    "use LeakyReLU/GELU/ELU, which keep a gradient for negative inputs",
    "re-initialise the layer before it (Kaiming, zero or small positive bias) or add BatchNorm before the ReLU",
]
SAT_REMEDIES = [
    "scale the initial weights down (Xavier/Glorot with the activation's gain: gradguard.reinit(model, 'xavier'))",
    "normalise the inputs of the layer (standardise features, BatchNorm/LayerNorm before the activation)",
    "use a non-saturating activation (ReLU family) in hidden layers",
]


def detect_units(h: History, t: Thresholds) -> list[Verdict]:
    """One verdict per activation module whose condition held in the last ``persist_samples`` samples.

    The activation that produces the model's output (the last one called, when no layer with parameters comes
    after it) is not judged for saturation: a confident sigmoid output is the goal of training there, not a fault.
    The top hidden layer, followed by a linear head, is judged (Glorot & Bengio's saturating layer).

    Saturation is either of: at least ``saturated_fraction`` of the outputs where the slope is under 1% of its
    peak (on its own: that layer passes almost no gradient); or a mean slope under ``saturated_slope`` of the peak
    while the loss stalls (a layer pushed toward an asymptote, outputs mostly outside the extreme tail, that starves
    the layers below it; without the stall such a layer may be a trained one that encodes confident features).

    Args:
        h: the history (its ``acts`` samples); t: thresholds.

    Returns:
        One verdict per activation module and call whose condition holds.

    References:
        Lu et al., "Dying ReLU and Initialization: Theory and Numerical Examples", 2019. Glorot & Bengio, AISTATS
        2010 (sigmoid saturation in deep networks).
    """
    last_act = h.output_activation
    is_stalled, prog = loss_stalled(h, t) if len(h.steps) >= t.window else (False, None)
    stalled = is_stalled and prog is not None  # a stall needs an observed loss
    out: list[Verdict] = []
    n = t.persist_samples
    ncalls: dict[tuple[str, str], int] = {}
    for name, _, what in h.acts:
        ncalls[(name, what)] = ncalls.get((name, what), 0) + 1
    for (name, call, what), recs in h.acts.items():
        recent = list(recs)[-n:]
        if len(recent) < n or len({s for s, _ in recent}) < n:
            continue  # persistence means n different sampled steps
        step = recent[-1][0]
        prev = _preceding_layer(h, name)
        layers = [name] + ([prev] if prev else [])
        calls = ncalls[(name, what)]
        where = f"'{name}'" + (f" (call {call + 1} of {calls} in a forward pass)" if calls > 1 else "")
        key = (name, str(call))
        if what == "active":
            units = recent[0][1][0]
            if any(v[0] != units for _, v in recent):
                continue
            # Dead = not active for any sample of any of the last n sampled batches: the OR of the packed masks
            # as one Python integer (the padding bits of packbits are 0), its set bits counted. Runs at each new
            # sample; a few integer operations instead of unpacking, stacking and reducing arrays.
            alive = 0
            for _, (_, packed) in recent:
                alive |= int.from_bytes(packed.tobytes(), "big")
            frac = 1.0 - alive.bit_count() / units
            if frac < t.dead_fraction:
                continue
            sev: Severity = "error" if frac >= 0.9 else "warning"
            msg = (f"{100 * frac:.0f}% of the units after {where} never activate (output 0 for every sample of "
                   f"the last {n} sampled batches). Dead units pass no gradient, so their incoming weights never "
                   "update again; the layer has lost that much capacity.")
            out.append(Verdict(("dead_units", *key), (sev,), Diagnosis(
                "dead_units", sev, step, layers, msg, {"dead_fraction": frac, "units": float(units),
                                                       "samples": float(n)}, list(DEAD_REMEDIES))))
        elif what == "saturated" and name != last_act:
            flat = np.array([v[0] for _, v in recent])
            slope = np.array([v[1] for _, v in recent])
            frac = float(flat[-1])
            ev = {"saturated_fraction": frac, "relative_slope": float(slope[-1]), "samples": float(n)}
            if flat.min() >= t.saturated_fraction:
                msg = (f"{100 * frac:.0f}% of the outputs of {where} sit on the flat part of the curve, where its "
                       f"slope is under 1% of its peak (last {n} sampled batches). Gradients through it are squashed "
                       "toward zero, so the layers before it learn very slowly.")
            elif slope.max() < t.saturated_slope and stalled:
                # Glorot & Bengio's top hidden layer: pushed toward 0 (mean outputs 0.01-0.04), few outputs in
                # the extreme tail, yet its mean slope is a tenth of the peak, and the loss stalls meanwhile.
                msg = (f"The outputs of {where} sit far from the steep middle of the curve: on average its slope is "
                       f"{100 * float(slope[-1]):.0f}% of its peak (last {n} sampled batches), while the loss has "
                       f"not improved over the last {t.window} steps. The layer passes on only that share of the "
                       "gradient, so the layers before it barely learn.")
            else:
                continue
            out.append(Verdict(("saturation", *key), ("warning",), Diagnosis(
                "saturation", "warning", step, layers, msg, ev, list(SAT_REMEDIES))))
    return out


def _preceding_layer(h: History, activation: str) -> str | None:
    """The parameterised layer just before ``activation`` in its parent (e.g. 'net.2' for 'net.3'), if any."""
    parent, _, leaf = activation.rpartition(".")
    if not leaf.isdigit():
        return None
    for i in range(int(leaf) - 1, -1, -1):
        cand = f"{parent}.{i}" if parent else str(i)
        if cand in h.layers:
            return cand
    return None

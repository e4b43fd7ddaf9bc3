"""``dead_units`` and ``saturation``, from activation samples taken every ``sample_every`` steps; and ``dead_units``
from the gradients alone, where no activation module can be sampled (ReLU called as a function).

Room: the judge. It may touch: ``detect``, ``types``.
"""

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
FLOW_REMEDIES = [
    "restart from a checkpoint taken before the units died, at a lower learning rate: the net cannot leave this "
    "state on its own",
    *DEAD_REMEDIES,
]
# A layer is dead when its gradient has been exactly 0 at every one of at least this fraction of the window's last
# steps. A living layer's gradient is never exactly 0 (a sum of many products); dead ReLUs feeding it make it 0 at
# every step.
ZERO_RUN = 0.5
FLOW_KEY = ("dead_units", "gradient flow")
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


def detect_dead_flow(h: History, t: Thresholds, known: bool = False, saturating: bool = False) -> Verdict | None:
    """Layers whose gradient has been exactly 0 at each of the last ``ZERO_RUN * t.window`` steps or more, after a
    start with gradient, while the loss does not improve: the ReLU units next to them output 0 for every input.

    The activation samples see this only through activation modules; a model that calls ``F.relu`` has none, and
    after a learning rate far too high it can die whole (pytorch/examples' mnist at 100x: conv and fc gradients
    exactly 0 and the loss at ln 10 for five epochs). The window rules then read it as vanishing gradients, or as
    the explosion's damage, whose remedy (a lower rate) no longer helps: nothing flows to learn from.

    Left out: a layer never had a gradient (absent, or 0 from the first steps: an unused branch under
    ``zero_grad(set_to_none=False)``), a loss that still improves or has converged (a fitted hinge loss), and a
    model whose ReLU modules are sampled: there the samples name the dead units themselves, and the vanishing
    gradient behind them is reported as theirs (``advice``), so a report from the gradients would only repeat them;
    and a model with sigmoid/tanh-like activations, where a gradient can also vanish below float32's range to 0.

    Args:
        h: the history; t: thresholds. known: the condition is active (reported, not yet gone): while the layers
            stay dead it is kept alive even where the loss gate flickers (the head alone still learning a little).
        saturating: the model has saturating activations (``ModelFacts.saturating``): the rule does not apply.

    Returns:
        A ``dead_units`` verdict naming the dead layers (forward order), or None.

    References:
        Lu et al., "Dying ReLU and Initialization: Theory and Numerical Examples", 2019.
    """
    if (saturating or len(h.steps) < t.window or len(h.first_grads) < 3
            or any(what == "active" for _, _, what in h.acts)):
        return None
    stalled, prog = loss_stalled(h, t)
    if prog is None or not (stalled or known):  # without an observed loss a dead net and a perfect fit look alike
        return None
    g = h.grad[-t.window:]
    first = np.stack(h.first_grads)
    alive_at_start = ((first > 0).sum(axis=0) >= 2).tolist()  # a gradient in most of the first steps
    run = (g[::-1] == 0.0).cumprod(axis=0).sum(axis=0).tolist()  # trailing steps exactly 0 (ABSENT, -1, is not)
    dead = [i for i in range(len(h.layers)) if run[i] >= ZERO_RUN * len(g) and alive_at_start[i]]
    if not dead:
        return None
    n_zero = min(run[i] for i in dead)
    names = [h.layers[i] for i in dead]
    sev: Severity = "error" if len(dead) * 2 >= len(h.layers) or dead[0] == 0 else "warning"
    shown = ", ".join(f"'{n}'" for n in names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    when = (f"at every one of the last {n_zero} steps" if n_zero == len(g) else
            f"at every step since step {int(h.steps[-n_zero])} ({n_zero} steps)")
    msg = (f"No gradient reaches {shown}: {'its' if len(names) == 1 else 'their'} gradient has been exactly 0 {when}, "
           f"and the loss has stopped improving. The ReLU units next to {'it' if len(names) == 1 else 'them'} "
           f"output 0 for every input (dead), so no gradient passes and these weights never update again; the run "
           "cannot recover by itself.")
    ev = {"dead_layers": float(len(dead)), "zero_steps": float(n_zero), "loss_progress": prog}
    return Verdict(FLOW_KEY, (sev,), Diagnosis("dead_units", sev, int(h.steps[-1]), names, msg, ev,
                                               list(FLOW_REMEDIES)), emit=stalled)


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

"""``nonfinite``: NaN or Inf in the loss or in a gradient.

Room: the judge. It may touch: ``detect``, ``stats.norms``, ``stats.sentinel``, ``types``.
"""

from __future__ import annotations

import numpy as np

from ..stats.norms import ABSENT
from ..stats.sentinel import Origin
from ..types import Diagnosis, Severity
from .history import History
from .reporter import Verdict

REMEDIES = [
    "skip non-finite steps automatically, optimizer state untouched: Guard(model, optimizer, repair='auto')",
    "lower the learning rate, or clip gradients (Guard(clip=1.0)) if exploding came first",
    "guard the op that produced it: add an epsilon inside log/sqrt/division, clamp exp inputs",
    "under fp16 use torch.amp.GradScaler, or train in bf16",
]


def detect_nonfinite(h: History, row: int, origin: Origin | None) -> Verdict | None:
    """Verdict for the step at ``row`` of the history, or None when it is finite.

    Args:
        h: the history.
        row: index of the step's row.
        origin: where a replay of that step's forward found the first non-finite value, when one was done.

    Returns:
        The verdict; ``layers`` puts the origin first, then the layers whose gradients are non-finite, the one
        latest in forward order first (backward visits it first, so it is where a backward-born NaN starts).
    """
    assert h.grad is not None
    g = h.grad[row]
    bad = ~np.isfinite(g)
    loss_bad = bool(h.loss_seen[row] and not np.isfinite(h.loss[row]))
    if not bad.any() and not loss_bad:
        return None
    step = int(h.steps[row])
    bad_layers = [h.layers[i] for i in np.flatnonzero(bad)[::-1]]
    layers: list[str] = []
    where = ""
    if origin is not None:
        shown = origin.module or "the model input"
        layers.append(origin.module)
        where = {
            "input": " The input batch itself contains NaN/Inf: check the data pipeline.",
            "parameters": f" The parameters of '{shown}' are already non-finite (an earlier update corrupted them).",
            "output": f" It first appears in the forward pass at the output of '{shown}', whose inputs were finite.",
            "between": f" It first appears in the forward pass inside '{shown}', in code between its submodules.",
        }[origin.reason]
    elif loss_bad or len(bad_layers) == int((g != ABSENT).sum()):  # every layer that had a gradient
        where = (" Every gradient is non-finite, so it was born in the forward pass; construct the Guard with "
                 "nonfinite_check='step' to replay the step and name the module (one small sync per step).")
    elif bad_layers:
        where = f" It was born in the backward pass, at or after '{bad_layers[0]}' in forward order."
    layers += [n for n in bad_layers if n not in layers]
    what = []
    if loss_bad:
        what.append(f"the loss is {h.loss[row]}")
    if bad.any():
        what.append(f"{int(bad.sum())} of {len(h.layers)} layers have non-finite gradients")
    msg = (f"Non-finite values at step {step}: {' and '.join(what)}. An optimizer step with them writes NaN into the "
           f"weights and every later step is lost.{where}")
    evidence = {"total_grad_norm": float(h.total[row]), "nonfinite_layers": float(bad.sum())}
    if h.loss_seen[row]:  # a loss never observed is left out, not reported as NaN
        evidence["loss"] = float(h.loss[row])
    severity: Severity = "error"
    d = Diagnosis("nonfinite", severity, step, layers, msg, evidence, list(REMEDIES))
    # One signature while it lasts: NaN weights after the first bad step are its consequence, not news.
    return Verdict(("nonfinite",), (), d)

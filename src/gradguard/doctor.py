"""``gradguard.doctor``: which fix works? Candidate remedies tried in short trial runs, ranked with evidence.

Given a function that builds a fresh model and optimizer, a function that trains them for a few steps on the
user's data, and (optionally) the diagnosis to treat, each candidate is applied to a fresh model, trained with a
Guard attached, and judged by its loss and its gradient flow. The untreated model runs too, as the reference.

Room: above the Guard. It may touch: ``detect.flow``, ``guard``, ``repair.structural``, ``types``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .detect.flow import layer_flow
from .guard import Guard
from .repair.structural import reinit, swap_activations
from .types import Diagnosis

Remedy = Callable[[nn.Module], list[str]]
Build = Callable[[], tuple[nn.Module, torch.optim.Optimizer]]
Train = Callable[[nn.Module, torch.optim.Optimizer], "Sequence[float] | float"]


@dataclass
class Trial:
    """One candidate's short run.

    Attributes:
        name: the remedy. changed: modules it changed. losses: what ``train`` returned.
        final_loss: mean of the last tenth of the losses. progress: relative improvement from the first tenth.
        flow_ratio: early-layer / late-layer RMS gradient over the run (1 is even flow; 1e-6 is vanishing).
        diagnoses: kinds gradguard reported during the trial. repairs: what the repair ladder had to do.
        model: the trained model, to evaluate further.
    """

    name: str
    changed: list[str]
    losses: list[float]
    final_loss: float
    progress: float
    flow_ratio: float | None
    diagnoses: list[str] = field(default_factory=list)
    repairs: list[str] = field(default_factory=list)
    model: nn.Module | None = None

    def __str__(self) -> str:
        flow = f"{self.flow_ratio:.2g}" if self.flow_ratio is not None else "-"
        return (f"{self.name}: final loss {self.final_loss:.4g} (progress {100 * self.progress:.0f}%), gradient "
                f"flow early/late {flow}, diagnoses: {', '.join(self.diagnoses) or 'none'}"
                + (f", repairs: {', '.join(self.repairs)}" if self.repairs else ""))


def _swap_then(new: type[nn.Module], scheme: str) -> Remedy:
    def remedy(model: nn.Module) -> list[str]:
        return swap_activations(model, (nn.Sigmoid, nn.Tanh), new) + reinit(model, scheme)
    return remedy


def candidates_for(diagnosis: Diagnosis | None, data: torch.Tensor | None = None) -> dict[str, Remedy]:
    """The remedies worth trying for a diagnosis (all structural ones when there is none)."""
    kind = diagnosis.kind if diagnosis is not None else None
    through_time = diagnosis is not None and "through time" in diagnosis.message
    out: dict[str, Remedy] = {}
    if through_time:
        out["orthogonal recurrent weights (LSTM forget bias 1)"] = lambda m: reinit(m, "orthogonal")
        out["identity recurrent weights + ReLU (IRNN)"] = lambda m: reinit(m, "identity")
        return out
    if kind in (None, "vanishing", "saturation", "dead_units"):
        out["ReLU + Kaiming init"] = _swap_then(nn.ReLU, "kaiming")
        out["LeakyReLU + Kaiming init"] = _swap_then(nn.LeakyReLU, "kaiming")
        out["GELU + Kaiming init"] = _swap_then(nn.GELU, "kaiming")
    out["Kaiming init (gain of each layer's activation)"] = lambda m: reinit(m, "kaiming")
    out["Xavier init (gain of each layer's activation)"] = lambda m: reinit(m, "xavier")
    if data is not None:
        out["LSUV init"] = lambda m: reinit(m, "lsuv", data=data)
    return out


def doctor(build: Build, train: Train, diagnosis: Diagnosis | None = None, *,
           candidates: dict[str, Remedy] | None = None, data: torch.Tensor | None = None,
           seed: int = 0, repair: bool = True) -> list[Trial]:
    """Try remedies in short trials and rank them, best first (the untreated run is among them).

    Args:
        build: returns a fresh ``(model, optimizer)``; called once per trial.
        train: trains them a few steps on the user's data; returns the per-step losses (or a final loss).
        diagnosis: what to treat (picks the candidates); None tries every structural remedy.
        candidates: name -> function changing a model in place and returning what it changed (overrides).
        data: a batch of inputs, enables LSUV.
        seed: every trial starts from this torch seed, so they differ only by the remedy.
        repair: run each trial with ``repair="auto"``, so a structural fix is not ruled out by a learning rate
            tuned for the broken model (a ReLU net often wants a smaller one than a sigmoid net); the ladder's
            actions are listed in the trial.

    Returns:
        Trials ranked by final loss (lower first), then by progress.

    References:
        The remedies' own references (``gradguard.repair.structural``).
    """
    trials = []
    remedies: dict[str, Remedy | None] = {"untreated": None}
    remedies.update(candidates if candidates is not None else candidates_for(diagnosis, data))
    for name, remedy in remedies.items():
        torch.manual_seed(seed)
        model, optimizer = build()
        changed = remedy(model) if remedy is not None else []
        guard = Guard(model, optimizer, console=False, repair="auto" if repair else False)
        try:
            out = train(model, optimizer)
            history = guard.history
            kinds = sorted({d.kind for d in guard.diagnoses})
            actions = sorted({a.kind for a in guard.actions if a.kind != "clip"})
        finally:
            guard.close()
        losses = [float(out)] if isinstance(out, (int, float)) else [float(v) for v in out]
        k = max(1, len(losses) // 10)
        first, last = float(np.mean(losses[:k])), float(np.mean(losses[-k:]))
        final = last if math.isfinite(last) else math.inf
        progress = (first - last) / abs(first) if len(losses) > 1 and math.isfinite(first) and first else 0.0
        flow = None
        if history is not None and len(history.steps) >= 2:
            flow = layer_flow(history, min(len(history.steps), 100))[2]
        trials.append(Trial(name, changed, losses, final, progress if math.isfinite(progress) else -math.inf,
                            flow, kinds, actions, model))
    return sorted(trials, key=lambda t: (t.final_loss, -t.progress))

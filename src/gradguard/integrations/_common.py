"""What the framework adapters share: turning gradguard's sink records into flat metric dicts, finding the torch
optimizer inside a framework's wrapper, and the results every callback exposes. Imports nothing beyond torch.

Room: above the Guard. It may touch: ``guard``, ``types``.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, TextIO

import torch

if TYPE_CHECKING:
    from ..guard import Guard
    from ..types import Action, Diagnosis

PREFIX = "gradguard/"

# Fields of a stats record that are one number each (see gradguard.report.sinks for the schema).
_SCALARS = ("total_grad_norm", "total_grad_norm_max", "grad_norm_mean", "grad_norm_std", "loss", "loss_mean",
            "loss_std")


def _number(value: Any) -> float | None:
    """A metric value, or None when there is none. Non-finite values are kept: hiding NaN is what gradguard
    exists to stop, and every logger the adapters feed accepts them."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def stats_metrics(record: dict[str, Any], layers: bool = True) -> dict[str, float]:
    """Flat metrics from one ``{"type": "stats", ...}`` record.

    Args:
        record: a stats record as a Guard's sinks receive it.
        layers: also return ``gradguard/grad_norm/<layer>`` for every layer that had a gradient.

    Returns:
        ``{"gradguard/total_grad_norm": ..., "gradguard/loss": ..., ...}``; fields without a value (no loss
        observed, a layer without gradient) are left out rather than logged as zero.
    """
    out: dict[str, float] = {}
    for key in _SCALARS:
        v = _number(record.get(key))
        if v is not None:
            out[PREFIX + key] = v
    if layers:
        for name, value in (record.get("grad_norm") or {}).items():
            v = _number(value)
            if v is not None:
                out[f"{PREFIX}grad_norm/{name}"] = v
    return out


class GuardResults:
    """What a framework callback exposes of its Guard, readable during and after the run."""

    guard: Guard | None

    @property
    def diagnoses(self) -> list[Diagnosis]:
        """Every diagnosis of the last run, in the order found (readable after training ended)."""
        return self.guard.diagnoses if self.guard is not None else []

    @property
    def actions(self) -> list[Action]:
        """What gradguard did to the last run (clips, and with ``repair="auto"`` skips, backoffs, rollbacks); the
        most recent ones, see ``Guard.actions``."""
        return self.guard.actions if self.guard is not None else []

    @property
    def action_counts(self) -> dict[str, int]:
        """How many actions of each kind the last run took (all of them)."""
        return self.guard.action_counts if self.guard is not None else {}


class Counts:
    """Running counts of diagnoses and actions by kind, as metrics (``gradguard/diagnoses/<kind>``,
    ``gradguard/diagnoses``, ``gradguard/actions/<kind>``)."""

    def __init__(self) -> None:
        self.diagnoses: dict[str, int] = {}
        self.actions: dict[str, int] = {}

    def add(self, record: dict[str, Any]) -> bool:
        """Count a diagnosis or action record.

        Args:
            record: any sink record.

        Returns:
            Whether it was a diagnosis or an action (and so changed the counts).
        """
        kind = str(record.get("kind"))
        if record.get("type") == "diagnosis":
            self.diagnoses[kind] = self.diagnoses.get(kind, 0) + 1
            return True
        if record.get("type") == "action":
            self.actions[kind] = self.actions.get(kind, 0) + 1
            return True
        return False

    def metrics(self) -> dict[str, float]:
        """The counts so far as metrics (empty before the first diagnosis or action)."""
        out: dict[str, float] = {f"{PREFIX}diagnoses/{k}": float(n) for k, n in self.diagnoses.items()}
        if self.diagnoses:
            out[PREFIX + "diagnoses"] = float(sum(self.diagnoses.values()))
        out.update({f"{PREFIX}actions/{k}": float(n) for k, n in self.actions.items()})
        return out


def diagnosis_text(record: dict[str, Any]) -> str:
    """A diagnosis record as a short Markdown paragraph (for TensorBoard's text tab).

    Args:
        record: a ``{"type": "diagnosis", ...}`` record.

    Returns:
        The kind, severity, step and layers on one line, then the message and the first remedy.
    """
    head = f"**{record.get('kind')}** ({record.get('severity')}) at step {record.get('step')}"
    layers = list(record.get("layers") or [])
    if layers:
        head += " in " + ", ".join(f"`{n}`" for n in layers[:5]) + (", ..." if len(layers) > 5 else "")
    lines = [head, "", str(record.get("message", ""))]
    remedies = record.get("remedies") or []
    if remedies:
        lines += ["", f"fix: {remedies[0]}"]
    return "\n".join(lines)


def inner_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer that takes the step, looking through wrappers that keep it as ``.optimizer``
    (accelerate's ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer`` keeps ``._optimizer``).

    Args:
        optimizer: a torch optimizer or a framework's wrapper of one.

    Returns:
        The innermost ``torch.optim.Optimizer``: the one whose step hooks fire when the parameters change.

    Raises:
        TypeError: no torch optimizer was found inside.
    """
    current = optimizer
    for _ in range(8):  # a wrapper of a wrapper is possible; a cycle is not worth hanging on
        inner = getattr(current, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            inner = getattr(current, "_optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer) or inner is current:
            break
        current = inner
    if not isinstance(current, torch.optim.Optimizer):
        raise TypeError(f"gradguard needs a torch.optim.Optimizer; found {type(optimizer).__name__}")
    return current


def notice(console: bool | TextIO, text: str) -> None:
    """Say something once, where the Guard's console prints (stderr, or the stream given as ``console=``);
    nothing when ``console`` is False.

    Args:
        console: the ``console`` option given to the adapter.
        text: one line, without the ``[gradguard]`` prefix.
    """
    if console is False:
        return
    print(f"[gradguard] {text}", file=sys.stderr if console is True else console, flush=True)

"""Report a condition once, and again only when it changes or comes back after going away.

Room: the judge. It may touch: ``types``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..types import Diagnosis


@dataclass(frozen=True)
class Verdict:
    """A detector's finding at one evaluation: ``key`` names the condition, ``signature`` what it looks like now."""

    key: tuple[str, ...]
    signature: tuple[Any, ...]
    diagnosis: Diagnosis
    #: False when the evidence holds but a gate (e.g. the loss is still improving) says not to raise it: an
    #: already-active condition stays active (no re-report when the gate flickers), a new one is not raised.
    emit: bool = True


class Reporter:
    """Deduplicates verdicts.

    A verdict is new when its condition (``key``) is not active, or is active with another signature (it changed:
    other layers, higher severity). A condition unseen for ``cooldown`` steps is gone; seen again, it is reported.
    """

    def __init__(self, cooldown: int) -> None:
        self.cooldown = cooldown
        self.active: dict[tuple[str, ...], tuple[tuple[Any, ...], int]] = {}

    def offer(self, verdict: Verdict) -> Diagnosis | None:
        step = verdict.diagnosis.step
        prev = self.active.get(verdict.key)
        if not verdict.emit:
            if prev is not None:
                self.active[verdict.key] = (prev[0], step)
            return None
        self.active[verdict.key] = (verdict.signature, step)
        if prev is not None and prev[0] == verdict.signature and step - prev[1] <= self.cooldown:
            return None
        return verdict.diagnosis

    def state_dict(self) -> dict[str, Any]:
        return {"active": [[list(k), list(sig), s] for k, (sig, s) in self.active.items()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.active = {tuple(k): (tuple(sig), int(s)) for k, sig, s in state["active"]}

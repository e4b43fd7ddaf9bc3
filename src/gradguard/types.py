"""The values gradguard hands back: what it found (`Diagnosis`) and what it did (`Action`).

Room: shared values. It may touch: no other module.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

#: Every diagnosis kind gradguard can report (DESIGN.md, public API contract).
KINDS: tuple[str, ...] = (
    "exploding",
    "vanishing",
    "nonfinite",
    "dead_units",
    "saturation",
    "stalled",
    "train_mode_inference",
    "inference_mutates_state",
    "stochastic_inference",
    "eval_mode_training",
)

Severity = Literal["error", "warning", "info"]
SEVERITIES: tuple[str, ...] = ("error", "warning", "info")

ACTION_KINDS: tuple[str, ...] = ("skip_step", "clip", "lr_backoff", "lr_restore", "rollback")


@dataclass(frozen=True)
class Diagnosis:
    """One problem found in training, in plain words, with the numbers behind it.

    Attributes:
        kind: one of `KINDS`.
        severity: "error" (training is being damaged now), "warning" (it will be if this goes on), "info".
        step: the number of optimizer steps taken before the step where the condition was seen.
        layers: qualified module names from ``model.named_modules()``, most implicated first.
        message: what happened, where, and what it does to training.
        evidence: the numbers that triggered the diagnosis.
        remedies: what to do, best first.
    """

    kind: str
    severity: Severity
    step: int
    layers: list[str]
    message: str
    evidence: dict[str, float] = field(default_factory=dict)
    remedies: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown diagnosis kind {self.kind!r}; expected one of {KINDS}")
        if self.severity not in SEVERITIES:
            raise ValueError(f"unknown severity {self.severity!r}; expected one of {SEVERITIES}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, with ``"type": "diagnosis"`` to tell it from an action in events.jsonl."""
        return {"type": "diagnosis", **asdict(self)}

    def __str__(self) -> str:
        where = f" [{', '.join(self.layers[:3])}{', ...' if len(self.layers) > 3 else ''}]" if self.layers else ""
        return f"step {self.step} {self.severity} {self.kind}{where}: {self.message}"


@dataclass(frozen=True)
class Action:
    """One thing gradguard did to the training run (repair mode).

    Attributes:
        kind: one of ``"skip_step" | "clip" | "lr_backoff" | "lr_restore" | "rollback"``.
        step: the number of optimizer steps taken before the action.
        detail: the numbers of the action (e.g. old and new learning rate).
    """

    kind: str
    step: int
    detail: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in ACTION_KINDS:
            raise ValueError(f"unknown action kind {self.kind!r}; expected one of {ACTION_KINDS}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, with ``"type": "action"``."""
        return {"type": "action", **asdict(self)}

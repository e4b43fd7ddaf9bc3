"""What one step's measurement and one host read carry between the step recorder and the judge (plain data).

A step's ``Measured`` holds device tensors, or, where the statistics live on the CPU, values already on the host
(reading a CPU tensor is a memory load, not a sync).

Room: the step recorder. It may touch: no other module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class Measured:
    """One step's measurement before its row is queued: the per-layer and total gradient norms and the loss.

    Device tensors; or, when the statistics live on the CPU (``host`` true), already on the host: ``gnorm`` a
    list of floats, ``total`` and ``loss`` floats (``tensors()`` gives them as tensors).
    """

    gnorm: Any
    total: Any
    loss: Any
    loss_seen: bool
    scaler_inf: torch.Tensor | None
    wnorm: torch.Tensor | None  # weight norms already reduced over ranks (sharded sample steps), else None
    host: bool = False

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gnorm, total)`` as float32 tensors (made from the host values on the host path)."""
        if not self.host:
            return self.gnorm, self.total
        return (torch.tensor(self.gnorm, dtype=torch.float32), torch.tensor(self.total, dtype=torch.float32))


@dataclass
class HostRead:
    """What one host read brought back, as NumPy: step rows and the samples queued since the previous read."""

    steps: np.ndarray
    rows: np.ndarray  # (n, HEAD + layers); columns TOTAL, LOSS, CLIPPED, SCALER_INF, then per-layer norms
    loss_seen: np.ndarray
    samples: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)
    acts: list[tuple[int, str, int, str, np.ndarray]] = field(default_factory=list)
    times: list[tuple[int, str, float, float, int]] = field(default_factory=list)
    activation_order: list[str] = field(default_factory=list)

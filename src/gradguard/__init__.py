"""gradguard: keep the training of deep networks healthy.

Watches every layer's gradients at almost no cost and says, in plain words, when they explode, vanish (through
depth or through time), turn non-finite, or when units die or saturate; guards the switch between training and
inference (``gradguard.inference``, and mode checks while a Guard is attached).

Room: the facade. It may touch: ``detect.history``, ``doctor``, ``guard``, ``modes``, ``repair``, ``types``.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .detect.history import Thresholds  # noqa: E402
from .doctor import Trial, doctor  # noqa: E402
from .guard import Guard, GuardInternalWarning  # noqa: E402
from .modes import ModeRow, ModeTable, inference, mode_table  # noqa: E402
from .repair import (  # noqa: E402
    AGC,
    AutoClip,
    ClipMethod,
    GlobalNorm,
    LayerNorm,
    ValueClip,
    ZClip,
    reinit,
    swap_activations,
)
from .types import KINDS, Action, Diagnosis  # noqa: E402

__all__ = ["AGC", "KINDS", "Action", "AutoClip", "ClipMethod", "Diagnosis", "GlobalNorm", "Guard",
           "GuardInternalWarning", "LayerNorm", "ModeRow", "ModeTable", "Thresholds", "Trial", "ValueClip", "ZClip",
           "__version__", "doctor", "inference", "mode_table", "reinit", "swap_activations"]

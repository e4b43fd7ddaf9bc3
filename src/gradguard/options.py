"""Checks of the Guard's options, before anything is attached: bad input gets a clear error that says what to do.

Room: the facade. It may touch: ``detect.history``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from .detect.history import Thresholds


def _whole(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be a whole number >= {low}, got {value!r}")


def check_options(model: Any, optimizer: Any, repair: Any, log_every: Any, sample_every: Any,
                  nonfinite_check: Any, ema_beta: Any, thresholds: Any = None, console: Any = True,
                  lr_backoff: Any = 0.5, lr_restore_after: Any = 100, snapshot_every: Any = 100,
                  max_rollbacks: Any = 3, auto_loss: Any = True) -> None:
    """Raise TypeError/ValueError for options ``Guard`` cannot work with, naming the option and what it takes.

    Raises:
        TypeError: the model is not a module, the optimizer not a torch.optim.Optimizer, thresholds not
            ``gradguard.Thresholds``, console neither a bool nor a text stream.
        ValueError: an option outside its range.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Guard needs a torch.nn.Module, got {type(model).__name__}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
    if repair not in (False, None, True, "auto"):
        raise ValueError(f"repair must be False or 'auto', got {repair!r}")
    if repair and optimizer is None:
        raise ValueError("repair='auto' acts on optimizer steps: pass the optimizer (Guard(model, optimizer, ...))")
    _whole("log_every", log_every, 1)
    _whole("sample_every", sample_every, 1)
    if nonfinite_check not in ("auto", "step", "deferred"):
        raise ValueError(f"nonfinite_check must be 'auto', 'step' or 'deferred', got {nonfinite_check!r}")
    if isinstance(ema_beta, bool) or not isinstance(ema_beta, (int, float)) or not 0.0 < ema_beta < 1.0:
        raise ValueError(f"ema_beta must be a number in (0, 1), got {ema_beta!r}")
    if thresholds is not None and not isinstance(thresholds, Thresholds):
        raise TypeError(f"thresholds must be a gradguard.Thresholds (gg.Thresholds(window=100, ...)), got "
                        f"{type(thresholds).__name__}")
    if not isinstance(console, bool) and not callable(getattr(console, "write", None)):
        raise TypeError(f"console must be True, False or a text stream (sys.stdout, a file), got "
                        f"{type(console).__name__}")
    if isinstance(lr_backoff, bool) or not isinstance(lr_backoff, (int, float)) or not 0 < lr_backoff < 1:
        raise ValueError(f"lr_backoff must be a number in (0, 1), got {lr_backoff!r}")
    _whole("lr_restore_after", lr_restore_after, 1)
    _whole("snapshot_every", snapshot_every, 1)
    _whole("max_rollbacks", max_rollbacks, 0)
    if not isinstance(auto_loss, bool):
        raise TypeError(f"auto_loss must be True or False, got {auto_loss!r}")

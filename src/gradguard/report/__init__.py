"""Where gradguard's records go: JSONL and console sinks, the HTML report, and sinks for experiment trackers.

``TensorBoardSink``, ``WandbSink`` and ``MlflowSink`` are exported lazily: ``from gradguard.report import
TensorBoardSink`` imports only the small gradguard module; tensorboard, wandb or mlflow is imported when the sink
is created (install them with the extras ``gradguard[tensorboard]``, ``gradguard[wandb]``, ``gradguard[mlflow]``).

Room: the outputs. It may touch: ``report``.
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for type checkers only: at run time these come through __getattr__
    from .mlflow import MlflowSink
    from .tensorboard import TensorBoardSink
    from .wandb import WandbSink

__all__ = ["MlflowSink", "TensorBoardSink", "WandbSink"]

_LAZY = {"TensorBoardSink": ".tensorboard", "WandbSink": ".wandb", "MlflowSink": ".mlflow"}

# Per-layer fields of a stats record that describe the latest *sampled* step (``sample_step``), not ``step``.
SAMPLED_FIELDS = ("weight_norm", "update_ratio")
ROOT = "(root)"  # display name of parameters owned by the model itself (their layer name is "")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def stats_scalars(record: dict[str, Any], prefix: str) -> tuple[dict[str, float], dict[str, float]]:
    """Split a ``{"type": "stats"}`` record into flat scalar series for a tracker.

    Non-finite values are kept (a tracker that shows NaN is telling the truth); ``None`` (not observed, or no
    gradient for that layer at that step) is left out, since a tracker has no "absent" value.

    Args:
        record: a stats record (the fields of a stats.jsonl line).
        prefix: prepended to every name, e.g. ``"gradguard"``.

    Returns:
        ``(at_step, at_sample_step)``: ``{"{prefix}/total_grad_norm": ..., "{prefix}/grad_norm/{layer}": ...}`` for
        the record's ``step``, and the per-layer ``weight_norm`` / ``update_ratio`` values, which belong to
        ``sample_step`` (empty when the record has no sample).
    """
    now: dict[str, float] = {}
    sampled: dict[str, float] = {}
    for field, value in record.items():
        if field in ("type", "step", "sample_step"):
            continue
        if isinstance(value, dict):
            out = sampled if field in SAMPLED_FIELDS else now
            for layer, v in value.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    out[f"{prefix}/{field}/{layer or ROOT}"] = float(v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            now[f"{prefix}/{field}"] = float(value)
    return now, sampled


class BackendErrors:
    """Warns once when a tracker call fails, so a flaky server never switches gradguard off.

    A sink that raised would make the Guard treat it as an internal failure and stop monitoring; a lost point on
    a dashboard is the smaller harm. Later failures are counted silently (``failures``).
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self.failures = 0

    def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Call ``fn(*args, **kwargs)``; on an exception warn (first time only) and return None.

        Args:
            fn: the tracker call.
            *args: its positional arguments.
            **kwargs: its keyword arguments.

        Returns:
            What ``fn`` returned, or None if it raised.
        """
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            self.failures += 1
            if self.failures == 1:
                warnings.warn(f"gradguard: logging to {self.what} failed ({type(e).__name__}: {e}); training and "
                              "monitoring go on, later failures are not reported", RuntimeWarning, stacklevel=3)
            return None

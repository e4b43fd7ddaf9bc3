"""Assembly: builds the rooms of one Guard from its options and the wiring between them (``Guard.__init__``).

Room: the facade. It may touch: ``detect.advice``, ``detect.history``, ``detect.judge``, ``detect.mode_watcher``,
``gradguard``, ``hooks``, ``repair.clip``, ``repair.stepper``, ``report.outputs``, ``report.sinks``,
``stats.distributed``, ``stats.layers``, ``stats.recorder``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

import torch
from torch import nn

from . import __version__
from .detect.advice import model_facts
from .detect.history import Thresholds
from .detect.judge import Judge
from .detect.mode_watcher import ModeWatcher
from .hooks import Wiring
from .repair.clip import ClipMethod
from .repair.stepper import Repairer
from .report.outputs import Outputs, run_meta
from .report.sinks import Sink
from .stats.distributed import has_collective_forward
from .stats.layers import build_layer_map, is_compiled, unwrap
from .stats.recorder import StepRecorder


def build(model: nn.Module, optimizer: torch.optim.Optimizer | None, *, repair: bool, log_every: int,
          sample_every: int, log_dir: str | Path | None, console: bool | TextIO, nonfinite_check: str,
          thresholds: Thresholds, ema_beta: float, clip: float | str | ClipMethod | None, lr_backoff: float,
          lr_restore_after: int, snapshot_every: int, max_rollbacks: int, sinks: Iterable[Sink]) -> Wiring:
    """Build the rooms for one Guard (options as in ``Guard``, already checked) and the wiring between them.
    Nothing is attached yet: ``Wiring.attach()`` registers the hooks."""
    inner = unwrap(model)
    layers = build_layer_map(model, optimizer)
    compiled = is_compiled(model)
    named = list(inner.named_modules())
    recorder = StepRecorder(layers, named, sample_every, optimizer is not None, compiled)
    repairer = Repairer(optimizer, layers, recorder.device, clip, repair, lr_backoff, lr_restore_after,
                        snapshot_every, max_rollbacks)
    immediate = nonfinite_check == "step" or (nonfinite_check == "auto" and recorder.device.type == "cpu")
    # Rows kept on the host only where a per-step read is allowed: nonfinite_check="deferred" keeps the device path
    # (no read between host reads) on the CPU too.
    recorder.host = recorder.host and immediate
    # Keep at least a detector window beyond one read's rows, so no row is trimmed before it is judged; a condition
    # checked only on sample steps must not look "gone" between two samples.
    judge = Judge(layers, [n for n, _ in named], thresholds, ema_beta, max(512, log_every + thresholds.window + 1),
                  max(thresholds.cooldown, 2 * sample_every))
    # Read once here: the remedies then fit this model (and a loop without an optimizer is not offered repair).
    judge.facts = model_facts(inner, repair, clip, optimizer is not None)
    meta = run_meta(__version__, type(inner).__name__, type(optimizer).__name__ if optimizer is not None else None,
                    list(zip(layers.names, layers.numel)),
                    {"log_every": log_every, "sample_every": sample_every, "ema_beta": ema_beta,
                     "immediate_nonfinite_check": immediate, "thresholds": vars(thresholds)})
    outputs = Outputs(recorder.rank, console, log_dir, sinks, meta)
    wiring: Wiring
    modes = ModeWatcher(model, inner, {id(p) for p in layers.params}, sorted({p.device for p in layers.params},
                        key=str), optimizer is not None, judge.reporter, lambda v: wiring.emit(v),
                        lambda: recorder.step)
    # A replay re-runs the forward on this rank alone: never where a forward talks to the other ranks.
    can_replay = recorder.world == 1 or not has_collective_forward(inner)
    wiring = Wiring(model, optimizer, inner, recorder, judge, modes, repairer, outputs, log_every, immediate,
                    can_replay)
    return wiring

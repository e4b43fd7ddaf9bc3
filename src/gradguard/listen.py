"""What one Guard does with what the script does outside the optimizer (``stats.script_hooks``).

- A backward that reached the model's parameters: its root is this step's loss (unless the script gives one to
  ``observe_loss``), and without an optimizer it is a step: the gradients are recorded there.
- The script is about to clip the gradients itself: the step is recorded first (pre-clip numbers), and the
  script's max norm is noted so the detectors know a clip bounded the step.

A backward "reached the model" when the gradient of one of a few probe parameters changed: a new ``.grad``
tensor or a bumped version counter, host metadata only (no sync). Every entry point keeps its failures to itself:
gradguard stands aside (``Wiring.internal_failure``), the script goes on.

Room: the facade. It may touch: ``hooks``, ``stats``, ``stats.script_hooks``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .hooks import Wiring
from .stats import script_hooks


def _grad_key(p: torch.Tensor) -> tuple[int, int]:
    g = p.grad
    if g is None:
        return (0, -1)
    try:
        return (id(g), g._version)
    except RuntimeError:  # an inference tensor has no version counter
        return (id(g), -1)


def _grad_keys(params: Sequence[torch.Tensor]) -> list[tuple[int, int]]:
    """``_grad_key`` of each parameter; at every backward, so one comprehension (no call per parameter) unless a
    gradient has no version counter."""
    try:
        return [(0, -1) if (g := p.grad) is None else (id(g), g._version) for p in params]
    except RuntimeError:
        return [_grad_key(p) for p in params]


class ScriptListener:
    """Listens to backward calls and the script's own clipping for one Guard.

    Args:
        wiring: the Guard's wiring. auto_loss: read the loss from backward roots.
        step_on_backward: a backward is a step (no optimizer; ``Guard.check()`` by hand turns it off).
    """

    def __init__(self, wiring: Wiring, auto_loss: bool, step_on_backward: bool) -> None:
        self.wiring = wiring
        self.auto_loss = auto_loss
        self.step_on_backward = step_on_backward
        self.backwards = 0  # backwards that reached the model since attach
        self.recorded_at = -1  # the backward count at the last record made here (the clip or the backward)
        # Without an optimizer a step ends when the next backward begins (or at check()/close()): until then the
        # script may still clip it, and its row must stay open for that.
        self.open = False
        params = [p for p in wiring.recorder.layers.params if p.requires_grad]
        k = len(params)
        # A few parameters spread over the model: a backward that reaches the model reaches some of them.
        self.probes = [params[i] for i in sorted({0, k // 3, (2 * k) // 3, k - 1})] if k else []

    def start(self) -> None:
        script_hooks.listen(self)

    def stop(self) -> None:
        script_hooks.stop(self)

    def probe(self) -> Any:
        return _grad_keys(self.probes) if self.wiring.live() else None

    def backward_done(self, root: torch.Tensor | None, probe: Any) -> None:
        w = self.wiring
        if probe is None or not w.live():
            return
        try:
            after = _grad_keys(self.probes)
            if probe == after:
                return  # the backward did not reach this model's parameters
            self.backwards += 1
            if self.auto_loss and root is not None:
                # A backward that added to no existing gradient (they were set to None) starts a new accumulation:
                # roots of earlier backwards whose step never came (a GradScaler skip) are not this step's loss.
                if all(b[0] == 0 or b[0] != a[0] for b, a in zip(probe, after)):
                    w.recorder.new_accumulation()
                w.recorder.observe_backward_loss(root)
            if self.step_on_backward and w.optimizer is None:
                self.end_open_step()
                w.record_step(snapshot=False)
                self.recorded_at = self.backwards
                self.open = True
        except Exception as e:  # never crash the user's training step
            w.internal_failure(e)

    def adopt(self, root: torch.Tensor | None) -> None:
        """Count a backward that ran before this Guard listened (``gradguard run`` attaches inside it)."""
        probe = [(-1, -2)] * len(self.probes)  # never a real key: the backward counts as reaching the model
        self.backward_done(root, probe)

    def end_open_step(self) -> None:
        """End the step recorded at the last backward (no optimizer)."""
        if self.open:
            self.open = False
            self.wiring.end_step()

    def before_script_clip(self, grads: list[torch.Tensor]) -> None:
        w = self.wiring
        if w.optimizer is None or not w.live() or w.recorded or w.recording:
            return
        try:
            if w.external and self.recorded_at == self.backwards:
                return  # measured since the latest backward already
            mine = {id(p.grad) for p in w.recorder.layers.params if p.grad is not None}
            if not any(id(g) in mine for g in grads):
                return  # another model's gradients
            if w.external:  # a new backward since our record: that step never came (a GradScaler skipped it)
                w.recorder.drop_last_row()
            w.modes.judge_eval_in_training()
            w.record_step(snapshot=True, found_inf=script_hooks.scaler_found_inf(w.optimizer))
            w.external = True
            self.recorded_at = self.backwards
        except Exception as e:  # never crash the user's training step
            w.internal_failure(e)

    def script_clipped(self, max_norm: float) -> None:
        w = self.wiring
        if not w.live() or self.recorded_at != self.backwards:
            return
        try:
            w.recorder.note_script_clip(max_norm)
        except Exception as e:  # never crash the user's training step
            w.internal_failure(e)

"""The wiring: PyTorch's hooks call in here, and each call is passed along the flow.

optimizer step -> recorder (measure) -> repairer (clip) -> recorder (queue the row); every ``log_every`` steps
recorder (one host read) -> judge (history, detectors) -> repairer (ladder) -> outputs. Forwards of the root
module go to the mode watcher. Everything here runs inside the user's training step, so every entry point
catches its own failures: gradguard warns once, removes its hooks and stands aside (``internal_failure``).

Room: the facade. It may touch: ``detect.judge``, ``detect.mode_watcher``, ``detect.reporter``, ``param_groups``,
``repair.stepper``, ``report.outputs``, ``state``, ``stats.own_hooks``, ``stats.recorder``, ``stats.sentinel``,
``types``.
"""

from __future__ import annotations

import math
import traceback
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .detect.judge import Judge
from .detect.mode_watcher import ModeWatcher
from .detect.reporter import Verdict
from .param_groups import adopt_new_groups
from .repair.stepper import Repairer, closure_given
from .report.outputs import Outputs
from .state import load_state, save_state
from .stats.own_hooks import OwnHandle, forward_hook, forward_pre_hook
from .stats.recorder import StepRecorder
from .stats.sentinel import Origin, locate
from .types import Action


def _finite(x: torch.Tensor) -> torch.Tensor:
    return (x * 0) == 0  # torch.isfinite in two kernels, not four: 0 * x is 0 for finite x, NaN for inf and NaN


# Optimizers with a live Guard: a second Guard on one of them is refused (weak: a dropped optimizer leaves).
_GUARDED: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()


class GuardInternalWarning(RuntimeWarning):
    """gradguard failed internally; it switched monitoring off and left training untouched."""


class Wiring:
    """Receives the hooks of one Guard and drives its rooms.

    Args:
        model, optimizer, inner: what the Guard watches (``inner``: the user's module inside any wrapper).
        recorder, judge, modes, repairer, outputs: the rooms.
        log_every: steps between host reads. immediate: read the non-finite flag at every step.
        can_replay: a non-finite step's forward may be replayed to find where the NaN/Inf was born.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, inner: nn.Module,
                 recorder: StepRecorder, judge: Judge, modes: ModeWatcher, repairer: Repairer, outputs: Outputs,
                 log_every: int, immediate: bool, can_replay: bool) -> None:
        self.model, self.optimizer, self.inner = model, optimizer, inner
        self.recorder, self.judge, self.modes, self.repairer, self.outputs = recorder, judge, modes, repairer, outputs
        self.log_every, self.immediate, self.can_replay = log_every, immediate, can_replay
        self._stats_on_cpu = recorder.device.type == "cpu"
        self.groups_seen = len(optimizer.param_groups) if optimizer is not None else 0
        self.closed = self.failed = False
        self.recorded = False  # the repaired step measured already; the pre-hook must not measure twice
        self.external = False  # record_gradients() measured this step (a framework callback, before its clip)
        self.recording = self._draining = False
        self._handles: list[RemovableHandle | OwnHandle] = []
        self._order_handles: list[OwnHandle] = []
        self._order: list[str] = []
        self._origins: dict[int, Origin | None] = {}
        self._last_inputs: tuple[tuple[Any, ...], dict[str, Any]] | None = None
        self.listener: Any = None  # what the script does outside the optimizer (listen.ScriptListener), if set

    def attach(self) -> None:
        """Register every hook; on failure nothing stays half-attached.

        Raises:
            ValueError: the optimizer has a Guard attached already (two would split its steps between them).
        """
        if self.optimizer is not None and self.optimizer in _GUARDED:
            raise ValueError(f"this {type(self.optimizer).__name__} already has a gradguard.Guard attached: close it "
                             "first (guard.close()), or keep using that one")
        try:
            if self.optimizer is not None:
                _GUARDED.add(self.optimizer)
                self._handles.append(self.optimizer.register_step_pre_hook(self.pre_step))
                self._handles.append(self.optimizer.register_step_post_hook(self.post_step))
            # Kept out of copies and pickles of the model (an EMA deepcopy, torch.save(model)): see own_hooks.
            self._handles.append(forward_pre_hook(self.model, self.forward_pre, with_kwargs=True))
            self._handles.append(forward_hook(self.model, self.forward_post, always_call=True))
            if self.repairer.ladder is not None:
                self.repairer.install(self, lambda: self.recorder.last_total)  # type: ignore[arg-type,return-value]
                self.repairer.snapshot_at_attach(self.model)
            if not self.recorder.compiled:
                # One-shot: learn the forward order of the layers from the first forward, then remove these.
                wanted = {id(m) for m in self.recorder.layers.modules}
                for n, m in self.inner.named_modules():
                    if id(m) in wanted:
                        self._order_handles.append(forward_pre_hook(m, self._order_hook(n)))
                self.recorder.sampler.arm()  # step 0 is a sample step
            if self.listener is not None:
                self.listener.start()
        except Exception:
            self.remove_hooks()
            raise

    def live(self) -> bool:
        return not (self.closed or self.failed)

    # ------------------------------------------------------------------ optimizer hooks (hot path)

    def pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.closed or self.failed:
            return
        try:
            self.modes.judge_eval_in_training()
            if not closure_given(args, kwargs) and not self.recorded and not self.external:
                self.record_step(snapshot=True)
            # With a closure (LBFGS) the gradients exist only once step() has run it: record in the post hook.
        except Exception as e:  # never crash the user's training step
            self.internal_failure(e)

    def post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.closed or self.failed:
            return
        try:
            if self.repairer.ladder is None:
                self.repairer.restore_fused_flags()  # the repaired step restores its own after the step
            if closure_given(args, kwargs) and not self.external and not self.recorded:
                self.record_step(snapshot=False, clip=False)  # after the step: nothing left to clip
            else:
                self.recorder.after_step()
            self.external = False
            self.end_step()
        except Exception as e:
            self.internal_failure(e)

    def record_for_step(self) -> None:
        """The repaired step measures (and clips) before deciding whether to apply the step."""
        self.modes.judge_eval_in_training()
        self.record_step(snapshot=True)

    def skip_step(self, detail: dict[str, Any]) -> None:
        """The repaired step skipped this step: nothing was applied, so there is no update to measure."""
        self.recorder.drop_snapshot()
        self.act(Action("skip_step", self.recorder.step, detail))
        self.end_step()

    def end_step(self) -> None:
        self.recorder.end_step()
        if self.recorder.pending >= self.log_every:
            self.drain()

    def record_step(self, snapshot: bool, clip: bool = True, found_inf: torch.Tensor | None = None) -> None:
        """Measure this step's gradients on the device and queue the row. No host read unless ``immediate``."""
        self.recording = True  # our own clip may call torch's clip functions: not the script's (listen.py)
        try:
            self._record_step(snapshot, clip, found_inf)
        finally:
            self.recording = False

    def _record_step(self, snapshot: bool, clip: bool, found_inf: torch.Tensor | None) -> None:
        if self.optimizer is not None and len(self.optimizer.param_groups) != self.groups_seen:
            adopt_new_groups(self)  # add_param_group after attach: its parameters are watched from this step
        if self._order_handles:
            for h in self._order_handles:
                h.remove()
            self._order_handles.clear()
            self.recorder.reorder(self._order)
        m = self.recorder.measure(self.optimizer, found_inf)
        # Host read, only when immediate: on the CPU two floats from memory (20x cheaper than three tiny tensor ops),
        # on an accelerator with nonfinite_check="step" (one sync per step), of the sum (overflow is re-read below).
        bad = self.immediate and not (math.isfinite(m.total + m.loss) if m.host
                                      else math.isfinite(m.total.item() + m.loss.item()) if self._stats_on_cpu
                                      else bool(_finite(m.total + m.loss)))
        if bad and not math.isfinite(m.total if m.host else m.total.item()):  # a further read, on this rare path
            # Finite gradients can overflow float32 squares (an entry of 2e20): measure again before anything is
            # called non-finite or clipped with an infinite norm.
            m = self.recorder.remeasure_wide(m, self.optimizer)
            bad = not (math.isfinite(m.total + m.loss) if m.host else bool(torch.isfinite(m.total) &
                                                                           torch.isfinite(m.loss)))
        clipped = m.total
        if self.repairer.clip is not None and clip:
            host = self.repairer.clip_step_host(m.total) if m.host else None
            clipped = host if host is not None else self.repairer.clip_step(*m.tensors())
        self.recorder.commit(m, clipped, snapshot, may_read=self.immediate)
        if bad:
            self._origins[self.recorder.step] = self._replay() if self.can_replay else None
            self.drain()  # report now, before the optimizer applies this step

    def _replay(self) -> Origin | None:
        """Where the NaN/Inf of this step was born; None when unknown. Never raises: a failed replay only costs
        the location, not the diagnosis."""
        if self._last_inputs is None:
            return None
        args, kwargs = self._last_inputs
        was = {m: m.training for m in self.inner.modules()}
        self.modes.replaying = True
        try:
            return locate(self.inner, args, kwargs)
        except Exception:
            return None
        finally:
            self.modes.replaying = False
            for m, flag in was.items():
                m.training = flag

    # ------------------------------------------------------------------ calls from the Guard's API

    def check(self) -> list[Any]:
        """``Guard.check()``: without an optimizer each call is one step; then read what is pending."""
        if self.closed:
            raise RuntimeError("this Guard is closed; create a new gradguard.Guard to keep checking")
        before = len(self.judge.diagnoses)
        if self.optimizer is None and not self.failed:
            try:
                listener = self.listener
                # Steps counted by hand from now on; the latest backward's gradients may be recorded already.
                done = listener is not None and listener.open
                if listener is not None:
                    listener.end_open_step()
                    listener.step_on_backward = False
                if not done:
                    self.record_step(snapshot=False)
                    self.end_step()
            except Exception as e:  # never crash the user's training step
                self.internal_failure(e)
        self.drain_safely(full=True)
        return self.judge.diagnoses[before:]

    def record_gradients(self, found_inf: torch.Tensor | None) -> None:
        """``Guard.record_gradients()``: measure (and clip) this step now; the optimizer hooks then leave it."""
        if self.closed:
            raise RuntimeError("this Guard is closed; create a new gradguard.Guard to keep recording")
        if self.optimizer is None:
            raise RuntimeError("record_gradients() needs the optimizer that takes the step; without one, call "
                               "check() after backward()")
        if self.failed:
            return
        try:
            # A record whose step the scaler skipped is dropped at the read by its flag; this one takes its step.
            self.modes.judge_eval_in_training()
            self.record_step(snapshot=True, found_inf=found_inf)
            self.external = True
            if self.listener is not None:  # the framework's clip that follows must not record this step again
                self.listener.recorded_at = self.listener.backwards
        except Exception as e:  # never crash the user's training step
            self.internal_failure(e)

    def training_forward_started(self) -> None:
        """``Guard.training_forward_started()``: what the root module's forward hook does for a training forward."""
        if not self.live():
            return
        try:
            self.recorder.sampler.new_forward()
            if torch.is_grad_enabled():
                self.modes.note_training_forward()
        except Exception as e:  # never crash the user's training step
            self.internal_failure(e)

    def state_dict(self) -> dict[str, Any]:
        self.drain_safely()
        return save_state(self.recorder, self.judge, self.repairer)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_state(state, self.recorder, self.judge, self.repairer)

    # ------------------------------------------------------------------ forward hooks

    def forward_pre(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        if self.closed or self.failed or self.modes.replaying:
            return
        try:
            if self.modes.before_forward(args, kwargs):
                self.recorder.sampler.new_forward()
                if self.immediate:
                    self._last_inputs = (args, kwargs)  # references, for a replay if this step turns non-finite
        except Exception as e:
            self.internal_failure(e)

    def forward_post(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.closed or self.failed or self.modes.replaying:
            return
        try:
            self.modes.after_forward()
        except Exception as e:
            self.internal_failure(e)

    def _order_hook(self, name: str) -> Callable[[nn.Module, Any], None]:
        def hook(module: nn.Module, args: Any) -> None:
            if name not in self._order:
                self._order.append(name)
        return hook

    # ------------------------------------------------------------------ host side

    def emit(self, verdict: Verdict) -> None:
        d = self.judge.offer(verdict)
        if d is not None:
            self.outputs.diagnosis(d)

    def last_step(self) -> int:  # the step the optimizer last finished (its hooks ran)
        return self.recorder.step - 1

    def act(self, action: Action) -> None:
        self.outputs.act(action)

    def drain_safely(self, full: bool = False) -> None:
        """``drain`` that never raises; ``full``: the window rules judge up to the newest step, pending or not."""
        if self.failed or not (self.recorder.pending or full):
            return
        try:
            if self.recorder.pending:
                self.drain(full)
            elif self.judge.history is not None:
                for verdict in self.judge.catch_up(self.judge.history):
                    self.emit(verdict)
        except Exception as e:
            self.internal_failure(e)

    def drain(self, full: bool = False) -> None:
        """Copy pending statistics to the host in one transfer, run the detectors (``full``: the window rules
        too, due or not), repair, report."""
        if not self.recorder.pending:
            return
        self._draining = True
        try:
            with np.errstate(all="ignore"):  # NumPy's overflow (in a cast) is ours to judge, not the script's stderr
                self._drain(full)
        finally:
            self._draining = False

    def _drain(self, full: bool) -> None:
        h, rows = self.judge.ingest(self.recorder.read())
        for action in self.repairer.clip_actions(h, rows):
            self.act(action)
        verdicts = self.judge.detect(h, len(rows), self._origins, full)
        for verdict in verdicts:
            self.emit(verdict)
        if self.repairer.ladder is not None:
            self.repairer.climb(self.model, h, len(rows), verdicts, self.recorder.step, self.recorder.rank,
                                self.act, self.judge.active_kinds(self.recorder.step))
        if len(rows) and self.outputs.wants_stats:
            self.outputs.stats(h, rows, self.recorder.script_max_norm)

    def close(self) -> None:
        """Read what is pending, remove every hook, close the outputs."""
        try:
            if self.listener is not None and not self.failed:
                try:
                    self.listener.end_open_step()
                except Exception as e:  # close() must still remove every hook
                    self.internal_failure(e)
            self.recorder.settle()
            self.drain_safely(full=True)
            if not self.failed:
                self.judge.closing_remarks(self.outputs.note)
        finally:
            self.closed = True
            self.remove_hooks()
            self.outputs.close()

    def remove_hooks(self) -> None:
        if self.optimizer is not None:
            _GUARDED.discard(self.optimizer)
        for h in self._handles + self._order_handles:
            h.remove()
        self._handles.clear()
        self._order_handles.clear()
        self.recorder.close()
        if self.repairer.ladder is not None:
            self.repairer.uninstall()
        self._last_inputs = None
        self.modes.clear()
        if self.listener is not None:
            self.listener.stop()

    def internal_failure(self, exc: BaseException) -> None:
        """Report pending statistics if possible, then warn once, switch monitoring off, leave training alone."""
        if self.failed:
            return
        if not self._draining and self.recorder.pending:
            try:
                self.drain()  # what was measured before the failure is still reported
            except Exception:
                pass
        self.failed = True
        self.repairer.restore_fused_flags()
        self.remove_hooks()
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=-3))
        warnings.warn(f"gradguard switched itself off after an internal error; training is unaffected. "
                      f"Please report this:\n{tb}", GuardInternalWarning, stacklevel=2)


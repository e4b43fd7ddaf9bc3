"""Room 3 of the flow, the repairer: clips with the norms the recorder measured, skips non-finite steps, and
climbs the ladder (learning-rate backoff, rollback) on the judge's verdicts.

It owns the optimizer's step wrapper (``repair="auto"``) and the fused optimizers' ``grad_scale``/``found_inf``
flags, and restores both exactly. It changes the optimizer (its ``step`` attribute, learning rates, flags),
the gradients (clipping), the model and optimizer state (rollback).

Room: the repairer. It may touch: ``detect.history``, ``detect.reporter``, ``repair``, ``stats.distributed``,
``stats.layers``, ``stats.recorder``, ``types``.
"""

from __future__ import annotations

import functools
import math
import sys
import types
from collections.abc import Callable
from typing import Any, Protocol, cast

import numpy as np
import torch
from torch import nn

from ..detect.history import History, clip_acted
from ..detect.reporter import Verdict
from ..stats.distributed import local
from ..stats.layers import LayerMap
from ..stats.recorder import CLIPPED, TOTAL
from ..types import Action
from .adaptive_clip import ZClip, make_clip
from .clip import ClipMethod, ScalarClip
from .closures import closure_given, evaluate_closure, gradients_finite, lbfgs_step
from .ladder import Ladder
from .weights import WeightWatch, still_corrupt

_ABSENT = object()  # "the optimizer had no such attribute", as opposed to one set to None

__all__ = ["Repairer", "StepSide", "closure_given"]


def _make_clip(clip: float | str | ClipMethod | None) -> ClipMethod | None:
    """``make_clip`` with the error naming the Guard's option: a clip strategy's own check says "max_norm"."""
    if isinstance(clip, (int, float)) and not isinstance(clip, bool) and not clip > 0:
        raise ValueError(f"clip must be a max norm > 0 (clip=1.0), 'zclip', 'autoclip', 'agc', a "
                         f"gradguard.repair.ClipMethod or None; got {clip!r}")
    return make_clip(clip)


class StepSide(Protocol):
    """What the repaired step needs from the hooks that record steps (``gradguard.hooks.Wiring``)."""

    recorded: bool
    external: bool

    def live(self) -> bool: ...
    def record_for_step(self) -> None: ...
    def skip_step(self, detail: dict[str, Any]) -> None: ...
    def act(self, action: Action) -> None: ...
    def last_step(self) -> int: ...
    def internal_failure(self, exc: BaseException) -> None: ...


class Repairer:
    """Clipping, the step wrapper and the repair ladder.

    Args:
        optimizer: the optimizer (None: only clipping by ``record``-style calls is impossible, nothing to repair).
        layers: the tracked parameters. device: where the statistics live.
        clip: the clip option of ``Guard``; repair: "auto" turns the ladder on (and ZClip unless ``clip``).
        lr_backoff, lr_restore_after, snapshot_every, max_rollbacks: the ladder's settings.
    """

    def __init__(self, optimizer: torch.optim.Optimizer | None, layers: LayerMap, device: torch.device,
                 clip: float | str | ClipMethod | None, repair: bool, lr_backoff: float, lr_restore_after: int,
                 snapshot_every: int, max_rollbacks: int) -> None:
        self.optimizer = optimizer
        self.layers = layers
        self.device = device
        self.clip = _make_clip(clip)
        self.ladder = (Ladder(lr_backoff, restore_after=lr_restore_after, snapshot_every=snapshot_every,
                              max_rollbacks=max_rollbacks) if repair else None)
        if self.ladder is not None and self.clip is None:
            self.clip = ZClip()  # rung 2: spikes are clipped adaptively
        self._fused_saved: tuple[Any, Any] | None = None
        self._ready_at: tuple[int, int] | None = None  # (states, parameters) when all last had optimizer state
        self._clip_index: dict[tuple[int, ...], torch.Tensor] = {}
        self._step_wrapper: Callable[..., Any] | None = None
        self._orig_step: Callable[..., Any] | None = None
        self._clipped: torch.Tensor | float | None = None  # this step's total after gradguard's clip
        self._flagged: set[int] = set()  # steps whose skip flag went to a fused kernel (its outcome read later)
        self._unresolved: set[int] = set()  # non-finite rows read before their step's skip was decided
        self.weights = WeightWatch()
        self._why = "non-finite gradients"  # what the skip decided last is for

    def reset_layout(self) -> None:
        """The tracked parameters changed (a new optimizer group): forget what was built for the old ones."""
        self._clip_index = {}
        self._ready_at = None

    # ------------------------------------------------------------------ clipping (per step)

    def clip_step_host(self, total: float) -> float | None:
        """``clip_step`` with the total already on the host (statistics on the CPU): the coefficient computed in
        Python and one fused multiply, only when it cuts (a multiply by 1 leaves every gradient bitwise as it
        is). Returns the total after clipping, or None where the strategy needs the device path."""
        assert self.clip is not None
        coef = self.clip.host_coefficient(total) if isinstance(self.clip, ScalarClip) and not self.fused() else None
        if coef is None:
            return None
        if coef != 1.0:
            grads = [p.grad for p in self.layers.params if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, coef)
        self._clipped = total * coef
        return self._clipped

    def clip_step(self, gnorm: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
        """Clip in place with the norms just measured; returns the total norm after clipping (device tensor), which
        the repaired step's skip decision reads too: a clip can turn finite gradients non-finite (a coefficient of
        -inf from a corrupted ZClip state), and such a step must not be applied either."""
        self._clipped = clipped = self._clip_step(gnorm, total)
        return clipped

    def _clip_step(self, gnorm: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
        assert self.clip is not None
        params = self.layers.params
        present = tuple(i for i, p in enumerate(params) if p.grad is not None)
        index = self._clip_index.get(present)
        if index is None:  # which layer each present gradient belongs to; built once per pattern
            index = torch.tensor([self.layers.layer_of[i] for i in present], dtype=torch.long)
            index = index.pin_memory().to(self.device, non_blocking=True) if self.device.type != "cpu" else index
            self._clip_index[present] = index
        ps = [params[i] for i in present]
        scale = getattr(self.optimizer, "grad_scale", None)
        if self.fused() and isinstance(scale, torch.Tensor) and not isinstance(self.clip, ScalarClip):
            # GradScaler left the unscaling to the fused kernel; a value or unit-wise clip needs true gradients:
            # unscale here, and tell the kernel there is nothing left to divide.
            grads = [local(p.grad) for p in ps if p.grad is not None]
            torch._foreach_div_(grads, scale.to(grads[0].device).float())
            self._set_fused_attr("grad_scale", torch.ones_like(scale))
        if self.fused() and isinstance(self.clip, ScalarClip):
            # The fused kernel divides the gradients by grad_scale as it reads them: clipping costs no extra pass.
            coef = self.clip.coefficient(total)
            prior = getattr(self.optimizer, "grad_scale", None)
            self._set_fused_attr("grad_scale", (prior.float() if prior is not None else 1.0) / coef)
            return total * coef
        # DTensors (FSDP2) are clipped through their local shards, with the coefficient from the global norms.
        return self.clip.clip_([local(p) for p in ps], [local(p.grad) for p in ps], index, gnorm, total)

    # ------------------------------------------------------------------ repair="auto": the step wrapper

    def install(self, side: StepSide, last_total: Callable[[], torch.Tensor | float]) -> None:
        """Shadow ``optimizer.step`` with an instance attribute (the class method, its hooks and any LR scheduler
        wrapper stay inside): the only way to skip a non-fused step without touching its state."""
        assert self.optimizer is not None
        self._orig_step = self.optimizer.step

        def step(optimizer: Any, *args: Any, **kwargs: Any) -> Any:
            return self._repaired_step(side, last_total, *args, **kwargs)

        # Carry the wrapped step's attributes (an LR scheduler marks its own wrapper and checks for the mark).
        functools.update_wrapper(step, self._orig_step)
        # A bound method, as optimizer.step is: an LR scheduler created later wraps ``step.__func__`` and binds it
        # to the optimizer again (torch's LRScheduler), which a plain function would not survive.
        self._step_wrapper = types.MethodType(step, self.optimizer)
        self.optimizer.step = self._step_wrapper  # type: ignore[method-assign]

    def snapshot_at_attach(self, model: nn.Module) -> None:
        """The state at attach, the rollback target until the run has a trusted snapshot of its own."""
        assert self.ladder is not None and self.optimizer is not None
        self.ladder.take_snapshot(model, self.optimizer, 0, initial=True)

    def uninstall(self) -> None:
        if self.optimizer is None or self._step_wrapper is None:
            return
        opt = cast(Any, self.optimizer)
        if opt.__dict__.get("step") is self._step_wrapper:
            orig: Any = self._orig_step
            cls_step = getattr(type(opt), "step", None)
            if getattr(orig, "__self__", None) is opt and getattr(orig, "__func__", None) is cls_step:
                delattr(opt, "step")  # back to the class method, exactly as before
            else:
                setattr(opt, "step", orig)  # noqa: B010 - e.g. an LR scheduler's wrapper from before the Guard
        # If something wrapped ours later (a scheduler created after the Guard), ours stays as a pass-through.

    def _repaired_step(self, side: StepSide, last_total: Callable[[], torch.Tensor | float], *args: Any,
                       **kwargs: Any) -> Any:
        assert self._orig_step is not None and self.optimizer is not None and self.ladder is not None
        closure = closure_given(args, kwargs)
        if not side.live():
            return self._orig_step(*args, **kwargs)
        if closure and isinstance(self.optimizer, torch.optim.LBFGS):
            ladder = self.ladder
            return lbfgs_step(self.optimizer, self._orig_step, side, lambda: ladder.rollbacks, *args, **kwargs)
        result = None
        if closure:
            # A one-evaluation optimizer stepped with a closure (PyTorch Lightning does this): evaluate it first,
            # so the gradients can be measured, clipped, or the step skipped before the update, then hand the
            # optimizer a closure that returns the same result (it calls it once, as it would have).
            result, args, kwargs = evaluate_closure(args, kwargs)
        try:
            if not side.external:  # else record_gradients() measured (and clipped) this step already
                self._clipped = None
                side.record_for_step()
            side.recorded = True
            decision = self._skip_decision(last_total())
            self._note_device_skip(side, decision)
        except Exception as e:  # never crash the user's training step
            side.recorded = False
            side.internal_failure(e)
            self.restore_fused_flags()
            if not gradients_finite(self.optimizer):
                return result  # fail safe: gradguard failed, but a non-finite step is still never applied
            return self._orig_step(*args, **kwargs)
        if decision == "skip":
            side.recorded = side.external = False
            self.restore_fused_flags()
            try:
                side.skip_step({"why": self._why})
            except Exception as e:  # logging the skip failed: the step stays skipped, gradguard stands aside
                side.internal_failure(e)
            return result  # what step(closure) returns: the closure's loss (None without a closure)
        saved = self.ladder.scale_lr(self.optimizer)
        try:
            return self._orig_step(*args, **kwargs)
        finally:
            self.ladder.unscale_lr(self.optimizer, saved)
            side.recorded = False
            self.restore_fused_flags()

    def _note_device_skip(self, side: StepSide, decision: str) -> None:
        """Log each skip once. A host skip is logged by ``side.skip_step``. A fused kernel told to skip (its
        ``found_inf``) is logged here when the host knows the flag is set (the total was read already: on the CPU,
        or at a read made during this step), else at the read that brings its row (``climb``)."""
        step = side.last_step() + 1  # the step being taken
        self._unresolved = {s for s in self._unresolved if s >= step}  # rows of steps decided without us
        if decision == "device_skip" or (decision == "device" and step in self._unresolved):
            side.act(Action("skip_step", step, {"why": self._why, "fused": True}))
        elif decision == "device":
            self._flagged.add(step)
        self._unresolved.discard(step)

    def _skip_decision(self, total: torch.Tensor | float) -> str:
        """Rung 1: "skip" (on the host: the step is not called), "apply", or a fused kernel's ``found_inf`` set
        ("device_skip" when the host knows it is set, "device" when only the kernel will know).

        A fused optimizer gets the flag as its ``found_inf`` (the kernel skips, state untouched, no sync); any other
        optimizer cannot be stopped from the device, so the flag is read: one small host read per step on an
        accelerator (free on the CPU), as torch.amp.GradScaler does. The flag covers the total after gradguard's
        own clip as well as the one measured before it."""
        assert self.optimizer is not None
        clipped, self._clipped = self._clipped, None
        self._why = "non-finite gradients"
        on_host = clipped is None or isinstance(clipped, float) or clipped.device.type == "cpu"
        if not isinstance(total, torch.Tensor) and on_host:  # statistics on the CPU: host values (memory reads)
            bad = not math.isfinite(total) or (clipped is not None and not math.isfinite(float(clipped)))
            if bad and math.isfinite(total):
                self._why = f"non-finite gradients after gradguard's clip ({self._clip_name()})"
            if not (bad and self.fused() and self._state_ready()):
                return "skip" if bad else "apply"
            prior = getattr(self.optimizer, "found_inf", None)  # GradScaler's flag, on the CPU here: a memory read
            scaler = isinstance(prior, torch.Tensor) and bool(prior.sum() > 0)
            self._hand_flag(torch.ones(()))  # handed to the kernel as its flag, as on the device path
            return "device" if scaler else "device_skip"  # the scaler's own skip: its row is dropped, not logged
        before = ~torch.isfinite(torch.as_tensor(total, dtype=torch.float32))
        bad_t = before if clipped is None else before | ~torch.isfinite(torch.as_tensor(clipped).to(before.device))
        if self.fused() and self._state_ready():
            self._hand_flag(bad_t.to(torch.float32))
            return "device"
        if clipped is None:
            return "skip" if bool(bad_t) else "apply"  # the documented per-step host read (see above)
        bad, unclipped_bad = torch.stack([bad_t, before]).tolist()  # the same one read, of both flags
        if bad and not unclipped_bad:
            self._why = f"non-finite gradients after gradguard's clip ({self._clip_name()})"
        return "skip" if bad else "apply"

    def _hand_flag(self, flag: torch.Tensor) -> None:
        """Set this step's ``found_inf`` for the fused kernel (combined with GradScaler's own flag, not replacing
        it)."""
        prior = getattr(self.optimizer, "found_inf", None)
        self._set_fused_attr("found_inf", torch.maximum(prior, flag.to(prior.device)) if prior is not None else flag)

    def _clip_name(self) -> str:
        return self.clip.name if self.clip is not None else "none"

    def _state_ready(self) -> bool:
        """Whether every parameter already has optimizer state. Before that (the first step), a fused kernel
        told to skip would still create state (fused SGD even leaves an uninitialised momentum buffer), so the
        flag is read on the host instead: once, at the start."""
        assert self.optimizer is not None
        state = self.optimizer.state
        # Once true it stays true while no parameter gains or loses its state and no group gains a parameter.
        key = (len(state), sum(len(g["params"]) for g in self.optimizer.param_groups))
        if self._ready_at == key:
            return True
        ready = all(len(state.get(p, {})) > 0 for g in self.optimizer.param_groups for p in g["params"])
        self._ready_at = key if ready else None
        return ready

    def fused(self) -> bool:
        return self.optimizer is not None and all(g.get("fused") for g in self.optimizer.param_groups)

    def _set_fused_attr(self, name: str, value: torch.Tensor) -> None:
        """Set ``grad_scale`` / ``found_inf`` for this step's fused kernel, remembering what was there (GradScaler
        sets them too); ``restore_fused_flags`` puts it back after the step."""
        opt: Any = self.optimizer
        if self._fused_saved is None:  # absent and None differ: GradScaler later deletes what it set to None
            self._fused_saved = (opt.__dict__.get("grad_scale", _ABSENT), opt.__dict__.get("found_inf", _ABSENT))
        setattr(opt, name, value)

    def restore_fused_flags(self) -> None:
        if self._fused_saved is None:
            return
        opt: Any = self.optimizer
        grad_scale, found_inf = self._fused_saved
        self._fused_saved = None
        for name, value in (("grad_scale", grad_scale), ("found_inf", found_inf)):
            if value is _ABSENT:
                opt.__dict__.pop(name, None)
            else:
                setattr(opt, name, value)

    # ------------------------------------------------------------------ at a host read

    def clip_actions(self, h: History, rows: np.ndarray) -> list[Action]:
        """One ``clip`` Action per step of this read whose norm the clip cut."""
        if self.clip is None:
            return []
        out = []
        first = len(h.steps) - len(rows)
        for r in range(len(rows)):
            before, after = rows[r, TOTAL], rows[r, CLIPPED]
            if clip_acted(before, after):
                out.append(Action("clip", int(h.steps[first + r]),
                                  {"method": self.clip.name, "norm": float(before), "clipped_norm": float(after)}))
        return out

    def climb(self, model: nn.Module, h: History, n_rows: int, verdicts: list[Verdict], step: int, rank: int,
              act: Callable[[Action], None], active: set[str] | None = None) -> None:
        """Rungs 3 and 4, decided at a statistics read; plus the snapshot of a healthy run.

        ``active``: the kinds whose conditions are active now (a snapshot is never taken during one)."""
        assert self.ladder is not None and self.optimizer is not None
        if self.fused():
            self._fused_skips(h, n_rows, step, act)
        corrupt = self.weights.check(h)
        # A non-finite sampled weight norm: confirm on the weights themselves (a host read, on this rare path only)
        if corrupt is not None and still_corrupt(self.layers, corrupt.layers):
            action = self.ladder.rollback(model, self.optimizer, step, corrupt=corrupt)
            if action is not None:
                act(action)
                if "stopped" in action.detail and rank == 0:
                    print(f"[gradguard] {action.detail['stopped']}", file=sys.stderr, flush=True)
        exploding = any(v.key[0] == "exploding" and v.key[1] in ("growth", "update", "backward", "early")
                        for v in verdicts)
        diverging = any(v.key == ("exploding", "growth") for v in verdicts)
        early = any(v.key == ("exploding", "early") for v in verdicts)
        # Units dying or saturating within 100 steps of an explosion: the explosion's damage.
        damaged = (step - self.ladder.last_trouble <= 100
                   and any(v.key[0] in ("dead_units", "saturation") and v.emit for v in verdicts))
        for decision in self.ladder.decide(h, n_rows, exploding, step, diverging, early, damaged):
            if decision in ("rollback", "rollback_initial"):
                action = self.ladder.rollback(model, self.optimizer, step, initial=decision == "rollback_initial")
                if action is not None:
                    act(action)
                    if "stopped" in action.detail and rank == 0:
                        print(f"[gradguard] {action.detail['stopped']}", file=sys.stderr, flush=True)
            else:
                assert isinstance(decision, Action)
                act(decision)
        if self.ladder.healthy_for_snapshot(h, step, active or set()):
            self.ladder.take_snapshot(model, self.optimizer, step)

    def _fused_skips(self, h: History, n_rows: int, step: int, act: Callable[[Action], None]) -> None:
        """The skips a fused kernel made on the device (its ``found_inf``), logged once each at the read that
        brings their rows: only the steps whose flag went to the kernel (``_flagged``). A host skip was logged
        when it happened; a row of the step being taken now waits for its decision (``_note_device_skip``)."""
        new = slice(len(h.steps) - n_rows, len(h.steps))
        bad = ~np.isfinite(h.total[new])
        if self.clip is not None:  # the total after gradguard's clip is in the flag too
            bad |= ~np.isfinite(h.clipped[new])
        for st in (int(s) for s in h.steps[new][bad]):
            if st in self._flagged:
                finite = bool(np.isfinite(h.total[new][h.steps[new] == st]).all())
                why = f"non-finite gradients after gradguard's clip ({self._clip_name()})" if finite else \
                    "non-finite gradients"
                act(Action("skip_step", st, {"why": why, "fused": True}))
            elif st >= step:
                self._unresolved.add(st)
        if n_rows:
            last = int(h.steps[-1])
            self._flagged = {s for s in self._flagged if s > last}

"""Beside the flow, the mode watcher: judges each forward of the root module for train/eval mistakes.

Host facts only (module flags, buffer version counters, generator states): ``train_mode_inference``,
``inference_mutates_state``, ``stochastic_inference`` (one replay names the module) and ``eval_mode_training``
(judged at the optimizer step). It hands verdicts to ``emit`` (the judge's reporter deduplicates them). It may
touch: the model's flags and buffers (read only; a replay restores the RNG), ``detect.modes``, ``stats.sentinel``.

Room: the mode watcher. It may touch: ``detect``, ``modes``, ``stats.sentinel``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..modes import DELIBERATE_TRAINING, ModeProfile, behaviour_modules
from ..stats.sentinel import locate_rng, rng_state, same_rng
from . import modes as mode_rules
from .reporter import Reporter, Verdict


def _any_requires_grad(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    return any(isinstance(a, torch.Tensor) and a.requires_grad for a in (*args, *kwargs.values()))


class Marks(set[int]):
    """The ids of the modules marked through one option (``frozen`` or ``stochastic``), with the option's name, so
    a wrong value is refused with an error that names it."""

    def __init__(self, option: str) -> None:
        super().__init__()
        self.option = option


class ModeWatcher:
    """Mode checks around forwards of the root module.

    Args:
        model: the root module (hooks are on it); inner: the user's module inside any wrapper.
        tracked: ids of the parameters the optimizer trains (``eval_mode_training`` only judges their modules).
        devices: devices whose generators a stochastic eval forward may draw from.
        with_optimizer: training steps are optimizer steps (``eval_mode_training`` is judged there).
        reporter: the judge's reporter (whether ``stochastic_inference`` is still active).
        emit: where verdicts go.
        step: the current step number.
    """

    def __init__(self, model: nn.Module, inner: nn.Module, tracked: set[int], devices: list[torch.device],
                 with_optimizer: bool, reporter: Reporter, emit: Callable[[Verdict], None],
                 step: Callable[[], int]) -> None:
        self.inner = inner
        self.tracked = tracked
        self.devices = devices
        self.with_optimizer = with_optimizer
        self.reporter = reporter
        self.emit = emit
        self.step = step
        self.replaying = False  # our own replays must not be judged as the user's forwards
        self.behaviour: list[tuple[str, nn.Module, ModeProfile]] = behaviour_modules(model)
        self.frozen: set[int] = Marks("frozen")
        self.stochastic: set[int] = Marks("stochastic")
        self._stack: list[dict[str, Any]] = []
        self._eval_in_training: list[tuple[str, nn.Module, ModeProfile]] = []
        self._scope_cache: dict[int, list[nn.Parameter]] = {}
        self._named_modules: dict[str, nn.Module] | None = None
        self._buffer_slots = [(f"{mn}.{bn}" if mn else bn, m, bn) for mn, m in inner.named_modules()
                              for bn in m._buffers]
        self._stochastic_where: list[str] | None = None
        self._draws: list[str] = []  # the torch functions that drew in the replay (see locate_rng)
        self._rng_explained = False

    @staticmethod
    def mark(into: set[int], modules: Iterable[nn.Module]) -> None:
        """Add ``modules`` and everything inside them to ``into``; anything that is not a module is refused before
        any is added (a TypeError naming the option: ``frozen=['encoder']`` passes a name, not the module).

        Raises:
            TypeError: an item is not a ``torch.nn.Module``.
        """
        items = list(modules)
        for m in items:
            if not isinstance(m, nn.Module):
                option = getattr(into, "option", "frozen/stochastic")
                raise TypeError(f"{option}= (and mark_{option}()) take the modules themselves, e.g. "
                                f"{option}=[model.encoder]; got {type(m).__name__} {m!r:.40}")
        for m in items:
            for sub in m.modules():
                into.add(id(sub))

    def note_training_forward(self) -> None:
        """A forward that may train begins: note the flag-dependent modules left in eval (judged at the step)."""
        if self.with_optimizer:
            self._eval_in_training = [b for b in self.behaviour if not b[1].training
                                      and id(b[1]) not in self.frozen and self._trains(b[0], b[1])]

    def judge_eval_in_training(self) -> None:
        """At an optimizer step: flag-dependent modules were in eval during this step's forward."""
        if self._eval_in_training:
            self.emit(mode_rules.eval_mode_training(self.step(), self._eval_in_training))
            self._eval_in_training = []

    def before_forward(self, args: Any, kwargs: Any) -> bool:
        """Judge a forward as it starts. Returns True for the outermost forward with gradients on (a training
        forward: the caller starts its per-forward sampling there)."""
        grad = torch.is_grad_enabled()  # False under no_grad and inference_mode
        outer = not self._stack  # a model may call itself; judge the outermost call
        obs: dict[str, Any] = {"grad": grad}
        training_forward = grad and outer
        if grad:  # a forward that may train: the per-step path, host flags only
            self.note_training_forward()
        elif _any_requires_grad(args, kwargs):
            # Reentrant activation checkpointing runs a training forward under no_grad (and again in backward):
            # not an evaluation.
            outer = False
        # An inference forward: gradients off, or nothing with train/eval behaviour in training mode (a frozen
        # backbone in eval with a head in training is still training).
        training_mods = [b for b in self.behaviour if b[1].training]
        if outer and (not grad or (not self.inner.training and not training_mods)):
            deliberate = [b for b in training_mods if id(b[1]) in DELIBERATE_TRAINING]
            if not grad and len(deliberate) < len(training_mods):
                rest = [b for b in training_mods if id(b[1]) not in DELIBERATE_TRAINING]
                # model.eval() then dropout.train() by hand: Monte-Carlo dropout, most likely on purpose
                by_hand_mc = not self.inner.training and all(
                    b[2].stochastic_in_training and not b[2].mutates_state_in_training for b in rest)
                self.emit(mode_rules.train_mode_inference(self.step(), rest, by_hand_mc))
            obs["buffers"] = self._buffer_versions()
            if not training_mods and not self._rng_explained:
                obs["rng"] = rng_state(self.devices)
                obs["inputs"] = (args, kwargs)
        self._stack.append(obs)
        return training_forward

    def after_forward(self) -> None:
        """Judge a forward as it ends (buffers changed, random numbers drawn)."""
        if not self._stack:
            return
        obs = self._stack.pop()
        if "buffers" in obs:
            changed = self._changed_buffers(obs["buffers"])
            if changed:
                why = "no_grad" if not obs["grad"] else "eval"
                self.emit(mode_rules.inference_mutates_state(self.step(), changed, why))
        if "rng" in obs and not same_rng(obs["rng"], rng_state(self.devices)):
            self._on_stochastic_eval(*obs["inputs"])

    def clear(self) -> None:
        self._stack.clear()

    def _on_stochastic_eval(self, args: Any, kwargs: Any) -> None:
        """An eval forward drew random numbers: name the module with one replay (not one per forward: while the
        condition is reported and active, later forwards only keep it alive)."""
        if self._stochastic_where is None or ("stochastic_inference",) not in self.reporter.active:
            self.replaying = True
            try:
                where, self._draws = locate_rng(self.inner, args, kwargs, self.devices)
            except Exception:
                where = []  # the replay only names the module; the finding stands without it
            finally:
                self.replaying = False
            marked = [n for n in where if id(self.modules_by_name().get(n)) in self.stochastic]
            if where and len(marked) == len(where):
                self._rng_explained = True  # only modules the user declared stochastic: stop checking
                return
            self._stochastic_where = [n for n in where if n not in marked]
        self.emit(mode_rules.stochastic_inference(self.step(), self._stochastic_where, self._draws,
                                                  type(self.inner).__name__))

    def modules_by_name(self) -> dict[str, nn.Module]:
        if self._named_modules is None:
            self._named_modules = dict(self.inner.named_modules())
        return self._named_modules

    def _trains(self, name: str, module: nn.Module) -> bool:
        """Whether the optimizer trains parameters in the scope of this module: its own, or (for parameter-free
        modules such as Dropout) those of the nearest enclosing module that has any."""
        scope = self._scope_cache.get(id(module))
        if scope is None:
            mods = self.modules_by_name()
            current = module
            while not any(True for _ in current.parameters()) and name:  # nearest module that has parameters
                name = name.rpartition(".")[0]
                current = mods[name]
            scope = [p for p in current.parameters() if id(p) in self.tracked]
            self._scope_cache[id(module)] = scope
        return any(p.requires_grad for p in scope)  # read now: the user may freeze or unfreeze later

    def _buffer_versions(self) -> dict[str, tuple[int, int]]:
        """(identity, version counter) of every buffer known at attach; the counter is host-side, reading it does
        not touch the device. Buffers are looked up by owner and name, so a reassigned buffer is seen."""
        out = {}
        for qual, owner, key in self._buffer_slots:
            b = owner._buffers.get(key)
            if b is None:
                continue
            try:
                out[qual] = (id(b), b._version)
            except RuntimeError:  # an inference tensor has no version counter: only reassignment is seen
                out[qual] = (id(b), -1)
        return out

    def _changed_buffers(self, before: dict[str, tuple[int, int]]) -> list[str]:
        after = self._buffer_versions()
        changed = [n for n, v in after.items() if before.get(n) != v]
        # BatchNorm's kernel updates running_mean/var without bumping their counters; num_batches_tracked does.
        for n in list(changed):
            if n.endswith("num_batches_tracked"):
                prefix = n[: -len("num_batches_tracked")]
                changed += [prefix + s for s in ("running_mean", "running_var")
                            if prefix + s in after and prefix + s not in changed]
        return sorted(changed)

"""Guard: wires hooks -> stats -> detectors -> reporter -> sinks around a user's model and optimizer.

Per optimizer step (the hot path) the Guard only launches device work: fused gradient norms folded per layer and
one small row appended to a list. Nothing is read back to the host there. Every ``log_every`` steps the pending
rows (and any samples) are concatenated and copied to the host in one transfer, the running statistics are
derived there, and the detectors run on exact per-step numbers, so each diagnosis names the step it happened at.
"""

from __future__ import annotations

import functools
import json
import math
import platform
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO, cast

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from . import __version__
from .detect import modes as mode_rules
from .detect.exploding import detect_exploding_step, detect_exploding_window, detect_spike_damage, step_candidates
from .detect.history import History, Thresholds, clip_acted
from .detect.nonfinite import detect_nonfinite
from .detect.reporter import Reporter, Verdict
from .detect.units import detect_units
from .detect.vanishing import detect_vanishing
from .modes import DELIBERATE_TRAINING, ModeProfile, behaviour_modules
from .repair.clip import ClipMethod, ScalarClip, ZClip, make_clip
from .repair.ladder import Ladder
from .repair.log import ActionLog
from .report.sinks import ConsoleSink, JsonlSink, Sink
from .stats.activations import ActivationSampler
from .stats.distributed import all_reduce_sum, has_collective_forward, is_sharded, local, world
from .stats.layers import LayerMap, build_layer_map, is_compiled, unwrap
from .stats.norms import LayerNorms, finish, total_norm
from .stats.sentinel import Origin, locate, locate_rng, rng_state, same_rng
from .types import Action, Diagnosis

_ABSENT = object()  # "the optimizer had no such attribute", as opposed to one set to None

# Columns of a step row: total gradient norm, loss, total norm after clipping, whether GradScaler found inf/NaN
# (and so skips the step itself), then the per-layer gradient norms.
TOTAL, LOSS, CLIPPED, SCALER_INF, HEAD = 0, 1, 2, 3, 4


class GuardInternalWarning(RuntimeWarning):
    """gradguard failed internally; it switched monitoring off and left training untouched."""


def _stats_device(params: list[nn.Parameter]) -> torch.device:
    """Where the statistics live: the first accelerator holding a parameter, else the CPU.

    An accelerator is preferred so that per-group norms only ever move toward it (a non-blocking copy from an
    accelerator into CPU memory could be read before it lands).
    """
    for p in params:
        if p.device.type != "cpu":
            return p.device
    return torch.device("cpu")


def _any_requires_grad(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    return any(isinstance(a, torch.Tensor) and a.requires_grad for a in (*args, *kwargs.values()))


def _closure_given(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether ``optimizer.step`` was called with a closure (the hooks see ``args = (optimizer, closure)``)."""
    return kwargs.get("closure") is not None or any(callable(a) for a in args)


def _evaluate_closure(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    """Run the closure of ``optimizer.step(closure)`` now (forward and backward, under grad as ``step`` would) and
    return its result with the arguments rewritten to pass a closure that only returns that result."""
    i = -1 if kwargs.get("closure") is not None else next(i for i, a in enumerate(args) if callable(a))
    with torch.enable_grad():
        result = (kwargs["closure"] if i < 0 else args[i])()
    if i < 0:
        return result, args, {**kwargs, "closure": lambda: result}
    return result, (*args[:i], lambda: result, *args[i + 1:]), kwargs


class Guard:
    """Watch every layer's gradients during training and diagnose exploding, vanishing and non-finite gradients,
    dead and saturated units.

    Attach it and keep the loop unchanged::

        guard = gradguard.Guard(model, optimizer)
        for x, y in data:
            loss = loss_fn(model(x), y)
            guard.observe_loss(loss)          # optional: lets detectors tell learning from stalling
            optimizer.zero_grad(); loss.backward(); optimizer.step()
        print(guard.diagnoses)
        guard.close()

    Args:
        model: the model being trained (DataParallel/DDP/torch.compile wrappers are looked through; layer names
            are those of the inner module).
        optimizer: the optimizer training it, or None to call ``check()`` by hand after ``backward()``.
        repair: "auto" turns on the repair ladder (``gradguard.repair.ladder``): non-finite steps are skipped with
            optimizer state and parameters untouched, spikes are clipped adaptively (ZClip unless ``clip`` is
            given), a sustained explosion backs the learning rate off (``lr_backoff``; given back once stable), and
            divergence rolls model and optimizer back to the last good snapshot (taken every ``snapshot_every``
            steps into host memory). Each repair is an Action in ``guard.actions`` and events.jsonl. The skip costs
            one small host read per step on an accelerator unless the optimizer is fused (then the fused kernel's
            ``found_inf`` does it on the device), as torch.amp.GradScaler does. ``optimizer.step(closure)`` is
            repaired too (the closure runs first; PyTorch Lightning steps this way), except with LBFGS.
        lr_backoff, lr_restore_after, snapshot_every, max_rollbacks: settings of the repair ladder (backoff
            factor, stable steps before each step back up, steps between snapshots, rollbacks before giving up).
        log_every: steps between host reads of the statistics (one copy each); detectors run then.
        sample_every: steps between the costlier samples (weight norms and update ratios, activation and
            time-step gradient statistics).
        log_dir: if given, write ``meta.json``, ``stats.jsonl`` and ``events.jsonl`` there (schema in
            ``gradguard.report.sinks``).
        console: print each diagnosis once, as it is found (on stderr; pass a text stream to print there).
        nonfinite_check: "auto" checks for NaN/Inf at every step when the statistics live on the CPU (a host
            value there costs nothing) and every ``log_every`` steps on an accelerator; "step" checks every step
            everywhere (one small host sync per step on an accelerator, as GradScaler does); "deferred" never
            reads per step. A per-step check replays a non-finite step's forward before the optimizer applies it,
            to name the module where the NaN/Inf was born.
        thresholds: detector thresholds (``gradguard.Thresholds``).
        ema_beta: decay of the running mean/variance of the total gradient norm and of the loss.
        frozen: modules deliberately kept in eval mode while training (e.g. frozen BatchNorm); the mode checks
            leave them, and everything inside them, alone. ``mark_frozen()`` adds more later.
        clip: clip the gradients before every step, reading the norms just measured (no second pass): a max
            norm (the same numbers as ``torch.nn.utils.clip_grad_norm_``), "zclip", "autoclip", "agc", or a
            ``gradguard.repair`` ClipMethod. Statistics and diagnoses describe the gradients before clipping; each
            clipped step is recorded as an Action of kind "clip".
        stochastic: modules that sample on purpose in eval mode (a VAE's sampler, a diffusion step);
            ``stochastic_inference`` leaves them alone. ``mark_stochastic()`` adds more later.
        sinks: more places for the records (``gradguard.report`` has TensorBoard, Weights & Biases and MLflow
            sinks; anything with ``write(record)`` and ``close()`` works): each diagnosis and action as it is
            found, and one ``{"type": "stats", ...}`` record per statistics read (the fields of a stats.jsonl
            line). They are closed by ``close()``.

    Mode checks (hooks on the root module only): ``train_mode_inference`` (a forward with gradients off while
    flag-dependent modules are in training), ``inference_mutates_state`` (buffers changed by such a forward or an
    eval-mode forward), ``stochastic_inference`` (an eval-mode forward drew random numbers; a replay names the
    module), ``eval_mode_training`` (the optimizer trains while flag-dependent modules are in eval).

    Raises:
        ValueError: no trainable parameter, parameters in the optimizer that the model does not own, bad options.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        repair: bool | str = False,
        log_every: int = 10,
        sample_every: int = 25,
        log_dir: str | Path | None = None,
        console: bool | TextIO = True,
        nonfinite_check: str = "auto",
        thresholds: Thresholds | None = None,
        ema_beta: float = 0.97,
        frozen: Iterable[nn.Module] = (),
        stochastic: Iterable[nn.Module] = (),
        clip: float | str | ClipMethod | None = None,
        lr_backoff: float = 0.5,
        lr_restore_after: int = 100,
        snapshot_every: int = 100,
        max_rollbacks: int = 3,
        sinks: Iterable[Sink] = (),
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Guard needs a torch.nn.Module, got {type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
        if repair not in (False, None, True, "auto"):
            raise ValueError(f"repair must be False or 'auto', got {repair!r}")
        if repair and optimizer is None:
            raise ValueError("repair='auto' acts on optimizer steps: pass the optimizer (Guard(model, optimizer, ...))")
        if log_every < 1 or sample_every < 1:
            raise ValueError(f"log_every and sample_every must be >= 1, got {log_every} and {sample_every}")
        if nonfinite_check not in ("auto", "step", "deferred"):
            raise ValueError(f"nonfinite_check must be 'auto', 'step' or 'deferred', got {nonfinite_check!r}")
        if not 0.0 < ema_beta < 1.0:
            raise ValueError(f"ema_beta must be in (0, 1), got {ema_beta}")

        self.model = model
        self.optimizer = optimizer
        self.inner = unwrap(model)
        self.layers: LayerMap = build_layer_map(model, optimizer)
        self.device = _stats_device(self.layers.params)
        self.log_every = log_every
        self.sample_every = sample_every
        self.thresholds = thresholds or Thresholds()
        self.ema_beta = ema_beta
        self.clip = make_clip(clip)
        self.ladder = (Ladder(lr_backoff, restore_after=lr_restore_after, snapshot_every=snapshot_every,
                              max_rollbacks=max_rollbacks) if repair else None)
        if self.ladder is not None and self.clip is None:
            self.clip = ZClip()  # rung 2: spikes are clipped adaptively
        self._recorded = False  # the repaired step measured already; the pre-hook must not measure twice
        self._external = False  # record_gradients() measured this step (a framework callback, before its clip)
        self._step_wrapper: Callable[..., Any] | None = None
        self._orig_step: Callable[..., Any] | None = None
        self._fused_saved: tuple[Any, Any] | None = None
        self._ready_at: tuple[int, int] | None = None  # (states, parameters) when all last had optimizer state
        self._clip_index: dict[tuple[int, ...], torch.Tensor] = {}
        self.immediate = nonfinite_check == "step" or (nonfinite_check == "auto" and self.device.type == "cpu")
        self.compiled = is_compiled(model)

        self.step = 0  # optimizer steps taken since attach (or restored by load_state_dict)
        self._loss_sum: torch.Tensor | None = None  # device sum of observed loss tensors this step
        self._loss_host = 0.0  # sum of observed Python numbers (kept on the host: no copy to the device)
        self._loss_n = 0
        self._norms: LayerNorms | None = None
        self._rows: list[torch.Tensor] = []
        self._row_steps: list[int] = []
        self._row_loss_seen: list[bool] = []
        # (step, weight norms, update norms [+ weight norms after the step] or None)
        self._samples: list[tuple[int, torch.Tensor, torch.Tensor | None]] = []
        self._snapshot: tuple[int, torch.Tensor, list[torch.Tensor] | tuple[torch.Tensor, ...]] | None = None
        self._acts: list[tuple[int, str, int, str, torch.Tensor]] = []
        self._times: list[tuple[int, str, torch.Tensor, torch.Tensor, int]] = []
        self._activation_order: list[str] = []
        self._origins: dict[int, Origin | None] = {}
        self._last_inputs: tuple[tuple[Any, ...], dict[str, Any]] | None = None
        self._history: History | None = None
        self._pending_state: dict[str, Any] | None = None
        # A condition checked only on sample steps must not look "gone" between two samples.
        self._reporter = Reporter(max(self.thresholds.cooldown, 2 * sample_every))
        self._diagnoses: list[Diagnosis] = []
        self._actions = ActionLog()
        self._handles: list[RemovableHandle] = []
        self._order_handles: list[RemovableHandle] = []
        self._order: list[str] = []
        self._closed = False
        self._failed = False
        self._draining = False
        self._acts_seen = 0
        self._replaying = False  # our own replays must not be judged as the user's forwards
        self._behaviour: list[tuple[str, nn.Module, ModeProfile]] = behaviour_modules(model)
        self._frozen: set[int] = set()
        self.mark_frozen(*frozen)
        self._forward_stack: list[dict[str, Any]] = []
        self._eval_in_training: list[tuple[str, nn.Module, ModeProfile]] = []
        self._devices = sorted({p.device for p in self.layers.params}, key=str)
        self._tracked_ids = {id(p) for p in self.layers.params}
        self._scope_cache: dict[int, list[nn.Parameter]] = {}
        self._named_modules: dict[str, nn.Module] | None = None
        self._buffer_slots = [(f"{mn}.{bn}" if mn else bn, m, bn) for mn, m in self.inner.named_modules()
                              for bn in m._buffers]
        self._stochastic: set[int] = set()
        self.mark_stochastic(*stochastic)
        self._stochastic_where: list[str] | None = None
        self._rng_explained = False

        # torch.distributed: every rank measures and decides (the same numbers: see stats/distributed.py); only
        # rank 0 prints and writes logs.
        self.rank, self.world = world()
        self._sharded = self.world > 1 and any(is_sharded(p) for p in self.layers.params)
        self._pending_update: tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
        # A replay re-runs the forward on this rank alone: never where a forward talks to the other ranks.
        self._can_replay = self.world == 1 or not has_collective_forward(self.inner)
        if self.rank != 0:
            console, log_dir = False, None
        self._sinks: list[Sink] = []
        self._stats_sink: JsonlSink | None = None
        if console:
            self._sinks.append(ConsoleSink(None if console is True else console))
        self.log_dir = Path(log_dir) if log_dir is not None else None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._sinks.append(JsonlSink(self.log_dir / "events.jsonl"))
            self._stats_sink = JsonlSink(self.log_dir / "stats.jsonl")
            self._write_meta()
        self._idle_sinks: list[Sink] = []  # the user's sinks on ranks other than 0: closed, never written
        self._own_sinks = len(self._sinks)  # console and events.jsonl take events only; the user's take stats too
        for sink in sinks:
            if not (callable(getattr(sink, "write", None)) and callable(getattr(sink, "close", None))):
                raise TypeError(f"a sink needs write(record) and close() methods; got {type(sink).__name__}")
            self._sinks.append(sink) if self.rank == 0 else self._idle_sinks.append(sink)

        named = list(self.inner.named_modules())
        self._sampler = ActivationSampler([] if self.compiled else named)
        try:
            if optimizer is not None:
                self._handles.append(optimizer.register_step_pre_hook(self._pre_step_hook))
                self._handles.append(optimizer.register_step_post_hook(self._post_step_hook))
            self._handles.append(model.register_forward_pre_hook(self._forward_pre_hook, with_kwargs=True))
            self._handles.append(model.register_forward_hook(self._forward_post_hook, always_call=True))
            if self.ladder is not None:
                self._install_step_wrapper()
            if not self.compiled:
                # One-shot: learn the forward order of the layers from the first forward, then remove these.
                wanted = {id(m) for m in self.layers.modules}
                for n, m in named:
                    if id(m) in wanted:
                        self._order_handles.append(m.register_forward_pre_hook(self._order_hook(n)))
                self._sampler.arm()  # step 0 is a sample step
        except Exception:
            self._remove_hooks()  # nothing half-attached stays behind
            for s in self._sinks:
                s.close()
            raise

    # ------------------------------------------------------------------ public API

    @property
    def diagnoses(self) -> list[Diagnosis]:
        """Every diagnosis so far, in the order found. Reads pending statistics first (a host sync, on demand)."""
        self._drain_safely()
        return list(self._diagnoses)

    @property
    def history(self) -> History | None:
        """The host-side per-step record the detectors read (None before the first step). Reads pending
        statistics first (a host sync, on demand)."""
        self._drain_safely()
        return self._history

    @property
    def actions(self) -> list[Action]:
        """What gradguard did to the run, in order: clips (with ``clip=``), and with ``repair="auto"`` skipped steps,
        learning-rate backoffs and restores, rollbacks. Reads pending statistics first.

        Memory is bounded: only the last 256 clips (and the last 4,096 other actions) are kept here;
        ``action_counts`` counts all of them, and every one is written to the sinks (``events.jsonl``).
        """
        self._drain_safely()
        return self._actions.to_list()

    @property
    def action_counts(self) -> dict[str, int]:
        """How many actions of each kind gradguard took since attach (``{"clip": 1200, "skip_step": 2}``), including
        the clips too old to be kept in ``actions``. Reads pending statistics first."""
        self._drain_safely()
        return dict(self._actions.counts)

    def mark_frozen(self, *modules: nn.Module) -> None:
        """Say that these modules (and everything inside them) are in eval mode on purpose while training, e.g.
        a frozen BatchNorm during fine-tuning: ``eval_mode_training`` leaves them alone."""
        for m in modules:
            for sub in m.modules():
                self._frozen.add(id(sub))

    def mark_stochastic(self, *modules: nn.Module) -> None:
        """Say that these modules (and everything inside them) draw random numbers in eval mode on purpose:
        ``stochastic_inference`` leaves them alone."""
        for m in modules:
            for sub in m.modules():
                self._stochastic.add(id(sub))

    def observe_loss(self, loss: torch.Tensor | float) -> None:
        """Record this step's loss for the detectors; never synchronises. A no-op after ``close()``.

        Args:
            loss: the scalar loss tensor (or a Python/NumPy number). Several calls before one optimizer step
                (gradient accumulation) are averaged.

        Raises:
            TypeError: ``loss`` is not a tensor or a number. ValueError: it has more than one element.
        """
        if self._closed or self._failed:
            return
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                raise ValueError(f"observe_loss expects a scalar loss, got a tensor of shape {tuple(loss.shape)}; "
                                 "reduce it first (loss.mean())")
            value = loss.detach().reshape(()).to(device=self.device, dtype=torch.float32, non_blocking=True)
            self._loss_sum = value if self._loss_sum is None else self._loss_sum + value
        elif isinstance(loss, (int, float, np.integer, np.floating)) and not isinstance(loss, bool):
            self._loss_host += float(loss)
        else:
            raise TypeError(f"observe_loss expects the loss tensor (or a number), got {type(loss).__name__}")
        self._loss_n += 1

    def check(self) -> list[Diagnosis]:
        """Run the gradient checks now, on the gradients ``backward()`` left in the parameters.

        For ``Guard(model, None)``: each call counts as one step. With an optimizer attached, steps are counted
        by the optimizer and this only reads pending statistics.

        Returns:
            The diagnoses found by this call.

        Raises:
            RuntimeError: the Guard is closed.
        """
        if self._closed:
            raise RuntimeError("this Guard is closed; create a new gradguard.Guard to keep checking")
        before = len(self._diagnoses)
        if self.optimizer is None and not self._failed:
            try:
                self._record_step(snapshot=False)
                self._end_step()
            except Exception as e:  # never crash the user's training step
                self._internal_failure(e)
        self._drain_safely()
        return self._diagnoses[before:]

    def record_gradients(self, found_inf: torch.Tensor | None = None) -> None:
        """Measure this step's gradients now; the optimizer's hooks then leave this step alone.

        For frameworks that change the gradients between ``backward()`` and ``optimizer.step()`` (Lightning and
        transformers clip there): call it first, so the statistics and diagnoses describe the gradients as the
        model produced them. With ``clip=``, gradguard clips here too. Never synchronises.

        Args:
            found_inf: a GradScaler's overflow flag for this step (the sum of its per-device ``found_inf``), when
                the gradients were unscaled by ``scaler.unscale_`` and the scaler may still skip the step: such a
                step is not counted and raises no ``nonfinite`` (the scaler handles it).

        Raises:
            RuntimeError: the Guard is closed, or has no optimizer (use ``check()`` then).
        """
        if self._closed:
            raise RuntimeError("this Guard is closed; create a new gradguard.Guard to keep recording")
        if self.optimizer is None:
            raise RuntimeError("record_gradients() needs the optimizer that takes the step; without one, call "
                               "check() after backward()")
        if self._failed:
            return
        try:
            # A record whose step never came (the scaler skipped it) is dropped at the read by its flag; the new
            # one replaces it, under the same step number.
            self._judge_eval_in_training()
            self._record_step(snapshot=True, found_inf=found_inf)
            self._external = True
        except Exception as e:  # never crash the user's training step
            self._internal_failure(e)

    def training_forward_started(self) -> None:
        """Say that a training forward begins, for loops that never call the watched model's own ``forward`` (a
        LightningModule whose ``training_step`` calls ``self.net(x)``). The Guard's hook on the root module does
        this itself otherwise: start the activation sampler's per-forward counts, and note the flag-dependent
        modules left in eval for ``eval_mode_training`` (judged at the optimizer step). Host facts only.
        """
        if self._closed or self._failed:
            return
        try:
            self._sampler.new_forward()
            if self.optimizer is not None and torch.is_grad_enabled():
                self._eval_in_training = [b for b in self._behaviour if not b[1].training
                                          and id(b[1]) not in self._frozen and self._trains(b[0], b[1])]
        except Exception as e:  # never crash the user's training step
            self._internal_failure(e)

    def close(self) -> None:
        """Read pending statistics, remove every hook, flush and close the sinks. Safe to call twice."""
        if self._closed:
            return
        try:
            self._settle_pending_update()
            self._drain_safely()
        finally:
            self._closed = True
            self._remove_hooks()
            for s in self._sinks + self._idle_sinks:
                s.close()
            if self._stats_sink is not None:
                self._stats_sink.close()

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: step count, running statistics, early baselines, reported conditions.

        Returns:
            A dict of plain Python values (JSON-serialisable).
        """
        self._drain_safely()
        if self._history is not None:
            history = self._history.state_dict()
        elif self._pending_state is not None:
            history = self._pending_state
        else:
            history = History(list(self.layers.names), np.zeros(0), np.zeros(0), self.ema_beta).state_dict()
        return {"version": 1, "step": self.step, "history": history, "reporter": self._reporter.state_dict(),
                "clip": self.clip.state_dict() if self.clip is not None else {},
                "ladder": self.ladder.state_dict() if self.ladder is not None else {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()`` of an earlier Guard on the same model.

        Raises:
            ValueError: the state was saved for other layers.
        """
        if set(state["history"]["layers"]) != set(self.layers.names):
            raise ValueError("this state was saved for a model with other layers; load it into a Guard on the same "
                             "model architecture")
        self.step = int(state["step"])
        self._reporter.load_state_dict(state["reporter"])
        if self.clip is not None and state.get("clip"):
            self.clip.load_state_dict(state["clip"])
        if self.ladder is not None and state.get("ladder"):
            self.ladder.load_state_dict(state["ladder"])
        if self._history is not None:
            self._history.load_state_dict(state["history"])
        else:
            self._pending_state = state["history"]

    # ------------------------------------------------------------------ hooks (hot path)

    def _pre_step_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._closed or self._failed:
            return
        try:
            self._judge_eval_in_training()
            if not _closure_given(args, kwargs) and not self._recorded and not self._external:
                self._record_step(snapshot=True)
            # With a closure (LBFGS) the gradients exist only once step() has run it: record in the post hook.
        except Exception as e:  # never crash the user's training step
            self._internal_failure(e)

    def _judge_eval_in_training(self) -> None:
        """At an optimizer step: flag-dependent modules were in eval during this step's forward."""
        if self._eval_in_training:
            self._emit(mode_rules.eval_mode_training(self.step, self._eval_in_training))
            self._eval_in_training = []

    def _post_step_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._closed or self._failed:
            return
        try:
            if self.ladder is None:
                self._restore_fused_flags()  # the repaired step restores its own after the step
            if _closure_given(args, kwargs) and not self._external and not self._recorded:
                self._record_step(snapshot=False, clip=False)  # after the step: nothing left to clip
            elif self._snapshot is not None:
                step, wnorm, before = self._snapshot
                self._snapshot = None
                # in place: w_before - w_after (a DTensor's local shard: the snapshot holds shards)
                torch._foreach_sub_(before, [local(p.detach()) for p in self.layers.params])
                if self._sharded:  # summed over ranks in the next step's all-reduce (one per step)
                    self._pending_update = (step, wnorm, *self._norms_or_new().squares(before))
                else:
                    # ||w_after|| too: with ||w_before|| and ||dw|| it gives the update's part across the weights,
                    # apart from the radial shrinking of weight decay (History.update_ratios, orthogonal=True).
                    after = self._layer_norms([local(p.detach()) for p in self.layers.params])
                    self._samples.append((step, wnorm, torch.cat([self._layer_norms(before), after])))
            self._external = False
            self._end_step()
        except Exception as e:
            self._internal_failure(e)

    def _end_step(self) -> None:
        self.step += 1
        if self.step % self.sample_every == 0 and not self.compiled:
            self._sampler.arm()  # the next forward is a sampled one
        if len(self._rows) >= self.log_every:
            self._drain()

    # ------------------------------------------------------------------ repair="auto": the step wrapper

    def _install_step_wrapper(self) -> None:
        """Shadow ``optimizer.step`` with an instance attribute (the class method, its hooks and any LR scheduler
        wrapper stay inside): the only way to skip a non-fused step without touching its state."""
        assert self.optimizer is not None
        self._orig_step = self.optimizer.step

        def step(*args: Any, **kwargs: Any) -> Any:
            return self._repaired_step(*args, **kwargs)

        # Carry the wrapped step's attributes (an LR scheduler marks its own wrapper and checks for the mark).
        functools.update_wrapper(step, self._orig_step)
        self._step_wrapper = step
        self.optimizer.step = step  # type: ignore[method-assign]

    def _remove_step_wrapper(self) -> None:
        if self.optimizer is None:
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

    def _repaired_step(self, *args: Any, **kwargs: Any) -> Any:
        assert self._orig_step is not None and self.optimizer is not None and self.ladder is not None
        closure = _closure_given(args, kwargs)
        # LBFGS evaluates its closure many times inside one step: there is no single gradient to judge beforehand.
        if self._closed or self._failed or (closure and isinstance(self.optimizer, torch.optim.LBFGS)):
            return self._orig_step(*args, **kwargs)
        result = None
        if closure:
            # A one-evaluation optimizer stepped with a closure (PyTorch Lightning does this): evaluate it first,
            # so the gradients can be measured, clipped, or the step skipped before the update, then hand the
            # optimizer a closure that returns the same result (it calls it once, as it would have).
            result, args, kwargs = _evaluate_closure(args, kwargs)
        try:
            if not self._external:  # else record_gradients() measured (and clipped) this step already
                self._judge_eval_in_training()
                self._record_step(snapshot=True)
            self._recorded = True
            skip = self._skip_decision()
        except Exception as e:  # never crash the user's training step
            self._recorded = False
            self._internal_failure(e)
            return self._orig_step(*args, **kwargs)
        if skip:
            self._recorded = self._external = False
            self._snapshot = None
            self._restore_fused_flags()
            self._act(Action("skip_step", self.step, {"why": "non-finite gradients"}))
            self._end_step()
            return result  # what step(closure) returns: the closure's loss (None without a closure)
        saved = self.ladder.scale_lr(self.optimizer)
        try:
            return self._orig_step(*args, **kwargs)
        finally:
            self.ladder.unscale_lr(self.optimizer, saved)
            self._recorded = False
            self._restore_fused_flags()

    def _skip_decision(self) -> bool:
        """Rung 1. A fused optimizer gets the flag as its ``found_inf`` (the kernel skips, state untouched, no
        sync); any other optimizer cannot be stopped from the device, so the flag is read: one small host read
        per step on an accelerator (free on the CPU), as torch.amp.GradScaler does."""
        assert self.optimizer is not None
        bad = ~torch.isfinite(self._last_total)
        if self._fused() and self._state_ready():
            flag = bad.to(torch.float32)
            prior = getattr(self.optimizer, "found_inf", None)  # GradScaler's own flag: combine, not replace
            self._set_fused_attr("found_inf", torch.maximum(prior, flag.to(prior.device)) if prior is not None
                                 else flag)
            return False
        return bool(bad)  # the documented per-step host read (see above)

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

    def _fused(self) -> bool:
        return self.optimizer is not None and all(g.get("fused") for g in self.optimizer.param_groups)

    def _set_fused_attr(self, name: str, value: torch.Tensor) -> None:
        """Set ``grad_scale`` / ``found_inf`` for this step's fused kernel, remembering what was there (GradScaler
        sets them too); ``_restore_fused_flags`` puts it back after the step."""
        opt: Any = self.optimizer
        if self._fused_saved is None:  # absent and None differ: GradScaler later deletes what it set to None
            self._fused_saved = (opt.__dict__.get("grad_scale", _ABSENT), opt.__dict__.get("found_inf", _ABSENT))
        setattr(opt, name, value)

    def _restore_fused_flags(self) -> None:
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

    def _forward_pre_hook(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        if self._closed or self._failed or self._replaying:
            return
        try:
            grad = torch.is_grad_enabled()  # False under no_grad and inference_mode
            outer = not self._forward_stack  # a model may call itself; judge the outermost call
            obs: dict[str, Any] = {"grad": grad}
            if grad:  # a forward that may train: the per-step path, host flags only
                if outer:
                    self._sampler.new_forward()
                    if self.immediate:
                        self._last_inputs = (args, kwargs)  # references, for a replay if this step turns non-finite
                if self.optimizer is not None:  # judged at the next optimizer step, if one follows
                    self._eval_in_training = [b for b in self._behaviour if not b[1].training
                                              and id(b[1]) not in self._frozen and self._trains(b[0], b[1])]
            elif _any_requires_grad(args, kwargs):
                # Reentrant activation checkpointing runs a training forward under no_grad (and again in
                # backward): not an evaluation.
                outer = False
            # An inference forward: gradients off, or nothing with train/eval behaviour in training mode (a
            # frozen backbone in eval with a head in training is still training).
            training_mods = [b for b in self._behaviour if b[1].training]
            if outer and (not grad or (not self.inner.training and not training_mods)):
                deliberate = [b for b in training_mods if id(b[1]) in DELIBERATE_TRAINING]
                if not grad and len(deliberate) < len(training_mods):
                    rest = [b for b in training_mods if id(b[1]) not in DELIBERATE_TRAINING]
                    # model.eval() then dropout.train() by hand: Monte-Carlo dropout, most likely on purpose
                    by_hand_mc = not self.inner.training and all(
                        b[2].stochastic_in_training and not b[2].mutates_state_in_training for b in rest)
                    self._emit(mode_rules.train_mode_inference(self.step, rest, by_hand_mc))
                obs["buffers"] = self._buffer_versions()
                if not training_mods and not self._rng_explained:
                    obs["rng"] = rng_state(self._devices)
                    obs["inputs"] = (args, kwargs)
            self._forward_stack.append(obs)
        except Exception as e:
            self._internal_failure(e)

    def _forward_post_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._closed or self._failed or self._replaying or not self._forward_stack:
            return
        try:
            obs = self._forward_stack.pop()
            if "buffers" in obs:
                changed = self._changed_buffers(obs["buffers"])
                if changed:
                    why = "no_grad" if not obs["grad"] else "eval"
                    self._emit(mode_rules.inference_mutates_state(self.step, changed, why))
            if "rng" in obs and not same_rng(obs["rng"], rng_state(self._devices)):
                self._on_stochastic_eval(*obs["inputs"])
        except Exception as e:
            self._internal_failure(e)

    def _on_stochastic_eval(self, args: Any, kwargs: Any) -> None:
        """An eval forward drew random numbers: name the module with one replay (not one per forward: while the
        condition is reported and active, later forwards only keep it alive)."""
        if self._stochastic_where is None or ("stochastic_inference",) not in self._reporter.active:
            self._replaying = True
            try:
                where = locate_rng(self.inner, args, kwargs, self._devices)
            except Exception:
                where = []  # the replay only names the module; the finding stands without it
            finally:
                self._replaying = False
            marked = [n for n in where if id(self._modules_by_name().get(n)) in self._stochastic]
            if where and len(marked) == len(where):
                self._rng_explained = True  # only modules the user declared stochastic: stop checking
                return
            self._stochastic_where = [n for n in where if n not in marked]
        self._emit(mode_rules.stochastic_inference(self.step, self._stochastic_where))

    def _modules_by_name(self) -> dict[str, nn.Module]:
        if self._named_modules is None:
            self._named_modules = dict(self.inner.named_modules())
        return self._named_modules

    def _trains(self, name: str, module: nn.Module) -> bool:
        """Whether the optimizer trains parameters in the scope of this module: its own, or (for parameter-free
        modules such as Dropout) those of the nearest enclosing module that has any."""
        scope = self._scope_cache.get(id(module))
        if scope is None:
            mods = self._modules_by_name()
            current = module
            while not any(True for _ in current.parameters()) and name:  # nearest module that has parameters
                name = name.rpartition(".")[0]
                current = mods[name]
            scope = [p for p in current.parameters() if id(p) in self._tracked_ids]
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

    def _act(self, action: Action) -> None:
        self._actions.append(action)
        for sink in self._sinks:
            sink.write(action.to_dict())

    def _emit(self, verdict: Verdict) -> None:
        d = self._reporter.offer(verdict)
        if d is not None:
            self._diagnoses.append(d)
            for sink in self._sinks:
                sink.write(d.to_dict())

    def _order_hook(self, name: str) -> Callable[[nn.Module, Any], None]:
        def hook(module: nn.Module, args: Any) -> None:
            if name not in self._order:
                self._order.append(name)
        return hook

    def _record_step(self, snapshot: bool, clip: bool = True, found_inf: torch.Tensor | None = None) -> None:
        """Measure this step's gradients on the device and queue the row. No host read unless ``immediate``."""
        if self._order_handles:
            for h in self._order_handles:
                h.remove()
            self._order_handles.clear()
            self.layers.reorder(self._order)
            self._norms = None
        params = self.layers.params
        sample = self.step % self.sample_every == 0
        wnorm: torch.Tensor | None = None
        if self._sharded:
            gnorm, wnorm, loss_pair = self._reduced_norms(sample)
        else:
            gnorm = self._layer_norms([p.grad for p in params])
        opt: Any = self.optimizer
        scale = getattr(opt, "grad_scale", None)
        if isinstance(scale, torch.Tensor):
            # GradScaler lets a fused optimizer unscale inside its kernel: the .grad we read are still scaled.
            gnorm = torch.where(gnorm >= 0, gnorm / scale.to(gnorm.device).float(), gnorm)
        scaler_inf = found_inf if found_inf is not None else getattr(opt, "found_inf", None)
        total = total_norm(gnorm)
        self._last_total = total
        seen = self._loss_n > 0
        if self._sharded:
            loss = loss_pair[0] / loss_pair[1].clamp_min(1.0)  # the mean over ranks of each rank's loss
        elif self.world > 1:
            pair = all_reduce_sum(self._local_loss_pair())  # DDP: the gradients agree already; the loss does not
            loss = pair[0] / pair[1].clamp_min(1.0)
        elif seen:
            loss = torch.full((), self._loss_host, dtype=torch.float32, device=self.device)  # a fill, not a copy
            if self._loss_sum is not None:
                loss = loss + self._loss_sum
            loss = loss / self._loss_n
        else:
            loss = torch.zeros((), dtype=torch.float32, device=self.device)
        self._loss_sum, self._loss_host, self._loss_n = None, 0.0, 0
        clipped = self._clip_step(params, gnorm, total) if self.clip is not None and clip else total
        skipped_by_scaler = (scaler_inf.to(self.device).float().reshape(()) if isinstance(scaler_inf, torch.Tensor)
                             else torch.zeros((), device=self.device))
        self._rows.append(torch.cat([torch.stack([total, loss, clipped, skipped_by_scaler]), gnorm]))
        self._row_steps.append(self.step)
        self._row_loss_seen.append(seen)

        if self._sampler.armed or self._sampler.tensor_handles:
            self._sampler.disarm()
            acts, times, order = self._sampler.take()
            self._acts += [(self.step, n, c, w, v) for n, c, w, v in acts]
            self._times += [(self.step, n, e, late, t) for n, e, late, t in times]
            if order:
                self._activation_order = order
        if sample:
            detached = [local(p.detach()) for p in params]
            if wnorm is None:
                wnorm = self._layer_norms(detached)
            if snapshot and self.optimizer is not None:
                # Transient copy of the weights on sample steps only, for ||w_after - w_before|| in the post hook.
                self._snapshot = (self.step, wnorm, torch._foreach_mul(detached, 1.0))
            else:
                self._samples.append((self.step, wnorm, None))

        # Host read of one flag, only when immediate. With the statistics on the CPU this is a plain memory read;
        # on an accelerator it happens only with nonfinite_check="step" (the documented one small sync per step).
        if self.immediate and not bool(torch.isfinite(total) & torch.isfinite(loss)):
            self._origins[self.step] = self._replay() if self._can_replay else None
            self._drain()  # report now, before the optimizer applies this step

    def _clip_step(self, params: list[nn.Parameter], gnorm: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
        """Clip in place with the norms just measured; returns the total norm after clipping (device tensor)."""
        assert self.clip is not None
        present = tuple(i for i, p in enumerate(params) if p.grad is not None)
        index = self._clip_index.get(present)
        if index is None:  # which layer each present gradient belongs to; built once per pattern
            index = torch.tensor([self.layers.layer_of[i] for i in present], dtype=torch.long)
            index = index.pin_memory().to(self.device, non_blocking=True) if self.device.type != "cpu" else index
            self._clip_index[present] = index
        ps = [params[i] for i in present]
        scale = getattr(self.optimizer, "grad_scale", None)
        if self._fused() and isinstance(scale, torch.Tensor) and not isinstance(self.clip, ScalarClip):
            # GradScaler left the unscaling to the fused kernel; a value or unit-wise clip needs true gradients:
            # unscale here, and tell the kernel there is nothing left to divide.
            grads = [local(p.grad) for p in ps if p.grad is not None]
            torch._foreach_div_(grads, scale.to(grads[0].device).float())
            self._set_fused_attr("grad_scale", torch.ones_like(scale))
        if self._fused() and isinstance(self.clip, ScalarClip):
            # The fused kernel divides the gradients by grad_scale as it reads them: clipping costs no extra pass.
            coef = self.clip.coefficient(total)
            prior = getattr(self.optimizer, "grad_scale", None)
            self._set_fused_attr("grad_scale", (prior.float() if prior is not None else 1.0) / coef)
            return total * coef
        # DTensors (FSDP2) are clipped through their local shards, with the coefficient from the global norms.
        return self.clip.clip_([local(p) for p in ps], [local(p.grad) for p in ps], index, gnorm, total)

    def _norms_or_new(self) -> LayerNorms:
        if self._norms is None:
            self._norms = LayerNorms(self.layers, self.device, self.rank if self._sharded else None)
        return self._norms

    def _layer_norms(self, tensors: Sequence[torch.Tensor | None]) -> torch.Tensor:
        return self._norms_or_new()(tensors)

    def _local_loss_pair(self) -> torch.Tensor:
        """``[mean loss this step, 1]`` on this rank, or ``[0, 0]`` when no loss was observed (a fill, no copy)."""
        if self._loss_n == 0:
            return torch.zeros(2, dtype=torch.float32, device=self.device)
        loss = torch.full((), self._loss_host, dtype=torch.float32, device=self.device)
        if self._loss_sum is not None:
            loss = loss + self._loss_sum
        return torch.stack([loss / self._loss_n, torch.ones((), device=self.device)])

    def _reduced_norms(self, sample: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Sharded parameters: this step's one all-reduce. It carries the loss, the gradients' squared norms, on
        sample steps the weights', and the update of the previous sample step (measured after that step).

        Returns:
            Per-layer gradient norms, weight norms (sample steps, else None), and ``[loss sum, ranks that saw it]``.
        """
        L = self.layers.num_layers
        norms = self._norms_or_new()
        gsq, gabsent = norms.squares([p.grad for p in self.layers.params])
        parts = [self._local_loss_pair(), gsq]
        if sample:
            wsq, _ = norms.squares([p.detach() for p in self.layers.params])
            parts.append(wsq)
        pending, self._pending_update = self._pending_update, None
        if pending is not None:
            parts.append(pending[2])
        vec = all_reduce_sum(torch.cat(parts))
        off = 2 + L
        wnorm = None
        if sample:
            wnorm = vec[off: off + L].sqrt()
            off += L
        if pending is not None:
            self._samples.append((pending[0], pending[1], finish(vec[off: off + L], pending[3])))
        return finish(vec[2: 2 + L], gabsent), wnorm, vec[:2]

    def _settle_pending_update(self) -> None:
        """At close: a sample whose update was never summed over ranks keeps its weight norms, update unknown."""
        if self._pending_update is not None:
            step, wnorm, _, _ = self._pending_update
            self._pending_update = None
            self._samples.append((step, wnorm, None))

    def _replay(self) -> Origin | None:
        """Where the NaN/Inf of this step was born; None when unknown. Never raises: a failed replay only costs
        the location, not the diagnosis."""
        if self._last_inputs is None:
            return None
        args, kwargs = self._last_inputs
        was = {m: m.training for m in self.inner.modules()}
        self._replaying = True
        try:
            return locate(self.inner, args, kwargs)
        except Exception:
            return None
        finally:
            self._replaying = False
            for m, flag in was.items():
                m.training = flag

    # ------------------------------------------------------------------ host side

    def _drain_safely(self) -> None:
        if self._failed or not self._rows:
            return
        try:
            self._drain()
        except Exception as e:
            self._internal_failure(e)

    def _drain(self) -> None:
        """Copy pending statistics to the host in one transfer, run the detectors, report."""
        if not self._rows:
            return
        self._draining = True
        try:
            self._drain_inner()
        finally:
            self._draining = False

    def _drain_inner(self) -> None:
        n_rows, width = len(self._rows), len(self._rows[0])
        L = self.layers.num_layers
        pieces = [torch.stack(self._rows).reshape(-1)]
        for _, w, u in self._samples:
            # per sample: weight norms, update norms, weight norms after the step (-1: unknown)
            missing = torch.full_like(w, -1.0)
            pieces += [w, u if u is not None else missing] + ([missing] if u is None or u.numel() == L else [])
        pieces += [v.reshape(-1).to(self.device, torch.float32) for *_, v in self._acts]
        pieces += [torch.stack([e, late]).to(self.device, torch.float32) for _, _, e, late, _ in self._times]
        # The one host read per log_every steps (a sync on an accelerator, by design off the per-step path).
        flat = torch.cat(pieces).cpu().numpy().astype(np.float64)

        rows = flat[: n_rows * width].reshape(n_rows, width)
        off = n_rows * width
        h = self._ensure_history()
        # Steps GradScaler skipped itself (overflow in fp16) are not this run's steps: no row, as for a non-fused
        # optimizer, whose step() the scaler does not even call.
        keep = rows[:, SCALER_INF] == 0
        rows = rows[keep]
        n_rows = int(keep.sum())
        h.append(np.array(self._row_steps, dtype=np.int64)[keep], rows[:, TOTAL], rows[:, LOSS],
                 np.array(self._row_loss_seen, dtype=bool)[keep], rows[:, HEAD:],
                 rows[:, CLIPPED] if self.clip is not None else None)
        for step, _, _ in self._samples:
            h.sample_steps.append(step)
            # Copies: a view would keep this whole read buffer (rows and activation values) alive for as long as
            # the History keeps the sample (64 samples: 6 MiB on a 48-layer MLP, BENCHMARKS.md "Memory").
            h.weight.append(flat[off: off + L].copy())
            h.update.append(flat[off + L: off + 2 * L].copy())
            h.after.append(flat[off + 2 * L: off + 3 * L].copy())
            off += 3 * L
        for step, name, call, what, value in self._acts:
            k = value.numel()  # shape is host metadata: no sync
            # A unit mask is kept packed (1 bit a unit, not 8 bytes): the last 8 samples of every activation module.
            h.add_act(step, name, call, what, flat[off: off + k] > 0 if what == "active" else
                      tuple(float(v) for v in flat[off: off + k]))  # (flat fraction, relative slope)
            off += k
        for step, name, _, _, steps_t in self._times:
            h.times.append((step, name, float(flat[off]), float(flat[off + 1]), steps_t))
            off += 2
        if self._activation_order:
            h.activation_order = self._activation_order
            h.output_activation = self._output_activation(self._activation_order[-1])
        self._rows, self._row_steps, self._row_loss_seen = [], [], []
        self._samples, self._acts, self._times = [], [], []

        if self.clip is not None:
            for r in range(len(rows)):
                before, after = rows[r, TOTAL], rows[r, CLIPPED]
                if clip_acted(before, after):
                    self._act(Action("clip", int(h.steps[len(h.steps) - n_rows + r]),
                                     {"method": self.clip.name, "norm": float(before), "clipped_norm": float(after)}))
        th = self.thresholds
        found: list[Verdict | None] = []
        for r in step_candidates(h, range(len(h.steps) - n_rows, len(h.steps)), th):
            found.append(detect_nonfinite(h, r, self._origins.pop(int(h.steps[r]), None)))
            found.append(detect_exploding_step(h, r, th))
        found += detect_spike_damage(h, th)  # spikes of earlier rows, now that the loss after them is known
        # Once NaN/Inf reached the statistics, every other rule reads garbage (a NaN output looks like a dead
        # ReLU): window rules wait until the window is clean again.
        if np.isfinite(h.total[-th.window:]).all():
            found += [detect_exploding_window(h, th), detect_vanishing(h, th)]
            if h.acts_version != self._acts_seen:  # unit verdicts change only when a new sample arrived
                self._acts_seen = h.acts_version
                found += detect_units(h, th)
        verdicts = sorted((v for v in found if v is not None), key=lambda v: v.diagnosis.step)
        for verdict in verdicts:
            self._emit(verdict)
        if self.ladder is not None:
            self._climb_ladder(h, n_rows, verdicts)
        if n_rows and (self._stats_sink is not None or len(self._sinks) > self._own_sinks):
            record = self._stats_record(h, rows)
            if self._stats_sink is not None:
                self._stats_sink.write(record)
            for sink in self._sinks[self._own_sinks:]:
                sink.write({"type": "stats", **record})

    def _climb_ladder(self, h: History, n_rows: int, verdicts: list[Verdict]) -> None:
        """Rungs 3 and 4, decided at a statistics read; plus the snapshot of a healthy run."""
        assert self.ladder is not None and self.optimizer is not None
        if all(g.get("fused") for g in self.optimizer.param_groups):  # fused skips happened on the device
            new = slice(len(h.steps) - n_rows, len(h.steps))
            for st in h.steps[new][~np.isfinite(h.total[new])]:
                self._act(Action("skip_step", int(st), {"why": "non-finite gradients", "fused": True}))
        exploding = any(v.key[0] == "exploding" and v.key[1] in ("growth", "update", "backward") for v in verdicts)
        diverging = any(v.key == ("exploding", "growth") for v in verdicts)
        for decision in self.ladder.decide(h, n_rows, exploding, self.step, diverging):
            if decision == "rollback":
                action = self.ladder.rollback(self.model, self.optimizer, self.step)
                self._act(action)
                if "stopped" in action.detail and self.rank == 0:
                    print(f"[gradguard] {action.detail['stopped']}", file=sys.stderr, flush=True)
            else:
                assert isinstance(decision, Action)
                self._act(decision)
        if self.ladder.healthy_for_snapshot(h, self.step):
            self.ladder.take_snapshot(self.model, self.optimizer, self.step)

    def _output_activation(self, last: str) -> str | None:
        """``last`` (the last activation module called) if it produces the output: no layer with parameters is
        registered after it (registration order; call order is not recorded between different module kinds)."""
        pos = {n: i for i, n in enumerate(self._modules_by_name())}
        after = max((pos.get(n, -1) for n in self.layers.names), default=-1)
        return last if pos.get(last, -1) > after else None

    def _ensure_history(self) -> History:
        if self._history is None:
            embedding = np.array([isinstance(m, (nn.Embedding, nn.EmbeddingBag)) for m in self.layers.modules])
            # Keep at least a detector window beyond one read's rows, so no row is trimmed before it is judged.
            keep = max(512, self.log_every + self.thresholds.window + 1)
            self._history = History(list(self.layers.names), np.array(self.layers.numel, dtype=np.float64),
                                    embedding, self.ema_beta, keep)
            if self._pending_state is not None:
                self._history.load_state_dict(self._pending_state)
                self._pending_state = None
        return self._history

    def _stats_record(self, h: History, rows: np.ndarray) -> dict[str, Any]:
        last = rows[-1]
        names = h.layers

        def per_layer(values: np.ndarray) -> dict[str, float | None]:
            return {n: (None if v < 0 else float(v)) for n, v in zip(names, values)}

        rec: dict[str, Any] = {
            "step": int(h.steps[-1]),
            "loss": float(last[LOSS]) if h.loss_seen[-1] else None,
            "total_grad_norm": float(last[TOTAL]),
            "total_grad_norm_max": float(np.max(rows[:, TOTAL])),
            "grad_norm_mean": h.grad_ema.mean,
            "grad_norm_std": math.sqrt(h.grad_ema.var),
            "loss_mean": h.loss_ema.mean if h.loss_ema.count else None,
            "loss_std": math.sqrt(h.loss_ema.var) if h.loss_ema.count else None,
            "grad_norm": per_layer(last[HEAD:]),
        }
        if h.sample_steps:
            w, u = h.weight[-1], h.update[-1]
            rec["sample_step"] = int(h.sample_steps[-1])
            rec["weight_norm"] = per_layer(w)
            # None only when not measured (ABSENT) or undefined (zero weights); a NaN update stays NaN.
            rec["update_ratio"] = {n: (None if uu < 0 or ww <= 0 else float(uu / ww))
                                   for n, ww, uu in zip(names, w, u)}
        return rec

    def _write_meta(self) -> None:
        assert self.log_dir is not None
        meta = {
            "schema": 1,
            "gradguard": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "model": type(self.inner).__name__,
            "optimizer": type(self.optimizer).__name__ if self.optimizer is not None else None,
            "layers": [{"name": n, "numel": k} for n, k in zip(self.layers.names, self.layers.numel)],
            "options": {"log_every": self.log_every, "sample_every": self.sample_every, "ema_beta": self.ema_beta,
                        "immediate_nonfinite_check": self.immediate, "thresholds": vars(self.thresholds)},
        }
        (self.log_dir / "meta.json").write_text(json.dumps(meta, indent=2))

    def _remove_hooks(self) -> None:
        for h in self._handles + self._order_handles:
            h.remove()
        self._handles.clear()
        self._order_handles.clear()
        self._sampler.close()
        if self.ladder is not None:
            self._remove_step_wrapper()
        self._snapshot = None
        self._last_inputs = None
        self._forward_stack.clear()

    def _internal_failure(self, exc: BaseException) -> None:
        """Report pending statistics if possible, then warn once, switch monitoring off, leave training alone."""
        if self._failed:
            return
        if not self._draining and self._rows:
            try:
                self._drain()  # what was measured before the failure is still reported
            except Exception:
                pass
        self._failed = True
        self._restore_fused_flags()
        self._remove_hooks()
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=-3))
        warnings.warn(f"gradguard switched itself off after an internal error; training is unaffected. "
                      f"Please report this:\n{tb}", GuardInternalWarning, stacklevel=2)

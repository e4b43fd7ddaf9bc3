"""Guard: the public facade. It builds the rooms of the flow and holds the API; PyTorch's hooks go to the wiring.

    hooks.Wiring ──> stats.recorder ──> detect.judge ──> repair.stepper ──> report.outputs
                     (device rows)      (diagnoses)      (clip, skip,       (console, run dir,
                                                          backoff, rollback)  sinks)
    detect.mode_watcher beside them: forwards of the root module.

Room: the facade. It may touch: ``assemble``, ``detect.history``, ``detect.mode_watcher``, ``hooks``, ``listen``,
``options``, ``repair.clip``, ``report.sinks``, ``types``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from torch import nn

from .assemble import build
from .detect.history import History, Thresholds
from .detect.mode_watcher import ModeWatcher
from .hooks import GuardInternalWarning
from .listen import ScriptListener
from .options import check_options
from .repair.clip import ClipMethod
from .report.sinks import Sink
from .types import Action, Diagnosis

__all__ = ["Guard", "GuardInternalWarning"]


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
            repaired too (the closure runs first; Lightning steps so). LBFGS (many closure calls a step) is
            checked after its step: a non-finite loss or weight puts the weights back, its memory cleared.
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
        auto_loss: read each step's loss from the scalar the script calls ``.backward()`` on (unscaled when a
            GradScaler scaled it; a device tensor, no sync) when nothing is given to ``observe_loss``.

    Whatever the script does outside the optimizer is seen too: a call of ``clip_grad_norm_``/``clip_grad_value_``
    on the watched gradients first records the step (the statistics are the pre-clip gradients; the script's
    max norm is noted), and without an optimizer every backward that reaches the model is a step.

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
        auto_loss: bool = True,
    ) -> None:
        check_options(model, optimizer, repair, log_every, sample_every, nonfinite_check, ema_beta, thresholds,
                      console, lr_backoff, lr_restore_after, snapshot_every, max_rollbacks, auto_loss)
        w = self._wiring = build(model, optimizer, repair=bool(repair), log_every=log_every,
                                 sample_every=sample_every, log_dir=log_dir, console=console,
                                 nonfinite_check=nonfinite_check, thresholds=thresholds or Thresholds(),
                                 ema_beta=ema_beta, clip=clip, lr_backoff=lr_backoff,
                                 lr_restore_after=lr_restore_after, snapshot_every=snapshot_every,
                                 max_rollbacks=max_rollbacks, sinks=sinks)
        self.model, self.optimizer, self.inner = model, optimizer, w.inner
        self._recorder, self._judge, self._modes, self._outputs = w.recorder, w.judge, w.modes, w.outputs
        self.layers, self.compiled = w.recorder.layers, w.recorder.compiled
        self.device, self.rank, self.world = w.recorder.device, w.recorder.rank, w.recorder.world
        self.clip, self.ladder = w.repairer.clip, w.repairer.ladder
        self.log_every, self.sample_every, self.ema_beta = log_every, sample_every, ema_beta
        self.thresholds, self.immediate = w.judge.thresholds, w.immediate
        self.log_dir, self._actions, self._diagnoses = w.outputs.log_dir, w.outputs.actions, w.judge.diagnoses
        # The hooks the optimizer calls and the sampler (kept under their old names for tests and benchmarks).
        self._pre_step_hook, self._post_step_hook, self._sampler = w.pre_step, w.post_step, w.recorder.sampler
        self.mark_frozen(*frozen)
        self.mark_stochastic(*stochastic)
        w.listener = ScriptListener(w, auto_loss=bool(auto_loss), step_on_backward=optimizer is None)
        try:
            w.attach()
        except Exception:
            w.outputs.close()  # nothing half-attached stays behind
            raise

    # ------------------------------------------------------------------ public API

    @property
    def step(self) -> int:
        """Optimizer steps taken since attach (or restored by ``load_state_dict``)."""
        return self._recorder.step

    @property
    def diagnoses(self) -> list[Diagnosis]:
        """Every diagnosis so far, in the order found. Reads pending statistics first (a host sync, on demand)."""
        self._wiring.drain_safely(full=True)
        return list(self._judge.diagnoses)

    @property
    def history(self) -> History | None:
        """The host-side per-step record the detectors read (None before the first step). Reads pending
        statistics first (a host sync, on demand)."""
        self._wiring.drain_safely()
        return self._judge.history

    @property
    def actions(self) -> list[Action]:
        """What gradguard did to the run, in order: clips (with ``clip=``), and with ``repair="auto"`` skipped steps,
        learning-rate backoffs and restores, rollbacks. Reads pending statistics first.

        Memory is bounded: only the last 256 clips (and the last 4,096 other actions) are kept here;
        ``action_counts`` counts all of them, and every one is written to the sinks (``events.jsonl``).
        """
        self._wiring.drain_safely()
        return self._outputs.actions.to_list()

    @property
    def action_counts(self) -> dict[str, int]:
        """How many actions of each kind gradguard took since attach (``{"clip": 1200, "skip_step": 2}``), including
        the clips too old to be kept in ``actions``. Reads pending statistics first."""
        self._wiring.drain_safely()
        return dict(self._outputs.actions.counts)

    def mark_frozen(self, *modules: nn.Module) -> None:
        """Say that these modules (and everything inside them) are in eval mode on purpose while training, e.g.
        a frozen BatchNorm during fine-tuning: ``eval_mode_training`` leaves them alone."""
        ModeWatcher.mark(self._modes.frozen, modules)

    def mark_stochastic(self, *modules: nn.Module) -> None:
        """Say that these modules (and everything inside them) draw random numbers in eval mode on purpose:
        ``stochastic_inference`` leaves them alone."""
        ModeWatcher.mark(self._modes.stochastic, modules)

    def observe_loss(self, loss: torch.Tensor | float) -> None:
        """Record this step's loss for the detectors; never synchronises. A no-op after ``close()``.

        Args:
            loss: the scalar loss tensor (or a Python/NumPy number). Several calls before one optimizer step
                (gradient accumulation) are averaged.

        Raises:
            TypeError: ``loss`` is not a tensor or a number. ValueError: it has more than one element.
        """
        if not self._wiring.live():
            return
        if isinstance(loss, np.ndarray) and loss.ndim == 0 and loss.dtype.kind in "iuf":
            loss = loss.item()  # a 0-d NumPy array: a host number already, no device involved
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                raise ValueError(f"observe_loss expects a scalar loss, got a tensor of shape {tuple(loss.shape)}; "
                                 "reduce it first (loss.mean())")
            if loss.dtype == torch.bool or loss.is_complex():
                raise TypeError(f"observe_loss expects a real-valued loss, got a {loss.dtype} tensor")
        elif not isinstance(loss, (int, float, np.integer, np.floating)) or isinstance(loss, (bool, np.bool_)):
            raise TypeError(f"observe_loss expects the loss tensor (or a real number), got {type(loss).__name__}")
        self._recorder.observe_loss(loss)

    def check(self) -> list[Diagnosis]:
        """Run the gradient checks now, on the gradients ``backward()`` left in the parameters.

        For ``Guard(model, None)``: each call counts as one step. With an optimizer attached, steps are counted
        by the optimizer and this only reads pending statistics.

        Returns:
            The diagnoses found by this call.

        Raises:
            RuntimeError: the Guard is closed.
        """
        return self._wiring.check()

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
        self._wiring.record_gradients(found_inf)

    def training_forward_started(self) -> None:
        """Say that a training forward begins, for loops that never call the watched model's own ``forward`` (a
        LightningModule whose ``training_step`` calls ``self.net(x)``). The Guard's hook on the root module does
        this itself otherwise: start the activation sampler's per-forward counts, and note the flag-dependent
        modules left in eval for ``eval_mode_training`` (judged at the optimizer step). Host facts only.
        """
        self._wiring.training_forward_started()

    def adopt_backward(self, root: torch.Tensor | None) -> None:
        """Count a backward (``root``: the tensor it ran on) that ran just before attach as if watched."""
        self._wiring.listener.adopt(root)

    def stop_listening(self) -> None:
        """Stop reading backward roots and the script's own clip calls (for integrations that measure themselves)."""
        self._wiring.listener.stop()

    def close(self) -> None:
        """Read pending statistics, remove every hook, flush and close the sinks. Safe to call twice."""
        if not self._wiring.closed:
            self._wiring.close()

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: step count, running statistics, early baselines, reported conditions.

        Returns:
            A dict of plain Python values (JSON-serialisable).
        """
        return self._wiring.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()`` of an earlier Guard on the same model.

        Raises:
            ValueError: the state was saved for other layers, or a key is missing or wrong (named in the message);
                the Guard is then left as it was.
        """
        self._wiring.load_state_dict(state)

"""Hugging Face transformers adapter: ``GradGuardTrainerCallback`` attaches a ``gradguard.Guard`` to
``Trainer.train``; ``attach(trainer, ...)`` adds it where its metrics reach the Trainer's loggers.

Tested with transformers 5.x and accelerate 1.x, one process.

Room: above the Guard. It may touch: ``guard``, ``integrations``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import TrainerCallback

try:
    from transformers.trainer_callback import ExportableState
except ImportError:  # older transformers: no callback state in checkpoints (the Guard then starts afresh)
    class ExportableState:  # type: ignore[no-redef]
        """Stand-in for transformers' ``ExportableState`` (absent in this version)."""

from ..guard import Guard
from ._common import Counts, GuardResults, inner_optimizer, notice, stats_metrics


class _Collector:
    """A Guard sink that keeps the latest statistics and the diagnosis/action counts until ``on_log`` takes them
    (the Trainer decides when to log; gradguard reads its statistics every ``log_every`` steps)."""

    def __init__(self) -> None:
        self.latest: dict[str, Any] | None = None
        self.counts = Counts()
        self.counts_changed = False

    def write(self, record: dict[str, Any]) -> None:
        if record.get("type") == "stats":
            self.latest = record
        elif self.counts.add(record):
            self.counts_changed = True

    def take(self, layers: bool) -> dict[str, float]:
        """Metrics not yet logged: the latest statistics, and the counts when they or the statistics changed."""
        out: dict[str, float] = {}
        if self.latest is not None:
            out.update(stats_metrics(self.latest, layers))
            self.latest = None
        if out or self.counts_changed:
            out.update(self.counts.metrics())
            self.counts_changed = False
        return out

    def close(self) -> None:
        """Nothing to release."""


def _loss_of(output: Any) -> torch.Tensor | None:
    """The loss a transformers model returns (``ModelOutput.loss`` or a dict's ``"loss"``), else None."""
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    return loss if isinstance(loss, torch.Tensor) and loss.numel() == 1 else None


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


class GradGuardTrainerCallback(GuardResults, TrainerCallback, ExportableState):
    """Watch a transformers ``Trainer.train`` run with gradguard.

    ::

        from gradguard.integrations.transformers import attach
        trainer = Trainer(model=model, args=TrainingArguments(..., max_grad_norm=1.0), ...)
        cb = attach(trainer)                  # any gradguard.Guard option: attach(trainer, log_every=20)
        trainer.train()
        cb.diagnoses                          # also printed as found, and in the logs (gradguard/...)

    At ``on_train_begin`` a ``gradguard.Guard`` is attached to the model and to the torch optimizer inside the
    Trainer's (accelerate's ``AcceleratedOptimizer`` is looked through); it measures each step in the optimizer's
    pre-step hook (``.guard``).

    Clipping: the Trainer clips (``args.max_grad_norm``) before any callback or optimizer hook could see the
    gradients, so gradguard takes clipping over to measure first. For the run, ``args.max_grad_norm`` is set to 0
    (restored at ``on_train_end``) and the Guard clips with ``clip=<that max_grad_norm>`` (or your own ``clip=``
    when given: then only yours applies), from its own pre-clip measurement: the same global-norm clipping, once.
    The Trainer still logs ``grad_norm``: with ``max_grad_norm=0`` it computes the norm without clipping, before
    the step, so it is the pre-clip norm as before.

    Loss: observed from the model's forward output (``outputs.loss``, or ``outputs["loss"]``) in training
    forwards, averaged over gradient-accumulation micro-batches; the loss exactly as the model returns it (a custom
    ``compute_loss`` that computes its own loss is not seen). Without a loss gradguard still works, with stricter
    evidence required for vanishing gradients.

    Logs: at each ``on_log`` the latest statistics are added to ``logs`` as ``gradguard/total_grad_norm``,
    ``gradguard/total_grad_norm_max``, ``gradguard/grad_norm_mean``/``_std``, ``gradguard/loss``,
    ``gradguard/loss_mean``/``_std``, ``gradguard/grad_norm/<layer>`` (with ``log_layers=True``),
    ``gradguard/diagnoses/<kind>``, ``gradguard/diagnoses``, ``gradguard/actions/<kind>`` (counts so far), and to
    the entry ``Trainer.log`` just appended to ``state.log_history``. Callbacks run in list order and the
    ``report_to`` callbacks (TensorBoard, W&B, MLflow, ...) come before the ones passed as ``callbacks=``: use
    ``attach(trainer)``, which puts this callback first, for the metrics to reach them. Passed in ``callbacks=``
    it still prints diagnoses and fills ``state.log_history``.

    Checkpoints: the Guard's state (step count, running statistics, reported conditions) is saved in each
    checkpoint's ``trainer_state.json`` (transformers' ``ExportableState``) and read back at ``on_train_begin``
    of ``trainer.train(resume_from_checkpoint=...)``. Keep ``restore_callback_states_from_checkpoint`` at its
    default (False): when True, transformers replaces this callback with a new instance (built from the
    JSON-serialisable options only, placed last) and your reference to it goes stale.

    Ranks: the console, ``log_dir`` and user ``sinks`` are served by the world process zero only.

    Args:
        log_layers: add one ``gradguard/grad_norm/<layer>`` metric per layer to the logs (off by default: the
            Trainer's progress printer prints every key of every log).
        **guard_kwargs: options of ``gradguard.Guard`` (``clip``, ``log_every``, ``console`` (default True),
            ``log_dir``, ``thresholds``, ``sinks``, ``repair``, ...). ``repair="auto"`` works without fp16 loss
            scaling (accelerate's GradScaler replaces the optimizer's step method, which the repair needs).

    Raises:
        TypeError: ``model`` or ``optimizer`` was passed (the callback takes the Trainer's).
    """

    def __init__(self, log_layers: bool = False, **guard_kwargs: Any) -> None:
        for key in ("model", "optimizer"):
            if key in guard_kwargs:
                raise TypeError(f"GradGuardTrainerCallback takes the Trainer's {key}; do not pass {key}=")
        self.log_layers = log_layers
        self.guard_kwargs = guard_kwargs
        self.guard: Guard | None = None
        self._open = False
        self._collector = _Collector()
        self._loss_handle: RemovableHandle | None = None
        self._saved_max_grad_norm: tuple[Any, float] | None = None
        # Guard state to continue from: set by on_train_begin from the checkpoint's trainer_state.json, or by
        # transformers itself (restore_callback_states_from_checkpoint=True sets this attribute from state()).
        self._restored_state: dict[str, Any] | None = None

    @classmethod
    def attach(cls, trainer: Any, **guard_kwargs: Any) -> GradGuardTrainerCallback:
        """Add a new callback to ``trainer`` ahead of every other callback, so that the metrics it adds to the
        logs reach the ``report_to`` loggers. Call it before ``trainer.train()``.

        Args:
            trainer: a ``transformers.Trainer``.
            **guard_kwargs: as for the constructor (``log_layers`` too).

        Returns:
            The callback (read ``.diagnoses`` and ``.guard`` on it).
        """
        cb = cls(**guard_kwargs)
        trainer.callback_handler.callbacks.insert(0, cb)
        return cb

    # ------------------------------------------------------------------ lifecycle

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                       optimizer: Any = None, **kwargs: Any) -> None:
        """Attach the Guard to the Trainer's model and optimizer and take over clipping (see the class docs)."""
        self.close()  # a train() that raised never reached on_train_end
        if model is None or optimizer is None:
            raise ValueError("GradGuardTrainerCallback needs the Trainer's model and optimizer at on_train_begin")
        saved = self._restored_state
        stored = (getattr(state, "stateful_callbacks", None) or {}).get(type(self).__name__)
        if saved is None and isinstance(stored, dict):  # resuming: what state() wrote into the checkpoint
            saved = stored.get("attributes", {}).get("_restored_state")
        kw = dict(self.guard_kwargs)
        if kw.get("repair") and getattr(optimizer, "scaler", None) is not None:
            raise ValueError("repair='auto' does not work with fp16 loss scaling under the Trainer (accelerate's "
                             "GradScaler replaces the optimizer's step method, which the repair needs); use clip= "
                             "or bf16")
        zero = bool(state.is_world_process_zero)
        kw["console"] = kw.get("console", True) if zero else False
        sinks = list(kw.pop("sinks", ()))
        if not zero:  # one writer per run
            kw.pop("log_dir", None)
            sinks = []
        self._collector = _Collector()
        sinks.append(self._collector)
        max_norm = args.max_grad_norm
        if max_norm is not None and max_norm > 0:
            if kw.get("clip") is None:
                kw["clip"] = float(max_norm)
            self._saved_max_grad_norm = (args, max_norm)
            args.max_grad_norm = 0.0  # the Trainer's loop reads it at every step
            notice(kw["console"], f"takes over gradient clipping (clip={kw['clip']!r}): args.max_grad_norm="
                   f"{max_norm} is 0 during train() (restored afterwards), so the gradients are measured before "
                   "they are clipped, and clipped once.")
        try:
            guard = Guard(model, inner_optimizer(optimizer), sinks=sinks, **kw)
            # The callback measures and clips itself (record_gradients, the loss from outputs.loss): the script-level
            # listener (backward roots, torch's clip functions) would measure the Trainer's steps a second time.
            guard.stop_listening()
        except Exception:
            self._restore_max_grad_norm()
            raise
        if saved:
            try:
                guard.load_state_dict(saved)
            except Exception:  # e.g. a checkpoint of another model: no hook may stay behind
                guard.close()
                self._restore_max_grad_norm()
                raise
        self.guard, self._open, self._restored_state = guard, True, None
        self._loss_handle = model.register_forward_hook(self._observe_loss)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        """Add the latest statistics and the diagnosis counts to ``logs`` (and to the ``log_history`` entry)."""
        if not self._open or self.guard is None or logs is None:
            return
        self.guard.diagnoses  # noqa: B018 - reads pending statistics now (the Trainer synchronised to log anyway)
        extra = self._collector.take(self.log_layers)
        if not extra:
            return
        logs.update(extra)
        history = state.log_history
        if history and history[-1].get("step") == state.global_step:
            history[-1].update(extra)  # Trainer.log appended a copy of logs before calling on_log

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Read the last statistics, remove every hook, give the Trainer its ``max_grad_norm`` back."""
        self.close()

    def close(self) -> None:
        """Close the Guard and restore ``args.max_grad_norm`` (done at ``on_train_end``; call it yourself if
        ``train()`` raised and you will not train again). Safe to call twice."""
        try:
            if self._loss_handle is not None:
                self._loss_handle.remove()
                self._loss_handle = None
            if self.guard is not None and self._open:
                self._open = False
                self.guard.close()
        finally:
            self._restore_max_grad_norm()

    def _restore_max_grad_norm(self) -> None:
        if self._saved_max_grad_norm is not None:
            args, value = self._saved_max_grad_norm
            args.max_grad_norm = value
            self._saved_max_grad_norm = None

    def _observe_loss(self, module: nn.Module, args: Any, output: Any) -> None:
        if not (self._open and self.guard is not None and module.training and torch.is_grad_enabled()):
            return  # evaluation forwards are not training steps
        loss = _loss_of(output)
        if loss is not None:
            self.guard.observe_loss(loss)

    # ------------------------------------------------------------------ checkpoints

    def state(self) -> dict[str, Any]:
        """What transformers saves in ``trainer_state.json`` with each checkpoint (``ExportableState``).

        Returns:
            ``{"args": <the JSON-serialisable options>, "attributes": {"_restored_state": Guard.state_dict()}}``
            (the Guard's state only while a run is in progress, or a state restored but not yet applied).
        """
        options = {"log_layers": self.log_layers, **self.guard_kwargs}
        guard_state = (self.guard.state_dict() if self._open and self.guard is not None
                       else self._restored_state)
        return {"args": {k: v for k, v in options.items() if _jsonable(v)},
                "attributes": {"_restored_state": guard_state}}


def attach(trainer: Any, **guard_kwargs: Any) -> GradGuardTrainerCallback:
    """Add a ``GradGuardTrainerCallback`` to ``trainer``, first in its callback list (so the metrics it adds to
    the logs reach the ``report_to`` loggers). Call it before ``trainer.train()``.

    Args:
        trainer: a ``transformers.Trainer``.
        **guard_kwargs: options of ``gradguard.Guard`` and ``log_layers`` (see ``GradGuardTrainerCallback``).

    Returns:
        The callback: ``.diagnoses``, ``.actions``, ``.guard``.
    """
    return GradGuardTrainerCallback.attach(trainer, **guard_kwargs)

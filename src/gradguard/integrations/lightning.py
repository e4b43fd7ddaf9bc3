"""Lightning adapter: ``GradGuardCallback`` attaches a ``gradguard.Guard`` to a ``Trainer.fit`` run.

Works with the ``lightning`` package (``lightning.pytorch``) and, when only it is installed, the standalone
``pytorch_lightning`` package; Lightning calls callback hooks by name, so the callback also works in a
``pytorch_lightning.Trainer`` when both packages are installed. Tested with Lightning 2.6.

Room: above the Guard. It may touch: ``guard``, ``integrations``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

try:
    import lightning.pytorch as pl
except ImportError:  # only the standalone package is installed
    import pytorch_lightning as pl  # type: ignore[no-redef]

from ..guard import Guard
from ._common import Counts, GuardResults, diagnosis_text, inner_optimizer, notice, stats_metrics


class _LoggerSink:
    """Sends gradguard's records to the Trainer's loggers (rank 0 only; the callback adds it there).

    Statistics become ``gradguard/...`` metrics (see ``gradguard.integrations._common.stats_metrics``) logged at
    ``trainer.global_step``, the step every other metric of the run uses (a logger such as W&B drops steps that
    go backwards); diagnoses update ``gradguard/diagnoses/<kind>`` counts and, on a TensorBoard logger, are also
    written as text under ``gradguard/diagnoses`` at the step they happened.
    """

    def __init__(self, trainer: pl.Trainer, layers: bool) -> None:
        self.trainer = trainer
        self.layers = layers
        self.counts = Counts()
        self._warned = False

    def write(self, record: dict[str, Any]) -> None:
        if record.get("type") == "stats":
            metrics = {**stats_metrics(record, self.layers), **self.counts.metrics()}
        elif self.counts.add(record):
            metrics = self.counts.metrics()
        else:
            return
        loggers: list[Any] = list(self.trainer.loggers)  # Any: .experiment exists on most loggers, not on the base
        for logger in loggers:
            try:
                logger.log_metrics(metrics, step=self.trainer.global_step)
                if record.get("type") == "diagnosis" and _is_tensorboard(logger):
                    logger.experiment.add_text("gradguard/diagnoses", diagnosis_text(record),
                                               global_step=int(record.get("step", 0)))
            except Exception as e:  # a failing logger must not switch gradguard's monitoring off
                if not self._warned:
                    self._warned = True
                    warnings.warn(f"gradguard could not log to {type(logger).__name__}: {e!r}", stacklevel=2)

    def close(self) -> None:
        """Nothing to do: the Trainer finalizes its loggers itself."""


def _is_tensorboard(logger: Any) -> bool:
    """Whether ``logger`` is a TensorBoardLogger.

    Args:
        logger: one of ``trainer.loggers``.

    Returns:
        True for Lightning's TensorBoardLogger (or a subclass).
    """
    # By class name, so the TensorBoardLogger of either package (lightning / pytorch_lightning) is recognised.
    return any(c.__name__ == "TensorBoardLogger" for c in type(logger).__mro__)


def _found_inf(scaler: Any, optimizer: torch.optim.Optimizer) -> tuple[bool, torch.Tensor | None]:
    """Whether GradScaler unscaled this optimizer's gradients this step, and its overflow flag if so.

    Reads the scaler's per-optimizer state (torch's own ``GradScaler.step`` reads the same fields): the sum of
    ``found_inf_per_device`` is what decides whether the scaler will skip the step.

    Args:
        scaler: the precision plugin's ``torch.amp.GradScaler``.
        optimizer: the torch optimizer about to step.

    Returns:
        (unscaled this step, the summed overflow flag as a device tensor or None when there is none).
    """
    states = getattr(scaler, "_per_optimizer_states", None)
    state = states.get(id(optimizer)) if isinstance(states, dict) else None  # .get: do not create an entry
    if not state or getattr(state.get("stage"), "name", None) != "UNSCALED":
        return False, None
    flags = [f.float() for f in state.get("found_inf_per_device", {}).values()]
    if not flags:
        return True, None
    total = flags[0]
    for f in flags[1:]:
        total = total + f.to(total.device)
    return True, total


class GradGuardCallback(GuardResults, pl.Callback):
    """Watch a Lightning ``Trainer.fit`` run with gradguard.

    ::

        from gradguard.integrations.lightning import GradGuardCallback
        cb = GradGuardCallback(clip=1.0)                  # any gradguard.Guard option
        trainer = Trainer(callbacks=[cb], gradient_clip_val=None)
        trainer.fit(model, data)
        cb.diagnoses                                       # also printed as found, and sent to the loggers

    At fit start a ``gradguard.Guard`` is attached to the LightningModule and its optimizer (``.guard``). Each
    step, in ``on_before_optimizer_step``, it measures the gradients (``Guard.record_gradients``): after
    Lightning's mixed-precision plugin has unscaled them and before Lightning clips them, so statistics and
    diagnoses describe the gradients the model produced. A step the GradScaler skips (fp16 overflow) is not
    counted. The loss is observed in ``on_before_backward`` (undoing Lightning's division by
    ``accumulate_grad_batches`` and the GradScaler's scale).

    Clipping:

    - ``clip=`` given and the Trainer has ``gradient_clip_val``: gradguard takes over. The Trainer's
      ``gradient_clip_val`` is set to None for the fit (restored afterwards; said once on rank 0), so the
      gradients are clipped once, by gradguard, from its own measurement.
    - no ``clip=``: Lightning clips as configured, after gradguard has measured (statistics are pre-clip).
    - a LightningModule that overrides ``configure_gradient_clipping`` to clip regardless of
      ``gradient_clip_val`` still clips after gradguard.

    ``repair="auto"`` works: Lightning steps the optimizer with a closure (training step, backward, this
    callback's measurement, Lightning's clipping); the repaired step runs it first, then skips a non-finite step,
    scales the learning rate or steps as usual, and rolls back at a statistics read. With 16-mixed precision the
    GradScaler skips overflow steps itself (they are not counted).

    One optimizer: ``trainer.optimizers`` must hold exactly one (Lightning's automatic optimization); with several
    (manual optimization, e.g. a GAN) fit start raises ValueError: attach one ``gradguard.Guard`` per optimizer in
    your LightningModule instead.

    Ranks: a Guard runs on every rank (each clips its own gradients); the console, ``log_dir``, user ``sinks``
    and the loggers are served by global rank 0 only. Metrics sent to ``trainer.loggers``: ``gradguard/
    total_grad_norm``, ``gradguard/total_grad_norm_max``, ``gradguard/grad_norm_mean``/``_std``,
    ``gradguard/loss``, ``gradguard/loss_mean``/``_std``, ``gradguard/grad_norm/<layer>`` (with
    ``log_layers=True``), ``gradguard/diagnoses/<kind>`` and ``gradguard/diagnoses`` (counts so far),
    ``gradguard/actions/<kind>``; on a TensorBoardLogger the diagnoses also go to the text tab.

    Checkpoints: the Guard's state (step count, running statistics, reported conditions) is saved with the
    callback's state and restored by ``Trainer.fit(ckpt_path=...)``, so a resumed run continues its statistics.

    Args:
        log_layers: send one ``gradguard/grad_norm/<layer>`` metric per layer to the loggers.
        **guard_kwargs: options of ``gradguard.Guard`` (``clip``, ``repair``, ``log_every``, ``sample_every``,
            ``console`` (default True; rank 0 only), ``log_dir``, ``thresholds``, ``sinks``, ...).

    Raises:
        TypeError: ``model`` or ``optimizer`` was passed (the callback finds them).
    """

    def __init__(self, log_layers: bool = True, **guard_kwargs: Any) -> None:
        for key in ("model", "optimizer"):
            if key in guard_kwargs:
                raise TypeError(f"GradGuardCallback finds the {key} itself (the LightningModule and its optimizer); "
                                f"do not pass {key}=")
        self.log_layers = log_layers
        self.guard_kwargs = guard_kwargs
        self.guard: Guard | None = None
        self._open = False  # the Guard is attached (between fit start and fit end)
        self._optimizer: torch.optim.Optimizer | None = None
        self._scaler: Any = None
        self._pending: dict[str, Any] | None = None  # Guard state loaded before the Guard existed
        self._saved_clip: tuple[pl.Trainer, float | int | None] | None = None

    # ------------------------------------------------------------------ lifecycle

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Attach the Guard (and take over clipping if ``clip=`` was given)."""
        self._close()  # a second fit with the same callback starts a new Guard
        optimizers = list(trainer.optimizers)
        if len(optimizers) != 1:
            raise ValueError(f"GradGuardCallback watches exactly one optimizer; this run has {len(optimizers)}. "
                             "With several optimizers (manual optimization), attach one gradguard.Guard(module, "
                             "optimizer) per optimizer in your LightningModule instead.")
        optimizer = inner_optimizer(optimizers[0])
        zero = trainer.is_global_zero
        kwargs = dict(self.guard_kwargs)
        kwargs["console"] = kwargs.get("console", True) if zero else False
        sinks = list(kwargs.pop("sinks", ()))
        if not zero:  # one writer per run: files and user sinks would be written once per rank otherwise
            kwargs.pop("log_dir", None)
            sinks = []
        if zero and trainer.loggers:
            sinks.append(_LoggerSink(trainer, self.log_layers))
        if kwargs.get("clip") is not None and trainer.gradient_clip_val:
            self._saved_clip = (trainer, trainer.gradient_clip_val)
            notice(kwargs["console"], f"clip={kwargs['clip']!r} takes over gradient clipping: the Trainer's "
                   f"gradient_clip_val={trainer.gradient_clip_val} is off for this fit (restored afterwards), so the "
                   "gradients are clipped once, by gradguard, from its pre-clip measurement.")
            trainer.gradient_clip_val = None  # Lightning reads it at every step (Precision._after_closure)
        try:
            guard = Guard(pl_module, optimizer, sinks=sinks, **kwargs)
            guard.stop_listening()  # the callback measures itself (record_gradients) before Lightning clips
        except Exception:
            self._restore_clip()
            raise
        if self._pending is not None:
            try:
                guard.load_state_dict(self._pending)
            except Exception:
                guard.close()
                self._restore_clip()
                raise
            self._pending = None
        self.guard = guard
        self._open = True
        self._optimizer = optimizer
        self._scaler = getattr(trainer.precision_plugin, "scaler", None)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Read the last statistics, remove every hook, give the Trainer its clipping back."""
        self._close()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Same as ``on_fit_end`` (safe to run twice)."""
        self._close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """The fit failed: close the Guard too (its hooks must not outlive the run)."""
        self._close()

    def _close(self) -> None:
        try:
            if self.guard is not None and self._open:
                self._open = False
                self.guard.close()  # keeps .diagnoses readable
        finally:
            self._restore_clip()

    def _restore_clip(self) -> None:
        if self._saved_clip is not None:
            trainer, value = self._saved_clip
            trainer.gradient_clip_val = value
            self._saved_clip = None

    def _active(self) -> Guard | None:
        return self.guard if self._open else None

    # ------------------------------------------------------------------ per step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        """A training forward starts. The Guard learns this from the LightningModule's ``forward``, which a
        ``training_step`` often never calls (``self.net(x)``); tell its activation sampler here instead."""
        g = self._active()
        if g is not None:
            g.training_forward_started()

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        """Observe the loss of this (micro-)batch, before the step that uses its gradients."""
        g = self._active()
        if g is None or not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            return
        value = loss.detach()
        scale = getattr(self._scaler, "_scale", None)
        if isinstance(scale, torch.Tensor):
            # 16-mixed: Lightning hands the hook the scaled loss. Divide by the scale tensor itself (no host read;
            # GradScaler.get_scale() would synchronise).
            value = value / scale.to(value.device)
        if pl_module.automatic_optimization and trainer.accumulate_grad_batches > 1:
            value = value * trainer.accumulate_grad_batches  # Lightning divided it for accumulation
        g.observe_loss(value)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        """Measure (and with ``clip=``, clip) this step's gradients, before Lightning's own clipping."""
        g = self._active()
        if g is None or inner_optimizer(optimizer) is not self._optimizer:
            return
        found_inf = None
        if self._scaler is not None:
            if getattr(self._optimizer, "_step_supports_amp_scaling", False):
                # A fused optimizer unscales inside its kernel: the gradients here are still scaled. The Guard's
                # own step hook measures them once GradScaler has told the optimizer its scale.
                return
            unscaled, found_inf = _found_inf(self._scaler, self._optimizer)
            if not unscaled:
                return  # no scaler step follows (backward was skipped); the Guard's step hook sees any step
        g.record_gradients(found_inf=found_inf)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """The Guard's state, saved in Lightning checkpoints under this callback's ``state_key``.

        Returns:
            ``{"guard": Guard.state_dict()}``, or {} before the first fit.
        """
        if self._open and self.guard is not None:
            return {"guard": self.guard.state_dict()}
        if self._pending is not None:  # loaded for the next fit, not applied yet
            return {"guard": self._pending}
        if self.guard is not None:  # after the fit (trainer.save_checkpoint once fit() returned)
            return {"guard": self.guard.state_dict()}
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the Guard's state from a checkpoint. Lightning loads callback state before fit start, when the
        Guard does not exist yet: it is kept and applied when the Guard is attached.

        Args:
            state_dict: what ``state_dict()`` returned.
        """
        state = state_dict.get("guard")
        if not state:
            return
        g = self._active()
        if g is not None:  # strategies that restore after setup (e.g. DeepSpeed) load after fit start
            g.load_state_dict(state)
        else:
            self._pending = state

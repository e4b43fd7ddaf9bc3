"""GradGuardCallback under a real Lightning Trainer.fit. Oracles: gradient norms the test computes itself with
torch.linalg.vector_norm (in the LightningModule's own hooks and in optimizer hooks), Lightning's CSVLogger file,
the checkpoint file as Lightning wrote it."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

pl = pytest.importorskip("lightning.pytorch")

import gradguard as gg  # noqa: E402
from gradguard.integrations.lightning import GradGuardCallback  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    """These models are tiny: a second intra-op thread only waits for a core (on 2 shared cores a fit ran 10x
    slower with 2 threads than with 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def grad_norm(module: nn.Module) -> float:
    """The test's own total gradient norm (the oracle)."""
    return torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in module.parameters()
                                               if p.grad is not None])).item()


class Classifier(pl.LightningModule):
    """``training_step`` calls ``self.net`` (not ``self``), as most LightningModules do. Records the gradient norm
    in its own ``on_before_optimizer_step`` (which Lightning runs after the callbacks' and before it clips) and
    after every optimizer step (the gradients the update used)."""

    def __init__(self, net: nn.Module, lr: float = 0.1, momentum: float = 0.0) -> None:
        super().__init__()
        self.net = net
        self.lr, self.momentum = lr, momentum
        self.pre: list[float] = []
        self.used: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)
        opt.register_step_post_hook(lambda *_: self.used.append(grad_norm(self)))
        return opt

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.pre.append(grad_norm(self))


class PreNorm(pl.Callback):
    """Placed before gradguard's callback: the norm before anything touched the gradients."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.norms.append(grad_norm(pl_module))


def small_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))


def loader(n: int = 64, batch: int = 16, scale: float = 5.0, seed: int = 0) -> torch.utils.data.DataLoader:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=gen) * scale
    y = torch.randint(0, 3, (n,), generator=gen)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)


def trainer(tmp_path: Path, **kw: Any) -> Any:
    kw.setdefault("logger", False)
    kw.setdefault("enable_checkpointing", False)
    return pl.Trainer(accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, default_root_dir=tmp_path,
                      log_every_n_steps=1, **kw)


def test_statistics_are_the_pre_clip_norms_and_lightning_still_clips(tmp_path: Path) -> None:
    model = Classifier(small_net())
    cb = GradGuardCallback(console=False, log_every=1)
    trainer(tmp_path, max_steps=8, gradient_clip_val=0.05, callbacks=[cb]).fit(model, loader())
    h = cb.guard.history
    assert h is not None and list(h.steps) == list(range(8)) and cb.guard.step == 8
    assert h.total.tolist() == pytest.approx(model.pre, rel=1e-5)  # what the model produced, before the clip
    assert min(model.pre) > 0.5  # so Lightning's clip at 0.05 really changed the gradients afterwards ...
    assert model.used == pytest.approx([0.05] * 8, rel=1e-4)  # ... once, as configured: gradguard did not clip
    assert cb.actions == [] and cb.diagnoses == []


def test_clip_takes_over_from_gradient_clip_val_without_double_clipping(tmp_path: Path) -> None:
    model = Classifier(small_net())
    pre = PreNorm()
    console = io.StringIO()
    cb = GradGuardCallback(console=console, log_every=4, clip=0.5)
    tr = trainer(tmp_path, max_steps=8, gradient_clip_val=0.2, callbacks=[pre, cb])
    tr.fit(model, loader(scale=1.0))
    assert len(pre.norms) == 8 and min(pre.norms) > 0.2  # Lightning's 0.2 would have changed every step
    assert any(n < 0.5 for n in pre.norms) and any(n > 0.5 for n in pre.norms)
    # Each update used the gradient clipped once, at 0.5 (torch's coefficient max_norm / (norm + 1e-6)).
    assert model.used == pytest.approx([min(n, 0.5) for n in pre.norms], rel=1e-5)
    assert cb.guard.history.total.tolist() == pytest.approx(pre.norms, rel=1e-5)
    clips = [a for a in cb.actions if a.kind == "clip"]
    assert [a.step for a in clips] == [i for i, n in enumerate(pre.norms) if n > 0.5]
    assert tr.gradient_clip_val == 0.2  # given back after the fit
    assert console.getvalue().count("takes over gradient clipping") == 1


class PoisonedStep(Classifier):
    """Its loss turns NaN at one step, as a bad batch or an overflow would make it."""

    def __init__(self, net: nn.Module, bad_step: int) -> None:
        super().__init__(net)
        self.bad_step = bad_step

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if batch_idx == self.bad_step else loss


def test_repair_auto_skips_a_non_finite_step_inside_lightnings_closure(tmp_path: Path) -> None:
    model = PoisonedStep(small_net(), bad_step=3)
    cb = GradGuardCallback(console=False, repair="auto", log_every=2)
    trainer(tmp_path, max_epochs=1, callbacks=[cb]).fit(model, loader(n=96, scale=1.0))
    assert [(a.kind, a.step) for a in cb.actions] == [("skip_step", 3)]
    # The oracle: plain SGD on the same batches with batch 3 left out (a skipped step changes nothing).
    ref = small_net()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for i, (x, y) in enumerate(loader(n=96, scale=1.0)):
        if i == 3:
            continue
        opt.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        opt.step()
    for a, b in zip(model.net.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_vanishing_reaches_diagnoses_and_the_csv_logger(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    from gradguard.demo import digits, mlp

    x, y, _, _ = digits()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64, shuffle=True,
                                       generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = Classifier(mlp(20, 32, nn.Sigmoid), lr=0.1, momentum=0.9)
    logger = pl.loggers.CSVLogger(tmp_path, name="run", version=0)
    cb = GradGuardCallback(console=False, log_every=10)
    trainer(tmp_path, max_steps=110, logger=logger, callbacks=[cb]).fit(model, data)
    (d,) = [d for d in cb.diagnoses if d.kind == "vanishing"]
    assert d.layers[0].startswith("net.") and d.evidence["early_late_ratio"] < 1e-3
    assert cb.guard.history.loss_seen.all()  # the loss reached the Guard, so the stall gate was on evidence

    with open(tmp_path / "run" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    counts = [float(r["gradguard/diagnoses/vanishing"]) for r in rows if r.get("gradguard/diagnoses/vanishing")]
    assert counts and max(counts) == 1.0
    totals = [(int(r["step"]), float(r["gradguard/total_grad_norm"])) for r in rows
              if r.get("gradguard/total_grad_norm")]
    h = cb.guard.history
    assert len(totals) == 11
    # The logged value is the norm of the last step of each read; logged at that step.
    for step, value in totals:
        assert value == pytest.approx(float(h.total[list(h.steps).index(step)]), rel=1e-6)
    assert any(r.get("gradguard/grad_norm/net.0") for r in rows)  # one metric per layer


def test_tensorboard_logger_gets_the_diagnosis_as_text(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = Classifier(small_net())
    cb = GradGuardCallback(console=False, log_every=2)

    class NaNOnce(pl.Callback):  # a NaN gradient at step 3: a nonfinite diagnosis
        def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
            if trainer.global_step == 3:
                pl_module.net[2].bias.grad[0] = float("nan")

    logger = pl.loggers.TensorBoardLogger(tmp_path, name="tb", version=0)
    trainer(tmp_path, max_steps=4, logger=logger, callbacks=[NaNOnce(), cb]).fit(model, loader())
    assert [d.kind for d in cb.diagnoses] == ["nonfinite"]
    acc = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    assert "gradguard/total_grad_norm" in acc.Tags()["scalars"]
    (text,) = [t for t in acc.Tags()["tensors"] if t.startswith("gradguard/diagnoses")]
    (event,) = acc.Tensors(text)
    assert event.step == 3 and b"nonfinite" in event.tensor_proto.string_val[0]


class StateAtTrainStart(pl.Callback):
    """Placed after gradguard's: the Guard's state once fit start and the checkpoint restore have run."""

    def __init__(self, cb: GradGuardCallback) -> None:
        self.cb = cb
        self.state: dict[str, Any] | None = None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.state = self.cb.guard.state_dict()


def test_checkpoint_round_trip_continues_step_and_running_statistics(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    model = Classifier(small_net())
    cb = GradGuardCallback(console=False, log_every=5)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=12, save_top_k=-1)
    trainer(tmp_path, max_steps=14, callbacks=[cb, saver], enable_checkpointing=True).fit(model, loader())
    (path,) = (tmp_path / "ckpt").glob("*step=12.ckpt")  # written during the fit, with the Guard attached
    saved = torch.load(path, weights_only=False)["callbacks"]["GradGuardCallback"]["guard"]
    assert saved["step"] == 12 and saved["history"]["grad_ema"]["count"] == 12

    model2 = Classifier(small_net(seed=1))
    cb2 = GradGuardCallback(console=False, log_every=5)
    probe = StateAtTrainStart(cb2)
    trainer(tmp_path, max_steps=20, callbacks=[cb2, probe]).fit(model2, loader(), ckpt_path=path)
    assert probe.state is not None
    # Equal to what was saved, number for number (JSON text compares NaN too).
    assert json.dumps(probe.state, sort_keys=True) == json.dumps(saved, sort_keys=True)
    assert cb2.guard.step == 20 and list(cb2.guard.history.steps) == list(range(12, 20))
    ema = cb2.guard.history.grad_ema
    assert ema.count == 20 and math.isfinite(ema.mean)


def test_gradient_accumulation_observes_the_mean_micro_batch_loss(tmp_path: Path) -> None:
    class Losses(Classifier):
        def __init__(self) -> None:
            super().__init__(small_net())
            self.losses: list[float] = []

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = super().training_step(batch, batch_idx)
            self.losses.append(loss.item())  # the test's own read, before Lightning divides it for accumulation
            return loss

    model = Losses()
    cb = GradGuardCallback(console=False, log_every=1)
    trainer(tmp_path, max_steps=3, accumulate_grad_batches=2, callbacks=[cb]).fit(model, loader(batch=8))
    h = cb.guard.history
    assert cb.guard.step == 3 and len(model.losses) == 6
    want = [(a + b) / 2 for a, b in zip(model.losses[::2], model.losses[1::2])]
    assert h.loss.tolist() == pytest.approx(want, rel=1e-6)
    assert h.total.tolist() == pytest.approx(model.pre, rel=1e-5)


def test_manual_optimization_is_watched(tmp_path: Path) -> None:
    class Manual(Classifier):
        def __init__(self) -> None:
            super().__init__(small_net())
            self.automatic_optimization = False
            self.losses: list[float] = []

        def training_step(self, batch: Any, batch_idx: int) -> None:
            opt = self.optimizers()
            loss = super().training_step(batch, batch_idx)
            self.losses.append(loss.item())
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()

    model = Manual()
    cb = GradGuardCallback(console=False, log_every=1)
    trainer(tmp_path, max_steps=4, callbacks=[cb]).fit(model, loader())
    h = cb.guard.history
    assert cb.guard.step == 4 and h.loss.tolist() == pytest.approx(model.losses, rel=1e-6)
    assert h.total.tolist() == pytest.approx(model.pre, rel=1e-5)


def test_works_in_a_pytorch_lightning_trainer(tmp_path: Path) -> None:
    """The standalone package: Lightning calls callback hooks by name, so the same callback serves both."""
    ptl = pytest.importorskip("pytorch_lightning")

    class Module(ptl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = small_net()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return F.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    cb = GradGuardCallback(console=False, log_every=2, clip=0.5)
    tr = ptl.Trainer(accelerator="cpu", devices=1, max_steps=4, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, logger=False, gradient_clip_val=0.1,
                     default_root_dir=tmp_path)
    tr.callbacks.append(cb)
    tr.fit(Module(), loader())
    assert cb.guard.step == 4 and [a.kind for a in cb.actions] == ["clip"] * 4 and tr.gradient_clip_val == 0.1
    assert cb.action_counts == {"clip": 4}


def test_bf16_mixed_has_no_false_nonfinite_and_measures_the_model_gradients(tmp_path: Path) -> None:
    model = Classifier(small_net())
    cb = GradGuardCallback(console=False, log_every=5)
    trainer(tmp_path, max_steps=10, precision="bf16-mixed", callbacks=[cb]).fit(model, loader())
    assert cb.diagnoses == [] and cb.guard.step == 10
    assert cb.guard.history.total.tolist() == pytest.approx(model.pre, rel=1e-5)


def test_fp16_gradscaler_overflow_steps_are_neither_counted_nor_reported(tmp_path: Path) -> None:
    """Lightning turns "16-mixed" into bf16 on the CPU, so the fp16 plugin is passed explicitly, with a scale so
    large that the first steps overflow and GradScaler skips them (the oracle: the optimizer's own step count)."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    model = Classifier(small_net())
    cb = GradGuardCallback(console=False, log_every=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**22)
    trainer(tmp_path, max_steps=12, plugins=[MixedPrecision("16-mixed", "cpu", scaler)],
            callbacks=[cb]).fit(model, loader())
    skipped = [i for i, n in enumerate(model.pre) if not math.isfinite(n)]
    assert len(skipped) >= 2 and len(model.used) == 12 - len(skipped)  # the scaler really skipped steps
    assert cb.diagnoses == [] and cb.guard.step == len(model.used)
    finite = [n for n in model.pre if math.isfinite(n)]  # unscaled by Lightning before either hook ran
    assert cb.guard.history.total.tolist() == pytest.approx(finite, rel=1e-5)


def test_fp16_with_a_fused_optimizer_is_measured_unscaled_by_the_step_hook(tmp_path: Path) -> None:
    """A fused optimizer unscales inside its kernel, so the gradients are still scaled in on_before_optimizer_step;
    the callback leaves the step to the Guard's optimizer hook, which reads GradScaler's scale."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    class Fused(Classifier):
        def __init__(self) -> None:
            super().__init__(small_net())
            self.scales: list[float] = []

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=0.01, fused=True)

        def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
            super().on_before_optimizer_step(optimizer)  # the norm of the still scaled gradients
            self.scales.append(self.trainer.precision_plugin.scaler.get_scale())

    model = Fused()
    cb = GradGuardCallback(console=False, log_every=2, clip=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**22)
    trainer(tmp_path, max_steps=12, plugins=[MixedPrecision("16-mixed", "cpu", scaler)],
            callbacks=[cb]).fit(model, loader())
    finite = [n / s for n, s in zip(model.pre, model.scales) if math.isfinite(n)]  # the test's, unscaled
    assert len(finite) < 12 and cb.diagnoses == []
    assert cb.guard.history.total.tolist() == pytest.approx(finite, rel=1e-5)
    assert [a.detail["clipped_norm"] for a in cb.actions] == pytest.approx([0.5] * len(finite), rel=1e-5)


def test_exception_and_end_of_fit_remove_every_hook(tmp_path: Path) -> None:
    class Boom(Classifier):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            if batch_idx == 2:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    model = Boom(small_net())
    cb = GradGuardCallback(console=False, clip=0.5)
    tr = trainer(tmp_path, max_steps=8, gradient_clip_val=1.0, callbacks=[cb])
    with pytest.raises(RuntimeError, match="boom"):
        tr.fit(model, loader())
    opt = cb.guard.optimizer
    assert opt is not None and not opt._optimizer_step_pre_hooks
    assert len(opt._optimizer_step_post_hooks) == 1  # only the test's own (Classifier.used)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert tr.gradient_clip_val == 1.0
    assert cb.guard.step == 2  # the two steps before the failure were watched; still readable
    with pytest.raises(RuntimeError, match="closed"):
        cb.guard.record_gradients()


def test_several_optimizers_are_a_clear_error(tmp_path: Path) -> None:
    class Two(Classifier):
        def __init__(self) -> None:
            super().__init__(small_net())
            self.automatic_optimization = False

        def training_step(self, batch: Any, batch_idx: int) -> None:
            return None

        def configure_optimizers(self) -> Any:
            return [torch.optim.SGD(self.net[0].parameters(), lr=0.1), torch.optim.SGD(self.net[2].parameters(),
                                                                                        lr=0.1)]

    with pytest.raises(ValueError, match="exactly one optimizer"):
        trainer(tmp_path, max_steps=1, callbacks=[GradGuardCallback(console=False)]).fit(Two(), loader())


def test_console_prints_the_diagnosis(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    class NaNOnce(pl.Callback):
        def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
            if trainer.global_step == 1:
                pl_module.net[0].weight.grad[0, 0] = float("inf")

    model = Classifier(small_net())
    trainer(tmp_path, max_steps=3, callbacks=[NaNOnce(), GradGuardCallback()]).fit(model, loader())
    assert "nonfinite" in capsys.readouterr().err


def test_guard_kwargs_reach_the_guard(tmp_path: Path) -> None:
    model = Classifier(small_net())
    cb = GradGuardCallback(console=False, log_every=3, thresholds=gg.Thresholds(window=50))
    trainer(tmp_path, max_steps=3, callbacks=[cb]).fit(model, loader())
    assert cb.guard.log_every == 3 and cb.guard.thresholds.window == 50
    with pytest.raises(TypeError, match="optimizer"):
        GradGuardCallback(optimizer=None)


def test_dead_units_are_found_when_training_step_bypasses_forward(tmp_path: Path) -> None:
    """``training_step`` calls ``self.net``, so the LightningModule's own forward never runs; the callback tells
    the Guard where each training forward starts, and the units killed by a negative bias are named."""
    pytest.importorskip("sklearn")
    from gradguard.demo import digits, kaiming, mlp

    x, y, _, _ = digits()
    torch.manual_seed(0)
    net = mlp(3, 64, nn.ReLU, kaiming)
    with torch.no_grad():
        net[2].bias.fill_(-20.0)
        assert (net[2](net[1](net[0](x))) <= 0).all()  # oracle: every unit of 'net.3' is dead on all the data
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64, shuffle=True,
                                       generator=torch.Generator().manual_seed(0))
    cb = GradGuardCallback(console=False)
    trainer(tmp_path, max_steps=100, callbacks=[cb]).fit(Classifier(net, lr=0.01), data)
    dead = [d for d in cb.diagnoses if d.kind == "dead_units"]
    assert dead and dead[0].layers[0] == "net.3" and dead[0].evidence["dead_fraction"] == 1.0


def test_a_submodule_left_in_eval_is_found_when_training_step_bypasses_forward(tmp_path: Path) -> None:
    """Dropout switched to eval at every epoch start (the pitfall: a leftover .eval()): the oracle is the module's
    own flag during training_step; the callback tells the Guard each forward started, so it is judged."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.5), nn.Linear(16, 3))
    flags: list[bool] = []

    class Leftover(Classifier):
        def on_train_epoch_start(self) -> None:
            self.net[1].eval()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            flags.append(self.net[1].training)
            return super().training_step(batch, batch_idx)

    cb = GradGuardCallback(console=False)
    trainer(tmp_path, max_steps=4, callbacks=[cb]).fit(Leftover(net), loader())
    assert flags and not any(flags)
    found = [d for d in cb.diagnoses if d.kind == "eval_mode_training"]
    assert found and "net.1" in found[0].layers

    net.train()  # Lightning keeps the modes it found: the first fit left net.1 in eval
    cb = GradGuardCallback(console=False)  # the same loop without the leftover: silent
    trainer(tmp_path, max_steps=4, callbacks=[cb]).fit(Classifier(net), loader())
    assert [d for d in cb.diagnoses if d.kind == "eval_mode_training"] == []

"""GradGuardTrainerCallback under a real transformers Trainer.train (CPU, no downloads). Oracles: gradient norms
the test computes itself with torch.linalg.vector_norm (in on_pre_optimizer_step, and in an optimizer pre-step
hook that runs after gradguard's), the Trainer's own logged loss and grad_norm, TensorBoard's event files, the
checkpoint's trainer_state.json."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from gradguard.integrations.transformers import GradGuardTrainerCallback, attach  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    """These models are tiny: a second intra-op thread only waits for a core on 2 shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Classifier(nn.Module):
    """A plain torch module in the transformers calling convention: keyword inputs, a dict with "loss" out."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.net(x)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


class Data(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


def random_data(n: int = 64, scale: float = 5.0) -> Data:
    gen = torch.Generator().manual_seed(0)
    return Data(torch.randn(n, 8, generator=gen) * scale, torch.randint(0, 3, (n,), generator=gen))


def small_model(seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    return Classifier(nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)))


def arguments(tmp_path: Path, **kw: Any) -> TrainingArguments:
    kw.setdefault("report_to", [])
    kw.setdefault("save_strategy", "no")
    kw.setdefault("per_device_train_batch_size", 16)
    kw.setdefault("logging_steps", 1)
    return TrainingArguments(output_dir=str(tmp_path), use_cpu=True, disable_tqdm=True, seed=0,
                             dataloader_num_workers=0, **kw)


def grad_norm(model: nn.Module) -> float:
    return torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()
                                               if p.grad is not None])).item()


class Probe(TrainerCallback):
    """Runs after gradguard's callback (which ``attach`` puts first). ``pre``: the norm at on_pre_optimizer_step,
    after the Trainer's clipping point; ``used``: the norm the optimizer applies, from a pre-step hook registered
    after the Guard's (a fused optimizer receives the clip as its ``grad_scale``, which it divides by)."""

    def __init__(self) -> None:
        self.pre: list[float] = []
        self.used: list[float] = []
        self.logs: list[dict[str, float]] = []
        self.model: nn.Module | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       **kw: Any) -> None:
        self.model = model

        def hook(opt: torch.optim.Optimizer, *_: Any) -> None:
            scale = getattr(opt, "grad_scale", None)
            self.used.append(grad_norm(model) / (float(scale) if scale is not None else 1.0))

        optimizer.optimizer.register_step_pre_hook(hook)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        assert self.model is not None
        self.pre.append(grad_norm(self.model))

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
        self.logs.append(dict(logs))


@pytest.mark.parametrize("optim", ["adamw_torch_fused", "sgd"])
def test_pre_clip_norms_and_one_clip_at_max_grad_norm(tmp_path: Path, optim: str) -> None:
    args = arguments(tmp_path, max_steps=8, max_grad_norm=0.5, optim=optim)
    probe = Probe()
    trainer = Trainer(model=small_model(), args=args, train_dataset=random_data(), callbacks=[probe])
    cb = attach(trainer, console=False, log_every=2)
    trainer.train()
    h = cb.guard.history
    assert h is not None and cb.guard.step == 8
    assert h.total.tolist() == pytest.approx(probe.pre, rel=1e-5)  # measured before any clipping
    assert min(probe.pre) > 0.5  # so the clip really changed every step ...
    assert probe.used == pytest.approx([0.5] * 8, rel=1e-5)  # ... once, at the user's max_grad_norm
    assert args.max_grad_norm == 0.5  # given back
    logged = [e for e in trainer.state.log_history if "grad_norm" in e]
    # The Trainer's own numbers: its grad_norm (clip_grad_norm_ at inf: still the pre-clip norm) and its loss.
    assert [e["grad_norm"] for e in logged] == pytest.approx(probe.pre, rel=1e-5)
    assert h.loss.tolist() == pytest.approx([e["loss"] for e in logged], rel=1e-6)
    assert [a.kind for a in cb.actions] == ["clip"] * 8 and cb.action_counts == {"clip": 8}


def test_user_clip_replaces_max_grad_norm(tmp_path: Path) -> None:
    args = arguments(tmp_path, max_steps=8, max_grad_norm=0.2, optim="sgd")
    probe = Probe()
    trainer = Trainer(model=small_model(), args=args, train_dataset=random_data(scale=1.0), callbacks=[probe])
    console = io.StringIO()
    attach(trainer, console=console, clip=0.5)
    trainer.train()
    assert min(probe.pre) > 0.2 and any(n < 0.5 for n in probe.pre)  # 0.2 would have changed every step
    assert probe.used == pytest.approx([min(n, 0.5) for n in probe.pre], rel=1e-5)
    assert args.max_grad_norm == 0.2
    assert console.getvalue().count("takes over gradient clipping (clip=0.5)") == 1


def test_gradient_accumulation_loss_and_steps(tmp_path: Path) -> None:
    args = arguments(tmp_path, max_steps=4, per_device_train_batch_size=8, gradient_accumulation_steps=2,
                     optim="sgd")
    trainer = Trainer(model=small_model(), args=args, train_dataset=random_data())
    cb = attach(trainer, console=False, log_every=1)
    trainer.train()
    h = cb.guard.history
    assert cb.guard.step == 4 and list(h.steps) == [0, 1, 2, 3]
    # The Trainer's logged loss of a step is the mean over its micro-batches; so is gradguard's.
    losses = [e["loss"] for e in trainer.state.log_history if "grad_norm" in e]
    assert h.loss.tolist() == pytest.approx(losses, rel=1e-6)


def test_vanishing_reaches_diagnoses_the_logs_and_tensorboard(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from gradguard.demo import digits, mlp

    x, y, _, _ = digits()
    torch.manual_seed(0)
    model = Classifier(mlp(20, 32, nn.Sigmoid))
    args = arguments(tmp_path, max_steps=110, per_device_train_batch_size=64, optim="sgd", learning_rate=0.1,
                     lr_scheduler_type="constant", logging_steps=10, max_grad_norm=0.0, report_to=["tensorboard"])
    probe = Probe()
    trainer = Trainer(model=model, args=args, train_dataset=Data(x, y), callbacks=[probe])
    cb = attach(trainer, console=False, log_every=10)
    trainer.train()
    (d,) = [d for d in cb.diagnoses if d.kind == "vanishing"]
    assert d.layers[0].startswith("net.") and d.evidence["early_late_ratio"] < 1e-3
    assert cb.guard.history.loss_seen.all()
    assert max(e.get("gradguard/diagnoses/vanishing", 0) for e in trainer.state.log_history) == 1.0
    assert any(e.get("gradguard/diagnoses/vanishing") == 1.0 for e in probe.logs)  # a callback after ours saw it
    (run,) = (tmp_path / "runs").iterdir()
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    assert acc.Scalars("train/gradguard/diagnoses/vanishing")[-1].value == 1.0
    norms = acc.Scalars("train/gradguard/total_grad_norm")
    h = cb.guard.history
    # Logged every 10 steps: the last step's norm of each read (the Trainer's steps count from 1).
    assert [e.value for e in norms] == pytest.approx([float(h.total[s - 1]) for s in (e.step for e in norms)],
                                                     rel=1e-6)


def test_checkpoint_round_trip_continues_step_and_running_statistics(tmp_path: Path) -> None:
    args = arguments(tmp_path, max_steps=6, save_strategy="steps", save_steps=6, optim="sgd")
    trainer = Trainer(model=small_model(), args=args, train_dataset=random_data())
    cb = attach(trainer, console=False, log_every=4)
    trainer.train()
    ckpt = tmp_path / "checkpoint-6"
    stored = json.loads((ckpt / "trainer_state.json").read_text())["stateful_callbacks"]
    saved = stored["GradGuardTrainerCallback"]["attributes"]["_restored_state"]
    assert saved["step"] == 6 and saved == json.loads(json.dumps(cb.guard.state_dict()))

    class StateAtBegin(TrainerCallback):
        state: dict[str, Any] | None = None

        def on_train_begin(self, *a: Any, **kw: Any) -> None:
            self.state = cb2.guard.state_dict()

    probe = StateAtBegin()
    args2 = arguments(tmp_path, max_steps=12, save_strategy="no", optim="sgd")
    trainer2 = Trainer(model=small_model(seed=1), args=args2, train_dataset=random_data(), callbacks=[probe])
    cb2 = attach(trainer2, console=False, log_every=4)
    trainer2.train(resume_from_checkpoint=str(ckpt))
    assert probe.state is not None and json.dumps(probe.state, sort_keys=True) == json.dumps(saved, sort_keys=True)
    assert cb2.guard.step == 12 and list(cb2.guard.history.steps) == list(range(6, 12))
    assert cb2.guard.history.grad_ema.count == 12


def test_repair_auto_skips_a_nan_step(tmp_path: Path) -> None:
    class NaNAt(Classifier):
        calls = 0

        def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
            out = super().forward(x, labels)
            self.calls += 1
            if self.calls == 4:  # the 4th step's loss (and so every gradient) is NaN
                out["loss"] = out["loss"] * float("nan")
            return out

    torch.manual_seed(0)
    model = NaNAt(nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)))
    args = arguments(tmp_path, max_steps=6, optim="sgd", max_grad_norm=0.0)
    trainer = Trainer(model=model, args=args, train_dataset=random_data())
    cb = attach(trainer, console=False, repair="auto", log_every=1)
    trainer.train()
    assert [(a.kind, a.step) for a in cb.actions if a.kind == "skip_step"] == [("skip_step", 3)]
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the NaN step never reached the weights
    assert "nonfinite" in [d.kind for d in cb.diagnoses]


def test_callback_passed_in_callbacks_still_fills_log_history(tmp_path: Path) -> None:
    cb = GradGuardTrainerCallback(console=False, log_every=2, log_layers=True)
    trainer = Trainer(model=small_model(), args=arguments(tmp_path, max_steps=4, optim="sgd"),
                      train_dataset=random_data(), callbacks=[cb])
    trainer.train()
    last = [e for e in trainer.state.log_history if "gradguard/total_grad_norm" in e]
    assert [e["step"] for e in last] == [1, 2, 3, 4]  # on_log reads pending statistics at every log
    assert {"gradguard/grad_norm/net.0", "gradguard/grad_norm/net.2"} <= set(last[-1])
    assert math.isfinite(last[-1]["gradguard/total_grad_norm"])
    with pytest.raises(TypeError, match="model"):
        GradGuardTrainerCallback(model=None)

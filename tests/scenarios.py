"""Models, data and a training loop shared by the scenario tests: real bundled data (scikit-learn digits) and the
adding problem (Hochreiter & Schmidhuber 1997), small enough for 2 CPU cores."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

import gradguard as gg
from gradguard.demo import Recurrent, adding_batch, digits, kaiming, mlp  # noqa: F401 - shared with the tests


class ListSink:
    """A user's sink (``Guard(sinks=[...])``): keeps every record it is given, in order."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def close(self) -> None:
        pass


def lecun(lin: nn.Linear) -> None:
    """Var(w) = 1/n: right for linear/tanh, half what ReLU needs."""
    nn.init.normal_(lin.weight, std=lin.in_features ** -0.5)
    nn.init.zeros_(lin.bias)


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Linear(32 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.view(-1, 1, 8, 8)).flatten(1))


class DigitsTransformer(nn.Module):
    """Each image row is a token (8 tokens of 8 pixels): pre-LN encoder, mean-pooled, linear head."""

    def __init__(self, d_model: int = 32, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d_model)
        self.pos = nn.Parameter(torch.zeros(8, d_model))
        layer = nn.TransformerEncoderLayer(d_model, 4, 4 * d_model, dropout=0.1, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.view(-1, 8, 8)) + self.pos
        return self.head(self.norm(self.encoder(h)).mean(1))


@dataclass
class Result:
    diagnoses: list[gg.Diagnosis]
    losses: list[float]
    accuracy: float
    guard: gg.Guard


def train_classifier(model: nn.Module, opt: torch.optim.Optimizer, steps: int, *, batch: int = 64, seed: int = 0,
                     sched: torch.optim.lr_scheduler.LRScheduler | None = None,
                     hook: Callable[[int], None] | None = None,
                     on_grads: Callable[[int], None] | None = None, **guard_kw: object) -> Result:
    """Train on digits for ``steps`` optimizer steps under a Guard; returns diagnoses, losses, test accuracy.

    ``hook(step)`` runs before each forward, ``on_grads(step)`` after backward and before ``optimizer.step()``.
    """
    xtr, ytr, xte, yte = digits()
    gen = torch.Generator().manual_seed(seed)
    guard_kw.setdefault("console", False)
    guard = gg.Guard(model, opt, **guard_kw)  # type: ignore[arg-type]
    losses = []
    for step in range(steps):
        if hook is not None:
            hook(step)
        idx = torch.randint(0, len(xtr), (batch,), generator=gen)
        loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
        guard.observe_loss(loss)
        opt.zero_grad()
        loss.backward()
        if on_grads is not None:
            on_grads(step)
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.item())  # the test's own read; not gradguard's
    model.eval()
    with torch.no_grad():
        acc = (model(xte).argmax(1) == yte).float().mean().item()
    model.train()
    diags = guard.diagnoses
    guard.close()
    return Result(diags, losses, acc, guard)


def train_adding(model: nn.Module, opt: torch.optim.Optimizer, steps: int, *, length: int, batch: int = 32,
                 seed: int = 0, **guard_kw: object) -> Result:
    """Train on the adding problem (MSE); ``accuracy`` is the fraction of the last 50 losses below 0.05."""
    gen = torch.Generator().manual_seed(seed)
    guard_kw.setdefault("console", False)
    guard = gg.Guard(model, opt, **guard_kw)  # type: ignore[arg-type]
    losses = []
    for _ in range(steps):
        x, y = adding_batch(batch, length, gen)
        loss = nn.functional.mse_loss(model(x), y)
        guard.observe_loss(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    diags = guard.diagnoses
    guard.close()
    return Result(diags, losses, float(np.mean(np.array(losses[-50:]) < 0.05)), guard)


def warmup(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / steps))

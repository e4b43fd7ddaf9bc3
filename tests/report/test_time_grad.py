"""Vanishing through time reaches stats.jsonl and the report: the gradient that reaches the first and the last
time steps of a recurrent layer, at sampled steps.

Oracles: the gradient the test's own loop reads off its input (x.grad, per time step) at every step, and what the
Guard's history holds; never the report's own reading of the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.report.html import render
from gradguard.report.load import load_run

T = 100


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.RNN(2, 32, batch_first=True, nonlinearity="tanh")
        self.head = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def adding(batch: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The adding problem: random values and two marked positions; the target is the sum of the marked values."""
    values = torch.rand(batch, T, generator=gen)
    marks = torch.zeros(batch, T)
    first = torch.randint(0, T // 2, (batch,), generator=gen)
    second = torch.randint(T // 2, T, (batch,), generator=gen)
    marks[torch.arange(batch), first] = 1.0
    marks[torch.arange(batch), second] = 1.0
    return torch.stack([values, marks], dim=2), (values * marks).sum(1, keepdim=True)


def test_the_gradient_through_time_is_logged_as_measured_and_plotted(tmp_path: Path) -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    measured: dict[int, tuple[float, float]] = {}  # step -> (first 10%, last 10%), read off x.grad by the loop
    k = T // 10
    with gg.Guard(model, opt, console=False, log_dir=tmp_path) as guard:
        for step in range(200):
            x, y = adding(32, gen)
            x.requires_grad_(True)
            loss = nn.functional.mse_loss(model(x), y)
            guard.observe_loss(loss)
            opt.zero_grad()
            loss.backward()
            per_t = x.grad.square().sum(dim=(0, 2)).sqrt()  # the gradient reaching each time step
            measured[step] = (per_t[:k].mean().item(), per_t[-k:].mean().item())
            opt.step()
        guard.close()
        history = guard.history
        assert history is not None
        held = {(s, name): (early, late, steps) for s, name, early, late, steps in history.times}

    lines = [json.loads(x) for x in (tmp_path / "stats.jsonl").read_text().splitlines()]
    logged = {(t["step"], name): (t["early"], t["late"], t["time_steps"])
              for line in lines for name, t in line.get("time_grad", {}).items()}
    # Every sample the history holds is in the file, as held (one per sampled step: 0, 25, 50, ...).
    assert logged == held
    assert sorted(s for s, _ in logged) == list(range(0, 200, 25))
    for (step, name), (early, late, steps) in logged.items():
        assert name == "rnn" and steps == T
        assert early == pytest.approx(measured[step][0], rel=1e-4)
        assert late == pytest.approx(measured[step][1], rel=1e-4)
        line = next(x for x in lines if x["step"] >= step)  # the first line at or after the sample
        assert line["time_grad"]["rnn"]["step"] == step
    # A tanh RNN at T=100 vanishes through time: the start of the sequence gets a tiny share of the gradient.
    last = max(s for s, _ in logged)
    assert measured[last][0] < 1e-3 * measured[last][1]

    run = load_run(tmp_path)
    page = render(run)
    assert "<h2>Gradient through time</h2>" in page
    section = page[page.index("<h2>Gradient through time</h2>"):]
    section = section[:section.index("</section>")]
    assert "first 10% of the sequence (solid)" in section and "last 10% (dashed)" in section
    assert "<img alt='Gradient through time' src='data:image/png;base64," in section
    assert run.notes == []


def test_a_model_without_recurrent_layers_has_no_time_plot(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    with gg.Guard(model, opt, console=False, log_dir=tmp_path) as guard:
        for _ in range(30):
            loss = nn.functional.mse_loss(model(x), y)
            guard.observe_loss(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert all("time_grad" not in json.loads(x) for x in (tmp_path / "stats.jsonl").read_text().splitlines())
    assert "Gradient through time" not in render(load_run(tmp_path))

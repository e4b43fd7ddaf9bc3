"""Structural remedies against the init formulas (variances by hand) and the doctor on a deep sigmoid MLP."""

from __future__ import annotations

import math

import pytest
import torch
from scenarios import digits, mlp
from torch import nn

import gradguard as gg


def test_swap_activations_returns_what_changed() -> None:
    m = nn.Sequential(nn.Linear(4, 4), nn.Sigmoid(), nn.Sequential(nn.Linear(4, 4), nn.Tanh()), nn.Linear(4, 2))
    changed = gg.swap_activations(m, (nn.Sigmoid, nn.Tanh), nn.GELU)
    assert changed == ["1", "2.1"] and isinstance(m[1], nn.GELU) and isinstance(m[2][1], nn.GELU)
    assert m(torch.randn(3, 4)).shape == (3, 2)


def test_kaiming_and_xavier_use_the_gain_of_the_following_activation() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.Tanh(), nn.Linear(1024, 512),
                      nn.LeakyReLU(0.2), nn.Linear(512, 10))
    assert gg.reinit(m, "kaiming") == ["0", "2", "4", "6"]
    fan = {0: 1024, 2: 1024, 4: 1024, 6: 512}
    gains = {0: math.sqrt(2), 2: 5 / 3, 4: math.sqrt(2 / (1 + 0.2 ** 2)), 6: 1.0}  # He et al.; tanh 5/3; linear 1
    def close(i: int, want: float) -> bool:  # within 5 standard errors of a sample std (~1/sqrt(2n) relative)
        return abs(m[i].weight.std().item() - want) < 5 * want / math.sqrt(2 * m[i].weight.numel())

    for i in fan:
        assert close(i, gains[i] / math.sqrt(fan[i])), i
        assert torch.count_nonzero(m[i].bias) == 0
    gg.reinit(m, "xavier")
    for i, fan_out in ((0, 1024), (2, 1024), (4, 512)):
        bound = gains[i] * math.sqrt(6 / (fan[i] + fan_out))  # Glorot uniform, std = bound / sqrt(3)
        assert close(i, bound / math.sqrt(3)), i


def test_recurrent_schemes() -> None:
    lstm = nn.LSTM(3, 8)
    gg.reinit(lstm, "orthogonal")
    for chunk in lstm.weight_hh_l0.detach().chunk(4, 0):  # every gate's block orthogonal
        torch.testing.assert_close(chunk @ chunk.T, torch.eye(8), atol=1e-5, rtol=0)
    assert torch.equal(lstm.bias_ih_l0[8:16], torch.ones(8)) and lstm.bias_hh_l0.abs().sum() == 0
    rnn = nn.RNN(3, 8, batch_first=True)
    assert gg.reinit(nn.Sequential(rnn), "identity") == ["0"]
    assert torch.equal(rnn.weight_hh_l0, torch.eye(8)) and rnn.nonlinearity == "relu"
    out, _ = rnn(torch.randn(2, 5, 3))
    assert (out >= 0).all()  # ReLU recurrence now


def test_lsuv_gives_unit_output_variance_layer_by_layer() -> None:
    torch.manual_seed(0)
    m = mlp(6, 64, nn.Tanh)
    x = digits()[0][:256]
    gg.reinit(m, "lsuv", data=x, lsuv_tol=0.05)
    outs = {}
    hooks = [m[i].register_forward_hook(lambda mod, a, o, i=i: outs.__setitem__(i, o)) for i in range(0, 13, 2)]
    with torch.no_grad():
        m(x)
    for h in hooks:
        h.remove()
    for i, o in outs.items():
        assert abs(o.var().item() - 1.0) < 0.05, (i, o.var().item())
    with pytest.raises(ValueError, match="needs a batch"):
        gg.reinit(m, "lsuv")


def test_zero_residual_ends() -> None:
    class Bottleneck(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.bn1 = nn.Linear(4, 4), nn.BatchNorm1d(4)
            self.fc2, self.bn2 = nn.Linear(4, 4), nn.BatchNorm1d(4)
            self.fc3, self.bn3 = nn.Linear(4, 4), nn.BatchNorm1d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.bn1(self.fc1(x)))
            h = torch.relu(self.bn2(self.fc2(h)))
            return torch.relu(x + self.bn3(self.fc3(h)))

    m = nn.Sequential(Bottleneck(), Bottleneck())
    assert gg.reinit(m, "zero_residual") == ["0.bn3", "1.bn3"]  # the branch end only, not bn2 as well
    assert torch.equal(m[0].bn2.weight, torch.ones(4))
    x = torch.randn(3, 4).abs()
    assert torch.equal(m(x), x)  # every block starts as the identity (on a non-negative input)
    with pytest.raises(ValueError, match="unknown scheme"):
        gg.reinit(m, "magic")


def test_doctor_finds_the_fix_for_a_deep_sigmoid_mlp() -> None:
    xtr, ytr, xte, yte = digits()

    def build() -> tuple[nn.Module, torch.optim.Optimizer]:
        m = mlp(10, 64, nn.Sigmoid)
        return m, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)

    def train(m: nn.Module, opt: torch.optim.Optimizer) -> list[float]:
        gen = torch.Generator().manual_seed(0)
        losses = []
        for _ in range(300):
            idx = torch.randint(0, len(xtr), (64,), generator=gen)
            loss = nn.functional.cross_entropy(m(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    def accuracy(m: nn.Module) -> float:
        with gg.inference(m):
            return (m(xte).argmax(1) == yte).float().mean().item()

    vanishing = gg.Diagnosis("vanishing", "warning", 99, ["0"], "Vanishing gradients through depth")
    trials = gg.doctor(build, train, vanishing)
    best, untreated = trials[0], next(t for t in trials if t.name == "untreated")
    assert best.name != "untreated" and ("Kaiming" in best.name or "Xavier" in best.name or "LSUV" in best.name)
    assert accuracy(best.model) >= 0.85 and accuracy(untreated.model) < 0.2
    assert untreated.flow_ratio is not None and untreated.flow_ratio < 1e-3 < (best.flow_ratio or 0)
    assert "vanishing" in untreated.diagnoses and "vanishing" not in best.diagnoses

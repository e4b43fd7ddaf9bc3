"""One scenario per diagnosis on real data (scikit-learn digits) or the adding problem, and healthy runs that
must stay silent. Oracles: the test's own reading of the loss curve, activations and gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scenarios import (
    DigitsCNN,
    DigitsTransformer,
    Recurrent,
    digits,
    kaiming,
    lecun,
    mlp,
    train_adding,
    train_classifier,
    warmup,
)
from torch import nn

import gradguard as gg


def kinds(result) -> list[str]:
    return [d.kind for d in result.diagnoses]


def test_deep_sigmoid_vanishes_early_layers_named_and_relu_kaiming_is_silent() -> None:
    m = mlp(10, 64, nn.Sigmoid)
    linears = [name for name, mod in m.named_children() if isinstance(mod, nn.Linear)]
    rms: list[list[float]] = []  # the test's own per-layer RMS gradient, every step, from torch

    def record(step: int) -> None:
        rms.append([(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in m[int(n)].parameters()]))
                     / math.sqrt(sum(p.numel() for p in m[int(n)].parameters()))).item() for n in linears])

    r = train_classifier(m, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), 300, on_grads=record)
    assert r.accuracy < 0.3  # the oracle: it really does not learn
    (d,) = [d for d in r.diagnoses if d.kind == "vanishing"]
    assert kinds(r) == ["vanishing"]  # reported once
    assert d.layers[0] in ("0", "2", "4") and "20" not in d.layers  # early layers first, never the head
    # Evidence = median RMS of the first quarter of the 11 layers (2) over the last quarter (2), each layer's
    # median over the 100 steps up to the diagnosis: recomputed from the test's own gradients.
    per_layer = np.median(np.array(rms[d.step - 99: d.step + 1]), axis=0)
    want = np.median(per_layer[:2]) / np.median(per_layer[-2:])
    assert want < 1e-3 and math.isclose(d.evidence["early_late_ratio"], want, rel_tol=1e-4)
    first = linears.index(d.layers[0])
    assert math.isclose(d.evidence["min_layer_ratio"], per_layer[first] / np.median(per_layer[-2:]), rel_tol=1e-4)

    torch.manual_seed(0)
    m = mlp(10, 64, nn.ReLU, kaiming)
    r = train_classifier(m, torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9), 300)
    assert r.accuracy > 0.85 and r.diagnoses == []


def test_deep_relu_with_lecun_variance_vanishes_by_absolute_evidence() -> None:
    m = mlp(30, 64, nn.ReLU, lecun)
    linears = [mod for mod in m if isinstance(mod, nn.Linear)]
    snaps: dict[int, list[torch.Tensor]] = {}

    def record(step: int) -> None:  # the test's own copies of the weights, before every step
        snaps[step] = [torch.cat([lin.weight.detach().flatten(), lin.bias.detach().flatten()]).clone()
                       for lin in linears]

    r = train_classifier(m, torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9), 300, on_grads=record)
    assert r.accuracy < 0.3
    van = [d for d in r.diagnoses if d.kind == "vanishing"]
    assert len(van) >= 1
    d = van[0]
    # Absolute evidence: over the last three sampled steps (every 25) before the diagnosis, half the layers
    # move their weights by < 1e-5 of their norm. Recomputed from the test's own weight copies.
    sampled = [s for s in range(0, d.step + 1, 25)][-3:]
    medians = [np.median([(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item()
                          for a, b in zip(snaps[s + 1], snaps[s])]) for s in sampled]
    assert max(medians) < 1e-5
    assert math.isclose(d.evidence["median_update_ratio"], max(medians), rel_tol=1e-3)


@pytest.mark.parametrize("seed,lr", [(0, 1.0), (1, 0.8), (2, 1.5)])
def test_too_high_learning_rate_is_exploding_before_the_first_nan(seed: int, lr: float) -> None:
    torch.manual_seed(seed)
    m = mlp(3, 128, nn.ReLU)
    r = train_classifier(m, torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9), 80, seed=seed)
    first_nan = next(i for i, v in enumerate(r.losses) if not math.isfinite(v))  # the oracle
    exploding = [d for d in r.diagnoses if d.kind == "exploding"]
    assert exploding and exploding[0].step < first_nan
    nonfinite = [d for d in r.diagnoses if d.kind == "nonfinite"]
    assert nonfinite and nonfinite[0].step <= first_nan
    assert r.diagnoses.index(exploding[0]) < r.diagnoses.index(nonfinite[0])


class Unstable(nn.Module):
    """A log that turns NaN once ``shift`` pushes its input below zero."""

    def __init__(self) -> None:
        super().__init__()
        self.shift = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(torch.relu(x) + 1.0 - self.shift)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(64, 64), nn.ReLU())
        self.block = nn.Sequential(nn.Linear(64, 64), Unstable())
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)))


def test_nan_born_in_a_submodule_is_named_at_its_step_before_the_update() -> None:
    m = Net()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    seen_before_update: list[list[str]] = []
    guard_holder: list[gg.Guard] = []

    def poison(step: int) -> None:
        if step == 30:
            m.block[1].shift = 5.0
            # runs after the Guard's own pre-step hook: what the Guard knows before the optimizer applies step 30
            opt.register_step_pre_hook(lambda *a: seen_before_update.append(
                [d.kind for d in guard_holder[0]._diagnoses]))

    orig = gg.Guard.__init__

    def capture(self, *a, **k):
        orig(self, *a, **k)
        guard_holder.append(self)

    gg.Guard.__init__ = capture
    try:
        r = train_classifier(m, opt, 32, hook=poison)
    finally:
        gg.Guard.__init__ = orig
    (d,) = [d for d in r.diagnoses if d.kind == "nonfinite"]
    assert d.step == 30 and d.layers[0] == "block.1"
    assert "output of 'block.1'" in d.message
    assert seen_before_update[0] == ["nonfinite"]


def test_nan_step_is_exact_in_deferred_mode() -> None:
    m = Net()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)

    def poison(step: int) -> None:
        if step == 13:
            m.block[1].shift = 5.0

    r = train_classifier(m, opt, 25, hook=poison, nonfinite_check="deferred", log_every=10)
    (d,) = [d for d in r.diagnoses if d.kind == "nonfinite"]
    assert d.step == 13 and "nonfinite_check='step'" in d.message


class SqrtAbs(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(x.abs())


def test_nan_born_in_backward_names_the_layer_it_enters() -> None:
    m = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), SqrtAbs(), nn.Linear(32, 10))
    with torch.no_grad():
        m[2].weight.zero_()
        m[2].bias.zero_()  # sqrt(|0|): finite forward, d/dx = inf * sign(0) = NaN in backward
    r = train_classifier(m, torch.optim.SGD(m.parameters(), lr=0.05), 3)
    (d,) = [d for d in r.diagnoses if d.kind == "nonfinite"]
    assert d.step == 0 and d.layers[:2] == ["2", "0"] and "4" not in d.layers
    assert "backward" in d.message and math.isfinite(r.losses[0])


def test_vanilla_rnn_vanishes_through_time_and_is_reported_once() -> None:
    m = Recurrent("rnn")
    r = train_adding(m, torch.optim.Adam(m.parameters(), lr=1e-3), 500, length=100)
    assert np.mean(r.losses[-100:]) > 0.15  # stuck at the predict-the-mean baseline (1/6)
    assert kinds(r) == ["vanishing"]
    d = r.diagnoses[0]
    assert d.layers == ["rnn"] and "through time" in d.message
    assert d.evidence["early_late_time_ratio"] < 1e-3 and d.evidence["time_steps"] == 100


def test_lstm_that_learns_is_silent_once_it_learns() -> None:
    m = Recurrent("lstm")
    r = train_adding(m, torch.optim.Adam(m.parameters(), lr=1e-2), 1300, length=100)
    losses = np.array(r.losses)
    learned = next(i for i in range(0, len(losses) - 50) if losses[i:i + 50].mean() < 0.05)  # the oracle
    assert learned < 1200
    assert all(d.step < learned for d in r.diagnoses), [str(d) for d in r.diagnoses]
    assert all(d.kind == "vanishing" for d in r.diagnoses)


def test_relus_killed_by_negative_bias_are_dead_units() -> None:
    m = mlp(3, 64, nn.ReLU, kaiming)
    with torch.no_grad():
        m[2].bias.fill_(-20.0)  # the second hidden layer: pre-activations far below zero
    xtr = digits()[0]
    with torch.no_grad():  # oracle: which units of '3' are never positive on the whole training set
        pre = m[2](m[1](m[0](xtr)))
    dead = (pre <= 0).all(0).float().mean().item()
    assert dead == 1.0
    r = train_classifier(m, torch.optim.SGD(m.parameters(), lr=0.01), 100)
    dead_diags = [d for d in r.diagnoses if d.kind == "dead_units"]
    d = dead_diags[0]  # the first named is the killed one; the ReLU after it dies of zero input (zero bias)
    assert d.layers == ["3", "2"] and d.evidence["dead_fraction"] == dead and d.severity == "error"
    assert [x.layers[0] for x in dead_diags] == ["3", "5"]


class _ThreeLayers(nn.Module):
    """ReLU called as a function (as pytorch/examples' mnist does: no activation module to sample), or as modules."""

    def __init__(self, modules: bool) -> None:
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(64, 128), nn.Linear(128, 64), nn.Linear(64, 10)
        self.r1, self.r2 = (nn.ReLU(), nn.ReLU()) if modules else (nn.functional.relu, nn.functional.relu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.r2(self.fc2(self.r1(self.fc1(x)))))


@pytest.mark.parametrize("kill, modules", [(True, False), (False, False), (True, True)])
def test_a_layer_that_dies_mid_run_behind_functional_relus_is_named_from_its_gradients(kill: bool,
                                                                                      modules: bool) -> None:
    # At step 100 fc1's bias goes to -100: its pre-activations are negative for every input in [0, 1]^64 (the
    # oracle below), so from then on no gradient reaches fc1, exactly 0 at every step; the head and fc2's bias
    # keep learning the label frequencies and the loss goes flat. The same run untouched learns and stays silent.
    torch.manual_seed(0)
    m = _ThreeLayers(modules)
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    guard = gg.Guard(m, opt, console=False)
    xtr, ytr = digits()[:2]
    gen = torch.Generator().manual_seed(0)
    for s in range(400):
        if kill and s == 100:
            with torch.no_grad():
                m.fc1.bias.fill_(-100.0)
                assert (m.fc1(xtr) < 0).all()  # oracle: every unit after fc1 is dead on the whole training set
        idx = torch.randint(0, len(xtr), (64,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(m(xtr[idx]), ytr[idx]).backward()
        opt.step()
    guard.close()
    dead = [d for d in guard.diagnoses if d.kind == "dead_units"]
    if not kill:
        assert guard.diagnoses == []
        return
    if modules:  # the samples name the dead ReLU module; the gradient form does not repeat it
        assert dead and dead[0].layers == ["r1"] and dead[0].evidence["dead_fraction"] == 1.0
        assert not [d for d in dead if "No gradient reaches" in d.message]
        return
    assert not [d for d in guard.diagnoses if d.kind == "vanishing"]  # exact zeros are dead units, not vanishing
    assert len(dead) == 1 and dead[0].layers == ["fc1"] and dead[0].severity == "error"
    # Reported once 50 steps of exact zeros have passed, counted from the step of the kill.
    assert dead[0].step >= 150 and "since step 100" in dead[0].message


def test_sigmoid_with_huge_weights_saturates() -> None:
    m = mlp(3, 64, nn.Sigmoid)
    with torch.no_grad():
        for lin in (m[0], m[2], m[4]):
            lin.weight.mul_(30.0)
    r = train_classifier(m, torch.optim.SGD(m.parameters(), lr=0.01), 100)
    sat = [d for d in r.diagnoses if d.kind == "saturation"]
    assert {d.layers[0] for d in sat} >= {"1", "3"}
    xtr = digits()[0]
    with torch.no_grad():  # oracle: share of sigmoid outputs with slope < 1% of the peak, on the training set
        s = m[1](m[0](xtr))
    flat = ((s * (1 - s)) < 0.0025).float().mean().item()
    d1 = next(d for d in sat if d.layers[0] == "1")
    assert flat > 0.5 and abs(d1.evidence["saturated_fraction"] - flat) < 0.1


def test_healthy_mlp_adam_is_silent() -> None:
    m = mlp(3, 128, nn.ReLU)
    r = train_classifier(m, torch.optim.Adam(m.parameters(), lr=1e-3), 400)
    assert r.accuracy > 0.9 and r.diagnoses == []


def test_healthy_cnn_with_batchnorm_is_silent() -> None:
    m = DigitsCNN()
    r = train_classifier(m, torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9), 300)
    assert r.accuracy > 0.95 and r.diagnoses == []


def test_healthy_transformer_with_layernorm_and_warmup_is_silent() -> None:
    m = DigitsTransformer()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    r = train_classifier(m, opt, 400, sched=warmup(opt, 50))
    assert r.accuracy > 0.9 and r.diagnoses == []


def test_top_hidden_sigmoid_is_judged_but_an_output_sigmoid_is_not() -> None:
    """Glorot & Bengio's saturating layer is the top hidden one, under a linear head: it must be judged. A sigmoid
    that produces the output is confident by design and is left alone."""
    torch.manual_seed(0)
    hidden = nn.Sequential(nn.Linear(64, 32), nn.Sigmoid(), nn.Linear(32, 10))
    with torch.no_grad():
        hidden[0].bias.fill_(-12.0)  # every hidden unit pinned near 0
    xtr = digits()[0]
    with torch.no_grad():  # oracle: the share of flat outputs, computed here
        s = hidden[1](hidden[0](xtr))
        assert ((s * (1 - s)) < 0.0025).float().mean().item() > 0.9
    r = train_classifier(hidden, torch.optim.SGD(hidden.parameters(), lr=0.01), 100)
    assert [d.layers[0] for d in r.diagnoses if d.kind == "saturation"] == ["1"]

    torch.manual_seed(0)
    output = nn.Sequential(nn.Linear(64, 10), nn.Sigmoid())
    with torch.no_grad():
        output[0].weight.mul_(50.0)
        s = output[1](output[0](xtr))
        assert ((s * (1 - s)) < 0.0025).float().mean().item() > 0.5
    r = train_classifier(output, torch.optim.SGD(output.parameters(), lr=0.01), 100)
    assert [d for d in r.diagnoses if d.kind == "saturation"] == []

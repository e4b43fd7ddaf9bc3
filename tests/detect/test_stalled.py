"""``stalled``: raised on runs that never learned or gave their progress back, never on a run that learned and then
flattened (converging to its data's noise floor); its explanation claims only what was measured.

Oracles: runs whose outcome is known by construction (labels with 30% noise have a loss floor of ~0.61 nats, far
above half the start; an identity-initialised RNN sits at the adding problem's trivial MSE of 1/6; a learning rate
of 1e-5 moves the weights by ~1e-5 of their norm per step) and hand-built loss histories whose course is given.
Every property is checked over several seeds.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.demo_data import Recurrent, adding_batch
from gradguard.detect.history import History, Thresholds
from gradguard.detect.stalled import HIGH_UPDATE, LOW_UPDATE, detect_stalled, start_level

RAISE_LR = ("larger learning rate", "raise the learning rate")  # remedies that point the learning rate up
NOT_MEASURED = "update sizes were not measured"


def stalls(g: gg.Guard) -> list[gg.Diagnosis]:
    return [d for d in g.diagnoses if d.kind == "stalled"]


# ------------------------------------------------------------------------------------------------ real runs


def noise_floor(seed: int, steps: int = 400) -> tuple[gg.Guard, float]:
    """A binary task with 30% of the labels flipped: the best possible loss is ~0.611 (from ~0.69 at the start),
    well above half the start. Adam 1e-3, healthy."""
    torch.manual_seed(seed)
    x = torch.randn(4096, 20)
    y = (x[:, 0] > 0).long()
    flip = torch.rand(4096) < 0.3
    y[flip] = 1 - y[flip]
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with gg.Guard(model, opt, console=False) as g:
        for _ in range(steps):
            idx = torch.randint(0, 4096, (128,))
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        clean = float((model(x).argmax(1) == (x[:, 0] > 0).long()).float().mean())
    return g, clean


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_run_converged_to_its_noise_floor_is_not_stalled(seed: int) -> None:
    g, clean = noise_floor(seed)
    assert clean > 0.85  # it learned the rule behind the noisy labels: healthy by its own account
    assert stalls(g) == [] and g.diagnoses == []


def noisy_regression(seed: int, steps: int = 400) -> gg.Guard:
    """sin(3x) plus noise of variance 0.49: the loss falls from ~1 to its floor of ~0.5 and stays (a tanh MLP)."""
    torch.manual_seed(seed)
    x = torch.rand(8192, 1) * 4 - 2
    y = torch.sin(3 * x) + 0.7 * torch.randn_like(x)
    model = nn.Sequential(nn.Linear(1, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    with gg.Guard(model, opt, console=False) as g:
        for _ in range(steps):
            idx = torch.randint(0, 8192, (128,))
            loss = (model(x[idx]) - y[idx]).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return g


@pytest.mark.parametrize("seed", [0, 1])
def test_a_regression_at_its_noise_floor_is_not_stalled(seed: int) -> None:
    g = noisy_regression(seed)
    assert stalls(g) == []


def irnn(seed: int, steps: int = 260) -> gg.Guard:
    """Le et al.'s IRNN on the adding problem (T=100, 32 units, Adam 2e-3, clip 1): it reaches the trivial MSE
    (1/6, the mean) within its first steps and sits there for thousands of steps (EXPERIMENTS.md F9)."""
    torch.manual_seed(seed)
    model = Recurrent("rnn", hidden=32)
    gg.reinit(model, "identity")
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    with gg.Guard(model, opt, console=False, clip=1.0) as g:
        for _ in range(steps):
            x, y = adding_batch(32, 100, gen)
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return g


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_identity_rnn_plateau_at_the_trivial_answer_is_stalled(seed: int) -> None:
    g = irnn(seed)
    found = stalls(g)
    assert found, [(d.step, d.kind) for d in g.diagnoses]
    d = found[0]
    assert d.evidence["loss_mean"] > 0.8 / 6  # on the plateau: the oracle's trivial MSE
    assert "identity-initialised" in d.message and not any(r in " ".join(d.remedies) for r in RAISE_LR)


def too_low(seed: int, by_hand: bool, steps: int = 260) -> gg.Guard:
    """Linear regression through a ReLU MLP at SGD lr 1e-5 (1000x too low): with torch.optim.SGD, or updated by
    hand (no optimizer: each backward is a step, and gradguard never sees the update)."""
    torch.manual_seed(seed)
    x = torch.randn(2048, 16)
    y = x @ torch.randn(16, 1)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 1))
    opt = None if by_hand else torch.optim.SGD(model.parameters(), lr=1e-5)
    with gg.Guard(model, opt, console=False) as g:
        for _ in range(steps):
            idx = torch.randint(0, 2048, (64,))
            loss = (model(x[idx]) - y[idx]).square().mean()
            model.zero_grad()
            loss.backward()
            if opt is not None:
                opt.step()
            else:
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(p.grad, alpha=-1e-5)
    return g


@pytest.mark.parametrize("seed", [0, 1])
def test_a_learning_rate_far_too_low_is_named_only_where_updates_were_measured(seed: int) -> None:
    measured = stalls(too_low(seed, by_hand=False))
    assert measured and measured[0].evidence["median_update_ratio"] < LOW_UPDATE
    assert "too low" in measured[0].message and measured[0].remedies[0].startswith("raise the learning rate")
    # The same run updated by hand: stalled as well, but nothing was measured about the updates, so nothing is
    # claimed about them and no direction for the learning rate is asserted.
    blind = stalls(too_low(seed, by_hand=True))
    assert blind and "median_update_ratio" not in blind[0].evidence
    text = blind[0].message
    assert NOT_MEASURED in text and "(no optimizer" in text  # and why: the loop has no optimizer
    assert "healthy size" not in text and "usual size" not in text
    assert "most likely too low" not in text and not any(r in " ".join(blind[0].remedies) for r in RAISE_LR)


# ------------------------------------------------------------------------------------------------ by hand


def history(losses: np.ndarray, ratio: float | None = None, every: int = 25) -> History:
    """A history of these losses (three layers, constant gradients) read 10 steps at a time, as a Guard reads, with
    an update-to-weight ratio ``ratio`` measured every ``every`` steps (None: never measured)."""
    h = History(["l0", "l1", "l2"], np.full(3, 100.0), np.zeros(3, dtype=bool))
    for lo in range(0, len(losses), 10):
        hi = min(lo + 10, len(losses))
        g = np.ones((hi - lo, 3))
        h.append(np.arange(lo, hi), np.sqrt((g ** 2).sum(1)), losses[lo:hi], np.ones(hi - lo, dtype=bool), g)
        start_level(h, Thresholds())  # the judge calls the rule at every read; it measures the start when it can
        for s in range(lo, hi):
            if s % every == 0:
                h.sample_steps.append(s)
                h.weight.append(np.full(3, 10.0))
                h.update.append(np.full(3, -1.0 if ratio is None else 10.0 * ratio))
    return h


def course(seed: int, shape: str, n: int = 300) -> np.ndarray:
    """A loss of 2.3 at the start with batch noise (sd 0.05): 'converged' falls to 1.2 with a time constant of 40
    steps and stays; 'flat' never moves; 'gave_back' falls to 1.0 by step 120, climbs back to 2.0 by 200, stays."""
    rng = np.random.default_rng(seed)
    s = np.arange(n, dtype=float)
    base = {"converged": 1.2 + 1.1 * np.exp(-s / 40), "flat": np.full(n, 2.3),
            "gave_back": np.interp(s, [0, 120, 200, n], [2.3, 1.0, 2.0, 2.0])}[shape]
    return base + 0.05 * rng.standard_normal(n)


def verdict(losses: np.ndarray, ratio: float | None = 2e-3) -> gg.Diagnosis | None:
    v = detect_stalled(history(losses, ratio), Thresholds(), set())
    return None if v is None else v.diagnosis


@pytest.mark.parametrize("seed", range(5))
def test_learned_then_flat_is_converging_flat_from_the_start_is_stalled(seed: int) -> None:
    # The same flat last window on both: only the course before it tells them apart.
    assert verdict(course(seed, "converged")) is None
    d = verdict(course(seed, "flat"))
    assert d is not None and ("came down by" in d.message or "above where it was" in d.message)
    assert d.evidence["start_loss"] == pytest.approx(2.3, abs=0.05)


@pytest.mark.parametrize("seed", range(5))
def test_a_run_that_gave_its_progress_back_is_stalled_and_told_to_lower_the_rate(seed: int) -> None:
    d = verdict(course(seed, "gave_back"))
    assert d is not None and "gave" in d.message
    assert d.evidence["best_loss"] < 1.2 and d.evidence["loss_mean"] > 1.8
    assert d.remedies[0].startswith("lower the learning rate") and not any(r in " ".join(d.remedies)
                                                                           for r in RAISE_LR)


@pytest.mark.parametrize("seed", range(3))
def test_the_likely_cause_follows_the_measured_update_size(seed: int) -> None:
    flat = course(seed, "flat")
    large = verdict(flat, ratio=10 * HIGH_UPDATE)
    assert large is not None and "too high" in large.message and large.evidence["median_update_ratio"] == \
        pytest.approx(10 * HIGH_UPDATE)
    assert large.remedies[0].startswith("lower the learning rate")
    tiny = verdict(flat, ratio=LOW_UPDATE / 2)
    assert tiny is not None and "too low" in tiny.message and tiny.remedies[0].startswith("raise the learning rate")
    usual = verdict(flat, ratio=2e-3)
    assert usual is not None and "plateau" in usual.message and "usual size" in usual.message
    assert "too high" not in usual.message and "too low" not in usual.message
    blind = verdict(flat, ratio=None)
    assert blind is not None and NOT_MEASURED in blind.message and "median_update_ratio" not in blind.evidence
    assert "usual size" not in blind.message and "healthy size" not in blind.message
    for d in (large, usual, blind):
        assert not any(r in " ".join(d.remedies) for r in RAISE_LR), d.remedies


def test_a_loss_that_rose_is_never_answered_with_a_larger_learning_rate() -> None:
    for seed in range(3):
        rising = np.linspace(2.0, 2.6, 200) + 0.02 * np.random.default_rng(seed).standard_normal(200)
        for ratio in (2e-3, None):
            d = verdict(rising, ratio)
            assert d is not None and "rose" in d.message, d
            assert d.remedies[0].startswith("lower the learning rate")
            assert not any(r in " ".join(d.remedies) for r in RAISE_LR)


def test_the_start_level_is_measured_once_and_a_resumed_history_falls_back_to_the_early_level() -> None:
    losses = course(0, "converged", 600)
    h = history(losses)
    level = h.stall_start
    assert level is not None and level[2:] == (10, 42)  # the median of the 33 losses after the first ten
    assert level[0] == pytest.approx(float(np.median(losses[10:43])))
    assert len(h.steps) < len(losses)  # trimmed since: the start level stays what it was
    assert start_level(h, Thresholds()) == level
    resumed = History(["l0"], np.full(1, 100.0), np.zeros(1, dtype=bool))
    resumed.first_losses = [(s, 2.3) for s in range(10)]  # restored from a state; the steps go on from 1000
    g = np.ones((50, 1))
    resumed.append(np.arange(1000, 1050), np.ones(50), np.full(50, 1.0), np.ones(50, dtype=bool), g)
    found = start_level(resumed, Thresholds())
    assert found is not None and math.isnan(found[0])  # unknown: the early level stands in

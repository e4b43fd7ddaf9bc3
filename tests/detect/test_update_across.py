"""The update across the weights (weight decay's radial shrinking left out), against float64 arithmetic on the
weights themselves."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import gradguard as gg
from gradguard.detect.flow import update_ratios


def run(zero_grad: bool, steps: int = 30) -> tuple[gg.Guard, list[tuple[np.ndarray, np.ndarray]]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9, weight_decay=5e-4)
    guard = gg.Guard(model, opt, console=False, sample_every=1, log_every=10)
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    pairs = []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y) * (0.0 if zero_grad else 1.0)
        loss.backward()
        before = [p.detach().double().clone() for p in model.parameters()]
        opt.step()
        after = [p.detach().double().clone() for p in model.parameters()]
        pairs.append((before, after))
    return guard, pairs


def across_by_hand(before: list[torch.Tensor], after: list[torch.Tensor]) -> np.ndarray:
    """Per layer (weight, bias): ||d - (d.w/|w|^2) w|| / ||w|| in float64."""
    out = []
    for i in (0, 2):  # parameters of layer 0 and layer 1
        w = torch.cat([before[i].flatten(), before[i + 1]])
        d = torch.cat([after[i].flatten(), after[i + 1]]) - w
        perp = d - (d @ w) / (w @ w) * w
        out.append((perp.norm() / w.norm()).item())
    return np.array(out)


def test_pure_weight_decay_moves_nothing_across_the_weights() -> None:
    guard, _ = run(zero_grad=True)
    h = guard.history
    assert h is not None
    whole, across = update_ratios(h, 3), update_ratios(h, 3, orthogonal=True)
    assert whole is not None and across is not None
    # by hand: with zero gradients SGD's momentum buffer after k steps is wd * w * (1 - 0.9^k) / 0.1
    k = np.array(h.sample_steps[-3:]) + 1
    expected = 0.005 * 5e-4 * (1 - 0.9 ** k) / 0.1
    np.testing.assert_allclose(whole, np.repeat(expected[:, None], 2, axis=1), rtol=1e-2)
    # What is left is the float32 rounding of the norms (a few 1e-6 here): below the 1e-5 at which the vanishing
    # rule says "the weights do not move", which the whole update (2.4e-5, all decay) is above.
    assert np.all(across < gg.Thresholds().vanish_update) and np.all(whole > gg.Thresholds().vanish_update)
    guard.close()


def test_update_across_matches_float64_on_the_weights() -> None:
    guard, pairs = run(zero_grad=False)
    h = guard.history
    assert h is not None
    across = update_ratios(h, 3, orthogonal=True)
    assert across is not None
    want = np.stack([across_by_hand(*pairs[s]) for s in h.sample_steps[-3:]])
    np.testing.assert_allclose(across, want, rtol=2e-2)
    guard.close()


def test_cached_ratios_are_the_ratios_of_the_samples_in_the_window() -> None:
    # The cache is kept across reads; the oracle is the uncached computation on the same history at every read,
    # while the window's start passes sample after sample (keep=40 rows, a sample every 17 steps: some reads
    # bring none, so the window's start alone must invalidate the cache).
    from gradguard.detect.flow import _update_ratios
    from gradguard.detect.history import History

    rng = np.random.default_rng(3)
    h = History(["a", "b"], np.array([10.0, 10.0]), np.zeros(2, dtype=bool), keep=40)
    answers = 0
    for read in range(30):
        steps = np.arange(read * 10, read * 10 + 10)
        g = rng.random((10, 2)) + 0.1
        h.append(steps, np.sqrt((g ** 2).sum(1)), np.ones(10), np.ones(10, dtype=bool), g)
        for s in steps[steps % 17 == 0]:
            h.sample_steps.append(int(s))
            h.weight.append(rng.random(2) + 1.0)
            h.update.append(rng.random(2) * 1e-3)
            h.after.append(rng.random(2) + 1.0)
        for n, orth in ((1, False), (2, True), (3, False)):
            want, got = _update_ratios(h, n, orth), update_ratios(h, n, orth)
            assert (want is None) == (got is None), (read, n)
            if want is not None:
                answers += 1
                np.testing.assert_array_equal(got, want)
    assert answers > 30  # the cache answered through the whole run, not only at its start

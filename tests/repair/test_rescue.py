"""repair='auto' rescues a learning rate 10x to 1000x too high, and does nothing on a healthy run.

The MLP on scikit-learn's digits with SGD and momentum 0.9 reaches about 98% at lr 0.1 (the oracle: the same
model at a healthy rate, in this file). At lr 1.0 the ladder used to roll back to a snapshot already damaged and
ended at 55.8%; the issue's bar is 85% in 400 steps. Several seeds: a property of the ladder, not of one run.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.demo import digits, mlp


def train(lr: float, seed: int, repair: bool, steps: int = 400) -> tuple[float, gg.Guard]:
    torch.manual_seed(seed)
    xtr, ytr, xte, yte = digits()
    model = mlp(3, 128, nn.ReLU)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    guard = gg.Guard(model, opt, console=False, repair="auto" if repair else False)
    for _ in range(steps):
        idx = torch.randint(0, len(xtr), (64,), generator=gen)
        loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    guard.close()
    model.eval()
    with torch.no_grad():
        acc = (model(xte).argmax(1) == yte).float().mean().item()
    return acc, guard


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("lr", [1.0, 10.0, 100.0])
def test_a_learning_rate_10x_to_1000x_too_high_is_rescued(lr: float, seed: int) -> None:
    plain_acc, _ = train(lr, seed, repair=False)
    acc, guard = train(lr, seed, repair=True)
    assert plain_acc < 0.5  # the fault is real: untreated, the run is ruined
    assert acc >= 0.85
    first = [a for a in guard.actions if a.kind == "rollback"][0]
    assert first.detail["to_step"] == 0 and first.step < 40  # back to the state at attach, early
    assert guard.ladder is not None and guard.ladder.lr_mult * lr <= 1.0  # settled below the rate that diverged


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_repair_takes_no_action_on_a_healthy_run(seed: int) -> None:
    plain_acc, _ = train(0.1, seed, repair=False)
    acc, guard = train(0.1, seed, repair=True)
    # No false action: no step skipped, no backoff, no rollback. ZClip (rung 2) may bound a rare spike of a
    # healthy run, which is what it is for; those clips must not cost accuracy against the same run unrepaired.
    assert {k: n for k, n in guard.action_counts.items() if k != "clip"} == {}
    assert acc >= 0.9 and acc >= plain_acc - 0.02

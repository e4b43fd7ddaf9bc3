"""LBFGS with repair="auto": a non-finite closure evaluation inside a step never reaches the weights.

LBFGS calls its closure several times per step (its iterations and line search), so there is no single gradient
to judge before the update; the Guard checks the step's outcome and puts the weights back. The oracles: the same
run without gradguard (the fault is real: NaN weights), and the weights before the step (bitwise).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradguard as gg


def run(guarded: bool, bad_call: int | None, steps: int = 8) -> tuple[list[list[torch.Tensor]], gg.Guard | None]:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.LBFGS(m.parameters(), lr=0.5, max_iter=5)
    guard = gg.Guard(m, opt, console=False, repair="auto") if guarded else None
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    calls = 0
    weights = [[p.detach().clone() for p in m.parameters()]]

    def closure() -> torch.Tensor:
        nonlocal calls
        calls += 1
        opt.zero_grad()
        loss = nn.functional.mse_loss(m(x), y)
        if calls == bad_call:
            loss = loss * float("nan")  # one evaluation inside a step goes non-finite
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)
        weights.append([p.detach().clone() for p in m.parameters()])
    if guard is not None:
        guard.close()
    return weights, guard


def test_a_clean_run_is_bitwise_the_same_as_without_gradguard() -> None:
    plain, _ = run(False, None)
    guarded, guard = run(True, None)
    assert guard is not None and guard.actions == []
    for a, b in zip(plain, guarded):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("bad_call", [1, 13, 17])  # the first call of a step, and calls inside later steps
def test_a_non_finite_evaluation_never_reaches_the_weights(bad_call: int) -> None:
    plain, _ = run(False, bad_call)
    assert not all(torch.isfinite(p).all() for p in plain[-1])  # untreated, the weights turn NaN
    guarded, guard = run(True, bad_call)
    assert guard is not None
    skips = [a for a in guard.actions if a.kind == "skip_step"]
    assert len(skips) == 1 and "LBFGS" in skips[0].detail["why"]
    s = skips[0].step
    assert all(torch.equal(x, y) for x, y in zip(guarded[s], guarded[s + 1]))  # that step put back bitwise
    assert all(torch.isfinite(p).all() for w in guarded for p in w)
    assert not all(torch.equal(x, y) for x, y in zip(guarded[s + 1], guarded[-1]))  # training went on after it

"""A clip that turns finite gradients non-finite (a coefficient of -inf: what a ZClip state with a mean of -1e308,
-inf in float32, gave) must not have its step applied: the skip decision reads the total after gradguard's own
clip too. Oracles: the loop's copies of the weights and optimizer state before the step (bitwise equal after
it), and a step count of one skip per bad step."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.repair import ScalarClip


class BadAt(ScalarClip):
    """A global-norm clip at 1.0 whose coefficient is -inf at the steps in ``bad`` (counted by its calls)."""

    name = "bad_at"

    def __init__(self, bad: set[int], host: bool) -> None:
        self.bad, self.host, self.calls = bad, host, 0

    def coefficient(self, total: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls - 1 in self.bad:
            return torch.full_like(total, -float("inf"))
        return (1.0 / (total + 1e-6)).clamp(max=1.0)

    def host_coefficient(self, total: float) -> float | None:
        if not self.host:
            return None
        self.calls += 1
        return -float("inf") if self.calls - 1 in self.bad else min(1.0, 1.0 / (total + 1e-6))


def _state(opt: torch.optim.Optimizer) -> list[dict]:
    return [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()}
            for g in opt.param_groups for p in g["params"]]


def _same_state(a: list[dict], b: list[dict]) -> bool:
    return all(x.keys() == y.keys() and all(torch.equal(torch.as_tensor(x[k]), torch.as_tensor(y[k])) for k in x)
               for x, y in zip(a, b))


@pytest.mark.parametrize("host", [True, False], ids=["host-coefficient", "device-coefficient"])
@pytest.mark.parametrize("check", ["auto", "deferred"])
@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    lambda ps: torch.optim.Adam(ps, lr=0.01),
    lambda ps: torch.optim.Adam(ps, lr=0.01, fused=True),
], ids=["sgd-momentum", "adam", "adam-fused"])
def test_a_step_the_clip_made_non_finite_is_skipped(make, check: str, host: bool) -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = make(m.parameters())
    bad = {0, 6}  # before the optimizer has state, and after
    guard = gg.Guard(m, opt, console=False, repair="auto", clip=BadAt(bad, host), nonfinite_check=check,
                     log_every=4)
    for step in range(12):
        opt.zero_grad()
        (m(torch.randn(8, 4)).square().mean() * 10).backward()
        weights, state = [p.detach().clone() for p in m.parameters()], _state(opt)
        opt.step()
        if step in bad:
            assert all(torch.equal(a, b) for a, b in zip(m.parameters(), weights)), f"step {step} was applied"
            assert _same_state(_state(opt), state)
        else:
            assert not all(torch.equal(a, b) for a, b in zip(m.parameters(), weights))
    assert all(torch.isfinite(p).all() for p in m.parameters())
    skips = [a for a in guard.actions if a.kind == "skip_step"]
    assert [a.step for a in skips] == sorted(bad)
    assert all("after gradguard's clip" in a.detail["why"] for a in skips)
    guard.close()

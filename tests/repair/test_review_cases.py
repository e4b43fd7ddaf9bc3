"""Cases found in review: first-step skips on fused optimizers, GradScaler's unscale_ with a fused optimizer,
non-finite norms during ZClip's warm-up, learning rates across a rollback, clip state in a JSON checkpoint."""

from __future__ import annotations

import json
import math

import torch
from torch import nn

import gradguard as gg


def small() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def test_first_step_skip_on_fused_sgd_with_momentum_leaves_no_state() -> None:
    m = small()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, fused=True)
    guard = gg.Guard(m, opt, console=False, repair="auto")
    before = [p.detach().clone() for p in m.parameters()]
    m(torch.randn(3, 4)).sum().backward()
    m[0].weight.grad[0, 0] = float("nan")
    opt.step()  # step 0 skipped: a fused kernel would have left an uninitialised momentum buffer behind
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters())) and len(opt.state) == 0
    for _ in range(3):
        opt.zero_grad()
        m(torch.randn(3, 4)).sum().backward()
        opt.step()
    assert all(torch.isfinite(p).all() and p.abs().max() < 10 for p in m.parameters())
    guard.close()


def test_grad_scaler_unscale_with_fused_optimizer_and_clipping() -> None:
    m = small()
    opt = torch.optim.Adam(m.parameters(), lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    guard = gg.Guard(m, opt, console=False, clip=0.1)
    for _ in range(3):
        opt.zero_grad()
        scaler.scale(m(torch.randn(5, 4)).square().mean()).backward()
        scaler.unscale_(opt)  # sets grad_scale to None; GradScaler deletes it after the step
        scaler.step(opt)
        scaler.update()
    assert "grad_scale" not in opt.__dict__ and "found_inf" not in opt.__dict__
    assert len(guard.history.steps) == 3
    guard.close()


def test_zclip_survives_a_non_finite_norm_in_warm_up() -> None:
    z = gg.ZClip(warmup_steps=5)
    p = nn.Parameter(torch.zeros(4))
    norms = [1.0, 1.1, float("inf"), 0.9, 1.0] + [1.0] * 10 + [50.0]
    out = []
    for g in norms:
        p.grad = torch.full((4,), g / 2.0)
        z.step([p])
        out.append(torch.linalg.vector_norm(p.grad).item())
    assert math.isfinite(z.mean.item()) and abs(z.mean.item() - 1.0) < 0.1
    assert out[-1] < 3.0  # the spike after warm-up is still cut


def test_rollback_keeps_the_learning_rates_in_force() -> None:
    m = small()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    guard = gg.Guard(m, opt, console=False, repair="auto")
    assert guard.ladder is not None
    guard.ladder.take_snapshot(m, opt, 0)
    opt.param_groups[0]["lr"] = 0.01  # a scheduler (or ReduceLROnPlateau) moved it since the snapshot
    guard.ladder.rollback(m, opt, 5)
    assert opt.param_groups[0]["lr"] == 0.01
    guard.close()


def test_guard_state_with_zclip_is_json_and_resumes() -> None:
    m = small()
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    g1 = gg.Guard(m, opt, console=False, clip="zclip")
    for _ in range(30):
        opt.zero_grad()
        m(torch.randn(3, 4)).sum().backward()
        opt.step()
    state = json.loads(json.dumps(g1.state_dict()))
    g1.close()
    g2 = gg.Guard(m, opt, console=False, clip="zclip")
    g2.load_state_dict(state)
    assert isinstance(g2.clip, gg.ZClip) and g2.clip.calls == 30
    assert math.isclose(g2.clip.mean.item(), state["clip"]["mean"], rel_tol=1e-6)
    opt.zero_grad()
    m(torch.randn(3, 4)).sum().backward()
    opt.step()
    assert g2.clip.calls == 31
    g2.close()

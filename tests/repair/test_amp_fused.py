"""Fused optimizers (clipping and skipping inside the kernel), torch.amp.GradScaler and gradient accumulation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import gradguard as gg


def model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))


def data(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 8, generator=gen) * 3, torch.randn(16, 3, generator=gen) * 5) for _ in range(n)]


def test_fused_clip_goes_through_grad_scale_and_matches_clip_grad_norm() -> None:
    ref, ours = model(), model()
    opt_r = torch.optim.Adam(ref.parameters(), lr=1e-2, fused=True)
    opt_o = torch.optim.Adam(ours.parameters(), lr=1e-2, fused=True)
    guard = gg.Guard(ours, opt_o, console=False, clip=0.5)
    for x, y in data(20):
        for m, opt in ((ref, opt_r), (ours, opt_o)):
            opt.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
            if m is ref:
                nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
            opt.step()
            if m is ours:
                # The kernel divided by grad_scale as it read the gradients (one pass, no separate multiply):
                # what it leaves in .grad is what clip_grad_norm_ left in the reference's.
                for a, b in zip(ref.parameters(), ours.parameters()):
                    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)
                assert "grad_scale" not in opt.__dict__ and "found_inf" not in opt.__dict__  # restored
    for a, b in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert sum(a.kind == "clip" for a in guard.actions) > 10
    guard.close()


@pytest.mark.parametrize("fused", [True, False])
def test_grad_scaler_statistics_are_unscaled_and_overflow_steps_are_not_ours(fused: bool) -> None:
    m = model()
    opt = torch.optim.Adam(m.parameters(), lr=1e-3, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    guard = gg.Guard(m, opt, console=False, repair="auto")
    unscaled, stepped = [], []
    for i, (x, y) in enumerate(data(8)):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x)
        scaler.scale(nn.functional.mse_loss(out.float(), y)).backward()
        scale = scaler.get_scale()
        if i == 5:
            m[0].weight.grad[0, 0] = float("inf")  # an fp16-style overflow: the scaler must skip this step
        else:
            unscaled.append(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in m.parameters()])).item()
                            / scale)  # the oracle, from the scaled gradients and the scale
            stepped.append(i)
        scaler.step(opt)
        scaler.update()
    h = guard.history
    assert len(h.steps) == 7  # the overflow step left no row
    np.testing.assert_allclose(h.total, unscaled, rtol=1e-4)
    assert guard.diagnoses == [] and [a for a in guard.actions if a.kind == "skip_step"] == []  # no double skip
    guard.close()


def test_gradient_accumulation_acts_on_update_steps_only() -> None:
    m = model()
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    guard = gg.Guard(m, opt, console=False)
    means = []
    batches = data(12)
    for k in range(3):
        opt.zero_grad()
        losses = []
        for x, y in batches[4 * k: 4 * k + 4]:
            loss = nn.functional.mse_loss(m(x), y) / 4
            guard.observe_loss(loss)
            loss.backward()
            losses.append(loss.item())
        means.append(sum(losses) / 4)
        opt.step()
    h = guard.history
    assert list(h.steps) == [0, 1, 2]
    np.testing.assert_allclose(h.loss, means, rtol=1e-6)  # observe_loss averaged over the micro-batches
    guard.close()

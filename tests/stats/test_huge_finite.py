"""A finite gradient whose float32 square overflows (an entry of 2.4e20: its square, 5.8e40, is beyond float32) is
measured as the finite number it is, judged as an explosion and never as non-finite, and never skipped as
"non-finite gradients". The oracles: torch.linalg.vector_norm in float64 of the same gradients, and
torch.isfinite of the gradients and weights at each step."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import gradguard as gg


def test_a_huge_finite_gradient_is_an_explosion_not_a_nan() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    guard = gg.Guard(m, opt, console=False, repair="auto", log_every=5, sample_every=5, auto_loss=False)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    norm, grads_finite, weights_finite = {}, {}, {}
    for s in range(15):
        opt.zero_grad()
        nn.functional.mse_loss(m(x), y).backward()
        if s == 10:
            m[0].weight.grad[0, 0] = 2.4e20  # finite
        grads = [p.grad.double() for p in m.parameters()]
        norm[s] = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
        grads_finite[s] = all(torch.isfinite(g).all() for g in grads)
        weights_finite[s] = all(torch.isfinite(p).all() for p in m.parameters())
        opt.step()
    guard.close()
    h = guard.history
    assert h is not None and grads_finite[10]
    row = int(np.nonzero(h.steps == 10)[0][0])
    assert np.isfinite(h.total[row]) and abs(h.total[row] / norm[10] - 1) < 1e-5
    # a finite step is never skipped as non-finite (later steps, whose gradients did overflow, may be)
    assert all(not grads_finite[a.step] for a in guard.actions if a.kind == "skip_step")
    assert any(d.kind == "exploding" and d.step <= 10 + 5 for d in guard.diagnoses)
    assert all(not grads_finite[d.step] for d in guard.diagnoses if d.kind == "nonfinite")
    for d in guard.diagnoses:  # no loss was observed: none is claimed (it used to say loss=nan)
        assert "loss" not in d.evidence
    # weight norms of finite weights are logged finite, even where their float32 squares overflow
    for s, w in zip(h.sample_steps, h.weight):
        if weights_finite[s]:
            assert np.isfinite(w).all(), (s, w)

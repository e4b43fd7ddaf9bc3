"""A finite gradient whose float32 square overflows (an entry of 2.4e20: its square, 5.8e40, is beyond float32) is
measured as the finite number it is, judged as an explosion and never as non-finite, and never skipped as
"non-finite gradients". The oracles: torch.linalg.vector_norm in float64 of the same gradients, and
torch.isfinite of the gradients and weights at each step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import gradguard as gg


def train_with_a_huge_gradient(lr: float, device: str = "cpu", wide: bool | None = None,
                               **guard_kw: object) -> tuple[gg.Guard, dict[int, float], dict[int, bool],
                                                             dict[int, bool]]:
    """15 SGD steps with a finite 2.4e20 gradient entry at step 10. Returns the closed Guard and, per step, the
    float64 norm of the gradients (the oracle) and whether the gradients and the weights were finite.
    ``wide``: set the recorder's float64 switch by hand."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1)).to(device)
    opt = torch.optim.SGD(m.parameters(), lr=lr)
    guard = gg.Guard(m, opt, console=False, log_every=5, auto_loss=False, **guard_kw)  # type: ignore[arg-type]
    if wide is not None:
        guard._wiring.recorder.wide_norms = wide
    x, y = torch.randn(16, 4, device=device), torch.randn(16, 1, device=device)
    norm, grads_finite, weights_finite = {}, {}, {}
    for s in range(15):
        opt.zero_grad()
        nn.functional.mse_loss(m(x), y).backward()
        if s == 10:
            m[0].weight.grad[0, 0] = 2.4e20  # finite
        grads = [p.grad.double() for p in m.parameters()]
        norm[s] = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
        grads_finite[s] = all(bool(torch.isfinite(g).all()) for g in grads)
        weights_finite[s] = all(bool(torch.isfinite(p).all()) for p in m.parameters())
        opt.step()
    guard.close()
    return guard, norm, grads_finite, weights_finite


def test_a_huge_finite_gradient_is_an_explosion_not_a_nan() -> None:
    guard, norm, grads_finite, weights_finite = train_with_a_huge_gradient(0.1, repair="auto", sample_every=5)
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


def every_step_measured_as_float64_does(guard: gg.Guard, norm: dict[int, float]) -> None:
    h = guard.history
    assert h is not None
    for row, step in enumerate(h.steps.tolist()):  # within float32 rounding
        assert abs(h.total[row] / norm[step] - 1) < 1e-6, (step, h.total[row], norm[step])
    assert np.isfinite(h.grad).all()
    assert [d for d in guard.diagnoses if d.kind == "nonfinite"] == []


def test_wide_device_norms_measure_a_huge_finite_gradient_without_a_read() -> None:
    # On CUDA the deferred path accumulates the per-step norms in float64 (recorder.wide_norms): no per-step read
    # re-measures there. The same code path on the CPU, switched on by hand (the kernel's float64 output on CUDA
    # needs a GPU; the fold, the casts and what the detectors make of it do not). lr 1e-30: the huge step leaves
    # the weights where they were, so every later step is finite too.
    guard, norm, _, _ = train_with_a_huge_gradient(1e-30, wide=True, nonfinite_check="deferred")
    assert not guard._wiring.recorder.host
    every_step_measured_as_float64_does(guard, norm)


def test_the_cpu_device_path_keeps_float32_unless_asked() -> None:
    m = nn.Linear(2, 1)
    guard = gg.Guard(m, torch.optim.SGD(m.parameters(), lr=0.1), console=False, nonfinite_check="deferred")
    assert not guard._wiring.recorder.wide_norms  # its float64 pass converts every tensor (about 10x slower)
    guard.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_default_path_measures_a_huge_finite_gradient() -> None:
    guard, norm, _, _ = train_with_a_huge_gradient(1e-30, device="cuda")
    assert guard._wiring.recorder.wide_norms
    every_step_measured_as_float64_does(guard, norm)


def test_a_float64_models_gradients_beyond_float32_are_finite_and_quiet() -> None:
    """A float64 model (time-series scripts with LBFGS train in double) whose finite gradients reach 1e60, beyond
    float32's maximum of 3.4e38: per-layer and total norms are kept as the finite numbers they are, nothing is
    called non-finite, and gradguard prints no NumPy warning of its own into the script's stderr. Oracle: the
    float64 norms of the same gradients by torch.linalg.vector_norm."""
    import warnings

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    opt = torch.optim.SGD(m.parameters(), lr=1e-70)  # the weights barely move: the gradients stay as set
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
    norms: dict[int, list[float]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning gradguard lets out fails the test
        guard = gg.Guard(m, opt, console=False, log_every=4, sample_every=4)
        for s in range(12):
            opt.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
            if s >= 6:
                m[2].weight.grad.mul_(1e60)  # finite in float64, inf in float32
            norms[s] = [torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in lay.parameters()])).item()
                        for lay in (m[0], m[2])]
            opt.step()
        guard.close()
    h = guard.history
    assert h is not None
    for s in range(12):
        row = int(np.nonzero(h.steps == s)[0][0])
        np.testing.assert_allclose(h.grad[row], norms[s], rtol=1e-6)
        assert np.isfinite(h.total[row]) and h.total[row] == pytest.approx(np.hypot(*norms[s]), rel=1e-6)
    assert not [d for d in guard.diagnoses if d.kind == "nonfinite"]
    assert any(d.kind == "exploding" for d in guard.diagnoses)  # 1e60x is an explosion, named as one

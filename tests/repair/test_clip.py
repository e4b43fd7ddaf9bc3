"""Clipping strategies against torch's own functions and the papers' formulas, written out in the tests."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import gradguard as gg


def model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


def batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(32, 8, generator=gen) * 3, torch.randn(32, 3, generator=gen) * 5) for _ in range(n)]


def test_guard_clip_equals_clip_grad_norm_trajectory() -> None:
    ref, ours = model(), model()
    opt_r = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    opt_o = torch.optim.SGD(ours.parameters(), lr=0.05, momentum=0.9)
    guard = gg.Guard(ours, opt_o, console=False, clip=1.0)
    norms = []
    for x, y in batches(30):
        for m, opt in ((ref, opt_r), (ours, opt_o)):
            opt.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
            if m is ref:
                norms.append(nn.utils.clip_grad_norm_(ref.parameters(), 1.0).item())  # the oracle
            opt.step()
    for a, b in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    clipped = [a for a in guard.actions if a.kind == "clip"]
    assert len(clipped) == sum(n > 1.0 for n in norms) > 5
    assert all(abs(a.detail["clipped_norm"] - 1.0) < 1e-4 for a in clipped)
    np.testing.assert_allclose(guard.history.total, norms, rtol=1e-5)  # statistics are of the unclipped gradients
    guard.close()


def grads_of(m: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in m.parameters()]


def fresh_grads() -> tuple[nn.Sequential, nn.Sequential]:
    a = model()
    x, y = batches(1)[0]
    nn.functional.mse_loss(a(x), y).backward()
    b = copy.deepcopy(a)  # deepcopy leaves .grad behind: copy the gradients too
    for pa, pb in zip(a.parameters(), b.parameters()):
        pb.grad = pa.grad.clone()
    return a, b


def test_standalone_global_norm_and_value_match_torch() -> None:
    a, b = fresh_grads()
    want = nn.utils.clip_grad_norm_(a.parameters(), 0.5)
    got = gg.GlobalNorm(0.5).step(b.parameters())
    assert torch.allclose(got, want)
    for ga, gb in zip(grads_of(a), grads_of(b)):
        torch.testing.assert_close(ga, gb, rtol=1e-6, atol=1e-7)
    a, b = fresh_grads()
    nn.utils.clip_grad_value_(a.parameters(), 0.01)
    gg.ValueClip(0.01).step(b.parameters())
    assert all(torch.equal(ga, gb) for ga, gb in zip(grads_of(a), grads_of(b)))


def test_layer_norm_clip_caps_each_layer() -> None:
    m = model()
    x, y = batches(1)[0]
    nn.functional.mse_loss(m(x), y).backward()
    before = {i: torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in m[i].parameters()])).item()
              for i in (0, 2, 4)}
    guard = gg.Guard(m, None, console=False, clip=gg.LayerNorm(0.3))
    guard.check()
    for i, n in before.items():
        after = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in m[i].parameters()])).item()
        assert math.isclose(after, min(n, 0.3), rel_tol=1e-5), (i, n, after)
    guard.close()


def test_agc_matches_the_papers_formula() -> None:
    a, b = fresh_grads()
    clipping, eps = 0.05, 1e-3
    expected = []
    for p in a.parameters():  # by hand, row by row (a row = one output unit), in float64
        w, g = p.detach().double().numpy(), p.grad.double().numpy()
        if w.ndim == 1:
            w, g = w[None, :], g[None, :]
            rows_w, rows_g = [np.linalg.norm(w)], [np.linalg.norm(g)]
        else:
            rows_w, rows_g = np.linalg.norm(w, axis=1), np.linalg.norm(g, axis=1)
        out = g.copy()
        for i, (nw, ng) in enumerate(zip(rows_w, rows_g)):
            cap = clipping * max(nw, eps)
            if ng > cap:
                out[i if w.shape[0] > 1 else slice(None)] *= cap / ng
        expected.append(out.reshape(p.shape))
    gg.AGC(clipping, eps).step(b.parameters())
    clipped_any = False
    for want, p in zip(expected, b.parameters()):
        np.testing.assert_allclose(p.grad.double().numpy(), want, rtol=1e-5, atol=1e-8)
    for pa, pb in zip(a.parameters(), b.parameters()):
        clipped_any |= not torch.equal(pa.grad, pb.grad)
    assert clipped_any


def reference_zclip(norms: list[float], alpha: float, z_thresh: float, warmup: int) -> list[float]:
    """ZClip (Kumar et al. 2025), z-score mode with adaptive scaling, no max norm: the clipped norm per step."""
    out, buf, mean, var = [], [], 0.0, 0.0
    for g in norms:
        if len(buf) < warmup:
            buf.append(g)
            if len(buf) == warmup:
                mean = sum(buf) / warmup
                var = sum((v - mean) ** 2 for v in buf) / warmup
            out.append(g)
            continue
        std = math.sqrt(var)
        z = (g - mean) / (std + 1e-6)
        clip_val = mean + z_thresh * std / (z / z_thresh) if z > z_thresh else g
        out.append(min(g, clip_val))
        mean = alpha * mean + (1 - alpha) * clip_val
        var = alpha * var + (1 - alpha) * (clip_val - mean) ** 2
    return out


def norm_series() -> list[float]:
    gen = np.random.default_rng(0)
    s = list(1.0 + 0.1 * gen.standard_normal(60))
    s[30], s[45], s[46] = 8.0, 5.0, 20.0  # spikes
    return [abs(v) for v in s]


def drive(method: gg.ClipMethod, series: list[float]) -> list[float]:
    p = nn.Parameter(torch.zeros(4))
    out = []
    for g in series:
        p.grad = torch.full((4,), g / 2.0)  # a gradient of norm g
        method.step([p])
        out.append(torch.linalg.vector_norm(p.grad).item())
    return out


def test_zclip_matches_the_reference_recursion() -> None:
    series = norm_series()
    got = drive(gg.ZClip(alpha=0.9, z_thresh=2.5, warmup_steps=10), series)
    want = reference_zclip(series, 0.9, 2.5, 10)
    np.testing.assert_allclose(got, want, rtol=1e-4)
    assert got[30] < 2.0 and got[46] < 3.0  # the spikes were cut


def test_zclip_package_agrees_where_installed() -> None:
    zclip = pytest.importorskip("zclip")
    series = norm_series()
    ours = drive(gg.ZClip(alpha=0.9, z_thresh=2.5, warmup_steps=10), series)
    ref = zclip.ZClip(alpha=0.9, z_thresh=2.5, warmup_steps=10, max_grad_norm=None)
    theirs = []
    m = nn.Linear(4, 1, bias=False)
    for g in series:
        m.weight.grad = torch.full((1, 4), g / 2.0)
        ref.step(m)
        theirs.append(torch.linalg.vector_norm(m.weight.grad).item())
    np.testing.assert_allclose(ours, theirs, rtol=1e-4)


def test_autoclip_clips_to_the_running_percentile() -> None:
    series = norm_series()
    got = drive(gg.AutoClip(percentile=25), series)
    want = [min(g, float(np.percentile(series[: i + 1], 25))) for i, g in enumerate(series)]
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_autoclip_ring_wraps_and_counts_a_nonfinite_norm_as_the_largest() -> None:
    series = norm_series()[:40]
    series[20] = float("nan")
    clip = gg.AutoClip(percentile=30, history=16)
    got = drive(clip, series)
    # by numpy: the last 16 norms, NaN taken as +inf (it only ever ranks above every finite norm)
    ranked = [math.inf if math.isnan(g) else g for g in series]
    for i, g in enumerate(series):
        if not math.isnan(g):
            window = ranked[max(0, i - 15): i + 1]
            assert got[i] == pytest.approx(min(g, float(np.percentile(window, 30))), rel=1e-5), i
    state = clip.state_dict()
    restored = gg.AutoClip(percentile=30, history=16)
    restored.load_state_dict(state)
    assert restored.count == clip.count and torch.equal(restored.norms, clip.norms)


def test_clip_specs_and_errors() -> None:
    from gradguard.repair import make_clip

    assert isinstance(make_clip(2.0), gg.GlobalNorm) and isinstance(make_clip("zclip"), gg.ZClip)
    assert isinstance(make_clip("autoclip"), gg.AutoClip) and isinstance(make_clip("agc"), gg.AGC)
    with pytest.raises(ValueError, match="max norm"):
        make_clip("bogus")
    with pytest.raises(ValueError, match="> 0"):
        gg.GlobalNorm(0.0)


@pytest.mark.parametrize("clip", [1.0, "zclip", "autoclip", "agc", gg.LayerNorm(0.5), gg.ValueClip(0.1)])
def test_clipping_adds_no_host_read_to_the_step(monkeypatch, clip) -> None:
    m = model()
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    guard = gg.Guard(m, opt, console=False, log_every=1000, sample_every=1000, nonfinite_check="deferred",
                     clip=clip)

    def forbidden(*a, **k):
        raise AssertionError("host read in the per-step path")

    for x, y in batches(30):
        nn.functional.mse_loss(m(x), y).backward()
        with monkeypatch.context() as mp:
            for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"):
                mp.setattr(torch.Tensor, name, forbidden)
            guard._pre_step_hook(opt, (opt,), {})
            guard._post_step_hook(opt, (opt,), {})
        opt.zero_grad()
    assert len(guard.history.steps) == 30
    guard.close()

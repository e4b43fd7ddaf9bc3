"""ZClip on the host (Python floats, used when the Guard's statistics live on the CPU) against ZClip on tensors (the
path tests/repair/test_clip.py checks against the authors' package): the same coefficients and state."""

from __future__ import annotations

import math
import random

import pytest
import torch

import gradguard as gg


def norms(seed: int, n: int = 120) -> list[float]:
    """A noisy norm series with spikes, a NaN and an Inf (the cases ZClip treats apart)."""
    rng = random.Random(seed)
    out = [abs(rng.gauss(1.0, 0.2)) for _ in range(n)]
    for i in rng.sample(range(5, n), 6):
        out[i] *= rng.choice([5.0, 30.0, 1e4])
    out[rng.randrange(3, 20)] = math.nan  # inside the warm-up: left out of the starting statistics
    out[rng.randrange(40, n)] = math.inf
    out[rng.randrange(40, n)] = math.nan
    return out


def close(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=2e-5, abs_tol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kw", [{}, {"max_grad_norm": 2.0}, {"warmup_steps": 5, "z_thresh": 2.0}])
def test_host_coefficients_equal_the_tensor_path(seed: int, kw: dict) -> None:
    dev, host = gg.ZClip(**kw), gg.ZClip(**kw)
    for i, g in enumerate(norms(seed)):
        want = dev.coefficient(torch.tensor(g)).item()
        got = host.host_coefficient(g)
        assert got is not None and close(got, want), (i, g, got, want)
    sd, sh = dev.state_dict(), host.state_dict()
    assert sd["calls"] == sh["calls"]
    assert close(sh["mean"], sd["mean"]) and close(sh["var"], sd["var"])
    assert all(close(a, b) for a, b in zip(sh["buffer"], sd["buffer"]))


def test_switching_paths_and_state_round_trip() -> None:
    """State left by one path is taken over by the other (a loaded state, a Guard moved between devices)."""
    seq = norms(3)
    ref = gg.ZClip()
    want = [ref.coefficient(torch.tensor(g)).item() for g in seq]
    mixed = gg.ZClip()
    got = []
    for i, g in enumerate(seq):
        if i % 7 < 3:
            got.append(mixed.coefficient(torch.tensor(g)).item())
        else:
            got.append(mixed.host_coefficient(g))
        if i == 60:  # through a JSON-able state, as a checkpoint would carry it
            state = mixed.state_dict()
            mixed = gg.ZClip()
            mixed.load_state_dict(state)
    assert all(close(a, b) for a, b in zip(got, want))
    assert isinstance(mixed.mean, torch.Tensor)  # the attribute reads as a tensor whichever path kept it


def test_guard_zclip_on_cpu_clips_as_standalone_zclip() -> None:
    """Guard(clip='zclip') on the CPU (host path) scales the gradients as ZClip.step does on tensors."""
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    b = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    b.load_state_dict(a.state_dict())
    opt_a, opt_b = torch.optim.SGD(a.parameters(), lr=0.05), torch.optim.SGD(b.parameters(), lr=0.05)
    guard = gg.Guard(b, opt_b, console=False, clip="zclip")
    ref = gg.ZClip()
    gen = torch.Generator().manual_seed(1)
    for step in range(60):
        x = torch.randn(16, 4, generator=gen) * (40.0 if step in (30, 45) else 1.0)  # two spikes after warm-up
        y = torch.randn(16, 1, generator=gen)
        for m, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            if m is a:
                ref.step(a.parameters())
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    assert sum(act.kind == "clip" for act in guard.actions) >= 2
    assert isinstance(guard.clip._mean, float)  # the host path was the one taken
    guard.close()

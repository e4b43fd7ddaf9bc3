"""Edge cases of attaching: closures, float64 and sparse gradients, long log intervals, reused modules, hand-run
checks, failed replays, compiled-in-place models. Oracles: torch's own norms and hand-built models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import gradguard as gg


def _norm(*tensors: torch.Tensor) -> float:
    return torch.linalg.vector_norm(torch.cat([t.double().flatten() for t in tensors])).item()


def test_closure_steps_record_the_gradients_the_closure_made() -> None:
    m = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    opt = torch.optim.LBFGS(m.parameters(), lr=0.1, max_iter=1)
    guard = gg.Guard(m, opt, console=False)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    seen: list[list[float]] = []

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.mse_loss(m(x), y)
        loss.backward()
        seen.append([_norm(m[0].weight.grad, m[0].bias.grad), _norm(m[2].weight.grad, m[2].bias.grad)])
        return loss

    for _ in range(3):
        opt.step(closure)
    h = guard.history
    assert list(h.steps) == [0, 1, 2]
    # LBFGS evaluates the closure once per step here; the row holds the gradients of that evaluation.
    np.testing.assert_allclose(h.grad, np.array(seen), rtol=1e-5)
    guard.close()


def test_float64_and_sparse_gradients() -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(50, 4, sparse=True)
            self.lin = nn.Linear(4, 2).double()

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.lin(self.emb(t).double())

    m = M()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)  # SGD accepts sparse gradients
    guard = gg.Guard(m, opt, console=False)
    t = torch.tensor([[1, 2, 2, 7]])
    m(t).sum().backward()
    want = [_norm(m.emb.weight.grad.to_dense()), _norm(m.lin.weight.grad, m.lin.bias.grad)]
    opt.step()
    np.testing.assert_allclose(guard.history.grad[0], want, rtol=1e-6)  # duplicate index 2 summed, as coalesce
    guard.close()


def test_log_interval_longer_than_the_history_loses_no_step() -> None:
    m = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    guard = gg.Guard(m, opt, console=False, log_every=600, nonfinite_check="deferred")
    for step in range(610):
        loss = m(torch.randn(2, 3)).sum() * (float("nan") if step == 10 else 1.0)
        opt.zero_grad()
        loss.backward()
        if step == 10:
            for p in m.parameters():
                p.grad.zero_()  # keep the weights finite: only step 10 is bad
            m[1].weight.grad[0, 0] = float("nan")
        opt.step()
    (d,) = guard.diagnoses
    assert d.kind == "nonfinite" and d.step == 10 and d.layers == ["1"]
    guard.close()


def test_dead_units_only_for_hard_zero_activations_and_per_call_of_a_reused_module() -> None:
    class Reused(nn.Module):
        def __init__(self, act: nn.Module) -> None:
            super().__init__()
            self.a, self.b, self.head = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 2)
            self.act = act  # one activation module used after both layers
            with torch.no_grad():
                self.b.bias.fill_(-50.0)  # kills every unit after the second use

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.act(self.b(self.act(self.a(x)))))

    for act, expect in ((nn.ReLU(), [("act", "call 2 of 2")]), (nn.LeakyReLU(0.1), [])):
        torch.manual_seed(0)
        m = Reused(act)
        opt = torch.optim.SGD(m.parameters(), lr=0.01)
        guard = gg.Guard(m, opt, console=False, sample_every=5)
        for _ in range(20):
            loss = m(torch.randn(32, 8)).square().mean()
            guard.observe_loss(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
        dead = [d for d in guard.diagnoses if d.kind == "dead_units"]
        assert [(d.layers[0], "call 2 of 2") for d in dead if "call 2 of 2" in d.message] == expect
        assert len(dead) == len(expect)  # the first use is alive; a LeakyReLU never counts as dead
        guard.close()


def test_check_by_hand_samples_activations_too() -> None:
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    with torch.no_grad():
        m[0].bias.fill_(-50.0)
    guard = gg.Guard(m, None, console=False, sample_every=2)
    for _ in range(8):
        m.zero_grad()
        m(torch.randn(16, 8)).sum().backward()
        guard.check()
    (d,) = [d for d in guard.diagnoses if d.kind == "dead_units"]
    assert d.layers == ["1", "0"] and d.evidence["dead_fraction"] == 1.0
    guard.close()


def test_a_failing_replay_costs_the_location_not_the_diagnosis(monkeypatch) -> None:
    def broken(*a, **k):
        raise RuntimeError("replay failed")

    monkeypatch.setattr("gradguard.hooks.locate", broken)
    m = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    guard = gg.Guard(m, opt, console=False)
    loss = m(torch.randn(2, 3)).sum() * float("nan")
    loss.backward()
    opt.step()
    (d,) = guard.diagnoses  # no GuardInternalWarning either: pytest turns it into an error
    assert d.kind == "nonfinite" and d.step == 0
    guard.close()


def test_numpy_scalar_loss_and_in_place_compile() -> None:
    m = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 1))
    m.compile(backend="eager")
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    guard = gg.Guard(m, opt, console=False)
    assert guard.compiled and not guard._sampler.act_modules  # no submodule hooks: no recompiles
    for _ in range(3):
        loss = m(torch.randn(2, 3)).sum()
        guard.observe_loss(np.float32(loss.item()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    h = guard.history
    assert h.loss_seen.all() and math.isfinite(h.loss[-1])
    guard.close()


def test_rnn_sampling_leaves_no_hook_and_training_unchanged() -> None:
    class Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.rnn = nn.GRU(4, 8, batch_first=True)
            self.norm = nn.BatchNorm1d(8)
            self.head = nn.Linear(8, 1)

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            out, _ = self.rnn(self.emb(t))  # the RNN input requires grad: a tensor hook is used
            return self.head(self.norm(out[:, -1]))

    torch.manual_seed(0)
    plain, guarded = Seq(), Seq()
    guarded.load_state_dict(plain.state_dict())
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 10, (6, 12), generator=gen) for _ in range(12)]
    opt_p = torch.optim.Adam(plain.parameters(), lr=1e-2)
    opt_g = torch.optim.Adam(guarded.parameters(), lr=1e-2)
    guard = gg.Guard(guarded, opt_g, console=False, sample_every=3)
    for t in batches:
        for m, opt in ((plain, opt_p), (guarded, opt_g)):
            loss = m(t).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert len(guard.history.times) == 4  # steps 0, 3, 6, 9 sampled the time profile
    guard.close()
    assert not guard._sampler.tensor_handles and not guard._sampler.handles
    for (n, a), b in zip(plain.state_dict().items(), guarded.state_dict().values()):
        assert torch.equal(a, b), n


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_host_device_sync_per_step_on_cuda() -> None:
    m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).cuda()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True)
    guard = gg.Guard(m, opt, console=False, log_every=1000, sample_every=1000)
    x, y = torch.randn(32, 64, device="cuda"), torch.randint(0, 10, (32,), device="cuda")
    for _ in range(2):  # first steps build index tensors and optimizer state
        loss = nn.functional.cross_entropy(m(x), y)
        guard.observe_loss(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            loss = nn.functional.cross_entropy(m(x), y)
            guard.observe_loss(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert len(guard.history.steps) == 7
    guard.close()

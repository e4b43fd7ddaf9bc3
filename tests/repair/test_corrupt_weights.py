"""A weight corrupted where the loss cannot see it (an Inf feeding a Tanh: tanh(inf) = 1, the loss and every
gradient stay finite) is found by the sampled weight norms at a host read and rolled back to a state from before
it, never to a snapshot taken after it. Oracles: the loop's own copies of the weights before every step."""

from __future__ import annotations

import torch
from torch import nn

import gradguard as gg


class Sink:
    def __init__(self) -> None:
        self.records: list[dict] = []

    def write(self, record: dict) -> None:
        self.records.append(record)

    def close(self) -> None:
        pass


def _run(fault_at: int, steps: int, **kw: object) -> tuple[list[list[torch.Tensor]], list[dict], nn.Module,
                                                              gg.Guard]:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    sink = Sink()
    guard = gg.Guard(m, opt, console=False, repair="auto", sinks=[sink], **kw)
    gen = torch.Generator().manual_seed(1)
    copies = []
    for step in range(steps):
        if step == fault_at:
            with torch.no_grad():
                m[0].weight[0, 0] = float("inf")
        copies.append([p.detach().clone() for p in m.parameters()])
        x, y = torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen)
        x[:, 0] = x[:, 0].abs() + 0.1  # never 0 in the corrupted feature: the loss stays finite (tanh(inf) = 1)
        opt.zero_grad()
        loss = nn.functional.mse_loss(m(x), y)
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
    return copies, [r for r in sink.records if r.get("kind") == "rollback"], m, guard


def test_an_inf_weight_is_rolled_back_past_the_snapshots_that_hold_it() -> None:
    # Sample steps 0 and 20; the fault at 12; a snapshot of the quiet run is due every 10 steps, so the ones taken
    # at the reads of steps 20 (and maybe 10) hold the Inf or come after the last finite sample: not targets.
    copies, rollbacks, m, guard = _run(12, 40, sample_every=20, snapshot_every=10)
    assert len(rollbacks) == 1, rollbacks
    rb = rollbacks[0]
    assert rb["detail"]["to_step"] == 0  # the newest state at or before the last finite sample (step 0)
    assert "non-finite weights in '0'" in rb["detail"]["why"]
    assert rb["detail"]["lr_multiplier"] == 1.0  # a corruption, not a rate too high: the same rate
    assert all(torch.isfinite(p).all() for p in m.parameters())
    guard.close()


def test_the_rollback_lands_bitwise_on_the_copies_of_its_step() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    sink = Sink()
    guard = gg.Guard(m, opt, console=False, repair="auto", sinks=[sink], sample_every=10)
    gen = torch.Generator().manual_seed(1)
    copies, rolled_at = [], None
    for step in range(30):
        if step == 4:
            with torch.no_grad():
                m[0].weight[0, 0] = -float("inf")
        copies.append(([p.detach().clone() for p in m.parameters()],
                       [opt.state[p]["momentum_buffer"].clone() if p in opt.state else None for p in m.parameters()]))
        x, y = torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen)
        x[:, 0] = x[:, 0].abs() + 0.1
        opt.zero_grad()
        nn.functional.mse_loss(m(x), y).backward()
        before = len(sink.records)
        opt.step()
        if any(r.get("kind") == "rollback" for r in sink.records[before:]):
            rolled_at = step
            rb = next(r for r in sink.records[before:] if r.get("kind") == "rollback")
            weights, moms = copies[rb["detail"]["to_step"]]
            assert all(torch.equal(a, b) for a, b in zip(m.parameters(), weights))
            assert all((b is None and p not in opt.state) or torch.equal(opt.state[p]["momentum_buffer"], b)
                       for p, b in zip(m.parameters(), moms))
    assert rolled_at is not None and rolled_at <= 20  # found at the read after the first sample that shows it
    assert all(torch.isfinite(p).all() for p in m.parameters())
    guard.close()


def test_finite_weights_are_never_rolled_back() -> None:
    _, rollbacks, _, guard = _run(-1, 60, sample_every=5)
    assert rollbacks == []
    guard.close()

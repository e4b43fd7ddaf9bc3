"""record_gradients() (framework callbacks measure before their clip) and user sinks (stats + events)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradguard as gg


class ListSink:
    def __init__(self) -> None:
        self.records: list[dict] = []
        self.closed = False

    def write(self, record: dict) -> None:
        self.records.append(record)

    def close(self) -> None:
        self.closed = True


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def test_measures_before_a_framework_clip_with_and_without_closure() -> None:
    """The oracle is clip_grad_norm_'s own return value: the total norm before it clipped."""
    for use_closure in (False, True):
        model = _net()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        guard = gg.Guard(model, opt, console=False, log_every=1)
        gen = torch.Generator().manual_seed(1)
        expected = []
        for _ in range(6):
            x = torch.randn(8, 6, generator=gen) * 10

            def closure(x: torch.Tensor = x, model: nn.Module = model, opt: torch.optim.Optimizer = opt,
                        guard: gg.Guard = guard, expected: list[float] = expected) -> torch.Tensor:
                opt.zero_grad()
                loss = model(x).square().mean()
                loss.backward()
                guard.record_gradients()  # what a Lightning callback does in on_before_optimizer_step
                expected.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01).item())
                return loss

            if use_closure:
                opt.step(closure)
            else:
                closure()
                opt.step()
        h = guard.history
        assert h is not None
        assert list(h.steps) == list(range(6)) and guard.step == 6  # one row per step, none twice
        assert h.total.tolist() == pytest.approx(expected, rel=1e-5)
        assert min(expected) > 0.1  # the clip really changed the gradients afterwards
        guard.close()


def test_found_inf_step_is_not_counted_nor_reported() -> None:
    """A GradScaler overflow step (the scaler skips optimizer.step) raises no nonfinite and takes no step number."""
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = gg.Guard(model, opt, console=False, log_every=1)
    for i in range(5):
        opt.zero_grad()
        model(torch.randn(4, 6)).sum().backward()
        overflow = i == 2
        if overflow:
            model[0].weight.grad[0, 0] = float("inf")
        guard.record_gradients(found_inf=torch.tensor(1.0 if overflow else 0.0))
        if not overflow:
            opt.step()  # the scaler would not call step() on an overflow
    h = guard.history
    assert h is not None and list(h.steps) == [0, 1, 2, 3] and guard.step == 4
    assert all(d.kind != "nonfinite" for d in guard.diagnoses)
    guard.close()


def test_record_gradients_refuses_without_optimizer_and_after_close() -> None:
    model = _net()
    with pytest.raises(RuntimeError, match="check"):
        gg.Guard(model, None, console=False).record_gradients()
    guard = gg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), console=False)
    guard.close()
    with pytest.raises(RuntimeError, match="closed"):
        guard.record_gradients()


def test_user_sinks_get_stats_and_events_and_are_closed() -> None:
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sink = ListSink()
    guard = gg.Guard(model, opt, console=False, log_every=2, sinks=[sink])
    norms = []
    for i in range(4):
        opt.zero_grad()
        model(torch.randn(4, 6)).sum().backward()
        if i == 3:
            model[2].bias.grad[0] = float("nan")
        norms.append(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()])).item())
        opt.step()
    guard.close()
    stats = [r for r in sink.records if r["type"] == "stats"]
    assert [r["step"] for r in stats] == [1, 3]
    assert stats[0]["total_grad_norm"] == pytest.approx(norms[1], rel=1e-5)
    assert set(stats[0]["grad_norm"]) == {"0", "2"}
    assert any(r["type"] == "diagnosis" and r["kind"] == "nonfinite" and r["step"] == 3 for r in sink.records)
    assert sink.closed
    with pytest.raises(TypeError, match="write"):
        gg.Guard(model, opt, console=False, sinks=[object()])

"""Fail safe: when gradguard itself fails, or a sink does, a non-finite step is still never applied and the
script behaves as without gradguard. And every order of a normal loop: an LR scheduler made after the Guard, a
second Guard on the same optimizer refused with a clear error."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.report.outputs import SinkWarning


class FullDisk:
    """A sink whose every write fails, as events.jsonl on a full disk."""

    def __init__(self) -> None:
        self.closed = False

    def write(self, record: dict) -> None:
        raise OSError(28, "No space left on device")

    def close(self) -> None:
        self.closed = True


def nan_run(guard_kw: dict, nan_steps: tuple[int, ...] = (2, 4), steps: int = 6):
    torch.manual_seed(0)
    m = nn.Linear(3, 1)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    g = gg.Guard(m, opt, repair="auto", console=False, **guard_kw)
    weights = []
    for i in range(steps):
        opt.zero_grad()
        (m(torch.randn(4, 3)).sum() * (float("nan") if i in nan_steps else 1.0)).backward()
        before = m.weight.detach().clone()
        opt.step()
        weights.append((before, m.weight.detach().clone()))
    return g, m, weights


def test_a_failing_sink_degrades_logging_only() -> None:
    sink = FullDisk()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        g, m, weights = nan_run({"sinks": [sink]})
    assert torch.isfinite(m.weight).all()
    assert [a.step for a in g.actions if a.kind == "skip_step"] == [2, 4]  # guarding went on after the failure
    for i in (2, 4):
        assert torch.equal(*weights[i])  # the NaN steps left the weights bitwise as they were
    assert [w.category for w in caught] == [SinkWarning]  # said once
    g.close()
    assert sink.closed


def test_an_internal_failure_during_a_nan_step_still_skips_it(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    m = nn.Linear(3, 1)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    g = gg.Guard(m, opt, repair="auto", console=False)

    def boom(self, *a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr("gradguard.stats.recorder.StepRecorder.measure", boom)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.zero_grad()
        (m(torch.randn(4, 3)).sum() * float("nan")).backward()
        before = m.weight.detach().clone()
        opt.step()
    assert torch.equal(before, m.weight)  # not applied
    assert [w.category for w in caught] == [gg.GuardInternalWarning]
    monkeypatch.undo()
    opt.zero_grad()
    m(torch.randn(4, 3)).sum().backward()
    before = m.weight.detach().clone()
    opt.step()  # gradguard stood aside: a finite step is applied as without it
    assert not torch.equal(before, m.weight)
    g.close()


def test_a_scheduler_made_after_the_guard_works_and_schedules() -> None:
    torch.manual_seed(0)
    m = nn.Linear(3, 1)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    g = gg.Guard(m, opt, repair="auto", console=False)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)  # raised AttributeError before
    lrs = []
    for i in range(6):
        opt.zero_grad()
        (m(torch.randn(4, 3)).sum() * (float("nan") if i == 3 else 1.0)).backward()
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == [0.1, 0.05, 0.05, 0.025, 0.025, 0.0125]  # StepLR's own schedule, by hand
    assert torch.isfinite(m.weight).all() and [a.kind for a in g.actions] == ["skip_step"]
    g.close()


def test_a_second_guard_on_one_optimizer_is_refused_until_the_first_closes() -> None:
    m = nn.Linear(3, 1)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    first = gg.Guard(m, opt, console=False)
    with pytest.raises(ValueError, match="already has a gradguard.Guard attached"):
        gg.Guard(m, opt, console=False)
    first.close()
    second = gg.Guard(m, opt, console=False)  # fine once the first is closed
    opt.zero_grad()
    m(torch.randn(4, 3)).sum().backward()
    opt.step()
    assert second.step == 1 and first.step == 0
    second.close()

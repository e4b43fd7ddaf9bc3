"""A Guard never breaks a script that copies or saves its model: ``torch.save(model)``, ``copy.deepcopy`` (an EMA
copy), ``pickle``. Copies carry no gradguard hooks (an EMA copy must not be judged as the training model), and
after ``close()`` the model's attributes are exactly those it had before attach."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import gradguard as gg


def model_and_opt() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 1))
    return m, torch.optim.SGD(m.parameters(), lr=0.05)


def step(m: nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    m(torch.randn(16, 4)).square().mean().backward()
    opt.step()


def hook_tables(m: nn.Module) -> list[dict]:
    return [dict(getattr(sub, name)) for sub in m.modules()
            for name in ("_forward_pre_hooks", "_forward_hooks")]


@pytest.mark.parametrize("options", [{}, {"repair": "auto"}, {"log_dir": True}])
def test_save_deepcopy_and_pickle_work_with_a_guard_attached(options: dict, tmp_path) -> None:
    m, opt = model_and_opt()
    before_dict = {sub: set(sub.__dict__) for sub in m.modules()}
    if options.get("log_dir"):
        options = {"log_dir": tmp_path / "run"}  # an open log file: what made pickling fail
    guard = gg.Guard(m, opt, console=False, **options)
    ema = copy.deepcopy(m)  # before the first step: the one-shot order hooks are on the submodules too
    for _ in range(30):  # through a sample step: activation hooks come and go
        step(m, opt)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    pickled = pickle.loads(pickle.dumps(m))
    ema2 = copy.deepcopy(m)
    for c in (ema, loaded, pickled, ema2):
        assert all(t == {} for t in hook_tables(c))  # no hook of gradguard's travelled
        assert not any("__getstate__" in sub.__dict__ for sub in c.modules())
    # The copies are the model: same weights, same outputs.
    x = torch.randn(3, 4)
    m.eval(), loaded.eval(), pickled.eval()
    assert torch.equal(m(x), loaded(x)) and torch.equal(m(x), pickled(x))
    # Running a copy is not a step of the watched model, and the Guard still watches the original.
    n = guard.step
    copy_opt = torch.optim.SGD(ema2.parameters(), lr=0.05)
    step(ema2.train(), copy_opt)
    assert guard.step == n
    step(m.train(), opt)
    assert guard.step == n + 1
    guard.close()
    assert {sub: set(sub.__dict__) for sub in m.modules()} == before_dict
    assert all(t == {} for t in hook_tables(m))

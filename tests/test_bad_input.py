"""Bad input gets a clear error that names what is wrong, and nothing changes: options, losses, saved states."""

from __future__ import annotations

import copy
import io
import json

import numpy as np
import pytest
import torch
from torch import nn

import gradguard as gg


def model_opt() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    return m, torch.optim.SGD(m.parameters(), lr=0.1)


OPTIONS = [
    ({"log_every": 2.5}, ValueError, "log_every must be a whole number >= 1, got 2.5"),
    ({"log_every": True}, ValueError, "log_every must be a whole number >= 1, got True"),
    ({"sample_every": 0}, ValueError, "sample_every must be a whole number >= 1, got 0"),
    ({"thresholds": "x"}, TypeError, "thresholds must be a gradguard.Thresholds"),
    ({"ema_beta": 1.0}, ValueError, "ema_beta must be a number in (0, 1), got 1.0"),
    ({"console": "yes"}, TypeError, "console must be True, False or a text stream"),
    ({"lr_backoff": 2}, ValueError, "lr_backoff must be a number in (0, 1), got 2"),
    ({"snapshot_every": -1}, ValueError, "snapshot_every must be a whole number >= 1, got -1"),
    ({"max_rollbacks": 1.5}, ValueError, "max_rollbacks must be a whole number >= 0, got 1.5"),
    ({"auto_loss": "no"}, TypeError, "auto_loss must be True or False, got 'no'"),
    ({"nonfinite_check": "always"}, ValueError, "nonfinite_check must be 'auto', 'step' or 'deferred'"),
]


@pytest.mark.parametrize(("options", "error", "message"), OPTIONS)
def test_bad_options_say_what_is_wrong_and_attach_nothing(options: dict, error: type, message: str) -> None:
    m, opt = model_opt()
    with pytest.raises(error) as info:
        gg.Guard(m, opt, **{"console": False, **options})
    assert message in str(info.value)
    assert not m._forward_pre_hooks and not opt._optimizer_step_pre_hooks  # nothing half-attached


LOSSES = [
    (torch.tensor(True), TypeError, "real-valued loss, got a torch.bool tensor"),
    (torch.tensor(1 + 2j), TypeError, "real-valued loss, got a torch.complex64 tensor"),
    (torch.ones(3), ValueError, "expects a scalar loss, got a tensor of shape (3,)"),
    (True, TypeError, "got bool"),
    ("1.0", TypeError, "got str"),
]


@pytest.mark.parametrize(("loss", "error", "message"), LOSSES)
def test_bad_losses_are_refused(loss, error: type, message: str) -> None:
    m, opt = model_opt()
    with gg.Guard(m, opt, console=False) as guard, pytest.raises(error) as info:
        guard.observe_loss(loss)
    assert message in str(info.value)


def test_numpy_numbers_are_losses() -> None:
    m, opt = model_opt()
    guard = gg.Guard(m, opt, console=False, auto_loss=False)
    for value in (np.float32(2.0), np.array(4.0), np.int64(6)):
        guard.observe_loss(value)
    opt.zero_grad()
    m(torch.randn(2, 4)).sum().backward()
    opt.step()
    assert guard.history.loss.tolist() == [4.0]  # (2 + 4 + 6) / 3
    guard.close()


def trained_state() -> tuple[gg.Guard, dict]:
    torch.manual_seed(0)
    m, opt = model_opt()
    guard = gg.Guard(m, opt, console=False, repair="auto")
    for _ in range(12):
        opt.zero_grad()
        loss = m(torch.randn(8, 4)).square().mean()
        loss.backward()
        opt.step()
    return guard, json.loads(json.dumps(guard.state_dict()))  # as a checkpoint would carry it


def broken(state: dict, path: str, value) -> dict:
    out = copy.deepcopy(state)
    *parents, last = path.split(".")
    node = out
    for k in parents:
        node = node[k]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return out


GARBAGE = [
    ("step", KeyError, "'step' is missing"),
    ("step", "12", "'step' must be an integer"),
    ("step", -3, "'step' must be >= 0"),
    ("history", KeyError, "'history' is missing"),
    ("history.layers", "0,2", "'history.layers' must be a list"),
    ("history.grad_ema", None, "'history.grad_ema' must be a dict"),
    ("history.grad_ema.mean", float("nan"), "'history.grad_ema.mean' must be finite"),
    ("history.loss_ema.count", 1.5, "'history.loss_ema.count' must be an integer"),
    ("history.first_totals", [[1]], "'history' cannot be read"),
    ("reporter", KeyError, "'reporter' is missing"),
    ("reporter.active", {}, "'reporter.active' must be a list"),
    ("ladder.lr_mult", float("nan"), "'ladder.lr_mult' must be finite"),
    ("ladder.lr_mult", 3.0, "'ladder.lr_mult' must be in (0, 1]"),
    ("ladder.best_level", float("nan"), "'ladder.best_level' must be finite"),
    ("ladder.best_level", float("-inf"), "'ladder.best_level' must be finite"),
    ("ladder.gave_up", "no", "'ladder.gave_up' must be true or false"),
    ("ladder.rollbacks", 1.5, "'ladder.rollbacks' must be an integer"),
    ("ladder.surprise", 1, "'ladder.surprise' is not a setting of the repair ladder"),
    ("clip.mean", "x", "'clip' cannot be read"),
]


@pytest.mark.parametrize(("path", "value", "message"), GARBAGE)
def test_a_garbage_state_names_the_key_and_changes_nothing(path: str, value, message: str) -> None:
    guard, state = trained_state()
    before = guard.state_dict()
    with pytest.raises(ValueError) as info:
        guard.load_state_dict(broken(state, path, value))
    assert message in str(info.value)
    assert guard.state_dict() == before
    guard.load_state_dict(state)  # the good state still loads
    guard.close()


def test_the_state_of_a_ladder_that_trusted_no_snapshot_yet_loads() -> None:
    # Its best loss level is +inf (none seen yet): a checkpoint taken that early must load, through JSON too.
    m, opt = model_opt()
    guard = gg.Guard(m, opt, console=False, repair="auto")
    state = json.loads(json.dumps(guard.state_dict()))
    assert state["ladder"]["best_level"] == float("inf")
    guard.load_state_dict(state)
    assert guard.state_dict()["ladder"]["best_level"] == float("inf")
    guard.close()


def test_not_a_dict_at_all() -> None:
    guard, _ = trained_state()
    with pytest.raises(ValueError, match="the state must be a dict, got list"):
        guard.load_state_dict([1, 2])  # type: ignore[arg-type]
    guard.close()


def test_console_may_be_any_text_stream() -> None:
    m, opt = model_opt()
    stream = io.StringIO()
    gg.Guard(m, opt, console=stream).close()

"""What a script does outside the optimizer: its own clipping, its backward roots, loops without an optimizer.

Oracles: torch's own clip_grad_norm_ return value (the pre-clip total norm), torch.linalg.vector_norm of gradients
copied before the clip, the loss values the script computed, and the same script run without a Guard (bitwise
equal weights: the script's clipping is unchanged).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.utils.clip_grad as clip_grad
from torch import nn
from torch.nn.utils import clip_grad_norm_, clip_grad_value_  # bound before any Guard exists, as scripts do

import gradguard as gg


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))


def batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(32, 8, generator=g) * 5, torch.randn(32, 1, generator=g)) for _ in range(n)]


def train(model: nn.Module, opt: torch.optim.Optimizer, data, clip: str | None, max_norm: float = 0.5):
    """A script in the usual style: zero_grad, backward, the script's own clip, step. Returns what it saw."""
    seen, losses, pre = [], [], []
    for x, y in data:
        loss = nn.functional.mse_loss(model(x), y)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        pre.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad)
                                                         for p in model.parameters()])).item())
        if clip == "norm":
            seen.append(clip_grad_norm_(model.parameters(), max_norm).item())
        elif clip == "value":
            clip_grad_value_(model.parameters(), 0.1)
        opt.step()
    return seen, losses, pre


@pytest.mark.parametrize("clip", ["norm", "value"])
def test_the_script_clip_is_measured_before_it_cuts_and_left_unchanged(clip: str) -> None:
    data = batches(12)
    plain = net()
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.05, momentum=0.9)
    plain_seen, plain_losses, _ = train(plain, plain_opt, data, clip)

    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    guard = gg.Guard(model, opt, console=False, log_every=4)
    seen, losses, pre = train(model, opt, data, clip)
    h = guard.history
    guard.close()

    # The script's results are bitwise those of the run without gradguard.
    assert seen == plain_seen and losses == plain_losses
    for p, q in zip(model.parameters(), plain.parameters()):
        assert torch.equal(p, q)
    # gradguard's total is the pre-clip norm: clip_grad_norm_'s own return value, and the norm of the gradients
    # as backward left them (the clip cut every step: post-clip norms would be 0.5 / far smaller).
    np.testing.assert_allclose(h.total, pre, rtol=1e-5)
    if clip == "norm":
        np.testing.assert_allclose(h.total, seen, rtol=1e-5)
        assert min(pre) > 0.5
        np.testing.assert_allclose(h.clipped, 0.5)  # what the script's clip left: the detectors see the cut
    np.testing.assert_allclose(h.loss, losses, rtol=1e-6)  # the loss, from the backward roots, without code
    assert h.loss_seen.all()


def test_script_clip_stats_record_the_max_norm_and_how_often_it_bound(tmp_path) -> None:
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gg.Guard(model, opt, console=False, log_every=5, log_dir=tmp_path):
        for x, y in batches(10):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            clip_grad_norm_(model.parameters(), 1e6)  # never binds
            opt.step()
    import json

    rows = [json.loads(line) for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    assert [(r["script_clip_max_norm"], r["script_clip_bound"]) for r in rows] == [(1e6, 0), (1e6, 0)]


def test_an_explicit_loss_wins_and_auto_loss_can_be_turned_off() -> None:
    for auto, explicit in ((True, True), (False, False)):
        model = net()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        guard = gg.Guard(model, opt, console=False, auto_loss=auto)
        for x, y in batches(5):
            loss = nn.functional.mse_loss(model(x), y)
            if explicit:
                guard.observe_loss(42.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
        h = guard.history
        guard.close()
        if explicit:
            assert h.loss.tolist() == [42.0] * 5
        else:
            assert not h.loss_seen.any()


def test_gradient_accumulation_sums_the_backward_roots() -> None:
    # (loss / 4).backward() four times: the step's gradient is that of the sum of the roots, the mean micro-batch
    # loss, which is what the step's loss must read (not a quarter of it)
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = gg.Guard(model, opt, console=False)
    data = batches(8)
    means = []
    for i in range(0, 8, 4):
        opt.zero_grad()
        parts = []
        for x, y in data[i:i + 4]:
            loss = nn.functional.mse_loss(model(x), y) / 4
            parts.append(loss.item())
            loss.backward()
        means.append(sum(parts))
        opt.step()
    h = guard.history
    guard.close()
    np.testing.assert_allclose(h.loss, means, rtol=1e-6)


def test_a_gradscaler_root_is_unscaled() -> None:
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    guard = gg.Guard(model, opt, console=False)
    losses = []
    for x, y in batches(4):
        loss = nn.functional.mse_loss(model(x), y)
        losses.append(loss.item())
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        clip_grad_norm_(model.parameters(), 1e6)
        scaler.step(opt)
        scaler.update()
    h = guard.history
    guard.close()
    np.testing.assert_allclose(h.loss, losses, rtol=1e-6)


def test_a_step_the_scaler_skipped_leaves_no_loss_behind() -> None:
    # No clip in this loop, so nothing records the skipped step: its (infinite) root must not be added to the next
    # step's loss. The next step starts from zeroed gradients (set to None): a new accumulation.
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    guard = gg.Guard(model, opt, console=False)
    stepped = []
    for i, (x, y) in enumerate(batches(5)):
        loss = nn.functional.mse_loss(model(x), y)
        if i == 2:
            loss = loss * float("inf")  # an overflow: the scaler skips this step
        else:
            stepped.append(loss.item())
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    h = guard.history
    guard.close()
    np.testing.assert_allclose(h.loss, stepped, rtol=1e-6)


def test_a_loop_without_an_optimizer_is_watched_per_backward() -> None:
    """Hand-written SGD (p.data.add_), as in teaching code: every backward that reaches the model is a step."""
    model = net()
    guard = gg.Guard(model, None, console=False)
    pre, losses = [], []
    for x, y in batches(6):
        loss = nn.functional.mse_loss(model(x), y)
        losses.append(loss.item())
        model.zero_grad()
        loss.backward()
        pre.append([torch.linalg.vector_norm(p.grad).item() for p in model.parameters()])
        clip_grad_norm_(model.parameters(), 0.25)
        for p in model.parameters():
            p.data.add_(p.grad, alpha=-0.05)
    h = guard.history
    guard.close()
    assert guard.step == 6
    np.testing.assert_allclose(h.loss, losses, rtol=1e-6)
    # per layer (weight and bias of one Linear): sqrt(|dW|^2 + |db|^2) of the gradients before the clip
    expect = [[np.hypot(r[0], r[1]), np.hypot(r[2], r[3])] for r in pre]
    np.testing.assert_allclose(h.grad, expect, rtol=1e-5)
    np.testing.assert_allclose(h.clipped, 0.25)


def test_check_by_hand_still_counts_one_step_per_call() -> None:
    model = net()
    guard = gg.Guard(model, None, console=False)
    for x, y in batches(5):
        model.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        guard.check()
    assert guard.step == 5
    guard.close()


def test_another_models_clip_and_backward_are_not_this_guards() -> None:
    model, other = net(0), net(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = gg.Guard(model, opt, console=False)
    x, y = batches(1)[0]
    for _ in range(3):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        other.zero_grad()
        nn.functional.mse_loss(other(x), y * 100).backward()  # another model's loss: not this Guard's
        clip_grad_norm_(other.parameters(), 0.01)  # another model's clip: not recorded as this step
        opt.step()
    h = guard.history
    guard.close()
    own = nn.functional.mse_loss(net(0)(x), y).item()
    assert h.loss[0] == pytest.approx(own, rel=1e-6)
    assert np.isnan(h.clipped).sum() == 0 and (h.clipped == h.total).all()  # no cut recorded


def test_the_wrappers_are_removed_with_the_last_guard() -> None:
    originals = (torch.autograd.backward, clip_grad._group_tensors_by_device_and_dtype,
                 clip_grad._clip_grads_with_norm_, torch.amp.GradScaler.scale)
    a = gg.Guard(net(), None, console=False)
    b = gg.Guard(copy.deepcopy(net()), None, console=False)
    assert torch.autograd.backward is not originals[0]
    a.close()
    assert torch.autograd.backward is not originals[0]  # b still listens
    b.close()
    assert (torch.autograd.backward, clip_grad._group_tensors_by_device_and_dtype,
            clip_grad._clip_grads_with_norm_, torch.amp.GradScaler.scale) == originals

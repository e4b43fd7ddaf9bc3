"""guard.actions stays bounded on a run that clips every step, and loses nothing that a user can count."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

import gradguard as gg
from gradguard.repair.log import ActionLog


def test_log_keeps_the_last_clips_and_every_repair_in_order() -> None:
    log = ActionLog(keep_clips=3, keep_other=2)
    kinds = ["clip", "skip_step", "clip", "clip", "lr_backoff", "clip", "clip", "rollback"]
    for step, kind in enumerate(kinds):
        log.append(gg.Action(kind, step))
    # by hand: clips at steps 0,2,3,5,6 -> the last three are 3,5,6; others at 1,4,7 -> the last two are 4,7
    assert [(a.kind, a.step) for a in log.to_list()] == [("clip", 3), ("lr_backoff", 4), ("clip", 5), ("clip", 6),
                                                         ("rollback", 7)]
    assert dict(log.counts) == {"clip": 5, "skip_step": 1, "lr_backoff": 1, "rollback": 1}
    assert len(log) == 5


def test_guard_clipping_every_step_keeps_256_actions_and_counts_all(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    guard = gg.Guard(model, opt, console=False, clip=1e-9, log_dir=tmp_path)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    steps = 300
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    actions = guard.actions
    assert [a.step for a in actions] == list(range(steps - 256, steps))  # the most recent 256, in order
    assert guard.action_counts == {"clip": steps}
    guard.close()
    lines = [json.loads(s) for s in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert sum(d.get("type") == "action" and d["kind"] == "clip" for d in lines) == steps  # every one on disk


def test_sampled_weight_norms_do_not_keep_the_read_buffer_alive() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 64), nn.ReLU(), nn.Linear(64, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    guard = gg.Guard(model, opt, console=False, sample_every=1, log_every=5)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    for _ in range(10):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        before = [torch.cat([m.weight.detach().flatten(), m.bias.detach()]).norm() for m in (model[0], model[2])]
        opt.step()
    h = guard.history
    assert h is not None and len(h.weight) == 10
    # Each sample owns exactly its 2 layers' floats, not a view into the read that also held rows and activations.
    for arr in h.weight + h.update:
        assert arr.base is None and arr.nbytes == 2 * 8
    torch.testing.assert_close(torch.from_numpy(h.weight[-1]), torch.stack(before).double(), rtol=1e-5, atol=0)
    guard.close()

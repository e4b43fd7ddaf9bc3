"""A run the ladder cannot save says so plainly (issue 14, item 5): what it tried, and what to change.

The oracle: a data pipeline that breaks for good (every batch NaN from step 150): no repair can make those steps
useful. The ladder skips them, rolls back to its trusted state, and after ``max_rollbacks`` stops rolling back
with a message naming the rollbacks and backoffs it tried, the cause, and the remedy (check the data, not the
rate); from then on every step is skipped, so the weights stay bitwise those of the state it rolled back to.
"""

from __future__ import annotations

import torch
from torch import nn

import gradguard as gg
from gradguard.demo import digits, mlp

BREAKS = 150  # every batch from here on is NaN


def test_a_run_the_ladder_cannot_save_says_what_it_tried_and_what_to_change(capsys) -> None:
    torch.manual_seed(0)
    xtr, ytr, _, _ = digits()
    model = mlp(2, 64, nn.ReLU)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    guard = gg.Guard(model, opt, console=False, repair="auto")
    gen = torch.Generator().manual_seed(0)
    states = {}  # the weights after every 10th step: the candidates for the state a rollback restores
    for s in range(420):
        idx = torch.randint(0, len(xtr), (32,), generator=gen)
        x = xtr[idx] if s < BREAKS else torch.full_like(xtr[idx], float("nan"))
        loss = nn.functional.cross_entropy(model(x), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (s + 1) % 10 == 0:
            states[s + 1] = {k: v.clone() for k, v in model.state_dict().items()}
    guard.close()

    rollbacks = [a for a in guard.actions if a.kind == "rollback"]
    assert len(rollbacks) == 3 and guard.ladder is not None and guard.ladder.gave_up
    assert all(a.step > BREAKS for a in rollbacks)  # nothing before the data broke
    assert all(a.detail["to_step"] <= BREAKS for a in rollbacks)  # always to a state from before it
    # The first rollback keeps the rate (non-finite steps out of a quiet run: the rate is not their cause);
    # the next ones lower it.
    assert rollbacks[0].detail["lr_multiplier"] == 1.0 and rollbacks[-1].detail["lr_multiplier"] < 1.0
    stopped = [a.detail.get("stopped") for a in rollbacks]
    assert stopped[:2] == [None, None] and stopped[2] is not None
    text = stopped[2]
    backoffs = guard.action_counts.get("lr_backoff", 0)
    assert f"Rollback limit reached at step {rollbacks[-1].step} (max_rollbacks=3)" in text
    assert f"3 rollbacks to a trusted state (the last, now, to step {rollbacks[-1].detail['to_step']})" in text
    assert (f"{backoffs} learning-rate backoff" in text) == (backoffs > 0)
    assert "non-finite steps in the last 20" in text  # the cause
    assert "check the input batches" in text  # what to change: the data, not the learning rate
    assert f"{guard.ladder.lr_mult:.3g}x the learning rate set" in text
    assert f"[gradguard] {text}" in capsys.readouterr().err  # said on the console too, once
    # It stops rolling back, and the run stays exactly at the state it rolled back to: every later step skipped.
    assert guard.action_counts["skip_step"] == 420 - BREAKS
    final = model.state_dict()
    assert all(torch.equal(final[k], states[rollbacks[-1].detail["to_step"]][k]) for k in final)

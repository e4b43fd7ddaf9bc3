"""The live console: actions in words, skips and clips as one line per stretch, and a summary at close.

Oracles: the steps the test's own loop poisoned (NaN in the loss) and the gradient norms the loop measured itself
before the Guard's clip; never the console's own bookkeeping.
"""

from __future__ import annotations

import io
import re

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.report.sinks import ConsoleSink

DASH = "\u2013"


def lines_of(text: str) -> list[str]:
    return [x for x in text.splitlines() if x.startswith("[gradguard]")]


def poisoned_run(nan_steps: range, steps: int, close: bool = True) -> tuple[str, str, list[int]]:
    """Train a small net with NaN injected into the loss at ``nan_steps`` (repair on); returns (console before
    close, console after close, the steps the loop poisoned)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    buf = io.StringIO()
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    guard = gg.Guard(model, opt, repair="auto", console=buf)
    poisoned = []
    for step in range(steps):
        loss = nn.functional.mse_loss(model(x), y)
        if step in nan_steps:
            loss = loss * float("nan")
            poisoned.append(step)
        guard.observe_loss(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    before = buf.getvalue()
    guard.close()
    return before, buf.getvalue(), poisoned


def test_thirty_skipped_steps_are_one_stretch_line_not_thirty() -> None:
    _, text, poisoned = poisoned_run(range(20, 50), 80)
    first, last, count = poisoned[0], poisoned[-1], len(poisoned)
    assert count == 30
    lines = lines_of(text)
    skipped = [x for x in lines if x.startswith("[gradguard] skipped")]
    # The first skip in full, then one line for the whole stretch: not one line per skipped step.
    assert skipped[0] == (f"[gradguard] skipped step {first}: non-finite gradients (more of these are summed up "
                          "in one line when they stop)")
    assert skipped[1:] == [f"[gradguard] skipped {count} steps, {first}{DASH}{last}: non-finite gradients"]
    assert len(lines) < count
    # Actions in words, never a raw dict; the summary counts each kind of action.
    assert "{" not in text and "'why'" not in text
    summary = [x for x in lines if x.startswith("[gradguard] summary:")]
    assert len(summary) == 1 and summary[0] == lines[-1]
    assert f"{count} steps skipped" in summary[0] and f"nonfinite (step {first})" in summary[0]
    for kind, one, many in (("rollback", "rollback", "rollbacks"),
                            ("lowered the learning rate", "learning-rate backoff", "learning-rate backoffs")):
        n = sum(1 for x in lines if x.startswith(f"[gradguard] {kind}"))
        if n:
            assert f"{n} {one if n == 1 else many}" in summary[0]


def test_a_stretch_that_ended_is_summed_up_while_the_run_goes_on() -> None:
    before, after, poisoned = poisoned_run(range(20, 30), 100)
    line = f"[gradguard] skipped {len(poisoned)} steps, {poisoned[0]}{DASH}{poisoned[-1]}: non-finite gradients"
    assert line in lines_of(before)  # printed live, not kept for the end
    assert "summary:" not in before and lines_of(after).count(line) == 1
    assert "summary:" in lines_of(after)[-1]


def test_clipping_every_step_is_one_line_with_the_norms_the_loop_measured() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    buf = io.StringIO()
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    norms = []
    with gg.Guard(model, opt, clip=1e-3, console=buf):
        for _ in range(40):
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item())
            opt.step()
    assert min(norms) > 1e-3  # every step is clipped
    lines = lines_of(buf.getvalue())
    clipped = [x for x in lines if x.startswith("[gradguard] clipped")]
    assert len(clipped) == 2 and clipped[0].startswith("[gradguard] clipped step 0 ")
    found = re.fullmatch(rf"\[gradguard\] clipped 40 steps, 0{DASH}39 \(.*\): gradient norm (\S+){DASH}(\S+) cut to "
                         r"0\.001", clipped[1])
    assert found is not None, clipped[1]
    assert float(found.group(1)) == pytest.approx(min(norms), rel=0.01)
    assert float(found.group(2)) == pytest.approx(max(norms), rel=0.01)
    assert "40 steps clipped" in lines[-1]


def action(kind: str, step: int, **detail: object) -> dict[str, object]:
    return {"type": "action", "kind": kind, "step": step, "detail": detail}


def test_stretches_far_apart_are_summed_up_apart_and_a_lone_skip_is_one_line() -> None:
    buf = io.StringIO()
    sink = ConsoleSink(buf)
    steps = [*range(5, 9), 40, *range(100, 130, 3)]  # 4 in a row, one alone, 10 every third step
    for s in steps:
        sink.write(action("skip_step", s, why="non-finite gradients"))
    sink.write(action("lr_backoff", 131, lr_multiplier=0.5, was=1.0, why="sustained explosion"))
    sink.close()
    sink.close()  # twice: the summary once
    lines = lines_of(buf.getvalue())
    assert [x.split(" (more")[0] for x in lines] == [
        "[gradguard] skipped step 5: non-finite gradients",
        "[gradguard] skipped 4 steps, 5\u20138: non-finite gradients",
        "[gradguard] skipped step 40: non-finite gradients",
        "[gradguard] skipped step 100: non-finite gradients",
        "[gradguard] lowered the learning rate to 0.5x the script's (was 1x) at step 131: sustained explosion",
        "[gradguard] skipped 10 of the 28 steps 100\u2013127: non-finite gradients",
        f"[gradguard] summary: actions: {len(steps)} steps skipped, 1 learning-rate backoff"]


def test_a_quiet_run_leaves_the_console_empty() -> None:
    buf = io.StringIO()
    sink = ConsoleSink(buf)
    sink.close()
    assert buf.getvalue() == ""

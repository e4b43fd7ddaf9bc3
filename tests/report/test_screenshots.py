"""The report of four small runs as a person sees it: rendered by headless Chromium, read back from the rendered
DOM, with a screenshot of each saved under the test's tmp_path (look at them: ``pytest --basetemp=DIR``).

A non-finite run, a clipped run, an RNN whose gradient vanishes through time and a healthy run. Each page must say
in its verdict what happened, when, in which layer and what to do; the healthy one, what was judged. The facts
asserted are measured here, by the test's own loop (the first non-finite loss, the steps whose gradient norm was
over the clip threshold, the last loss), not taken from gradguard's files.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.demo_data import Recurrent, adding_batch
from gradguard.report.html import write_report

pytest.importorskip("matplotlib")


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


pytestmark = pytest.mark.skipif(_chromium() is None, reason="needs Chromium (.ci/run installs Debian's chromium)")

INLINE = {"b", "span", "small"}


class Text(HTMLParser):
    """The text a reader sees, block elements on their own lines, inline ones run together."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._skip += tag in ("style", "script", "title")
        if tag not in INLINE:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        self._skip -= tag in ("style", "script", "title")
        if tag not in INLINE:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)

    def lines(self) -> list[str]:
        return [" ".join(x.split()) for x in "".join(self.parts).split("\n") if x.strip()]


def render(run_dir: Path, shot: Path) -> list[str]:
    """Write the report, render it in headless Chromium (screenshot to ``shot``) and return the rendered text."""
    page = write_report(run_dir)
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run(
            [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--window-size=1100,4200", f"--screenshot={shot}", "--dump-dom",
             page.as_uri()],
            capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": profile})
    assert shot.exists() and shot.stat().st_size > 10_000, proc.stderr[-2000:]
    text = Text()
    text.feed(proc.stdout)
    lines = text.lines()
    assert lines[0] == "gradguard report", lines[:5]
    return lines


def verdict(lines: list[str]) -> list[str]:
    """The verdict box: from its headline to the first section after it."""
    start = next(i for i, ln in enumerate(lines) if ln.startswith(("Problems found", "No diagnos")))
    return lines[start:lines.index("Diagnoses", start)]


def linear_data() -> tuple[torch.Generator, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 32, generator=gen)
    return gen, x, x @ torch.randn(32, 10, generator=gen)


def classify(log_dir: Path, lr: float, steps: int, clip: float | None = None) -> tuple[list[float], list[float]]:
    """A ReLU MLP on a 10-class problem (SGD with momentum). Returns the losses and the pre-clip gradient norms,
    measured here after each backward (before the optimizer step, where gradguard clips)."""
    torch.manual_seed(0)
    gen, x, logits = linear_data()
    y = logits.argmax(1)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses, norms = [], []
    with gg.Guard(model, opt, console=False, log_dir=log_dir, clip=clip) as g:
        for _ in range(steps):
            idx = torch.randint(0, 512, (64,), generator=gen)
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            g.observe_loss(loss)
            opt.zero_grad()
            loss.backward()
            losses.append(loss.item())  # the test's own record; a sync gradguard does not need
            norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item())
            opt.step()
    return losses, norms


def test_nonfinite_run(tmp_path: Path) -> None:
    # Regression at a learning rate far too high: the loss grows geometrically until it overflows.
    torch.manual_seed(0)
    gen, x, target = linear_data()
    target = target[:, :1]
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    losses = []
    with gg.Guard(model, opt, console=False, log_dir=tmp_path / "run") as g:
        for _ in range(60):
            idx = torch.randint(0, 512, (64,), generator=gen)
            loss = nn.functional.mse_loss(model(x[idx]), target[idx])
            g.observe_loss(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    bad = next(i for i, v in enumerate(losses) if not math.isfinite(v))
    box = verdict(render(tmp_path / "run", tmp_path / "nonfinite.png"))
    assert box[0].startswith("Problems found: exploding (first at step ")
    assert f"nonfinite (first at step {bad})" in box[0]
    boom = re.fullmatch(r"step (\d+): exploding in (0, 2|2, 0)\. Training diverges from its first steps: .*", box[1])
    assert boom is not None and int(boom.group(1)) < bad, box  # when, what and where, before the NaN
    assert box[2].startswith("What to do: lower the learning rate")
    assert re.match(rf"step {bad}: nonfinite( in [02, ]+)?\. Non-finite values at step {bad}: the loss is (inf|nan)",
                    box[3]), box[3]
    assert re.fullmatch(r"What to do: the NaN/Inf came after the explosion at step \d+: fix the explosion first "
                        r"\(lower the learning rate, or clip the gradient norm\)", box[4]), box[4]
    assert f"Loss: non-finite from step {bad}." in box


def test_clipped_run(tmp_path: Path) -> None:
    _, norms = classify(tmp_path / "run", lr=1.0, steps=200, clip=1.0)
    over = [s for s, n in enumerate(norms) if n > 1.0]
    lines = render(tmp_path / "run", tmp_path / "clipped.png")
    assert "clipping" in lines and lines[lines.index("clipping") + 1] == "at norm 1"
    box = verdict(lines)
    assert box[0].startswith("Problems found: ")
    assert f"gradguard acted: {len(over)} steps clipped (below)." in box
    leads = [ln for ln in box if re.match(r"step \d+: \w+", ln)]
    assert leads and all(box[box.index(ln) + 1].startswith("What to do: ") for ln in leads)
    done = lines[lines.index("What gradguard did") + 1:lines.index("Gradient norm")]
    assert done[0] == f"{len(over)} steps clipped."
    # Clipped steps at most 10 apart are one stretch: a few lines in words, not a line per clipped step.
    stretches: list[list[int]] = []
    for s in over:
        if stretches and s - stretches[-1][-1] <= 10:
            stretches[-1].append(s)
        else:
            stretches.append([s])
    assert len(done) == 1 + len(stretches) <= 6, done
    for line, steps in zip(done[1:], stretches):
        span = steps[-1] - steps[0] + 1
        where = (f"step {steps[0]}" if span == 1 else f"{len(steps)} steps, {steps[0]}\u2013{steps[-1]}"
                 if len(steps) == span else f"{len(steps)} of the {span} steps {steps[0]}\u2013{steps[-1]}")
        assert line.startswith(f"clipped {where} (global norm): gradient norm "), (line, where)
        assert line.endswith(" cut to 1")


def test_rnn_vanishing_through_time_run(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Recurrent("rnn")  # tanh RNN, 32 units, on the adding problem at T=100
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    losses = []
    with gg.Guard(model, opt, console=False, log_dir=tmp_path / "run") as g:
        for _ in range(150):
            x, y = adding_batch(32, 100, gen)
            loss = nn.functional.mse_loss(model(x), y)
            g.observe_loss(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    lines = render(tmp_path / "run", tmp_path / "rnn.png")
    box = verdict(lines)
    assert re.fullmatch(r"Problems found: vanishing \(first at step \d+\)", box[0]), box[0]
    assert re.fullmatch(r"step \d+: vanishing in rnn\. Vanishing gradients through time in 'rnn': the first 10% of "
                        r"its 100 time steps receive .* the gradient that reaches the last 10%\.", box[1]), box[1]
    assert box[2] == "What to do: use a gated recurrent layer (nn.LSTM or nn.GRU) instead of the plain nn.RNN 'rnn'"
    assert f"to {losses[-1]:.3g} at step 149." in next(ln for ln in box if ln.startswith("Loss: from"))
    # The gradient reaching the first and the last time steps is drawn, with a caption saying how to read it.
    plot = lines.index("Gradient through time")
    assert lines[plot + 1].startswith("For each recurrent layer (RNN, LSTM, GRU): the gradient that reaches one ")


def test_healthy_run(tmp_path: Path) -> None:
    losses, _ = classify(tmp_path / "run", lr=0.05, steps=200)
    assert losses[-1] < 0.1 * losses[0]  # it did learn
    box = verdict(render(tmp_path / "run", tmp_path / "healthy.png"))
    assert box == [
        "No diagnoses: healthy as far as the gradients show",
        "200 steps recorded, in 20 statistics lines.",
        "Gradients: finite at every logged step.",
        "Exploding and vanishing gradients: judged over 200 steps.",
        next(ln for ln in box if ln.startswith("Loss: from ")),
        "Update sizes, dead and saturated units: judged at 8 sampled steps.",  # steps 0, 25, ..., 175
    ]
    assert f"to {losses[-1]:.3g} at step 199." in box[4]

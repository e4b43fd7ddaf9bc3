"""The HTML report: parsed back, refused on bad input, and rendered in headless Chromium."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.report.html import ReportError, load_run, write_report


def make_run(path: Path) -> Path:
    torch.manual_seed(0)
    m = nn.Sequential(*[x for _ in range(6) for x in (nn.Linear(16, 16), nn.Sigmoid())], nn.Linear(16, 4))
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    with gg.Guard(m, opt, console=False, log_dir=path) as g:
        for _ in range(150):
            # Noise targets: the loss cannot fall far (a fitted output of 0 would count as converged, not stalled)
            loss = nn.functional.mse_loss(m(torch.randn(32, 16)), torch.randn(32, 4))
            g.observe_loss(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return path


class Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[str] = []
        self.h2: list[str] = []
        self._in_h2 = False
        self.scripts = 0
        self.external: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a["src"] or "")
        if tag == "h2":
            self._in_h2 = True
        if tag == "script":
            self.scripts += 1
        for key in ("src", "href"):
            if a.get(key) and not str(a[key]).startswith("data:"):
                self.external.append(str(a[key]))

    def handle_endtag(self, tag: str) -> None:
        self._in_h2 = False if tag == "h2" else self._in_h2

    def handle_data(self, data: str) -> None:
        if self._in_h2:
            self.h2.append(data)


def test_report_is_self_contained_with_every_plot(tmp_path) -> None:
    out = write_report(make_run(tmp_path / "run"))
    page = Collect()
    page.feed(out.read_text())
    assert page.h2[0].startswith("Problems found: vanishing (first at step ")  # the verdict comes first
    assert page.h2[1:] == ["Diagnoses", "Gradient norm", "Loss", "Gradient flow per layer",
                           "Gradient norms, steps x layers", "Update-to-weight ratio"]
    assert len(page.imgs) == 5 and page.scripts == 0 and page.external == []  # opens offline
    for src in page.imgs:
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    run = load_run(tmp_path / "run")
    assert run.diagnoses and "vanishing" in out.read_text()


def test_bad_run_directories_are_refused(tmp_path) -> None:
    with pytest.raises(ReportError, match="missing does not exist"):
        load_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="no meta.json"):
        load_run(tmp_path / "empty")
    run = make_run(tmp_path / "run")
    meta = json.loads((run / "meta.json").read_text())
    meta["schema"] = 99
    (run / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ReportError, match="schema 99"):
        load_run(run)
    cli = subprocess.run([sys.executable, "-m", "gradguard", "report", str(run)], capture_output=True, text=True)
    assert cli.returncode == 2 and "gradguard report:" in cli.stderr


def test_a_killed_run_with_a_partial_last_line_still_reports(tmp_path) -> None:
    run = make_run(tmp_path / "run")
    with open(run / "stats.jsonl", "a") as f:
        f.write('{"step": 150, "loss')  # the process died mid-line
    killed = load_run(run)
    assert len(killed.stats) == 15
    assert [str(n) for n in killed.notes] == [
        "stats.jsonl line 16: cut off (the process was stopped while writing it); skipped"]


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(_chromium() is None, reason="needs Chromium (.ci/run installs Debian's chromium)")
def test_report_renders_in_headless_chromium(tmp_path) -> None:
    import matplotlib.image

    out = write_report(make_run(tmp_path / "run"))
    shot = tmp_path / "shot.png"
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run(
            [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--window-size=1100,1600",
             f"--screenshot={shot}", out.as_uri()],
            capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": profile})
    assert shot.exists(), proc.stderr[-2000:]
    pixels = matplotlib.image.imread(shot)
    assert pixels.std() > 0.05  # not blank: text and plots drawn
    assert (pixels[..., :3].mean(axis=2) < 0.5).mean() > 0.005  # some dark ink
    console = [ln for ln in proc.stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln]
    assert console == []


def test_a_loop_without_an_optimizer_reads_as_one_and_a_single_layer_is_singular(tmp_path) -> None:
    torch.manual_seed(0)
    fc = nn.Linear(4, 1)
    with gg.Guard(fc, None, console=False, log_dir=tmp_path / "run"):
        for _ in range(20):
            loss = fc(torch.randn(8, 4)).pow(2).mean()
            fc.zero_grad()
            loss.backward()
            with torch.no_grad():
                for p in fc.parameters():
                    p -= 0.01 * p.grad
    page = write_report(tmp_path / "run").read_text()
    assert "<dt>optimizer</dt><dd>none (the loop updates its weights itself)</dd>" in page
    assert "Linear (1 layer with parameters)" in page
    # A meta.json without the optimizer field (written by hand, or cut) says it does not know.
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    del meta["optimizer"]
    (tmp_path / "run" / "meta.json").write_text(json.dumps(meta))
    assert "<dt>optimizer</dt><dd>unknown</dd>" in write_report(tmp_path / "run").read_text()

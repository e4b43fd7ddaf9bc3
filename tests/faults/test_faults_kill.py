"""SIGKILL of a training process in the middle of its run, then ``gradguard report`` on what it left.

The oracle is what the child said before it died: every step it announced finished has its statistics line
(log_every=1: the line is flushed before the step returns), every NaN step it finished has its skip_step, every
complete line parses, and the report of the directory renders (exit 0, notes only, no traceback)."""

from __future__ import annotations

import random
from pathlib import Path

import faultkit as fk


def test_a_run_killed_mid_step_is_readable_and_reports(tmp_path: Path) -> None:
    rng = random.Random(fk.seed_of("sigkill"))
    script = tmp_path / "child.py"
    script.write_text(fk.CHILD)
    killed = fk.kill_mid_run(tmp_path / "run", script, after=rng.randrange(20, 40), delay=rng.uniform(0, 0.02),
                             nan_steps=[3, 17, 33])
    assert killed.returncode == -9, "the child ended before it was killed"
    assert killed.lost == 0 and killed.missing_steps == [] and killed.missing_skips == [], killed
    assert killed.lines > killed.done  # the stats lines, and the skips
    answer = fk.report(tmp_path / "run", tmp_path / "report.html")
    assert answer.clean(str(tmp_path / "run")) is None, answer
    assert answer.code == 0 and (tmp_path / "report.html").stat().st_size > 0

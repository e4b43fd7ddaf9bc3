"""``gradguard report`` on garbled run directories: a real run's directory damaged by seeded mutations (files cut
at a random byte, lines of random bytes or odd JSON inserted, fields replaced by values of the wrong type or
dropped, lines shuffled or duplicated, files emptied, deleted or replaced by random bytes).

The oracle: the report renders (exit 0, only notes on stderr) or refuses with one line naming a file of the
directory (exit 2); never a traceback, an internal error (exit 3) or a warning on the console."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import faultkit as fk
import pytest


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory as the Guard writes it: 60 steps, a skipped NaN step, a NaN weight rolled back."""
    d = tmp_path_factory.mktemp("base") / "run"
    out = fk.run(fk.OPTIMIZERS[0], [fk.Fault(5, "loss", fk.NAN), fk.Fault(15, "weight", fk.NAN, 0, (2, 3))],
                 steps=60, guard_kw={"log_dir": d, "log_every": 5})
    assert out.clean, out.why()
    assert {p.name for p in d.iterdir()} == set(fk.RUN_FILES)
    return d


def _garbled(real_run: Path, tmp_path: Path, seed: int) -> tuple[Path, list[str]]:
    d = tmp_path / "run"
    shutil.copytree(real_run, d)
    return d, fk.garble(d, random.Random(seed))


@pytest.mark.parametrize("seed", range(48))
def test_a_garbled_run_directory(real_run: Path, tmp_path: Path, seed: int) -> None:
    """Everything but the plots (matplotlib: 2 s a report; the next test and benchmarks/faults.py draw them)."""
    d, done = _garbled(real_run, tmp_path, seed)
    answer = fk.report(d, tmp_path / "r.html", plots=False)
    assert answer.clean(str(d)) is None, f"{done}: {answer.clean(str(d))}"


@pytest.mark.parametrize("seed", [1000, 1001, 1002])
def test_a_garbled_run_directory_with_plots(real_run: Path, tmp_path: Path, seed: int) -> None:
    d, done = _garbled(real_run, tmp_path, seed)
    answer = fk.report(d, tmp_path / "r.html")
    assert answer.clean(str(d)) is None, f"{done}: {answer.clean(str(d))}"


def test_the_untouched_run_renders(real_run: Path, tmp_path: Path) -> None:
    answer = fk.report(real_run, tmp_path / "r.html", plots=False)
    assert answer.code == 0 and answer.err == "", answer  # no note on a directory the Guard wrote
    assert "1 rollback" in answer.out and "step" in answer.out

"""Failing outputs: a sink whose write or close raises, a run directory on a full disk, a log_dir that cannot be
written. Logging failures may cost logging only: every NaN step is still skipped, the run is bitwise the one
with healthy outputs, and the user is told once."""

from __future__ import annotations

import gc
import os
import warnings
from pathlib import Path
from typing import Any

import faultkit as fk
import pytest
import torch
from torch import nn

import gradguard as gg

FAULTS = [fk.Fault(2, "loss", fk.NAN), fk.Fault(7, "grad", fk.INF, 0, (2, 5)), fk.Fault(11, "input", -fk.INF)]
ADAM = next(c for c in fk.OPTIMIZERS if c.label == "Adam")


class Failing:
    """A sink that raises ``exc`` on its ``nth`` write of a record of ``kind`` (None: any record)."""

    def __init__(self, exc: BaseException, nth: int = 1, kind: str | None = None) -> None:
        self.exc, self.nth, self.kind, self.seen, self.closed = exc, nth, kind, 0, False

    def write(self, record: dict[str, Any]) -> None:
        if self.kind is None or record.get("type") == self.kind:
            self.seen += 1
            if self.seen >= self.nth:
                raise self.exc

    def close(self) -> None:
        self.closed = True


class FailingClose(fk.RecordingSink):
    def close(self) -> None:
        raise RuntimeError("the tracker went away")


def _guarded_as_without(out: fk.Outcome, reference: fk.Outcome) -> None:
    """Every oracle of the run holds except the warnings, and it is bitwise the run with healthy outputs."""
    assert out.error is None and not out.applied and out.finite_end, out.why()
    assert [(a["kind"], a["step"]) for a in out.actions] == [(a["kind"], a["step"]) for a in reference.actions]
    assert all(fk.same_params(a, b) for a, b in zip(out.weights, reference.weights))


@pytest.fixture(scope="module")
def reference() -> fk.Outcome:
    out = fk.run(ADAM, FAULTS, steps=14)
    assert out.clean, out.why()
    return out


@pytest.mark.parametrize(("exc", "nth", "kind"), [
    (OSError(28, "No space left on device"), 1, None),
    (RuntimeError("tracker offline"), 1, "action"),  # fails inside the NaN step's skip
    (ValueError("bad record"), 3, None),
    (ConnectionError("reset"), 2, "stats"),
    (KeyError("step"), 1, "diagnosis"),
], ids=["oserror-first", "runtime-on-skip", "value-third", "connection-stats", "keyerror-diagnosis"])
def test_a_sink_whose_write_raises(exc: BaseException, nth: int, kind: str | None, reference: fk.Outcome) -> None:
    sink = Failing(exc, nth, kind)
    out = fk.run(ADAM, FAULTS, steps=14, guard_kw={"sinks": [sink], "log_every": 3})
    _guarded_as_without(out, reference)
    assert len(out.warnings) == 1 and out.warnings[0].startswith("SinkWarning: gradguard stopped writing to Failing")
    assert sink.closed


def test_a_sink_whose_close_raises(reference: fk.Outcome) -> None:
    out = fk.run(ADAM, FAULTS, steps=14, guard_kw={"sinks": [FailingClose()]})
    _guarded_as_without(out, reference)
    assert out.warnings == ["SinkWarning: gradguard could not close FailingClose (RuntimeError: the tracker went "
                            "away)"]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux) for a full disk")
def test_a_run_directory_on_a_full_disk(tmp_path: Path, reference: fk.Outcome) -> None:
    """stats.jsonl and events.jsonl on /dev/full (every write fails with ENOSPC): guarding goes on, and the user
    is told once per file, with the file's name."""
    for name in ("stats.jsonl", "events.jsonl"):
        os.symlink("/dev/full", tmp_path / name)
    out = fk.run(ADAM, FAULTS, steps=14, guard_kw={"log_dir": tmp_path})
    _guarded_as_without(out, reference)
    assert len(out.warnings) == 2, out.warnings
    for name in ("stats.jsonl", "events.jsonl"):
        assert sum(name in w for w in out.warnings) == 1, out.warnings


def _attach(log_dir: Path) -> tuple[nn.Module, torch.optim.Optimizer, tuple[type, str] | None, list[str]]:
    """Guard(..., log_dir=log_dir): the type and text of the exception it raised (None: it attached) and every
    warning, collected after a garbage collection (a file left open warns when it is collected; the exception is
    not kept, since its traceback would keep the half-built Guard alive)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    error = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            gg.Guard(m, opt, console=False, repair="auto", log_dir=log_dir).close()
        except Exception as e:
            error = (type(e), str(e))
        gc.collect()
    return m, opt, error, [f"{w.category.__name__}: {w.message}" for w in caught]


def _under_a_file(tmp: Path) -> Path:
    (tmp / "file").write_text("x")
    return tmp / "file" / "run"


def _stats_is_a_directory(tmp: Path) -> Path:
    (tmp / "run" / "stats.jsonl").mkdir(parents=True)
    return tmp / "run"


def _meta_on_a_full_disk(tmp: Path) -> Path:
    (tmp / "run").mkdir()
    os.symlink("/dev/full", tmp / "run" / "meta.json")
    return tmp / "run"


def _meta_is_a_directory(tmp: Path) -> Path:
    (tmp / "run" / "meta.json").mkdir(parents=True)
    return tmp / "run"


def _read_only(tmp: Path) -> Path:
    (tmp / "ro").mkdir()
    (tmp / "ro").chmod(0o500)
    return tmp / "ro" / "run"


@pytest.mark.parametrize("make", [
    _under_a_file,
    pytest.param(_read_only, marks=pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")),
    _stats_is_a_directory,
    pytest.param(_meta_on_a_full_disk, marks=pytest.mark.skipif(not os.path.exists("/dev/full"),
                                                                reason="needs /dev/full")),
    _meta_is_a_directory,
], ids=lambda f: f.__name__.strip("_"))
def test_a_log_dir_that_cannot_be_written(make: Any, tmp_path: Path) -> None:
    """Either attach and guard with a warning, or refuse with an OSError naming the path, attaching nothing and
    leaving no file open."""
    log_dir = make(tmp_path)
    m, opt, error, caught = _attach(log_dir)
    if error is None:  # attached: it must guard as always
        out = fk.run(ADAM, FAULTS, steps=14, guard_kw={"log_dir": log_dir})
        assert out.error is None and not out.applied and out.finite_end, out.why()
        return
    assert issubclass(error[0], OSError) and str(log_dir) in error[1], error
    assert caught == []  # no file left open
    assert not (m._forward_pre_hooks or m._forward_hooks or opt._optimizer_step_pre_hooks or "step" in opt.__dict__)
    gg.Guard(m, opt, console=False).close()  # the optimizer is not held by a half-built Guard

"""Shared plumbing for the reproductions in this folder: command-line flags, the result table, the JSON record and
the pass/fail checks. Each experiment script imports it (the scripts run as ``python experiments/NAME.py``, so this
folder is on ``sys.path``).

Every script exits 0 only when the published phenomenon reproduced and gradguard's verdict was right; a failed
check prints what was expected and what was measured and exits 1, so the scripts are real checks, not demos.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import gradguard as gg

# gradguard's gradient diagnoses: the kinds a healthy run must not raise.
GRADIENT_KINDS = ("vanishing", "exploding", "nonfinite")


def parser(doc: str | None, seeds: int, steps: int) -> argparse.ArgumentParser:
    """The flags every experiment takes; a script adds its own before parsing."""
    p = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=seeds, help=f"independent runs per configuration (default {seeds})")
    p.add_argument("--steps", type=int, default=steps, help=f"optimizer steps per run (default {steps})")
    p.add_argument("--quick", action="store_true", help="a much shorter version (one seed, fewer steps) for the tests")
    p.add_argument("--json", type=Path, default=None, help="write the result numbers to this file")
    p.add_argument("--strict", action="store_true",
                   help="known gradguard gaps (listed in EXPERIMENTS.md, Findings) fail the run too")
    return p


def setup() -> float:
    """One thread: the machines these run on have 2 cores shared with other work. Returns the start time."""
    torch.set_num_threads(1)
    return time.perf_counter()


CONVERGED = 0.01  # a classifier has fitted its training set once its 100-step mean training loss is below this


def converged_at(losses: Sequence[float], threshold: float = CONVERGED, window: int = 100) -> int | None:
    """The first step at which the mean training loss over the last ``window`` steps fell below ``threshold``."""
    total = 0.0
    for i, v in enumerate(losses):
        total += v
        if i >= window:
            total -= losses[i - window]
        if i + 1 >= window and total / window < threshold:
            return i
    return None


def loss_spiked(losses: Sequence[float], step: int, before: int = 20, after: int = 5, factor: float = 1.5) -> bool:
    """Whether the script's own losses rose at ``step``: the mean of the ``after`` losses from ``step - 2`` on is at
    least ``factor`` times the mean of the ``before`` losses ahead of them. An oracle for a spike report that does not
    read gradguard: near the edge of stability a network may really spike, on one CPU and not on another (the
    trajectory is chaotic), and a report of that spike is right."""
    lo = max(0, step - 2)
    ahead, then = losses[max(0, lo - before):lo], losses[lo:lo + after]
    if not ahead or not then:
        return False
    return sum(then) / len(then) >= factor * sum(ahead) / len(ahead)


def first_seen(guard: gg.Guard, kinds: Sequence[str] | None = None) -> dict[str, int]:
    """Each diagnosis kind (optionally only ``kinds``) with the step it was first reported at."""
    out: dict[str, int] = {}
    for d in guard.diagnoses:
        if kinds is None or d.kind in kinds:
            out.setdefault(d.kind, d.step)
    return out


def diagnoses(guard: gg.Guard) -> list[dict[str, Any]]:
    """The diagnoses, JSON-ready (message shortened; the evidence numbers kept)."""
    return [{"kind": d.kind, "step": d.step, "layers": d.layers[:5], "message": d.message,
             "evidence": {k: (v if math.isfinite(v) else str(v)) for k, v in d.evidence.items()}}
            for d in guard.diagnoses]


def verdict_text(first: dict[str, int]) -> str:
    return ", ".join(f"{k} (step {s})" for k, s in first.items()) or "none"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    vals = [float(v) for v in values]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def fmt_ms(values: Sequence[float], spec: str = ".3f") -> str:
    m, s = mean_std(values)
    return f"{m:{spec}} ± {s:{spec}}" if len(values) > 1 else f"{m:{spec}}"


def table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A rich table when rich is installed, plain aligned text otherwise."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
        print(f"\n{title}")
        print(" | ".join(str(h).ljust(w) for h, w in zip(headers, widths)))
        print("-+-".join("-" * w for w in widths))
        for r in rows:
            print(" | ".join(str(c).ljust(w) for c, w in zip(r, widths)))
        return
    t = Table(*headers, title=title)
    for r in rows:
        t.add_row(*(str(c) for c in r))
    Console(file=sys.stdout, width=200).print(t)


@dataclass
class Checks:
    """Pass/fail checks of one experiment: the phenomenon (did the paper's result reproduce) and the verdicts
    (was gradguard right)."""

    items: list[dict[str, Any]] = field(default_factory=list)
    strict: bool = False

    def add(self, kind: str, name: str, ok: bool, detail: str) -> bool:
        self.items.append({"kind": kind, "name": name, "ok": bool(ok), "detail": detail})
        return bool(ok)

    def phenomenon(self, name: str, ok: bool, detail: str) -> bool:
        return self.add("phenomenon", name, ok, detail)

    def verdict(self, name: str, ok: bool, detail: str) -> bool:
        return self.add("verdict", name, ok, detail)

    def gap(self, name: str, ok: bool, detail: str) -> bool:
        """A verdict gradguard is known to get wrong (EXPERIMENTS.md, Findings): printed and recorded, but it fails
        the run only with --strict. It reads PASS by itself once the library is fixed."""
        return self.add("known_gap", name, ok, detail)

    @property
    def ok(self) -> bool:
        return all(c["ok"] for c in self.items if self.strict or c["kind"] != "known_gap")

    def report(self) -> None:
        print()
        for c in self.items:
            tag = "PASS" if c["ok"] else ("GAP " if c["kind"] == "known_gap" and not self.strict else "FAIL")
            print(f"[{tag}] {c['kind']}: {c['name']} -- {c['detail']}")
        counted = [c for c in self.items if self.strict or c["kind"] != "known_gap"]
        bad = sum(not c["ok"] for c in counted)
        gaps = sum(not c["ok"] for c in self.items if c["kind"] == "known_gap" and not self.strict)
        print(f"\n{len(counted) - bad}/{len(counted)} checks passed" + (f"; {bad} FAILED" if bad else "")
              + (f"; {gaps} known gradguard gap(s) confirmed (not counted; --strict counts them)" if gaps else ""))


def finish(name: str, args: argparse.Namespace, start: float, checks: Checks, results: dict[str, Any]) -> int:
    """Print the checks, write the JSON record, return the exit code (0 only when every check passed)."""
    checks.strict = args.strict
    checks.report()
    elapsed = time.perf_counter() - start
    print(f"{name}: {elapsed:.1f} s on {torch.get_num_threads()} thread(s), torch {torch.__version__}")
    if args.json is not None:
        record = {"experiment": name, "ok": checks.ok, "quick": args.quick, "seeds": args.seeds, "steps": args.steps,
                  "seconds": round(elapsed, 1), "torch": torch.__version__, "gradguard": gg.__version__,
                  "python": platform.python_version(), "checks": checks.items, **results}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1, default=_jsonable) + "\n")
    return 0 if checks.ok else 1


def _jsonable(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")

"""The reproductions in experiments/ (EXPERIMENTS.md), each run with --quick in a subprocess: it must exit 0 (the
phenomenon reproduced and gradguard's verdict was right) and its JSON record must show the expected verdicts.
About two minutes for all six on 2 CPU cores."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
GRADIENT_KINDS = ("vanishing", "exploding", "nonfinite")


def run_quick(name: str, tmp_path: Path) -> dict[str, Any]:
    out = tmp_path / f"{name}.json"
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / f"{name}.py"), "--quick", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{name} --quick failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    record = json.loads(out.read_text())
    assert record["ok"] and record["quick"]
    assert all(c["ok"] for c in record["checks"] if c["kind"] != "known_gap")
    return record


def test_he2015_depth(tmp_path: Path) -> None:
    rec = run_quick("he2015_depth", tmp_path)
    runs = {(r["depth"], r["var"]): r for r in rec["runs"]}
    xavier, kaiming = runs[(30, 1.0)], runs[(30, 2.0)]
    assert xavier["left_plateau"] is None and "vanishing" in xavier["first"]  # stalls, and gradguard says why
    # Learns: five times chance at least (a late spike of this chaotic trajectory ended at 77.6% on one CPU, 84% and
    # more on others; the 1/n network ends near 10%).
    assert kaiming["left_plateau"] is not None and kaiming["test_acc"] >= 0.5
    # Nothing about its gradients, but for a spike the loss the script recorded shows (at this learning rate a
    # 30-layer plain net may spike on one CPU and not on another: its trajectory is chaotic).
    assert not [d for d in kaiming["diagnoses"] if d["kind"] in GRADIENT_KINDS and not d.get("loss_spiked")]
    # He et al.'s variance argument: with Var(w)=1/n the back-propagated gradient halves in variance per layer.
    assert xavier["backprop_ratio"] < 1e-3 < kaiming["backprop_ratio"]


def test_glorot2010_init(tmp_path: Path) -> None:
    rec = run_quick("glorot2010_init", tmp_path)
    std, nrm = rec["tanh"]["standard"], rec["tanh"]["normalised"]
    assert max(std["backprop_first_over_last"]) < 0.3 < min(nrm["backprop_first_over_last"])
    assert max(std["activation_last_over_first"]) < 0.3 < min(nrm["activation_last_over_first"])
    for r in std["train"] + nrm["train"]:
        assert r["test_acc"] >= 0.8 and "vanishing" not in r["first"]
    for runs in rec["sigmoid"].values():
        for r in runs:
            assert r["top_mean_min"] < 0.1  # the top sigmoid layer is pushed toward 0 (Fig. 2)


def test_adding_problem(tmp_path: Path) -> None:
    rec = run_quick("adding_problem", tmp_path)
    runs = {r["kind"]: r for r in rec["runs"]}
    tanh, lstm = runs["tanh"], runs["lstm"]
    assert tanh["test_mse"] > 0.8 / 6 and tanh["time_ratio"] is not None and tanh["time_ratio"] < 1e-3
    assert lstm["test_mse"] < 0.05 and lstm["learned_at"] is not None
    assert not [d for d in lstm["diagnoses"] if d["kind"] in GRADIENT_KINDS and d["step"] > lstm["learned_at"] + 100]


def test_pascanu2013_clipping(tmp_path: Path) -> None:
    # Chaotic runs: which seed meets its cliff, and when, differs between machines; what must hold is checked per
    # run where it applies and over the seeds otherwise (EXPERIMENTS.md F10).
    rec = run_quick("pascanu2013_clipping", tmp_path)
    unclipped = [r for r in rec["runs"] if r["mode"] == "none"]
    clipped = [r for r in rec["runs"] if r["mode"] == "guard"]
    assert len(unclipped) == len(clipped) >= 3
    cliffs = [r for r in unclipped if r["nonfinite_at"] is not None or r["worst_rise"] > 0.5]
    assert 2 * len(cliffs) > len(unclipped)  # the cliff: the 20-step mean loss rose > 0.5 nats above its best
    for r in cliffs:  # flagged exploding (or nonfinite) within 20 steps of the cliff; never vanishing, and not
        lo, hi = r["rise_from"] - 20, r["worst_rise_step"] + 20  # stalled once flagged (the explosion's damage)
        flags = [d["step"] for d in r["diagnoses"] if d["kind"] in ("exploding", "nonfinite") and lo <= d["step"] <= hi]
        assert flags, r
        assert "vanishing" not in r["first"], r
        assert not [d for d in r["diagnoses"] if d["kind"] == "stalled" and d["step"] >= min(flags)], r
    for r in clipped:
        assert r["test_acc"] >= 0.6 and r["worst_rise"] < 0.3, r
        assert not {*GRADIENT_KINDS, "stalled"} & set(r["first"]), r
    mean_acc = [sum(r["test_acc"] for r in rs) / len(rs) for rs in (clipped, unclipped)]
    assert mean_acc[0] - mean_acc[1] >= 0.3


def test_seeds(tmp_path: Path) -> None:
    rec = run_quick("seeds", tmp_path)
    assert rec["runs"] and all(r["reproduced"] and r["right"] == "right" for r in rec["runs"])


def test_rescue(tmp_path: Path) -> None:
    # --quick: one seed, each family healthy and with the faults repair="auto" must rescue, unrepaired vs repaired.
    rec = run_quick("rescue", tmp_path)
    runs = rec["runs"]
    healthy = {r["family"]: r for r in runs if r["fault"] == "healthy" and r["strategy"] == "none"}
    assert set(healthy) == {"mlp", "cnn", "lstm", "gpt"}
    for r in runs:
        h = healthy[r["family"]]
        # The fraction is the metric against the same model's healthy run: accuracy over accuracy, or for the
        # adding problem's MSE the share of the healthy run's gain over predicting the mean (0 if not finite).
        if r["trivial"] is None:
            assert r["fraction"] == pytest.approx(r["metric"] / h["metric"])
        elif r["finite"] and math.isfinite(r["metric"]):
            assert r["fraction"] == pytest.approx(max(0.0, (r["trivial"] - r["metric"]) / (r["trivial"] - h["metric"])))
        if r["fault"] == "healthy":
            assert r["fraction"] >= 0.9
            if r["strategy"] == "auto":  # repair is silent on clean runs: no skip, backoff or rollback
                assert (r["skipped"], r["backoffs"], r["rollbacks"]) == (0, 0, 0)
        elif r["strategy"] == "none":
            assert r["fraction"] < 0.9  # the fault is real: unrepaired, the run is ruined
        else:
            assert r["fraction"] >= 0.9 and r["rollbacks"] + r["skipped"] + r["clips"] > 0  # rescued, by a repair
    by = {(r["family"], r["fault"], r["strategy"]): r for r in runs}
    assert by["mlp", "lr_x10", "auto"]["metric"] >= 0.85  # issue 14: the digits MLP at lr 1.0, in 400 steps
    assert healthy["mlp"]["metric"] >= 0.9 and healthy["gpt"]["metric"] >= 0.95

"""Detector rules on hand-built histories: each threshold crossed, and not crossed, by numbers chosen here."""

from __future__ import annotations

import numpy as np

import gradguard as gg
from gradguard.detect.exploding import detect_exploding_step, detect_exploding_window
from gradguard.detect.history import History
from gradguard.detect.reporter import Reporter, Verdict
from gradguard.detect.units import detect_units
from gradguard.detect.vanishing import detect_vanishing

T = gg.Thresholds()


def history(grads: np.ndarray, losses: np.ndarray | None = None, numel: list[int] | None = None) -> History:
    steps, layers = grads.shape
    h = History([f"l{i}" for i in range(layers)], np.array(numel or [100] * layers, dtype=float),
                np.zeros(layers, dtype=bool))
    total = np.sqrt((grads ** 2).sum(1))
    loss = losses if losses is not None else np.full(steps, 2.3)
    h.append(np.arange(steps), total, loss, np.ones(steps, dtype=bool), grads)
    return h


def test_uniform_vanishing_is_found_by_absolute_evidence_only() -> None:
    # Ratio between layers exactly 1, but every layer moves its weights by 2e-7 of their norm per step.
    h = history(np.full((120, 4), 1e-5))
    for s in (50, 75, 100):
        h.sample_steps.append(s)
        h.weight.append(np.full(4, 10.0))
        h.update.append(np.full(4, 2e-6))
    v = detect_vanishing(h, T)
    assert v is not None and v.key == ("vanishing", "absolute")
    assert v.diagnosis.evidence["early_late_ratio"] == 1.0
    assert abs(v.diagnosis.evidence["median_update_ratio"] - 2e-7) < 1e-12
    # Same numbers while the loss falls 2.3 -> 1.0: learning goes on, nothing is raised.
    falling = history(np.full((120, 4), 1e-5), np.linspace(2.3, 1.0, 120))
    falling.sample_steps, falling.weight, falling.update = h.sample_steps, h.weight, h.update
    v2 = detect_vanishing(falling, T)
    assert v2 is not None and not v2.emit


def test_depth_ratio_threshold() -> None:
    g = np.tile(np.array([1e-7, 1e-6, 1e-3, 1e-3]), (120, 1))  # l0 is 1e-4 of the late layers: vanishing
    v = detect_vanishing(history(g), T)
    assert v is not None and v.key == ("vanishing", "depth") and v.diagnosis.layers[0] == "l0"
    assert abs(v.diagnosis.evidence["early_late_ratio"] - 1e-4) < 1e-12
    g_ok = np.tile(np.array([5e-6, 1e-5, 1e-3, 1e-3]), (120, 1))  # 5e-3: above the 1e-3 threshold
    assert detect_vanishing(history(g_ok), T) is None
    assert detect_vanishing(history(g[:99]), T) is None  # less than a window of evidence


def test_growth_needs_both_norm_and_loss() -> None:
    g = np.ones((30, 2))
    g[25:] = 100.0  # total norm 100x its early level
    losses = np.full(30, 2.0)
    h = history(g, losses)
    assert detect_exploding_step(h, 27, T) is None  # loss flat: not (yet) explosion
    losses[27] = 5.0  # 2.5x the early loss
    h = history(g, losses)
    v = detect_exploding_step(h, 27, T)
    assert v is not None and v.key == ("exploding", "growth")
    assert v.diagnosis.evidence["growth"] == 100.0 and v.diagnosis.severity == "error"


def test_update_ratio_too_high() -> None:
    h = history(np.ones((10, 3)))
    for s, ratio in ((0, 0.5), (5, 0.3)):
        h.sample_steps.append(s)
        h.weight.append(np.full(3, 2.0))
        h.update.append(np.full(3, 2.0 * ratio))
    v = detect_exploding_window(h, T)
    assert v is not None and v.key == ("exploding", "update")
    assert abs(v.diagnosis.evidence["median_update_ratio"] - 0.3) < 1e-12
    h.update[-1] = np.full(3, 2.0 * 0.05)
    assert detect_exploding_window(h, T) is None


def test_dead_units_are_units_never_active_in_any_sample() -> None:
    h = history(np.ones((10, 2)))
    masks = [np.array([1, 0, 0, 0.0]), np.array([0, 1, 0, 0.0]), np.array([0, 0, 0, 0.0])]
    for s, m in zip((0, 3, 6), masks):
        h.add_act(s, "relu", 0, "active", m)
    (v,) = detect_units(h, T)
    assert v.diagnosis.kind == "dead_units" and v.diagnosis.evidence["dead_fraction"] == 0.5  # units 2 and 3
    h.add_act(9, "relu", 0, "active", np.array([1, 0, 1, 0.0]))
    assert detect_units(h, T) == []  # over the last 3 samples only unit 3 (25%) never fired
    # Three records of one step (a module called three times, or three micro-batches) are not persistence.
    h2 = history(np.ones((10, 2)))
    for _ in range(3):
        h2.add_act(4, "relu", 0, "active", np.zeros(4))
    assert detect_units(h2, T) == []


def test_reporter_once_on_change_and_after_going_away() -> None:
    r = Reporter(cooldown=50)

    def v(step: int, sig: str, emit: bool = True) -> Verdict:
        d = gg.Diagnosis("exploding", "warning", step, [], "m")
        return Verdict(("exploding", "x"), (sig,), d, emit)

    assert r.offer(v(0, "a")) is not None
    assert r.offer(v(10, "a")) is None  # same condition, still active
    assert r.offer(v(20, "b")) is not None  # it changed
    assert r.offer(v(60, "b", emit=False)) is None  # gated: kept alive, not raised
    assert r.offer(v(100, "b")) is None  # alive thanks to the refresh at 60
    assert r.offer(v(200, "b")) is not None  # absent for > 50 steps: it came back
    fresh = Reporter(cooldown=50)
    assert fresh.offer(v(0, "a", emit=False)) is None and fresh.active == {}


def test_a_converged_plateau_is_not_vanishing() -> None:
    """Tiny gradients and a flat loss after the loss fell from 2.3 to 1e-4: the model has fitted its data. The same
    gradients with the loss flat at its starting level are a stall (seen as false alarms in experiments/seeds.py)."""
    g = np.full((200, 4), 1e-5)
    stuck = history(g, np.full(200, 2.3))
    for h in (stuck,):
        for s in (150, 175, 199):
            h.sample_steps.append(s)
            h.weight.append(np.full(4, 10.0))
            h.update.append(np.full(4, 2e-6))
    v = detect_vanishing(stuck, T)
    assert v is not None and v.emit
    fitted = history(g, np.concatenate([np.full(10, 2.3), np.full(190, 1e-4)]))
    fitted.sample_steps, fitted.weight, fitted.update = stuck.sample_steps, stuck.weight, stuck.update
    v2 = detect_vanishing(fitted, T)
    assert v2 is None or not v2.emit

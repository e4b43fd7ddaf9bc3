"""Detector rules on hand-built histories: each threshold crossed, and not crossed, by numbers chosen here."""

from __future__ import annotations

import numpy as np

import gradguard as gg
from gradguard.detect.exploding import (
    detect_exploding_step,
    detect_exploding_window,
    detect_spike_damage,
    step_candidates,
)
from gradguard.detect.history import History
from gradguard.detect.reporter import Reporter, Verdict
from gradguard.detect.units import detect_dead_flow, detect_units
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
    assert abs(v.diagnosis.evidence["early_late_ratio"] - 1e-4) < 1e-4 * 1e-6  # norms kept in float32
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
    assert h.exploded == (27, 2.0)  # remembered with the loss's running mean before it (a constant 2.0)
    # Without any observed loss (a norm 200x its early level is growth on its own) nothing is remembered: the
    # running mean of no loss reads 0, and no later stall could ever be judged against it.
    g[25:] = 200.0
    blind = History(["l0", "l1"], np.array([100.0, 100.0]), np.zeros(2, dtype=bool))
    blind.append(np.arange(30), np.sqrt((g ** 2).sum(1)), np.zeros(30), np.zeros(30, dtype=bool), g)
    v = detect_exploding_step(blind, 27, T)
    assert v is not None and v.key == ("exploding", "growth") and blind.exploded is None


def test_a_huge_growth_is_written_in_three_digits() -> None:
    # A float64 run's norm 1.69e75x its early level was written out as 76 digits; 100x stays a whole number.
    g = np.ones((30, 2))
    g[25:] = np.sqrt(0.5) * 1.69e75  # total norm 1.69e75 against an early level of sqrt(2): growth 1.195e75
    losses = np.full(30, 2.0)
    losses[27] = 5.0
    v = detect_exploding_step(history(g, losses), 27, T)
    assert v is not None and ", 1.2e+75x its early level 1.414 " in v.diagnosis.message
    g[25:] = 100.0  # 100x in each layer: total growth 100
    v = detect_exploding_step(history(g, losses), 27, T)
    assert v is not None and ", 100x its early level 1.414 " in v.diagnosis.message


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
    # Wider than a byte, and not a multiple of 8 (the packed masks carry padding bits): 13 units, of which units
    # 0, 5, 8 and 12 fired in some sample, so 9 of 13 never did.
    h3 = history(np.ones((10, 2)))
    for s, on in zip((0, 3, 6), ((0, 5), (8,), (12, 5))):
        mask = np.zeros(13)
        mask[list(on)] = 1.0
        h3.add_act(s, "relu", 0, "active", mask)
    (v3,) = detect_units(h3, T)
    assert v3.diagnosis.evidence["dead_fraction"] == 1.0 - 4 / 13 and v3.diagnosis.evidence["units"] == 13.0
    # Three records of one step (a module called three times, or three micro-batches) are not persistence.
    h2 = history(np.ones((10, 2)))
    for _ in range(3):
        h2.add_act(4, "relu", 0, "active", np.zeros(4))
    assert detect_units(h2, T) == []


def test_saturation_by_mean_slope_needs_a_stalled_loss() -> None:
    # A sigmoid layer pushed toward 0: no output in the extreme tail (flat fraction 0), mean slope 10% of the peak.
    def sampled(losses: np.ndarray) -> History:
        h = history(np.ones((120, 2)), losses)
        h.activation_order, h.output_activation = ["sig", "out"], "out"
        for s in (50, 75, 100):
            h.add_act(s, "sig", 0, "saturated", (0.0, 0.10))
        return h

    (v,) = detect_units(sampled(np.full(120, 2.3)), T)  # loss flat at chance for 120 steps
    assert v.diagnosis.kind == "saturation" and v.diagnosis.evidence["relative_slope"] == 0.10
    assert "10% of its peak" in v.diagnosis.message
    assert detect_units(sampled(np.linspace(2.3, 1.0, 120)), T) == []  # the loss falls: learning goes on
    h = sampled(np.full(120, 2.3))
    h.add_act(125, "sig", 0, "saturated", (0.0, 0.25))  # one of the last 3 samples at 25% of the peak
    assert detect_units(h, T) == []
    # The output activation is never judged, however flat.
    h = sampled(np.full(120, 2.3))
    for s in (50, 75, 100):
        h.add_act(s, "out", 0, "saturated", (0.9, 0.01))
    assert [v.key[1] for v in detect_units(h, T)] == ["sig"]


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
    # One exploding first step (loss 2375 among nine near 0.5) is not the early level: the median is. A plateau at
    # 0.17 (34% of that median, far above 2%) is a stall, not convergence (the IRNN at T = 200, EXPERIMENTS.md F9).
    first = np.array([1.08, 2375.5, 0.86, 0.53, 0.51, 0.17, 0.22, 0.23, 0.16, 0.14])
    spiky_start = history(g, np.concatenate([first, np.full(190, 0.17)]))
    spiky_start.sample_steps, spiky_start.weight, spiky_start.update = stuck.sample_steps, stuck.weight, stuck.update
    v3 = detect_vanishing(spiky_start, T)
    assert v3 is not None and v3.emit


def spiky(early: float, late: float, spike: float, losses: np.ndarray) -> History:
    """300 steps of 2 layers: norms `early` for 10 steps, then `late` (+-5 % noise), and at step 250 `spike`."""
    rng = np.random.default_rng(0)
    g = np.full((300, 2), late) * (1 + 0.05 * rng.standard_normal((300, 2)))
    g[:10] = early
    g[250] = spike
    return history(g, losses)


def test_spike_above_every_early_level_is_reported_at_once() -> None:
    h = spiky(early=1.0, late=1.0, spike=20.0, losses=np.full(300, 2.0))
    v = detect_exploding_step(h, 250, T)
    assert v is not None and v.key == ("exploding", "spike") and v.diagnosis.severity == "warning"
    # by hand: 2 layers at 20 -> total 20*sqrt(2); each layer 20x its early level 1.0
    assert abs(v.diagnosis.evidence["total_grad_norm"] - 20 * np.sqrt(2)) < 1e-9
    assert abs(v.diagnosis.evidence["max_layer_growth"] - 20.0) < 1e-9
    assert h.spike_watch == []


def test_spike_below_the_early_level_is_judged_by_the_loss_after_it() -> None:
    # Norms 1.0 at the start, 0.01 late; one batch gives 0.3: 30x the running mean, but below every layer's early
    # level. The loss is flat at 2.0 (not improving), so only the size rule could speak, and it does not.
    losses = np.full(300, 2.0)
    h = spiky(early=1.0, late=0.01, spike=0.3, losses=losses)
    assert detect_exploding_step(h, 250, T) is None and h.spike_watch == [250]
    assert detect_spike_damage(h, T) == [] and h.spike_watch == []  # the loss stayed at 2.0: no damage

    # The same spike, and the loss after it is 3.0: a rise of 1.0 > 0.1 x 2.0 (its early level).
    losses[251:] = 3.0
    h = spiky(early=1.0, late=0.01, spike=0.3, losses=losses)
    assert detect_exploding_step(h, 250, T) is None
    found = detect_spike_damage(h, T)
    assert len(found) == 1 and found[0].diagnosis.severity == "error" and found[0].diagnosis.step == 250
    ev = found[0].diagnosis.evidence
    assert ev["loss_after"] == 3.0 and ev["loss_before"] == 2.0
    # A rise of 0.1 (5 % of the early level) is not damage.
    losses[251:] = 2.1
    h = spiky(early=1.0, late=0.01, spike=0.3, losses=losses)
    detect_exploding_step(h, 250, T)
    assert detect_spike_damage(h, T) == []
    # Fewer than spike_follow (5) steps after it: still waiting.
    short = spiky(early=1.0, late=0.01, spike=0.3, losses=losses)
    cut = History(short.layers, short.numel, short.embedding)
    cut.append(short.steps[:253], short.total[:253], losses[:253], np.ones(253, dtype=bool), short.grad[:253])
    assert detect_exploding_step(cut, 250, T) is None
    assert detect_spike_damage(cut, T) == [] and cut.spike_watch == [250]


def test_spike_while_the_loss_improves_waits_for_its_effect() -> None:
    # Above the early level (an LSTM finding its way), on a batch whose loss is below the running mean.
    losses = np.full(300, 2.0)
    losses[250:] = 1.0
    h = spiky(early=1.0, late=1.0, spike=20.0, losses=losses)
    assert detect_exploding_step(h, 250, T) is None and h.spike_watch == [250]
    assert detect_spike_damage(h, T) == []


def test_spike_after_the_run_fitted_its_data_waits_for_its_effect() -> None:
    # 20x every layer's early level, but the loss has been at 0.01 (0.5% of its early 2.0) for 240 steps.
    losses = np.concatenate([np.full(10, 2.0), np.full(290, 0.01)])
    h = spiky(early=1.0, late=1.0, spike=20.0, losses=losses)
    assert detect_exploding_step(h, 250, T) is None and h.spike_watch == [250]
    assert detect_spike_damage(h, T) == []
    losses[251:] = 0.5  # the fitted run loses its fit: a rise of ~0.49 > 0.1 x 2.0
    h = spiky(early=1.0, late=1.0, spike=20.0, losses=losses)
    detect_exploding_step(h, 250, T)
    (v,) = detect_spike_damage(h, T)
    assert v.diagnosis.evidence["loss_after"] == 0.5


def test_clipped_spike_is_judged_by_its_effect() -> None:
    # With clip= the spike's step was bounded: not reported for its size; reported if the loss still rose.
    h = spiky(early=1.0, late=1.0, spike=20.0, losses=np.full(300, 2.0))
    h.clipped = np.minimum(h.total, 1.0)
    assert detect_exploding_step(h, 250, T) is None and h.spike_watch == [250]
    assert detect_spike_damage(h, T) == []
    losses = np.full(300, 2.0)
    losses[251:] = 3.0
    h = spiky(early=1.0, late=1.0, spike=20.0, losses=losses)
    h.clipped = np.minimum(h.total, 1.0)
    detect_exploding_step(h, 250, T)
    (v,) = detect_spike_damage(h, T)
    assert v.diagnosis.evidence["clipped_norm"] == 1.0
    assert "clip cut this step's gradient to 1, and the loss rose all the same" in v.diagnosis.message


def alternating(spike: float, losses: np.ndarray, at: int = 250) -> History:
    """300 steps of one layer whose norm alternates 0.5, 1.5 (running mean ~1, running std ~0.49: a heavy-tailed
    norm), with `spike` at step `at`."""
    g = np.where(np.arange(300) % 2 == 0, 0.5, 1.5)[:, None]
    g[at] = spike
    return history(g, losses)


def test_smaller_spike_is_reported_only_if_it_undid_half_the_progress() -> None:
    # Loss 2.0 for 10 steps, then 1.0: the run had learned 1.0 below its early level 2.0. At step 250 a norm of
    # 2.5: ~2.5x its running mean (above watch_ratio 2, below spike_ratio 3) at a z-score of ~3 (below spike_z 10).
    losses = np.concatenate([np.full(10, 2.0), np.full(290, 1.0)])
    losses[251:] = 1.6  # the next 5 steps give back 0.6 of that 1.0
    h = alternating(2.5, losses)
    assert 250 in step_candidates(h, range(300), T)
    assert 2.0 < h.total[250] / h.mean[250] < 3.0 and h.z[250] < T.spike_z
    assert detect_exploding_step(h, 250, T) is None and h.spike_watch == [250]
    (v,) = detect_spike_damage(h, T)
    ev = v.diagnosis.evidence
    before = 1.0 + 0.97 ** 240  # by hand: the loss EMA (beta 0.97) of 10 values 2.0 then 240 values 1.0
    assert v.key == ("exploding", "spike") and v.diagnosis.severity == "error" and v.diagnosis.step == 250
    assert abs(ev["loss_before"] - before) < 1e-9 and ev["loss_after"] == 1.6
    assert abs(ev["progress_undone"] - (1.6 - before) / (2.0 - before)) < 1e-9  # ~0.60
    assert "gives back 60% of the progress" in v.diagnosis.message
    assert h.exploded == (250, ev["loss_before"])
    # The loss stays at 1.6 to the end: at the next read the condition is kept alive without a new report, so a
    # stall it caused is not reported as another kind (the reporter refreshes the active condition's step).
    (keep,) = detect_spike_damage(h, T)
    assert keep.key == ("exploding", "spike") and not keep.emit and keep.diagnosis.step == 299
    reporter = Reporter(cooldown=50)
    assert reporter.offer(v) is v.diagnosis and reporter.offer(keep) is None
    assert reporter.active[("exploding", "spike")][1] == 299
    # A rise of 0.4: damage by the big-spike test (0.4 > 0.1 x 2.0), but only 40% of the progress (< spike_undo).
    losses[251:] = 1.4
    h = alternating(2.5, losses)
    detect_exploding_step(h, 250, T)
    assert detect_spike_damage(h, T) == [] and h.exploded is None
    # A run that had learned nothing (loss flat at 2.0) has no progress to undo: a rise to 2.6 after a smaller
    # spike is not reported ...
    flat = np.full(300, 2.0)
    flat[251:] = 2.6
    h = alternating(2.5, flat)
    detect_exploding_step(h, 250, T)
    assert detect_spike_damage(h, T) == []
    # ... while a spike of 7.0 (~7x its mean, z ~12 > spike_z) is judged by the plain damage test and reported.
    h = alternating(7.0, flat)
    assert h.z[250] > T.spike_z and h.total[250] > T.spike_ratio * h.mean[250]
    h.clipped = np.minimum(h.total, 1.0)  # bounded by a clip: judged by its effect, not reported for its size
    assert detect_exploding_step(h, 250, T) is None and h.spike_watch == [250]
    (v,) = detect_spike_damage(h, T)
    assert v.diagnosis.evidence["loss_after"] == 2.6
    # A norm 1.8x its running mean is not a spike at all: not even watched.
    h = alternating(1.8, losses)
    assert 250 not in step_candidates(h, range(11, 300), T)
    assert detect_exploding_step(h, 250, T) is None and h.spike_watch == []


def test_spike_during_warmup_is_judged_by_its_effect() -> None:
    # 20x every layer's level at step 30, inside the first `warmup` (50) steps: the z-score is not trusted there,
    # so it is not reported for its size; it is reported once the loss after it shows damage.
    rng = np.random.default_rng(0)
    g = np.ones((60, 2)) * (1 + 0.05 * rng.standard_normal((60, 2)))
    g[30] = 20.0
    losses = np.full(60, 2.0)
    h = history(g, losses)
    assert h.finite_count[30] <= T.warmup
    assert detect_exploding_step(h, 30, T) is None and h.spike_watch == [30]
    assert detect_spike_damage(h, T) == []  # the loss stayed at 2.0
    losses[31:] = 3.0
    h = history(g, losses)
    detect_exploding_step(h, 30, T)
    (v,) = detect_spike_damage(h, T)
    ev = v.diagnosis.evidence
    assert v.diagnosis.step == 30 and ev["loss_before"] == 2.0 and ev["loss_after"] == 3.0
    assert "above the loss's early level 2: everything learned was undone" in v.diagnosis.message
    # The same spike at step 5, before the early loss level (the first 10 losses) is known, and the loss rising
    # after it: not even watched (a run's start is not a cliff).
    g5 = g.copy()
    g5[30], g5[5] = g[29], 20.0
    h = history(g5, losses)
    assert detect_exploding_step(h, 5, T) is None and h.spike_watch == []


def test_stall_after_an_unrecovered_explosion_is_not_vanishing() -> None:
    # Uniform vanishing evidence (every layer moves 2e-7 of its norm per step) on a loss flat at 2.3 (stalled).
    def stalled() -> History:
        # the loss alternates 2.2, 2.4: mean 2.3, std 0.1; over the 100-step window 3 standard errors are 0.03
        h = history(np.full((120, 4), 1e-5), np.where(np.arange(120) % 2 == 0, 2.2, 2.4))
        for s in (50, 75, 100):
            h.sample_steps.append(s)
            h.weight.append(np.full(4, 10.0))
            h.update.append(np.full(4, 2e-6))
        return h

    v = detect_vanishing(stalled(), T)
    assert v is not None and v.emit  # no explosion: vanishing
    # An explosion at step 5 while the loss stood at 1.0: the stall at 2.3 is 1.3 above it, the explosion's
    # damage: the evidence is kept (an active condition stays active), nothing new is raised.
    h = stalled()
    h.mark_exploded(5, 1.0)
    v = detect_vanishing(h, T)
    assert v is not None and not v.emit
    # From a level of 2.25 the stall is 0.05 above it (> 0.03): not recovered, still the explosion's damage ...
    h = stalled()
    h.mark_exploded(5, 2.25)
    v = detect_vanishing(h, T)
    assert v is not None and not v.emit
    # ... from 2.28 it is 0.02 above it (< 0.03): back within the noise, recovered; the stall is vanishing.
    h = stalled()
    h.mark_exploded(5, 2.28)
    v = detect_vanishing(h, T)
    assert v is not None and v.emit
    # Of two explosions the one after which the loss had been lowest is kept (the second started from the damage).
    h.mark_exploded(8, 1.0)
    h.mark_exploded(9, 2.0)
    assert h.exploded == (8, 1.0)
    # A resumed run keeps it.
    resumed = History(h.layers, h.numel, h.embedding)
    resumed.load_state_dict(h.state_dict())
    assert resumed.exploded == (8, 1.0)


def test_step_candidates_is_the_vectorised_filter() -> None:
    # Oracle: the pre-filter's definition written with NumPy over whole columns; random histories with NaN/Inf
    # totals, losses and layer norms, unobserved losses, spikes and a forming baseline.
    rng = np.random.default_rng(7)
    for trial in range(60):
        n, layers = int(rng.integers(1, 40)), int(rng.integers(1, 5))
        grads = np.abs(rng.standard_normal((n, layers))) * 10.0 ** rng.uniform(-3, 3, (n, 1))
        grads[rng.random((n, layers)) < 0.05] = rng.choice([np.nan, np.inf])
        losses = rng.uniform(0.5, 3.0, n)
        losses[rng.random(n) < 0.05] = rng.choice([np.nan, np.inf, -np.inf])
        h = History([f"l{i}" for i in range(layers)], np.full(layers, 100.0), np.zeros(layers, dtype=bool))
        seen = rng.random(n) < 0.8
        total = np.sqrt((grads ** 2).sum(1))
        h.append(np.arange(n), total, losses, seen, grads)
        lo = int(rng.integers(0, n))
        sl = slice(lo, n)
        flag = ~np.isfinite(h.total[sl]) | (h.loss_seen[sl] & ~np.isfinite(h.loss[sl]))
        flag |= ~np.isfinite(h.grad[sl]).all(1) | (h.finite_count[sl] <= len(h.first_totals))
        base = h.baseline_total(n)
        if base:
            flag |= h.total[sl] > T.growth_factor * base
        flag |= (h.z[sl] > T.spike_z) | (h.total[sl] > T.watch_ratio * h.mean[sl])
        assert step_candidates(h, range(lo, n), T) == (np.flatnonzero(flag) + lo).tolist(), trial


def _dying(dead_from: int, steps: int = 200, layers: int = 4, dead: tuple[int, ...] = (0, 1, 2),
           losses: np.ndarray | None = None) -> History:
    """Gradients alive (0.5, one burst of 0.7 to keep them unequal) until ``dead_from``, then exactly 0 in the
    ``dead`` layers; the head (the last layer) keeps a gradient throughout. Loss flat at 2.3 unless given."""
    g = np.full((steps, layers), 0.5)
    g[3] = 0.7
    g[dead_from:, list(dead)] = 0.0
    return history(g, losses)


def test_dead_flow_names_the_layers_whose_gradient_stays_exactly_zero() -> None:
    # Steps 120-199 exactly 0 in layers 0-2: 80 trailing zero steps of the 100-step window (>= 50).
    v = detect_dead_flow(_dying(120), T)
    assert v is not None and v.emit and v.key == ("dead_units", "gradient flow")
    d = v.diagnosis
    assert d.kind == "dead_units" and d.layers == ["l0", "l1", "l2"] and d.severity == "error"
    assert d.evidence["zero_steps"] == 80.0 and d.evidence["dead_layers"] == 3.0 and "since step 120" in d.message
    # The whole window zero: said as "the last 100 steps", not a start the window cannot see.
    assert "every one of the last 100 steps" in detect_dead_flow(_dying(50), T).diagnosis.message
    # One layer out of four, not the first: a warning.
    one = detect_dead_flow(_dying(120, dead=(2,)), T)
    assert one is not None and one.diagnosis.layers == ["l2"] and one.diagnosis.severity == "warning"


def test_dead_flow_needs_a_long_zero_run_a_start_with_gradient_and_a_stalled_loss() -> None:
    assert detect_dead_flow(_dying(151), T) is None  # 49 trailing zero steps: under half the window
    g = np.full((200, 4), 0.5)
    g[:, 1] = 0.0  # exactly 0 from the start: an unused branch under zero_grad(set_to_none=False)
    assert detect_dead_flow(history(g), T) is None
    g[:, 1] = -1.0  # absent (no .grad at all) throughout
    assert detect_dead_flow(history(g), T) is None
    # A burst of gradient 10 steps ago breaks the run: the units are not all dead.
    bursty = _dying(100)
    bursty.grad[-10, 0] = 0.3
    v = detect_dead_flow(bursty, T)
    assert v is not None and v.diagnosis.layers == ["l1", "l2"]
    # The loss still falls (the head learns on): not reported; already reported, kept alive without a report.
    falling = _dying(120, losses=np.linspace(2.3, 0.5, 200))
    assert detect_dead_flow(falling, T) is None
    kept = detect_dead_flow(falling, T, known=True)
    assert kept is not None and not kept.emit
    # ReLU modules sampled: they name the dead units themselves (and the vanishing behind them, see advice.py).
    sampled = _dying(120)
    sampled.add_act(150, "relu", 0, "active", np.zeros(8))
    assert detect_dead_flow(sampled, T) is None
    # Sigmoid/tanh in the model: a gradient can also vanish to 0 below float32's range; the rule does not apply.
    assert detect_dead_flow(_dying(120), T, saturating=True) is None
    # No observed loss: a dead net and a perfect fit (a hinge loss at 0) look alike, so nothing is said.
    blind = _dying(120)
    blind.loss_seen[:] = False
    assert detect_dead_flow(blind, T) is None

"""Every number a detector compares against, in one place (``Guard(thresholds=)``; judge room, plain data).

Room: the judge. It may touch: no other module.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Thresholds:
    """Every number a detector compares against, in one place, so a user can tune them (``Guard(thresholds=)``).

    Defaults are calibrated on the scenarios in tests/ (healthy MLP/CNN/transformer runs stay silent).
    """

    window: int = 100  # steps of evidence behind window-based verdicts (vanishing, progress)
    warmup: int = 50  # finite steps before the z-score of the total norm is trusted (a spike before them is
    # judged only by the loss after it)
    spike_z: float = 10.0  # z-score of the total gradient norm against its EMA (ZClip's statistic)
    spike_ratio: float = 3.0  # ... and at least this many times its running mean; a spike that leaves every
    # layer's gradient within this factor of its own early level is judged by its effect on the loss instead
    spike_damage: float = 0.1  # loss rise after a spike (mean of the next spike_follow steps against the running
    # mean before it), as a fraction of the loss's early level, that shows the spike undid progress
    spike_follow: int = 5  # steps after a spike whose loss shows whether it did damage
    watch_ratio: float = 2.0  # a smaller spike, at least this many times the running mean (any z-score), is
    # never reported for its size (heavy-tailed norms give such spikes on healthy runs), only if the loss after it
    # shows it undid training:
    spike_undo: float = 0.5  # ... the rise gave back at least this fraction of the progress the run had made
    # (its early loss level minus its level before the spike). Pascanu et al.'s cliffs on a tanh RNN come from
    # steps at 2.6-5x the running mean with z-scores of 2.7-6 (the norm's heavy tail keeps the running variance
    # high, so none reaches spike_z), and give back 60-240% of the progress (experiments/pascanu2013_clipping.py,
    # EXPERIMENTS.md F10)
    growth_factor: float = 50.0  # total norm this many times above its early baseline ...
    loss_rise: float = 1.5  # ... while the loss is this many times its early level (or non-finite)
    update_ratio_high: float = 0.1  # ||dw||/||w|| per step; healthy training sits near 1e-3
    backward_growth: float = 1e3  # early-layer / late-layer RMS gradient: exploding toward the input
    vanish_ratio: float = 1e-3  # early-layer / late-layer RMS gradient: vanishing toward the input
    vanish_update: float = 1e-5  # median layer ||dw||/||w|| below this: the weights do not move
    time_ratio: float = 1e-3  # gradient reaching the first 10% of time steps / the last 10%
    progress: float = 0.02  # relative loss improvement over the window that counts as learning
    learned: float = 0.02  # loss below this fraction of its early level: the model has learned (a plateau near
    # zero loss is convergence, not vanishing gradients)
    dead_fraction: float = 0.5  # fraction of a layer's units never active
    saturated_fraction: float = 0.5  # fraction of a squashing layer's outputs on the flat part
    saturated_slope: float = 0.2  # mean slope of a squashing layer, as a fraction of its peak, below which the
    # layer counts as saturated while the loss stalls (Glorot & Bengio's top layer near 0 sits at 0.05-0.15)
    persist_samples: int = 3  # activation samples (distinct steps) a unit condition must hold
    cooldown: int = 50  # steps a condition must be absent before it counts as gone

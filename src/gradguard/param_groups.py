"""Beside the wiring: the optimizer gained parameter groups after attach (``optimizer.add_param_group``, as when a
frozen backbone is unfrozen part way through training).

The new parameters join the tracked layers in place (the layer map is shared by the recorder, the judge and the
repairer), so their gradients are measured, judged, clipped, and a non-finite one skips the step like any other.
Earlier rows read the new layers as absent. The repair ladder's snapshots hold the optimizer as it was, which
``optimizer.load_state_dict`` refuses once the groups differ: the state at the change becomes the ladder's state at
attach, and older snapshots are dropped. Runs once per change, off the per-step path (its one host read: the rows
queued so far are drained first, in the old layout).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .detect.history import History
from .stats.layers import LayerMap, build_layer_map
from .stats.norms import ABSENT


def group_count(wiring: Any) -> int:
    return len(wiring.optimizer.param_groups) if wiring.optimizer is not None else 0


def adopt_new_groups(wiring: Any) -> list[str]:
    """Track the parameters of groups added since attach; returns the names of the layers added.

    Args:
        wiring: the Guard's ``hooks.Wiring`` (its optimizer gained groups; typed loosely: the wiring imports this).

    Returns:
        Names of new layers (a new parameter of an already tracked layer adds to that layer's size instead).
    """
    wiring.drain_safely()  # rows queued in the old layout go to the host first (a host read; once per change)
    layers = wiring.recorder.layers
    fresh = build_layer_map(wiring.model, wiring.optimizer)
    added = _extend(layers, fresh)
    wiring.recorder.reset_norms()
    wiring.repairer.reset_layout()
    h = wiring.judge.history
    if h is not None:
        _widen_history(h, layers, added)
    ladder = wiring.repairer.ladder
    if ladder is not None and wiring.optimizer is not None:
        ladder.snapshot = ladder.initial = None
        ladder.take_snapshot(wiring.model, wiring.optimizer, wiring.recorder.step, initial=True)
    wiring.groups_seen = group_count(wiring)
    return added


def _extend(layers: LayerMap, fresh: LayerMap) -> list[str]:
    """Make ``layers`` track ``fresh``'s parameters, in place: known layers keep their place, new ones follow."""
    names = list(layers.names) + [n for n in fresh.names if n not in layers.names]
    where = {n: i for i, n in enumerate(names)}
    modules = {n: m for n, m in zip(fresh.names, fresh.modules)}
    modules.update(zip(layers.names, layers.modules))
    numel = [0] * len(names)
    layer_of = []
    for p, li in zip(fresh.params, fresh.layer_of):
        i = where[fresh.names[li]]
        layer_of.append(i)
        numel[i] += p.numel()
    added = names[len(layers.names):]
    layers.names, layers.params, layers.param_names = names, fresh.params, fresh.param_names
    layers.layer_of, layers.numel, layers.modules = layer_of, numel, [modules[n] for n in names]
    return added


def _widen_history(h: History, layers: LayerMap, added: list[str]) -> None:
    """New columns for the new layers: absent in every earlier row and sample."""
    k = len(added)
    h.layers = list(layers.names)
    h.numel = np.asarray(layers.numel, dtype=np.float64)
    h.embedding = np.concatenate([h.embedding, np.zeros(k, dtype=bool)])
    if k:
        h.grad = np.concatenate([h.grad, np.full((len(h.grad), k), ABSENT, dtype=h.grad.dtype)], axis=1)
        h.first_grads = [np.concatenate([g, np.full(k, ABSENT)]) for g in h.first_grads]
        for lst in (h.weight, h.update, h.after):
            lst[:] = [None if a is None else np.concatenate([a, np.full(k, ABSENT)]) for a in lst]
    h.ratio_cache.clear()
    h._flow_cache = None

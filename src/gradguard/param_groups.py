"""Beside the wiring: the optimizer gained parameter groups after attach (``optimizer.add_param_group``, as when a
frozen backbone is unfrozen part way through training).

The new parameters join the tracked layers in place (the layer map is shared by the recorder, the judge and the
repairer), so their gradients are measured, judged, clipped, and a non-finite one skips the step like any other.
Earlier rows read the new layers as absent. The repair ladder's snapshots hold the optimizer as it was, which
``optimizer.load_state_dict`` refuses once the groups differ: the state at the change becomes the ladder's state at
attach, and older snapshots are dropped. Runs once per change, off the per-step path (its one host read: the rows
queued so far are drained first, in the old layout).

Room: the facade. It may touch: ``detect.history``, ``stats.layers``, ``stats.norms``.
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
    known = set(layers.names)
    old_to_new = _extend(layers, fresh)
    wiring.recorder.reset_norms()
    wiring.repairer.reset_layout()
    h = wiring.judge.history
    if h is not None:
        _widen_history(h, layers, old_to_new)
    ladder = wiring.repairer.ladder
    if ladder is not None and wiring.optimizer is not None:
        ladder.snapshot = ladder.initial = None
        ladder.take_snapshot(wiring.model, wiring.optimizer, wiring.recorder.step, initial=True)
    wiring.groups_seen = group_count(wiring)
    added = [n for n in layers.names if n not in known]
    if added:  # meta.json names the layers the report shows: it gets the new list (a rare, whole rewrite)
        wiring.outputs.layers_changed(list(zip(layers.names, layers.numel)))
    return added


def _extend(layers: LayerMap, fresh: LayerMap) -> list[int]:
    """Make ``layers`` track ``fresh``'s parameters, in place. Known layers keep their order (forward order once
    known); a new layer goes before the first known layer registered after it, so depth still reads top to bottom
    (an unfrozen first layer is the earliest layer, not the last). Returns where each old layer went."""
    reg = {n: i for i, n in enumerate(fresh.names)}
    names = list(layers.names)
    for n in fresh.names:
        if n not in names:
            at = next((j for j, m in enumerate(names) if reg.get(m, len(reg)) > reg[n]), len(names))
            names.insert(at, n)
    where = {n: i for i, n in enumerate(names)}
    modules = {n: m for n, m in zip(fresh.names, fresh.modules)}
    modules.update(zip(layers.names, layers.modules))
    numel = [0] * len(names)
    layer_of = []
    for p, li in zip(fresh.params, fresh.layer_of):
        i = where[fresh.names[li]]
        layer_of.append(i)
        numel[i] += p.numel()
    old_to_new = [where[n] for n in layers.names]
    layers.names, layers.params, layers.param_names = names, fresh.params, fresh.param_names
    layers.layer_of, layers.numel, layers.modules = layer_of, numel, [modules[n] for n in names]
    return old_to_new


def _widen_history(h: History, layers: LayerMap, old_to_new: list[int]) -> None:
    """Columns in the new layout: the new layers absent in every earlier row and sample."""
    width = len(layers.names)

    def place(a: np.ndarray, fill: float) -> np.ndarray:
        out = np.full((*a.shape[:-1], width), fill, dtype=a.dtype)
        out[..., old_to_new] = a
        return out

    h.layers = list(layers.names)
    h.numel = np.asarray(layers.numel, dtype=np.float64)
    h.embedding = place(np.asarray(h.embedding, dtype=bool), False)
    h.grad = place(h.grad, ABSENT)
    h.first_grads = [place(g, ABSENT) for g in h.first_grads]
    for lst in (h.weight, h.update, h.after):
        lst[:] = [None if a is None else place(np.asarray(a), ABSENT) for a in lst]
    h.ratio_cache.clear()

"""What flows through the layers over a window of the history: per-layer update-to-weight ratios and the early
vs late layers' gradient, read by the vanishing, stalled and exploding rules and by the doctor.

Room: the judge. It may touch: ``detect``.
"""

from __future__ import annotations

import statistics

import numpy as np

from .history import History, nanmedian


def update_ratios(h: History, n: int, orthogonal: bool = False) -> np.ndarray | None:
    """(n, layers) update-to-weight ratios ||dw||/||w|| of the last ``n`` sampled steps inside the history window.

    Args:
        h: the history; n: how many samples.
        orthogonal: measure only the part of the update across the weights, leaving out its component along them.
            Weight decay moves every weight toward zero, along the weights themselves: by lr * wd / (1 - momentum)
            of their norm per step (2.5e-5 with SGD 0.005, momentum 0.9, wd 5e-4), enough to hide weights that the
            gradient no longer moves. From the norms alone, with d = w_after - w_before:
            w_before . d = (||w_after||^2 - ||w_before||^2 - ||d||^2) / 2 and
            ||d_across||^2 = ||d||^2 - (w_before . d)^2 / ||w_before||^2. Where the norm after the step is unknown
            (sharded parameters), the whole update is used.

    Returns:
        The ratios (NaN where a layer had no weight or no update), or None when fewer than ``n`` samples exist.

    References:
        Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019 (decay as a shrinking of the
        weights, separate from the gradient step).
    """
    # The ratios change only when a sample arrives (every sample_every steps) or the window start passes the
    # oldest of the n: kept across reads, keyed by the newest sample objects themselves (held here, so never
    # confused with others) and by whether the oldest one is still inside the window.
    inside = len(h.sample_steps) >= n and len(h.steps) > 0 and h.sample_steps[-n] >= h.steps[0]
    stamp = (len(h.sample_steps), h.sample_steps[-1] if h.sample_steps else None,
             inside, h.weight[-1] if h.weight else None,
             h.update[-1] if h.update else None, h.after[-1] if h.after else None, len(h.after))
    hit = h.ratio_cache.get((n, orthogonal))
    if hit is not None and len(hit[0]) == len(stamp) and all(a is b or (type(a) is not np.ndarray and a == b)
                                                             for a, b in zip(hit[0], stamp)):
        return hit[1]
    result = _update_ratios(h, n, orthogonal)
    h.ratio_cache[(n, orthogonal)] = (stamp, result)
    return result


def _update_ratios(h: History, n: int, orthogonal: bool) -> np.ndarray | None:
    if len(h.sample_steps) < n or h.sample_steps[-n] < h.steps[0]:
        return None
    afters = h.after[-n:] if len(h.after) >= n else [None] * n
    rows = []
    for w, u, a in zip(h.weight[-n:], h.update[-n:], afters):
        ok = (w > 0) & (u >= 0)
        if orthogonal and a is not None:
            known = ok & (a >= 0)
            with np.errstate(invalid="ignore", divide="ignore"):
                along = (a * a - w * w - u * u) / 2.0 / np.where(known, w, 1.0)
                across = np.sqrt(np.maximum(u * u - along * along, 0.0))
            u = np.where(known, across, u)
        rows.append(np.where(ok, u / np.where(ok, w, 1.0), np.nan))
    r = np.stack(rows)
    return r if np.isfinite(r).any(axis=1).all() else None


def layer_flow(h: History, window: int) -> tuple[list[str], list[str], float | None, np.ndarray]:
    """Early vs late layers' RMS gradient over the last ``window`` steps (median per layer), lookups left out.

    Returns:
        (early layer names, late layer names, median early RMS / median late RMS or None, per-layer RMS).
    """
    return h.memo(("layer_flow", window), lambda: _layer_flow(h, window))  # several detectors ask at one read


def _layer_flow(h: History, window: int) -> tuple[list[str], list[str], float | None, np.ndarray]:
    rms = nanmedian(h.rms_grad(slice(len(h.steps) - window, len(h.steps))), axis=0)
    usable = [i for i in range(len(h.layers)) if not h.embedding[i] and np.isfinite(rms[i]) and rms[i] >= 0]
    result: tuple[list[str], list[str], float | None, np.ndarray] = ([], [], None, rms)
    if len(usable) >= 2:
        q = max(1, len(usable) // 4)
        early_i, late_i = usable[:q], usable[-q:]
        # statistics.median: numpy's value on these few numbers, without its per-call cost at every read
        late = float(statistics.median(rms[late_i].tolist()))
        early = float(statistics.median(rms[early_i].tolist()))
        if late > 0:
            result = ([h.layers[i] for i in early_i], [h.layers[i] for i in late_i], early / late, rms)
    return result

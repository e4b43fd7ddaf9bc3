"""Corrupted weights that the loss cannot see: an Inf weight feeding a Tanh (tanh(inf) = 1) leaves the loss and
every gradient finite, so no skip and no non-finite step ever points at it, yet any input with a 0 in that feature
gives NaN (inf * 0). The sampled weight norms show it: they arrive with the rows at each host read (no extra sync),
and a non-finite one is a corrupted weight. ``WeightWatch`` reads them there, remembers the newest sample step
whose weights were all finite (states up to it are trusted), and names the first corrupted layers since.

Room: the repairer. It may touch: ``detect.history``, ``stats.layers``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..detect.history import History
from ..stats.layers import LayerMap


@dataclass
class Corruption:
    """Non-finite weights seen at a sample: ``step``, the first step whose weights were corrupted as far as the
    samples tell; ``layers``, the layers whose weight norm was non-finite; ``good``, the newest sample step before
    it whose weights were all finite (None: no such sample); ``norms``, the layers' sampled norms."""

    step: int
    layers: list[str]
    good: int | None
    norms: list[float]


class WeightWatch:
    """The weight samples of each host read, judged once each."""

    def __init__(self) -> None:
        self.good: int | None = None  # newest sample step whose weight norms (before its step) were all finite
        self.seen = -(10**18)  # newest sample step judged

    def check(self, h: History) -> Corruption | None:
        """The first corruption among the samples not judged yet, or None. ``weight`` holds the norms before a
        sampled step, ``after`` (when measured, else -1) those after it: a non-finite ``after`` means the weights
        before the next step were corrupted."""
        found: Corruption | None = None
        for i, s in enumerate(h.sample_steps):
            if s <= self.seen:
                continue
            self.seen = s
            if found is not None:
                continue
            for at, norms in ((s, h.weight[i]), (s + 1, h.after[i] if i < len(h.after) else None)):
                if norms is None:
                    continue
                bad = ~np.isfinite(np.asarray(norms, dtype=np.float64))
                if bad.any():
                    found = Corruption(at, [h.layers[j] for j in np.flatnonzero(bad)], self.good,
                                       [float(norms[j]) for j in np.flatnonzero(bad)])
                    break
                if at == s:
                    self.good = s
        return found


def still_corrupt(layers: LayerMap, names: list[str]) -> bool:
    """Whether the weights of the named layers hold NaN/Inf now. A norm can read Inf for finite weights whose float32
    squares overflow (entries above ~1e19, on an accelerator where no wider re-measure is allowed per step): those
    are an explosion, not a corruption to roll back. One host read (a sync on an accelerator), made only when a
    sampled norm came out non-finite: never on the per-step path."""
    wanted = {i for i, n in enumerate(layers.names) if n in names}
    mine = [p.detach() for p, li in zip(layers.params, layers.layer_of) if li in wanted]
    if not mine:
        return False
    if any(type(p) is not torch.Tensor for p in mine):
        # Sharded (DTensor): each rank holds a part, so a local check could differ between ranks and only some
        # would roll back. The sampled norm was reduced over all ranks and reads the same on each: trust it.
        return True
    flags = [torch.isfinite(p).all() for p in mine]
    return not bool(torch.stack([f.to(flags[0].device) for f in flags]).all())

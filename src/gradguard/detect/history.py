"""The host-side record the detectors read: every step's statistics since attach (a bounded window), and the
running statistics derived from it.

The running mean/variance of the total gradient norm and of the loss are computed here, on the host, from the
exact per-step values that reach it every ``log_every`` steps: the same numbers a device-side EMA would give, at
no per-step cost on the device.

Room: the judge. It may touch: ``detect``, ``stats.norms``.
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..stats.norms import ABSENT
from .thresholds import Thresholds as Thresholds  # re-exported: detectors and the API import it from here


@dataclass
class Ema:
    """Exponential moving mean and variance of a scalar series; non-finite values are skipped.

    ``mean <- mean + (1 - beta) * d`` and ``var <- beta * (var + (1 - beta) * d^2)`` with ``d = x - mean``
    (West's incremental weighted variance), the statistic ZClip thresholds; the first finite value sets the mean.

    References:
        Kumar et al., "ZClip: Adaptive Spike Mitigation for LLM Pre-Training", 2025. Finch, "Incremental
        calculation of weighted mean and variance", 2009.
    """

    beta: float
    mean: float = 0.0
    var: float = 0.0
    count: int = 0

    def push(self, x: float) -> tuple[float, float, float]:
        """Add ``x``; return (mean, std, z-score of ``x``) as they were *before* it (z = 0 until 2 values)."""
        mean, std = self.mean, math.sqrt(self.var)
        z = (x - mean) / std if self.count >= 2 and std > 0 and math.isfinite(x) else 0.0
        if math.isfinite(x):
            if self.count == 0:
                self.mean, self.var = x, 0.0
            else:
                d = x - self.mean
                self.mean += (1.0 - self.beta) * d
                self.var = self.beta * (self.var + (1.0 - self.beta) * d * d)
            self.count += 1
        return mean, std, z


def nanmedian(a: np.ndarray, axis: int) -> np.ndarray:
    """``np.nanmedian`` along ``axis``: the median of the non-NaN values (the middle one, or the mean of the two
    middle ones), NaN where there are none.

    The detectors take medians of small arrays at every host read (a 100 x layers window, a few samples x layers):
    there numpy's per-call cost dominates (about 40 us even for 2 x 3 values), so a 2-d array of up to
    ``_SMALL`` values is done in plain Python, with the same numbers as numpy; larger ones by numpy.
    """
    a = np.asarray(a)
    if a.ndim == 2 and 0 < a.size <= _SMALL and a.dtype.kind == "f":
        out = []
        any_nan = bool(np.isnan(a).any())
        for col in (a.T if axis == 0 else a).tolist():
            v = sorted(x for x in col if x == x) if any_nan else sorted(col)  # NaN != NaN: left out
            k = len(v)
            # the float64 mean of two float32 values rounds once to float32, as numpy's float32 mean does
            out.append(math.nan if k == 0 else v[k // 2] if k % 2 else (v[k // 2 - 1] + v[k // 2]) / 2)
        return np.array(out, dtype=a.dtype)
    if not np.isnan(a).any():
        return np.median(a, axis=axis)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column is NaN, as intended
        return np.nanmedian(a, axis=axis)


_SMALL = 320  # above it numpy is faster (a 100 x 12 window: 0.5 ms in Python against 0.19 ms)


BASELINE_STEPS = 10  # finite steps whose median is the "early level" growth is measured against


@dataclass
class History:
    """Per-step statistics on the host, trimmed to the last ``keep`` steps, with the running statistics.

    Attributes:
        layers: layer names in forward order; numel: elements per layer; embedding: which layers are lookups.
        steps, total, loss, loss_seen: per step. grad: (steps, layers) gradient norms, ABSENT=-1.
        clipped: the total norm after the configured clip (NaN without one).
        mean, std, z: running mean/std of the total norm before each step, and that step's z-score.
        loss_mean, loss_std: running mean/std of the loss before each step. finite_count: finite totals so far.
        sample_steps, weight, update, after: per sampled step, per layer weight norms before the step, update norms
        (-1: no update) and weight norms after the step (-1: unknown).
        acts: (module, call index, "active"|"saturated") -> recent (step, (units, packed per-unit mask) | value).
        times: (step, module, early, late, T). activation_order: activation modules in call order.
        spike_watch: steps of spikes waiting for the loss of the steps after them (see ``detect_spike_damage``).
        exploded: (step, running mean of the loss before it) of the exploding event, among those the exploding
        rules found, after which the loss had been lowest: a later stall above that level is the explosion's
        damage, not a case of vanishing gradients (see ``explained_by_explosion``).
    """

    layers: list[str]
    numel: np.ndarray
    embedding: np.ndarray
    beta: float = 0.97
    keep: int = 512
    steps: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    total: np.ndarray = field(default_factory=lambda: np.zeros(0))
    loss: np.ndarray = field(default_factory=lambda: np.zeros(0))
    loss_seen: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    clipped: np.ndarray = field(default_factory=lambda: np.zeros(0))
    grad: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    mean: np.ndarray = field(default_factory=lambda: np.zeros(0))
    std: np.ndarray = field(default_factory=lambda: np.zeros(0))
    z: np.ndarray = field(default_factory=lambda: np.zeros(0))
    loss_mean: np.ndarray = field(default_factory=lambda: np.zeros(0))
    loss_std: np.ndarray = field(default_factory=lambda: np.zeros(0))
    finite_count: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    sample_steps: list[int] = field(default_factory=list)
    weight: list[np.ndarray] = field(default_factory=list)
    update: list[np.ndarray] = field(default_factory=list)
    after: list[np.ndarray] = field(default_factory=list)
    acts: dict[tuple[str, int, str], deque[tuple[int, Any]]] = field(default_factory=dict)
    times: list[tuple[int, str, float, float, int]] = field(default_factory=list)
    activation_order: list[str] = field(default_factory=list)
    output_activation: str | None = None  # the activation module that produces the model's output, if any
    grad_ema: Ema = field(init=False)
    loss_ema: Ema = field(init=False)
    first_totals: list[tuple[int, float]] = field(default_factory=list)  # (step, total) of the first finite steps
    first_grads: list[np.ndarray] = field(default_factory=list)
    first_losses: list[tuple[int, float]] = field(default_factory=list)
    count0: int = 0  # finite steps seen before this history started (a resumed run)
    acts_version: int = 0  # bumped by add_act: unit detectors only need to run when it moved
    spike_watch: list[int] = field(default_factory=list)
    exploded: tuple[int, float] | None = None
    stall_start: tuple[float, float, int, int] | None = None  # the stall rule's start level (see stalled.py)
    # Results computed once per host read and shared by the detectors that ask (see ``memo``); None outside a
    # read, so code that changes a history by hand (tests, a loaded state) never reads a stale value.
    _memo: dict[Any, Any] | None = None
    ratio_cache: dict[Any, Any] = field(default_factory=dict)  # flow.update_ratios's results, by the samples read
    _buffers: dict[str, Any] = field(default_factory=dict, repr=False)  # per column: see ``_extend``

    def memo(self, key: Any, compute: Any) -> Any:
        """``compute()``, once per host read for each ``key`` (every call when no read is in progress)."""
        if self._memo is None:
            return compute()
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def __post_init__(self) -> None:
        # float64, as the host read delivers them: a float64 model's finite gradient norm can exceed float32's
        # maximum (1e72 in an LBFGS regression at a learning rate 100x too high), and a float32 column would turn it
        # into inf, which the non-finite rule then calls a non-finite gradient.
        self.grad = np.zeros((0, len(self.layers)), dtype=np.float64)
        self.grad_ema = Ema(self.beta)
        self.loss_ema = Ema(self.beta)

    def append(self, steps: np.ndarray, total: np.ndarray, loss: np.ndarray, loss_seen: np.ndarray,
               grad: np.ndarray, clipped: np.ndarray | None = None) -> None:
        """Add rows (one per step, in order) and derive the running statistics for each.

        Args:
            steps, total, loss, loss_seen: one value per row. grad: (rows, layers) gradient norms.
            clipped: the total norm after the configured clip, per row (None: no clip configured).
        """
        n = len(steps)
        count = int(self.finite_count[-1]) if len(self.finite_count) else self.count0
        # Python floats: a read brings about ten rows, and a NumPy scalar per element costs more than the EMA math
        # (host NumPy arrays from the read: no device is touched).
        step_l, total_l, loss_l, seen_l = (np.asarray(steps).tolist(), np.asarray(total, dtype=float).tolist(),
                                           np.asarray(loss, dtype=float).tolist(), np.asarray(loss_seen).tolist())
        mean, std, z, loss_mean, loss_std, counts = [], [], [], [], [], []
        gpush, lpush = self.grad_ema.push, self.loss_ema.push
        for i in range(n):
            t = total_l[i]
            m, s_, z_ = gpush(t)
            mean.append(m)
            std.append(s_)
            z.append(z_)
            if seen_l[i]:
                lm, ls, _ = lpush(loss_l[i])
            else:
                lm, ls = self.loss_ema.mean, math.sqrt(self.loss_ema.var)
            loss_mean.append(lm)
            loss_std.append(ls)
            if math.isfinite(t):
                count += 1
                if len(self.first_totals) < BASELINE_STEPS:
                    self.first_totals.append((int(step_l[i]), t))
                    self.first_grads.append(grad[i].copy())
            if seen_l[i] and math.isfinite(loss_l[i]) and len(self.first_losses) < BASELINE_STEPS:
                self.first_losses.append((int(step_l[i]), loss_l[i]))
            counts.append(count)
        cols = np.array([mean, std, z, loss_mean, loss_std], dtype=float).reshape(5, n)

        extend = self._extend
        extend("steps", steps)
        extend("total", total)
        extend("loss", loss)
        extend("loss_seen", loss_seen)
        extend("clipped", np.full(n, np.nan) if clipped is None else clipped)
        extend("grad", grad)
        for name, col in zip(("mean", "std", "z", "loss_mean", "loss_std"), cols):
            extend(name, col)
        extend("finite_count", counts)
        for lst in (self.sample_steps, self.weight, self.update, self.after):
            del lst[:-64]
        del self.times[:-256]

    def _extend(self, name: str, new: Any) -> None:
        """Append rows to a column and keep its last ``keep``. The column lives in a buffer and is shown as a view
        of its filled part: a read copies only its own rows, and the kept rows move once per ``keep`` rows (a
        concatenation copied every kept row of 12 columns at every read). The buffer grows by doubling, up to twice
        ``keep``, so a huge ``keep`` (a huge ``log_every``) costs only the rows there are. A column set from
        outside (a test, a layout widened by ``add_param_group``) starts a new buffer."""
        cur = getattr(self, name)
        slot = self._buffers.get(name)
        m = len(new)
        if slot is None or slot[1] is not cur:
            buf, start, end = cur, 0, len(cur)  # moved into a buffer of its own below
        else:
            buf, _, start, end = slot
        if slot is None or slot[1] is not cur or end + m > len(buf):
            stay = min(end - start, max(self.keep - m, 0))  # the newest rows that stay
            size = max(min(2 * self.keep, 2 * (stay + m) + 64), stay + m)
            grown = np.empty((size, *buf.shape[1:]), dtype=cur.dtype) if size > len(buf) or buf is cur else buf
            grown[:stay] = buf[end - stay:end].copy()  # a copy: the two ranges may overlap in one buffer
            buf, start, end = grown, 0, stay
        buf[end:end + m] = new
        end += m
        start = max(start, end - self.keep)
        view = buf[start:end]
        setattr(self, name, view)
        self._buffers[name] = (buf, view, start, end)

    def add_act(self, step: int, module: str, call: int, what: str, value: Any) -> None:
        """Keep one activation sample: for "active", a per-unit mask (stored packed, 1 bit a unit, with its
        length; ``unit_mask`` unpacks it); otherwise the value as given."""
        if what == "active":
            mask = np.asarray(value).reshape(-1) > 0
            value = (mask.size, np.packbits(mask))
        self.acts.setdefault((module, call, what), deque(maxlen=8)).append((step, value))
        self.acts_version += 1

    def baseline_total(self, before: int) -> float | None:
        """Median of the first finite total norms seen before step ``before`` (None with fewer than 3)."""
        vals = [t for s, t in self.first_totals if s < before]
        # statistics.median: the same value as np.median on these <= 10 numbers, at a tenth of its cost per read
        return float(statistics.median(vals)) if len(vals) >= 3 else None

    def baseline_loss(self, before: int) -> float | None:
        vals = [v for s, v in self.first_losses if s < before]
        return float(statistics.median(vals)) if len(vals) >= 3 else None

    @property
    def baseline_grad(self) -> np.ndarray | None:
        """Median of each layer's first finite gradient norms (NaN where absent)."""
        if len(self.first_grads) < 3:
            return None
        g = np.stack(self.first_grads)
        return nanmedian(np.where(g == ABSENT, np.nan, g), axis=0)

    def rms_grad(self, rows: slice | np.ndarray) -> np.ndarray:
        """Root-mean-square gradient per element, per layer (NaN where the layer had no gradient)."""
        g = self.grad[rows]
        return np.where(g == ABSENT, np.nan, g) / np.sqrt(self.numel)

    def progress(self, end: int, window: int) -> float | None:
        """Relative loss improvement over the ``window`` steps ending at row ``end`` (exclusive).

        Returns:
            (mean of the first third - mean of the last third) / |mean of the first third|, or None when fewer
            than half the steps in the window observed a finite loss.
        """
        lo = max(0, end - window)
        seen = self.loss_seen[lo:end] & np.isfinite(self.loss[lo:end])
        if end - lo < window or seen.sum() < window // 2:
            return None
        vals = self.loss[lo:end][seen]
        third = max(1, len(vals) // 3)
        first, last = vals[:third].mean(), vals[-third:].mean()
        return float((first - last) / max(abs(first), 1e-12))

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue: running statistics and early baselines (plain Python values)."""
        return {
            "layers": list(self.layers),
            "grad_ema": vars(self.grad_ema).copy(),
            "loss_ema": vars(self.loss_ema).copy(),
            "finite_count": int(self.finite_count[-1]) if len(self.finite_count) else self.count0,
            "first_totals": [list(x) for x in self.first_totals],
            "first_losses": [list(x) for x in self.first_losses],
            "first_grads": [g.tolist() for g in self.first_grads],
            "exploded": list(self.exploded) if self.exploded is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pos = {n: i for i, n in enumerate(state["layers"])}
        perm = [pos[n] for n in self.layers]  # saved in the old layer order; ours may differ
        self.grad_ema = Ema(**state["grad_ema"])
        self.loss_ema = Ema(**state["loss_ema"])
        self.count0 = int(state["finite_count"])
        self.first_totals = [(int(s), float(t)) for s, t in state["first_totals"]]
        self.first_losses = [(int(s), float(v)) for s, v in state["first_losses"]]
        self.first_grads = [np.asarray(g, dtype=np.float64)[perm] for g in state["first_grads"]]
        exploded = state.get("exploded")  # absent in states saved before it existed
        self.exploded = (int(exploded[0]), float(exploded[1])) if exploded is not None else None

    def mark_exploded(self, step: int, loss_before: float) -> None:
        """Remember an exploding event at ``step``, the loss's running mean before it being ``loss_before``; of
        several, the one with the lowest level before it is kept (a second spike on a run the first one already
        threw back starts from the damaged level, and must not hide what the run had reached before)."""
        if np.isfinite(loss_before) and (self.exploded is None or loss_before < self.exploded[1]):
            self.exploded = (int(step), float(loss_before))


def clip_acted(total: float, clipped: float) -> bool:
    """Whether the configured clip cut a step's gradient: its norm after the clip is below the norm measured
    (beyond float32 rounding). NaN (no clip, or a non-finite step) is never a cut."""
    return bool(np.isfinite(total) and np.isfinite(clipped) and clipped < total * (1 - 1e-6))


def loss_stalled(h: History, t: Thresholds) -> tuple[bool, float | None]:
    """Whether the loss stopped improving over the last ``t.window`` steps, and the relative improvement.

    A loss that already fell below ``t.learned`` of its early level has converged: the small gradients of a
    fitted model are not a stall (found as false alarms in experiments/seeds.py). Without an observed loss the
    progress is None and the run counts as stalled (callers ask for stronger evidence then).
    """
    return h.memo(("loss_stalled", t.window, t.learned, t.progress), lambda: _loss_stalled(h, t))


def _loss_stalled(h: History, t: Thresholds) -> tuple[bool, float | None]:
    prog = h.progress(len(h.steps), t.window)
    if prog is not None and h.first_losses:
        # the median, as for baseline_loss: one exploding first step (an IRNN's loss of 2375 at step 1 on the
        # adding problem) must not make a plateau at the trivial loss look like 1% of the early level
        early = float(statistics.median([v for _, v in h.first_losses]))
        window = slice(max(0, len(h.steps) - t.window), len(h.steps))
        seen = h.loss_seen[window] & np.isfinite(h.loss[window])
        if early > 0 and seen.any() and float(np.mean(h.loss[window][seen])) < t.learned * early:
            return False, prog
    return (prog is None or prog < t.progress), prog


def explained_by_explosion(h: History, t: Thresholds) -> tuple[int, float, float] | None:
    """Whether the loss of the last ``t.window`` steps sits above the level it had before a reported exploding
    event, by more than three standard errors of its mean: the run has not recovered from the explosion.

    A tanh RNN thrown over a cliff by an exploding step saturates and stalls at chance with a gradient through
    time of 1e-8 (experiments/pascanu2013_clipping.py): the vanishing evidence is true, but its cause, and the
    remedy (clip, lower the learning rate), is the explosion. A run that never reached a lower loss is not
    explained this way.

    Returns:
        (step of the explosion, loss level before it, mean loss of the window), or None.
    """
    if h.exploded is None or not len(h.steps):
        return None
    step, before = h.exploded
    window = slice(max(0, len(h.steps) - t.window), len(h.steps))
    seen = h.loss_seen[window] & np.isfinite(h.loss[window]) & (h.steps[window] > step)
    if seen.sum() < max(2, t.spike_follow):
        return None  # too few losses after the explosion to say (as many as judged its damage are enough)
    vals = h.loss[window][seen]
    now = float(np.mean(vals))
    # Recovered means back within the batch-to-batch noise of the mean (a run that crawled back from chance to
    # 0.2 above its level before the cliff has not: experiments/pascanu2013_clipping.py, seed 8).
    noise = 3.0 * float(np.std(vals)) / np.sqrt(len(vals))
    return (step, before, now) if now - before > noise else None


def unit_mask(value: tuple[int, np.ndarray]) -> np.ndarray:
    """The per-unit bool mask of an "active" sample stored by ``History.add_act``."""
    units, packed = value
    return np.unpackbits(packed, count=units).astype(bool)

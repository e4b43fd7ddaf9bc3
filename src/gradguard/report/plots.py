"""The report's plots, drawn from a ``Run`` (``gradguard.report.load``), as base64 PNGs: the gradient norm
(before clipping, with the clip threshold) and the loss over time with diagnoses and actions, gradient flow per
layer, the gradient reaching the first and last time steps of recurrent layers, a steps x layers heatmap and
update-to-weight ratios. Helpers and what they promise: ``plotting``.

Room: the outputs. It may touch: ``report``.
"""

from __future__ import annotations

import math
from typing import Any

from .load import Run, clip_threshold, time_samples, update_samples
from .plotting import (
    NONFINITE_COLOUR,
    SEVERITY_COLOUR,
    finite,
    label,
    layer_ticks,
    legend_below,
    log_if_positive,
    mark_nonfinite,
    new_figure,
    nonfinite,
    plain,
    png,
    quiet_matplotlib,
    runs_of,
    series,
    step_axis,
)
from .records import number

ABSENT_COLOUR = "#d9d9d9"
ACTION_COLOUR = "#7d3c98"
MAX_COLUMNS = 1000  # heatmap columns; more logged steps than this are binned
UPDATE_LINES = 8  # layers drawn in colour in the update-ratio plot; the rest in grey
HEALTHY_UPDATE = 1e-3  # the update-to-weight ratio of healthy training (Karpathy's rule of thumb)


def _events(ax: Any, run: Run) -> list[Any]:
    """Diagnoses as vertical lines (colour = severity), skipped steps as grey bands, other actions (learning
    rate, rollback) as dotted lines; clips are drawn with their threshold instead. Returns legend handles."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles: list[Any] = []
    seen: set[str] = set()
    for d in run.diagnoses:
        colour = SEVERITY_COLOUR.get(d["severity"], "grey")
        ax.axvline(d["step"], color=colour, lw=1.2, alpha=0.8)
        sev = d["severity"] if d["severity"] in SEVERITY_COLOUR else "other severity"  # file text stays out
        if sev not in seen:
            seen.add(sev)
            handles.append(Line2D([], [], color=colour, lw=1.2, label=f"diagnosis ({sev})"))
    skipped = [a["step"] for a in run.actions if a["kind"] == "skip_step"]
    for lo, hi in runs_of(skipped):
        ax.axvspan(lo - 0.5, hi + 0.5, color="#7f8c8d", alpha=0.25, lw=0)
    if skipped:
        handles.append(Patch(color="#7f8c8d", alpha=0.25, label="steps skipped by gradguard"))
    other = [a for a in run.actions if a["kind"] not in ("skip_step", "clip")]
    for a in other:
        ax.axvline(a["step"], color=ACTION_COLOUR, lw=1, ls=":")
    if other:
        kinds = sorted({a["kind"].replace("_", " ") for a in other})
        handles.append(Line2D([], [], color=ACTION_COLOUR, lw=1, ls=":", label=plain(", ".join(kinds), 80)))
    return handles


def _reported(run: Run, keys: tuple[str, ...], logged: list[int]) -> list[tuple[int, float]]:
    """``(step, value)``: what exploding and non-finite diagnoses reported at their own step (the first of ``keys``
    in their evidence that is a finite number), for steps without a statistics line. A run can blow up within one
    read: its first line already non-finite, the explosion the diagnosis describes would not be drawn at all."""
    seen = set(logged)
    out: dict[int, float] = {}
    for d in run.diagnoses:
        if d["kind"] not in ("exploding", "nonfinite") or d["step"] in seen:
            continue
        for key in keys:
            value, ok = number(d["evidence"].get(key))
            if ok and value is not None and math.isfinite(value):
                out.setdefault(d["step"], value)
                break
    return sorted(out.items())


def _draw_reported(ax: Any, points: list[tuple[int, float]], colour: str) -> None:
    if points:
        ax.plot([s for s, _ in points], [v for _, v in points], ls="none", marker="D", ms=5, mfc="white",
                color=colour, label="between logged steps, as a diagnosis reported it")


def _norm_figure(run: Run, steps: list[int]) -> Any:
    """The total gradient norm over time (before clipping), its peak between reads, the clip threshold."""
    fig, ax = new_figure(10, 3.4)
    total = [r["total_grad_norm"] for r in run.stats]
    peak = [r["total_grad_norm_max"] for r in run.stats]
    fixed, points = clip_threshold(run)
    if any(finite(v) for v in peak) and any(p != t for p, t in zip(peak, total)):
        series(ax, steps, peak, "#aab7b8", "largest since the previous point", lw=1)
    what = "gradient norm before clipping" if points else "total gradient norm"
    series(ax, steps, total, "#1f618d", what)
    reported = _reported(run, ("total_grad_norm", "grad_norm"), steps)
    _draw_reported(ax, reported, "#1f618d")
    if fixed is not None:
        ax.axhline(fixed, color="#e67e22", ls="--", lw=1.2, label=f"clip threshold {fixed:.3g} "
                                                                    f"({len(points)} steps clipped)")
    elif points:
        ax.plot([p[0] for p in points], [p[1] for p in points], ls="none", marker="_", ms=8, color="#e67e22",
                label=f"clip threshold at each clipped step ({len(points)} steps)")
    # Log only over more than a decade: over less, a log axis only makes the tick labels hard to read.
    log_if_positive(ax, total + peak + [p[1] for p in points] + [v for _, v in reported], span=1)
    return _finish_over_steps(fig, ax, run, steps, reported, total, "gradient norm", "L2 norm over all layers")


def _loss_figure(run: Run, steps: list[int]) -> Any | None:
    """The observed loss over time; None when the loss was never observed."""
    loss = [r["loss"] for r in run.stats]
    if not any(v is not None for v in loss):
        return None
    fig, ax = new_figure(10, 2.8)
    drawn = series(ax, steps, loss, "#117a65", "loss")
    reported = _reported(run, ("loss",), steps)
    _draw_reported(ax, reported, "#117a65")
    if not drawn and not reported:  # an axis of made-up numbers around nothing would mislead
        ax.set_yticks([])
        ax.text(0.5, 0.45, "no finite loss value was logged", transform=ax.transAxes, ha="center", color="#555")
    log_if_positive(ax, loss + [v for _, v in reported], span=3)  # a divergence would flatten the rest to a line
    return _finish_over_steps(fig, ax, run, steps, reported, loss, "loss", "loss")


def _finish_over_steps(fig: Any, ax: Any, run: Run, steps: list[int], reported: list[tuple[int, float]],
                       values: list[Any], what: str, ylabel: str) -> Any:
    """What a plot over the optimizer steps ends with: non-finite marks, events, the step axis, labels, legend."""
    mark_nonfinite(ax, steps, values, what)
    handles = _events(ax, run)
    step_axis(ax, sorted(set(steps) | {s for s, _ in reported}))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    legend_below(fig, ax, handles)
    return fig


def flow_picks(run: Run) -> list[int]:
    """Rows shown in the gradient-flow plot: the first, middle and last; and the last with every layer finite
    when the last is not (the last healthy picture before the blow-up)."""
    n = len(run.stats)
    picks = {0, n // 2, n - 1}
    last = run.stats[-1]["grad_norm"]
    if any(nonfinite(v) for v in last.values()):
        clean = [i for i, r in enumerate(run.stats) if not any(nonfinite(v) for v in r["grad_norm"].values())]
        if clean:
            picks.add(clean[-1])
    return sorted(picks)


def _flow_figure(run: Run, layers: list[str]) -> Any:
    """One dot per layer per chosen step on a log axis: a dot's position is its norm (bars on a log axis would
    start at an arbitrary value and their lengths mean nothing)."""
    fig, ax = new_figure(10, min(12, max(2.6, 0.22 * len(layers) + 1.2)))
    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd"]
    picks = flow_picks(run)
    values = []
    for k, i in enumerate(picks):
        # Each step's dots sit a little above or below the layer's line, so equal norms at two steps stay visible.
        pos = [p + (k - (len(picks) - 1) / 2) * 0.12 for p in range(len(layers))]
        row = run.stats[i]
        ys = [row["grad_norm"].get(n) for n in layers]
        good = [v is not None and math.isfinite(v) and v > 0 for v in ys]
        values += [v for v, g in zip(ys, good) if g]
        xs = [v if g else math.nan for v, g in zip(ys, good)]
        bad = [p for p, v in zip(pos, ys) if nonfinite(v)]
        zero = [p for p, v in zip(pos, ys) if v is None or v == 0]
        note = []
        if bad:
            note.append(f"{len(bad)} non-finite")
        if zero:
            note.append(f"{len(zero)} without gradient")
        extra = f" ({', '.join(note)})" if note else ""
        ax.plot(xs, pos, color=colours[k % len(colours)], marker="o", ms=4, lw=1, label=f"step {row['step']}{extra}")
        trans = ax.get_yaxis_transform()  # x in axes coordinates: the right edge whatever the scale
        if bad:
            ax.plot([0.985] * len(bad), bad, ls="none", marker=">", ms=6, color=NONFINITE_COLOUR, transform=trans,
                    clip_on=False)
        if zero:
            ax.plot([0.015] * len(zero), zero, ls="none", marker="<", ms=6, mfc="none",
                    color=colours[k % len(colours)], transform=trans, clip_on=False)
    log_if_positive(ax, values, axis="x", span=1)
    layer_ticks(ax, layers)
    scale = " (log scale)" if ax.get_xscale() == "log" else ""
    ax.set_xlabel(f"gradient L2 norm of the layer{scale}; red \u25b6 on the right edge: non-finite, "
                  "\u25c1 on the left: no gradient")
    ax.grid(axis="x", alpha=0.3)
    legend_below(fig, ax)
    return fig


def _heatmap_figure(run: Run, layers: list[str], steps: list[int]) -> Any:
    """log10 gradient norm per layer and step; grey: no gradient, red: non-finite (both in the legend)."""
    import numpy as np
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    grid = np.full((len(layers), len(steps)), np.nan)
    state = np.zeros((len(layers), len(steps)))  # 0 finite and positive, 1 no gradient (or zero), 2 non-finite
    for j, row in enumerate(run.stats):
        for i, n in enumerate(layers):
            v = row["grad_norm"].get(n)
            if v is None or v == 0:
                state[i, j] = 1
            elif not math.isfinite(v) or v < 0:
                state[i, j] = 2
            else:
                grid[i, j] = math.log10(v)
    first_bad = next((steps[j] for j in range(len(steps)) if (state[:, j] == 2).any()), None)
    x = np.asarray(steps, dtype=float)
    if len(steps) > MAX_COLUMNS:
        # A long run has more logged steps than the image has pixels: each column becomes a bin of consecutive
        # steps showing its largest norm, red if any step in it was non-finite, grey only if none had a gradient.
        k = math.ceil(len(steps) / MAX_COLUMNS)
        pad = (-len(steps)) % k
        binned = np.pad(grid, ((0, 0), (0, pad)), constant_values=np.nan).reshape(len(layers), -1, k)
        grid = np.where(np.isfinite(binned).any(axis=2), np.nanmax(binned, axis=2), np.nan)
        flags = np.pad(state, ((0, 0), (0, pad)), constant_values=1).reshape(len(layers), -1, k)
        state = np.where((flags == 2).any(axis=2), 2, np.where((flags == 1).all(axis=2), 1, 0))
        x = np.array([x[min(j + k, len(x)) - 1] for j in range(0, len(x), k)])  # a bin is drawn at its last step
    # Each column spans halfway to its neighbours, so uneven logging intervals keep steps where they belong.
    if len(x) > 1:
        mids = (x[1:] + x[:-1]) / 2
        edges = np.concatenate([[x[0] - (mids[0] - x[0])], mids, [x[-1] + (x[-1] - mids[-1])]])
    else:
        edges = np.array([x[0] - 0.5, x[0] + 0.5])
    yedges = np.arange(len(layers) + 1) - 0.5
    fig, ax = new_figure(10, min(12, max(2.8, 0.2 * len(layers) + 1.4)))
    special = np.ma.masked_where(state == 0, state)
    ax.pcolormesh(edges, yedges, special, cmap=ListedColormap([ABSENT_COLOUR, NONFINITE_COLOUR]), vmin=1, vmax=2)
    handles = []
    if np.isfinite(grid).any():
        im = ax.pcolormesh(edges, yedges, np.ma.masked_invalid(grid), cmap="viridis")
        fig.colorbar(im, ax=ax, label="log10 gradient norm", pad=0.01)
    if (state == 1).any():
        handles.append(Patch(color=ABSENT_COLOUR, label="no gradient (unused layer, or exactly zero)"))
    if first_bad is not None:
        handles.append(Patch(color=NONFINITE_COLOUR, label=f"non-finite (NaN/Inf), first at step {first_bad}"))
    layer_ticks(ax, layers)
    ax.set_xlabel("optimizer step")
    legend_below(fig, ax, handles)
    return fig


def _update_figure(run: Run, layers: list[str]) -> Any | None:
    """Update-to-weight ratios at sampled steps: the layers farthest from 1e-3 named in colour, the rest grey;
    None when no step was sampled."""
    samples = update_samples(run)
    if not samples or not any(v is not None for _, u in samples for v in u.values()):
        return None
    xs = [s for s, _ in samples]

    def distance(name: str) -> float:
        """How far a layer's median ratio sits from the healthy 1e-3, in decades (non-finite: farthest)."""
        vals = [u.get(name) for _, u in samples]
        if any(nonfinite(v) for v in vals):
            return math.inf
        pos = sorted(v for v in vals if v is not None and math.isfinite(v) and v > 0)
        if not pos:  # every ratio 0: the weights never moved, as far from healthy as a layer gets
            return 1e9 if any(v == 0 for v in vals) else -1.0
        return round(abs(math.log10(pos[len(pos) // 2] / HEALTHY_UPDATE)), 6)  # ties: in layer order

    present = [n for n in layers if any(u.get(n) is not None for _, u in samples)]
    ranked = sorted(present, key=distance, reverse=True)
    shown, rest = ranked[:UPDATE_LINES], ranked[UPDATE_LINES:]
    fig, ax = new_figure(10, 3.4)
    from matplotlib import colormaps

    palette = colormaps["tab10"]
    values: list[float | None] = []
    for n in rest:  # behind the labelled lines, unlabelled: they are the ordinary ones
        ys = [u.get(n) for _, u in samples]
        values += ys
        series(ax, xs, ys, "#cfcfcf", "_", lw=0.8, positive_only=True)
    for k, n in enumerate(shown):
        ys = [u.get(n) for _, u in samples]
        values += ys
        series(ax, xs, ys, palette(k % 10), label(n), positive_only=True)
    if rest:
        ax.plot([], [], color="#cfcfcf", lw=0.8, label=f"{len(rest)} other layers (closer to 1e-3)")
    ax.axhline(HEALTHY_UPDATE, color="black", ls="--", lw=1, label="1e-3: typical of healthy training")
    bad = {s for s, u in samples if any(nonfinite(u.get(n)) for n in present)}
    mark_nonfinite(ax, xs, [math.nan if s in bad else 1.0 for s in xs], "update ratio")
    # A ratio of exactly 0 (the weights did not move) has no place on a log axis: mark it on the bottom edge.
    still = [s for s, u in samples if any(u.get(n) == 0 for n in present)]
    if still:
        ax.plot(still, [0.0] * len(still), ls="none", marker="^", ms=6, mfc="none", color="black",
                transform=ax.get_xaxis_transform(), clip_on=False, label="0: some layer's weights did not change")
    log_if_positive(ax, [v for v in values if v is None or v > 0] + [HEALTHY_UPDATE], span=1)
    ax.margins(y=0.1)
    step_axis(ax, sorted({r["step"] for r in run.stats} | set(xs)))
    ax.set_xlabel("optimizer step (sampled steps)")
    ax.set_ylabel("||w_after - w_before|| / ||w||")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return fig


def _time_figure(run: Run) -> Any | None:
    """The gradient reaching the first and the last 10% of the time steps of each recurrent module, at sampled
    steps, on a log axis: a gap that opens is vanishing through time, one that closes is the module learning to
    carry the gradient back. None when the run has no recurrent module."""
    samples = time_samples(run)
    if not samples:
        return None
    from matplotlib import colormaps

    palette = colormaps["tab10"]
    fig, ax = new_figure(10, 3.4)
    values: list[float | None] = []
    xs_all: set[int] = set()
    for k, (module, points) in enumerate(samples.items()):
        xs = [p[0] for p in points]
        early, late = [p[1] for p in points], [p[2] for p in points]
        xs_all.update(xs)
        values += early + late
        _, e, lt, steps = points[-1]
        span = f" of its {steps} time steps" if steps else " of its time steps"
        ratio = e / lt if e is not None and lt is not None and lt > 0 else math.nan
        now = f"; at step {xs[-1]}: {ratio:.2g}x the last" if math.isfinite(ratio) else ""
        series(ax, xs, early, palette(k % 10), f"{label(module)}: first 10%{span}{now}", positive_only=True)
        series(ax, xs, late, palette(k % 10), f"{label(module)}: last 10%", lw=1, positive_only=True, ls="--")
        zero = [x for x, v in zip(xs, early) if v == 0]
        if zero:  # below float32's range: no place on a log axis, so on the bottom edge
            ax.plot(zero, [0.0] * len(zero), ls="none", marker="^", ms=6, mfc="none", color=palette(k % 10),
                    transform=ax.get_xaxis_transform(), clip_on=False,
                    label=f"{label(module)}: 0 (below float32 range)")
    log_if_positive(ax, [v for v in values if v is None or v > 0])
    bad = {x for pts in samples.values() for x, e, lt, _ in pts if nonfinite(e) or nonfinite(lt)}
    xs_sorted = sorted(xs_all)
    mark_nonfinite(ax, xs_sorted, [math.nan if x in bad else 1.0 for x in xs_sorted], "gradient")
    handles = _events(ax, run)
    step_axis(ax, sorted({r["step"] for r in run.stats} | xs_all))
    ax.set_xlabel("optimizer step (sampled steps)")
    ax.set_ylabel("gradient norm per time step")
    legend_below(fig, ax, handles)
    return fig


def draw(run: Run) -> dict[str, Any]:
    """The report's plots as matplotlib Figures, keyed by section ("norm", "loss", "flow", "time", "heatmap",
    "update");
    empty when the run recorded no step. Call inside ``quiet_matplotlib()`` (``figures`` does).

    Raises:
        ReportError: matplotlib is not installed.
    """
    figs: dict[str, Any] = {}
    if not run.stats:
        return figs
    steps = [r["step"] for r in run.stats]
    layers = run.layers
    figs["norm"] = _norm_figure(run, steps)
    loss = _loss_figure(run, steps)
    if loss is not None:
        figs["loss"] = loss
    if layers:
        figs["flow"] = _flow_figure(run, layers)
        time = _time_figure(run)
        if time is not None:
            figs["time"] = time
        figs["heatmap"] = _heatmap_figure(run, layers, steps)
        update = _update_figure(run, layers)
        if update is not None:
            figs["update"] = update
    return figs


def figures(run: Run) -> dict[str, str]:
    """The report's plots as base64 PNGs, keyed by section (see ``draw``).

    Raises:
        ReportError: matplotlib is not installed.
    """
    with quiet_matplotlib():  # around the drawing too: matplotlib lays text out and warns only when saving
        return {key: png(fig) for key, fig in draw(run).items()}

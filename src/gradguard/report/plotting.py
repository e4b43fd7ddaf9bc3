"""Drawing helpers for the report's plots: safe text, quiet matplotlib, and series that show gaps, lone points
and non-finite values honestly (``gradguard.report.plots`` draws the figures with them).

matplotlib is an optional extra (``gradguard[report]``) imported here only, when drawing. Figures are made with
``matplotlib.figure.Figure`` and never through pyplot, so drawing a report inside a notebook or a training script
neither changes the user's backend nor leaves figures open.

What the plots promise a reader:

- Non-finite values are never a gap or a line shooting off: a red band and red marks on the top edge, and the first
  one labelled "non-finite from step N".
- A point without neighbours (one logged step, one sample) is drawn as a marker, not left invisible.
- Layer names are text, never math: a layer named ``$x$`` or ``_hidden`` is shown as it is written.

Room: the outputs. It may touch: ``report``.
"""

from __future__ import annotations

import base64
import io
import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from .load import ReportError

SEVERITY_COLOUR = {"error": "#c0392b", "warning": "#d68910", "info": "#2874a6"}
NONFINITE_COLOUR = "#e31a1c"
ROOT = "(root)"
MAX_LABEL = 40  # characters of a layer name in a plot (the HTML shows it whole)


def label(name: str) -> str:
    """A layer name as a plot label: the model's own parameters are "(root)"; long names are shortened.

    A "$" is escaped: matplotlib reads text between two "$" as math (``$\\frac{a}{$`` raises), and "\\$" is its
    literal dollar. Math text stays on for everything else, since log-axis tick labels are written in it.
    matplotlib's legend hides labels that start with "_", so such a name gets a leading space.
    """
    return plain(name or ROOT)


def plain(text: str, limit: int = MAX_LABEL) -> str:
    """Text from the run's files as matplotlib text: shortened, "$" escaped, no leading "_" (see ``label``)."""
    if len(text) > limit:
        text = text[: limit - 1] + "\u2026"
    text = text.replace("$", "\\$")
    return " " + text if text.startswith("_") else text


@contextmanager
def quiet_matplotlib() -> Iterator[Any]:
    """matplotlib with settings that make any text safe, and without warnings reaching the user's console.

    ``text.usetex`` off: a user's matplotlibrc could switch LaTeX on, which chokes on "_", "%" and "$" in layer
    names (``label`` makes names safe for matplotlib's own math text).
    The warnings silenced are ours (log axes over NaN, glyphs missing for a layer named in another script), not
    the user's training code's.
    """
    try:
        import matplotlib
        import numpy as np
    except ImportError as e:
        raise ReportError("the HTML report draws its plots with matplotlib: pip install 'gradguard[report]'") from e
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        with matplotlib.rc_context({"text.usetex": False, "font.size": 9,
                                    "axes.spines.top": False, "axes.spines.right": False}):
            yield matplotlib


def new_figure(width: float, height: float) -> tuple[Any, Any]:
    """A figure (constrained layout: legends below the axes get their room) and its one axes."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.add_subplot()


def png(fig: Any) -> str:
    """The figure as a base64 PNG, for an inline ``data:`` image (the page fetches nothing)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def finite(v: float | None) -> bool:
    """A number that is neither absent (None) nor NaN/Inf."""
    return v is not None and math.isfinite(v)


def nonfinite(v: float | None) -> bool:
    """NaN or Inf (absent, None, is not non-finite: it was not measured)."""
    return v is not None and not math.isfinite(v)


def series(ax: Any, steps: Sequence[int], values: Sequence[float | None], colour: Any, name: str,
           lw: float = 1.5, positive_only: bool = False, ls: str = "-") -> bool:
    """Draw one series: a line through consecutive finite values (broken at gaps and NaN/Inf, which
    ``_mark_nonfinite`` marks), with a marker on every point of a short series and on each point of a long one
    that has no finite neighbour (``ls``: the line style). Returns True if anything finite was drawn."""
    ok = [v is not None and math.isfinite(v) and (not positive_only or v > 0) for v in values]
    ys = [v if good else math.nan for v, good in zip(values, ok)]  # NaN breaks the line: no line across a gap
    many = sum(ok) > 80  # a marker on every point of a long series only blurs it
    ax.plot(steps, ys, color=colour, lw=lw, ls=ls, label=name, marker=None if many else "o", ms=2.5)
    lone = [i for i in range(len(ys)) if ok[i] and not (i > 0 and ok[i - 1]) and not (i + 1 < len(ys) and ok[i + 1])]
    if lone and many:  # lone points of a long series: the line has no length there, so mark them
        ax.plot([steps[i] for i in lone], [ys[i] for i in lone], ls="none", marker="o", ms=3.5, color=colour)
    return any(ok)


def mark_nonfinite(ax: Any, steps: Sequence[int], values: Sequence[float | None], what: str) -> int | None:
    """Where values are NaN/Inf: a light red band over the steps, red marks on the top edge, and
    "WHAT non-finite from step N" at the first. Returns that first step."""
    bad = [i for i, v in enumerate(values) if nonfinite(v)]
    if not bad:
        return None
    gaps = [b - a for a, b in zip(steps, steps[1:]) if b > a]
    half = (sorted(gaps)[len(gaps) // 2] if gaps else 1) / 2  # half a logging interval on each side of a point
    for lo, hi in runs_of(bad):
        ax.axvspan(steps[lo] - half, steps[hi] + half, color=NONFINITE_COLOUR, alpha=0.08, lw=0)
    trans = ax.get_xaxis_transform()  # x in data, y in axes coordinates: the top edge whatever the scale
    ax.plot([steps[i] for i in bad], [1.0] * len(bad), ls="none", marker="v", ms=5, color=NONFINITE_COLOUR,
            transform=trans, clip_on=False, label=f"{what}: NaN or Inf")
    ax.annotate(f"{what} non-finite from step {steps[bad[0]]}", xy=(steps[bad[0]], 1.0), xycoords=trans,
                xytext=(3, -13), textcoords="offset points", color=NONFINITE_COLOUR, fontsize=8, fontweight="bold",
                bbox={"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.8})  # legible over a line
    return steps[bad[0]]


def legend_below(fig: Any, ax: Any, extra: Sequence[Any] = ()) -> None:
    """One legend below the plot, where it hides no data."""
    handles = list(ax.get_legend_handles_labels()[0]) + list(extra)
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=min(3, len(handles)), fontsize=7.5,
                   frameon=False)


def step_axis(ax: Any, steps: Sequence[int]) -> None:
    """The same step range on every plot over time (a single sample would otherwise get an axis of its own)."""
    from matplotlib.ticker import MaxNLocator

    pad = max(0.5, 0.02 * (steps[-1] - steps[0]))
    ax.set_xlim(steps[0] - pad, steps[-1] + pad)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers: no tick at step 0.25


def log_if_positive(ax: Any, values: Sequence[float | None], axis: str = "y", span: float = 0.0) -> bool:
    """Log scale when every finite value is positive (and they span more than ``span`` decades)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite or min(finite) <= 0:
        return False
    if span and math.log10(max(finite) / min(finite)) <= span:
        return False
    (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
    return True


def runs_of(steps: Sequence[int]) -> list[tuple[int, int]]:
    """Runs of consecutive step numbers: [3, 4, 5, 9] -> [(3, 5), (9, 9)]."""
    out: list[tuple[int, int]] = []
    for s in sorted(set(steps)):
        if out and s == out[-1][1] + 1:
            out[-1] = (out[-1][0], s)
        else:
            out.append((s, s))
    return out


def layer_ticks(ax: Any, layers: list[str]) -> None:
    """Layer names on the y axis (at most ~40 of them, evenly thinned), first layer at the top."""
    every = max(1, math.ceil(len(layers) / 40))
    pos = list(range(0, len(layers), every))
    ax.set_yticks(pos, [label(layers[i]) for i in pos], fontsize=7 if len(layers) > 12 else 8)
    ax.set_ylim(len(layers) - 0.5, -0.5)

"""``gradguard report RUN_DIR``: one self-contained HTML file (plots inlined as PNG, no script, no network) that
a person reads at a glance: total norm and loss over time with diagnosis and action markers, gradient flow per
layer, a steps x layers heatmap of gradient norms, update-to-weight ratios, and the diagnoses with their evidence.

Reads run directories written by ``gradguard run`` and by ``Guard(log_dir=...)`` (schema in
``gradguard.report.sinks``). Needs matplotlib (``pip install 'gradguard[report]'``), imported only here.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = 1
SEVERITY_COLOUR = {"error": "#c0392b", "warning": "#d68910", "info": "#2874a6"}


class ReportError(Exception):
    """The run directory cannot be reported on (missing, not a run, other schema): the message says why."""


@dataclass
class Run:
    """What a run directory holds."""

    path: Path
    meta: dict[str, Any]
    stats: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def layers(self) -> list[str]:
        return [lay["name"] for lay in self.meta.get("layers", [])]

    @property
    def diagnoses(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("type") == "diagnosis"]

    @property
    def actions(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("type") == "action"]


def _num(x: Any) -> float:
    """JSON numbers, and the strings "nan"/"inf"/"-inf" the sinks write for non-finite values."""
    if x is None:
        return math.nan
    if isinstance(x, str):
        return float(x)
    return float(x)


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            # A process killed mid-write leaves at most a partial last line: keep everything before it.
            if i == len(path.read_text(encoding="utf-8").splitlines()):
                break
            raise ReportError(f"{path} line {i} is not JSON") from None
    return out


def load_run(run_dir: str | Path) -> Run:
    """Read a run directory.

    Raises:
        ReportError: not a directory, no meta.json, or a schema this version cannot read.
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise ReportError(f"{path} is not a directory")
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        subs = sorted(p.parent.name for p in path.glob("*/meta.json"))
        hint = f" (it holds runs: {', '.join(subs)})" if subs else ""
        raise ReportError(f"{path} is not a gradguard run directory: it has no meta.json{hint}")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ReportError(f"{meta_path} is not valid JSON: {e}") from e
    if meta.get("schema") != SCHEMA:
        raise ReportError(f"{path} was written with log schema {meta.get('schema')!r}; this gradguard reads schema "
                          f"{SCHEMA}. Use the gradguard version that wrote it.")
    return Run(path, meta, _jsonl(path / "stats.jsonl"), _jsonl(path / "events.jsonl"))


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _markers(ax: Any, run: Run) -> None:
    for d in run.diagnoses:
        ax.axvline(d["step"], color=SEVERITY_COLOUR.get(d["severity"], "grey"), lw=1, alpha=0.7)
    for a in run.actions:
        ax.axvline(a["step"], color="#7d3c98", lw=0.8, ls=":", alpha=0.8)


def figures(run: Run) -> dict[str, str]:
    """The report's plots as base64 PNGs, keyed by section."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display: files only
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError as e:
        raise ReportError("the HTML report draws its plots with matplotlib: pip install 'gradguard[report]'") from e

    figs: dict[str, str] = {}
    steps = [s["step"] for s in run.stats]
    layers = run.layers
    if not run.stats:
        return figs

    total = [_num(s.get("total_grad_norm")) for s in run.stats]
    peak = [_num(s.get("total_grad_norm_max", s.get("total_grad_norm"))) for s in run.stats]
    fig, ax = plt.subplots(figsize=(9, 3))
    ax.plot(steps, peak, color="#aab7b8", lw=1, label="max since previous line")
    ax.plot(steps, total, color="#1f618d", lw=1.5, label="total gradient norm")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    _markers(ax, run)
    ax.legend(loc="upper left", fontsize=8)
    figs["norm"] = _png(fig)

    loss = [_num(s.get("loss")) for s in run.stats]
    if any(math.isfinite(v) for v in loss):
        fig, ax = plt.subplots(figsize=(9, 2.6))
        ax.plot(steps, loss, color="#117a65")
        finite = [v for v in loss if math.isfinite(v)]
        if finite and min(finite) > 0 and max(finite) / min(finite) > 1e3:
            ax.set_yscale("log")  # a divergence would flatten everything else to a line
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        _markers(ax, run)
        figs["loss"] = _png(fig)

    grid = np.array([[_num(s["grad_norm"].get(n)) for n in layers] for s in run.stats], dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        logg = np.log10(np.where(grid > 0, grid, np.nan))
    picks = sorted({0, len(steps) // 2, len(steps) - 1})
    fig, ax = plt.subplots(figsize=(9, max(2.5, 0.18 * len(layers) + 1)))
    width = 0.8 / len(picks)
    pos = np.arange(len(layers))
    for k, i in enumerate(picks):
        ax.barh(pos + k * width, np.nan_to_num(grid[i], nan=0.0), height=width, label=f"step {steps[i]}")
    ax.set_xscale("log")
    ax.set_yticks(pos + width * (len(picks) - 1) / 2, [n or "(root)" for n in layers], fontsize=7)
    ax.invert_yaxis()  # input at the top, output at the bottom
    ax.set_xlabel("gradient L2 norm (log scale)")
    ax.legend(fontsize=8)
    figs["flow"] = _png(fig)

    fig, ax = plt.subplots(figsize=(9, max(2.5, 0.18 * len(layers) + 1)))
    im = ax.imshow(logg.T, aspect="auto", cmap="viridis", interpolation="nearest",
                   extent=(steps[0], steps[-1], len(layers) - 0.5, -0.5))
    ax.set_yticks(range(len(layers)), [n or "(root)" for n in layers], fontsize=7)
    ax.set_xlabel("optimizer step")
    fig.colorbar(im, ax=ax, label="log10 gradient norm")
    figs["heatmap"] = _png(fig)

    sampled = [s for s in run.stats if s.get("update_ratio")]
    if sampled:
        fig, ax = plt.subplots(figsize=(9, 3))
        xs = [s["sample_step"] for s in sampled]
        for n in layers:
            ys = [_num(s["update_ratio"].get(n)) for s in sampled]
            ax.plot(xs, ys, lw=1, alpha=0.8)
        ax.axhline(1e-3, color="black", ls="--", lw=1, label="~1e-3: healthy")
        ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("||dw|| / ||w|| per layer")
        ax.legend(fontsize=8)
        figs["update"] = _png(fig)
    return figs


def render(run: Run) -> str:
    """The report as one HTML string."""
    figs = figures(run)
    meta = run.meta
    e = html.escape
    counts: dict[str, int] = {}
    for d in run.diagnoses:
        counts[d["kind"]] = counts.get(d["kind"], 0) + 1
    summary = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "none"
    last = run.stats[-1]["step"] if run.stats else 0

    def img(key: str, title: str, note: str) -> str:
        if key not in figs:
            return ""
        return (f"<section><h2>{e(title)}</h2><p class=note>{e(note)}</p>"
                f"<img alt='{e(title)}' src='data:image/png;base64,{figs[key]}'></section>")

    rows = []
    for d in run.diagnoses:
        ev = ", ".join(f"{k}={v:.3g}" if isinstance(v, (int, float)) else f"{k}={v}" for k, v in d["evidence"].items())
        fixes = "".join(f"<li>{e(r)}</li>" for r in d.get("remedies", []))
        layers = ", ".join(d["layers"][:6]) + (" ..." if len(d["layers"]) > 6 else "")
        rows.append(f"<tr><td>{d['step']}</td><td class='{e(d['severity'])}'>{e(d['severity'])}</td>"
                    f"<td>{e(d['kind'])}</td><td>{e(layers)}</td><td>{e(d['message'])}<br><small>{e(ev)}</small>"
                    f"</td><td><ol>{fixes}</ol></td></tr>")
    for a in run.actions:
        rows.append(f"<tr><td>{a['step']}</td><td>action</td><td>{e(a['kind'])}</td><td></td>"
                    f"<td>{e(json.dumps(a.get('detail', {})))}</td><td></td></tr>")
    table = ("<table><tr><th>step</th><th>severity</th><th>kind</th><th>layers</th><th>what happened</th>"
             "<th>what to do</th></tr>" + "".join(rows) + "</table>") if rows else "<p>No diagnoses: a healthy run.</p>"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>gradguard report: {e(str(meta.get('model')))}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1000px; color: #222; }}
h1 {{ font-size: 1.5em; }} h2 {{ font-size: 1.15em; margin-top: 1.6em; }} .note {{ color: #555; margin: 0.2em 0; }}
img {{ max-width: 100%; }} table {{ border-collapse: collapse; width: 100%; font-size: 0.9em; }}
td, th {{ border: 1px solid #ccc; padding: 0.4em; vertical-align: top; text-align: left; }}
.error {{ color: #c0392b; font-weight: bold; }} .warning {{ color: #d68910; font-weight: bold; }}
.info {{ color: #2874a6; }} dl {{ display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; }}
</style></head><body>
<h1>gradguard report</h1>
<dl><dt>model</dt><dd>{e(str(meta.get('model')))} ({len(run.layers)} layers)</dd>
<dt>optimizer</dt><dd>{e(str(meta.get('optimizer')))}</dd><dt>steps</dt><dd>{last + 1 if run.stats else 0}</dd>
<dt>started</dt><dd>{e(str(meta.get('started')))}</dd>
<dt>versions</dt><dd>gradguard {e(str(meta.get('gradguard')))}, torch {e(str(meta.get('torch')))}</dd>
<dt>diagnoses</dt><dd>{e(summary)}</dd></dl>
<section><h2>Diagnoses and actions</h2>{table}</section>
{img("norm", "Total gradient norm", "Vertical lines: diagnoses (red error, orange warning, blue info); "
     "dotted: actions.")}
{img("loss", "Loss", "As passed to guard.observe_loss (absent when the loss was not observed).")}
{img("flow", "Gradient flow per layer", "Gradient norm of each layer (input at the top) at three steps; bars "
     "shrinking toward the top are vanishing gradients, growing ones exploding.")}
{img("heatmap", "Gradient norms, steps x layers", "log10 of each layer's gradient norm at every logged step.")}
{img("update", "Update-to-weight ratio", "||w_after - w_before|| / ||w|| per layer at sampled steps.")}
</body></html>
"""


def write_report(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Write the HTML report of ``run_dir`` and return its path (default ``RUN_DIR/report.html``).

    Raises:
        ReportError: see ``load_run``; or the output cannot be written.
    """
    run = load_run(run_dir)
    out = Path(output) if output else run.path / "report.html"
    try:
        out.write_text(render(run), encoding="utf-8")
    except OSError as e:
        raise ReportError(f"cannot write {out}: {e.strerror or e}") from e
    return out


def summary(run: Run) -> str:
    """A few lines for the console."""
    lines = [f"{run.path}: {run.meta.get('model')} + {run.meta.get('optimizer')}, "
             f"{run.stats[-1]['step'] + 1 if run.stats else 0} steps, {len(run.diagnoses)} diagnosis(es)"]
    for d in run.diagnoses:
        lines.append(f"  step {d['step']} {d['severity']} {d['kind']}: {', '.join(d['layers'][:3])}")
    return "\n".join(lines)

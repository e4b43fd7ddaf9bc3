"""``gradguard report RUN_DIR``: one self-contained HTML file (plots inlined as PNG, no script, no network) that
a person reads at a glance: a verdict that gives each kind of problem in one line (when, what, in which layers,
what to do first) and says what was judged and what could not be, the diagnoses with their evidence, what repair
did (as stretches of steps, in words), and plots of the gradient norm (before clipping, with the clip threshold),
the loss, gradient flow per layer, the gradient reaching the first and the last time steps of recurrent layers
(vanishing through time), a steps x layers heatmap and update-to-weight ratios.

Reads run directories written by ``gradguard run`` and by ``Guard(log_dir=...)`` (schema in
``gradguard.report.sinks``) in any state: lines that cannot be used are skipped and listed in the report
(``gradguard.report.load``). Every value from the files is HTML-escaped where it is written into the page: the
files are input, and a layer name, a message or a hand-edited step can hold markup.
Plots need matplotlib (``pip install 'gradguard[report]'``), imported only when drawing.

Room: the outputs. It may touch: ``report``.
"""

from __future__ import annotations

import html
import sys
from pathlib import Path
from typing import Any, TextIO

from .load import SCHEMA, Note, ReportError, Run, clip_threshold, load_run
from .plots import figures
from .plotting import ROOT, SEVERITY_COLOUR
from .records import plural
from .words import action_counts, as_text, describe, fmt, leads, stretches, verdict

__all__ = ["SCHEMA", "Note", "ReportError", "Run", "figures", "load_run", "render", "report_command", "summary",
           "write_report"]

MAX_NOTES_SHOWN = 50  # in the page; a file of garbage should not bury the report under its notes
MAX_NOTES_PRINTED = 5  # on the console
MAX_LAYERS_SHOWN = 6


def esc(x: Any) -> str:
    """Any value as escaped HTML text (strings as they are, numbers and the rest as text)."""
    return html.escape(x if isinstance(x, str) else str(x), quote=True)


# ---------------------------------------------------------------------------------------------------- page


def _layers_text(layers: list[str]) -> str:
    shown = [n or ROOT for n in layers[:MAX_LAYERS_SHOWN]]
    more = len(layers) - MAX_LAYERS_SHOWN
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def _diagnosis_rows(run: Run) -> str:
    rows = []
    for d in sorted(run.diagnoses, key=lambda d: d["step"]):
        ev = ", ".join(f"{fmt(k)} = {fmt(v)}" for k, v in d["evidence"].items())
        fixes = "".join(f"<li>{esc(r)}</li>" for r in d["remedies"])
        sev = d["severity"] if d["severity"] in SEVERITY_COLOUR else "unknown"
        rows.append(f"<tr><td class=short>{esc(d['step'])}</td><td class='short {sev}'>{esc(d['severity'])}</td>"
                    f"<td class=short>{esc(d['kind'])}</td><td class=layers>{esc(_layers_text(d['layers']))}</td>"
                    f"<td>{esc(d['message'])}" + (f"<br><small>evidence: {esc(ev)}</small>" if ev else "")
                    + f"</td><td class=fix>{f'<ol>{fixes}</ol>' if fixes else ''}</td></tr>")
    return ("<table><tr><th>step</th><th>severity</th><th>kind</th><th>layers</th><th>what happened</th>"
            "<th>what to do</th></tr>" + "".join(rows) + "</table>")


def _leads(run: Run) -> str:
    """Each kind of problem in one line, in the order found: when, what, in which layers, what to do."""
    items = []
    for x in leads(run):
        sev = x["severity"] if x["severity"] in SEVERITY_COLOUR else "unknown"
        where = f" in <b>{esc(x['where'])}</b>" if x["where"] else ""
        fix = f"<br><span class=todo>What to do: {esc(x['fix'])}</span>" if x["fix"] else ""
        items.append(f"<li><b class={sev}>{esc(x['when'])}: {esc(x['kind'])}</b>{where}. {esc(x['what'])}{fix}</li>")
    return f"<ol class=leads>{''.join(items)}</ol><p class=judged>What was judged:</p>" if items else ""


def _actions_section(run: Run) -> str:
    if not run.actions:
        return ""
    items = "".join(f"<li>{esc(describe(kind, acts))}</li>" for kind, acts in stretches(run.actions))
    return (f"<section><h2>What gradguard did</h2><p>{esc(action_counts(run.actions))}.</p>"
            f"<ul class=actions>{items}</ul></section>")


def _notes_section(notes: list[Note]) -> str:
    if not notes:
        return ""
    items = "".join(f"<li>{esc(n)}</li>" for n in notes[:MAX_NOTES_SHOWN])
    more = len(notes) - MAX_NOTES_SHOWN
    if more > 0:
        items += f"<li>and {more:,} more</li>"
    return (f"<section><h2>Problems reading this run directory</h2><p class=note>{plural(len(notes), 'thing')} in "
            f"the files could not be used as written; the report shows everything else.</p><ul>{items}</ul></section>")


FIGURES = (
    ("norm", "Gradient norm", "The L2 norm of all gradients together at each logged step, as gradguard measured "
     "it (before gradguard's own clipping; the dashed line is its threshold when it clipped). Vertical lines: "
     "diagnoses, coloured by severity; grey bands: steps gradguard skipped; dotted: learning-rate changes and "
     "rollbacks; red \u25bc on the top edge: NaN or Inf; hollow \u25c7: the value a diagnosis reported at a step "
     "between two logged ones."),
    ("loss", "Loss", "The loss of each logged step: what the script called .backward() on, or what it passed to "
     "guard.observe_loss (absent when neither was seen); red \u25bc on the top edge: NaN or Inf; hollow "
     "\u25c7: the value a diagnosis reported at a step between two logged ones."),
    ("flow", "Gradient flow per layer", "Each layer's gradient norm (first layer at the top) at a few steps, one "
     "colour per step. Norms that shrink toward the top are vanishing gradients; norms that grow, exploding."),
    ("time", "Gradient through time", "For each recurrent layer (RNN, LSTM, GRU): the gradient that reaches one "
     "time step of its input, averaged over the first 10% of the sequence (solid) and over the last 10% (dashed), "
     "at sampled steps (log scale). A solid line far below its dashed one is vanishing through time: the start of "
     "each sequence barely affects learning (gradguard warns below 1e-3x). Lines that come together: the layer "
     "learned to carry the gradient back, and the warning no longer holds."),
    ("heatmap", "Gradient norms, steps x layers", "log10 of each layer's gradient norm at every logged step. Grey "
     "cells: the layer had no gradient (unused at that step, or exactly zero); red cells: NaN or Inf."),
    ("update", "Update-to-weight ratio", "How much one optimizer step changes a layer's weights, relative to their "
     "size (||w_after - w_before|| / ||w||) at sampled steps. Near 1e-3 is typical; far below, the layer barely "
     "learns; far above, it is unstable. The layers farthest from 1e-3 are drawn in colour and named."),
)

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1000px; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 1.6em; } .note { color: #555; margin: 0.2em 0; }
img { max-width: 100%; } table { border-collapse: collapse; width: 100%; font-size: 0.9em; }
td, th { border: 1px solid #ccc; padding: 0.4em; vertical-align: top; text-align: left; overflow-wrap: break-word; }
td.short { white-space: nowrap; } td.layers { max-width: 12em; } td.fix { width: 35%; }
.error { color: #c0392b; font-weight: bold; } .warning { color: #b9770e; font-weight: bold; }
.info { color: #2874a6; } .ok { color: #1e8449; font-weight: bold; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; }
dd { margin: 0; overflow-wrap: break-word; min-width: 0; }
.verdict { border-left: 5px solid #999; padding: 0.3em 1em; background: #f7f7f7; }
.verdict.error { border-color: #c0392b; } .verdict.warning { border-color: #d68910; }
.verdict.info { border-color: #2874a6; } .verdict.ok { border-color: #1e8449; }
.verdict ul, .verdict ol, .judged { color: #222; font-weight: normal; }
.leads li { margin: 0.5em 0; } .todo { color: #1e8449; } .judged { margin: 0.8em 0 0; color: #555; }
"""


def render(run: Run) -> str:
    """The report as one HTML string.

    Raises:
        ReportError: matplotlib is not installed (and the run has steps to plot).
    """
    figs = figures(run)
    meta = run.meta
    head, findings, css = verdict(run)
    steps = run.stats[-1]["step"] + 1 if run.stats else 0

    sections = []
    for key, title, note in FIGURES:
        if key in figs:
            sections.append(f"<section><h2>{esc(title)}</h2><p class=note>{esc(note)}</p>"
                            f"<img alt='{esc(title)}' src='data:image/png;base64,{figs[key]}'></section>")
    if run.diagnoses:
        diagnoses = _diagnosis_rows(run)
    elif run.stats:
        diagnoses = "<p>None were raised (see the verdict above for what was judged).</p>"
    else:
        diagnoses = "<p>None.</p>"
    fixed, _ = clip_threshold(run)
    versions = ", ".join(f"{k} {as_text(meta.get(k))}" for k in ("gradguard", "torch", "python") if k in meta)
    layers = f"{len(run.layers)} layer{'' if len(run.layers) == 1 else 's'} with parameters"
    # null is what a Guard without an optimizer writes (a hand-written update); a missing key is not known
    optimizer = ("none (the loop updates its weights itself)" if "optimizer" in meta and meta["optimizer"] is None
                 else as_text(meta.get("optimizer")))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>gradguard report: {esc(as_text(meta.get('model')))}</title>
<style>{STYLE}</style></head><body>
<h1>gradguard report</h1>
<dl><dt>model</dt><dd>{esc(as_text(meta.get('model')))} ({layers})</dd>
<dt>optimizer</dt><dd>{esc(optimizer)}</dd>
<dt>steps</dt><dd>{steps:,}</dd>
<dt>started</dt><dd>{esc(as_text(meta.get('started')))}</dd>
<dt>versions</dt><dd>{esc(versions or 'unknown')}</dd>
<dt>run directory</dt><dd>{esc(str(run.path))}</dd>
{f"<dt>clipping</dt><dd>at norm {esc(fmt(fixed))}</dd>" if fixed is not None else ""}</dl>
<section class="verdict {css}"><h2 class={css}>{esc(head)}</h2>
{_leads(run)}<ul>{"".join(f"<li>{esc(x)}</li>" for x in findings)}</ul></section>
{_notes_section(run.notes)}
<section><h2>Diagnoses</h2>{diagnoses}</section>
{_actions_section(run)}
{"".join(sections)}
</body></html>
"""


def write_report(run_dir: str | Path, output: str | Path | None = None, run: Run | None = None) -> Path:
    """Write the HTML report of ``run_dir`` and return its path (default ``RUN_DIR/report.html``).

    Args:
        run_dir: the run directory.
        output: the HTML file to write.
        run: the run, when already loaded (saves reading it twice).

    Raises:
        ReportError: see ``load_run``; matplotlib missing; or the output cannot be written.
    """
    run = run if run is not None else load_run(run_dir)
    out = Path(output) if output else run.path / "report.html"
    page = render(run)
    try:
        out.write_text(page, encoding="utf-8")
    except OSError as e:
        raise ReportError(f"cannot write {out}: {e.strerror or e}") from None
    return out


def summary(run: Run) -> str:
    """A few lines for the console: the run, its verdict, its diagnoses."""
    steps = run.stats[-1]["step"] + 1 if run.stats else 0
    head, _, _ = verdict(run)
    lines = [f"{run.path}: {as_text(run.meta.get('model'))} + {as_text(run.meta.get('optimizer'))}, {steps:,} steps, "
             f"{plural(len(run.diagnoses), 'diagnosis', 'diagnoses')}: {head}"]
    for d in sorted(run.diagnoses, key=lambda d: d["step"]):
        lines.append(f"  step {d['step']} {d['severity']} {d['kind']}: {', '.join(n or ROOT for n in d['layers'][:3])}")
    if run.actions:
        lines.append(f"  actions: {action_counts(run.actions)}")
    return "\n".join(lines)


def report_command(run_dir: str, output: str | None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """``gradguard report RUN_DIR [-o FILE]``: write the report, print a summary. Returns the exit code.

    Whatever the directory holds, the user gets lines, not a traceback: a directory that cannot be read at all is
    one line naming the file (exit 2); lines that were skipped are listed (the first few here, all in the page).
    """
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        run = load_run(run_dir)
        path = write_report(run_dir, output, run=run)
    except ReportError as e:
        print(f"gradguard report: {e}", file=err)
        return 2
    except Exception as e:  # a bug of ours: still one line, with where it happened, rather than a traceback
        tb = e.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = f" at {Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno}" if tb is not None else ""
        print(f"gradguard report: internal error ({type(e).__name__}: {e}{where}) while reading {run_dir}; please "
              "report it with the run directory", file=err)
        return 3
    for note in run.notes[:MAX_NOTES_PRINTED]:
        print(f"gradguard report: note: {note}", file=err)
    if len(run.notes) > MAX_NOTES_PRINTED:
        print(f"gradguard report: note: and {len(run.notes) - MAX_NOTES_PRINTED:,} more, listed in the report",
              file=err)
    print(summary(run), file=out)
    print(f"wrote {path}", file=out)
    return 0

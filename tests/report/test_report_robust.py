"""``gradguard report`` on any run directory: a table of crafted directories, each either rendered (with the
exact notes for the lines it could not use, and its text escaped) or refused with one line naming the file.

The expected notes and messages are written out by hand: they are what a user reads, so the test is the oracle.
"""

from __future__ import annotations

import contextlib
import html
import io
import json
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from gradguard.cli import main
from gradguard.report.html import load_run, render, write_report
from gradguard.report.load import ReportError
from gradguard.report.sinks import JsonlSink

XSS = "<script>alert(1)</script>"
XSS_ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"
LAYERS = [{"name": "enc", "numel": 10}, {"name": "dec", "numel": 5}]


def meta(**over: Any) -> dict[str, Any]:
    """A meta.json as Guard writes it (the fields the report reads)."""
    m = {"schema": 1, "gradguard": "0.1.0", "torch": "2.4.0", "python": "3.11.7", "started": "2026-01-01T00:00:00",
         "model": "Net", "optimizer": "SGD", "layers": LAYERS,
         "options": {"log_every": 1, "sample_every": 25, "thresholds": {"warmup": 50, "window": 100}}}
    m.update(over)
    return m


def row(step: Any, **over: Any) -> dict[str, Any]:
    """A stats.jsonl line: loss 2 - step/100, total norm 1, layer norms 0.6 and 0.8, one sample at step 0."""
    r = {"step": step, "loss": 2.0 - (step if isinstance(step, int) else 0) / 100, "total_grad_norm": 1.0,
         "total_grad_norm_max": 1.2, "grad_norm": {"enc": 0.6, "dec": 0.8}, "sample_step": 0,
         "weight_norm": {"enc": 3.0, "dec": 2.0}, "update_ratio": {"enc": 1e-3, "dec": 2e-3}}
    r.update(over)
    return r


def rows(n: int = 60) -> list[Any]:
    return [row(i) for i in range(n)]


def write(d: Path, meta_obj: Any = None, stats: list[Any] | None = None, events: list[Any] | None = None,
          raw_meta: bytes | None = None, tail: str = "\n") -> Path:
    """A run directory; lines are dicts (written as JSON) or raw text (written as it is)."""
    d.mkdir(parents=True, exist_ok=True)
    if raw_meta is not None:
        (d / "meta.json").write_bytes(raw_meta)
    elif meta_obj is not None:
        (d / "meta.json").write_text(json.dumps(meta_obj))
    for name, lines in (("stats.jsonl", stats), ("events.jsonl", events)):
        if lines is not None:
            text = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines)
            (d / name).write_text(text + (tail if lines else ""))
    return d


def append_bytes(d: Path, name: str, data: bytes) -> Path:
    with open(d / name, "ab") as f:
        f.write(data)
    return d


DIAG = {"type": "diagnosis", "kind": "exploding", "step": 12, "severity": "error", "layers": ["enc"],
        "message": "grew", "evidence": {"ratio": 120.0}, "remedies": ["clip"]}


@dataclass
class Case:
    """A crafted directory and what the report must make of it.

    ``error``: the one line of the ReportError (``{d}`` is the case's folder); else the run renders, with exactly
    ``notes``, and the page contains every string of ``page`` and none of ``absent``.
    """

    name: str
    build: Callable[[Path], Path]
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    page: list[str] = field(default_factory=list)
    absent: list[str] = field(default_factory=list)
    plots: int = 5


SHORT = "No diagnoses in 60 steps (a short run: trends judged only in part)"
CASES = [
    # ---- refused: one line naming the path or the file (and line)
    Case("path_missing", lambda d: d / "nope", error="{d}/nope does not exist"),
    Case("path_is_file", lambda d: (d.mkdir(), (d / "f.txt").write_text("x"), d / "f.txt")[-1],
         error="{d}/f.txt is a file, not a run directory"),
    Case("path_is_meta_json", lambda d: write(d, meta(), rows(), []) / "meta.json",
         error="{d}/meta.json is a file, not a run directory: pass the folder that holds it ({d})"),
    Case("not_a_run_directory", lambda d: (d.mkdir(), d)[-1],
         error="{d} is not a gradguard run directory: it has no meta.json: pass the folder given as log_dir= or "
               "gradguard run --out"),
    Case("folder_of_runs", lambda d: (write(d / "a", meta(), rows(), []), d)[-1],
         error="{d} is not a gradguard run directory: it has no meta.json: it holds run directories (a); pass one "
               "of them"),
    Case("missing_meta", lambda d: write(d, None, rows(), []),
         error="{d} is not a gradguard run directory: it has no meta.json (stats.jsonl without meta.json: meta.json "
               "is written when the Guard attaches; was it deleted?)"),
    Case("meta_not_json", lambda d: write(d, raw_meta=b'{"schema": 1,\n "model": ', stats=rows(), events=[]),
         error="{d}/meta.json line 2 column 11: not valid JSON (Expecting value)"),
    Case("meta_empty", lambda d: write(d, raw_meta=b"", stats=rows(), events=[]),
         error="{d}/meta.json is empty (the process was stopped before writing it?)"),
    Case("meta_list", lambda d: write(d, raw_meta=b"[1, 2]", stats=rows(), events=[]),
         error="{d}/meta.json holds a list ([1, 2]), not an object: not a file gradguard wrote"),
    Case("meta_string", lambda d: write(d, raw_meta=b'"run"', stats=rows(), events=[]),
         error='{d}/meta.json holds a string ("run"), not an object: not a file gradguard wrote'),
    Case("meta_no_schema", lambda d: write(d, {k: v for k, v in meta().items() if k != "schema"}, rows(), []),
         error='{d}/meta.json has no "schema" field: not a file gradguard wrote'),
    Case("meta_schema_99", lambda d: write(d, meta(schema=99), rows(), []),
         error="{d}/meta.json: log schema 99; this gradguard reads schema 1. Use the gradguard version that wrote "
               "it."),
    Case("meta_schema_string", lambda d: write(d, meta(schema="1"), rows(), []),
         error='{d}/meta.json: log schema "1"; this gradguard reads schema 1. Use the gradguard version that wrote '
               'it.'),
    Case("meta_nested_too_deeply", lambda d: write(d, raw_meta=b"[" * 100_000 + b"]" * 100_000, stats=rows()),
         error="{d}/meta.json: not valid JSON (nested too deeply)"),
    Case("meta_binary", lambda d: write(d, raw_meta=b"\xff\xfe\x00\x01", stats=rows(), events=[]),
         error="{d}/meta.json is not UTF-8 text (byte 0xff at offset 0): not a file gradguard wrote"),
    # ---- meta.json readable but not as written by gradguard: rendered, with notes
    Case("meta_wrong_types", lambda d: write(d, meta(layers="abc", model=5, optimizer=["x"], started={},
                                                     options="y"), rows(), []),
         notes=["meta.json: model is a number, not a string; shown as found",
                "meta.json: optimizer is a list, not a string; shown as found",
                "meta.json: started is an object, not a string; shown as found",
                "meta.json: options is a string, not an object; ignored",
                'meta.json: layers is a string ("abc"), not a list; layer names are taken from stats.jsonl'],
         page=["<dd>5 (2 layers with parameters)</dd>", "<dd>[&quot;x&quot;]</dd>", SHORT]),
    Case("meta_layer_entries_bad",
         lambda d: write(d, meta(layers=[{"name": "enc"}, 7, {"numel": 3}, {"name": ["x"]}]), rows(), []),
         notes=['meta.json: layer entries without a name left out: #2 7, #3 {"numel": 3}, #4 {"name": ["x"]}'],
         page=[SHORT]),
    Case("markup_and_math_in_meta_and_layer_names",
         lambda d: write(d, meta(model=XSS, optimizer="<b>o</b>", started="<img src=x onerror=alert(1)>",
                                 layers=[{"name": "<b>x</b>", "numel": 1}, {"name": "$\\frac{a}{$", "numel": 1},
                                         {"name": "_hidden", "numel": 1}]),
                         [row(i, grad_norm={"<b>x</b>": 1.0, "$\\frac{a}{$": 2.0, "_hidden": 0.5},
                              weight_norm={}, update_ratio={"<b>x</b>": 1e-3, "$\\frac{a}{$": 2e-3})
                          for i in range(60)], []),
         page=[f"<title>gradguard report: {XSS_ESCAPED}</title>", f"<dd>{XSS_ESCAPED} (3 layers with parameters)",
               "<dd>&lt;b&gt;o&lt;/b&gt;</dd>", "<dd>&lt;img src=x onerror=alert(1)&gt;</dd>", SHORT],
         absent=["<b>", "<img src=x"]),
    # ---- stats.jsonl: bad lines skipped, each with its line number
    Case("stats_line_not_json", lambda d: write(d, meta(), rows()[:3] + ["garbage{"] + rows()[3:], []),
         notes=["stats.jsonl line 4: not JSON (Expecting value at column 1); skipped"], page=[SHORT]),
    Case("stats_last_line_cut", lambda d: write(d, meta(), rows() + ['{"step": 60, "lo'], [], tail=""),
         notes=["stats.jsonl line 61: cut off (the process was stopped while writing it); skipped"], page=[SHORT]),
    Case("stats_resumed_after_cut",  # the resumed session's first record lands on the cut line
         lambda d: write(d, meta(), rows(40) + ['{"step": 40, "lo' + json.dumps(row(40))] + rows()[41:], []),
         notes=["stats.jsonl line 41: starts with a cut-off record (the process was stopped while writing it) "
                "followed by a complete one: kept the complete one"], page=[SHORT]),
    Case("stats_line_is_a_list", lambda d: write(d, meta(), rows()[:4] + ["[1, 2, 3]"] + rows()[4:], []),
         notes=["stats.jsonl line 5: a list ([1, 2, 3]), not an object; skipped"], page=[SHORT]),
    Case("stats_line_is_a_string", lambda d: write(d, meta(), rows()[:4] + ['"hello"'] + rows()[4:], []),
         notes=['stats.jsonl line 5: a string ("hello"), not an object; skipped'], page=[SHORT]),
    Case("stats_missing_keys", lambda d: write(d, meta(), [{"loss": 1.0}, {"step": 0}] + rows()[1:], []),
         notes=["stats.jsonl line 1: has no step; skipped"], page=[SHORT]),
    Case("stats_step_is_a_string", lambda d: write(d, meta(), [row("7")] + rows(), []),
         notes=['stats.jsonl line 1: has step "7", not a whole number; skipped'], page=[SHORT]),
    Case("stats_step_too_large", lambda d: write(d, meta(), ['{"step": 1' + "0" * 400 + "}"] + rows(), []),
         notes=[f'stats.jsonl line 1: has step 1{"0" * 36}..., too large; skipped'], page=[SHORT]),
    Case("stats_number_of_5000_digits", lambda d: write(d, meta(), ['{"step": 1' + "0" * 5000 + "}"] + rows(), []),
         notes=["stats.jsonl line 1: not JSON (a number too long to read); skipped"], page=[SHORT]),
    Case("stats_nested_too_deeply", lambda d: write(d, meta(), ["[" * 100_000 + "]" * 100_000] + rows(), []),
         notes=["stats.jsonl line 1: not JSON (nested too deeply); skipped"], page=[SHORT]),
    Case("stats_grad_norm_is_a_list", lambda d: write(d, meta(), [row(0, grad_norm=[1, 2])] + rows()[1:], []),
         notes=["stats.jsonl line 1: grad_norm is a list ([1, 2]), not an object of layers; ignored"], page=[SHORT]),
    Case("stats_wrong_value_types",
         lambda d: write(d, meta(), [row(0, loss=[1], total_grad_norm={"a": 1}, total_grad_norm_max=True,
                                         grad_norm={"enc": "banana", "dec": [1]}, update_ratio="x",
                                         sample_step="q")] + rows()[1:], []),
         notes=['stats.jsonl line 1: not a number: loss [1], total_grad_norm {"a": 1}, total_grad_norm_max true; '
                'read as absent',
                'stats.jsonl line 1: grad_norm has values that are not numbers ("enc": "banana", "dec": [1]); read '
                'as absent',
                'stats.jsonl line 1: update_ratio is a string ("x"), not an object of layers; ignored',
                'stats.jsonl line 1: sample_step "q", not a whole number; the sampled values are drawn at step 0'],
         page=[SHORT]),
    Case("stats_nan_inf_strings",  # the schema's own spelling of non-finite values: no note, and said plainly
         lambda d: write(d, meta(), rows(30) + [row(i, loss="nan", total_grad_norm="inf", total_grad_norm_max="inf",
                                                    grad_norm={"enc": "-inf", "dec": "nan"}) for i in range(30, 60)],
                         []),
         page=["No diagnosis, but the run is not healthy", "Gradients: non-finite (NaN/Inf) from step 30 (30 of 60 "
               "lines).", "Loss: from 1.96 at the start (median of steps 0\u20139) to 1.71 at step 29.",
               "Loss: non-finite from step 30."],
         absent=["healthy as far"]),
    Case("stats_nul_bytes_after_crash", lambda d: write(d, meta(), rows() + ["\x00\x00\x00\x00"], []),
         notes=["stats.jsonl line 61: holds NUL bytes (left by a crash or a full disk), not JSON; skipped"],
         page=[SHORT]),
    Case("stats_not_utf8", lambda d: append_bytes(write(d, meta(), rows(), []), "stats.jsonl", b'\xff\xfe{"step"}\n'),
         notes=["stats.jsonl line 61: not UTF-8 text (byte 0xff at column 1); skipped"], page=[SHORT]),
    Case("stats_steps_go_back",  # resumed from a checkpoint of step 30: the later timeline wins
         lambda d: write(d, meta(), rows(50) + rows()[30:], []),
         notes=["stats.jsonl line 51: the step count goes back from 49 to 30 (the run was resumed or restarted into "
                "this folder): the 20 earlier lines from step 30 on are replaced by the later ones"],
         page=[SHORT]),
    # ---- no steps: a report that says so, not an error
    Case("no_steps", lambda d: write(d, meta(), [], []),
         page=["No steps recorded", "the script never completed an optimizer step", "<p>None.</p>"],
         absent=["healthy"], plots=0),
    Case("stats_empty_with_a_diagnosis", lambda d: write(d, meta(), [], [DIAG]),
         page=["No steps recorded", "1 diagnosis was made outside optimizer steps (listed below).",
               "<td>grew<br><small>evidence: ratio = 120</small></td>"], plots=0),
    Case("stats_missing", lambda d: write(d, meta(), None, []),
         notes=["stats.jsonl: missing: no statistics were written"], page=["No steps recorded"], plots=0),
    Case("stats_is_a_directory", lambda d: (write(d, meta(), None, []), (d / "stats.jsonl").mkdir(), d)[-1],
         notes=["stats.jsonl: cannot be read (Is a directory); nothing read from it"], page=["No steps recorded"],
         plots=0),
    # ---- events.jsonl
    Case("events_line_not_json", lambda d: write(d, meta(), rows(), [DIAG, "{oops", DIAG]),
         notes=["events.jsonl line 2: not JSON (Expecting property name enclosed in double quotes at column 2); "
                "skipped"],
         page=["Problems found: exploding (first at step 12, 2 times)"]),
    Case("events_last_line_cut", lambda d: write(d, meta(), rows(), [DIAG, '{"type": "action", "ki'], tail=""),
         notes=["events.jsonl line 2: cut off (the process was stopped while writing it); skipped"],
         page=["Problems found: exploding (first at step 12)"]),
    Case("events_unknown_type",
         lambda d: write(d, meta(), rows(), [{"type": "banana", "kind": "x", "step": 1}, {"kind": "x", "step": 1},
                                             DIAG]),
         notes=['events.jsonl line 1: has type "banana", not "diagnosis", "action" or "note"; skipped',
                'events.jsonl line 2: has no type, not "diagnosis", "action" or "note"; skipped']),
    Case("events_missing_keys",
         lambda d: write(d, meta(), rows(), [{"type": "diagnosis", "kind": "exploding", "step": 3},
                                             {"type": "diagnosis", "step": 3}, {"type": "action", "kind": "clip"}]),
         notes=['events.jsonl line 1: diagnosis "exploding" at step 3: no severity; no message; shown as found',
                "events.jsonl line 2: diagnosis with no kind; skipped",
                "events.jsonl line 3: action with no step; skipped"],
         page=["<td class=short>3</td><td class='short unknown'>unknown</td><td class=short>exploding</td>"]),
    Case("events_wrong_value_types",
         lambda d: write(d, meta(), rows(), [
             dict(DIAG, step="12"),
             dict(DIAG, layers="enc", evidence=[1, 2], remedies="do x", severity=5, message=["m"]),
             {"type": "action", "kind": "clip", "step": 4, "detail": "str"},
             dict(DIAG, step=True), dict(DIAG, step=5.0),
             '{"type": "action", "kind": "clip", "step": 1e400, "detail": {}}']),
         notes=['events.jsonl line 1: diagnosis with step "12", not a whole number; skipped',
                'events.jsonl line 2: diagnosis "exploding" at step 12: severity 5; message is a list; layers is a '
                'string, not a list of strings; remedies is a string, not a list of strings; evidence is a list, '
                'not an object; shown as found',
                'events.jsonl line 3: action "clip" at step 4: detail is a string; shown as found',
                "events.jsonl line 4: diagnosis with step true, not a whole number; skipped",
                "events.jsonl line 6: action with step Infinity, not a whole number; skipped"],
         page=["<td class=short>5</td>", "<td class=layers>enc</td>", "<li>do x</li>",
               "evidence: evidence = [1, 2]", "<li>clipped step 4</li>"]),
    Case("markup_in_events",
         lambda d: write(d, meta(), rows(), [
             dict(DIAG, kind=XSS, message=XSS, layers=["<svg onload=alert(1)>"], evidence={"<i>k</i>": "<b>v</b>"},
                  remedies=["<a href=x>fix</a>"]),
             {"type": "action", "kind": "<x>", "step": 2, "detail": {"<k>": "<v>"}},
             {"type": XSS, "kind": "x", "step": XSS}]),
         notes=['events.jsonl line 3: has type "<script>alert(1)</script>", not "diagnosis", "action" or "note"; '
                "skipped"],
         page=[f"<td class=short>{XSS_ESCAPED}</td>", f"<td>{XSS_ESCAPED}<br><small>evidence: &lt;i&gt;k&lt;/i&gt; = "
               "&lt;b&gt;v&lt;/b&gt;</small>", "<li>&lt;a href=x&gt;fix&lt;/a&gt;</li>",
               "<td class=layers>&lt;svg onload=alert(1)&gt;</td>",
               "<li>&lt;x&gt; at step 2: &lt;k&gt;: &lt;v&gt;</li>",
               f"<li>events.jsonl line 3: has type &quot;{XSS_ESCAPED}&quot;, not &quot;diagnosis&quot;",
               f"Problems found: {XSS_ESCAPED} (first at step 12)"],
         absent=["<svg", "<a href", "<i>", "<x>"]),
    Case("math_text_in_events",  # kinds and severities reach the plots' legends: never parsed as math
         lambda d: write(d, meta(), rows(), [dict(DIAG, severity="$\\frac{a}{$"), dict(DIAG, severity="$b"),
                                             {"type": "action", "kind": "$\\frac{", "step": 3, "detail": {}}]),
         notes=['events.jsonl line 1: diagnosis "exploding" at step 12: severity "$\\\\frac{a}{$"; shown as found',
                'events.jsonl line 2: diagnosis "exploding" at step 12: severity "$b"; shown as found'],
         page=["<td class='short unknown'>$\\frac{a}{$</td>", "<li>$\\frac{ at step 3</li>"]),
    # ---- verdicts that must not say "healthy"
    Case("two_steps", lambda d: write(d, meta(), rows(2), []),
         page=["No diagnosis, but too few steps to judge", "Too few steps to judge trends: the exploding, vanishing "
               "and unit rules start after 50 steps of warm-up and compare 100-step windows; this run recorded 2."],
         absent=["healthy"]),
    Case("loss_rose_1700x_without_a_diagnosis",
         lambda d: write(d, meta(), [row(i, loss=2.0) for i in range(59)] + [row(59, loss=3400.0)], []),
         page=["No diagnosis, but the run is not healthy", "Loss: from 2 at the start (median of steps 0\u20139) to "
               "3,400 at step 59, it rose 1,700x: training diverged although no gradient rule fired."],
         absent=["healthy as far"]),
]


class Page(HTMLParser):
    """The tags and images of a page: what a browser would run or fetch."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: set[str] = set()
        self.imgs: list[str] = []
        self.h2: list[str] = []
        self._in_h2 = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        if tag == "img":
            self.imgs.append(dict(attrs).get("src") or "")
        self._in_h2 = tag == "h2"

    def handle_endtag(self, tag: str) -> None:
        self._in_h2 = False if tag == "h2" else self._in_h2

    def handle_data(self, data: str) -> None:
        if self._in_h2:
            self.h2.append(data)


# Everything the report itself writes; a tag outside this set came from a file and was not escaped.
OWN_TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "dl", "dt", "dd", "section", "p", "ul",
            "ol", "li", "table", "tr", "th", "td", "br", "small", "img", "b", "span"}


@dataclass
class Answer:
    """What ``gradguard report DIR -o OUT`` did with one crafted directory."""

    code: int
    out: str
    err: str
    page: str | None
    warnings: list[str]


@pytest.fixture(scope="module")
def answers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Answer]]:
    """Every crafted directory through the command line, in this process (drawing is the slow part: once each)."""
    base = tmp_path_factory.mktemp("crafted")
    out: dict[str, tuple[Path, Answer]] = {}
    for case in CASES:
        path = case.build(base / case.name)
        html_file = base / f"{case.name}.html"
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), \
                warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # a warning from drawing NaN or a "$" would reach the user's console
            code = main(["report", str(path), "-o", str(html_file)])
        page = html_file.read_text(encoding="utf-8") if html_file.exists() else None
        out[case.name] = (path, Answer(code, stdout.getvalue(), stderr.getvalue(), page,
                                       [f"{w.category.__name__}: {w.message}" for w in caught]))
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_crafted_directory_renders_or_is_refused_in_one_line(case: Case,
                                                             answers: dict[str, tuple[Path, Answer]]) -> None:
    path, answer = answers[case.name]
    d = str(path.parent if case.name.startswith("path_") else path)
    assert "Traceback" not in answer.err and answer.warnings == []
    if case.error is not None:
        with pytest.raises(ReportError) as info:
            load_run(path)
        assert str(info.value) == case.error.format(d=d)
        assert answer.code == 2 and answer.err == f"gradguard report: {case.error.format(d=d)}\n"
        assert answer.page is None and answer.out == ""
        return
    run = load_run(path)
    assert [str(n) for n in run.notes] == case.notes
    # The console shows the first five notes, and how many more the page lists.
    expected = [f"gradguard report: note: {n}" for n in case.notes[:5]]
    if len(case.notes) > 5:
        expected.append(f"gradguard report: note: and {len(case.notes) - 5} more, listed in the report")
    assert answer.code == 0 and answer.err.splitlines() == expected
    assert answer.out.splitlines()[-1].startswith("wrote ") and answer.page is not None
    page = answer.page
    for text in case.page:
        assert text in page
    for text in case.absent:
        assert text not in page
    parsed = Page()
    parsed.feed(page)
    assert parsed.tags <= OWN_TAGS  # no markup from the files got through
    assert len(parsed.imgs) == case.plots and all(src.startswith("data:image/png;base64,") for src in parsed.imgs)
    for note in case.notes:  # every note is in the page too, escaped
        assert f"<li>{html.escape(note)}</li>" in page


@pytest.mark.parametrize("name", ["markup_and_math_in_meta_and_layer_names", "stats_nan_inf_strings"])
def test_cli_in_a_fresh_process_prints_no_traceback_and_no_warning(name: str, tmp_path: Path) -> None:
    """A real process, warnings shown: matplotlib's and NumPy's warnings about our NaN, log axes and the "$" in
    layer names must not reach the console."""
    case = next(c for c in CASES if c.name == name)
    path = case.build(tmp_path / name)
    proc = subprocess.run([sys.executable, "-W", "default", "-m", "gradguard", "report", str(path), "-o",
                           str(tmp_path / "r.html")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.splitlines()[-1] == f"wrote {tmp_path / 'r.html'}"


def _session(d: Path, steps: range, kill_after: int | None = None) -> None:
    """One training session writing through the real JSONL sink; ``kill_after``: die in the middle of that line."""
    stats = JsonlSink(d / "stats.jsonl")
    for s in steps:
        stats.write(row(s))
    stats.close()
    if kill_after is not None:
        with open(d / "stats.jsonl", "a") as f:
            f.write(json.dumps(row(kill_after))[:25])  # the process died while writing this line


def test_a_run_resumed_after_a_kill_reads_every_line_after_the_cut(tmp_path: Path) -> None:
    d = tmp_path / "run"
    write(d, meta(), None, [])
    _session(d, range(0, 40), kill_after=40)
    _session(d, range(40, 80))  # resumed into the same folder, from the step it died at
    run = load_run(d)
    assert [r["step"] for r in run.stats] == list(range(80))  # the first record after the cut is recovered too
    assert [str(n) for n in run.notes] == [
        "stats.jsonl line 41: starts with a cut-off record (the process was stopped while writing it) followed by a "
        "complete one: kept the complete one"]
    # Killed again, resumed from a checkpoint at step 60: the abandoned steps 60-79 give way to the new ones.
    with open(d / "stats.jsonl", "a") as f:
        f.write('{"step": 80, "lo')
    _session(d, range(60, 100))
    run = load_run(d)
    assert [r["step"] for r in run.stats] == list(range(100))
    assert [str(n) for n in run.notes][1:] == [
        "stats.jsonl line 81: starts with a cut-off record (the process was stopped while writing it) followed by a "
        "complete one: kept the complete one",
        "stats.jsonl line 81: the step count goes back from 79 to 60 (the run was resumed or restarted into this "
        "folder): the 20 earlier lines from step 60 on are replaced by the later ones"]
    page = write_report(d).read_text()
    assert "No diagnoses: healthy as far as the gradients show" in page  # 100 steps: a full window judged


def test_values_are_normalised_as_documented(tmp_path: Path) -> None:
    d = write(tmp_path / "run", meta(), [row(0, loss=None, total_grad_norm="-inf", grad_norm={"enc": None,
                                                                                              "dec": "NaN"})],
              [dict(DIAG, step=7.0)])
    run = load_run(d)
    r = run.stats[0]
    assert r["loss"] is None and r["total_grad_norm"] == float("-inf") and r["grad_norm"]["enc"] is None
    assert r["grad_norm"]["dec"] != r["grad_norm"]["dec"]  # NaN
    assert run.events[0]["step"] == 7 and isinstance(run.events[0]["step"], int)
    assert run.layers == ["enc", "dec"]


def test_a_file_of_garbage_lists_fifty_notes_and_counts_the_rest(tmp_path: Path) -> None:
    d = write(tmp_path / "run", meta(), rows(60) + ["x"] * 70, [])
    run = load_run(d)
    assert len(run.notes) == 70
    page = render(run)
    assert page.count("<li>stats.jsonl line ") == 50 and "<li>and 20 more</li>" in page

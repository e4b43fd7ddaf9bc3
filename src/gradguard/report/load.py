"""Reading a run directory back, whatever state it is in.

A run directory is written line by line by a training process that can be killed at any moment, resumed into the
same folder, copied half-way, or edited by hand (schema in ``gradguard.report.sinks``). The report must still open:
every line is checked against the schema on its own (``gradguard.report.records``, which also says what the values
look like once read), a line that cannot be used is skipped and the reason kept as a ``Note`` naming the file and
line, and only a directory that holds no usable ``meta.json`` at all is refused, with a ``ReportError`` whose
message is one line. Nothing here raises anything else on bad input.

Room: the outputs. It may touch: ``report``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .records import PER_LAYER, Note, event, kind_of, plural, show, stats_row

SCHEMA = 1
STATS_FILE = "stats.jsonl"
EVENTS_FILE = "events.jsonl"
META_FILE = "meta.json"


class ReportError(Exception):
    """The run directory cannot be reported on (missing, not a run, unreadable meta.json, other schema).

    The message is one line that names the file (and line) at fault and what to do.
    """


@dataclass
class Run:
    """What a run directory holds, normalised (see the module docstring), and the notes made while reading it."""

    path: Path
    meta: dict[str, Any]
    stats: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)
    layer_names: list[str] = field(default_factory=list)

    @property
    def layers(self) -> list[str]:
        """Layer names: meta.json's, then any that only the statistics name (a layer added after meta was written)."""
        return self.layer_names

    @property
    def diagnoses(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == "diagnosis"]

    @property
    def actions(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == "action"]

    @property
    def remarks(self) -> list[dict[str, Any]]:
        """What gradguard said once about the run (events of type "note"), as opposed to ``notes``, which are what
        reading the files found wrong with them."""
        return [e for e in self.events if e["type"] == "note"]

    @property
    def thresholds(self) -> dict[str, Any]:
        """``options.thresholds`` of meta.json (empty when absent or malformed)."""
        options = self.meta.get("options")
        th = options.get("thresholds") if isinstance(options, dict) else None
        return th if isinstance(th, dict) else {}


def _lines(path: Path, name: str, notes: list[Note]) -> Iterator[tuple[int, str, bool]]:
    """``(line number, text, ends with a newline)`` for each line of a JSONL file; a missing file has none.

    Bytes are read and decoded line by line, so one line of binary garbage (a disk filled with zeros after a
    crash) costs one line, not the file.
    """
    if not path.exists():
        return
    try:
        with open(path, "rb") as f:
            for i, raw in enumerate(f, 1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    notes.append(Note(name, i, f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                                               "skipped"))
                    continue
                yield i, text, text.endswith("\n")
    except OSError as e:
        notes.append(Note(name, None, f"cannot be read ({e.strerror or e}); nothing read from it"))


def _objects(path: Path, name: str, notes: list[Note], key: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """The JSON objects of a JSONL file with their line numbers; bad lines become notes.

    ``key`` is a field every record of this file has: it identifies a record written straight after a cut-off
    line (see below).
    """
    decoder = json.JSONDecoder()
    for i, text, complete in _lines(path, name, notes):
        line = text.strip()
        if not line:
            continue  # a blank line carries nothing
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as e:  # ValueError: JSONDecodeError, or an int of over 4300 digits
            # A process killed mid-write leaves a line without its end. When the run is resumed into the same
            # folder the next record is appended to that same line: find it (a complete object that starts at
            # some "{" and runs to the end of the line) and keep it.
            recovered = None
            # Records start with '{"'; a bounded number of tries keeps a line of garbage from costing O(n^2).
            starts = [k for k in range(1, len(line) - 1) if line[k] == "{" and line[k + 1] == '"'][:200]
            for start in starts:
                try:
                    cand, end = decoder.raw_decode(line, start)
                except (ValueError, RecursionError):
                    continue
                if end == len(line) and isinstance(cand, dict) and key in cand:
                    recovered = cand
                    break
            if recovered is not None:
                notes.append(Note(name, i, "starts with a cut-off record (the process was stopped while writing "
                                           "it) followed by a complete one: kept the complete one"))
                yield i, recovered
            elif not complete:
                notes.append(Note(name, i, "cut off (the process was stopped while writing it); skipped"))
            elif "\x00" in line:
                notes.append(Note(name, i, "holds NUL bytes (left by a crash or a full disk), not JSON; skipped"))
            else:
                if isinstance(e, json.JSONDecodeError):
                    why = f"{e.msg} at column {e.colno}"
                else:
                    why = "nested too deeply" if isinstance(e, RecursionError) else "a number too long to read"
                notes.append(Note(name, i, f"not JSON ({why}); skipped"))
            continue
        if not isinstance(obj, dict):
            notes.append(Note(name, i, f"{kind_of(obj)} ({show(obj)}), not an object; skipped"))
            continue
        yield i, obj


def _purge_restarts(rows: list[dict[str, Any]], name: str, notes: list[Note]) -> list[dict[str, Any]]:
    """Keep one timeline when the step count goes back (a run resumed from a checkpoint into the same folder).

    As TensorBoard does with a restarted writer, the later rows win: the earlier rows from the restart step on
    belong to a timeline that was abandoned. Keeping both would draw every plot back and forth over itself.
    """
    kept: list[dict[str, Any]] = []
    for row in rows:
        if kept and row["step"] <= kept[-1]["step"]:
            dropped = [r for r in kept if r["step"] >= row["step"]]
            notes.append(Note(name, row["line"], f"the step count goes back from {kept[-1]['step']} to {row['step']} "
                                                 "(the run was resumed or restarted into this folder): the "
                                                 f"{plural(len(dropped), 'earlier line')} from step {row['step']} "
                                                 "on are replaced by the later ones"))
            kept = [r for r in kept if r["step"] < row["step"]]
        kept.append(row)
    return kept


def _read_meta(path: Path) -> dict[str, Any]:
    """meta.json as an object, or a one-line ReportError naming the file (and line) and what is wrong."""
    meta_path = path / META_FILE
    if not meta_path.exists():
        subs = sorted(p.parent.name for p in path.glob(f"*/{META_FILE}"))
        hint = (f": it holds run directories ({', '.join(subs[:5])}{', ...' if len(subs) > 5 else ''}); "
                "pass one of them") if subs else (
            " (stats.jsonl without meta.json: meta.json is written when the Guard attaches; was it deleted?)"
            if (path / STATS_FILE).exists() else ": pass the folder given as log_dir= or gradguard run --out")
        raise ReportError(f"{path} is not a gradguard run directory: it has no {META_FILE}{hint}")
    if not meta_path.is_file():
        raise ReportError(f"{meta_path} is not a file")
    try:
        raw = meta_path.read_bytes()
    except OSError as e:
        raise ReportError(f"{meta_path} cannot be read: {e.strerror or e}") from None
    if not raw.strip():
        raise ReportError(f"{meta_path} is empty (the process was stopped before writing it?)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ReportError(f"{meta_path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}): "
                          "not a file gradguard wrote") from None
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise ReportError(f"{meta_path} line {e.lineno} column {e.colno}: not valid JSON ({e.msg})") from None
    except RecursionError:
        raise ReportError(f"{meta_path}: not valid JSON (nested too deeply)") from None
    except ValueError:  # an integer of more than 4300 digits, which Python refuses to convert
        raise ReportError(f"{meta_path}: not valid JSON (a number too long to read)") from None
    if not isinstance(meta, dict):
        raise ReportError(f"{meta_path} holds {kind_of(meta)} ({show(meta)}), not an object: not a file "
                          "gradguard wrote")
    if "schema" not in meta:
        raise ReportError(f"{meta_path} has no \"schema\" field: not a file gradguard wrote")
    if meta["schema"] != SCHEMA or isinstance(meta["schema"], bool):
        raise ReportError(f"{meta_path}: log schema {show(meta['schema'])}; this gradguard reads schema {SCHEMA}. "
                          "Use the gradguard version that wrote it.")
    return meta


def _meta_layers(meta: dict[str, Any], notes: list[Note]) -> list[str]:
    """Layer names from meta.json; malformed entries are left out with a note."""
    raw = meta.get("layers")
    if raw is None:
        return []
    if not isinstance(raw, list):
        notes.append(Note(META_FILE, None, f"layers is {kind_of(raw)} ({show(raw)}), not a list; layer names "
                                           f"are taken from {STATS_FILE}"))
        return []
    names: list[str] = []
    bad = []
    for k, lay in enumerate(raw):
        name = lay.get("name") if isinstance(lay, dict) else None
        if isinstance(name, str):
            if name not in names:
                names.append(name)
        else:
            bad.append(f"#{k + 1} {show(lay, 25)}")
    if bad:
        notes.append(Note(META_FILE, None, f"layer entries without a name left out: {', '.join(bad[:4])}"
                                           f"{', ...' if len(bad) > 4 else ''}"))
    return names


def _check_meta_fields(meta: dict[str, Any], notes: list[Note]) -> None:
    """Notes for descriptive fields of the wrong type (they are shown as they are)."""
    for key in ("model", "optimizer", "started", "gradguard", "torch", "python"):
        if key in meta and meta[key] is not None and not isinstance(meta[key], str):
            notes.append(Note(META_FILE, None, f"{key} is {kind_of(meta[key])}, not a string; shown as found"))
    if "options" in meta and not isinstance(meta["options"], dict):
        notes.append(Note(META_FILE, None, f"options is {kind_of(meta['options'])}, not an object; ignored"))


def load_run(run_dir: str | Path) -> Run:
    """Read a run directory; lines that cannot be used are skipped and listed in ``Run.notes``.

    Raises:
        ReportError: the path is missing or not a directory, or meta.json is missing, unreadable, not a JSON
            object, or of another schema. The message is one line naming the file.
    """
    path = Path(run_dir)
    if not path.exists():
        raise ReportError(f"{path} does not exist")
    if not path.is_dir():
        hint = (f": pass the folder that holds it ({path.parent})"
                if path.name in (META_FILE, STATS_FILE, EVENTS_FILE, "report.html") else "")
        raise ReportError(f"{path} is a file, not a run directory{hint}")
    meta = _read_meta(path)
    notes: list[Note] = []
    _check_meta_fields(meta, notes)
    layers = _meta_layers(meta, notes)

    rows = []
    for i, obj in _objects(path / STATS_FILE, STATS_FILE, notes, "step"):
        row = stats_row(obj, STATS_FILE, i, notes)
        if row is not None:
            rows.append(row)
    rows = _purge_restarts(rows, STATS_FILE, notes)
    events = []
    for i, obj in _objects(path / EVENTS_FILE, EVENTS_FILE, notes, "type"):
        ev = event(obj, EVENTS_FILE, i, notes)
        if ev is not None:
            events.append(ev)

    known = set(layers)
    for row in rows:  # a layer only the statistics name still gets its row in the plots
        for key in PER_LAYER:
            for name in row[key]:
                if name not in known:
                    known.add(name)
                    layers.append(name)
    if not (path / STATS_FILE).exists():
        notes.append(Note(STATS_FILE, None, "missing: no statistics were written"))
    if not (path / EVENTS_FILE).exists():
        notes.append(Note(EVENTS_FILE, None, "missing: no diagnoses or actions were written"))
    return Run(path, meta, rows, events, notes, layers)


# ---- views of a run that the verdict and the plots share


def first_nonfinite(steps: Sequence[int], values: Sequence[float | None]) -> int | None:
    """The first step whose value is NaN or Inf (None: not observed, is not non-finite)."""
    return next((s for s, v in zip(steps, values) if v is not None and not math.isfinite(v)), None)


def clip_threshold(run: Run) -> tuple[float | None, list[tuple[int, float]]]:
    """The clip threshold from the clip actions: one value when it was fixed, else the per-step points.

    A clip action's ``clipped_norm`` is the norm after clipping, i.e. the threshold in force at that step.
    """
    points = []
    for a in run.actions:
        if a["kind"] == "clip":
            after = a["detail"].get("clipped_norm")
            if isinstance(after, (int, float)) and not isinstance(after, bool) and math.isfinite(after):
                points.append((a["step"], float(after)))
    if not points:
        return None, []
    lo, hi = min(p[1] for p in points), max(p[1] for p in points)
    return (hi if hi <= lo * 1.001 + 1e-12 else None), points


def update_samples(run: Run) -> list[tuple[int, dict[str, float | None]]]:
    """One ``(sample_step, update_ratio)`` per sampled step (every stats line repeats the latest sample)."""
    out: dict[int, dict[str, float | None]] = {}
    for r in run.stats:
        if r["update_ratio"]:
            step = r["sample_step"] if r["sample_step"] is not None else r["step"]
            out[step] = r["update_ratio"]
    return sorted(out.items())


def time_samples(run: Run) -> dict[str, list[tuple[int, float | None, float | None, int | None]]]:
    """Per recurrent module, ``(step, early, late, time steps)`` for each sampled step, in step order: the gradient
    reaching the first and the last 10% of the time steps of its input (the stats lines' ``time_grad``)."""
    out: dict[str, dict[int, tuple[int, float | None, float | None, int | None]]] = {}
    for r in run.stats:
        for module, t in r.get("time_grad", {}).items():
            out.setdefault(module, {})[t["step"]] = (t["step"], t["early"], t["late"], t["time_steps"])
    return {m: [v for _, v in sorted(by_step.items())] for m, by_step in out.items()}

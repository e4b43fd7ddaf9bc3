"""One line of a run directory's JSONL files, checked and normalised, with a ``Note`` for what could not be used.

Values come back normalised, so the plotting and HTML code never meet a wrong type:

- a stats line: a dict with ``step`` (int), ``line`` (int), the scalar fields as ``float`` (NaN/Inf kept) or
  ``None`` (absent), ``grad_norm`` / ``weight_norm`` / ``update_ratio`` as ``{layer: float | None}`` (always
  present, maybe empty), ``sample_step`` as ``int | None``, ``time_grad`` as ``{module: {"step": int, "early",
  "late": float | None, "time_steps": int | None}}`` (always present, maybe empty);
- an events line: a dict with ``type`` ("diagnosis" or "action"), ``kind`` (str), ``step`` (int), ``line`` (int);
  diagnoses also ``severity``, ``message`` (str), ``layers``, ``remedies`` (list of str), ``evidence`` (dict);
  actions ``detail`` (dict).

A line without a usable ``step`` (or, for events, ``type`` and ``kind``) is skipped; any other field of the wrong
type is read as absent or shown as found, and said so in a note.

Room: the outputs. It may touch: no other module.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

SCALARS = ("loss", "total_grad_norm", "total_grad_norm_max", "grad_norm_mean", "grad_norm_std", "loss_mean",
           "loss_std")
PER_LAYER = ("grad_norm", "weight_norm", "update_ratio")
SEVERITIES = ("error", "warning", "info")
# The strings the JSONL sink writes for non-finite numbers (JSON has none); Python's spellings accepted too.
NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "infinity": math.inf, "-infinity": -math.inf,
             "+inf": math.inf}


@dataclass(frozen=True)
class Note:
    """Something in the run directory that could not be used as written, and what the report did instead."""

    file: str
    line: int | None
    what: str

    def __str__(self) -> str:
        return f"{self.file} line {self.line}: {self.what}" if self.line is not None else f"{self.file}: {self.what}"


def kind_of(x: Any) -> str:
    """The JSON name of a value's type, for notes a user can match against the file."""
    if x is None:
        return "null"
    if isinstance(x, bool):
        return "a boolean"
    if isinstance(x, (int, float)):
        return "a number"
    if isinstance(x, str):
        return "a string"
    if isinstance(x, list):
        return "a list"
    if isinstance(x, dict):
        return "an object"
    return type(x).__name__


def show(x: Any, limit: int = 40) -> str:
    """A short JSON rendering of a bad value for a note (a note must stay one readable line)."""
    try:
        text = json.dumps(x, ensure_ascii=False)
    except (TypeError, ValueError):
        text = f"<{type(x).__name__}>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def plural(n: int, one: str, many: str | None = None) -> str:
    """``1 line``, ``2 lines``, ``1,204 steps``."""
    return f"{n:,} {one if n == 1 else (many or one + 's')}"


def number(x: Any) -> tuple[float | None, bool]:
    """Read a number as the sinks write it: JSON numbers, null, and "nan"/"inf"/"-inf" for non-finite values.

    Returns:
        ``(value, ok)``: ``value`` is a float (NaN and Inf kept) or None (null: not observed / no gradient);
        ``ok`` is False when ``x`` is none of these (the value is then None).
    """
    if x is None:
        return None, True
    if isinstance(x, bool):  # bool is an int in Python, but true is no gradient norm
        return None, False
    if isinstance(x, (int, float)):
        try:
            return float(x), True
        except OverflowError:  # an int too large for a float: JSON allows it
            return (math.inf if x > 0 else -math.inf), True
    if isinstance(x, str) and x.strip().lower() in NONFINITE:
        return NONFINITE[x.strip().lower()], True
    return None, False


MAX_STEP = 2**53  # beyond this a step is no longer exact as a float, which is how plots place it


def whole(x: Any) -> int | None:
    """A step number: a JSON integer (or an integral float such as 12.0) of at most 2**53; None otherwise."""
    if isinstance(x, bool):
        return None
    if isinstance(x, float) and math.isfinite(x) and x.is_integer():
        x = int(x)
    if isinstance(x, int) and abs(x) <= MAX_STEP:
        return x
    return None


def not_whole(x: Any) -> str:
    """Why ``whole(x)`` refused a value, for a note."""
    if isinstance(x, int) and not isinstance(x, bool):
        return f"{show(x)}, too large"
    return f"{show(x)}, not a whole number"


def per_layer(obj: dict[str, Any], key: str, name: str, i: int, notes: list[Note]) -> dict[str, float | None]:
    """A ``{layer: number | null}`` field of a stats line; bad values read as absent, with a note."""
    raw = obj.get(key)
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        notes.append(Note(name, i, f"{key} is {kind_of(raw)} ({show(raw)}), not an object of layers; ignored"))
        return {}
    out: dict[str, float | None] = {}
    bad = []
    for layer, v in raw.items():
        value, ok = number(v)
        if not ok:
            bad.append(f"{show(layer)}: {show(v, 20)}")
        out[layer] = value
    if bad:
        notes.append(Note(name, i, f"{key} has values that are not numbers ({', '.join(bad[:3])}"
                                   f"{', ...' if len(bad) > 3 else ''}); read as absent"))
    return out


def stats_row(obj: dict[str, Any], name: str, i: int, notes: list[Note]) -> dict[str, Any] | None:
    """A normalised stats line, or None (with a note) when it has no usable step."""
    step = whole(obj.get("step"))
    if step is None:
        what = "has no step" if "step" not in obj else f"has step {not_whole(obj['step'])}"
        notes.append(Note(name, i, f"{what}; skipped"))
        return None
    row: dict[str, Any] = {"step": step, "line": i}
    bad = []
    for key in SCALARS:
        value, ok = number(obj.get(key))
        if not ok:
            bad.append(f"{key} {show(obj.get(key), 20)}")
        row[key] = value
    if bad:
        notes.append(Note(name, i, f"not a number: {', '.join(bad)}; read as absent"))
    for key in PER_LAYER:
        row[key] = per_layer(obj, key, name, i, notes)
    sample = obj.get("sample_step")
    row["sample_step"] = whole(sample)
    if sample is not None and row["sample_step"] is None:
        notes.append(Note(name, i, f"sample_step {not_whole(sample)}; the sampled values are "
                                   f"drawn at step {step}"))
    row["time_grad"] = time_grad(obj.get("time_grad"), step, name, i, notes)
    return row


def time_grad(raw: Any, step: int, name: str, i: int, notes: list[Note]) -> dict[str, dict[str, Any]]:
    """The ``time_grad`` field of a stats line: ``{module: {"step": int, "early": float | None, "late": float | None,
    "time_steps": int | None}}``; a module entry that is not an object is left out, with a note.

    Args:
        raw: the field as read (None when absent). step: the line's step (a sample without its own is drawn there).
        name, i: the file and line, for notes. notes: where notes go.

    Returns:
        The modules' samples (empty when absent or unusable).
    """
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        notes.append(Note(name, i, f"time_grad is {kind_of(raw)} ({show(raw)}), not an object of modules; ignored"))
        return {}
    out: dict[str, dict[str, Any]] = {}
    bad = []
    for module, entry in raw.items():
        if not isinstance(entry, dict):
            bad.append(f"{show(module)}: {show(entry, 20)}")
            continue
        early, ok_early = number(entry.get("early"))
        late, ok_late = number(entry.get("late"))
        if not (ok_early and ok_late):
            bad.append(f"{show(module)}: {show(entry, 30)}")
        at = whole(entry.get("step"))
        out[module] = {"step": at if at is not None else step, "early": early, "late": late,
                       "time_steps": whole(entry.get("time_steps"))}
    if bad:
        notes.append(Note(name, i, f"time_grad has entries that are not samples ({', '.join(bad[:3])}"
                                   f"{', ...' if len(bad) > 3 else ''}); read as absent"))
    return out


def strings(x: Any) -> tuple[list[str], bool]:
    """A list of strings (layers, remedies); a lone string counts as a list of one. ``ok`` False if coerced."""
    if x is None:
        return [], True
    if isinstance(x, str):
        return [x], False
    if isinstance(x, list):
        return [v if isinstance(v, str) else show(v) for v in x], all(isinstance(v, str) for v in x)
    return [show(x)], False


def event(obj: dict[str, Any], name: str, i: int, notes: list[Note]) -> dict[str, Any] | None:
    """A normalised events line, or None (with a note) when it is not a diagnosis, action or note with a step."""
    typ = obj.get("type")
    if typ not in ("diagnosis", "action", "note"):
        what = "has no type" if "type" not in obj else f"has type {show(typ)}"
        notes.append(Note(name, i, f"{what}, not \"diagnosis\", \"action\" or \"note\"; skipped"))
        return None
    kind, step = obj.get("kind"), whole(obj.get("step"))
    if not isinstance(kind, str) or not kind or step is None:
        missing: list[str] = []
        if not isinstance(kind, str) or not kind:
            missing.append("no kind" if "kind" not in obj else f"kind {show(kind)}")
        if step is None:
            missing.append("no step" if "step" not in obj else f"step {not_whole(obj.get('step'))}")
        notes.append(Note(name, i, f"{typ} with {' and '.join(missing)}; skipped"))
        return None
    ev: dict[str, Any] = {"type": typ, "kind": kind, "step": step, "line": i}
    fixed = []  # fields that were not as the schema says: shown as well as possible, and said so
    if typ == "note":  # something gradguard said once about the run (``gradguard run --repair`` without optimizer)
        message = obj.get("message")
        if not isinstance(message, str):
            fixed.append("no message" if message is None else f"message is {kind_of(message)}")
            message = "" if message is None else show(message, 200)
        ev["message"] = message
    elif typ == "action":
        detail = obj.get("detail", {})
        if not isinstance(detail, dict):
            fixed.append(f"detail is {kind_of(detail)}")
            detail = {"detail": detail}
        ev["detail"] = detail
    else:
        severity = obj.get("severity")
        if severity not in SEVERITIES:
            fixed.append("no severity" if severity is None else f"severity {show(severity)}")
            severity = severity if isinstance(severity, str) and severity else "unknown"
        ev["severity"] = severity
        message = obj.get("message")
        if not isinstance(message, str):
            fixed.append("no message" if message is None else f"message is {kind_of(message)}")
            message = "" if message is None else show(message, 200)
        ev["message"] = message
        for key in ("layers", "remedies"):
            ev[key], ok = strings(obj.get(key))
            if not ok:
                fixed.append(f"{key} is {kind_of(obj.get(key))}, not a list of strings")
        evidence = obj.get("evidence", {})
        if not isinstance(evidence, dict):
            fixed.append(f"evidence is {kind_of(evidence)}, not an object")
            evidence = {} if evidence is None else {"evidence": evidence}
        ev["evidence"] = evidence
    if fixed:
        notes.append(Note(name, i, f"{typ} {show(kind, 30)} at step {step}: {'; '.join(fixed)}; shown as found"))
    return ev


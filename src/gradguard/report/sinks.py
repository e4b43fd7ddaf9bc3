"""Where records go. Every sink has ``write(record)`` and ``close()``; heavy imports happen only when used.

Run directory layout (``Guard(log_dir=...)``), schema version 1:

- ``meta.json``: ``{"schema": 1, "gradguard": version, "torch": version, "layers": [{"name", "numel"}...],
  "options": {...}, "started": ISO time}``. Written whole (a temporary file renamed over it) at attach, and again
  when the tracked layers change (``optimizer.add_param_group`` after attach): ``layers`` is the run's newest list.
- ``stats.jsonl``: one object per ``log_every`` steps: ``{"step", "loss" (null if not observed),
  "total_grad_norm", "total_grad_norm_max" (max over the steps since the previous line), "grad_norm_mean",
  "grad_norm_std" (running EMA of the total norm), "loss_mean", "loss_std", "grad_norm": {layer: value|null},
  "weight_norm": {...}, "update_ratio": {...}}`` (the last two from the most recent sampled step, with its
  ``"sample_step"``); for recurrent modules (RNN/LSTM/GRU) sampled in these steps, ``"time_grad": {module:
  {"step", "early", "late", "time_steps"}}``: the gradient reaching one time step of the input, mean L2 norm over
  the first and the last 10% of its time steps. Non-finite numbers are written as the strings "nan", "inf", "-inf".
- ``events.jsonl``: one object per diagnosis or action, in the order found: ``{"type": "diagnosis"|"action",
  "kind", "step", ...}`` with the fields of ``gradguard.Diagnosis`` / ``gradguard.Action``; and what gradguard
  says once about the run: ``{"type": "note", "kind", "step", "message"}`` (``not_recovered`` at close: the loss
  never came back from a reported explosion; ``repair_unavailable`` from ``gradguard run --repair``).

Every line is flushed as it is written, so a killed process leaves a readable log. ``gradguard.report.load`` reads
it back, skipping (and listing) any line a crash, a resumed run or a hand edit left unusable.

Room: the outputs. It may touch: ``report``.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Protocol, TextIO

from .records import number, plural
from .words import GAP, GROUPED, count_words, describe, stretch_key, stretch_text


class Sink(Protocol):
    """Anything that takes records."""

    def write(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def _clean(x: Any) -> Any:
    """JSON has no NaN/Inf: write them as strings rather than drop them (hiding NaN is what we exist to stop)."""
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


class JsonlSink:
    """Appends one JSON object per line to ``path`` and flushes each line."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f: TextIO | None = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._failed = False  # a write failed: its line may still sit in the buffer

    def __str__(self) -> str:
        return str(self.path)  # how warnings name it: the file, not the class

    def write(self, record: dict[str, Any]) -> None:
        if self._f is None:
            return
        try:
            self._f.write(json.dumps(_clean(record), allow_nan=False) + "\n")
            self._f.flush()
        except BaseException:
            self._failed = True
            raise

    def close(self) -> None:
        """Close the file. After a failed write the buffer still holds the line that failed, and closing flushes
        it again (a full disk fails the same way): that second failure was already reported, so it is not raised
        (the file is closed all the same)."""
        f, self._f = self._f, None
        if f is None:
            return
        try:
            f.close()
        except OSError:
            if not self._failed:
                raise


class _Stretch:
    """What the console keeps of a stretch of skips or clips while it lasts: its first action, its span, its count
    and (clips) the extreme norms, not every action: a run can clip every step for a million steps."""

    def __init__(self, action: dict[str, Any]) -> None:
        self.key = stretch_key(action)
        self.kind: str = action["kind"]
        self.detail: dict[str, Any] = action["detail"]
        self.first = self.last = int(action["step"])
        self.count = 0
        self.norms: tuple[list[float], list[float]] = ([], [])
        self.add(action)

    def add(self, action: dict[str, Any]) -> None:
        """Count one more action of the stretch (at a step no earlier than its last)."""
        self.last = max(self.last, int(action["step"]))
        self.count += 1
        for kept, key in zip(self.norms, ("norm", "clipped_norm")):
            value, ok = number(action["detail"].get(key))
            if ok and value is not None:
                _keep_extremes(kept, value)

    def text(self) -> str:
        return stretch_text(self.kind, self.detail, self.first, self.last, self.count, self.norms)


def _keep_extremes(kept: list[float], value: float) -> None:
    """Keep in ``kept`` only the smallest and largest finite value seen, and the first non-finite one."""
    if not math.isfinite(value):
        if all(math.isfinite(v) for v in kept):
            kept.append(value)
        return
    finite = [v for v in kept if math.isfinite(v)] + [value]
    kept[:] = sorted({min(finite), max(finite)}) + [v for v in kept if not math.isfinite(v)]


class ConsoleSink:
    """Prints each diagnosis once, as it is found, and each action in words: with rich when installed, plain text
    on stderr otherwise.

    Skips and clips come one per step. The first of a stretch of them (same kind and reason, at most
    ``gradguard.report.words.GAP`` steps apart, as the report groups them) is printed in full; the rest are summed
    up in one line ("skipped 204 steps, 11\u2013214: non-finite gradients") once the run is past the stretch (an
    event or a statistics read more than GAP steps after its last action, or another stretch of the same kind), or
    at close. Other actions (learning-rate changes, rollbacks) are printed as they come and do not end a stretch:
    the repair ladder takes them in the middle of one. ``close()`` prints one summary line: the diagnoses and the
    actions counted by kind (nothing when there were none).
    """

    STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream
        self._console: Any = None
        self._open: dict[str, _Stretch] = {}  # kind -> its open stretch (skips and clips can interleave)
        self._actions: dict[str, int] = {}  # kind -> count, in the order first seen
        self._diagnoses: dict[str, tuple[int, int]] = {}  # kind -> (first step, count)
        self._closed = False
        try:
            from rich.console import Console  # optional extra: gradguard[rich]

            self._console = Console(file=stream or sys.stderr, highlight=False, soft_wrap=True)
        except ImportError:
            self._console = None

    @property
    def waiting(self) -> bool:
        """Whether a stretch is open: its summary line waits for the run to get past it (``at_step``)."""
        return bool(self._open)

    def at_step(self, step: int) -> None:
        """The run has reached ``step``: print the summary of each open stretch it is past by more than GAP steps.

        Args:
            step: the newest step seen (an event's, or the last step of a statistics read).
        """
        for kind in [k for k, st in self._open.items() if step - st.last > GAP]:
            self._end(kind)

    def write(self, record: dict[str, Any]) -> None:
        step = record.get("step")
        if isinstance(step, int) and not isinstance(step, bool):
            self.at_step(step)
        if record.get("type") == "action":
            self._action(record)
        elif record.get("type") == "diagnosis":
            self._diagnosis(record)
        elif record.get("type") == "note":
            self._print(f"[gradguard] step {record.get('step')}: {record.get('message')}", "yellow")

    def _action(self, record: dict[str, Any]) -> None:
        kind = str(record.get("kind"))
        self._actions[kind] = self._actions.get(kind, 0) + 1
        step = record.get("step")
        detail = record.get("detail")
        act = {"kind": kind, "step": step if isinstance(step, int) else -1,
               "detail": detail if isinstance(detail, dict) else {"detail": detail}}
        if kind in GROUPED:
            open_ = self._open.get(kind)
            if open_ is not None and open_.key == stretch_key(act):
                open_.add(act)  # within GAP steps of its last one: at_step would have ended it otherwise
                return
            if open_ is not None:
                self._end(kind)  # the same kind for another reason
            self._open[kind] = stretch = _Stretch(act)
            self._print(f"[gradguard] {stretch.text()} (more of these are summed up in one line when they stop)",
                        "cyan")
            return
        self._print(f"[gradguard] {describe(kind, [act])}", "cyan")

    def _diagnosis(self, record: dict[str, Any]) -> None:
        first, count = self._diagnoses.get(record["kind"], (record["step"], 0))
        self._diagnoses[record["kind"]] = (first, count + 1)
        layers = record.get("layers") or []
        where = f" in {', '.join(repr(n) for n in layers[:3])}{' ...' if len(layers) > 3 else ''}" if layers else ""
        head = f"[gradguard] step {record['step']} {record['severity']}: {record['kind']}{where}"
        body = record["message"]
        fix = f"  fix: {record['remedies'][0]}" if record.get("remedies") else ""
        self._print(f"{head}\n  {body}" + (f"\n{fix}" if fix else ""), self.STYLE.get(record["severity"], ""))

    def _end(self, kind: str) -> None:
        """Print the summary of the open stretch of ``kind`` (nothing for a stretch of one: its line said it all)."""
        stretch = self._open.pop(kind)
        if stretch.count > 1:
            self._print(f"[gradguard] {stretch.text()}", "cyan")

    def summary(self) -> str:
        """The line ``close()`` prints: diagnoses by kind and actions counted by kind ("" when there were none).

        Returns:
            "[gradguard] summary: 1 diagnosis: nonfinite (step 20); actions: 30 steps skipped, 1 rollback", or "".
        """
        parts = []
        if self._diagnoses:
            n = sum(c for _, c in self._diagnoses.values())
            kinds = ", ".join(f"{k} (first at step {s}, {c} times)" if c > 1 else f"{k} (step {s})"
                              for k, (s, c) in self._diagnoses.items())
            parts.append(f"{plural(n, 'diagnosis', 'diagnoses')}: {kinds}")
        if self._actions:
            parts.append(f"actions: {count_words(self._actions)}")
        return f"[gradguard] summary: {'; '.join(parts)}" if parts else ""

    def _print(self, text: str, style: str) -> None:
        if self._console is not None:
            from rich.markup import escape

            self._console.print(f"[{style}]{escape(text)}[/]" if style else escape(text))
        else:
            print(text, file=self.stream or sys.stderr, flush=True)

    def close(self) -> None:
        """End the open stretch and print the summary line (once; nothing when nothing happened)."""
        if self._closed:
            return
        self._closed = True
        for kind in sorted(self._open, key=lambda k: self._open[k].first):
            self._end(kind)
        line = self.summary()
        if line:
            self._print(line, "")

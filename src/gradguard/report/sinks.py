"""Where records go. Every sink has ``write(record)`` and ``close()``; heavy imports happen only when used.

Run directory layout (``Guard(log_dir=...)``), schema version 1:

- ``meta.json``: ``{"schema": 1, "gradguard": version, "torch": version, "layers": [{"name", "numel"}...],
  "options": {...}, "started": ISO time}``.
- ``stats.jsonl``: one object per ``log_every`` steps: ``{"step", "loss" (null if not observed),
  "total_grad_norm", "total_grad_norm_max" (max over the steps since the previous line), "grad_norm_mean",
  "grad_norm_std" (running EMA of the total norm), "loss_mean", "loss_std", "grad_norm": {layer: value|null},
  "weight_norm": {...}, "update_ratio": {...}}`` (the last two from the most recent sampled step, with its
  ``"sample_step"``). Non-finite numbers are written as the strings "nan", "inf", "-inf".
- ``events.jsonl``: one object per diagnosis or action, in the order found: ``{"type": "diagnosis"|"action",
  "kind", "step", ...}`` with the fields of ``gradguard.Diagnosis`` / ``gradguard.Action``.

Every line is flushed as it is written, so a killed process leaves a readable log. ``gradguard.report.load`` reads
it back, skipping (and listing) any line a crash, a resumed run or a hand edit left unusable.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Protocol, TextIO


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

    def write(self, record: dict[str, Any]) -> None:
        if self._f is None:
            return
        self._f.write(json.dumps(_clean(record), allow_nan=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


class ConsoleSink:
    """Prints each diagnosis once, as it is found: with rich when installed, plain text on stderr otherwise."""

    STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream
        self._console: Any = None
        try:
            from rich.console import Console  # optional extra: gradguard[rich]

            self._console = Console(file=stream or sys.stderr, highlight=False, soft_wrap=True)
        except ImportError:
            self._console = None

    def write(self, record: dict[str, Any]) -> None:
        if record.get("type") != "diagnosis":
            if record.get("kind") == "clip":
                return  # one per clipped step: in events.jsonl and guard.actions, too many for a console
            line = f"[gradguard] step {record.get('step')} action {record.get('kind')}: {record.get('detail')}"
            self._print(line, "cyan")
            return
        layers = record.get("layers") or []
        where = f" in {', '.join(repr(n) for n in layers[:3])}{' ...' if len(layers) > 3 else ''}" if layers else ""
        head = f"[gradguard] step {record['step']} {record['severity']}: {record['kind']}{where}"
        body = record["message"]
        fix = f"  fix: {record['remedies'][0]}" if record.get("remedies") else ""
        self._print(f"{head}\n  {body}" + (f"\n{fix}" if fix else ""), self.STYLE.get(record["severity"], ""))

    def _print(self, text: str, style: str) -> None:
        if self._console is not None:
            from rich.markup import escape

            self._console.print(f"[{style}]{escape(text)}[/]" if style else escape(text))
        else:
            print(text, file=self.stream or sys.stderr, flush=True)

    def close(self) -> None:
        pass

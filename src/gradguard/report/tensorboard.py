"""TensorBoard sink: statistics as scalars, diagnoses and actions as markdown text, flushed record by record.

Needs ``tensorboard`` (``pip install 'gradguard[tensorboard]'``), imported only when a sink is created from a path.

Room: the outputs. It may touch: ``report``.
"""

from __future__ import annotations

import json
import os
from typing import Any

from . import BackendErrors, stats_scalars
from .sinks import _clean


def _md(text: str) -> str:
    """Escape markdown so names such as ``dead_units`` or ``layer*`` are shown as written."""
    for ch in "\\`*_[]<>#|":
        text = text.replace(ch, "\\" + ch)
    return text


def diagnosis_markdown(record: dict[str, Any]) -> str:
    """One diagnosis record as a short markdown block.

    Args:
        record: a ``{"type": "diagnosis"}`` record (``gradguard.Diagnosis.to_dict()``).

    Returns:
        Markdown: step, severity and kind, the layers, the message, the evidence numbers and the first remedy.
    """
    layers = record.get("layers") or []
    lines = [f"**step {record.get('step')} · {record.get('severity')} · {_md(str(record.get('kind')))}**"]
    if layers:
        shown = ", ".join(f"`{n or '(root)'}`" for n in layers[:5])
        lines.append(f"layers: {shown}{' ...' if len(layers) > 5 else ''}")
    lines.append(_md(str(record.get("message", ""))))
    if record.get("evidence"):
        lines.append("evidence: " + _md(json.dumps(_clean(record["evidence"]))))
    if record.get("remedies"):
        lines.append("fix: " + _md(str(record["remedies"][0])))
    return "\n\n".join(lines)  # blank lines: TensorBoard renders each as its own paragraph


class TensorBoardSink:
    """Writes gradguard's records to TensorBoard.

    Per statistics record (every ``log_every`` steps, at ``global_step`` = the record's step):
    ``{prefix}/total_grad_norm``, ``total_grad_norm_max``, ``loss``, ``grad_norm_mean``/``std``,
    ``loss_mean``/``std`` and ``{prefix}/grad_norm/{layer}``; at each new sampled step ``{prefix}/weight_norm/{layer}``
    and ``{prefix}/update_ratio/{layer}``. Parameters owned by the model itself appear as layer ``(root)``.
    NaN and Inf are written as they are: TensorBoard stores them, and hiding them would hide the problem.
    Diagnoses are text under ``{prefix}/diagnoses``, repair actions under ``{prefix}/actions``; clipping happens at
    every clipped step, so it is the scalar ``{prefix}/clipped_norm`` (the norm after clipping) instead of text.
    The writer is flushed after every record, so a killed run keeps what was written.

    Example::

        guard = gg.Guard(model, opt, sinks=[TensorBoardSink("runs/exp1")])
    """

    def __init__(self, log_dir_or_writer: str | os.PathLike[str] | Any, prefix: str = "gradguard") -> None:
        """Open a writer on a directory, or write through the user's own ``SummaryWriter``.

        Args:
            log_dir_or_writer: a directory (a ``torch.utils.tensorboard.SummaryWriter`` is created there and
                closed by ``close()``), or an existing ``SummaryWriter`` (flushed, never closed: it is yours).
            prefix: first part of every tag.

        Raises:
            ImportError: tensorboard is not installed.
            TypeError: ``log_dir_or_writer`` is neither a path nor a writer.
        """
        if isinstance(log_dir_or_writer, (str, os.PathLike)):
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("TensorBoardSink needs tensorboard: pip install 'gradguard[tensorboard]'") from e
            self.writer: Any = SummaryWriter(log_dir=os.fspath(log_dir_or_writer))
            self._owns_writer = True
        elif all(callable(getattr(log_dir_or_writer, m, None)) for m in ("add_scalar", "add_text", "flush")):
            self.writer = log_dir_or_writer
            self._owns_writer = False
        else:
            raise TypeError("TensorBoardSink takes a log directory or a torch.utils.tensorboard.SummaryWriter; got "
                            f"{type(log_dir_or_writer).__name__}")
        self.prefix = prefix.rstrip("/")
        self._last_sample: int | None = None  # each sample is repeated in every record until the next one
        self._errors = BackendErrors("TensorBoard")
        self._closed = False

    def write(self, record: dict[str, Any]) -> None:
        """Write one record (stats, diagnosis or action) and flush.

        Args:
            record: a gradguard record; other types are ignored.
        """
        if self._closed:
            return
        ops = self._ops(record)
        if ops:
            # Only the writer calls are guarded: a malformed record is a gradguard bug and should surface.
            self._errors.call(self._apply, ops)

    def _ops(self, record: dict[str, Any]) -> list[tuple[str, str, Any, int]]:
        """The writer calls for one record: ``(method, tag, value, global_step)``."""
        p, kind = self.prefix, record.get("type")
        if kind not in ("stats", "diagnosis", "action"):
            return []
        step = int(record["step"])
        ops: list[tuple[str, str, Any, int]] = []
        if kind == "stats":
            now, sampled = stats_scalars(record, p)
            ops += [("add_scalar", tag, value, step) for tag, value in now.items()]
            sample_step = record.get("sample_step")
            if sampled and sample_step is not None and sample_step != self._last_sample:
                self._last_sample = int(sample_step)
                ops += [("add_scalar", tag, value, int(sample_step)) for tag, value in sampled.items()]
        elif kind == "diagnosis":
            ops.append(("add_text", f"{p}/diagnoses", diagnosis_markdown(record), step))
        else:
            detail = record.get("detail") or {}
            if record.get("kind") == "clip" and "clipped_norm" in detail:
                ops.append(("add_scalar", f"{p}/clipped_norm", float(detail["clipped_norm"]), step))
            else:
                text = f"**step {step} · {_md(str(record.get('kind')))}**\n\n{_md(json.dumps(_clean(detail)))}"
                ops.append(("add_text", f"{p}/actions", text, step))
        return ops

    def _apply(self, ops: list[tuple[str, str, Any, int]]) -> None:
        for method, tag, value, step in ops:
            getattr(self.writer, method)(tag, value, step)
        self.writer.flush()  # a killed run keeps every record written so far

    def close(self) -> None:
        """Flush; close the writer if this sink created it. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._errors.call(self.writer.close if self._owns_writer else self.writer.flush)

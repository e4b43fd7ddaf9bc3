"""Weights & Biases sink: one history row per statistics read, diagnoses in a table and counted in the summary.

Needs ``wandb`` (``pip install 'gradguard[wandb]'``), imported only when a sink is created.

How steps are handled, and why. W&B keeps one step counter per run and can only write to the current or the next
step: a ``step=`` lower than one already used is dropped with a warning, and the user's own ``run.log`` calls drive
that counter. So gradguard never passes ``step=``. Its step travels as a metric, ``{prefix}/step`` (and
``{prefix}/sample_step`` for the sampled weight norms and update ratios), and every gradguard metric is declared
with ``run.define_metric(name, step_metric=...)``: W&B plots it against gradguard's own step whatever the run's
step counter says (the documented way to log on a custom x-axis, also what the Lightning and transformers
integrations do). Everything from one statistics read (stats, diagnoses and clips found at that read) goes into
one ``run.log`` call, so gradguard adds at most one row per ``log_every`` steps.

``commit=True`` (default) makes that row its own history row; a user who logs without ``step=`` sees W&B's step
advance by one per gradguard row (their charts on a custom x-axis are unaffected). If your code passes ``step=``
to ``run.log`` and that step can advance more slowly than gradguard's reads (for instance ``step=epoch``), use
``commit=False``: gradguard's values are then added to the row you log next and never move W&B's step, at the price
that only the latest gradguard values between two of your rows are kept.

Room: the outputs. It may touch: ``report``.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from . import BackendErrors, stats_scalars
from .sinks import _clean

DIAGNOSIS_COLUMNS = ["step", "kind", "severity", "layers", "message", "remedy", "evidence"]
ACTION_COLUMNS = ["step", "kind", "detail"]
TABLE_NAMES = {"diagnosis": "diagnoses", "action": "actions"}


class _EventTable:
    """A W&B table that grows as events arrive and is logged with the next row."""

    def __init__(self, wandb: Any, columns: list[str]) -> None:
        self._wandb: Any = wandb
        self.columns = columns
        self.rows: list[list[Any]] = []
        self.dirty = False
        try:
            # INCREMENTAL: each log uploads only the rows added since the previous log, and W&B shows them all.
            self.table: Any = wandb.Table(columns=columns, log_mode="INCREMENTAL")
        except TypeError:  # older wandb without log modes: log a fresh table holding every row each time
            self.table = None

    def add(self, row: list[Any]) -> None:
        if self.table is not None:
            self.table.add_data(*row)
        else:
            self.rows.append(row)
        self.dirty = True

    def value(self) -> Any:
        self.dirty = False
        return self.table if self.table is not None else self._wandb.Table(columns=self.columns, data=list(self.rows))


class WandbSink:
    """Writes gradguard's records to a Weights & Biases run.

    Per statistics read, one ``run.log`` call: ``{prefix}/step``, ``{prefix}/total_grad_norm``,
    ``total_grad_norm_max``, ``loss``, ``grad_norm_mean``/``std``, ``loss_mean``/``std``,
    ``{prefix}/grad_norm/{layer}``; with each new sample ``{prefix}/sample_step``, ``{prefix}/weight_norm/{layer}``
    and ``{prefix}/update_ratio/{layer}``; ``{prefix}/clipped_norm`` (the latest clipped norm since the previous
    read) when clipping acted; and the tables ``{prefix}/diagnoses`` and ``{prefix}/actions`` when they grew.
    ``run.summary["{prefix}/count/{kind}"]`` counts diagnoses and actions of each kind, updated as they are found.
    NaN and Inf are logged as they are (W&B stores them). See the module docstring for the step handling.

    Example::

        run = wandb.init(project="p")
        guard = gg.Guard(model, opt, sinks=[WandbSink()])
    """

    def __init__(self, run: Any = None, prefix: str = "gradguard", commit: bool = True,
                 alerts: bool = False) -> None:
        """Attach to a W&B run.

        Args:
            run: the ``wandb.Run`` to log to; default: the current ``wandb.run``.
            prefix: first part of every key.
            commit: give gradguard's values their own history row (True), or add them to the row the user logs
                next (False; for code that passes ``step=`` to ``run.log``, see the module docstring).
            alerts: also send a W&B alert (``run.alert``) the first time each kind of error-severity diagnosis is
                found. Never sent by an offline run: it would be stored and delivered, stale, by ``wandb sync``.

        Raises:
            ImportError: wandb is not installed.
            RuntimeError: no run was given and ``wandb.init()`` has not been called.
        """
        try:
            import wandb
        except ImportError as e:
            raise ImportError("WandbSink needs wandb: pip install 'gradguard[wandb]'") from e
        run = run if run is not None else wandb.run
        if run is None:
            raise RuntimeError("WandbSink needs a W&B run: call wandb.init() before creating the sink, "
                               "or pass run=wandb.init(...)")
        self.run = run
        self._wandb: Any = wandb
        self.prefix = prefix.rstrip("/")
        self.commit = commit
        self.alerts = alerts
        self.step_key = f"{self.prefix}/step"
        self.sample_key = f"{self.prefix}/sample_step"
        self._errors = BackendErrors("Weights & Biases")
        self._defined: set[str] = set()
        self._define([self.step_key, self.sample_key], None)
        self._pending: dict[str, Any] = {}  # values for the next row (clips and tables found since the last row)
        self._pending_step: int | None = None
        self._tables = {"diagnosis": _EventTable(wandb, DIAGNOSIS_COLUMNS),
                        "action": _EventTable(wandb, ACTION_COLUMNS)}
        self.counts: Counter[str] = Counter()
        self._clips_unreported = False
        self._alerted: set[str] = set()
        self._last_sample: int | None = None  # each sample is repeated in every record until the next one
        self._closed = False

    def _define(self, keys: Any, step_metric: str | None) -> None:
        """Declare each new key once, with the gradguard step as its x-axis (exact names: no glob precedence)."""
        for key in keys:
            if key not in self._defined:
                self._defined.add(key)
                if step_metric is None:
                    self._errors.call(self.run.define_metric, key)
                else:
                    self._errors.call(self.run.define_metric, key, step_metric=step_metric)

    def _offline(self) -> bool:
        offline = getattr(self.run, "offline", None)
        if isinstance(offline, bool):
            return offline
        return str(getattr(getattr(self.run, "settings", None), "mode", "")) in ("offline", "dryrun", "disabled")

    def write(self, record: dict[str, Any]) -> None:
        """Take one record: a stats record is logged (with what is pending), events wait for the next one.

        Args:
            record: a gradguard record; other types are ignored.
        """
        if self._closed:
            return
        kind = record.get("type")
        if kind == "stats":
            step = int(record["step"])
            now, sampled = stats_scalars(record, self.prefix)
            row: dict[str, Any] = {self.step_key: step, **now}
            self._define(now, self.step_key)
            sample_step = record.get("sample_step")
            if sampled and sample_step is not None and sample_step != self._last_sample:
                self._last_sample = int(sample_step)
                row[self.sample_key] = int(sample_step)
                row.update(sampled)
                self._define(sampled, self.sample_key)
            self._log(row)
        elif kind == "diagnosis":
            self._event(record, [int(record["step"]), str(record.get("kind")), str(record.get("severity")),
                                 ", ".join(n or "(root)" for n in record.get("layers") or []),
                                 str(record.get("message", "")), (record.get("remedies") or [""])[0],
                                 json.dumps(_clean(record.get("evidence") or {}))])
            self._maybe_alert(record)
        elif kind == "action":
            detail = record.get("detail") or {}
            if record.get("kind") == "clip" and "clipped_norm" in detail:
                # One per clipped step: a value for the next row and a count, not a table row each.
                key = f"{self.prefix}/clipped_norm"
                self._define([key], self.step_key)
                self._pending[key] = float(detail["clipped_norm"])
                self._pending_step = int(record["step"])
                self.counts["clip"] += 1
                self._clips_unreported = True
            else:
                self._event(record, [int(record["step"]), str(record.get("kind")), json.dumps(_clean(detail))])

    def _event(self, record: dict[str, Any], row: list[Any]) -> None:
        self._tables[record["type"]].add(row)
        self._pending_step = int(record["step"])
        kind = str(record.get("kind"))
        self.counts[kind] += 1
        # The summary is not history: updating it now shows the count in the runs table before the next row.
        self._errors.call(self.run.summary.update, {f"{self.prefix}/count/{kind}": self.counts[kind]})

    def _maybe_alert(self, record: dict[str, Any]) -> None:
        kind = str(record.get("kind"))
        if not self.alerts or record.get("severity") != "error" or kind in self._alerted or self._offline():
            return
        self._alerted.add(kind)
        fix = f"\nfix: {record['remedies'][0]}" if record.get("remedies") else ""
        self._errors.call(self.run.alert, title=f"gradguard: {kind} at step {record.get('step')}",
                          text=f"{record.get('message', '')}{fix}", level=self._wandb.AlertLevel.ERROR)

    def _log(self, row: dict[str, Any]) -> None:
        """One ``run.log`` call carrying ``row`` and everything pending; never with ``step=`` (module docstring)."""
        row.update(self._pending)
        self._pending = {}
        for name, table in self._tables.items():
            if table.dirty:
                row[f"{self.prefix}/{TABLE_NAMES[name]}"] = table.value()
        if self._clips_unreported:
            self._clips_unreported = False
            self._errors.call(self.run.summary.update, {f"{self.prefix}/count/clip": self.counts["clip"]})
        self._errors.call(self.run.log, row, commit=self.commit)

    def close(self) -> None:
        """Log what is still pending (events found after the last statistics read). The run is left open: it is
        the user's to finish. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._pending_step is not None and (self._pending or any(t.dirty for t in self._tables.values())):
            self._log({self.step_key: self._pending_step})

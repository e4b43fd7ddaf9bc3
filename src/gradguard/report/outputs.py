"""Room 4 of the flow, the outputs: where diagnoses, actions and statistics records go.

The console, the run directory (``meta.json``, ``events.jsonl``, ``stats.jsonl``) and the user's sinks. Only
rank 0 writes; other ranks close the sinks they were given. It keeps the bounded log of actions. It writes
files under ``log_dir``, the console stream and the sinks, and nothing on the model or the optimizer.

Room: the outputs. It may touch: ``detect.history``, ``repair.log``, ``report``, ``stats.recorder``, ``types``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from ..detect.history import History, clip_acted
from ..repair.log import ActionLog
from ..stats.recorder import CLIPPED, HEAD, LOSS, TOTAL
from ..types import Action, Diagnosis
from .sinks import ConsoleSink, JsonlSink, Sink


class SinkWarning(RuntimeWarning):
    """A sink failed and was dropped; gradguard's monitoring and repair go on without it."""


class Outputs:
    """The sinks of one Guard.

    Args:
        rank: this process's rank (only rank 0 prints and writes).
        console: True for stderr, a text stream, or False.
        log_dir: the run directory, or None.
        sinks: the user's sinks (``write(record)`` and ``close()``).
        meta: the contents of ``meta.json`` (written at once when ``log_dir`` is given).
    """

    def __init__(self, rank: int, console: bool | TextIO, log_dir: str | Path | None, sinks: Iterable[Sink],
                 meta: dict[str, Any]) -> None:
        if rank != 0:
            console = False
        self.actions = ActionLog()
        self.sinks: list[Sink] = []
        self.stats_sink: JsonlSink | None = None
        self.idle: list[Sink] = []  # the user's sinks on ranks other than 0: closed, never written
        self.dropped: list[Sink] = []  # sinks that failed (one warning each): still closed at the end, quietly
        self.console: ConsoleSink | None = None
        user_sinks = _check_sinks(sinks)
        checked = _check_log_dir(log_dir)  # on every rank: the same options fail the same way
        self.log_dir = checked if rank == 0 else None
        if console:
            self.console = ConsoleSink(None if console is True else console)
            self.sinks.append(self.console)
        self._meta = meta
        if self.log_dir is not None:
            events: JsonlSink | None = None
            try:  # all or nothing: a file that cannot be written closes the ones opened before it
                self.log_dir.mkdir(parents=True, exist_ok=True)
                events = JsonlSink(self.log_dir / "events.jsonl")
                self.stats_sink = JsonlSink(self.log_dir / "stats.jsonl")
                write_meta(self.log_dir / "meta.json", meta)
            except BaseException:
                for opened in (events, self.stats_sink):
                    if opened is not None:
                        opened.close()
                raise
            self.sinks.append(events)
        self._own = len(self.sinks)  # console and events.jsonl take events only; the user's take stats too
        for sink in user_sinks:
            self.sinks.append(sink) if rank == 0 else self.idle.append(sink)

    @property
    def wants_stats(self) -> bool:
        """Whether ``stats`` has anywhere to go: a stats file, a user's sink, or a console waiting for the run to
        get past a stretch of skips or clips (its summary line is printed at a statistics read)."""
        return self._wants_record() or (self.console is not None and self.console.waiting)

    def _wants_record(self) -> bool:
        return self.stats_sink is not None or len(self.sinks) > self._own

    def diagnosis(self, d: Diagnosis) -> None:
        for sink in list(self.sinks):
            self._write(sink, d.to_dict())

    def act(self, action: Action) -> None:
        self.actions.append(action)
        for sink in list(self.sinks):
            self._write(sink, action.to_dict())

    def note(self, kind: str, step: int, message: str) -> None:
        """Something gradguard says once about the run, to the console and events.jsonl only (``{"type": "note",
        "kind", "step", "message"}``; the user's sinks take diagnoses, actions and statistics, as documented)."""
        for sink in list(self.sinks[:self._own]):
            self._write(sink, {"type": "note", "kind": kind, "step": step, "message": message})

    def stats(self, h: History, rows: np.ndarray, script_max_norm: float | None = None) -> None:
        """One statistics record for the rows of this read (``script_max_norm``: the script's own clip)."""
        console = self.console
        if console is not None and console in self.sinks:
            self._guarded(console, lambda: console.at_step(int(h.steps[-1])))
        if not self._wants_record():
            return
        record = stats_record(h, rows, script_max_norm)
        if self.stats_sink is not None:
            self._write(self.stats_sink, record)
        for sink in list(self.sinks[self._own:]):
            self._write(sink, {"type": "stats", **record})

    def _write(self, sink: Sink, record: dict[str, Any]) -> None:
        """A failing sink (a full disk, a tracker that went away) costs its own records only: it is dropped with one
        warning, and guarding and the other sinks go on."""
        self._guarded(sink, lambda: sink.write(record))

    def _guarded(self, sink: Sink, call: Callable[[], None]) -> None:
        """Run ``call`` on ``sink``; when it fails, drop the sink (see ``_write``)."""
        try:
            call()
        except Exception as e:
            if sink is self.console:
                self.console = None
            if sink is self.stats_sink:
                self.stats_sink = None
            else:
                index = self.sinks.index(sink)
                del self.sinks[index]
                if index < self._own:
                    self._own -= 1
            self.dropped.append(sink)  # still closed at the end
            warnings.warn(f"gradguard stopped writing to {_name(sink)} after it failed ({type(e).__name__}: {e}); "
                          "monitoring and repair go on", SinkWarning, stacklevel=3)

    def layers_changed(self, layers: list[tuple[str, int]]) -> None:
        """The tracked layers changed (``optimizer.add_param_group`` after attach): ``meta.json`` is written again,
        whole (a new file renamed over the old one), with the layers in their new order, so ``gradguard report``
        names and orders them as the run now has them. A failure warns (naming the file) and changes nothing else.

        Args:
            layers: (name, number of elements) of every tracked layer, in report order.
        """
        if self.log_dir is None:
            return
        self._meta = {**self._meta, "layers": [{"name": n, "numel": k} for n, k in layers]}
        try:
            write_meta(self.log_dir / "meta.json", self._meta)
        except OSError as e:
            warnings.warn(f"gradguard could not update {self.log_dir / 'meta.json'} with the new layers "
                          f"({type(e).__name__}: {e}); monitoring and repair go on", SinkWarning, stacklevel=2)

    def close(self) -> None:
        for s in self.sinks + self.idle + ([self.stats_sink] if self.stats_sink is not None else []):
            try:
                s.close()
            except Exception as e:  # one sink failing to close must not keep the others open
                warnings.warn(f"gradguard could not close {_name(s)} ({type(e).__name__}: {e})",
                              SinkWarning, stacklevel=2)
        for s in self.dropped:
            try:
                s.close()
            except Exception:  # noqa: S110 - it failed once and was reported then: one warning per sink
                pass
        self.dropped = []


def _name(sink: Sink) -> str:
    """How a warning names a sink: a file sink by its path, any other by its class."""
    return str(sink) if isinstance(sink, JsonlSink) else type(sink).__name__


def _check_sinks(sinks: Any) -> list[Sink]:
    """The ``sinks`` option as a list (a generator is read once), or a TypeError naming the option."""
    if sinks is None or isinstance(sinks, (str, bytes, dict)) or not isinstance(sinks, Iterable):
        raise TypeError(f"sinks must be a list of sinks (objects with write(record) and close() methods), got "
                        f"{type(sinks).__name__}; pass sinks=[] for none")
    out = list(sinks)
    for sink in out:
        if not (callable(getattr(sink, "write", None)) and callable(getattr(sink, "close", None))):
            raise TypeError(f"a sink needs write(record) and close() methods; got {type(sink).__name__} in sinks=")
    return out


def _check_log_dir(log_dir: Any) -> Path | None:
    """The ``log_dir`` option as a Path, or a TypeError naming the option."""
    if log_dir is None:
        return None
    if isinstance(log_dir, bool) or not isinstance(log_dir, (str, os.PathLike)):
        raise TypeError(f"log_dir must be a directory path (a str or pathlib.Path) or None, got "
                        f"{type(log_dir).__name__} {log_dir!r:.40}")
    return Path(log_dir)


def write_meta(path: Path, meta: dict[str, Any]) -> None:
    """Write ``meta.json`` whole: into a temporary file beside it, renamed over it, so a reader (or a process
    killed mid-write) never sees half of it. Errors name ``path``.

    Raises:
        OSError: it could not be written (the temporary file is removed).
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(meta, indent=2))
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror or str(e), str(path)) from e


def stats_record(h: History, rows: np.ndarray, script_max_norm: float | None = None) -> dict[str, Any]:
    """The fields of a ``stats.jsonl`` line for the newest ``rows`` (schema in ``gradguard.report.sinks``).

    With the script's own ``clip_grad_norm_`` seen: ``script_clip_max_norm`` and ``script_clip_bound``, the steps
    of these rows whose norm it cut."""
    last = rows[-1]
    names = h.layers

    def per_layer(values: np.ndarray) -> dict[str, float | None]:
        return {n: (None if v < 0 else float(v)) for n, v in zip(names, values)}

    rec: dict[str, Any] = {
        "step": int(h.steps[-1]),
        "loss": float(last[LOSS]) if h.loss_seen[-1] else None,
        "total_grad_norm": float(last[TOTAL]),
        "total_grad_norm_max": float(np.max(rows[:, TOTAL])),
        "grad_norm_mean": h.grad_ema.mean,
        "grad_norm_std": math.sqrt(h.grad_ema.var),
        "loss_mean": h.loss_ema.mean if h.loss_ema.count else None,
        "loss_std": math.sqrt(h.loss_ema.var) if h.loss_ema.count else None,
        "grad_norm": per_layer(last[HEAD:]),
    }
    if script_max_norm is not None:
        rec["script_clip_max_norm"] = script_max_norm
        rec["script_clip_bound"] = int(sum(clip_acted(float(r[TOTAL]), float(r[CLIPPED])) for r in rows))
    if h.sample_steps:
        w, u = h.weight[-1], h.update[-1]
        rec["sample_step"] = int(h.sample_steps[-1])
        rec["weight_norm"] = per_layer(w)
        # None only when not measured (ABSENT) or undefined (zero weights); a NaN update stays NaN.
        rec["update_ratio"] = {n: (None if uu < 0 or ww <= 0 else float(uu / ww))
                               for n, ww, uu in zip(names, w, u)}
    times = time_grad(h, int(h.steps[-len(rows)]) if len(rows) <= len(h.steps) else None)
    if times:
        rec["time_grad"] = times
    return rec


def time_grad(h: History, since: int | None) -> dict[str, dict[str, float | int]]:
    """The gradient reaching the first and the last time steps of each recurrent module, at its newest sample
    taken at a step of this read (the ``time_grad`` field of a stats line).

    Args:
        h: the history (``h.times``: (step, module, early, late, time steps)).
        since: the first step of this read (None: every sample kept).

    Returns:
        ``{module: {"step", "early", "late", "time_steps"}}``: ``early`` and ``late`` are the mean L2 norm of the
        gradient reaching one time step of the input, over the first and the last 10% of its ``time_steps``.
    """
    out: dict[str, dict[str, float | int]] = {}
    last = int(h.steps[-1])
    for step, name, early, late, steps in h.times:
        if (since is None or step >= since) and step <= last:
            out[name] = {"step": int(step), "early": float(early), "late": float(late), "time_steps": int(steps)}
    return out


def run_meta(version: str, model: str | None, optimizer: str | None, layers: list[tuple[str, int]],
             options: dict[str, Any]) -> dict[str, Any]:
    """The contents of ``meta.json`` (schema 1)."""
    import torch  # the version only

    return {
        "schema": 1,
        "gradguard": version,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": model,
        "optimizer": optimizer,
        "layers": [{"name": n, "numel": k} for n, k in layers],
        "options": options,
    }

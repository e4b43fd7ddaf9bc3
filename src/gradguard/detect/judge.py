"""Room 2 of the flow, the judge: host rows in, diagnoses out.

It keeps the host-side ``History`` (running statistics, early baselines, samples), runs the detectors on each
host read and deduplicates their verdicts through the ``Reporter``; mode verdicts from the mode watcher pass
through the same reporter. It reads only host NumPy (the recorder's ``HostRead``) and touches nothing on the
model or the optimizer.

Room: the judge. It may touch: ``detect``, ``stats.layers``, ``stats.measured``, ``stats.recorder``,
``stats.sentinel``, ``types``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from torch import nn

from ..stats.layers import LayerMap
from ..stats.measured import HostRead
from ..stats.recorder import CLIPPED, HEAD, LOSS, SCALER_INF, TOTAL
from ..stats.sentinel import Origin
from ..types import Diagnosis
from .advice import ModelFacts, advise
from .early import EARLY_STEPS, detect_early_divergence
from .exploding import detect_exploding_step, detect_exploding_window, detect_spike_damage, step_candidates
from .history import History, Thresholds, explained_by_explosion
from .nonfinite import detect_nonfinite
from .reporter import Reporter, Verdict
from .stalled import detect_stalled
from .units import FLOW_KEY, detect_dead_flow, detect_units
from .vanishing import detect_vanishing


class Judge:
    """Turns host reads into verdicts and keeps the diagnoses.

    Args:
        layers: the tracked layers (read when the history starts: by then they are in forward order).
        module_order: every module name of the model in registration order (to tell the output activation).
        thresholds, ema_beta: detector thresholds and the running statistics' decay.
        keep: steps of history kept on the host. cooldown: steps before a gone condition is reported again.
    """

    def __init__(self, layers: LayerMap, module_order: list[str], thresholds: Thresholds, ema_beta: float,
                 keep: int, cooldown: int) -> None:
        self.layers = layers
        self.thresholds = thresholds
        self.ema_beta = ema_beta
        self.keep = keep
        self._position = {n: i for i, n in enumerate(module_order)}
        self.reporter = Reporter(cooldown)
        self.diagnoses: list[Diagnosis] = []
        self.history: History | None = None
        self.pending_state: dict[str, Any] | None = None  # a loaded state waiting for the first read
        self.facts: ModelFacts | None = None  # set at attach: remedies fitted to the model (advice.py)
        self._acts_seen = 0
        # Window rules judge ``window`` steps of evidence: run about once a quarter window, not at every read (at
        # the default 10-step reads they would re-judge 90% the same steps, and they are most of a read's cost on
        # a small model). Per-step rules run at every read.
        self.window_every = max(1, thresholds.window // 4)
        self._window_at: int | None = None

    def offer(self, verdict: Verdict) -> Diagnosis | None:
        """A verdict from any detector: a new Diagnosis to report, or None when it is not new."""
        d = self.reporter.offer(verdict)
        if d is not None:
            if self.facts is not None:
                d = advise(d, self.facts, self.diagnoses)
            self.diagnoses.append(d)
        return d

    def ingest(self, read: HostRead) -> tuple[History, np.ndarray]:
        """Append a host read to the history.

        Returns:
            The history and the rows kept (steps GradScaler skipped itself are not this run's steps).
        """
        h = self.ensure_history()
        # Steps GradScaler skipped itself (overflow in fp16) are not this run's steps: no row, as for a non-fused
        # optimizer, whose step() the scaler does not even call.
        rows, steps, seen = read.rows, read.steps, read.loss_seen
        if rows[:, SCALER_INF].any():  # rare: no masked copies of every column at every read
            keep = rows[:, SCALER_INF] == 0
            rows, steps, seen = rows[keep], steps[keep], seen[keep]
        # The post-clip total is kept whoever clipped: gradguard's clip, or the script's own clip_grad_norm_ (the
        # recorder writes what it leaves); an unclipped step carries its own total there, which is no cut.
        h.append(steps, rows[:, TOTAL], rows[:, LOSS], seen, rows[:, HEAD:], rows[:, CLIPPED])
        for step, w, u, after in read.samples:
            h.sample_steps.append(step)
            h.weight.append(w)
            h.update.append(u)
            h.after.append(after)
        for step, name, call, what, value in read.acts:
            # A unit mask is kept packed (1 bit a unit): the last 8 samples of every activation module.
            h.add_act(step, name, call, what, value > 0 if what == "active" else
                      tuple(float(v) for v in value))  # (flat fraction, relative slope)
        h.times.extend(read.times)
        if read.activation_order:
            h.activation_order = read.activation_order
            h.output_activation = self._output_activation(read.activation_order[-1])
        return h, rows

    def detect(self, h: History, n_rows: int, origins: dict[int, Origin | None],
               full: bool = False) -> list[Verdict]:
        """Run the detectors on the ``n_rows`` newest rows (and the windows ending there).

        Args:
            origins: where the NaN/Inf of a step was born (from a replay), by step; entries used are removed.
            full: run the window rules whether or not they are due (``Guard.check()``, close).

        Returns:
            Every verdict found, in step order (not yet deduplicated).
        """
        h._memo = {}  # shared results of this read (History.memo); dropped below, so none outlives the read
        try:
            return self._detect(h, n_rows, origins, full)
        finally:
            h._memo = None

    def _detect(self, h: History, n_rows: int, origins: dict[int, Origin | None], full: bool) -> list[Verdict]:
        th = self.thresholds
        found: list[Verdict | None] = []
        for r in step_candidates(h, range(len(h.steps) - n_rows, len(h.steps)), th):
            found.append(detect_nonfinite(h, r, origins.pop(int(h.steps[r]), None)))
            found.append(detect_exploding_step(h, r, th))
        found += self._one_early_event(found, detect_early_divergence(h, range(len(h.steps) - n_rows, len(h.steps))))
        found += detect_spike_damage(h, th)  # spikes of earlier rows, now that the loss after them is known
        # Once NaN/Inf reached the statistics, every other rule reads garbage (a NaN output looks like a dead
        # ReLU): window rules wait until the window is clean again.
        last = int(h.steps[-1]) if len(h.steps) else None
        # Due: at the first read, once per quarter window (aligned to multiples of it), and at the read where the
        # window first fills (the first moment a whole window can be judged, as before).
        filled = len(h.steps) - n_rows < th.window <= len(h.steps)
        due = full or filled or self._window_at is None or (
            last is not None and last // self.window_every > self._window_at // self.window_every)
        if due and np.isfinite(h.total[-th.window:]).all():
            self._window_at = last
            vanishing_known = any(key[0] == "vanishing" for key in self.reporter.active)
            dead = detect_dead_flow(h, th, FLOW_KEY in self.reporter.active,
                                    self.facts is not None and bool(self.facts.saturating))
            # Gradients exactly 0 are dead units, not vanishing ones: that verdict says what happened and what helps.
            found += [detect_exploding_window(h, th), dead or detect_vanishing(h, th, vanishing_known)]
            if h.acts_version != self._acts_seen:  # unit verdicts change only when a new sample arrived
                self._acts_seen = h.acts_version
                found += detect_units(h, th)
            # Last: a stall no other condition (active now, or found in this read) explains.
            if len(h.steps):  # every row of a read can be a GradScaler-skipped step: then nothing to judge
                active = self.active_kinds(int(h.steps[-1])) | {v.key[0] for v in found if v is not None and v.emit}
                found.append(detect_stalled(h, th, active))
        return sorted((v for v in found if v is not None), key=lambda v: v.diagnosis.step)

    def _one_early_event(self, found: list[Verdict | None], early: Verdict | None) -> list[Verdict | None]:
        """An early divergence and a per-step exploding verdict (growth, spike) of the same first steps are one
        event: a learning rate far too high read by two rules (lr x1000: "diverges from its first steps" and "the
        norm is 253x its early level", both at step 3). The per-step verdict carries the early divergence's
        diagnosis (its first loss and norm, its remedy), so the event is printed once; both conditions are active
        in the reporter (neither is raised again within the cooldown), and the repair ladder still sees both keys.

        Returns:
            The early verdict to add to ``found`` (``found`` is changed in place).
        """
        if early is None:
            return [None]
        for i, v in enumerate(found):
            if v is not None and v.emit and v.key[:2] in (("exploding", "growth"), ("exploding", "spike")) \
                    and v.diagnosis.step < EARLY_STEPS:
                found[i] = Verdict(v.key, v.signature, early.diagnosis)
                self.reporter.active[early.key] = (early.signature, early.diagnosis.step)  # said through found[i]
                return [Verdict(early.key, early.signature, early.diagnosis, emit=False)]
        return [early]

    def catch_up(self, h: History) -> list[Verdict]:
        """The window rules on the newest step, if they have not judged it yet (nothing new to read)."""
        if not len(h.steps) or self._window_at == int(h.steps[-1]):
            return []
        return self.detect(h, 0, {}, full=True)

    def closing_remarks(self, note: Callable[[str, int, str], None]) -> None:
        """At the end of the run, say once whether its loss never came back from a reported explosion.

        While it has not, later stalls and vanishing are that explosion's damage and stay unreported
        (``explained_by_explosion``): without this line a run that ends broken would end on the explosion's report
        alone, as if it had recovered. Host NumPy only; a remark, so nothing here may fail the close.

        Args:
            note: ``(kind, step, message)`` to the console and the run directory (``Outputs.note``).
        """
        h = self.history
        try:
            gone = explained_by_explosion(h, self.thresholds) if h is not None and len(h.steps) else None
            if gone is None or h is None:
                return
            when, before, now = gone
            recent = h.steps[-self.thresholds.window:]
            n = int((recent > when).sum())  # the steps the mean is over (explained_by_explosion's own)
            note("not_recovered", int(h.steps[-1]),
                 f"The loss never came back from the explosion at step {when}: it averaged {now:.4g} over the "
                 f"last {n} steps, against {before:.4g} before it.")
        except Exception:  # noqa: S110 - words at close; the diagnoses and the files are written already
            pass

    def active_kinds(self, step: int) -> set[str]:
        """Kinds with a condition seen within the reporter's cooldown before ``step``."""
        return {key[0] for key, (_, seen) in self.reporter.active.items() if step - seen <= self.reporter.cooldown}

    def _output_activation(self, last: str) -> str | None:
        """``last`` (the last activation module called) if it produces the output: no layer with parameters is
        registered after it (registration order; call order is not recorded between different module kinds)."""
        pos = self._position
        after = max((pos.get(n, -1) for n in self.layers.names), default=-1)
        return last if pos.get(last, -1) > after else None

    def ensure_history(self) -> History:
        if self.history is None:
            embedding = np.array([isinstance(m, (nn.Embedding, nn.EmbeddingBag)) for m in self.layers.modules])
            self.history = History(list(self.layers.names), np.array(self.layers.numel, dtype=np.float64),
                                   embedding, self.ema_beta, self.keep)
            if self.pending_state is not None:
                self.history.load_state_dict(self.pending_state)
                self.pending_state = None
        return self.history

    def history_state(self) -> dict[str, Any]:
        if self.history is not None:
            return self.history.state_dict()
        if self.pending_state is not None:
            return self.pending_state
        return History(list(self.layers.names), np.zeros(0), np.zeros(0), self.ema_beta).state_dict()

    def load_history_state(self, state: dict[str, Any]) -> None:
        if self.history is not None:
            self.history.load_state_dict(state)
        else:
            self.pending_state = state

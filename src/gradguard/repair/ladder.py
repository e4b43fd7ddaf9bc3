"""``Guard(repair="auto")``: the escalation ladder, from the cheapest repair to the last resort.

1. Non-finite gradients: the step is skipped; optimizer state and parameters stay exactly as they were.
2. Spikes: adaptive clipping (ZClip unless the Guard was given another ``clip``).
3. Sustained explosion: the learning rate is multiplied by ``lr_backoff`` (applied around each optimizer step, so
   LR schedulers keep their own values and compose), and given back gradually once training is stable.
4. Divergence (an explosion with a rising loss, repeated non-finite steps, or a loss far above its level at the
   last good snapshot): model and optimizer are rolled back to the last good snapshot, kept in host memory, and the
   learning rate is lowered by ``lr_backoff`` squared; restores never go back above a rate that diverged. Every
   rollback doubles the stretch required before the next one; after ``max_rollbacks`` the ladder stops rolling
   back and says what it tried and what to change. A loss that has given back most of its progress and stays
   there (``_gave_back``) is divergence too, with or without an explosion verdict. Non-finite steps out of a quiet
   run (a corrupted weight, not a rate too high) are rolled back once at the same rate; a restart from the state
   at attach is judged by its own first steps (``_restart_diverges``).

Decisions 3 and 4 are taken on the host at the Guard's statistics reads (every ``log_every`` steps); decision 1 at
every step (see ``Guard``).

Room: the repairer. It may touch: ``detect.history``, ``repair``, ``types``.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import nn

from ..detect.history import History
from ..types import Action
from .snapshot import Snapshot, holds_nonfinite, owned_model_state, restore_model, to_host
from .weights import Corruption

EARLY_SEARCH = 4  # rollbacks to the state at attach, a decade lower each: down to 1e-4 of the rate set
LOSS_RISE, GRAD_RISE = 10.0, 1e3  # a restart diverges as detect.early says a run's first steps do
RESTART_WINDOW = 50  # steps after a restart judged by their own rows only (the detectors' windows hold older ones)
QUIET = 50  # steps without trouble before non-finite steps that make them "out of a quiet run"


class Ladder:
    """State and decisions of the repair ladder.

    Args:
        lr_backoff: factor applied to the learning rate on a sustained explosion (and squared on a rollback).
        restore_after: stable steps before each step back toward the original learning rate.
        snapshot_every: steps between snapshots of a healthy run (host memory: one copy of model + optimizer).
        max_rollbacks: rollbacks before the ladder gives up rolling back.
    """

    def __init__(self, lr_backoff: float = 0.5, restore_after: int = 100, snapshot_every: int = 100,
                 max_rollbacks: int = 3) -> None:
        if not 0 < lr_backoff < 1:
            raise ValueError(f"lr_backoff must be in (0, 1), got {lr_backoff}")
        self.lr_backoff, self.restore_after = lr_backoff, restore_after
        self.snapshot_every, self.max_rollbacks = snapshot_every, max_rollbacks
        self.lr_mult = 1.0
        self.ceiling = 1.0  # restores go back up to here; a rollback lowers it (that learning rate diverged)
        self.last_trouble = -(10**9)  # step of the last explosion or non-finite step
        self.last_backoff = -(10**9)
        self.last_restore = -(10**9)
        self.snapshot: Snapshot | None = None  # the newest trusted state (see healthy_for_snapshot)
        self.initial: Snapshot | None = None  # the state at attach: a fault before any trusted snapshot rolls back here
        self.best_level = float("inf")  # the lowest recent loss level at a trusted snapshot
        self.streak = 0  # consecutive reads with an explosion: each lowers the rate more than the one before
        self.early_rollbacks = 0  # rollbacks to the state at attach before any trusted snapshot (a rate search)
        self.rollbacks = 0
        self.last_rollback = -(10**9)
        self.gave_up = False
        self.backoffs = 0
        self.after_rollback = -(10**9)  # first step of the rows after the last rollback (a read can end at its step)
        self.restart_at = -(10**9)  # that step for the last restart from the state at attach (its steps re-judged)
        self.sudden = False  # the current non-finite episode came out of a quiet run, with no explosion
        self.kept_rate = False  # the one rollback at the same rate (for a sudden episode) has been spent
        self.same_rate = False  # the rollback due is that one
        self.why = ""  # what the due rollback is for (words for its Action and the give-up message; not state)

    # ------------------------------------------------------------------ learning rate around each step

    def scale_lr(self, optimizer: torch.optim.Optimizer) -> list[Any] | None:
        """Multiply every group's lr by ``lr_mult`` for this step; returns what to put back (None: untouched)."""
        if self.lr_mult == 1.0:
            return None
        saved = [g["lr"] for g in optimizer.param_groups]
        for g in optimizer.param_groups:
            g["lr"] = g["lr"] * self.lr_mult if not isinstance(g["lr"], torch.Tensor) else g["lr"].mul(self.lr_mult)
        return saved

    @staticmethod
    def unscale_lr(optimizer: torch.optim.Optimizer, saved: list[Any] | None) -> None:
        if saved is not None:  # the exact values the scheduler set, not lr * m / m
            for g, lr in zip(optimizer.param_groups, saved):
                g["lr"] = lr

    # ------------------------------------------------------------------ decisions at a statistics read

    def decide(self, h: History, n_rows: int, exploding: bool, step: int, diverging: bool = False,
               early: bool = False, damaged: bool = False) -> list[Action | str]:
        """What to do after the rows just read. Returns actions, and the string "rollback" when a rollback is due.

        Args:
            h: the history (the new rows are its last ``n_rows``).
            exploding: an exploding verdict was found in this read.
            step: steps taken so far.
            diverging: the explosion comes with a rising loss (the Guard's "growth" verdict): weights are being
                damaged now, so a backoff alone is too slow.
            early: the run diverged within its first steps: back to the state at attach.
            damaged: units died or saturated right after an explosion: the explosion's damage, rolled back.
        """
        out: list[Action | str] = []
        pile = False  # the explosion is non-finite steps piling up, not a verdict
        new = slice(len(h.steps) - n_rows, len(h.steps))
        bad_rows = ~np.isfinite(h.total[new])
        if bad_rows.any():
            if int(h.steps[new][bad_rows][0]) - self.last_trouble >= QUIET:  # a new episode, out of a quiet run
                self.sudden = not (exploding or diverging)
            self.last_trouble = int(h.steps[new][bad_rows][-1])
            # Skipped steps piling up (3 in the last 20) are an explosion too: without a lower rate the run would
            # skip forever. One skipped step is not: the skip alone repairs it. Nor are those of a sudden episode
            # (an Inf written into a weight): the rollback repairs them, the rate is not their cause. Nor are those
            # with no step applied since the last backoff: the weights did not move, the rate changed nothing.
            last20 = slice(max(0, len(h.steps) - 20), len(h.steps))
            piled = int((~np.isfinite(h.total[last20]) & (h.steps[last20] >= self.after_rollback)).sum()) >= 3
            moved = bool(np.isfinite(h.total[h.steps >= self.last_backoff]).any())
            pile = piled and moved and not (self.sudden and not self.kept_rate) and not exploding
            exploding = exploding or pile
        if self.snapshot is None and self.early_rollbacks and step - self.restart_at <= RESTART_WINDOW:
            # Restarted from the state at attach: the detectors' windows and running means still hold the rows of
            # the divergence before it, and keep reporting it. The restart is judged by its own rows only.
            exploding = diverging = damaged = False
            early = self._restart_diverges(h)
        if exploding or diverging:
            self.sudden = False
        if ((exploding or diverging or early) and self.snapshot is None and self.initial is not None
                and self.early_rollbacks < EARLY_SEARCH and not self.gave_up):
            # No trusted state yet: the run has been in trouble since attach. Back to the start, with a rate ten
            # times lower each time (a learning rate 1000x too high is found in three), rather than backing off
            # step by step while the weights are being thrown away.
            self.last_trouble = step
            self.why = "an explosion from the state at attach"
            self.after_rollback = int(h.steps[-1]) + 1 if len(h.steps) else step
            out.append("rollback_initial")
            return out
        if exploding:
            self.last_trouble = step
            if step - self.last_backoff >= max(10, n_rows):  # at most one backoff per read (and per 10 steps)
                # An explosion that persists read after read lowers the rate faster each time (x0.5, x0.25,
                # x0.125 ...): a learning rate 1000x too high is down to a working one in four reads, not ten.
                self.streak = self.streak + 1 if step - self.last_backoff <= 2 * max(10, n_rows) else 1
                old = self.lr_mult
                self.lr_mult *= self.lr_backoff ** self.streak
                self.last_backoff = step
                self.backoffs += 1
                why = "non-finite steps piling up (3 in the last 20)" if pile else "sustained explosion"
                out.append(Action("lr_backoff", step, {"lr_multiplier": self.lr_mult, "was": old, "why": why}))
        recent = slice(max(0, len(h.steps) - 20), len(h.steps))
        nonfinite_recent = int((~np.isfinite(h.total[recent])).sum())
        loss_blowup = False
        if self.snapshot is not None and exploding:
            seen = h.loss_seen[recent] & np.isfinite(h.loss[recent])
            at_snap = h.loss[(h.steps <= self.snapshot.step) & h.loss_seen & np.isfinite(h.loss)]
            if seen.any() and len(at_snap):
                loss_blowup = float(np.mean(h.loss[recent][seen])) > 2.0 * float(np.mean(at_snap[-20:]))
        gave_back = self._gave_back(h)
        target = self.snapshot if self.snapshot is not None and not early else self.initial
        if ((nonfinite_recent >= 3 or loss_blowup or diverging or early or damaged or gave_back)
                and target is not None and not self.gave_up):
            wait = 20 * 2 ** self.rollbacks  # every rollback makes the next one harder to trigger
            if step - self.last_rollback >= wait:
                self.why = (f"{nonfinite_recent} non-finite steps in the last 20" if nonfinite_recent >= 3 else
                            "an explosion with a rising loss" if loss_blowup or diverging else
                            "an explosion in the first steps" if early else
                            "units dying or saturating after an explosion" if damaged else
                            "a loss that gave back most of its progress")
                self.same_rate = nonfinite_recent >= 3 and self.sudden and not self.kept_rate
                self.after_rollback = int(h.steps[-1]) + 1 if len(h.steps) else step
                out.append("rollback" if target is self.snapshot else "rollback_initial")
        if (self.lr_mult < self.ceiling and step - self.last_trouble >= self.restore_after
                and step - self.last_restore >= self.restore_after):
            old = self.lr_mult
            self.lr_mult = min(self.ceiling, self.lr_mult / self.lr_backoff)
            self.last_restore = step
            out.append(Action("lr_restore", step, {"lr_multiplier": self.lr_mult, "was": old}))
        return out

    def _restart_diverges(self, h: History) -> bool:
        """The steps since a restart from the state at attach, judged as ``detect.early`` judges a run's first
        steps (which it does only once): a loss ``LOSS_RISE`` times its first value, a non-finite step, or a
        gradient ``GRAD_RISE`` times its first norm without the loss having fallen. The rate search then goes a
        decade lower again (a rate 1000x too high was left at 100x: the detectors, their running statistics full
        of the first divergence, saw nothing new)."""
        if not h.first_totals:
            return False
        rows = (h.steps >= self.restart_at) & (h.steps < self.restart_at + RESTART_WINDOW)
        if not rows.any():
            return False
        if not np.isfinite(h.total[rows]).all():
            return True
        t0 = h.first_totals[0][1]
        seen = h.loss_seen[rows]
        if h.first_losses and h.first_losses[0][1] > 0:
            ratio = np.where(seen, h.loss[rows], np.nan) / h.first_losses[0][1]
            if (~np.isfinite(ratio[seen])).any() or (ratio[seen] >= LOSS_RISE).any():
                return True
            not_fallen = ~seen | (np.nan_to_num(ratio, nan=1.0) >= 1.0)
        else:
            not_fallen = np.ones(int(rows.sum()), dtype=bool)
        return bool(t0 > 0 and ((h.total[rows] >= GRAD_RISE * t0) & not_fallen).any())

    def _gave_back(self, h: History) -> bool:
        """The loss has given back most of what the run had learned, and stays there: over the last 50 steps (30
        at least, all since the last rollback) even its best 20-step mean is above 1.5x the best 20-step mean from
        before them (or the trusted snapshot's level) and more than halfway back from that to the level at attach.
        Divergence, whatever the gradients said (a rate too high kills the units of a ReLU net quietly, without a
        spike the detectors call an explosion). Losses >= 0 only."""
        ok = h.loss_seen & np.isfinite(h.loss)
        if len(h.first_losses) < 3 or not ok.any() or float(h.loss[ok].min()) < 0:
            return False
        rows = np.flatnonzero(ok)
        recent = rows[(rows >= len(h.steps) - 50) & (h.steps[rows] >= self.after_rollback)]
        past = rows[rows < (recent[0] if len(recent) else len(h.steps))]
        if len(recent) < 30:
            return False

        def best20(idx: np.ndarray) -> float:
            return float(np.convolve(h.loss[idx], np.ones(20) / 20, mode="valid").min()) if len(idx) >= 20 else np.inf

        best = min(self.best_level, best20(past))
        start = float(np.median([v for _, v in h.first_losses]))
        level = best20(recent)
        return bool(np.isfinite(best)) and start > best and level > 1.5 * best and level - best > 0.5 * (start - best)

    def healthy_for_snapshot(self, h: History, step: int, active: set[str] | frozenset[str] = frozenset()) -> bool:
        """A snapshot is taken of a run that has been quiet for a while, at most every ``snapshot_every`` steps,
        and only of a state worth returning to: its recent loss at or below the level at attach and within 10% of
        the best level of an earlier snapshot, no exploding, non-finite or dead-units condition active. (A state
        taken just after a spike, with most ReLU units dead, was the rollback target that doomed a rescue.)"""
        due = self.snapshot is None or step - self.snapshot.step >= self.snapshot_every
        window = slice(max(0, len(h.steps) - 50), len(h.steps))
        if not (due and step - self.last_trouble >= 50 and bool(np.isfinite(h.total[window]).all())):
            return False
        if active & {"exploding", "nonfinite", "dead_units"}:
            return False
        recent = slice(max(0, len(h.steps) - 20), len(h.steps))
        seen = h.loss_seen[recent] & np.isfinite(h.loss[recent])
        if not seen.any() or not h.first_losses:
            return True  # no loss to judge by: quiet gradients are all there is
        level = float(np.mean(h.loss[recent][seen]))
        early = float(np.median([v for _, v in h.first_losses]))
        if level > early or level > 1.1 * self.best_level:
            return False
        self.best_level = min(self.best_level, level)
        return True

    # ------------------------------------------------------------------ snapshots

    def take_snapshot(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int,
                      initial: bool = False) -> None:
        """Copy model and optimizer state to host memory: the newest trusted snapshot, or (``initial``) the state
        at attach. At most two copies are kept, so host memory holds up to twice the model and optimizer state.
        Of the model, only what this optimizer owns (``snapshot.owned_model_state``: all of it with one optimizer)."""
        old = self.initial if initial else self.snapshot
        state, partial = owned_model_state(model, optimizer)
        snap = Snapshot(step, to_host(state, old.model if old else None),
                        to_host(optimizer.state_dict(), old.optimizer if old else None), self.lr_mult, partial)
        if initial:
            self.initial = snap
        else:
            self.snapshot = snap

    def rollback(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int, initial: bool = False,
                 corrupt: Corruption | None = None) -> Action | None:
        """Restore the newest trusted snapshot (or, ``initial``, the state at attach) bitwise, lower the learning
        rate; give up after max_rollbacks. ``corrupt``: weights the loss could not see were found non-finite; the
        target is then the newest snapshot from before them (see ``corrupt_target``), at the same rate the first
        time. A snapshot that holds a non-finite weight is never a target: the state at attach replaces it. Returns
        None when no finite state is left to go back to."""
        snap = (self.corrupt_target(corrupt) if corrupt is not None
                else self.initial if initial or self.snapshot is None else self.snapshot)
        if snap is None:
            return None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()  # the snapshot's copies into pinned memory are asynchronous (rare: rollbacks)
        if holds_nonfinite(model, snap):  # taken after a weight the loss could not see was corrupted
            if snap is self.snapshot:
                self.snapshot = None
            if snap is self.initial or self.initial is None or holds_nonfinite(model, self.initial):
                return None
            snap = self.initial
        if len(snap.optimizer.get("param_groups", ())) != len(optimizer.param_groups):
            # Taken before the optimizer gained a group (add_param_group; the Guard takes new snapshots when it
            # adopts the group, at the next step): load_state_dict would refuse it. No rollback, model untouched.
            return None
        restore_model(model, snap)
        # The learning rates in force now are the scheduler's (and the snapshot may have been taken inside a step
        # with the ladder's multiplier applied): keep them, restore everything else.
        current: list[dict[str, Any]] = [{k: g[k] for k in ("lr", "initial_lr") if k in g}
                                         for g in optimizer.param_groups]
        optimizer.load_state_dict(copy.deepcopy(snap.optimizer))
        for g, keep in zip(optimizer.param_groups, current):
            g.update(keep)
        if self.after_rollback <= self.last_rollback + 1:  # not set by decide for this one (a direct call)
            self.after_rollback = step
        self.rollbacks += 1
        self.last_rollback = step
        searching = (corrupt is None and snap is self.initial and self.snapshot is None
                     and self.early_rollbacks < EARLY_SEARCH)
        same_rate = (snap is self.snapshot and self.same_rate) or (corrupt is not None and not self.kept_rate)
        was = self.lr_mult
        detail: dict[str, Any] = {"to_step": snap.step}
        if corrupt is not None:
            self.why = (f"non-finite weights in {', '.join(repr(n) for n in corrupt.layers[:3])} (sampled weight norm "
                        f"at step {corrupt.step}) that the loss and gradients did not show")
        if searching:  # the rate search from attach: a decade lower each time (see decide)
            self.early_rollbacks += 1
            self.restart_at = self.after_rollback
            self.lr_mult = min(snap.lr_mult, self.lr_mult) * 0.1
            detail["why"] = "no trusted state since attach: back to the start with a 10x lower learning rate"
        elif same_rate:  # non-finite values out of a quiet run: the state was corrupted, not the rate too high
            self.kept_rate = True
            where = ": rolled back to a state from before them" if corrupt is not None else \
                " out of a quiet run (no explosion before them): rolled back"
            detail["why"] = (f"{self.why or 'non-finite steps'}{where} at the same learning rate; if they come back, "
                             "the next rollback lowers it")
        else:
            self.lr_mult = min(snap.lr_mult, self.lr_mult) * self.lr_backoff ** 2
            if self.why:
                detail["why"] = self.why
        self.sudden = self.same_rate = False
        self.ceiling = self.lr_mult
        self.last_trouble = step
        detail.update(lr_multiplier=self.lr_mult, rollbacks=self.rollbacks)
        if self.rollbacks - self.early_rollbacks >= self.max_rollbacks:
            self.gave_up = True
            detail["stopped"] = self.give_up_text(step, snap.step, was)
        self.why = ""
        return Action("rollback", step, detail)

    def corrupt_target(self, corrupt: Corruption) -> Snapshot | None:
        """The newest snapshot taken no later than the last sample whose weights were all finite (a later one may
        hold the corruption: it is dropped); None when there is none, or the ladder has given up."""
        if self.gave_up or corrupt.good is None:
            return None
        if self.snapshot is not None and self.snapshot.step > corrupt.good:
            self.snapshot = None
        for snap in (self.snapshot, self.initial):
            if snap is not None and snap.step <= corrupt.good:
                return snap
        return None

    def give_up_text(self, step: int, to_step: int, was: float) -> str:
        """What the ladder tried, and what the user should change, when it stops rolling back (``was``: the
        learning-rate multiplier in force when the last rollback was decided)."""
        tried = []
        if self.rollbacks > self.early_rollbacks:
            n = self.rollbacks - self.early_rollbacks
            tried.append(f"{n} rollback{'s' * (n != 1)} to a trusted state (the last, now, to step {to_step})")
        if self.early_rollbacks:
            tried.append(f"{self.early_rollbacks} restart{'s' * (self.early_rollbacks != 1)} from the state at "
                         "attach, each with a 10x lower learning rate")
        if self.backoffs:
            tried.append(f"{self.backoffs} learning-rate backoff{'s' * (self.backoffs != 1)}")
        cause = self.why or "the divergence"
        if "non-finite" in cause:
            change = ("find where the NaN/Inf comes from: check the input batches and the labels, the loss (a log "
                      "or division at 0), and fp16 overflow (use torch.amp.GradScaler or bf16); if the gradient "
                      "norm grew before them, lower the learning rate too")
        else:
            change = (f"restart from a checkpoint taken before the trouble with a learning rate at most "
                      f"{self.lr_mult:.3g}x the one set (it still diverged at {was:.3g}x), with a warm-up, and clip "
                      "the gradient norm; if it still diverges, look at guard.diagnoses for a model problem "
                      "(initialisation, normalisation, a wrong loss)")
        tried_text = ", ".join(tried[:-1]) + " and " + tried[-1] if len(tried) > 1 else tried[0]
        return (f"Rollback limit reached at step {step} (max_rollbacks={self.max_rollbacks}): tried {tried_text} "
                f"against {cause}. If it comes back, training goes on at {self.lr_mult:.3g}x the learning rate "
                f"set with non-finite steps skipped, but it will not be rolled back again. To save the run: "
                f"{change}.")

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k not in ("snapshot", "initial", "why")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)

"""``Guard(repair="auto")``: the escalation ladder, from the cheapest repair to the last resort.

1. Non-finite gradients: the step is skipped; optimizer state and parameters stay exactly as they were.
2. Spikes: adaptive clipping (ZClip unless the Guard was given another ``clip``).
3. Sustained explosion: the learning rate is multiplied by ``lr_backoff`` (applied around each optimizer step, so
   LR schedulers keep their own values and compose), and given back gradually once training is stable.
4. Divergence (an explosion with a rising loss, repeated non-finite steps, or a loss far above its level at the
   last good snapshot): model and optimizer are rolled back to the last good snapshot, kept in host memory, and the
   learning rate is lowered by ``lr_backoff`` squared; restores never go back above a rate that diverged. Every
   rollback doubles the stretch required before the next one; after ``max_rollbacks`` the ladder stops rolling
   back and says why.

Decisions 3 and 4 are taken on the host at the Guard's statistics reads (every ``log_every`` steps); decision 1 at
every step (see ``Guard``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..detect.history import History
from ..types import Action


def _to_host(obj: Any, reuse: Any = None, memo: dict[tuple[Any, ...], torch.Tensor] | None = None) -> Any:
    """A deep copy with every tensor in host memory.

    A tensor on an accelerator goes into page-locked (pinned) memory with an asynchronous copy, ordered on the
    stream before any later update of it: the host does not wait, and the copy engine runs several times faster
    than into pageable memory (on an H200 a 124 M-parameter AdamW snapshot took 0.44 s pageable, one blocking copy
    per tensor, which made repair="auto" cost 1.1x per step). The pinned buffers of the previous snapshot are
    reused (``reuse``): pinning is slow, and the old snapshot is replaced anyway. Read the copies on the host only
    after a sync (``Ladder.rollback`` does one). DTensors and CPU tensors are copied as before.

    Tensors that are views of the same memory (tied weights: a language model's input embedding and output layer
    appear twice in ``state_dict()``) are copied once (``memo``), so the snapshot keeps them tied and costs no more
    than the model: 49 MiB saved on the 4 x 256 GPT-2 of BENCHMARKS.md, whose vocabulary matrix is tied.
    """
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        key = None
        if type(t) is torch.Tensor and t.layout == torch.strided:
            key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            if key in memo:
                return memo[key]
        if t.device.type == "cpu" or type(t) is not torch.Tensor:  # CPU, or a DTensor (its own .to keeps shards)
            out = t.to("cpu", copy=True)
        else:
            same = (isinstance(reuse, torch.Tensor) and reuse.shape == t.shape and reuse.dtype == t.dtype
                    and reuse.is_pinned())
            out = reuse if same else torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            out.copy_(t, non_blocking=True)
        if key is not None:
            memo[key] = out
        return out
    if isinstance(obj, dict):
        old = reuse if isinstance(reuse, dict) else {}
        return {k: _to_host(v, old.get(k), memo) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        old_seq = reuse if isinstance(reuse, type(obj)) and len(reuse) == len(obj) else [None] * len(obj)
        return type(obj)(_to_host(v, r, memo) for v, r in zip(obj, old_seq))
    return copy.deepcopy(obj)


EARLY_SEARCH = 4  # rollbacks to the state at attach, a decade lower each: down to 1e-4 of the rate set


@dataclass
class Snapshot:
    step: int
    model: dict[str, Any]
    optimizer: dict[str, Any]
    lr_mult: float


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
        new = slice(len(h.steps) - n_rows, len(h.steps))
        bad_rows = ~np.isfinite(h.total[new])
        if bad_rows.any():
            self.last_trouble = int(h.steps[new][bad_rows][-1])
            # Skipped steps piling up (3 in the last 20) are an explosion too: without a lower rate the run would
            # skip forever. One skipped step is not: the skip alone repairs it.
            exploding = exploding or int((~np.isfinite(h.total[max(0, len(h.steps) - 20):])).sum()) >= 3
        if ((exploding or diverging or early) and self.snapshot is None and self.initial is not None
                and self.early_rollbacks < EARLY_SEARCH and not self.gave_up):
            # No trusted state yet: the run has been in trouble since attach. Back to the start, with a rate ten
            # times lower each time (a learning rate 1000x too high is found in three), rather than backing off
            # step by step while the weights are being thrown away.
            self.last_trouble = step
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
                out.append(Action("lr_backoff", step, {"lr_multiplier": self.lr_mult, "was": old,
                                                       "why": "sustained explosion"}))
        recent = slice(max(0, len(h.steps) - 20), len(h.steps))
        nonfinite_recent = int((~np.isfinite(h.total[recent])).sum())
        loss_blowup = False
        if self.snapshot is not None and exploding:
            seen = h.loss_seen[recent] & np.isfinite(h.loss[recent])
            at_snap = h.loss[(h.steps <= self.snapshot.step) & h.loss_seen & np.isfinite(h.loss)]
            if seen.any() and len(at_snap):
                loss_blowup = float(np.mean(h.loss[recent][seen])) > 2.0 * float(np.mean(at_snap[-20:]))
        target = self.snapshot if self.snapshot is not None and not early else self.initial
        if ((nonfinite_recent >= 3 or loss_blowup or diverging or early or damaged) and target is not None
                and not self.gave_up):
            wait = 20 * 2 ** self.rollbacks  # every rollback makes the next one harder to trigger
            if step - self.last_rollback >= wait:
                out.append("rollback" if target is self.snapshot else "rollback_initial")
        if (self.lr_mult < self.ceiling and step - self.last_trouble >= self.restore_after
                and step - self.last_restore >= self.restore_after):
            old = self.lr_mult
            self.lr_mult = min(self.ceiling, self.lr_mult / self.lr_backoff)
            self.last_restore = step
            out.append(Action("lr_restore", step, {"lr_multiplier": self.lr_mult, "was": old}))
        return out

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
        at attach. At most two copies are kept, so host memory holds up to twice the model and optimizer state."""
        old = self.initial if initial else self.snapshot
        snap = Snapshot(step, _to_host(model.state_dict(), old.model if old else None),
                        _to_host(optimizer.state_dict(), old.optimizer if old else None), self.lr_mult)
        if initial:
            self.initial = snap
        else:
            self.snapshot = snap

    def rollback(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int,
                 initial: bool = False) -> Action:
        """Restore the newest trusted snapshot (or, ``initial``, the state at attach) bitwise, lower the learning
        rate; give up after max_rollbacks."""
        snap = self.initial if initial or self.snapshot is None else self.snapshot
        assert snap is not None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()  # the snapshot's copies into pinned memory are asynchronous (rare: rollbacks)
        model.load_state_dict(snap.model)
        # The learning rates in force now are the scheduler's (and the snapshot may have been taken inside a step
        # with the ladder's multiplier applied): keep them, restore everything else.
        current: list[dict[str, Any]] = [{k: g[k] for k in ("lr", "initial_lr") if k in g}
                                         for g in optimizer.param_groups]
        optimizer.load_state_dict(copy.deepcopy(snap.optimizer))
        for g, keep in zip(optimizer.param_groups, current):
            g.update(keep)
        self.rollbacks += 1
        self.last_rollback = step
        searching = snap is self.initial and self.snapshot is None and self.early_rollbacks < EARLY_SEARCH
        if searching:  # the rate search from attach: a decade lower each time (see decide)
            self.early_rollbacks += 1
            self.lr_mult = min(snap.lr_mult, self.lr_mult) * 0.1
        else:
            self.lr_mult = min(snap.lr_mult, self.lr_mult) * self.lr_backoff ** 2
        self.ceiling = self.lr_mult
        self.last_trouble = step
        detail: dict[str, Any] = {"to_step": snap.step, "lr_multiplier": self.lr_mult, "rollbacks": self.rollbacks}
        if searching:
            detail["why"] = "no trusted state since attach: back to the start with a 10x lower learning rate"
        if self.rollbacks - self.early_rollbacks >= self.max_rollbacks:
            self.gave_up = True
            detail["stopped"] = (f"{self.rollbacks} rollbacks did not stabilise training: no further rollbacks. "
                                 "Lower the learning rate or fix the model before training on.")
        return Action("rollback", step, detail)

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k not in ("snapshot", "initial")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)

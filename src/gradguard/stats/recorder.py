"""Room 1 of the flow, the step recorder: measures each step on the device and queues it for the host.

It owns what is measured per optimizer step (per-layer gradient norms in one fused pass, the total norm, the
observed loss, GradScaler's overflow flag), the costlier samples taken every ``sample_every`` steps (weight norms,
update norms, activation and time-step statistics) and the one host read that moves them all to the host every
``log_every`` steps (``read()``). Nothing here reads a device value in the per-step path, and nothing here judges:
the rows go to ``detect.judge``. It is told the clipped norm by the repairer (``commit``),
without importing it.

Room: the step recorder. It may touch: ``stats``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from .activations import ActivationSampler
from .distributed import all_reduce_sum, is_sharded, local, world
from .layers import LayerMap
from .loss_tally import LossTally
from .measured import HostRead, Measured
from .norms import LayerNorms, finish, total_norm

# Columns of a step row: total gradient norm, loss, total norm after clipping, whether GradScaler found inf/NaN
# (and so skips the step itself), then the per-layer gradient norms.
TOTAL, LOSS, CLIPPED, SCALER_INF, HEAD = 0, 1, 2, 3, 4


def stats_device(params: list[nn.Parameter]) -> torch.device:
    """Where the statistics live: the first accelerator holding a parameter, else the CPU.

    An accelerator is preferred so that per-group norms only ever move toward it (a non-blocking copy from an
    accelerator into CPU memory could be read before it lands).
    """
    for p in params:
        if p.device.type != "cpu":
            return p.device
    return torch.device("cpu")


class StepRecorder:
    """Measures steps on the device; ``read()`` brings everything queued to the host in one copy.

    Args:
        layers: the tracked parameters and their layers.
        named: ``model.named_modules()`` of the inner model for activation sampling ([] for a compiled model).
        sample_every: steps between weight/update/activation samples.
        with_optimizer: an optimizer steps the weights (update ratios need a weight copy before its step).
        compiled: the model is ``torch.compile``d: no activation sampling (submodule hooks would recompile it).
    """

    def __init__(self, layers: LayerMap, named: list[tuple[str, nn.Module]], sample_every: int,
                 with_optimizer: bool, compiled: bool) -> None:
        self.layers = layers
        self.sample_every = sample_every
        self.with_optimizer = with_optimizer
        self.compiled = compiled
        self.device = stats_device(layers.params)
        self.rank, self.world = world()
        self.sharded = self.world > 1 and any(is_sharded(p) for p in layers.params)
        self.sampler = ActivationSampler([] if compiled else named)
        # Statistics on the CPU of one process: steps are folded and queued as rows of floats (reading a CPU tensor
        # is a memory load, not a sync), which costs a tiny model a fraction of the torch operators' dispatch.
        self.host = self.device.type == "cpu" and self.world == 1
        # On CUDA the per-step norms accumulate in float64: a finite gradient entry above ~1.8e19 has a float32
        # square beyond float32, and in deferred mode there is no per-step read to measure such a step again. The
        # fused kernel casts each element to the output's type before squaring, and stays memory-bound on every GPU
        # (one multiply-add per element read), so this costs two tiny casts a step. Elsewhere float32: the CPU's
        # float64 pass converts every tensor (about 10x slower) and MPS has no float64.
        self.wide_norms = self.device.type == "cuda"
        self.step = 0  # optimizer steps taken since attach (or restored by load_state_dict)
        self.last_total: torch.Tensor | float | None = None  # a float on the host path
        self._zero = torch.zeros((), dtype=torch.float32, device=self.device)  # read-only: stacked into rows
        self.losses = LossTally(self.device, self.host)  # this step's loss, until it is measured
        self.script_max_norm: float | None = None  # the max_norm of the script's own clip_grad_norm_, once seen
        self._norms: LayerNorms | None = None
        self._rows: list[Any] = []  # device tensors, or lists of floats on the host path
        self._row_steps: list[int] = []
        self._row_loss_seen: list[bool] = []
        # (step, weight norms, update norms [+ weight norms after the step] or None)
        self._samples: list[tuple[int, Any, Any]] = []  # device tensors, or NumPy on the host path
        self._snapshot: tuple[int, torch.Tensor, list[torch.Tensor] | tuple[torch.Tensor, ...]] | None = None
        self._acts: list[tuple[int, str, int, str, torch.Tensor]] = []
        self._times: list[tuple[int, str, torch.Tensor, torch.Tensor, int]] = []
        self._activation_order: list[str] = []
        self._pending_update: tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None

    @property
    def pending(self) -> int:
        """Rows queued since the last host read."""
        return len(self._rows)

    def observe_loss(self, loss: torch.Tensor | float) -> None:
        """Add one observed loss to this step's (averaged at the step); a tensor stays on the device."""
        self.losses.observe(loss)

    def observe_backward_loss(self, root: torch.Tensor) -> None:
        """A backward's root, this step's loss unless one is given to ``observe_loss`` (see ``LossTally``)."""
        self.losses.observe_root(root)

    def new_accumulation(self) -> None:
        """The gradients start from nothing: backward roots kept so far belong to no step that will come."""
        self.losses.auto = []

    def note_script_clip(self, max_norm: float) -> None:
        """The script clips this step's gradients (already recorded) at ``max_norm``: the row's post-clip total
        becomes what its clip leaves, ``min(total, max_norm)``, so the detectors know a clip bounded the step."""
        self.script_max_norm = max_norm
        if self._rows and self._row_steps[-1] == self.step:
            row = self._rows[-1]  # after any clip of gradguard's too
            if isinstance(row, list):
                row[CLIPPED] = row[CLIPPED] if math.isnan(row[CLIPPED]) else min(row[CLIPPED], max_norm)
            else:
                row[CLIPPED].clamp_(max=max_norm)  # a view into the row

    def drop_last_row(self) -> None:
        """The last queued row belongs to a step that never came (a GradScaler skipped it): forget it."""
        if self._rows and self._row_steps[-1] == self.step:
            self._rows.pop()
            self._row_steps.pop()
            self._row_loss_seen.pop()

    def norms(self) -> LayerNorms:
        if self._norms is None:
            self._norms = LayerNorms(self.layers, self.device, self.rank if self.sharded else None)
        return self._norms

    def reset_norms(self) -> None:
        """The tracked parameters changed (a new optimizer group): rebuild the norm plan at the next step."""
        self._norms = None

    def reorder(self, order: list[str]) -> None:
        """The forward order of the layers became known: report layers in that order."""
        self.layers.reorder(order)
        self._norms = None

    def measure(self, optimizer: Any, found_inf: torch.Tensor | None = None) -> Measured:
        """This step's gradient norms and loss, as device tensors (the per-step path: no host read)."""
        seen = self.losses.settle()
        sample = self.step % self.sample_every == 0
        wnorm: torch.Tensor | None = None
        if self.host:
            return self._measure_host(optimizer, found_inf, seen)
        if self.sharded:
            gnorm, wnorm, loss_pair = self._reduced_norms(sample)
            gnorm, total = self._unscaled(optimizer, gnorm, None)
        else:
            gnorm, total = self._grad_norms(optimizer, wide=self.wide_norms)
        scaler_inf = found_inf if found_inf is not None else getattr(optimizer, "found_inf", None)
        self.last_total = total
        if self.sharded:
            loss = loss_pair[0] / loss_pair[1].clamp_min(1.0)  # the mean over ranks of each rank's loss
        elif self.world > 1:
            pair = all_reduce_sum(self.losses.local_pair())  # DDP: the gradients agree already; the loss does not
            loss = pair[0] / pair[1].clamp_min(1.0)
        else:
            loss = self.losses.device_mean(self._zero)
        self.losses.reset()
        return Measured(gnorm, total, loss, seen, scaler_inf if isinstance(scaler_inf, torch.Tensor) else None, wnorm)

    def _measure_host(self, optimizer: Any, found_inf: torch.Tensor | None, seen: bool) -> Measured:
        """``measure`` with the statistics on the CPU: folded and kept on the host (every read here is a memory
        load, not a sync)."""
        gnorm, total = self.norms().host_with_total([p.grad for p in self.layers.params])
        scale = getattr(optimizer, "grad_scale", None)
        if isinstance(scale, torch.Tensor):  # a fused kernel unscales: the .grad read are still scaled
            s = float(scale)  # a CPU tensor: a memory read
            gnorm = [v / s if v >= 0 else v for v in gnorm]
            total = total / s
        scaler_inf = found_inf if found_inf is not None else getattr(optimizer, "found_inf", None)
        loss = self.losses.host_mean()
        self.last_total = total
        return Measured(gnorm, total, loss, seen, scaler_inf if isinstance(scaler_inf, torch.Tensor) else None,
                        None, host=True)

    def _grad_norms(self, optimizer: Any, wide: bool) -> tuple[torch.Tensor, torch.Tensor]:
        gnorm, total = self.norms().with_total([p.grad for p in self.layers.params], wide)
        return self._unscaled(optimizer, gnorm, total)

    @staticmethod
    def _unscaled(optimizer: Any, gnorm: torch.Tensor, total: torch.Tensor | None) -> tuple[torch.Tensor,
                                                                                          torch.Tensor]:
        scale = getattr(optimizer, "grad_scale", None)
        if isinstance(scale, torch.Tensor):
            # GradScaler lets a fused optimizer unscale inside its kernel: the .grad we read are still scaled.
            gnorm = torch.where(gnorm >= 0, gnorm / scale.to(gnorm.device).float(), gnorm)
            total = None
        return gnorm, total if total is not None else total_norm(gnorm)

    def remeasure_wide(self, m: Measured, optimizer: Any) -> Measured:
        """The step read non-finite: measure its gradients again with float64 accumulation, so finite gradients
        whose float32 squares overflow are measured as the (huge, finite) numbers they are. Off the common path:
        called only after a host read found the total non-finite; never with sharded parameters."""
        if self.sharded:
            return m
        gnorm_t, total_t = self._grad_norms(optimizer, wide=True)
        # on the host path, back to the host (CPU tensors: memory reads)
        gnorm, total = (gnorm_t.tolist(), total_t.item()) if m.host else (gnorm_t, total_t)
        self.last_total = total
        return Measured(gnorm, total, m.loss, m.loss_seen, m.scaler_inf, m.wnorm, host=m.host)

    def commit(self, m: Measured, clipped: torch.Tensor, snapshot: bool, may_read: bool = False) -> None:
        """Queue the step's row (with the total norm after any clip) and take this step's samples.

        ``may_read``: a host read per step is allowed (the statistics live on the CPU, or the user asked for a
        per-step non-finite check): weight norms whose float32 squares overflow are then measured again."""
        if self.host:
            self._rows.append(self._host_row(m, clipped))
        else:
            skipped_by_scaler = (m.scaler_inf.to(self.device).float().reshape(()) if m.scaler_inf is not None
                                 else self._zero)
            self._rows.append(torch.cat([torch.stack([m.total, m.loss, clipped, skipped_by_scaler]), m.gnorm]))
        self._row_steps.append(self.step)
        self._row_loss_seen.append(m.loss_seen)
        if self.sampler.armed or self.sampler.tensor_handles:
            self.sampler.disarm()
            acts, times, order = self.sampler.take()
            self._acts += [(self.step, n, c, w, v) for n, c, w, v in acts]
            self._times += [(self.step, n, e, late, t) for n, e, late, t in times]
            if order:
                self._activation_order = order
        if self.step % self.sample_every == 0:
            detached = [local(p.detach()) for p in self.layers.params]
            wnorm = m.wnorm if m.wnorm is not None else self._layer_norms(detached)
            # Where a read is allowed (free on the CPU), weights whose float32 squares overflow are measured in
            # float64 (sample steps only); a weight norm is never reported infinite for finite weights there.
            if may_read and not self.sharded and not (all(map(math.isfinite, wnorm)) if self.host
                                                      else bool(torch.isfinite(wnorm).all())):
                wsq, absent = self.norms().squares(detached, wide=True)
                wnorm = finish(wsq, absent).float()
                wnorm = wnorm.numpy() if self.host else wnorm  # the host path keeps NumPy
            if snapshot and self.with_optimizer:
                # Transient copy of the weights on sample steps only, for ||w_after - w_before|| after the step.
                self._snapshot = (self.step, wnorm, torch._foreach_mul(detached, 1.0))
            else:
                self._samples.append((self.step, wnorm, None))

    @staticmethod
    def _host_row(m: Measured, clipped: Any) -> list[float]:
        """The row of ``m`` as floats (host path; every tensor read here lives in CPU memory: no sync)."""
        if not m.host:
            m = Measured(m.gnorm.tolist(), m.total.item(), m.loss.item(), m.loss_seen, m.scaler_inf, m.wnorm, True)
        return [m.total, m.loss, clipped if isinstance(clipped, float) else clipped.item(),
                0.0 if m.scaler_inf is None else m.scaler_inf.float().sum().item(), *m.gnorm]

    def drop_snapshot(self) -> None:
        """The step was skipped: no update to measure."""
        self._snapshot = None

    def after_step(self) -> None:
        """After the optimizer applied a sampled step: measure the update from the weight copy taken before it."""
        if self._snapshot is None:
            return
        step, wnorm, before = self._snapshot
        self._snapshot = None
        # in place: w_before - w_after (a DTensor's local shard: the snapshot holds shards)
        now = [local(p.detach()) for p in self.layers.params]
        torch._foreach_sub_(before, now)
        if self.sharded:  # summed over ranks in the next step's all-reduce (one per step)
            self._pending_update = (step, wnorm, *self.norms().squares(before))
        elif self.host:
            # ||w_after|| too: with ||w_before|| and ||dw|| it gives the update's part across the weights, apart
            # from the radial shrinking of weight decay (History.update_ratios, orthogonal=True). One fused norm
            # for both; float64, as folded (see _layer_norms).
            update, after = self.norms().host_pair(before, now)
            self._samples.append((step, wnorm, np.array(update + after, dtype=np.float64)))
        else:
            self._samples.append((step, wnorm, torch.cat([self._layer_norms(before), self._layer_norms(now)])))

    def _layer_norms(self, tensors: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> Any:
        """Per-layer norms of a sample (weights, update). With the statistics on the CPU: one
        fused norm folded in Python floats, kept as NumPy (each torch operator of the device fold costs 2-7 us of
        dispatch on small tensors, ``torch.tensor`` 10 us); elsewhere the device fold (no host read)."""
        if self.host:
            # float64, as folded: a float64 model's finite weight or update norm may exceed float32's maximum
            return np.array(self.norms().host_with_total(tensors)[0], dtype=np.float64)
        return self.norms()(tensors)

    def end_step(self) -> None:
        self.step += 1
        if self.step % self.sample_every == 0 and not self.compiled:
            self.sampler.arm()  # the next forward is a sampled one

    def _reduced_norms(self, sample: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Sharded parameters: this step's one all-reduce. It carries the loss, the gradients' squared norms, on
        sample steps the weights', and the update of the previous sample step (measured after that step).

        Returns:
            Per-layer gradient norms, weight norms (sample steps, else None), and ``[loss sum, ranks that saw it]``.
        """
        L = self.layers.num_layers
        norms = self.norms()
        gsq, gabsent = norms.squares([p.grad for p in self.layers.params])
        parts = [self.losses.local_pair(), gsq]
        if sample:
            wsq, _ = norms.squares([p.detach() for p in self.layers.params])
            parts.append(wsq)
        pending, self._pending_update = self._pending_update, None
        if pending is not None:
            parts.append(pending[2])
        vec = all_reduce_sum(torch.cat(parts))
        off = 2 + L
        wnorm = None
        if sample:
            wnorm = vec[off: off + L].sqrt()
            off += L
        if pending is not None:
            self._samples.append((pending[0], pending[1], finish(vec[off: off + L], pending[3])))
        return finish(vec[2: 2 + L], gabsent), wnorm, vec[:2]

    def settle(self) -> None:
        """At close: a sample whose update was never summed over ranks keeps its weight norms, update unknown."""
        if self._pending_update is not None:
            step, wnorm, _, _ = self._pending_update
            self._pending_update = None
            self._samples.append((step, wnorm, None))

    def read(self) -> HostRead:
        """Copy everything queued to the host in one transfer and split it up.

        This is the one host read per ``log_every`` steps: a sync on an accelerator, by design off the per-step
        path. Returns rows and samples in NumPy (float64).
        """
        n_rows, width = len(self._rows), len(self._rows[0])
        out = self._read_host() if self.host else self._read_device(n_rows, width)
        self._rows, self._row_steps, self._row_loss_seen = [], [], []
        self._samples, self._acts, self._times = [], [], []
        return out

    def _read_device(self, n_rows: int, width: int) -> HostRead:
        L = self.layers.num_layers
        pieces = [torch.stack(self._rows).reshape(-1)]
        for _, w, u in self._samples:
            # per sample: weight norms, update norms, weight norms after the step (-1: unknown)
            missing = torch.full_like(w, -1.0)
            pieces += [w, u if u is not None else missing] + ([missing] if u is None or u.numel() == L else [])
        pieces += [v.reshape(-1).to(self.device, torch.float32) for *_, v in self._acts]
        pieces += [torch.stack([e, late]).to(self.device, torch.float32) for _, _, e, late, _ in self._times]
        flat = torch.cat(pieces).cpu().numpy().astype(np.float64)  # the one sync of this read (above)
        rows, off = flat[: n_rows * width].reshape(n_rows, width), n_rows * width
        out = HostRead(np.array(self._row_steps, dtype=np.int64), rows,
                       np.array(self._row_loss_seen, dtype=bool), activation_order=self._activation_order)
        for step, _, _ in self._samples:
            # Copies: a view would keep this whole read buffer (rows and activation values) alive for as long as
            # the History keeps the sample (64 samples: 6 MiB on a 48-layer MLP, BENCHMARKS.md "Memory").
            out.samples.append((step, flat[off: off + L].copy(), flat[off + L: off + 2 * L].copy(),
                                flat[off + 2 * L: off + 3 * L].copy()))
            off += 3 * L
        for step, name, call, what, value in self._acts:
            k = value.numel()  # shape is host metadata: no sync
            out.acts.append((step, name, call, what, flat[off: off + k].copy()))
            off += k
        for step, name, _, _, steps_t in self._times:
            out.times.append((step, name, float(flat[off]), float(flat[off + 1]), steps_t))
            off += 2
        return out

    def _read_host(self) -> HostRead:
        """``read`` where the statistics live on the CPU: rows and samples are host values already, and the
        activation records are CPU tensors (reading them is a memory load): no torch operator at all."""
        L = self.layers.num_layers
        out = HostRead(np.array(self._row_steps, dtype=np.int64), np.array(self._rows, dtype=np.float64),
                       np.array(self._row_loss_seen, dtype=bool), activation_order=self._activation_order)
        for step, w, u in self._samples:
            missing = np.full(L, -1.0)
            update, after = (missing, missing) if u is None else (u[:L], u[L:] if len(u) > L else missing)
            # Copies (np.array): the update and after norms are views into one concatenated sample array.
            out.samples.append((step, np.array(w, dtype=np.float64), np.array(update, dtype=np.float64),
                                np.array(after, dtype=np.float64)))
        for step, name, call, what, value in self._acts:
            # a bool unit mask, or two float32 statistics (exact in float64): CPU tensors, read as they are
            out.acts.append((step, name, call, what, value.reshape(-1).to('cpu').numpy()))
        for step, name, e, late, steps_t in self._times:
            out.times.append((step, name, float(e), float(late), steps_t))  # CPU tensors: memory loads
        return out

    def close(self) -> None:
        self.sampler.close()
        self._snapshot = None


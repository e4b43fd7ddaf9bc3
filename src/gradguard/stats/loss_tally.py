"""This step's loss, as the step recorder queues it (room 1, the recorder): what the script gave
``observe_loss``, or else the roots of its backwards.

Device tensors stay on the device (no sync); Python numbers, and where the statistics live on the CPU the roots
too, are kept as floats.

Room: the step recorder. It may touch: ``stats``.
"""

from __future__ import annotations

import torch

from .script_hooks import scale_of, unscaled


class LossTally:
    """Sums this step's losses until the step is measured.

    Args:
        device: where the statistics live. host: they live on the CPU of one process (floats are cheaper there).
    """

    def __init__(self, device: torch.device, host: bool) -> None:
        self.device = device
        self.host = host
        self.sum: torch.Tensor | None = None  # device sum of observed loss tensors this step
        self.host_sum = 0.0  # sum of observed Python numbers (kept on the host: no copy to the device)
        self.n = 0
        # Losses seen at backward (the roots a script called .backward() on); used when nothing was given to
        # observe_loss this step: an explicit loss wins.
        self.auto: list[torch.Tensor | float] = []

    def observe(self, loss: torch.Tensor | float) -> None:
        """Add one observed loss to this step's (averaged at the step); a tensor stays on the device."""
        if isinstance(loss, torch.Tensor):
            value = loss.detach()
            # Shape, device and dtype are host metadata: convert only what differs (one kernel fewer per step).
            if value.dim() != 0:
                value = value.reshape(())
            if value.device != self.device or value.dtype != torch.float32:
                value = value.to(device=self.device, dtype=torch.float32, non_blocking=True)
            self.sum = value if self.sum is None else self.sum + value
        else:
            self.host_sum += float(loss)
        self.n += 1

    def observe_root(self, root: torch.Tensor) -> None:
        """The root of a backward: detached and unscaled (``script_hooks.unscaled``), a device tensor (no sync);
        where the statistics and the root live on the CPU, its value as a float (a memory load, cheaper than
        keeping a detached tensor)."""
        if self.host and root.is_cpu:
            scale = scale_of(root)
            value = root.item()  # a CPU tensor: a memory load, not a sync (the scaler's scale too)
            self.auto.append(value / scale.item() if scale is not None else value)
            return
        loss = unscaled(root)
        if loss.dim() != 0:
            loss = loss.reshape(())
        if loss.device != self.device or loss.dtype != torch.float32:
            loss = loss.to(device=self.device, dtype=torch.float32, non_blocking=True)
        self.auto.append(loss)

    def settle(self) -> bool:
        """Close the step's tally: without an explicit loss the backward roots stand in. Returns whether a loss
        was seen."""
        if self.n == 0 and self.auto:
            # Their sum: the objective whose gradient this step applies (accumulated gradients add up). With
            # accumulation written as (loss / accum).backward() it is the mean micro-batch loss, what the script
            # means by its loss; an average would read 1/accum of it.
            for value in self.auto:
                if isinstance(value, float):  # the host path's roots
                    self.host_sum += value
                else:
                    self.sum = value if self.sum is None else self.sum + value
            self.n = 1
        self.auto = []
        return self.n > 0

    def device_mean(self, zero: torch.Tensor) -> torch.Tensor:
        """The step's mean loss as a float32 device scalar (``zero`` when none was seen); the caller resets."""
        if self.n == 1 and self.sum is not None:
            loss = self.sum  # one loss tensor this step (the common case): already a float32 scalar here
        elif self.n:
            loss = torch.full((), self.host_sum, dtype=torch.float32, device=self.device)  # a fill, not a copy
            if self.sum is not None:
                loss = loss + self.sum
            loss = loss / self.n
        else:
            loss = zero
        return loss

    def host_mean(self) -> float:
        """The step's mean loss as a float (0.0 when none was seen); resets the tally. CPU statistics only."""
        loss = 0.0
        if self.n:
            # a CPU tensor: reading it is a memory load
            loss = self.host_sum + (self.sum.item() if self.sum is not None else 0.0)
            loss = loss / self.n if self.n > 1 else loss
        self.reset()
        return loss

    def local_pair(self) -> torch.Tensor:
        """``[mean loss this step, 1]`` on this rank, or ``[0, 0]`` when no loss was observed (a fill, no copy)."""
        if self.n == 0:
            return torch.zeros(2, dtype=torch.float32, device=self.device)
        loss = torch.full((), self.host_sum, dtype=torch.float32, device=self.device)
        if self.sum is not None:
            loss = loss + self.sum
        return torch.stack([loss / self.n, torch.ones((), device=self.device)])

    def reset(self) -> None:
        self.sum, self.host_sum, self.n = None, 0.0, 0

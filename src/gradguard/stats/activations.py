"""Activation and time-step statistics, gathered by hooks armed on a sampling schedule (never every step).

- ReLU-family modules: which units were active (> 0) for at least one sample of the batch.
- Sigmoid/Tanh modules: fraction of outputs in the flat region, where the derivative is under 1% of its peak, and
  the mean derivative over all outputs as a fraction of the peak (how much gradient the layer lets through).
- Recurrent modules (RNN/LSTM/GRU): how much gradient reaches the first and the last time steps of the input.

Each hook leaves small device tensors in a list; the Guard copies them to the host with the step statistics.

Room: the step recorder. It may touch: ``stats``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .own_hooks import OwnHandle, forward_hook, forward_pre_hook

# Activations whose output and gradient are exactly zero on the negative side, so a unit can die. LeakyReLU,
# PReLU, ELU, GELU, SiLU and the like keep a gradient there: they cannot die, and are not watched for it.
HARD_ZERO = (nn.ReLU, nn.ReLU6)
# Activation -> the |output| (or output distance to the asymptote) past which the derivative is < 1% of its peak:
# sigmoid' = s(1-s) < 0.0025 when s < 0.0025 or s > 0.9975; tanh' = 1 - t^2 < 0.01 when |t| > 0.995.
SATURATING = (nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Softsign)


def _units(x: torch.Tensor) -> torch.Tensor:
    """(samples, units): features on the last axis for (B, F) and (B, T, F); channels on axis 1 for conv maps."""
    if x.dim() <= 1:
        return x.reshape(1, -1)
    if x.dim() >= 4:  # (B, C, H, W[, D]) feature maps
        return x.transpose(0, 1).reshape(x.shape[1], -1).t()
    return x.reshape(-1, x.shape[-1])


def active_units(out: torch.Tensor) -> torch.Tensor:
    """Per unit, True if its output was > 0 for at least one sample of the batch (a dead ReLU outputs exactly 0).

    A bool tensor: the comparison first (it records no autograd history, so no detach is needed), then the view
    and the reduction, and no cast after them (each torch operator costs a few microseconds of dispatch on a small
    model, and this runs on sample steps)."""
    return _units(out > 0).any(dim=0)


def saturated_fraction(module: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """Fraction of outputs of a squashing activation sitting where its derivative is < 1% of the maximum."""
    o = out.detach().to(torch.float32)
    if isinstance(module, nn.Sigmoid):
        flat = (o < 0.0025) | (o > 0.9975)
    elif isinstance(module, nn.Hardtanh):
        flat = (o <= module.min_val) | (o >= module.max_val)
    else:  # Tanh, Softsign: saturate at +-1
        flat = o.abs() > 0.995
    return flat.to(torch.float32).mean()


def relative_slope(module: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """Mean derivative of a squashing activation at its outputs, as a fraction of its peak derivative (1.0: every
    output at the steepest point; Glorot & Bengio's top sigmoid layer pushed toward 0 sits near 0.05-0.15).

    From the output alone: sigmoid' = s(1 - s), peak 1/4; tanh' = 1 - t^2; softsign' = (1 - |y|)^2; hardtanh' = 1
    strictly between its bounds, else 0.

    References:
        Glorot & Bengio, "Understanding the difficulty of training deep feedforward neural networks", AISTATS 2010
        (saturation of the top hidden layer, Sec. 3.1).
    """
    o = out.detach().to(torch.float32)
    if isinstance(module, nn.Sigmoid):
        slope = 4.0 * o * (1.0 - o)
    elif isinstance(module, nn.Hardtanh):
        slope = ((o > module.min_val) & (o < module.max_val)).to(torch.float32)
    elif isinstance(module, nn.Softsign):
        slope = (1.0 - o.abs()).square()
    else:  # Tanh
        slope = 1.0 - o.square()
    return slope.mean()


class ActivationSampler:
    """Registers the sampling hooks for one forward pass, then removes them.

    Args:
        named: (qualified name, module) pairs of the model.
    """

    def __init__(self, named: list[tuple[str, nn.Module]]) -> None:
        self.act_modules: list[tuple[str, nn.Module]] = [(n, m) for n, m in named
                                                         if isinstance(m, HARD_ZERO + SATURATING)]
        self.rnn_modules: list[tuple[str, nn.RNNBase]] = [(n, m) for n, m in named if isinstance(m, nn.RNNBase)]
        self.handles: list[OwnHandle] = []
        self.tensor_handles: list[RemovableHandle] = []  # gradient hooks on RNN inputs, removed in take()
        self.calls: dict[str, int] = {}  # calls of each module in the current forward (a module may be reused)
        #: filled while armed: (module, call index, "active"|"saturated", device tensor: per-unit bool mask |
        #: [flat fraction, relative slope])
        self.act_records: list[tuple[str, int, str, torch.Tensor]] = []
        #: filled during backward: (module name, early-steps grad norm, late-steps grad norm, T)
        self.time_records: list[tuple[str, torch.Tensor, torch.Tensor, int]] = []
        self.call_order: list[str] = []

    @property
    def armed(self) -> bool:
        return bool(self.handles)

    def arm(self) -> None:
        if self.handles:
            return
        for name, m in self.act_modules:
            self.handles.append(forward_hook(m, self._act_hook(name)))
        for name, rnn in self.rnn_modules:
            self.handles.append(forward_pre_hook(rnn, self._rnn_hook(name, rnn)))

    def disarm(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def close(self) -> None:
        """Remove every hook, including gradient hooks still waiting for a backward."""
        self.disarm()
        self.take()

    def new_forward(self) -> None:
        """A forward pass of the root module starts: call indices count from zero again."""
        self.calls.clear()

    def take(self) -> tuple[list[tuple[str, int, str, torch.Tensor]],
                            list[tuple[str, torch.Tensor, torch.Tensor, int]], list[str]]:
        """Hand over (and forget) what the last sampled step recorded; drop its gradient hooks."""
        for h in self.tensor_handles:
            h.remove()
        self.tensor_handles.clear()
        out = (self.act_records, self.time_records, self.call_order)
        self.act_records, self.time_records, self.call_order = [], [], []
        return out

    def _act_hook(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if not (module.training and torch.is_grad_enabled()) or not isinstance(output, torch.Tensor):
                return  # only training forwards describe what the optimizer sees
            call = self.calls.get(name, 0)
            self.calls[name] = call + 1
            if name not in self.call_order:
                self.call_order.append(name)
            if isinstance(module, SATURATING):
                stats = torch.stack([saturated_fraction(module, output), relative_slope(module, output)])
                self.act_records.append((name, call, "saturated", stats))
            else:
                self.act_records.append((name, call, "active", active_units(output)))
        return hook

    def _rnn_hook(self, name: str, module: nn.RNNBase) -> Callable[[nn.Module, Any], Any]:
        def record(grad: torch.Tensor) -> None:
            g = grad.detach().to(torch.float32)
            # (T, F) unbatched input; (B, T, F) with batch_first; (T, B, F) otherwise
            time_dim = 1 if module.batch_first and g.dim() == 3 else 0
            dims = [d for d in range(g.dim()) if d != time_dim]
            per_t = g.square().sum(dim=dims).sqrt() if dims else g.abs()
            steps = per_t.shape[0]
            k = max(1, steps // 10)
            self.time_records.append((name, per_t[:k].mean(), per_t[-k:].mean(), steps))

        def pre_hook(mod: nn.Module, args: Any) -> Any:
            if not (mod.training and torch.is_grad_enabled()) or not args or not isinstance(args[0], torch.Tensor):
                return None  # PackedSequence and eval forwards are not sampled
            x = args[0]
            if x.dim() < 2:
                return None
            if x.requires_grad:
                # gradient reaching each time step of the input; the graph is unchanged
                self.tensor_handles.append(x.register_hook(record))
                return None
            # A leaf input (raw data): an alias that requires grad lets us see dL/dx_t. Nothing upstream exists to
            # be affected; this sampled step computes one extra input-gradient product.
            leaf = x.detach().requires_grad_(True)
            leaf.register_hook(record)
            return (leaf, *args[1:])
        return pre_hook

"""Structural remedies: functions that change a model so its gradients can flow, each returning what it changed.

- ``swap_activations``: e.g. Sigmoid/Tanh -> ReLU/LeakyReLU/GELU.
- ``reinit``: gain-aware Kaiming/Xavier (gain from the activation that follows each layer), orthogonal and identity
  (IRNN) recurrent weights, LSUV (data-driven, unit output variance layer by layer), zero-init of residual-branch
  ends.

Room: the repairer. It may touch: no other module.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

ACTIVATION_GAIN_NAMES: dict[type[nn.Module], str] = {
    nn.ReLU: "relu", nn.ReLU6: "relu", nn.LeakyReLU: "leaky_relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid",
    nn.SELU: "selu", nn.GELU: "relu", nn.SiLU: "relu", nn.ELU: "relu",
}
WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
RESIDUAL_ENDS = ("bn2", "bn3", "c_proj", "out_proj", "down_proj", "proj_out")


def swap_activations(model: nn.Module, old: type[nn.Module] | tuple[type[nn.Module], ...] = (nn.Sigmoid, nn.Tanh),
                     new: type[nn.Module] | Callable[[], nn.Module] = nn.ReLU) -> list[str]:
    """Replace every module of type ``old`` with a fresh ``new()``, in place.

    Args:
        model: the model. old: the activation type(s) to replace. new: a module class or a factory.

    Returns:
        Qualified names of the replaced modules.

    References:
        Glorot, Bordes & Bengio, "Deep Sparse Rectifier Neural Networks", AISTATS 2011.
    """
    changed = []
    for name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, old):
                setattr(parent, child_name, new())
                changed.append(f"{name}.{child_name}" if name else child_name)
    return changed


def _follower_gain(model: nn.Module) -> dict[int, tuple[str, float]]:
    """For each weighted layer, the nonlinearity named by the activation registered right after it in its parent
    (and its parameter): the usual Sequential / block layout."""
    out: dict[int, tuple[str, float]] = {}
    for parent in model.modules():
        children = list(parent.children())
        for i, child in enumerate(children):
            if not isinstance(child, WEIGHTED):
                continue
            nonlin, param = "linear", 0.0
            for nxt in children[i + 1:]:
                if isinstance(nxt, WEIGHTED):
                    break
                kind = ACTIVATION_GAIN_NAMES.get(type(nxt))
                if kind is not None:
                    nonlin = kind
                    param = float(getattr(nxt, "negative_slope", 0.0)) if kind == "leaky_relu" else 0.0
                    break
            out[id(child)] = (nonlin, param)
    return out


def reinit(model: nn.Module, scheme: str = "kaiming", *, data: torch.Tensor | None = None,
           residual_ends: Iterable[str] = RESIDUAL_ENDS, lsuv_tol: float = 0.1, lsuv_iters: int = 10,
           forward: Callable[[nn.Module, Any], Any] | None = None) -> list[str]:
    """Re-initialise ``model`` in place with ``scheme``.

    Args:
        model: the model.
        scheme: "kaiming" (He; gain of the activation that follows each layer), "xavier" (Glorot, same gains),
            "orthogonal" (recurrent weights orthogonal, input weights Xavier, LSTM forget-gate bias 1),
            "identity" (IRNN: plain RNN with identity recurrent weights, ReLU, small input weights), "lsuv"
            (orthogonal, then each layer scaled until its output variance on ``data`` is 1), "zero_residual"
            (the last layer of each residual branch, found by name: the last module named in ``residual_ends``
            within each block; pass ``residual_ends`` for other naming schemes).
        data: a batch of inputs, for "lsuv". forward: how to call the model on ``data`` (default ``model(data)``).

    Returns:
        Qualified names of the modules changed.

    References:
        He et al., "Delving Deep into Rectifiers", ICCV 2015; Glorot & Bengio, AISTATS 2010; Saxe, McClelland &
        Ganguli, "Exact solutions to the nonlinear dynamics of learning in deep linear networks", ICLR 2014;
        Le, Jaitly & Hinton, "A Simple Way to Initialize Recurrent Networks of Rectified Linear Units", 2015;
        Mishkin & Matas, "All you need is a good init", ICLR 2016; Goyal et al., "Accurate, Large Minibatch SGD",
        2017 (zero-init of residual-branch ends).
    """
    changed: list[str] = []
    with torch.no_grad():
        if scheme in ("kaiming", "xavier"):
            gains = _follower_gain(model)
            for name, m in model.named_modules():
                if isinstance(m, WEIGHTED):
                    nonlin, param = gains.get(id(m), ("linear", 0.0))
                    nl: Any = nonlin  # one of calculate_gain's names, by construction of ACTIVATION_GAIN_NAMES
                    if scheme == "kaiming":  # fan-in variance gain^2 / n, gain of the following activation
                        nn.init.kaiming_normal_(m.weight, a=param, nonlinearity=nl)
                    else:
                        nn.init.xavier_uniform_(m.weight, gain=nn.init.calculate_gain(nl, param or None))
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                    changed.append(name)
        elif scheme == "orthogonal":
            for name, m in model.named_modules():
                if isinstance(m, nn.RNNBase):
                    _orthogonal_rnn(m)
                    changed.append(name)
        elif scheme == "identity":
            for name, m in model.named_modules():
                if isinstance(m, nn.RNN):
                    for pname, p in m.named_parameters():
                        if pname.startswith("weight_hh"):
                            p.copy_(torch.eye(p.shape[0], p.shape[1]))
                        elif pname.startswith("weight_ih"):
                            nn.init.normal_(p, std=1e-3)
                        else:
                            nn.init.zeros_(p)
                    m.nonlinearity, m.mode = "relu", "RNN_RELU"
                    changed.append(name)
        elif scheme == "lsuv":
            if data is None:
                raise ValueError("reinit(scheme='lsuv') needs a batch of inputs: reinit(model, 'lsuv', data=x)")
            changed = _lsuv(model, data, lsuv_tol, lsuv_iters, forward)
        elif scheme == "zero_residual":
            # By name, and only the last match within each block (a bottleneck's bn3, not its bn2 as well).
            ends = tuple(residual_ends)
            last: dict[str, tuple[str, nn.Module]] = {}
            for name, m in model.named_modules():
                if name.rpartition(".")[2] in ends and getattr(m, "weight", None) is not None:
                    last[name.rpartition(".")[0]] = (name, m)
            for name, m in last.values():
                nn.init.zeros_(getattr(m, "weight"))  # noqa: B009 - typed as Tensor | Module on nn.Module
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(getattr(m, "bias"))  # noqa: B009
                changed.append(name)
        else:
            raise ValueError(f"unknown scheme {scheme!r}: use kaiming, xavier, orthogonal, identity, lsuv or "
                             "zero_residual")
    return changed


def _orthogonal_rnn(m: nn.RNNBase) -> None:
    gates = {"LSTM": 4, "GRU": 3}.get(m.mode, 1)
    for pname, p in m.named_parameters():
        if pname.startswith("weight_hh"):
            for chunk in p.chunk(gates, 0):  # each gate's square block orthogonal
                nn.init.orthogonal_(chunk)
        elif pname.startswith("weight_ih"):
            nn.init.xavier_uniform_(p)
        elif pname.startswith("bias"):
            nn.init.zeros_(p)
            if m.mode == "LSTM" and pname.startswith("bias_ih"):
                h = m.hidden_size
                p[h: 2 * h].fill_(1.0)  # forget gate: remember by default


def _lsuv(model: nn.Module, data: torch.Tensor, tol: float, iters: int,
          forward: Callable[[nn.Module, Any], Any] | None) -> list[str]:
    run = forward or (lambda mod, x: mod(x))
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, WEIGHTED)]
    was = model.training
    model.eval()  # measure without dropout noise; batch statistics of BatchNorm would undo the scaling
    try:
        for _, m in layers:
            nn.init.orthogonal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
            out: dict[str, torch.Tensor] = {}
            handle = m.register_forward_hook(lambda mod, i, o, out=out: out.__setitem__("y", o.detach()))
            try:
                for _ in range(iters):
                    run(model, data)
                    var = float(out["y"].float().var())  # a host read: init time, not training
                    if not math.isfinite(var) or var <= 0 or abs(var - 1.0) < tol:
                        break
                    m.weight.div_(math.sqrt(var))
            finally:
                handle.remove()
    finally:
        model.train(was)
    return [n for n, _ in layers]

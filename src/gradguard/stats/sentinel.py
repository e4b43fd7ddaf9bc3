"""Find the module where a non-finite value first appears in a forward pass.

Used only after a non-finite step was seen: the last forward's inputs are replayed under ``torch.no_grad`` with
hooks on every module that check outputs, inputs and own parameters for NaN/Inf. These checks read values back
to the host (a sync) on purpose: they run once, off the per-step path, to answer "where did this come from".
Buffers (BatchNorm running statistics, non-persistent ones too) and the RNG are restored afterwards. What cannot be
restored is the user's own Python state: a forward that counts its calls, or forward hooks with side effects, sees
one more call (documented in the README).

Room: the step recorder. It may touch: no other module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


def replay(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
           pre: Callable[[nn.Module, Any], None], post: Callable[[nn.Module, Any, Any], None]) -> None:
    """Run ``model(*args, **kwargs)`` once more under ``torch.no_grad`` with ``pre``/``post`` hooks on every module,
    then put back every buffer (persistent or not: BatchNorm statistics, spectral-norm vectors, caches) and the
    RNG of the CPU and of the CUDA devices the model uses. Hooks are removed on every path."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    handles = []
    for m in model.modules():
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post))
    cuda = sorted({p.device.index for p in model.parameters() if p.device.type == "cuda" and p.device.index
                   is not None})
    try:
        with torch.random.fork_rng(devices=cuda), torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)


def _any_nonfinite(obj: Any) -> bool:
    # Host read on purpose (see module docstring): runs only in a replay after a non-finite step.
    return any(t.is_floating_point() and not bool(torch.isfinite(t.detach()).all()) for t in _tensors(obj))


@dataclass
class Origin:
    """Where a non-finite value was first produced in the replayed forward.

    Attributes:
        module: qualified name of the module ("" for the model input).
        reason: "input" (the batch itself), "parameters" (the module's weights are already non-finite),
            "output" (the module turned finite inputs into a non-finite output), or "between" (code in this
            module's forward, outside any submodule, produced it).
    """

    module: str
    reason: str


def locate(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Origin | None:
    """Replay ``model(*args, **kwargs)`` and return where the first non-finite value appears, or None if none does.

    Args:
        model: the unwrapped model.
        args, kwargs: the inputs of the forward to replay.

    Returns:
        The Origin, or None when the replay stays finite (the problem arose in backward, or by chance).
    """
    if _any_nonfinite((args, kwargs)):
        return Origin("", "input")
    names = {id(m): n for n, m in model.named_modules()}
    stack: list[str] = []
    found: list[Origin] = []

    def pre(module: nn.Module, inp: Any) -> None:
        stack.append(names.get(id(module), "?"))

    def post(module: nn.Module, inp: Any, out: Any) -> None:
        name = stack.pop() if stack else names.get(id(module), "?")
        if found or not _any_nonfinite(out):
            return
        if _any_nonfinite(list(module.parameters(recurse=False))):
            found.append(Origin(name, "parameters"))
        elif not _any_nonfinite(inp):
            found.append(Origin(name, "output"))
        else:  # inputs already bad: produced by the enclosing module's own code between submodule calls
            found.append(Origin(stack[-1] if stack else "", "between"))

    replay(model, args, kwargs, pre, post)
    return found[0] if found else None


def rng_state(devices: list[torch.device]) -> list[Any]:
    """A cheap fingerprint of the random generators that ``devices`` use (host-side values, no device sync):
    the CPU generator's state, and each CUDA generator's Philox offset."""
    out: list[Any] = [torch.default_generator.get_state()]
    for d in devices:
        if d.type == "cuda":
            gen = torch.cuda.default_generators[d.index if d.index is not None else torch.cuda.current_device()]
            out.append(gen.get_offset() if hasattr(gen, "get_offset") else gen.get_state())
    return out


def same_rng(a: list[Any], b: list[Any]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
                                    for x, y in zip(a, b))


def locate_rng(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
               devices: list[torch.device]) -> tuple[list[str], list[str]]:
    """Replay a forward and name the innermost modules whose own forward drew random numbers, and the torch
    functions that drew them.

    Runs off the per-step path, once, after an eval-mode forward was seen consuming random numbers. Buffers and
    the RNG are restored afterwards (see ``locate``).

    Returns:
        Qualified module names, in call order (empty if the replay drew nothing), and the names of the torch
        functions and tensor methods that drew (``dropout``, ``randn_like``, ``normal_``: a dropout left on is a
        bug, a sampler may be by design), in call order, each once.
    """
    names = {id(m): n for n, m in model.named_modules()}
    stack: list[tuple[str, list[Any]]] = []
    consumed: list[str] = []
    parents_of: dict[str, set[str]] = {}

    def pre(module: nn.Module, inp: Any) -> None:
        stack.append((names.get(id(module), "?"), rng_state(devices)))

    def post(module: nn.Module, inp: Any, out: Any) -> None:
        name, before = stack.pop()
        if not same_rng(before, rng_state(devices)):
            consumed.append(name)
            for outer, _ in stack:
                parents_of.setdefault(outer, set()).add(name)

    draws = _Draws(devices)
    with draws:
        replay(model, args, kwargs, pre, post)
    # innermost: a module that consumed, none of whose descendants did (they would explain it)
    return [n for n in consumed if not parents_of.get(n)], draws.names


class _Draws(TorchFunctionMode):
    """Notes each torch function (or tensor method) that moved the random generators while it ran. The handler
    runs with this mode off, so the functions it calls itself are not seen."""

    def __init__(self, devices: list[torch.device]) -> None:
        super().__init__()
        self.devices = devices
        self.names: list[str] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        before = rng_state(self.devices)
        out = func(*args, **(kwargs or {}))
        if not same_rng(before, rng_state(self.devices)):
            name = getattr(func, "__name__", type(func).__name__)
            if name not in self.names:
                self.names.append(name)
        return out

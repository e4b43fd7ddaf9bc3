"""The repaired step's helpers for ``optimizer.step(closure)``: the closure run ahead of a one-evaluation optimizer,
the fail-safe gradient check, and LBFGS, whose many closure calls per step leave no single gradient to judge
before its update (see ``lbfgs_step``).

Room: the repairer. It may touch: ``types``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from ..types import Action


def closure_given(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether ``optimizer.step`` was called with a closure (the hooks see ``args = (optimizer, closure)``)."""
    if not kwargs and len(args) <= 1:  # step() at every step of most loops: no generator to build
        return bool(args) and callable(args[0])  # the hooks' optimizer is not callable; a closure is
    return kwargs.get("closure") is not None or any(callable(a) for a in args)


def evaluate_closure(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    """Run the closure of ``optimizer.step(closure)`` now (forward and backward, under grad as ``step`` would) and
    return its result with the arguments rewritten to pass a closure that only returns that result."""
    i = -1 if kwargs.get("closure") is not None else next(i for i, a in enumerate(args) if callable(a))
    with torch.enable_grad():
        result = (kwargs["closure"] if i < 0 else args[i])()
    if i < 0:
        return result, args, {**kwargs, "closure": lambda: result}
    return result, (*args[:i], lambda: result, *args[i + 1:]), kwargs


def gradients_finite(optimizer: torch.optim.Optimizer) -> bool:
    """Whether every gradient the optimizer would apply is finite: the fail-safe check when gradguard's own
    measurement failed (one host read, on that rare path only)."""
    flags = [p.grad.isfinite().all() for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    return bool(torch.stack([f.to(flags[0].device) for f in flags]).all()) if flags else True


def _all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """One host read for many tensors (LBFGS reads the host at every iteration anyway)."""
    if not tensors:
        return True
    flags = [torch.isfinite(t).all() for t in tensors]
    return bool(torch.stack([f.to(flags[0].device) for f in flags]).all())


class LbfgsSide(Protocol):
    """What ``lbfgs_step`` needs from the hooks (``gradguard.hooks.Wiring``)."""

    def act(self, action: Action) -> None: ...
    def last_step(self) -> int: ...
    def internal_failure(self, exc: BaseException) -> None: ...


def lbfgs_step(optimizer: torch.optim.Optimizer, orig_step: Callable[..., Any], side: LbfgsSide,
               rollbacks: Callable[[], int], *args: Any, **kwargs: Any) -> Any:
    """One LBFGS step, checked after it: LBFGS evaluates its closure many times inside one step (its line search),
    so there is no single gradient to judge before the update. The weights are copied before the step; if the loss
    or any weight came out non-finite, the weights are put back bitwise and LBFGS's curvature memory (built from
    those non-finite gradients) is cleared, as at its first step.

    Two cases put nothing back. A rollback during the step (the ladder acts at the read its post-step hook makes)
    restored a trusted state: the copy from before the step would undo it. And weights already non-finite before
    the step (a corrupted weight) are no state worth restoring: the ladder's rollback repairs them.

    Args:
        optimizer: the LBFGS optimizer. orig_step: its step (with its hooks). side: the hooks' side of the step.
        rollbacks: how many rollbacks the ladder has made so far.

    The check reads the host once per step, which adds no sync that LBFGS does not already make (it reads its
    loss and directions on the host at every iteration).
    """
    params = [p for g in optimizer.param_groups for p in g["params"]]
    with torch.no_grad():
        before = torch._foreach_mul([p.detach() for p in params], 1.0)  # a copy, one fused call
    rolled = rollbacks()
    result = orig_step(*args, **kwargs)
    try:
        if rollbacks() != rolled:
            return result  # the ladder rolled back inside the step: keep what it restored
        with torch.no_grad():
            after = [p.detach() for p in params]
            if isinstance(result, torch.Tensor):
                after.append(result.detach())
            finite = _all_finite(after)
            if not finite:
                if _all_finite(before):
                    torch._foreach_copy_([p.detach() for p in params], before)
                    why = ("non-finite loss or weights inside the LBFGS step (its line search): weights put back, "
                           "its curvature memory cleared")
                    side.act(Action("skip_step", side.last_step(), {"why": why}))
                optimizer.state.clear()  # LBFGS keeps its history in the state of its first parameter
    except Exception as e:  # never crash the user's training step
        side.internal_failure(e)
    return result

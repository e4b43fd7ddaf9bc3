"""Operators dispatched per training step, with and without a Guard, and the Python function calls and calls of
built-in (C) functions made on the host: counts that do not depend on how loaded the machine is (wall-clock
ratios on a shared 2-core VM swing by 30% and more). The tiny model of issue 16 (Linear 16-32-32-1 with ReLU,
Adam, batch 32), where a step is mostly fixed per-step cost.

Run: ``python benchmarks/kernel_count.py [plain] [guard] [guard_clip] [repair] [clip]``.
"""

from __future__ import annotations

import sys
from collections import Counter

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import gradguard as gg


class Count(TorchDispatchMode):
    """Counts every operator that reaches the dispatcher (what a kernel launch costs on the host)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def make(kind: str):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    options = {"guard": {}, "guard_clip": {"clip": 1.0}, "repair": {"repair": "auto"}}.get(kind)
    guard = gg.Guard(m, opt, console=False, **options) if options is not None else None
    x, y = torch.randn(32, 16), torch.randn(32, 1)

    def step() -> None:
        loss = nn.functional.mse_loss(m(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if kind == "clip":
            nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()

    step.guard = guard  # type: ignore[attr-defined]  # kept alive as long as the step
    return step


def main() -> None:
    torch.set_num_threads(1)
    for kind in sys.argv[1:] or ["plain", "clip", "guard", "guard_clip", "repair"]:
        step = make(kind)
        for _ in range(60):  # past the first steps (optimizer state, the forward-order hooks)
            step()
        with Count() as c:
            for _ in range(100):  # log_every=10 and sample_every=25 divide 100: reads and samples included
                step()
        calls = Counter[str]()

        def profile(frame, event, arg, calls=calls):  # type: ignore[no-untyped-def]
            calls[event] += 1

        sys.setprofile(profile)
        try:
            for _ in range(100):
                step()
        finally:
            sys.setprofile(None)
        print(f"{kind:10s} {sum(c.ops.values()) / 100:7.2f} operators, {calls['call'] / 100:6.1f} Python calls, "
              f"{calls['c_call'] / 100:6.1f} built-in calls per step")


if __name__ == "__main__":
    main()

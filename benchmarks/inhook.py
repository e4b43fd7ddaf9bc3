"""Time spent inside gradguard per training step, measured directly (less noisy than step-time ratios on a
shared machine): every Guard entry point is wrapped with a timer, the model trains, and the summed time per step
is compared with the step time. Run: ``python benchmarks/inhook.py [--only mlp|gpt2] [--steps N]``.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

import gradguard as gg
import gradguard.hooks as hooks_module
from benchmarks.overhead import gpt2, mlp48

# (class, method): the hooks PyTorch calls live on the Guard's wiring; observe_loss on the Guard itself.
ENTRY_POINTS = ((hooks_module.Wiring, "pre_step"), (hooks_module.Wiring, "post_step"), (gg.Guard, "observe_loss"),
                (hooks_module.Wiring, "forward_pre"), (hooks_module.Wiring, "forward_post"))


_SPENT: dict[str, list[float]] = defaultdict(list)


def instrument() -> dict[str, list[float]]:
    """Wrap the Guard's entry points once (drains run inside the post-step hook and are counted there)."""
    if getattr(gg.Guard, "_instrumented", False):
        return _SPENT
    spent = _SPENT
    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(self: Any, *a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(self, *a, **k)
            finally:
                spent[name].append(time.perf_counter() - t0)
        return timed

    for cls, name in ENTRY_POINTS:
        setattr(cls, name, wrap(name, getattr(cls, name)))
    gg.Guard._instrumented = True  # type: ignore[attr-defined]
    return spent


def run(name: str, build: Callable[..., Any], steps: int) -> None:
    torch.manual_seed(0)
    model, loss_of = build()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = loss_of(model)
    spent = instrument()  # before the Guard registers its bound hooks
    guard = gg.Guard(model, opt, console=False)

    def step() -> None:
        loss = loss_fn()
        guard.observe_loss(loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(max(10, steps // 5)):
        step()
    spent.clear()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    per_step = (time.perf_counter() - t0) / steps
    inside = sum(sum(v) for v in spent.values()) / steps
    print(f"\n{name}: {steps} steps, {1000 * per_step:.2f} ms/step, inside gradguard {1000 * inside:.3f} ms/step "
          f"= {100 * inside / per_step:.2f}% of the step")
    for k, v in sorted(spent.items()):
        print(f"  {k:18s} {1000 * sum(v) / steps:.3f} ms/step ({len(v)} calls)")
    guard.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["mlp", "gpt2"])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.only in (None, "mlp"):
        run("mlp (48 x 256, batch 64, AdamW)", mlp48, args.steps)
    if args.only in (None, "gpt2"):
        run("gpt2 (4 layers, width 256, 4 x 128 tokens, AdamW)", gpt2, max(20, args.steps // 10))


if __name__ == "__main__":
    main()

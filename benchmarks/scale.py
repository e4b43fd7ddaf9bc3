"""How gradguard's cost grows with the number of parameter tensors, and with the number of steps.

- **Tensors**: a model of k small branches (``Linear(16, 16)`` + ReLU each, outputs summed), so the number of
  parameter tensors is 2k and the kernels are tiny: the Python work per tensor dominates, which is what this
  measures. Reported per step: the time spent inside the Guard's entry points (hooks, ``observe_loss``; wrapped
  with timers as in ``benchmarks/inhook.py``), for the defaults, the clip methods and sampling every step, beside
  the same step's ``clip_grad_norm_`` (one fused norm, as the Guard's), Lightning's ``grad_norm``, a plain
  per-parameter loop of ``p.grad.norm()`` (what "a Python loop per parameter" costs) and the fused norm kernel
  alone (``torch._foreach_norm``: on the CPU it loops over the tensors in C++, so it grows with their number
  too). Also the gradguard functions with the most own time at the largest size (cProfile), to locate any
  per-parameter Python loop.
- **Steps**: a tiny MLP trained for 20k steps under a Guard; at 1k, 5k and 20k steps, the time per step (plain loop
  and inside the Guard) over the preceding 1,000 steps, and the bytes of the Guard's own state
  (``benchmarks.memory.GuardSizer``). Bounded buffers should keep both flat.

Run from the repository root: ``python -m benchmarks.scale [--part tensors|steps|all] [--quick]``.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import gradguard as gg
from benchmarks.inhook import instrument
from benchmarks.memory import GG_DIR, GuardSizer


class Branches(nn.Module):
    """k parallel ``Linear(width, width)`` + ReLU branches whose outputs are summed: 2k parameter tensors of
    ``width * (width + 1)`` elements in all per branch, without the vanishing a k-deep stack would have."""

    def __init__(self, k: int, width: int = 16) -> None:
        super().__init__()
        self.branches = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([b(x) for b in self.branches]).sum(0)


GUARDS: dict[str, dict[str, Any]] = {
    "Guard (defaults)": {},
    "Guard(clip=1.0)": {"clip": 1.0},
    "Guard(clip='zclip')": {"clip": "zclip"},
    "Guard(clip=gg.LayerNorm(1.0))": {"clip": gg.LayerNorm(1.0)},
    "Guard(clip='agc')": {"clip": "agc"},
    "Guard(sample_every=1)": {"sample_every": 1},
}


def _loop(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, guard: gg.Guard | None,
          extra: Callable[[], Any] | None, extra_time: list[float]) -> Callable[[], None]:
    """One training step; ``extra`` (a peer's per-step call) runs after backward and is timed on its own."""
    def step() -> None:
        loss = model(x).square().mean()
        if guard is not None:
            guard.observe_loss(loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if extra is not None:
            t0 = time.perf_counter()
            extra()
            extra_time.append(time.perf_counter() - t0)
        opt.step()
    return step


def tensors_part(sizes: list[int], steps: int, profile_at: int | None) -> None:
    spent = instrument()
    from lightning.pytorch.utilities import grad_norm

    peers: dict[str, Callable[[nn.Module], Callable[[], Any]]] = {
        "clip_grad_norm_(1.0)": lambda m: lambda: nn.utils.clip_grad_norm_(m.parameters(), 1.0),
        "Lightning grad_norm(model, 2)": lambda m: lambda: grad_norm(m, norm_type=2),
        "loop: [p.grad.norm() for p in params]": lambda m: lambda: [p.grad.norm() for p in m.parameters()],
        # the norm kernel the Guard launches, alone: on the CPU a foreach op loops over the tensors in C++
        "torch._foreach_norm(grads) alone": lambda m: lambda: torch._foreach_norm([p.grad for p in m.parameters()]),
    }
    results: dict[str, dict[int, float]] = {}
    plain: dict[int, float] = {}
    for n_tensors in sizes:
        torch.manual_seed(0)
        base = Branches(n_tensors // 2)
        x = torch.randn(8, 16)
        for name in ["plain", *peers, *GUARDS]:
            model = Branches(n_tensors // 2)
            model.load_state_dict(base.state_dict())
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            guard = gg.Guard(model, opt, console=False, **GUARDS[name]) if name in GUARDS else None
            extra_time: list[float] = []
            step = _loop(model, opt, x, guard, peers[name](model) if name in peers else None, extra_time)
            for _ in range(max(20, steps // 5)):
                step()
            spent.clear()
            extra_time.clear()
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            per_step = (time.perf_counter() - t0) / steps
            if name == "plain":
                plain[n_tensors] = per_step
            else:
                inside = (sum(sum(v) for v in spent.values()) if guard is not None else sum(extra_time)) / steps
                results.setdefault(name, {})[n_tensors] = inside
            if guard is not None:
                guard.close()
        print(f"  {n_tensors} tensors: plain step {1000 * plain[n_tensors]:.2f} ms", flush=True)
    print(f"\nTime per step inside gradguard (Guard rows) or inside the peer's call (others), {steps} steps after "
          "warm-up; ms per step, and microseconds per parameter tensor")
    head = " | ".join(f"{n} tensors" for n in sizes)
    print(f"| per step | {head} | {sizes[-1]} / {sizes[0]} | slope (us per tensor) |")
    print("|---" * (len(sizes) + 3) + "|")
    print(f"| plain step (for scale) | {' | '.join(f'{1000 * plain[n]:.2f} ms' for n in sizes)} | "
          f"{plain[sizes[-1]] / plain[sizes[0]]:.1f}x | {1e6 * _slope(sizes, plain):.1f} |")
    kernel = results["torch._foreach_norm(grads) alone"]
    # What gradguard adds around the one norm kernel it launches: its Python, the fold per layer, the row.
    results["Guard (defaults) minus the norm kernel"] = {n: results["Guard (defaults)"][n] - kernel[n] for n in sizes}
    for name, by_n in results.items():
        cells = " | ".join(f"{1000 * by_n[n]:.3f} ms ({1e6 * by_n[n] / n:.1f} us/t)" for n in sizes)
        print(f"| {name} | {cells} | {by_n[sizes[-1]] / by_n[sizes[0]]:.1f}x | {1e6 * _slope(sizes, by_n):.2f} |")
    if profile_at:
        profile(profile_at, steps)


def _slope(sizes: list[int], by_n: dict[int, float]) -> float:
    """Least-squares seconds per extra tensor."""
    xs, ys = sizes, [by_n[n] for n in sizes]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)


def profile(n_tensors: int, steps: int) -> None:
    """gradguard's functions with the most own time per step, for the defaults at ``n_tensors`` tensors."""
    torch.manual_seed(0)
    model, x = Branches(n_tensors // 2), torch.randn(8, 16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    guard = gg.Guard(model, opt, console=False)
    step = _loop(model, opt, x, guard, None, [])
    for _ in range(20):
        step()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step()
    prof.disable()
    guard.close()
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    rows = [(tt / steps, nc / steps, f"{fn.replace(GG_DIR + '/', 'gradguard/')}:{line}({func})")
            for (fn, line, func), (cc, nc, tt, ct, _) in stats.items() if fn.startswith(GG_DIR)]
    rows.sort(reverse=True)
    print(f"\ncProfile, Guard (defaults), {n_tensors} tensors, {steps} steps: gradguard functions by own time "
          "per step (cProfile inflates Python time; compare rows with each other)")
    print("| function | own time per step | calls per step |\n|---|---|---|")
    for tt, nc, where in rows[:12]:
        print(f"| {where} | {1e6 * tt:.1f} us | {nc:.1f} |")


class TinyMLP(nn.Module):
    """4 x Linear(32, 32) + ReLU and a head: a step of well under a millisecond, so 20k steps take minutes."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(4):
            layers += [nn.Linear(32, 32), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(32, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


STEP_GUARDS: dict[str, dict[str, Any]] = {
    "Guard (defaults)": {},
    "Guard(clip=1e-3), clips every step": {"clip": 1e-3},
    "Guard(clip='autoclip')": {"clip": "autoclip"},
    "Guard(repair='auto')": {"repair": "auto"},
}


def steps_part(checkpoints: list[int], window: int) -> None:
    print(f"\nTiny MLP (4 x 32, batch 16): per checkpoint, the {window} steps before it: median time per step of "
          f"blocks of 100 steps, time inside gradguard per step, and the Guard's own state")
    print("| Guard | steps | step (ms) | inside gradguard (ms/step) | Guard state | of which actions list |")
    print("|---|---|---|---|---|---|")
    for name, kw in STEP_GUARDS.items():
        steps_run(name, kw, checkpoints, window)


def steps_run(name: str, kw: dict[str, Any], checkpoints: list[int], window: int) -> None:
    """Train the tiny MLP under one Guard up to each checkpoint; print a row per checkpoint."""
    spent = instrument()
    torch.manual_seed(0)
    model = TinyMLP()
    x, y = torch.randn(16, 32), torch.randn(16, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    guard = gg.Guard(model, opt, console=False, **kw)
    sizer = GuardSizer(model, opt)

    def step() -> None:
        loss = nn.functional.mse_loss(model(x), y)
        guard.observe_loss(loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    done = 0
    for target in checkpoints:
        blocks: list[float] = []
        while done < target:
            if target - done == window:
                spent.clear()  # time inside gradguard over the window only
            n = min(100, target - done)
            t0 = time.perf_counter()
            for _ in range(n):
                step()
            if target - done <= window:
                blocks.append((time.perf_counter() - t0) / n)
            done += n
        inside = sum(sum(v) for v in spent.values()) / window
        own, _ = sizer.measure(guard)
        acts = own.by_attr.get("_actions", 0)
        print(f"| {name} | {target} | {1000 * statistics.median(blocks):.3f} | {1000 * inside:.3f} | "
              f"{own.total / 1024:.1f} KiB | {acts / 1024:.1f} KiB ({len(guard._actions)} actions) |", flush=True)
    guard.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=["tensors", "steps", "all"], default="all")
    ap.add_argument("--quick", action="store_true", help="small sizes and few steps: checks that it runs")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, gradguard {gg.__version__}, threads {args.threads}")
    if args.part in ("tensors", "all"):
        if args.quick:
            tensors_part([10, 100], 20, 100)
        else:
            tensors_part([10, 30, 100, 300, 1000], 200, 1000)
    if args.part in ("steps", "all"):
        steps_part([300, 600] if args.quick else [1000, 5000, 20000], 200 if args.quick else 1000)


if __name__ == "__main__":
    main()

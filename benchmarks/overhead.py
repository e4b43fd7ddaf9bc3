"""Step-time overhead of gradguard's monitoring, against a plain step and against clip_grad_norm_.

Interleaved rounds in one process: each round times every variant for a few steps, in a rotating order, so drift
(thermal, other load) hits all variants alike. Reported: median per-step time over rounds, and its ratio to the
plain step. Run: ``python benchmarks/overhead.py [--suite monitor|clip|tiny] [--rounds N] [--steps K]
[--only mlp|gpt2]`` (``--suite tiny``: the 1.6k-parameter MLP on one thread, each Guard mode beside
``clip_grad_norm_``).
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
import weakref
from collections.abc import Callable

import torch
from torch import nn

import gradguard as gg
from gradguard.stats import script_hooks

LossOf = Callable[[nn.Module], Callable[[], torch.Tensor]]


def mlp48() -> tuple[nn.Module, LossOf]:
    """48 Linear(256, 256)+ReLU blocks and a head; batch 64.

    ``loss_of(model)`` gives the step's loss closure; ``loss_of.forward(model)`` runs a forward on the same batch
    without the loss (a validation forward), and ``loss_of.batch`` is the batch itself.
    """
    layers: list[nn.Module] = []
    for _ in range(48):
        layers += [nn.Linear(256, 256), nn.ReLU()]
    x, y = torch.randn(64, 256), torch.randint(0, 10, (64,))

    def loss_of(model: nn.Module) -> Callable[[], torch.Tensor]:
        return lambda: nn.functional.cross_entropy(model(x), y)

    loss_of.forward = lambda model: model(x)  # type: ignore[attr-defined]
    loss_of.batch = (x, y)  # type: ignore[attr-defined]
    return nn.Sequential(*layers, nn.Linear(256, 10)), loss_of


def tiny() -> tuple[nn.Module, LossOf]:
    """Linear 16-32-32-1 with ReLU (1.6k parameters), batch 32, MSE: a step is mostly fixed per-step cost, as in
    reinforcement learning, tutorials and tabular nets (``loss_of`` as for ``mlp48``)."""
    x, y = torch.randn(32, 16), torch.randn(32, 1)

    def loss_of(model: nn.Module) -> Callable[[], torch.Tensor]:
        return lambda: nn.functional.mse_loss(model(x), y)

    loss_of.forward = lambda model: model(x)  # type: ignore[attr-defined]
    loss_of.batch = (x, y)  # type: ignore[attr-defined]
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1)), loss_of


def gpt2() -> tuple[nn.Module, LossOf]:
    """transformers' GPT-2 from a config (no download): 4 layers, width 256, 4 x 128 tokens (``loss_of`` as for
    ``mlp48``)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=4, n_embd=256, n_head=4, n_positions=128, vocab_size=50257)
    ids = torch.randint(0, cfg.vocab_size, (4, 128))

    def loss_of(model: nn.Module) -> Callable[[], torch.Tensor]:
        return lambda: model(input_ids=ids, labels=ids).loss

    loss_of.forward = lambda model: model(input_ids=ids).logits  # type: ignore[attr-defined]
    loss_of.batch = (ids, ids)  # type: ignore[attr-defined]
    return GPT2LMHeadModel(cfg), loss_of


def variants(base: nn.Module, loss_of: LossOf, suite: str) -> dict[str, Callable[[], None]]:
    """The step functions to compare; the first one is the reference of the paired ratios."""
    out: dict[str, Callable[[], None]] = {}

    def make(name: str, clip: str | None, guard_kw: dict | None, fused: bool = False) -> None:
        model = copy.deepcopy(base)
        adam = torch.optim.Adam if suite == "tiny" else torch.optim.AdamW  # the tiny model's issue measured Adam
        opt = adam(model.parameters(), lr=1e-4, fused=fused or None)
        loss_fn = loss_of(model)
        guard = gg.Guard(model, opt, console=False, **guard_kw) if guard_kw is not None else None
        zc = None
        if clip == "zclip":
            from zclip import ZClip  # the reference package (bench extra)

            zc = ZClip(max_grad_norm=None)

        def step() -> None:
            loss = loss_fn()
            if guard is not None and suite != "tiny":  # tiny: the loop as written today, the loss read from backward
                guard.observe_loss(loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip == "norm":
                nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            elif zc is not None:
                zc.step(model)
            opt.step()

        def unwatched_step() -> None:
            # The other variants' Guards listen to every backward and clip in this process (gradguard wraps
            # torch.autograd.backward and clip_grad_norm_'s internals while any Guard listens): a variant without
            # a Guard must not pay for them, as it would not in a process of its own.
            script_hooks._local.busy = True
            try:
                step()
            finally:
                script_hooks._local.busy = False

        # Likewise a Guard variant hears only its own Guard's listener: in a process of its own it would not probe
        # the other variants' models at each of its backwards.
        own = tuple(weakref.ref(x) for x in (guard._wiring.listener,) if x is not None) if guard else ()

        def watched_step() -> None:
            everyone = script_hooks._active
            script_hooks._active = own
            try:
                step()
            finally:
                script_hooks._active = everyone

        out[name] = watched_step if guard is not None else unwatched_step

    if suite == "tiny":  # the fixed per-step cost: every Guard mode against clip_grad_norm_
        make("plain", None, None)
        make("plain + clip_grad_norm_", "norm", None)
        make("plain + Guard (defaults)", None, {})
        make("plain + Guard(clip=1.0)", None, {"clip": 1.0})
        make("plain + Guard(repair='auto')", None, {"repair": "auto"})
    elif suite == "monitor":
        make("plain", None, None)
        make("plain + clip_grad_norm_", "norm", None)
        make("plain + Guard (defaults)", None, {})
        make("plain + Guard (sample_every=100, log_every=50)", None, {"sample_every": 100, "log_every": 50})
        make("plain + Guard (sample_every=1, log_every=1)", None, {"sample_every": 1, "log_every": 1})
    else:  # clip: monitoring plus clipping against clipping alone
        make("plain + clip_grad_norm_", "norm", None)
        make("plain + Guard(clip=1.0)", None, {"clip": 1.0})
        make("fused AdamW + clip_grad_norm_", "norm", None, fused=True)
        make("fused AdamW + Guard(clip=1.0)", None, {"clip": 1.0}, fused=True)
        make("plain + zclip package", "zclip", None)
        make("plain + Guard(clip='zclip')", None, {"clip": "zclip"})
    return out


def interleave(steps_of: dict[str, Callable[[], None]], rounds: int, steps: int,
               steps_for: dict[str, int] | None = None, warmup: int = 3,
               progress: bool = False, clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Time every step function in interleaved rounds; returns, per name, the mean time per step of each round.

    Each round runs every variant for ``steps`` steps (``steps_for[name]`` where given: a slow peer may take fewer
    per round), in an order rotated by one each round, so drift (other load, thermal) hits every variant alike
    and a variant is not always timed right after the same neighbour. ``progress`` prints each round to stderr.
    ``clock``: ``time.perf_counter`` (wall) or ``time.thread_time`` (this thread's CPU time: with torch on one
    thread every operator runs on the calling thread, so a busy machine's other processes do not count).
    """
    names = list(steps_of)
    for fn in steps_of.values():  # warm-up: allocator, optimizer state, first-forward hooks
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {n: [] for n in names}
    start = time.perf_counter()
    for r in range(rounds):
        if progress:
            print(f"  round {r + 1}/{rounds}, {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            k = (steps_for or {}).get(n, steps)
            fn = steps_of[n]
            t0 = clock()
            for _ in range(k):
                fn()
            times[n].append((clock() - t0) / k)
    return times


def paired(times: dict[str, list[float]], name: str, ref: str) -> tuple[float, float, float]:
    """Median and interquartile range over rounds of ``name``'s time divided by ``ref``'s time in the same round
    (paired: drift between rounds cancels)."""
    ratios = sorted(a / b for a, b in zip(times[name], times[ref]))
    q1, q3 = ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]
    return statistics.median(ratios), q1, q3


def bench(name: str, build: Callable[[], tuple[nn.Module, LossOf]], rounds: int, steps: int,
          suite: str = "monitor", clock: str = "wall") -> None:
    torch.manual_seed(0)
    base, loss_of = build()
    vs = variants(base, loss_of, suite)
    names = list(vs)
    times = interleave(vs, rounds, steps, clock=time.thread_time if clock == "thread" else time.perf_counter)
    print(f"\n{name}: {sum(p.numel() for p in base.parameters()) / 1e6:.2f}M parameters, "
          f"{rounds} rounds x {steps} steps, {clock} clock; median per step, and median over rounds of the ratio to "
          "the plain step of the same round (paired: drift between rounds cancels)")
    ref = names[0]
    print(f"| variant | ms/step | paired ratio to {ref} (IQR) |\n|---|---|---|")
    for n in names:
        med, q1, q3 = paired(times, n, ref)
        print(f"| {n} | {1000 * statistics.median(times[n]):.2f} | {med:.3f}x ({q1:.3f}-{q3:.3f}) |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=None,
                    help="steps per variant per round (default: 10 for the MLP and GPT-2, 200 for the tiny model)")
    ap.add_argument("--only", choices=["tiny", "mlp", "gpt2"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--suite", choices=["monitor", "clip", "tiny"], default="monitor")
    ap.add_argument("--clock", choices=["wall", "thread"], default="wall",
                    help="thread: CPU time of this thread (one torch thread; robust to other load on the machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, threads {args.threads}")
    if args.suite == "tiny" or args.only == "tiny":  # one thread: the setting, and the fixed cost shows
        torch.set_num_threads(1)
        bench("tiny", tiny, args.rounds, args.steps or 200, "tiny", args.clock)
        return
    steps = args.steps or 10
    if args.only in (None, "mlp"):
        bench("mlp", mlp48, args.rounds, steps, args.suite)
    if args.only in (None, "gpt2"):
        bench("gpt2", gpt2, args.rounds, max(2, steps // 3), args.suite)


if __name__ == "__main__":
    main()

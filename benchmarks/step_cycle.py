"""The per-step cost of the tiny model of issue 16 with each variant alone in its own process, as a user runs it,
and where a Guard's time goes, step by step.

``overhead.py --suite tiny`` interleaves the variants in one process, so drift between rounds cancels; there every
variant runs between the others, which share the caches with it. A training script runs one variant alone: a
short path repeated at every step (``clip_grad_norm_``) stays in the caches, while work done every ``log_every``
steps (the Guard's host read and detectors) or ``sample_every`` steps finds them filled by the training step, and
leaves the next step to refill them.

Every step of every variant is timed on the thread's CPU clock. Summary: each variant's mean step against the plain
step's mean (what a run pays). For a Guard, each step also goes in one category: ordinary, ending with the host
read (window rules not due, or due), right after a read, a sample step (activation hooks, weight copy, update
norms), right after one; the median of each category against the plain step's median gives the cost of each kind
of event, and its after-effect on the next step. Variants run ``--reps`` times, alternating (a process's memory
layout moves its step time by +-10%).

Run: ``OMP_NUM_THREADS=1 python benchmarks/step_cycle.py [--steps 5000] [--reps 5]
[--variants plain,clip,guard,guard_clip,repair]`` (about 7 s a process on a 2-core VM).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict

from instructions import VARIANTS  # the same five variants, counted there (this file's folder is on sys.path)


def child(kind: str, steps: int) -> None:
    """Time every step; print one ``category microseconds`` line per step."""
    import torch
    from kernel_count import make  # this file's folder is the child's sys.path[0]

    torch.set_num_threads(1)
    step = make(kind)
    guard = step.guard  # type: ignore[attr-defined]
    for _ in range(500):  # past the first steps and the first window
        step()
    w = guard._wiring if guard is not None else None
    reads, after_read, after_sample = 0, False, False
    if w is not None:
        drain = w.drain

        def counted(*a: object, **k: object) -> None:
            nonlocal reads
            reads += 1
            drain(*a, **k)  # type: ignore[arg-type]
        w.drain = counted
    lines = []
    for _ in range(steps):
        before = reads
        window_at = w.judge._window_at if w is not None else None
        sample = w is not None and w.recorder.step % w.recorder.sample_every == 0
        t0 = time.thread_time_ns()
        step()
        dt = (time.thread_time_ns() - t0) / 1e3
        if w is None:
            cat = "ordinary"
        elif reads > before:
            cat = "read, window rules run" if w.judge._window_at != window_at else "read"
        elif sample:
            cat = "sample"
        elif after_read:
            cat = "after a read"
        elif after_sample:
            cat = "after a sample"
        else:
            cat = "ordinary"
        after_read, after_sample = reads > before, sample
        lines.append(f"{cat}\t{dt}")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--child", nargs=2, metavar=("KIND", "STEPS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]))
        return
    kinds = args.variants.split(",")
    if kinds[0] != "plain" or any(k not in VARIANTS for k in kinds):
        sys.exit(f"--variants: 'plain' first, then any of {list(VARIANTS)[1:]}")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    per: dict[str, dict[str, list[float]]] = {kind: defaultdict(list) for kind in kinds}
    for rep in range(args.reps):
        for kind in kinds[rep % len(kinds):] + kinds[:rep % len(kinds)]:  # rotated: none always runs first
            out = subprocess.run([sys.executable, __file__, "--child", kind, str(args.steps)], capture_output=True,
                                 text=True, env=env, check=True).stdout
            for line in out.splitlines():
                cat, us = line.split("\t")
                per[kind][cat].append(float(us))
    every = {kind: [v for vals in cats.values() for v in vals] for kind, cats in per.items()}
    base = statistics.mean(every["plain"])
    print(f"{args.reps} x {args.steps} steps a variant, each run in a process of its own, thread clock\n")
    print("| variant | mean step (us) | ratio to plain |")
    print("|---|---|---|")
    for kind in kinds:
        mean = statistics.mean(every[kind])
        print(f"| {VARIANTS[kind]} | {mean:.0f} | {mean / base:.3f}x |")
    plain = statistics.median(per["plain"]["ordinary"])
    print(f"\nBy kind of step (medians; the plain step's median is {plain:.0f} us):\n")
    print("| variant | kind of step | share of steps | median (us) | over plain (us) | amortised a step (us) |")
    print("|---|---|---|---|---|---|")
    for kind in kinds[1:]:
        total = len(every[kind])
        for cat, vals in sorted(per[kind].items(), key=lambda kv: -len(kv[1])):
            med, share = statistics.median(vals), len(vals) / total
            print(f"| {kind} | {cat} | {share:.0%} | {med:.0f} | {med - plain:+.0f} | {(med - plain) * share:+.1f} |")


if __name__ == "__main__":
    main()

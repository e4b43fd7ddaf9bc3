"""CPU instructions per training step of the tiny model of issue 16 (Linear 16-32-32-1 with ReLU, Adam, batch 32,
one thread), counted by valgrind (callgrind): plain, plain + clip_grad_norm_, and each Guard mode. The count is
the same on every run of the same code and does not depend on how loaded the machine is (wall-clock ratios on a
shared 2-core VM swing by 5-10% between runs, more than the differences asked about). It leaves out what a count
cannot see (cache misses, the memory system), so it complements the paired timings of ``overhead.py``.

Each variant runs in its own process twice, for ``--short`` and ``--long`` steps; the difference divided by the
difference in steps is the per-step count (start-up, imports and attach cancel). Reads and judgements every
``log_every`` steps and samples every ``sample_every`` steps are included, amortised, as in training.

Run: ``python benchmarks/instructions.py [--variants plain,clip,guard,guard_clip,repair] [--jobs 2]``
(valgrind required: ``apt-get install valgrind``; about 2.5 minutes per process on a 2-core VM).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

VARIANTS = {
    "plain": "plain",
    "clip": "plain + clip_grad_norm_(1.0)",
    "guard": "plain + Guard (defaults)",
    "guard_clip": "plain + Guard(clip=1.0)",
    "repair": "plain + Guard(repair='auto')",
}


def train(kind: str, steps: int) -> None:
    """The loop that is counted (run in the child process): kernel_count.py's, so both count the same steps."""
    import torch
    from kernel_count import make  # this file's folder is the child's sys.path[0]

    torch.set_num_threads(1)
    step = make(kind)
    for _ in range(steps):
        step()


def count(kind: str, steps: int, workdir: str) -> int:
    """Instructions executed by ``python this_file --child KIND STEPS`` under callgrind."""
    out = os.path.join(workdir, f"cg.{kind}.{steps}")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable,
                           __file__, "--child", kind, str(steps)], capture_output=True, text=True, env=env)
    found = re.search(r"Collected\s*:\s*(\d+)", proc.stderr)
    if proc.returncode != 0 or found is None:
        raise RuntimeError(f"{kind} x {steps}: valgrind failed:\n{proc.stderr[-2000:]}")
    return int(found.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--short", type=int, default=100)
    ap.add_argument("--long", type=int, default=1100)
    ap.add_argument("--jobs", type=int, default=2, help="valgrind processes at once")
    ap.add_argument("--child", nargs=2, metavar=("KIND", "STEPS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        train(args.child[0], int(args.child[1]))
        return
    if shutil.which("valgrind") is None:
        sys.exit("valgrind not found: apt-get install valgrind")
    kinds = args.variants.split(",")
    unknown = [k for k in kinds if k not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.jobs) as pool:
        jobs = {(k, n): pool.submit(count, k, n, tmp) for k in kinds for n in (args.short, args.long)}
        per_step = {k: (jobs[k, args.long].result() - jobs[k, args.short].result()) / (args.long - args.short)
                    for k in kinds}
    import torch

    print(f"torch {torch.__version__}, Python {sys.version.split()[0]}; {args.long - args.short} steps counted\n")
    print("| variant | instructions per step | added to plain | ratio to plain |")
    print("|---|---|---|---|")
    base = per_step.get("plain")
    for k in kinds:
        added = f"{per_step[k] - base:,.0f}" if base else "-"
        ratio = f"{per_step[k] / base:.3f}x" if base else "-"
        print(f"| {VARIANTS[k]} | {per_step[k]:,.0f} | {added} | {ratio} |")


if __name__ == "__main__":
    main()

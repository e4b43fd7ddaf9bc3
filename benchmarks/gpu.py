"""On a CUDA machine: prove that gradguard's per-step path never synchronises host and device, and measure its cost.

Part 1 runs a few training steps of each configuration under ``torch.cuda.set_sync_debug_mode("error")`` (every
synchronising CUDA call raises) after a warm-up: monitoring (fp32, bf16 autocast, fp16 with GradScaler), clipping
with a fused optimizer (global norm, ZClip, AGC), the repair ladder with a fused optimizer, activation sampling and
mode checks. Statistics reads (every ``log_every`` steps) are synchronising by design, so ``log_every`` is set past
the checked steps; ``sample_every`` is small so sampled steps are checked too.

Part 2 times step-time ratios with CUDA events over interleaved rounds (paired per round, medians): a GPT-2 small
sized model (12 x 768, 124 M parameters, bf16 autocast, fused AdamW) and the 48 x 256 ReLU MLP of
``benchmarks/overhead.py``.

Run: ``python benchmarks/gpu.py [--rounds N] [--steps K] [--json PATH]``. Exits 0 without a GPU (nothing to do),
1 if any sync check failed.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import traceback
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import gradguard as gg

DEV = "cuda"


# ---------------------------------------------------------------------------------------------------- models


def mlp48() -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]:
    layers: list[nn.Module] = []
    for _ in range(48):
        layers += [nn.Linear(256, 256), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(256, 10)).to(DEV)
    x, y = torch.randn(64, 256, device=DEV), torch.randint(0, 10, (64,), device=DEV)
    return model, lambda m: nn.functional.cross_entropy(m(x), y)


class SmallNet(nn.Module):
    """Embedding, LayerNorm, Dropout, BatchNorm, ReLU: every kind of module the hooks and samplers treat."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 64)
        self.norm = nn.LayerNorm(64)
        self.fc1 = nn.Linear(64, 128)
        self.bn = nn.BatchNorm1d(128)
        self.drop = nn.Dropout(0.1)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.emb(ids).mean(1))
        return self.fc2(self.drop(torch.relu(self.bn(self.fc1(h)))))


def small() -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]:
    model = SmallNet().to(DEV)
    ids, y = torch.randint(0, 100, (32, 16), device=DEV), torch.randint(0, 10, (32,), device=DEV)
    return model, lambda m: nn.functional.cross_entropy(m(ids), y)


def gpt2(n_layer: int = 12, width: int = 768, batch: int = 8, tokens: int = 512
         ) -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=n_layer, n_embd=width, n_head=width // 64, n_positions=max(tokens, 128),
                     vocab_size=50257)
    model = GPT2LMHeadModel(cfg).to(DEV)
    ids = torch.randint(0, cfg.vocab_size, (batch, tokens), device=DEV)
    return model, lambda m: m(input_ids=ids, labels=ids).loss


# ---------------------------------------------------------------------------------------------------- part 1


def sync_check(name: str, build: Callable[[], tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]],
               guard_kw: dict[str, Any], *, fused: bool = True, amp: str | None = None, steps: int = 8,
               warmup: int = 3) -> dict[str, Any]:
    """Train ``warmup`` steps, then ``steps`` more with synchronising CUDA calls turned into errors."""
    torch.manual_seed(0)
    model, loss_of = build()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused or None, foreach=None if fused else True)
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
    guard = gg.Guard(model, opt, console=False, log_every=1000, sample_every=3, **guard_kw)

    def one_step() -> None:
        if amp is None:
            loss = loss_of(model)
        else:
            with torch.autocast(DEV, dtype=torch.float16 if amp == "fp16" else torch.bfloat16):
                loss = loss_of(model)
        guard.observe_loss(loss)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()

    result: dict[str, Any] = {"check": name, "ok": False}
    try:
        for _ in range(warmup):  # first steps build index tensors and optimizer state (host reads allowed)
            one_step()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(steps):
                one_step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
        h = guard.history  # the statistics read, outside the checked steps (it synchronises by design)
        assert h is not None
        result.update(ok=True, rows=len(h.steps), samples=len(h.sample_steps),
                      diagnoses=[d.kind for d in guard.diagnoses], actions=sorted({a.kind for a in guard.actions}))
    except Exception as e:  # keep going: report every check
        torch.cuda.set_sync_debug_mode(0)
        result["error"] = "".join(traceback.format_exception(type(e), e, e.__traceback__, limit=-6))[-3000:]
    finally:
        guard.close()
    return result


def part1() -> list[dict[str, Any]]:
    checks = [
        ("monitor, fp32, fused AdamW, MLP", mlp48, {}, {}),
        ("monitor, fp32, foreach AdamW, small net (embedding, BN, dropout)", small, {}, {"fused": False}),
        ("monitor, bf16 autocast, GPT-2 2x128", lambda: gpt2(2, 128, 4, 64), {}, {"amp": "bf16"}),
        ("monitor, fp16 + GradScaler, fused AdamW, small net", small, {}, {"amp": "fp16"}),
        ("clip=1.0 (global norm), fused AdamW, MLP", mlp48, {"clip": 1.0}, {}),
        ("clip=1.0, foreach AdamW, MLP", mlp48, {"clip": 1.0}, {"fused": False}),
        ("clip='zclip', fused AdamW, MLP", mlp48, {"clip": "zclip"}, {}),
        ("clip='autoclip', fused AdamW, MLP", mlp48, {"clip": "autoclip"}, {}),  # kthvalue with a host-side k
        ("clip='agc', fused AdamW, small net", small, {"clip": "agc"}, {}),
        ("clip=1.0, fp16 + GradScaler, fused AdamW", small, {"clip": 1.0}, {"amp": "fp16"}),
        ("repair='auto', fused AdamW, MLP", mlp48, {"repair": "auto"}, {}),
        ("repair='auto', fp16 + GradScaler, fused AdamW", small, {"repair": "auto"}, {"amp": "fp16"}),
    ]
    out = []
    for name, build, kw, opts in checks:
        r = sync_check(name, build, kw, **opts)
        print(f"[sync] {'OK  ' if r['ok'] else 'FAIL'} {name}" + ("" if r["ok"] else f"\n{r['error']}"), flush=True)
        out.append(r)
    # The documented exception: nonfinite_check="step" reads one flag per step, so it must raise here.
    r = sync_check("nonfinite_check='step' (documented: one read per step)", mlp48, {"nonfinite_check": "step"})
    r["expected_to_sync"] = True
    print(f"[sync] {'raised as documented' if not r['ok'] else 'UNEXPECTED: no sync'} nonfinite_check='step'",
          flush=True)
    out.append(r)
    return out


# ---------------------------------------------------------------------------------------------------- part 2


def timed_variants(build: Callable[[], tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]], amp: str | None
                   ) -> dict[str, Callable[[], None]]:
    torch.manual_seed(0)
    base, loss_of = build()
    out: dict[str, Callable[[], None]] = {}

    def make(name: str, clip_norm: bool, guard_kw: dict[str, Any] | None) -> None:
        model = copy.deepcopy(base)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
        guard = gg.Guard(model, opt, console=False, **guard_kw) if guard_kw is not None else None

        def step() -> None:
            if amp == "bf16":
                with torch.autocast(DEV, dtype=torch.bfloat16):
                    loss = loss_of(model)
            else:
                loss = loss_of(model)
            if guard is not None:
                guard.observe_loss(loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip_norm:
                nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
            opt.step()

        out[name] = step

    make("plain (fused AdamW)", False, None)
    make("plain + clip_grad_norm_", True, None)
    make("Guard (defaults)", False, {})
    make("Guard (log_every=50, sample_every=100)", False, {"log_every": 50, "sample_every": 100})
    make("Guard(clip=1.0)", False, {"clip": 1.0})
    make("Guard(repair='auto')", False, {"repair": "auto"})
    return out


def bench(label: str, build: Callable[[], tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]],
          amp: str | None, rounds: int, steps: int) -> dict[str, Any]:
    vs = timed_variants(build, amp)
    names = list(vs)
    for fn in vs.values():
        for _ in range(5):
            fn()
    torch.cuda.synchronize()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[: r % len(names)]:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                vs[n]()
            end.record()
            end.synchronize()  # benchmark's own sync, between rounds
            times[n].append(start.elapsed_time(end) / steps)
    ref = names[0]
    rows = []
    print(f"\n{label}: {rounds} rounds x {steps} steps, CUDA-event time per step, paired ratio to {ref}")
    print("| variant | ms/step | paired ratio (IQR) |\n|---|---|---|")
    for n in names:
        ratios = sorted(a / b for a, b in zip(times[n], times[ref]))
        q1, q3 = ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]
        row = {"variant": n, "ms": statistics.median(times[n]), "ratio": statistics.median(ratios), "q1": q1, "q3": q3}
        rows.append(row)
        print(f"| {n} | {row['ms']:.2f} | {row['ratio']:.3f}x ({q1:.3f}-{q3:.3f}) |", flush=True)
    return {"model": label, "rows": rows}


def profile_repair(steps: int = 30) -> None:
    """Where ``repair="auto"`` spends its time beside ``clip="zclip"`` (the clip it adds): torch's profiler on
    GPT-2 small, the top entries by self CPU time (host work: Python hooks, launches) and by CUDA time."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    for kw in ({"clip": "zclip"}, {"repair": "auto"}):
        model, loss_of = gpt2()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
        guard = gg.Guard(model, opt, console=False, **kw)

        def step(model: nn.Module = model, opt: torch.optim.Optimizer = opt,
                 loss_of: Callable[[nn.Module], torch.Tensor] = loss_of, guard: gg.Guard = guard) -> None:
            with torch.autocast(DEV, dtype=torch.bfloat16):
                loss = loss_of(model)
            guard.observe_loss(loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for _ in range(5):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                step()
            torch.cuda.synchronize()
        print(f"\nprofile of {steps} steps, Guard({kw}):", flush=True)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12), flush=True)
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=8), flush=True)
        guard.close()
        del model, opt


def memory(build: Callable[[], tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]], log_every: int = 10
           ) -> dict[str, Any]:
    """Bytes gradguard keeps on the GPU (its rows and index tensors at their fullest, just before a read) against
    the parameters' bytes: allocated memory at the same point of a step, with and without a Guard."""
    torch.manual_seed(0)
    model, loss_of = build()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

    def run(n: int) -> int:
        for _ in range(n):
            loss = loss_of(model)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            del loss
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()

    plain = run(3)
    guard = gg.Guard(model, opt, console=False, log_every=log_every)
    guarded = run(log_every - 1)  # rows of log_every - 1 steps are pending: the most the Guard holds
    guard.close()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    out = {"guard_bytes": guarded - plain, "param_bytes": params, "share": (guarded - plain) / params}
    print(f"\nmemory: gradguard holds {out['guard_bytes']} bytes on the GPU, {100 * out['share']:.4f} % of the "
          f"{params} parameter bytes", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--json", default=None)
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--only", choices=["gpt2", "mlp"], default=None, help="time one model only")
    ap.add_argument("--profile-repair", action="store_true", help="also profile repair='auto' against clip='zclip'")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA device here; nothing to do (run it on a GPU machine)")
        return 0
    torch.backends.cuda.matmul.allow_tf32 = True
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, gradguard {gg.__version__}", flush=True)
    report: dict[str, Any] = {"torch": torch.__version__, "device": torch.cuda.get_device_name()}
    report["sync"] = part1()
    if not args.skip_bench:
        report["bench"] = []
        if args.only in (None, "gpt2"):
            report["bench"].append(bench("GPT-2 small (12x768, 124M, 8x512 tokens, bf16 autocast)", gpt2, "bf16",
                                         args.rounds, args.steps))
        if args.only in (None, "mlp"):
            report["bench"].append(bench("MLP 48x256 (batch 64, fp32)", mlp48, None, args.rounds, args.steps * 3))
        report["memory"] = {"gpt2_small": memory(gpt2), "mlp48": memory(mlp48)}
    if args.profile_repair:
        profile_repair()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    failed = [r["check"] for r in report["sync"] if r["ok"] == bool(r.get("expected_to_sync"))]
    print(f"\nsync checks: {len(report['sync']) - len(failed)} as expected, {len(failed)} not: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

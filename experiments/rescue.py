"""The rescue benchmark (issue 14): training faults across model families, against the usual remedies.

Four model families, each with a healthy configuration (the oracle: the same model, same seed, same batches, at a
learning rate that trains, with no fault):
- mlp: a 3 x 128 ReLU MLP on scikit-learn's digits, SGD lr 0.1 momentum 0.9, batch 64 (test accuracy);
- cnn: two 3x3 conv layers (8, 16 channels), max-pooling and a linear head on the 8x8 digits, SGD lr 0.05
  momentum 0.9 (test accuracy);
- lstm: an LSTM (32 units) on the adding problem at T = 20, Adam lr 1e-2, 1.5x the steps (test MSE);
- gpt: a 2-layer causal transformer (d = 32, 2 heads, pre-LayerNorm) copying 8 random digits after a separator,
  AdamW lr 3e-3, batch 32, half the steps (accuracy on the copied tokens).

Faults (``FAULTS``, 16 scenarios in ``SCENARIOS``): a learning rate 10x, 100x or 1000x the healthy one from the
start (the wrong hyperparameter); NaN batches (NaN inputs at 40%, 40% + 1 step and 60% of the run); an Inf written
into the first weight at 50%; a corrupted batch (two batches of garbage inputs, N(0, 1) x 1e3, at 40%); an
fp16-style overflow (the loss multiplied by 1e30 before backward for three steps at 10%, as a loss scale that
overflows: gradients ~1e27, whose squares overflow float32).

Strategies, each on the same batches:
- none: plain PyTorch;
- clip: ``torch.nn.utils.clip_grad_norm_(params, 1.0)`` before every step;
- zclip: gradguard's ``ZClip`` standalone (``gg.ZClip().step(params)``), Kumar et al. 2025;
- spike-skip: a skip rule in the manner of OLMo-core's SkipStepOptimizer, written from its description only: skip
  the step when the loss or the gradient norm is more than 6 standard deviations above the mean of a window of the
  last 128 non-skipped steps; it acts once 64 steps are in the window (our choice). The test is written as
  ``value <= mean + 6 std`` must hold, so a NaN or Inf loss or norm is skipped too;
- auto: ``gradguard.Guard(model, opt, repair="auto")`` (skip, ZClip, backoff, rollback), loss given by
  ``observe_loss``;
- spike-skip-all (only with --strategies): the skip rule with every finite step in its window, skipped or not.

For each scenario x strategy x seed: the final metric as a fraction of the healthy run's (accuracy / healthy
accuracy; for the MSE, the fraction of the healthy run's gain over predicting the mean: (var - mse) / (var -
mse_healthy)); a run whose weights or outputs are not finite scores 0. "Rescued" = fraction >= RESCUED. Also steps
skipped, learning-rate backoffs, rollbacks, clips, and the training loop's wall time. On the healthy runs of each
family the false actions (skips, backoffs, rollbacks; a clip is ZClip's job, counted apart) must be zero.

Checks: every fault is real (the unrepaired run is not rescued on any seed); the healthy runs, unrepaired and with
repair="auto", train (fraction >= RESCUED) and repair="auto" takes no false action there; repair="auto" rescues
the scenarios in EXPECTED_RESCUE on every seed (the others are known gaps: [GAP ], failing only with --strict).
The other strategies are measured, not checked: EXPERIMENTS.md, section 6. --quick: one seed, none and auto, the
healthy runs and EXPECTED_RESCUE only (about 50 s of CPU).

Run: python experiments/rescue.py [--seeds 3] [--steps 400] [--quick] [--json out.json]
     [--only mlp/lr_x10,gpt] [--strategies none,auto] [--strict]
"""

from __future__ import annotations

import math
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from _common import Checks, finish, fmt_ms, parser, setup, table
from torch import nn

import gradguard as gg
from gradguard.demo import Recurrent, adding_batch, digits, mlp

RESCUED = 0.9  # a run ending at 90% or more of the healthy run's metric is rescued
STRATEGIES = ("none", "clip", "zclip", "spike-skip", "auto")
EXTRA = ("spike-skip-all",)  # on request only: the skip rule with every finite step in its window, skipped or not


# ---------------------------------------------------------------------------------------------------- the models


def cnn() -> nn.Sequential:
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(256, 10))


class TinyGPT(nn.Module):
    """A pre-LayerNorm causal transformer: token + position embeddings, ``layers`` blocks, a linear head."""

    def __init__(self, vocab: int = 11, d: int = 32, layers: int = 2, heads: int = 2, ctx: int = 16) -> None:
        super().__init__()
        self.tok, self.pos, self.heads = nn.Embedding(vocab, d), nn.Embedding(ctx, d), heads
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "ln1": nn.LayerNorm(d), "qkv": nn.Linear(d, 3 * d), "proj": nn.Linear(d, d),
            "ln2": nn.LayerNorm(d), "fc": nn.Linear(d, 4 * d), "out": nn.Linear(4 * d, d)}) for _ in range(layers))
        self.lnf, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.shape
        h = self.tok(x) + self.pos(torch.arange(t))
        for blk in self.blocks:
            q, k, v = blk["qkv"](blk["ln1"](h)).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            h = h + blk["proj"](a.transpose(1, 2).reshape(b, t, -1))
            h = h + blk["out"](nn.functional.gelu(blk["fc"](blk["ln2"](h))))
        return self.head(self.lnf(h))


COPY = 8  # digits to copy; the sequence is the digits, a separator (10), and the digits again (the last one is
# only predicted, never read): 2 * COPY tokens


def copy_batch(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.randint(0, 10, (n, COPY), generator=gen)
    return torch.cat([a, torch.full((n, 1), 10), a[:, :-1]], 1), a


@dataclass
class Task:
    """One family's data, model, optimizer and metric for one seed."""

    model: nn.Module
    make_opt: Callable[[float], torch.optim.Optimizer]
    batch: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    metric: Callable[[], float]  # accuracy (higher is better), or the MSE (``trivial`` set: lower is better)
    trivial: float | None = None  # the MSE of predicting the mean: the fraction is the share of the healthy gain


HEALTHY_LR = {"mlp": 0.1, "cnn": 0.05, "lstm": 1e-2, "gpt": 3e-3}
# Steps of each family, as a multiple of --steps: the LSTM sits on the adding problem's plateau (MSE 1/6) for
# 200-300 steps before it learns; the GPT fits its copy task in about 100.
FAMILY_STEPS = {"mlp": 1.0, "cnn": 1.0, "lstm": 1.5, "gpt": 0.5}


def make_task(family: str, seed: int) -> Task:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    if family in ("mlp", "cnn"):
        xtr, ytr, xte, yte = digits(seed)
        model = mlp(3, 128, nn.ReLU) if family == "mlp" else cnn()

        def batch() -> tuple[torch.Tensor, torch.Tensor]:
            idx = torch.randint(0, len(xtr), (64,), generator=gen)
            return xtr[idx], ytr[idx]

        def accuracy() -> float:
            out = model(xte)
            return (out.argmax(1) == yte).float().mean().item() if torch.isfinite(out).all() else 0.0

        return Task(model, lambda lr: torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9), batch,
                    nn.functional.cross_entropy, accuracy)
    if family == "lstm":
        model = Recurrent("lstm", 32)
        xe, ye = adding_batch(512, 20, torch.Generator().manual_seed(10_000 + seed))

        def mse() -> float:
            v = nn.functional.mse_loss(model(xe), ye).item()
            return v if math.isfinite(v) else math.inf

        return Task(model, lambda lr: torch.optim.Adam(model.parameters(), lr=lr), lambda: adding_batch(64, 20, gen),
                    nn.functional.mse_loss, mse, trivial=float(ye.var(unbiased=False)))
    assert family == "gpt"
    gpt = TinyGPT()
    xe, ae = copy_batch(512, torch.Generator().manual_seed(10_000 + seed))

    def lm_loss(out: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(out[:, COPY:].reshape(-1, out.shape[-1]), a.reshape(-1))

    def copy_acc() -> float:
        out = gpt(xe)[:, COPY:]
        return (out.argmax(-1) == ae).float().mean().item() if torch.isfinite(out).all() else 0.0

    return Task(gpt, lambda lr: torch.optim.AdamW(gpt.parameters(), lr=lr, weight_decay=0.0),
                lambda: copy_batch(32, gen), lm_loss, copy_acc)


# ---------------------------------------------------------------------------------------------------- the faults


@dataclass(frozen=True)
class Fault:
    name: str
    lr_mult: float = 1.0
    at: float = 0.0  # where the fault strikes, as a fraction of the run's steps
    nan_batches: int = 0  # batches of NaN inputs from ``at`` (and one more at at + 0.2)
    corrupt: int = 0  # batches of garbage from ``at``: inputs drawn from N(0, 1e3^2)
    inf_weight: bool = False  # an Inf written into the first weight at ``at``
    overflow: int = 0  # steps from ``at`` whose loss is multiplied by 1e30 before backward


FAULTS = {f.name: f for f in (
    Fault("healthy"), Fault("lr_x10", lr_mult=10), Fault("lr_x100", lr_mult=100), Fault("lr_x1000", lr_mult=1000),
    Fault("nan_batches", at=0.4, nan_batches=2), Fault("inf_weight", at=0.5, inf_weight=True),
    Fault("corrupt_batch", at=0.4, corrupt=2), Fault("fp16_overflow", at=0.1, overflow=3))}
SCENARIOS = [
    ("mlp", "lr_x10"), ("mlp", "lr_x100"), ("mlp", "lr_x1000"), ("mlp", "nan_batches"), ("mlp", "corrupt_batch"),
    ("cnn", "lr_x10"), ("cnn", "inf_weight"), ("cnn", "corrupt_batch"), ("cnn", "fp16_overflow"),
    ("lstm", "lr_x100"), ("lstm", "lr_x1000"), ("lstm", "nan_batches"),
    ("gpt", "lr_x100"), ("gpt", "lr_x1000"), ("gpt", "fp16_overflow"), ("gpt", "inf_weight"),
]
FAMILIES = ("mlp", "cnn", "lstm", "gpt")
# repair="auto" must rescue these on every seed; the others are known gaps (EXPERIMENTS.md, section 6).
EXPECTED_RESCUE = {("mlp", "lr_x10"), ("mlp", "lr_x100"), ("mlp", "lr_x1000"), ("mlp", "nan_batches"),
                   ("mlp", "corrupt_batch"), ("cnn", "inf_weight"), ("cnn", "corrupt_batch"),
                   ("cnn", "fp16_overflow"), ("lstm", "lr_x100"), ("lstm", "lr_x1000"), ("lstm", "nan_batches"),
                   ("gpt", "inf_weight")}


class SpikeSkip:
    """Skip a step whose loss or gradient norm is more than ``sigma`` standard deviations above the mean of the
    last ``window`` non-skipped steps, once ``min_window`` of them are in (OLMo-core's SkipStepOptimizer, as its
    description goes; written from the description only)."""

    def __init__(self, sigma: float = 6.0, window: int = 128, min_window: int = 64, keep_skipped: bool = False) -> None:
        self.sigma, self.min_window, self.keep_skipped = sigma, min_window, keep_skipped
        self.losses: deque[float] = deque(maxlen=window)
        self.norms: deque[float] = deque(maxlen=window)

    def _within(self, values: deque[float], v: float) -> bool:
        t = torch.tensor(list(values), dtype=torch.float64)
        return v <= float(t.mean() + self.sigma * t.std())  # False for NaN and +Inf

    def skip(self, loss: float, norm: float) -> bool:
        skip = len(self.losses) >= self.min_window and not (self._within(self.losses, loss)
                                                            and self._within(self.norms, norm))
        # Before the window is full a bad step goes through, unseen; a non-finite value never enters the window.
        if (self.keep_skipped or not skip) and math.isfinite(loss) and math.isfinite(norm):
            self.losses.append(loss)
            self.norms.append(norm)
        return skip


class CountingZClip(gg.ZClip):
    """gradguard's ZClip, counting the steps it cut (for the table; a host read per step, free on the CPU)."""

    clips = 0

    def coefficient(self, total: torch.Tensor) -> torch.Tensor:
        c = super().coefficient(total)
        self.clips += int(bool(c < 1))
        return c


def grad_norm(params: list[nn.Parameter]) -> float:
    grads = [p.grad for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


def run(family: str, fault_name: str, strategy: str, seed: int, steps: int) -> dict[str, Any]:
    fault = FAULTS[fault_name]
    task = make_task(family, seed)
    model, params = task.model, list(task.model.parameters())
    opt = task.make_opt(HEALTHY_LR[family] * fault.lr_mult)
    at = int(fault.at * steps)
    nan_steps = set(range(at, at + fault.nan_batches)) | ({int((fault.at + 0.2) * steps)} if fault.nan_batches
                                                          else set())
    guard = gg.Guard(model, opt, repair="auto", console=False) if strategy == "auto" else None
    zclip = CountingZClip() if strategy == "zclip" else None
    skipper = SpikeSkip(keep_skipped=strategy == "spike-skip-all") if strategy.startswith("spike-skip") else None
    skipped = clips = 0
    garbage = torch.Generator().manual_seed(20_000 + seed)
    start = time.perf_counter()
    for step in range(steps):
        x, y = task.batch()
        if step in nan_steps:
            x = torch.full_like(x, math.nan)
        if at <= step < at + fault.corrupt:
            x = torch.randn(x.shape, generator=garbage) * 1e3
        if fault.inf_weight and step == at:
            with torch.no_grad():
                params[0].view(-1)[0] = math.inf
        loss = task.loss(model(x), y)
        if guard is not None:
            guard.observe_loss(loss)
        opt.zero_grad()
        (loss * 1e30 if at <= step < at + fault.overflow else loss).backward()
        if strategy == "clip":
            clips += int(float(nn.utils.clip_grad_norm_(params, 1.0)) > 1.0)
        elif zclip is not None:
            zclip.step(params)
        elif skipper is not None and skipper.skip(loss.item(), grad_norm(params)):
            skipped += 1
            continue
        opt.step()
    wall = time.perf_counter() - start
    if guard is not None:
        guard.close()
    model.eval()
    with torch.no_grad():
        finite = all(bool(torch.isfinite(p).all()) for p in params)
        value = task.metric() if finite else (0.0 if task.trivial is None else math.inf)
    counts = dict(guard.action_counts) if guard is not None else {}
    return {"family": family, "fault": fault_name, "strategy": strategy, "seed": seed, "steps": steps,
            "metric": value, "finite": finite, "trivial": task.trivial, "wall_s": round(wall, 3),
            "skipped": skipped + counts.get("skip_step", 0), "backoffs": counts.get("lr_backoff", 0),
            "rollbacks": counts.get("rollback", 0), "restores": counts.get("lr_restore", 0),
            "clips": clips + counts.get("clip", 0) + (zclip.clips if zclip is not None else 0),
            "lr_mult": guard.ladder.lr_mult if guard is not None and guard.ladder is not None else None,
            "actions": [{"kind": a.kind, "step": a.step, **a.detail}
                        for a in (guard.actions if guard is not None else []) if a.kind != "clip"][:40],
            "diagnoses": [(d.kind, d.step) for d in guard.diagnoses] if guard is not None else []}


def fraction(r: dict[str, Any], healthy: dict[str, Any]) -> float:
    """The run's metric as a fraction of the healthy run's (0 for non-finite weights or outputs)."""
    if r["trivial"] is None:
        return r["metric"] / healthy["metric"] if healthy["metric"] > 0 else 0.0
    if not math.isfinite(r["metric"]):
        return 0.0
    return max(0.0, (r["trivial"] - r["metric"]) / (r["trivial"] - healthy["metric"]))


def _cell(key: tuple[str, str], strategy: str, rs: list[dict[str, Any]]) -> str:
    """One cell of the table: mean fraction (rescued seeds), and the actions taken over the seeds."""
    if not rs:
        return "-"
    fr = [r["fraction"] for r in rs]
    out = f"{fmt_ms(fr, '.2f')} ({sum(f >= RESCUED for f in fr)}/{len(fr)})"
    acted = [(sum(r[k] for r in rs), c) for k, c in (("skipped", "s"), ("backoffs", "b"), ("rollbacks", "r"))]
    if any(n for n, _ in acted):
        out += " " + " ".join(f"{c}{n}" for n, c in acted)
    clips = sum(r["clips"] for r in rs)
    return out + (f" c{clips}" if key[1] == "healthy" and clips else "")


def main() -> int:
    p = parser(__doc__, seeds=3, steps=400)
    p.add_argument("--only", default="", help="comma-separated families or family/fault scenarios (default all)")
    p.add_argument("--strategies", default=",".join(STRATEGIES), help=f"default {','.join(STRATEGIES)}")
    args = p.parse_args()
    strategies = [s for s in args.strategies.split(",") if s]
    only = [s for s in args.only.split(",") if s]
    scenarios = [(f, x) for f, x in SCENARIOS if not only or f in only or f"{f}/{x}" in only]
    if args.quick:  # one seed; unrepaired against repair="auto" on the scenarios it must rescue: ~1 min of CPU
        args.seeds = 1
        strategies = [s for s in strategies if s in ("none", "auto")]
        scenarios = [k for k in scenarios if k in EXPECTED_RESCUE]
    unknown = set(strategies) - set(STRATEGIES) - set(EXTRA)
    if unknown:
        p.error(f"unknown strategies {sorted(unknown)}")
    families = [f for f in FAMILIES if any(f == s for s, _ in scenarios)]
    start = setup()
    runs: list[dict[str, Any]] = []
    for seed in range(args.seeds):
        for family in families:
            steps = int(args.steps * FAMILY_STEPS[family])
            healthy = None
            for fault in ["healthy"] + [x for f, x in scenarios if f == family]:
                for strategy in ("none", *[s for s in strategies if s != "none"]):
                    if strategy not in strategies and fault != "healthy":
                        continue
                    r = run(family, fault, strategy, seed, steps)
                    healthy = healthy or r  # the first run of each family: healthy, unrepaired
                    r["fraction"] = fraction(r, healthy)
                    runs.append(r)
                    print(f"seed {seed} {family}/{fault} {strategy}: metric {r['metric']:.4g}, fraction "
                          f"{r['fraction']:.3f}, skipped {r['skipped']}, backoffs {r['backoffs']}, rollbacks "
                          f"{r['rollbacks']}, clips {r['clips']}, {r['wall_s']:.1f} s", flush=True)

    checks = Checks()
    keys = [(f, "healthy") for f in families] + scenarios
    cells = {(k, s): _cell(k, s, [r for r in runs if (r["family"], r["fault"], r["strategy"]) == (*k, s)])
             for k in keys for s in strategies}
    title = (f"Rescue: final metric / the healthy run's, mean over {args.seeds} seed(s) (rescued seeds); s b r = "
             f"steps skipped, backoffs, rollbacks, c = clips (healthy rows), summed over seeds; {args.steps} steps "
             f"(gpt {FAMILY_STEPS['gpt']:.0%})")
    table(title, ("scenario", *strategies), [(f"{f}/{x}", *(cells[(f, x), s] for s in strategies)) for f, x in keys])
    summary = {}
    faulted = [r for r in runs if r["fault"] != "healthy"]
    for strategy in strategies:
        rs = [r for r in faulted if r["strategy"] == strategy]
        hs = [r for r in runs if r["fault"] == "healthy" and r["strategy"] == strategy]
        summary[strategy] = {
            "rescued": sum(r["fraction"] >= RESCUED for r in rs), "runs": len(rs),
            "mean_fraction": sum(r["fraction"] for r in rs) / max(1, len(rs)),
            "false_actions": sum(r["skipped"] + r["backoffs"] + r["rollbacks"] for r in hs),
            "healthy_clips": sum(r["clips"] for r in hs),
            "wall_s": sum(r["wall_s"] for r in runs if r["strategy"] == strategy)}
    summary_rows = [(s, f"{v['rescued']}/{v['runs']}", f"{v['mean_fraction']:.2f}", str(v["false_actions"]),
                     str(v["healthy_clips"]), f"{v['wall_s']:.1f}") for s, v in summary.items()]
    summary_head = ("strategy", "rescued runs", "mean fraction", "false actions (healthy)", "clips (healthy)",
                    "wall s (all its runs)")
    table("Summary: faulted runs; healthy runs for the false actions", summary_head, summary_rows)
    print("\nMarkdown (EXPERIMENTS.md):\n")
    print("| scenario | " + " | ".join(strategies) + " |\n|---|" + "---|" * len(strategies))
    for f, x in keys:
        print(f"| {f}/{x} | " + " | ".join(cells[(f, x), s] for s in strategies) + " |")
    print("\n| " + " | ".join(summary_head) + " |\n|---|" + "---|" * (len(summary_head) - 1))
    for row in summary_rows:
        print("| " + " | ".join(row) + " |")

    for family, fault in scenarios:
        none = [r for r in faulted if (r["family"], r["fault"], r["strategy"]) == (family, fault, "none")]
        checks.phenomenon(f"{family}/{fault} is a real fault", all(r["fraction"] < RESCUED for r in none),
                          "unrepaired fraction " + ", ".join(f"{r['fraction']:.2f}" for r in none)
                          + f" (need < {RESCUED} on every seed)")
    for family in families:
        # The healthy runs of the other strategies are reported in the table, not checked: a remedy that harms a
        # healthy run is a finding about it (EXPERIMENTS.md, section 6).
        for strategy in [s for s in ("none", "auto") if s in strategies]:
            hs = [r for r in runs if (r["family"], r["fault"], r["strategy"]) == (family, "healthy", strategy)]
            checks.phenomenon(f"{family} healthy, {strategy}: trains", all(r["fraction"] >= RESCUED for r in hs),
                              "fraction " + ", ".join(f"{r['fraction']:.3f}" for r in hs) + f" (need >= {RESCUED})")
        hs = [r for r in runs if (r["family"], r["fault"], r["strategy"]) == (family, "healthy", "auto")]
        if hs:
            false = [(r["skipped"], r["backoffs"], r["rollbacks"]) for r in hs]
            checks.verdict(f"{family} healthy: repair='auto' takes no false action", all(f == (0, 0, 0) for f in false),
                           "skips/backoffs/rollbacks per seed " + ", ".join(map(str, false)) + " (need 0)")
    if "auto" in strategies:
        for family, fault in scenarios:
            rs = [r for r in faulted if (r["family"], r["fault"], r["strategy"]) == (family, fault, "auto")]
            # Where the ladder is known to fail (EXPERIMENTS.md, section 6) the check is a known gap: [GAP ], and
            # a failure only with --strict; it reads PASS by itself once the ladder rescues the scenario.
            check = checks.verdict if (family, fault) in EXPECTED_RESCUE else checks.gap
            check(f"{family}/{fault}: repair='auto' rescues", all(r["fraction"] >= RESCUED for r in rs),
                  "fraction " + ", ".join(f"{r['fraction']:.2f}" for r in rs) + f" (need >= {RESCUED} on every seed)")
    return finish("rescue", args, start, checks, {"strategies": strategies, "rescued_at": RESCUED,
                                                  "summary": summary, "runs": runs})


if __name__ == "__main__":
    sys.exit(main())

"""Glorot & Bengio, "Understanding the difficulty of training deep feedforward neural networks", AISTATS 2010.

Two results, on scikit-learn's digits instead of the paper's Shapeset-3x2:

1. Figs. 6-7 (Sec. 4.2): a 5-hidden-layer tanh network at initialisation. With the "standard" initialisation
   W ~ U[-1/sqrt(n_in), 1/sqrt(n_in)] (Var = 1/(3 n_in)) the activations shrink with depth and the back-propagated
   gradients dCost/ds (s = pre-activation) shrink toward the input; the "normalised" initialisation
   W ~ U[-sqrt(6/(n_in+n_out)), +sqrt(6/(n_in+n_out))] keeps both roughly constant across layers. The paper's linear
   analysis predicts a factor n*Var(W) per layer: 1/3 for the standard init, so 9x in variance
   (3x in standard deviation) every two layers, and that the weight gradients dCost/dW stay about equal across
   layers in both cases. We measure the standard deviations per layer, their first/last ratios, and gradguard's
   verdict on a short training run of each (both networks train on digits, so gradguard must raise no vanishing and
   no exploding: the spikes of single hard examples late in these batch-10 runs are not damage, EXPERIMENTS.md F4).

2. Fig. 2 (Sec. 3.1): a 4-hidden-layer sigmoid network with the standard initialisation: the top hidden layer is
   pushed toward its lower saturation value 0 early in training, learning stalls, and the layer slowly desaturates
   later. We record, over training, the mean output of each hidden layer and the fraction of top-layer outputs
   near 0 (< 0.05), and in gradguard's flat region (sigmoid < 0.0025, where its slope is < 1% of its peak), and
   gradguard's verdict. The expected verdict is "saturation" (the paper's diagnosis) by the time the top layer is
   saturated, and "vanishing" or "saturation" while the network sits on its plateau (EXPERIMENTS.md F1-F2: both were
   missed before the mean-slope rule).

Run: python experiments/glorot2010_init.py [--seeds 5] [--steps 5000] [--quick] [--json out.json]
"""

from __future__ import annotations

import math
import sys

import torch
from _common import Checks, diagnoses, finish, first_seen, fmt_ms, mean_std, parser, setup, table, verdict_text
from torch import nn

import gradguard as gg
from gradguard.demo import digits, mlp

TOP_LOW = 0.1  # the top layer counts as pushed toward 0 once its mean output is below 1/5 of its initial 0.5
NEAR_ZERO = 0.05  # "near 0" for the saturation plot: sigmoid' there is < 19% of its peak
FLAT = 0.0025  # gradguard's flat region for a sigmoid (stats/activations.py): sigmoid' < 1% of its peak


def standard(lin: nn.Linear) -> None:
    """The paper's Eq. 1: U[-1/sqrt(n), 1/sqrt(n)] with n the fan-in, zero bias."""
    a = 1.0 / math.sqrt(lin.in_features)
    nn.init.uniform_(lin.weight, -a, a)
    nn.init.zeros_(lin.bias)


def normalised(lin: nn.Linear) -> None:
    """The paper's Eq. 16: U[-sqrt(6/(n_in+n_out)), sqrt(6/(n_in+n_out))] (torch's xavier_uniform_), zero bias."""
    nn.init.xavier_uniform_(lin.weight)
    nn.init.zeros_(lin.bias)


INITS = {"standard": standard, "normalised": normalised}


def build(act: type[nn.Module], depth: int, width: int, init) -> nn.Sequential:
    model = mlp(depth, width, act, init)
    init(model[-1])  # the paper initialises the softmax layer the same way
    return model


def init_stats(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor) -> dict[str, list[float]]:
    """Per hidden layer at initialisation: std of the activations, of the back-propagated gradient dCost/ds, and of
    the weight gradient dCost/dW."""
    linears = [m for m in model if isinstance(m, nn.Linear)][:-1]
    acts = [m for m in model if not isinstance(m, nn.Linear)]
    pre: list[torch.Tensor] = []
    post: list[torch.Tensor] = []

    def keep_pre(_m: nn.Module, _i: object, out: torch.Tensor) -> None:
        out.retain_grad()
        pre.append(out)
    handles = [lin.register_forward_hook(keep_pre) for lin in linears]
    handles += [a.register_forward_hook(lambda _m, _i, out: post.append(out.detach())) for a in acts]
    try:
        nn.functional.cross_entropy(model(x), y).backward()
    finally:
        for h in handles:
            h.remove()
    out = {"activation_std": [float(a.std()) for a in post],
           "backprop_std": [float(s.grad.std()) for s in pre],
           "weight_grad_std": [float(lin.weight.grad.std()) for lin in linears]}
    model.zero_grad(set_to_none=True)
    return out


def train(model: nn.Module, seed: int, steps: int, lr: float, batch: int, trace_every: int = 0):
    """SGD without momentum on digits (the paper: plain minibatch SGD, batch 10), under a Guard. With trace_every,
    records every hidden layer's mean output and the top layer's fractions near 0 on 512 training images."""
    xtr, ytr, xte, yte = digits(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    acts = [m for m in model if not isinstance(m, nn.Linear)]
    trace = []
    with gg.Guard(model, opt, console=False) as guard:
        for step in range(steps):
            if trace_every and step % trace_every == 0:
                trace.append({"step": step, **_probe(model, acts, xtr[:512])})
            idx = torch.randint(0, len(xtr), (batch,), generator=gen)
            loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            guard.observe_loss(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
        if trace_every:
            trace.append({"step": steps, **_probe(model, acts, xtr[:512])})
        first, diag = first_seen(guard), diagnoses(guard)
    with gg.inference(model):
        train_loss = nn.functional.cross_entropy(model(xtr), ytr).item()
        acc = (model(xte).argmax(1) == yte).float().mean().item()
    return {"train_loss": train_loss, "test_acc": acc, "first": first, "diagnoses": diag, "trace": trace}


def _probe(model: nn.Module, acts: list[nn.Module], x: torch.Tensor) -> dict:
    outs: list[torch.Tensor] = []
    handles = [a.register_forward_hook(lambda _m, _i, o: outs.append(o)) for a in acts]
    try:
        with gg.inference(model):  # inference: the probe must not be seen (or sampled) by the Guard as training
            model(x)
    finally:
        for h in handles:
            h.remove()
    top = outs[-1]
    return {"layer_means": [float(o.mean()) for o in outs], "top_near0": float((top < NEAR_ZERO).float().mean()),
            "top_flat": float((top < FLAT).float().mean())}


def part_tanh(args, checks: Checks) -> dict:
    xtr, ytr, _, _ = digits(0)
    stats: dict[str, list[dict]] = {name: [] for name in INITS}
    runs: dict[str, list[dict]] = {name: [] for name in INITS}
    for name, init in INITS.items():
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            stats[name].append(init_stats(build(nn.Tanh, 5, args.width, init), xtr[:512], ytr[:512]))
        for seed in range(args.train_seeds):
            torch.manual_seed(seed)
            runs[name].append(train(build(nn.Tanh, 5, args.width, init), seed, args.tanh_steps, args.tanh_lr, 10))
    rows = []
    summary = {}
    for name in INITS:
        s = stats[name]
        per_layer = {k: [mean_std([r[k][i] for r in s])[0] for i in range(5)] for k in s[0]}
        act_ratio = [r["activation_std"][-1] / r["activation_std"][0] for r in s]
        bp_ratio = [r["backprop_std"][0] / r["backprop_std"][-1] for r in s]
        wg_ratio = [r["weight_grad_std"][0] / r["weight_grad_std"][-1] for r in s]
        summary[name] = {"per_layer": per_layer, "activation_last_over_first": act_ratio,
                         "backprop_first_over_last": bp_ratio, "weight_grad_first_over_last": wg_ratio,
                         "train": runs[name]}
        for k, label in (("activation_std", "activation std"), ("backprop_std", "dCost/ds std"),
                         ("weight_grad_std", "dCost/dW std")):
            rows.append((f"{name}: {label}", *(f"{v:.3g}" for v in per_layer[k]),
                         fmt_ms({"activation_std": act_ratio, "backprop_std": bp_ratio,
                                 "weight_grad_std": wg_ratio}[k], ".3g")))
        rs = runs[name]
        rows.append((f"{name}: trained {args.tanh_steps} steps", "", "", "", "", "",
                     f"test acc {fmt_ms([100 * r['test_acc'] for r in rs], '.1f')}%; gradguard: "
                     + "; ".join(verdict_text(r["first"]) for r in rs)))
        for seed, r in enumerate(rs):
            bad = {k: v for k, v in r["first"].items() if k in ("vanishing", "nonfinite")}
            checks.verdict(f"tanh, {name} init, seed {seed}: trains, gradguard raises no vanishing/nonfinite",
                           not bad and r["test_acc"] >= 0.8,
                           f"test accuracy {100 * r['test_acc']:.1f}%, gradguard: {verdict_text(r['first'])}")
            # With the paper's batch of 10, single hard examples late in training give gradient-norm spikes of
            # 20-50x the running mean; they were reported as exploding until spikes were judged by their effect (F4).
            checks.verdict(f"tanh, {name} init, seed {seed}: gradguard raises no exploding on this healthy run",
                       "exploding" not in r["first"], f"gradguard: {verdict_text(r['first'])}")
    table(f"Glorot & Bengio 2010, Figs. 6-7 on digits: 5 tanh layers of {args.width}, at initialisation, "
          f"{args.seeds} seed(s) (layer 1 = nearest the input)",
          ("quantity", "layer 1", "layer 2", "layer 3", "layer 4", "layer 5", "ratio (act: 5/1, gradients: 1/5)"),
          rows)
    std, nrm = summary["standard"], summary["normalised"]
    bp_s, bp_n = mean_std(std["backprop_first_over_last"])[0], mean_std(nrm["backprop_first_over_last"])[0]
    ac_s, ac_n = mean_std(std["activation_last_over_first"])[0], mean_std(nrm["activation_last_over_first"])[0]
    checks.phenomenon("standard init: back-propagated gradients shrink toward the input",
                      bp_s < 0.3, f"dCost/ds std layer 1 / layer 5 = {bp_s:.3g} (paper's linear analysis: 1/9; "
                      "need < 0.3)")
    checks.phenomenon("normalised init: back-propagated gradients roughly constant",
                      0.5 < bp_n < 2.0, f"dCost/ds std layer 1 / layer 5 = {bp_n:.3g} (need within 0.5-2)")
    checks.phenomenon("standard init: activations shrink with depth", ac_s < 0.3,
                      f"activation std layer 5 / layer 1 = {ac_s:.3g} (need < 0.3)")
    checks.phenomenon("normalised init: activations roughly constant", 0.5 < ac_n < 2.0,
                      f"activation std layer 5 / layer 1 = {ac_n:.3g} (need within 0.5-2)")
    return summary


def part_sigmoid(args, checks: Checks) -> dict:
    every = max(1, args.steps // 50)
    half = args.steps // 2
    out = {}
    for lr in args.sigmoid_lrs:
        runs = []
        for seed in range(args.train_seeds):
            torch.manual_seed(seed)
            r = train(build(nn.Sigmoid, 4, args.width, standard), seed, args.steps, lr, 10, every)
            runs.append(r)
            tr = r["trace"]
            low = min(tr, key=lambda t: t["layer_means"][-1])
            r["top_mean_min"], r["top_mean_min_step"] = low["layer_means"][-1], low["step"]
            r["top_mean_end"] = tr[-1]["layer_means"][-1]
            r["saturation_flagged"] = any(d["kind"] == "saturation" for d in r["diagnoses"])
            r["max_top_flat_fraction"] = max(t["top_flat"] for t in tr)
            r["max_top_near0_fraction"] = max(t["top_near0"] for t in tr)
            print(f"sigmoid lr {lr} seed {seed}: top-layer mean {tr[0]['layer_means'][-1]:.3f} at init -> "
                  f"{low['layer_means'][-1]:.3f} (step {low['step']}) -> {tr[-1]['layer_means'][-1]:.3f} at the end; "
                  f"train loss {r['train_loss']:.3f}, test acc {100 * r['test_acc']:.1f}%; gradguard: "
                  f"{verdict_text(r['first'])}", flush=True)

            early = [t for t in tr if t["step"] <= half]
            top_min = min(t["layer_means"][-1] for t in early)
            lower_min = min(min(t["layer_means"][:-1]) for t in early)
            checks.phenomenon(f"sigmoid lr {lr} seed {seed}: the top hidden layer saturates toward 0 early, the lower "
                              "layers do not", top_min < TOP_LOW and lower_min > 0.3,
                              f"lowest top-layer mean in the first {half} steps {top_min:.3f} (need < {TOP_LOW}; "
                              f"0.5 at init); lowest lower-layer mean {lower_min:.3f} (need > 0.3)")
            # Judged by the time the top layer is saturated: the first traced step where all its outputs are below
            # NEAR_ZERO (slope < 19% of the peak), plus 3 activation samples and a window of steps for the evidence
            # to persist; at lr 0.5 that is step ~100, at lr 0.1 not before ~3000 (its slower descent).
            sat_steps = [t["step"] for t in tr if t["top_near0"] >= 0.99]
            sat_at = sat_steps[0] if sat_steps else None
            sat_flags = sorted(d["step"] for d in r["diagnoses"] if d["kind"] == "saturation")
            due = None if sat_at is None else sat_at + 3 * 25 + 100
            r["top_saturated_at"], r["saturation_steps"] = sat_at, sat_flags
            checks.verdict(f"sigmoid lr {lr} seed {seed}: gradguard diagnoses the saturated top layer as saturation "
                       "by the time it is saturated",
                       sat_at is not None and bool(sat_flags) and sat_flags[0] <= due,
                       f"all top-layer outputs < {NEAR_ZERO} from step {sat_at}; saturation diagnosed at "
                       f"{sat_flags[:3] or 'no step'} (due by {due}); at most {100 * r['max_top_flat_fraction']:.0f}% "
                       f"of the top layer's outputs were < {FLAT}")
            flags = {d["kind"] for d in r["diagnoses"] if d["step"] <= half}
            checks.verdict(f"sigmoid lr {lr} seed {seed}: gradguard flags the stalled network at all",
                       bool(flags & {"vanishing", "saturation"}),
                       f"train loss on its plateau; diagnoses in the first {half} steps: {sorted(flags) or 'none'}")
        out[str(lr)] = runs
        # The trajectory of seed 0, as in the paper's Fig. 2 (mean per layer over training).
        tr = runs[0]["trace"]
        picks = sorted({t["step"] for t in tr[:: max(1, len(tr) // 10)]} | {tr[-1]["step"]})
        rows = [(str(t["step"]), *(f"{m:.3f}" for m in t["layer_means"]), f"{100 * t['top_near0']:.0f}%",
                 f"{100 * t['top_flat']:.0f}%") for t in tr if t["step"] in picks]
        table(f"Glorot & Bengio 2010, Fig. 2 on digits: 4 sigmoid layers of {args.width}, standard init, SGD lr {lr} "
              "batch 10 (seed 0)", ("step", "mean layer 1", "mean layer 2", "mean layer 3", "mean layer 4 (top)",
                                    f"top outputs < {NEAR_ZERO}", f"top outputs < {FLAT} (gradguard's flat region)"),
              rows)
    return out


def main() -> int:
    p = parser(__doc__, seeds=5, steps=5000)
    p.add_argument("--width", type=int, default=256, help="hidden width (default 256; the paper: 1000)")
    p.add_argument("--train-seeds", type=int, default=2, help="training runs per configuration (default 2)")
    p.add_argument("--tanh-steps", type=int, default=1500, help="training steps of the tanh networks")
    p.add_argument("--tanh-lr", type=float, default=0.1, help="SGD learning rate of the tanh networks")
    p.add_argument("--sigmoid-lrs", default="0.5,0.1",
                   help="SGD learning rates of the sigmoid network (default 0.5,0.1)")
    args = p.parse_args()
    args.sigmoid_lrs = [float(v) for v in args.sigmoid_lrs.split(",")]
    if args.quick:
        args.seeds, args.steps, args.train_seeds, args.tanh_steps, args.sigmoid_lrs = 2, 800, 1, 400, [0.5]
    start = setup()
    checks = Checks()
    tanh = part_tanh(args, checks)
    sigmoid = part_sigmoid(args, checks)
    return finish("glorot2010_init", args, start, checks, {"width": args.width, "tanh": tanh, "sigmoid": sigmoid})


if __name__ == "__main__":
    sys.exit(main())

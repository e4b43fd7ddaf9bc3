"""Step-time cost of every gradguard feature, and of the tools people use for the same job, against plain training.

Two suites, each one process of interleaved rounds (``benchmarks.overhead.interleave``): every variant trains its
own deep copy of the same model with its own AdamW; each round times every variant for a few steps, in a rotating
order. Reported per variant: median time per step; the median over rounds of its time divided by the plain step's
time *in the same round* (paired, so drift between rounds cancels) with the interquartile range; and the same
paired ratio against the variant it is best judged against (its reference), e.g. ``clip_grad_norm_`` for
``Guard(clip=1.0)``.

- ``features``: the Guard with its defaults and with each option: every clip method, ``repair="auto"`` on a
  healthy run (nothing fires; checked and printed), sampling every step vs never, logging to JSONL, and the mode
  checks with a validation forward in the loop (``model.eval()`` + ``no_grad`` vs ``gradguard.inference``).
- ``peers``: ``torch.nn.utils.clip_grad_norm_``, Lightning's ``grad_norm(model, 2)`` (what Lightning users call in
  ``on_before_optimizer_step``), the ``zclip`` package, ``wandb.watch(log="gradients", log_freq=1)`` offline, and
  Cockpit (when importable: it is not in the ``bench`` extra, see BENCHMARKS.md), beside the Guard.

Run from the repository root: ``python -m benchmarks.peers [--suite features|peers|all] [--only mlp|gpt2]
[--rounds N] [--steps K] [--quick] [--json FILE]``. ``--rounds``/``--steps`` default per model (see ``DEFAULTS``).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import gradguard as gg
from benchmarks.overhead import LossOf, gpt2, interleave, mlp48, paired

# (rounds, steps per round) per model: the MLP step is ~25 ms, the GPT-2 step ~600 ms on the 2-core VM, so GPT-2
# gets fewer, shorter rounds to keep both suites under ~15 minutes.
DEFAULTS = {"mlp": (41, 6), "gpt2": (16, 2)}
QUICK = {"mlp": (3, 2), "gpt2": (2, 1)}
PLAIN = "plain"


@dataclass
class Variant:
    """One way to train: its step function, the variant its second ratio is taken against, and what to inspect
    afterwards."""

    name: str
    ref: str
    step: Callable[[], None]
    guard: gg.Guard | None = None
    steps: int | None = None  # steps per round when fewer than the others (a peer ten times slower)
    close: Callable[[], None] | None = None
    model: nn.Module | None = None  # checked after the run: its weights must have moved (the step really trained)


def evaluator(model: nn.Module, forward: Callable[[nn.Module], Any], how: str | None,
              every: int) -> Callable[[], None]:
    """A validation forward on the training batch's shape every ``every`` steps, the way a user writes it: ``how``
    is "no_grad" (``model.eval()``, ``torch.no_grad()``, ``model.train()``) or "inference" (``gg.inference``)."""
    if how is None:
        return lambda: None
    counter = itertools.count()

    def run() -> None:
        # every-th call: with every = steps per round, each timed block holds exactly one validation forward
        if next(counter) % every != every - 1:
            return
        if how == "no_grad":
            model.eval()
            with torch.no_grad():
                forward(model)
            model.train()
        else:
            with gg.inference(model):
                forward(model)
    return run


def training_step(model: nn.Module, opt: torch.optim.Optimizer, loss_of: LossOf, guard: gg.Guard | None = None,
                  after_backward: Callable[[], None] | None = None,
                  after_step: Callable[[torch.Tensor], None] | None = None) -> Callable[[], None]:
    """The plain loop (forward, zero_grad, backward, step) with the variant's additions at their usual places."""
    loss_fn = loss_of(model)

    def step() -> None:
        loss = loss_fn()
        if guard is not None:
            guard.observe_loss(loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if after_backward is not None:
            after_backward()
        opt.step()
        if after_step is not None:
            after_step(loss)
    return step


def feature_variants(base: nn.Module, loss_of: LossOf, every: int, tmp: str) -> list[Variant]:
    """The Guard's options, each against plain training and against its natural reference."""
    out: list[Variant] = []

    def add(name: str, ref: str, guard_kw: dict[str, Any] | None = None, clip: str | None = None,
            evaluate: str | None = None) -> None:
        model = copy.deepcopy(base)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        guard = gg.Guard(model, opt, console=False, **guard_kw) if guard_kw is not None else None
        after_backward = None
        if clip == "norm":
            def after_backward() -> None:
                nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        elif clip == "value":
            def after_backward() -> None:
                nn.utils.clip_grad_value_(model.parameters(), 0.1)
        validate = evaluator(model, loss_of.forward, evaluate, every)  # type: ignore[attr-defined]
        step = training_step(model, opt, loss_of, guard, after_backward, lambda loss: validate())
        out.append(Variant(name, ref, step, guard, close=guard.close if guard is not None else None, model=model))

    defaults = "Guard (defaults)"
    add(PLAIN, PLAIN)
    add("plain + clip_grad_norm_(1.0)", PLAIN, clip="norm")
    add("plain + clip_grad_value_(0.1)", PLAIN, clip="value")
    add(defaults, PLAIN, {})
    add("Guard(clip=1.0)", "plain + clip_grad_norm_(1.0)", {"clip": 1.0})
    add("Guard(clip='zclip')", defaults, {"clip": "zclip"})
    add("Guard(clip='autoclip')", defaults, {"clip": "autoclip"})
    add("Guard(clip='agc')", defaults, {"clip": "agc"})
    add("Guard(clip=gg.LayerNorm(1.0))", defaults, {"clip": gg.LayerNorm(1.0)})
    add("Guard(clip=gg.ValueClip(0.1))", "plain + clip_grad_value_(0.1)", {"clip": gg.ValueClip(0.1)})
    add("Guard(repair='auto'), healthy run", defaults, {"repair": "auto"})
    add("Guard(sample_every=10**9)", PLAIN, {"sample_every": 10**9})
    add("Guard(sample_every=1)", "Guard(sample_every=10**9)", {"sample_every": 1})
    add("Guard(log_dir=tmp)", defaults, {"log_dir": tmp})
    eval_ng, eval_inf = f"plain + eval every {every} (eval+no_grad)", f"plain + eval every {every} (gg.inference)"
    add(eval_ng, PLAIN, evaluate="no_grad")
    add(eval_inf, eval_ng, evaluate="inference")
    add(f"Guard + eval every {every} (eval+no_grad)", eval_ng, {}, evaluate="no_grad")
    add(f"Guard + eval every {every} (gg.inference)", eval_inf, {}, evaluate="inference")
    return out


def descendants_cpu_seconds() -> float:
    """CPU time of this process's child processes (wandb's service does its logging work there)."""
    try:
        import psutil
    except ImportError:
        return float("nan")
    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            t = child.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def cockpit_missing() -> str | None:
    """Why Cockpit cannot be used here, or None when it imports."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its __init__ imports the deprecated pkg_resources
            import cockpit  # noqa: F401
        return None
    except Exception as e:  # ImportError, or a broken dependency underneath it
        return f"{type(e).__name__}: {e}"


def peer_variants(model_name: str, base: nn.Module, loss_of: LossOf, tmp: str) -> list[Variant]:
    """The tools people use for per-layer gradient monitoring and clipping, beside the Guard."""
    out: list[Variant] = []

    def fresh() -> tuple[nn.Module, torch.optim.Optimizer]:
        model = copy.deepcopy(base)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-4)

    def simple(name: str, ref: str, after_backward_of: Callable[[nn.Module], Callable[[], None]] | None = None,
               guard_kw: dict[str, Any] | None = None) -> None:
        model, opt = fresh()
        guard = gg.Guard(model, opt, console=False, **guard_kw) if guard_kw is not None else None
        ab = after_backward_of(model) if after_backward_of is not None else None
        out.append(Variant(name, ref, training_step(model, opt, loss_of, guard, ab), guard,
                           close=guard.close if guard is not None else None, model=model))

    simple(PLAIN, PLAIN)
    simple("plain + clip_grad_norm_(1.0)", PLAIN, lambda m: lambda: nn.utils.clip_grad_norm_(m.parameters(), 1.0))

    from lightning.pytorch.utilities import grad_norm

    def lightning_norms(m: nn.Module) -> Callable[[], None]:
        def after_backward() -> None:
            grad_norm(m, norm_type=2)  # a dict of per-parameter norms plus the total, as a LightningModule logs
        return after_backward
    simple("plain + Lightning grad_norm(model, 2)", PLAIN, lightning_norms)

    from zclip import ZClip

    def zclip_pkg(m: nn.Module) -> Callable[[], None]:
        zc = ZClip(max_grad_norm=None)  # the authors' package, its defaults (as in overhead.py --suite clip)
        return lambda: zc.step(m)
    simple("plain + zclip package", PLAIN, zclip_pkg)

    # wandb offline: the environment is set before the import so the service starts offline and quiet.
    os.environ.update(WANDB_MODE="offline", WANDB_DIR=tmp, WANDB_SILENT="true", WANDB_CONSOLE="off")
    import wandb

    run = wandb.init(project="gradguard-bench", dir=tmp, mode="offline", settings=wandb.Settings(silent=True))
    log_only, watched = "plain + wandb run.log(loss)", "plain + wandb.watch(log='gradients', log_freq=1)"
    for name in (log_only, watched):
        model, opt = fresh()
        if name == watched:
            # Histograms are computed in gradient hooks during backward and staged in the run's current row; the
            # run.log below commits that row every step, so every step's histograms are really produced.
            run.watch(model, log="gradients", log_freq=1)

        def log(loss: torch.Tensor, key: str = name) -> None:
            run.log({key: loss.item()})
        out.append(Variant(name, PLAIN if name == log_only else log_only,
                           training_step(model, opt, loss_of, after_step=log), model=model))
    out[-1].close = run.finish

    why = cockpit_missing()
    if why is not None:
        print(f"[peers] Cockpit skipped: {why}", file=sys.stderr)
    else:
        out += cockpit_variants(model_name, fresh, loss_of)

    simple("Guard (defaults)", PLAIN, guard_kw={})
    simple("Guard(clip=1.0)", "plain + clip_grad_norm_(1.0)", guard_kw={"clip": 1.0})
    simple("Guard(clip='zclip')", "plain + zclip package", guard_kw={"clip": "zclip"})
    return out


def cockpit_variants(model_name: str, fresh: Callable[[], tuple[nn.Module, torch.optim.Optimizer]],
                     loss_of: LossOf) -> list[Variant]:
    """Cockpit with only its GradNorm quantity (per-parameter gradient norms, what gradguard records per layer),
    and on the MLP its cheapest predefined configuration, "economy" (needs BackPACK's per-sample gradients, which
    BackPACK cannot compute for transformers' GPT-2 modules)."""
    out = [cockpit_gradnorm(*fresh(), loss_of)]
    if model_name == "mlp":
        # about 100x a plain step: one step per round keeps the suite short; the ratio is per step all the same
        out.append(cockpit_economy(*fresh(), loss_of))
    return out


def cockpit_gradnorm(model: nn.Module, opt: torch.optim.Optimizer, loss_of: LossOf) -> Variant:
    """Cockpit tracking GradNorm every step (no BackPACK extension needed: the model is not extended)."""
    from cockpit import Cockpit, quantities
    from cockpit.utils.schedules import linear

    ck = Cockpit(list(model.parameters()), quantities=[quantities.GradNorm(track_schedule=linear(interval=1))])
    loss_fn, counter, batch = loss_of(model), itertools.count(), loss_of.batch[0].shape[0]  # type: ignore

    def step() -> None:
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        with ck(next(counter), info={"batch_size": batch, "loss": loss, "optimizer": opt}):
            loss.backward()
        opt.step()
    return Variant("plain + Cockpit([GradNorm])", PLAIN, step, model=model)


def cockpit_economy(model: nn.Module, opt: torch.optim.Optimizer, loss_of: LossOf) -> Variant:
    """Cockpit's "economy" configuration every step, on a BackPACK-extended model, as its documentation sets up."""
    from backpack import extend
    from cockpit import Cockpit
    from cockpit.utils.configuration import configuration

    model = extend(model)
    x, y = loss_of.batch  # type: ignore[attr-defined]
    mean_loss, each_loss = extend(nn.CrossEntropyLoss()), nn.CrossEntropyLoss(reduction="none")
    ck = Cockpit(list(model.parameters()), quantities=configuration("economy"))
    counter = itertools.count()
    # BackPACK's module hooks warn on every step that no input requires gradients (the data do not).
    warnings.filterwarnings("ignore", message="Full backward hook is firing")

    def step() -> None:
        out = model(x)
        loss, losses = mean_loss(out, y), each_loss(out, y)
        opt.zero_grad(set_to_none=True)
        i = next(counter)
        with ck(i, info={"batch_size": x.shape[0], "individual_losses": losses, "loss": loss, "optimizer": opt}):
            loss.backward(create_graph=ck.create_graph(i))
        opt.step()
    return Variant("plain + Cockpit('economy')", PLAIN, step, steps=1, model=model)


def report(model_name: str, suite: str, variants: list[Variant], times: dict[str, list[float]], rounds: int,
           steps: int, n_params: int) -> dict[str, Any]:
    """Print the markdown table and what each Guard did during the run; return the numbers for --json."""
    print(f"\n{model_name} / {suite}: {n_params / 1e6:.2f}M parameters, {rounds} rounds x {steps} steps "
          "(fewer where marked); median ms per step; paired ratios: median over rounds (IQR)")
    print("| variant | ms/step | ratio to plain (IQR) | reference | ratio to reference (IQR) |\n|---|---|---|---|---|")
    rows = []
    for v in variants:
        med, q1, q3 = paired(times, v.name, PLAIN)
        rmed, r1, r3 = paired(times, v.name, v.ref)
        ms = 1000 * statistics.median(times[v.name])
        mark = f" ({v.steps} step/round)" if v.steps else ""
        ref_cell = f"{rmed:.3f}x ({r1:.3f}-{r3:.3f})" if v.ref != PLAIN else "-"
        print(f"| {v.name}{mark} | {ms:.2f} | {med:.3f}x ({q1:.3f}-{q3:.3f}) | "
              f"{v.ref if v.ref != PLAIN else '-'} | {ref_cell} |")
        rows.append({"variant": v.name, "ms": ms, "ratio": med, "iqr": [q1, q3], "ref": v.ref,
                     "ratio_ref": rmed, "iqr_ref": [r1, r3], "steps_per_round": v.steps or steps})
    for v in variants:
        if v.guard is not None:
            # Reading these drains pending rows (a host read, outside the timed blocks).
            acts = Counter(a.kind for a in v.guard.actions)
            diags = Counter(d.kind for d in v.guard.diagnoses)
            print(f"  {v.name}: {v.guard.step} steps; actions {dict(acts) or 'none'}; "
                  f"diagnoses {dict(diags) or 'none'}")
    return {"model": model_name, "suite": suite, "rounds": rounds, "steps": steps, "rows": rows}


def bench(model_name: str, suite: str, rounds: int, steps: int) -> dict[str, Any]:
    torch.manual_seed(0)
    base, loss_of = {"mlp": mlp48, "gpt2": gpt2}[model_name]()
    with tempfile.TemporaryDirectory(prefix="gradguard-bench-") as tmp:
        variants = (feature_variants(base, loss_of, steps, tmp) if suite == "features"
                    else peer_variants(model_name, base, loss_of, tmp))
        steps_of = {v.name: v.step for v in variants}
        steps_for = {v.name: v.steps for v in variants if v.steps}
        cpu0 = descendants_cpu_seconds()
        times = interleave(steps_of, rounds, steps, steps_for, progress=True)
        cpu = descendants_cpu_seconds() - cpu0
        out = report(model_name, suite, variants, times, rounds, steps, sum(p.numel() for p in base.parameters()))
        for v in variants:
            # A step that never reached its own optimizer would time a different (cheaper) loop.
            if v.model is not None and all(torch.equal(a, b) for a, b in zip(v.model.parameters(), base.parameters())):
                print(f"  WARNING: {v.name}: the weights never changed; this variant did not train", file=sys.stderr)
        wandb_steps = sum(len(times[v.name]) * (v.steps or steps) for v in variants if "wandb" in v.name)
        if wandb_steps:
            # The wandb service works in its own process, beside the timed loop: CPU time the step times above do
            # not show, and on 2 cores it competes with whatever trains next (warm-up steps are not counted).
            print(f"  wandb service processes: {cpu:.1f} s CPU over the timed rounds, "
                  f"{1000 * cpu / wandb_steps:.1f} ms per wandb step (both wandb variants)")
            out["wandb_service_ms_per_step"] = 1000 * cpu / wandb_steps
        out["times"] = times  # per round, for other statistics later
        for v in variants:
            if v.close is not None:
                try:
                    v.close()
                except Exception as e:  # a peer failing to shut down must not lose the numbers above
                    print(f"  closing {v.name} failed: {type(e).__name__}: {e}", file=sys.stderr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", choices=["features", "peers", "all"], default="all")
    ap.add_argument("--only", choices=["mlp", "gpt2"])
    ap.add_argument("--rounds", type=int, help="rounds (default per model: mlp 41, gpt2 16)")
    ap.add_argument("--steps", type=int, help="steps per variant per round (default per model: mlp 6, gpt2 2)")
    ap.add_argument("--quick", action="store_true", help="a few rounds: checks that everything runs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="also write the numbers to this file")
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[attr-defined] - tables survive a crash at exit
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*loss_type=None.*")
    print(f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs, threads {args.threads}, "
          f"gradguard {gg.__version__}")
    results = []
    for model_name in ("mlp", "gpt2"):
        if args.only not in (None, model_name):
            continue
        rounds, steps = (QUICK if args.quick else DEFAULTS)[model_name]
        rounds, steps = args.rounds or rounds, args.steps or steps
        for suite in ("features", "peers"):
            if args.suite in ("all", suite):
                results.append(bench(model_name, suite, rounds, steps))
                if args.json:  # after each suite: a later failure keeps what was measured
                    with open(args.json, "w") as f:
                        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

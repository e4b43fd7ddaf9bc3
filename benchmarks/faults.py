"""Fault injection at scale: the figures for BENCHMARKS.md (faults injected, recovered, bad inputs tried, handled
cleanly, data lost after SIGKILL).

Run: ``OMP_NUM_THREADS=1 python benchmarks/faults.py`` (about 6 minutes on one core; ``--quick`` for a smoke run
of a few seconds, ``--seed N`` for another draw). It prints markdown tables, then every case that was not handled,
grouped. The faults, models and oracles are those of ``tests/faults/faultkit.py`` (the test suite runs a seeded
sample of the same sweep): NaN/Inf written into the loss, a gradient, an input or a weight at random steps on every
torch.optim optimizer of this build, in the loop shapes of the tests; the oracles are copies the loop takes itself
(weights and optimizer state before each faulty step, compared bitwise; every state a rollback may land on), never
gradguard's own account.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "faults"))

import faultkit as fk  # noqa: E402 - found through the path just added

import gradguard as gg  # noqa: E402


@dataclass
class Tally:
    """Counts for one row of a table, and the cases that failed an oracle (for the list after the tables)."""

    tried: int = 0
    ok: int = 0
    extra: Counter[str] = field(default_factory=Counter)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (group, one example)

    def add(self, ok: bool, why: str = "", group: str = "") -> None:
        self.tried += 1
        self.ok += int(ok)
        if not ok:
            self.failures.append((group or why[:90], why))


def _reason(out: fk.Outcome, f: fk.Fault) -> str:
    """Why a fault was not recovered, in a few words (the group of the list after the tables)."""
    if out.error is not None:
        return f"the loop raised {out.error.split(':')[0]}"
    if out.warnings:
        return f"warned: {out.warnings[0][:60]}"
    if f in out.applied:
        return "a faulty step reached the weights or the optimizer state"
    if out.bad_rollbacks:
        return "a rollback did not land bitwise on the state of its to_step"
    if out.moved_while_corrupt:
        return "a step with non-finite gradients was applied while a weight was corrupted"
    if f.kind == "weight" and not out.rollbacks:
        return "a corrupted weight was never rolled back (non-finite to the end)"
    return "non-finite weights at the end"


def _fault_rows(out: fk.Outcome, reference: fk.Outcome | None) -> Iterable[tuple[fk.Fault, bool, bool, str, str]]:
    """Per fault of a run: (fault, recovered, would have corrupted without gradguard, example, group)."""
    corrupted = reference is not None and not reference.finite_end
    for f in out.faults:
        if f.kind == "weight":
            ok = out.recovered_weights and not out.moved_while_corrupt and not out.bad_rollbacks and out.error is None
        else:
            ok = f not in out.applied and not out.bad_rollbacks and out.error is None
        ok = ok and out.finite_end and not out.warnings
        yield f, ok, corrupted, "" if ok else f"{f}: {out.why()[:300]}", "" if ok else _reason(out, f)


def _label(f: fk.Fault) -> str:
    if f.kind != "weight":
        return f.kind
    return "weight (NaN)" if f.value != f.value else "weight (Inf)"


def optimizer_sweep(rng: random.Random, reps: int, weight_reps: int, by_kind: dict[str, Tally],
                    by_family: dict[str, Tally], corrupted: Counter[str]) -> None:
    """Every optimizer case x kind: ``reps`` runs of two faults (loss, grad, input), ``weight_reps`` of one weight
    fault (NaN or +-Inf at a random element)."""
    for case in fk.OPTIMIZERS:
        if fk.unsupported(case):
            continue
        for kind in fk.KINDS:
            for _ in range(weight_reps if kind == "weight" else reps):
                seed = rng.randrange(2**31)
                model = fk.make_model(0)
                if kind == "weight":
                    faults = fk.plan(rng, "weight", model, steps=16, n=1)
                    steps = 30
                else:
                    faults = fk.plan(rng, kind, model, steps=20, n=2, first=rng.random() < 0.3)
                    steps = 20
                out = fk.run(case, faults, steps=steps, seed=seed)
                ref = fk.run(case, faults, guard=None, steps=steps, seed=seed)
                for f, ok, bad, why, group in _fault_rows(out, ref):
                    by_kind[_label(f)].add(ok, f"{case.label} {why}", group)
                    by_family[case.family + (" (fused)" if case.kwargs.get("fused") else "")].add(ok, why, group)
                    corrupted[_label(f)] += int(bad)


def _two(model: torch.nn.Module) -> list[torch.optim.Optimizer]:
    body = [p for n, p in model.named_parameters() if not n.startswith("5.")]
    return [torch.optim.SGD(body, lr=0.05, momentum=0.9),
            torch.optim.Adam(model[5].parameters(), lr=0.01, fused=True)]


def _sparse(model: torch.nn.Module) -> list[torch.optim.Optimizer]:
    return [torch.optim.SparseAdam(list(model.emb.parameters()), lr=0.01),
            torch.optim.Adam(model.head.parameters(), lr=0.01)]


def _grow(step: int, model: torch.nn.Module, opts: list[torch.optim.Optimizer]) -> None:
    if step == 8:
        for p in model[0].parameters():
            p.requires_grad_(True)
        opts[0].add_param_group({"params": list(model[0].parameters())})


def _frozen_first(case: fk.OptCase) -> Callable[[torch.nn.Module], list[torch.optim.Optimizer]]:
    def build(model: torch.nn.Module) -> list[torch.optim.Optimizer]:
        for p in model[0].parameters():
            p.requires_grad_(False)
        return [case.build([p for p in model.parameters() if p.requires_grad])]
    return build


def loop_sweep(rng: random.Random, reps: int, shapes: dict[str, Tally]) -> None:
    """Gradient accumulation, two optimizers, add_param_group after attach, LBFGS, SparseAdam."""
    cases = {c.label: c for c in fk.OPTIMIZERS}
    picks = ["SGD-momentum", "Adam-fused", "RMSprop-foreach", "Adagrad-fused", "AdamW", "Rprop-foreach"]
    for _ in range(reps):
        for kind in fk.KINDS:
            seed = rng.randrange(2**31)
            model = fk.make_model(0)
            weight = kind == "weight"
            steps = 28 if weight else 16
            faults = (fk.plan(rng, "weight", model, steps=14, n=1, values=[fk.NAN]) if weight
                      else fk.plan(rng, kind, model, steps=16, n=2, accum=3))
            label = rng.choice(picks)
            out = fk.run(cases[label], faults, steps=steps, accum=3, seed=seed)
            for _f, ok, _, why, group in _fault_rows(out, None):
                shapes["gradient accumulation (3 micro-batches)"].add(ok, f"{label} {why}", group)
            faults = (fk.plan(rng, "weight", model, steps=14, n=1, values=[fk.NAN]) if weight
                      else fk.plan(rng, kind, model, steps=16, n=2))
            out = fk.run(_two, faults, steps=steps, seed=seed)
            ok_consistent = True
            for rb in out.rollbacks:  # both optimizers' state must come from the step the weights came from
                t, now = rb["detail"]["to_step"], rb["step"] + 1
                if fk.same_params(out.weights[now][:4], out.weights[t][:4]) and not fk.same_state(
                        out.states[now][0], out.states[t][0]):
                    ok_consistent = False
            for _f, ok, _, why, group in _fault_rows(out, None):
                shapes["two optimizers, one Guard each"].add(
                    ok and ok_consistent, why or out.why()[:300],
                    group or "a rollback rewound the other optimizer's weights but not its state")
            label = rng.choice(picks[:4])
            faults = [fk.Fault(f.step + 8, f.kind, f.value, f.micro, f.at) for f in (
                fk.plan(rng, "weight", model, steps=14, n=1, values=[fk.NAN]) if weight
                else fk.plan(rng, kind, model, steps=14, n=2))]
            out = fk.run(_frozen_first(cases[label]), faults, steps=steps + 8, on_step=_grow, seed=seed)
            for _f, ok, _, why, group in _fault_rows(out, None):
                shapes["add_param_group after attach"].add(ok, f"{label} {why}", group)
            f = fk.plan(rng, kind, model, steps=10, n=1, values=[fk.NAN] if weight else fk.VALUES)[0]
            fault = fk.Fault(f.step, kind, f.value, rng.randrange(3) if not weight else 0, f.at)
            out = fk.run_lbfgs([fault], steps=14, seed=seed)
            for _f, ok, _, why, group in _fault_rows(out, None):
                shapes["LBFGS with a closure"].add(ok, why, f"{kind}: {group}")
            if kind != "input":  # the embedding reads indices: a NaN input feature is rounded away
                emb = fk.make_embed_net(0)
                faults = (fk.plan(rng, "weight", emb, steps=14, n=1, values=[fk.NAN]) if weight
                          else fk.plan(rng, kind, emb, steps=16, n=2))
                if weight:  # in the dense head: a NaN in an embedding row no batch reads is invisible to the loss
                    faults = [fk.Fault(faults[0].step, "weight", fk.NAN, 0, (1, rng.randrange(24)))]
                out = fk.run(_sparse, faults, steps=steps, model_fn=fk.make_embed_net, seed=seed)
                for _f, ok, _, why, group in _fault_rows(out, None):
                    shapes["SparseAdam (sparse embedding) + Adam"].add(ok, why, group)


def _input_group(r: fk.BadInput) -> str:
    """``Guard(frozen=...): AttributeError``, ``load_state_dict: clip.mean: accepted, then ...``: the option or key
    and what happened, without the value."""
    where = r.what.split("=")[0] + "=...)"
    if r.what.startswith("load_state_dict"):
        where = r.what.split(" = ")[0]
    what = r.detail.split(":")[0] if not r.detail.startswith("accepted") else r.detail.split(":")[0][:70]
    return f"{where}: {what}"


def bad_input_sweep(rng: random.Random, states: int, dirs: int, dirs_plotted: int, tmp: Path,
                    rows: dict[str, Tally]) -> None:
    """Options, losses, saved states, garbled run directories."""
    values: list[Any] = [*fk.ODD_INPUTS, 0.5, 5, "auto", "zclip", "deferred", (), "step"]
    row = f"Guard options ({len(fk.OPTION_DOMAINS)} options x {len(values)} values)"
    for name in fk.OPTION_DOMAINS:
        for value in values:
            r = fk.try_option(name, value, tmp)
            rows[row].add(r.clean, f"{r.what}: {r.detail[:200]}", _input_group(r))
    for value in fk.BAD_LOSSES:
        r = fk.try_loss(value)
        rows["observe_loss with a non-scalar / non-real value"].add(r.clean, f"{r.what}: {r.detail[:200]}",
                                                                     _input_group(r))
    state = fk.trained_state()
    paths = fk.state_paths(state)
    garbage: list[Any] = [KeyError, None, "x", -1, 10**20, fk.NAN, -1e308, [1, 2], {}, True, 2.5]
    for _ in range(states):
        r = fk.try_state(state, rng.choice(paths), rng.choice(garbage))
        rows["load_state_dict with one field deleted or replaced"].add(r.clean, f"{r.what}: {r.detail[:200]}",
                                                                       _input_group(r))
    base = tmp / "base"
    fk.run(fk.OPTIMIZERS[0], [fk.Fault(5, "loss", fk.NAN), fk.Fault(15, "weight", fk.NAN, 0, (2, 3))], steps=60,
           guard_kw={"log_dir": base, "log_every": 5})
    for i in range(dirs):
        d = tmp / f"garbled{i}"
        shutil.copytree(base, d)
        done = fk.garble(d, rng)
        plots = i < dirs_plotted
        answer = fk.report(d, tmp / "r.html", plots=plots)
        why = answer.clean(str(d))
        row = "garbled run directory, report with plots" if plots else "garbled run directory, report (no plots)"
        rows[row].add(why is None, f"{done}: {why}", (why or "")[:60])
        rows[row].extra["refused (exit 2)" if answer.code == 2 else "rendered (exit 0)"] += int(why is None)
        shutil.rmtree(d)


def kill_sweep(rng: random.Random, kills: int, resumes: int, tmp: Path) -> Tally:
    """SIGKILL mid-run ``kills`` times (``resumes`` of them followed by a second run into the same directory,
    killed too), then ``gradguard report`` in a fresh process on each directory."""
    script = tmp / "child.py"
    script.write_text(fk.CHILD)
    t = Tally()
    for i in range(kills):
        d = tmp / f"killed{i}"
        nan_steps = sorted(rng.sample(range(2, 80), 4))
        k = fk.kill_mid_run(d, script, after=rng.randrange(5, 80), delay=rng.uniform(0, 0.03), nan_steps=nan_steps)
        problems = [] if k.returncode == -9 else [f"exit {k.returncode}"]
        if i < resumes:  # resumed into the same folder, then killed again
            k2 = fk.kill_mid_run(d, script, after=rng.randrange(5, 40), delay=rng.uniform(0, 0.03),
                                 nan_steps=nan_steps)
            k.lost, k.cut, k.lines = k2.lost, k2.cut, k2.lines  # the files hold both sessions now
            k.missing_steps += k2.missing_steps
            k.missing_skips += k2.missing_skips
        t.extra["lines written"] += k.lines
        t.extra["lines unreadable"] += k.lost
        t.extra["last line cut"] += k.cut
        t.extra["finished steps without their line"] += len(k.missing_steps)
        t.extra["finished NaN steps without their skip"] += len(k.missing_skips)
        problems += [f"{k}"] if k.lost or k.missing_steps or k.missing_skips else []
        proc = subprocess.run([sys.executable, "-m", "gradguard", "report", str(d), "-o", str(tmp / "k.html")],
                              capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        if proc.returncode != 0 or "Traceback" in proc.stderr or any(
                not ln.startswith("gradguard report: note: ") for ln in proc.stderr.splitlines()):
            problems.append(f"report exit {proc.returncode}: {proc.stderr.strip()[:300]}")
        t.extra["report exit 0"] += int(proc.returncode == 0)
        t.add(not problems, "; ".join(problems))
    return t


def _table(title: str, head: list[str], rows: list[list[Any]]) -> str:
    out = [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: a few cases of each kind")
    parser.add_argument("--seed", type=int, default=13)
    args = parser.parse_args()
    torch.set_num_threads(1)
    q = args.quick
    rng = random.Random(args.seed)
    start = time.perf_counter()
    by_kind: dict[str, Tally] = defaultdict(Tally)
    by_family: dict[str, Tally] = defaultdict(Tally)
    shapes: dict[str, Tally] = defaultdict(Tally)
    bad: dict[str, Tally] = defaultdict(Tally)
    corrupted: Counter[str] = Counter()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        optimizer_sweep(rng, reps=1 if q else 3, weight_reps=1 if q else 4, by_kind=by_kind, by_family=by_family,
                        corrupted=corrupted)
        loop_sweep(rng, reps=1 if q else 4, shapes=shapes)
        bad_input_sweep(rng, states=10 if q else 200, dirs=8 if q else 240, dirs_plotted=2 if q else 40, tmp=tmp,
                        rows=bad)
        killed = kill_sweep(rng, kills=1 if q else 20, resumes=0 if q else 6, tmp=tmp)
    wall = time.perf_counter() - start

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "src"], cwd=ROOT, capture_output=True, text=True)
    print(f"`OMP_NUM_THREADS=1 python benchmarks/faults.py{' --quick' if q else ''} --seed {args.seed}`: gradguard "
          f"{gg.__version__} at {commit.stdout.strip()}{' (src modified)' if dirty.stdout.strip() else ''}, torch "
          f"{torch.__version__}, Python {platform.python_version()}, {platform.machine()}, one thread; "
          f"{wall:.0f} s wall clock.\n")
    faults = sum(t.tried for t in by_kind.values()) + sum(t.tried for t in shapes.values())
    recovered = sum(t.ok for t in by_kind.values()) + sum(t.ok for t in shapes.values())
    tried = sum(t.tried for t in bad.values())
    clean = sum(t.ok for t in bad.values())
    print(_table("Summary", ["faults injected", "recovered", "bad inputs tried", "handled cleanly",
                             "SIGKILLs", "lines written before the kill", "lines unreadable (data lost)"],
                 [[faults, recovered, tried, clean, killed.tried, killed.extra["lines written"],
                   killed.extra["lines unreadable"]]]))
    print()
    print(_table("NaN/Inf faults by kind, every optimizer (recovered: a faulty step never applied, bitwise; a "
                 "corrupted weight rolled back to finite weights, bitwise onto the state of its to_step)",
                 ["fault", "injected", "recovered", "not recovered",
                  "of which the run ends non-finite without gradguard"],
                 [[k, t.tried, t.ok, t.tried - t.ok, corrupted[k]] for k, t in sorted(by_kind.items())]))
    print()
    print(_table("By optimizer family (for-loop, foreach and fused variants together; fused also on its own)",
                 ["optimizer", "faults", "recovered"], [[k, t.tried, t.ok] for k, t in sorted(by_family.items())]))
    print()
    print(_table("Loop shapes (loss, gradient, input and weight faults)", ["loop", "faults", "recovered"],
                 [[k, t.tried, t.ok] for k, t in shapes.items()]))
    print()
    print(_table("Bad input (handled cleanly: a clear ValueError/TypeError naming the option or key and nothing "
                 "changed, or accepted and the Guard still works; a report that renders or refuses in one line "
                 "naming the file, never a traceback)", ["input", "tried", "handled cleanly", "not"],
                 [[k, t.tried, t.ok, t.tried - t.ok] for k, t in bad.items()]))
    print()
    print(_table("SIGKILL mid-run (log_every=1, repair='auto', NaN steps; some resumed into the same directory "
                 "and killed again), then `gradguard report` in a fresh process",
                 ["kills", *killed.extra.keys()], [[killed.tried, *killed.extra.values()]]))
    print()
    print("Not recovered / not handled (grouped, one example each):\n")
    for title, table in (("faults", {**by_kind, **shapes}), ("bad input", bad), ("kills", {"kill": killed})):
        for name, t in table.items():
            groups = Counter(g for g, _ in t.failures)
            example = {g: why for g, why in reversed(t.failures)}
            for group, n in groups.most_common():
                print(f"- {title} / {name}: {n}x {group}\n  e.g. {example[group][:300]}")


if __name__ == "__main__":
    main()

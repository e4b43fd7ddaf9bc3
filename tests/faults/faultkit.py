"""Fault injection for gradguard: seeded NaN/Inf faults in a small training loop, and oracles that never ask
gradguard what happened.

The oracles are copies taken by the loop itself: the weights and the optimizer state before each faulty step
(compared bitwise after it), the weights and state after every step (a rollback must land bitwise on one of them,
the one its ``to_step`` names), and the same run without a Guard. Shared by ``tests/faults`` and
``benchmarks/faults.py`` (the larger sweep).
"""

from __future__ import annotations

import json
import math
import random
import warnings
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import gradguard as gg

NAN, INF = float("nan"), float("inf")
VALUES = (NAN, INF, -INF)
KINDS = ("loss", "grad", "input", "weight")  # where the fault is written
IN, OUT = 6, 3


def seed_of(*parts: object) -> int:
    """A stable seed from a case's name (``hash`` of a str changes between processes)."""
    return zlib.crc32("/".join(map(str, parts)).encode())


def make_model(seed: int) -> nn.Sequential:
    """275 parameters. Dropout makes the run depend on the RNG, so a Guard that draws random numbers (or fails to
    restore them after its replay of a NaN step) changes the trajectory and the bitwise oracles see it."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, 16), nn.Tanh(), nn.Dropout(0.1), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, OUT))


class EmbedNet(nn.Module):
    """187 parameters: a sparse embedding (for SparseAdam) of indices read off the inputs, and a dense head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8, sparse=True)
        self.head = nn.Linear(8, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = (x.detach().abs() * 4).long().clamp(0, 19)
        return self.head(self.emb(idx).mean(1))


def make_embed_net(seed: int) -> EmbedNet:
    torch.manual_seed(seed)
    return EmbedNet()


def make_data(seed: int, n: int, batch: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, IN, generator=gen), torch.randn(batch, OUT, generator=gen)) for _ in range(n)]


# ---------------------------------------------------------------------------------------------- optimizers


@dataclass(frozen=True)
class OptCase:
    """One optimizer configuration: ``family`` is the torch.optim class, ``label`` names the variant."""

    label: str
    family: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self, params: Iterable[Any]) -> torch.optim.Optimizer:
        return getattr(torch.optim, self.family)(params, **self.kwargs)


def _variants(family: str, lr: float, extra: dict[str, Any] | None = None, fused: bool = False) -> list[OptCase]:
    base = {"lr": lr, **(extra or {})}
    out = [OptCase(family, family, {**base, "foreach": False}), OptCase(f"{family}-foreach", family,
                                                                          {**base, "foreach": True})]
    if fused:
        out.append(OptCase(f"{family}-fused", family, {**base, "fused": True}))
    return out


OPTIMIZERS: list[OptCase] = [
    *_variants("SGD", 0.05, fused=True),
    *[OptCase(c.label.replace("SGD", "SGD-momentum"), "SGD", {**c.kwargs, "momentum": 0.9})
      for c in _variants("SGD", 0.05, fused=True)],
    OptCase("SGD-nesterov", "SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4}),
    OptCase("SGD-nesterov-fused", "SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True, "fused": True}),
    *_variants("Adam", 0.01, fused=True),
    OptCase("Adam-amsgrad-fused", "Adam", {"lr": 0.01, "amsgrad": True, "fused": True}),
    *_variants("AdamW", 0.01, fused=True),
    *_variants("Adamax", 0.01),
    *_variants("NAdam", 0.01),
    OptCase("NAdam-decoupled", "NAdam", {"lr": 0.01, "decoupled_weight_decay": True, "weight_decay": 0.01}),
    *_variants("RAdam", 0.01),
    *_variants("Adagrad", 0.05, fused=True),
    *_variants("Adadelta", 1.0),
    *_variants("RMSprop", 0.01),
    OptCase("RMSprop-centered-momentum", "RMSprop", {"lr": 0.01, "centered": True, "momentum": 0.5}),
    *_variants("Rprop", 0.01),
    *_variants("ASGD", 0.05, {"t0": 5.0}),
]


def unsupported(case: OptCase) -> str | None:
    """Why this build of torch cannot run ``case`` (a fused kernel missing on the CPU), or None."""
    p = nn.Parameter(torch.ones(3))
    try:
        opt = case.build([p])
        p.grad = torch.ones(3)
        opt.step()
    except (RuntimeError, TypeError, ValueError) as e:
        return f"{case.label}: {type(e).__name__}: {e}"
    return None


# ---------------------------------------------------------------------------------------------- faults


@dataclass(frozen=True)
class Fault:
    """A non-finite ``value`` written at ``step``: into the loss (multiplied: the NaN flows through backward), one
    gradient element after backward, one input element, or one weight element before the forward. ``micro``: the
    micro-batch of an accumulated step it hits; ``at``: (parameter index, flat index) or (row, column)."""

    step: int
    kind: str
    value: float
    micro: int = 0
    at: tuple[int, int] = (0, 0)

    def __str__(self) -> str:
        return f"{self.kind}={self.value}@{self.step}.{self.micro}{self.at}"


def plan(rng: random.Random, kind: str, model: nn.Module, steps: int, n: int = 2, accum: int = 1,
         first: bool = False, values: Sequence[float] = VALUES) -> list[Fault]:
    """``n`` faults of one kind at distinct random steps (the first at step 0 when ``first``: before the optimizer
    has any state), each at a random element."""
    sizes = [p.numel() for p in model.parameters()]
    pool = list(range(1, steps - 2))
    chosen = sorted(rng.sample(pool, n - int(first))) if n - int(first) > 0 else []
    picks = ([0] if first else []) + chosen
    out = []
    for s in picks:
        if kind in ("grad", "weight"):
            i = rng.randrange(len(sizes))
            at = (i, rng.randrange(sizes[i]))
        else:
            at = (rng.randrange(8), rng.randrange(IN))
        out.append(Fault(s, kind, rng.choice(list(values)), rng.randrange(accum), at))
    return out


def _inject_weight(model: nn.Module, f: Fault) -> None:
    with torch.no_grad():
        list(model.parameters())[f.at[0]].view(-1)[f.at[1]] = f.value


def _inject_grad(model: nn.Module, f: Fault) -> None:
    p = list(model.parameters())[f.at[0]]
    if p.grad is not None and p.grad.is_sparse:  # an embedding's gradient: write into its stored values
        values = p.grad._values().view(-1)
        values[f.at[1] % values.numel()] = f.value
    elif p.grad is not None:
        p.grad.view(-1)[f.at[1]] = f.value


# ---------------------------------------------------------------------------------------------- copies (the oracle)


def params_copy(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def state_copy(opt: torch.optim.Optimizer) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The optimizer's per-parameter state (tensors cloned) and its groups' settings, in parameter order."""
    params = [p for g in opt.param_groups for p in g["params"]]
    per = [{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in opt.state.get(p, {}).items()}
           for p in params]
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return per, groups


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as integers: ``torch.equal`` on these is bitwise (NaN equals the same NaN, -0.0 is not
    0.0), where on floats it is numeric (NaN != NaN)."""
    t = t.detach().contiguous()
    return t.view(_BITS[t.element_size()]) if t.is_floating_point() or t.is_complex() else t


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(bits(a), bits(b)))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return bool(a == b)


def same_params(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))


def same_state(a: tuple[list[dict[str, Any]], list[dict[str, Any]]],
               b: tuple[list[dict[str, Any]], list[dict[str, Any]]]) -> bool:
    """Bitwise equal per-parameter state (same keys, every tensor ``torch.equal``) and equal group settings."""
    (pa, ga), (pb, gb) = a, b
    if len(pa) != len(pb) or len(ga) != len(gb):
        return False
    for x, y in zip(pa, pb):
        if x.keys() != y.keys() or not all(_same(x[k], y[k]) for k in x):
            return False
    return all(x.keys() == y.keys() and all(_same(x[k], y[k]) for k in x) for x, y in zip(ga, gb))


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t.coalesce().values() if t.is_sparse else t).all()) for t in tensors)


# ---------------------------------------------------------------------------------------------- the loop


class RecordingSink:
    """Keeps every record a Guard writes, in order, as it writes it (no drain forced by reading)."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def close(self) -> None:
        pass

    def actions(self, kind: str | None = None) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("type") == "action" and (kind is None or r["kind"] == kind)]


@dataclass
class Outcome:
    """What one run did, as the loop saw it.

    ``applied``: faulty steps whose update reached the weights or the state of an optimizer whose gradients (or
    the loss) the loop found non-finite. ``moved_while_corrupt``: such steps taken while a weight held a written
    NaN/Inf (a step with finite gradients may move: nothing non-finite reached gradguard). ``bad_rollbacks``:
    rollbacks that did not land bitwise on the weights and optimizer state before step ``to_step`` (after
    ``on_step``), or landed on non-finite weights; with several optimizers (one Guard each) a rollback lands its
    own optimizer's parameters (and those none trains) there and must leave the other optimizers' parameters
    bitwise as they were. ``weights``: the weights before every step (index 0: at attach),
    and at the end; ``states``: every optimizer's state, indexed the same. ``harmless``: faults after which the
    loss and every gradient were still finite."""

    faults: list[Fault]
    applied: list[Fault] = field(default_factory=list)
    harmless: list[Fault] = field(default_factory=list)
    moved_while_corrupt: list[int] = field(default_factory=list)
    rollbacks: list[dict[str, Any]] = field(default_factory=list)
    bad_rollbacks: list[str] = field(default_factory=list)
    corrupt_steps: int = 0  # steps that ended with a non-finite weight
    finite_end: bool = True
    recovered_weights: bool = True  # every weight fault ended in a rollback to a finite state
    actions: list[dict[str, Any]] = field(default_factory=list)
    weights: list[list[torch.Tensor]] = field(default_factory=list)
    states: list[list[Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def clean(self) -> bool:
        """Every oracle held."""
        return (not self.applied and not self.moved_while_corrupt and not self.bad_rollbacks and self.finite_end
                and self.recovered_weights and not self.warnings and self.error is None)

    def why(self) -> str:
        return (f"faults={[str(f) for f in self.faults]} applied={[str(f) for f in self.applied]} "
                f"moved_while_corrupt={self.moved_while_corrupt} bad_rollbacks={self.bad_rollbacks} "
                f"finite_end={self.finite_end} recovered_weights={self.recovered_weights} "
                f"actions={[(a['kind'], a['step']) for a in self.actions]} warnings={self.warnings} "
                f"error={self.error}")


Builder = Callable[[nn.Module], list[torch.optim.Optimizer]]


def _optimizers(opt_case: OptCase | Builder, model: nn.Module) -> list[torch.optim.Optimizer]:
    return opt_case.build(model.parameters()) if isinstance(opt_case, OptCase) else opt_case(model)


def run(opt_case: OptCase | Builder, faults: Sequence[Fault] = (), *, guard: str | None = "auto", steps: int = 30,
        accum: int = 1, seed: int = 0, guard_kw: dict[str, Any] | None = None,
        on_step: Callable[[int, nn.Module, list[torch.optim.Optimizer]], None] | None = None,
        skip_by_hand: bool = False, model_fn: Callable[[int], nn.Module] = make_model) -> Outcome:
    """Train the small model ``steps`` optimizer steps (``accum`` micro-batches each) with ``faults`` injected.

    Args:
        opt_case: an optimizer case, or a function making the optimizers for a model (several: one Guard each).
        guard: "auto" (repair), "watch" (monitoring only) or None (no Guard: the reference run).
        guard_kw: more Guard options (sinks, log_dir, log_every...).
        on_step: called at the start of each step (e.g. to add a parameter group).
        skip_by_hand: the reference for "a skipped step changes nothing else": an optimizer whose gradients are
            non-finite is not stepped.
        model_fn: the model for a seed (``make_model``, or ``make_embed_net`` for SparseAdam).
    """
    model = model_fn(seed)
    out = Outcome(list(faults))
    made = _optimizers(opt_case, model)
    opts = made if isinstance(made, list) else [made]
    data = make_data(seed + 1, steps * accum)
    by_step: dict[int, list[Fault]] = {}
    for f in faults:
        by_step.setdefault(f.step, []).append(f)
    sinks = [RecordingSink() for _ in opts]
    guards: list[gg.Guard] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.manual_seed(seed + 2)  # the dropout masks: the same in every variant of the run
        try:
            kw = dict(guard_kw or {})
            user_sinks = list(kw.pop("sinks", ()))
            for o, sink in zip(opts, sinks) if guard else []:
                guards.append(gg.Guard(model, o, repair="auto" if guard == "auto" else False, console=False,
                                       sinks=[sink, *user_sinks], **kw))
            out.weights.append(params_copy(model))
            states = [[state_copy(o) for o in opts]]
            corrupt = False
            for step in range(steps):
                if on_step is not None:
                    on_step(step, model, opts)
                    # A rollback to this step restores the state as the change left it (a new group included).
                    out.weights[step], states[step] = params_copy(model), [state_copy(o) for o in opts]
                here = by_step.get(step, [])
                for f in here:
                    if f.kind == "weight":
                        _inject_weight(model, f)
                        corrupt = True
                before_p, before_s = params_copy(model), [state_copy(o) for o in opts]
                for o in opts:
                    o.zero_grad()
                loss_ok = True
                for micro in range(accum):
                    x, y = data[step * accum + micro]
                    for f in here:
                        if f.kind == "input" and f.micro == micro:
                            x = x.clone()
                            x[f.at] = f.value
                    loss = nn.functional.mse_loss(model(x), y) / accum
                    for f in here:
                        if f.kind == "loss" and f.micro == micro:
                            loss = loss * f.value
                    loss_ok = loss_ok and bool(torch.isfinite(loss))
                    loss.backward()
                for f in here:
                    if f.kind == "grad":
                        _inject_grad(model, f)
                # The loop's own judgement, not gradguard's: which optimizers hold a non-finite gradient now.
                bad = [not loss_ok or not all_finite(p.grad for g in o.param_groups for p in g["params"]
                                                     if p.grad is not None) for o in opts]
                if here and not any(bad):
                    out.harmless.extend(f for f in here if f.kind != "weight")
                n_rb = [len(s.actions("rollback")) for s in sinks]
                index = {id(p): k for k, p in enumerate(model.parameters())}
                owned = [[index[id(p)] for g in o.param_groups for p in g["params"]] for o in opts]
                for i, (o, b) in enumerate(zip(opts, bad)):
                    pre = params_copy(model) if len(opts) > 1 else None
                    if not (skip_by_hand and b):
                        o.step()
                    if pre is not None and len(sinks[i].actions("rollback")) > n_rb[i]:
                        # A Guard owns one optimizer: its rollback must leave the others' parameters alone (their
                        # optimizers keep their state, so rewinding their weights makes a state the run never had).
                        others = [k for j, ks in enumerate(owned) if j != i for k in ks]
                        now = params_copy(model)
                        if not same_params([pre[k] for k in others], [now[k] for k in others]):
                            out.bad_rollbacks.append(f"optimizer {i}: its rollback at step {step} changed the "
                                                     "parameters of another optimizer")
                after_p, after_s = params_copy(model), [state_copy(o) for o in opts]
                new_rb = [(i, rb) for i, s in enumerate(sinks) for rb in s.actions("rollback")[n_rb[i]:]]
                if new_rb:  # a rollback at this step's read: it must land on the copies of its to_step
                    for i, rb in new_rb:
                        t = rb["detail"]["to_step"]
                        # its own parameters and those no optimizer trains; the others' are checked above
                        keep = [k for k in range(len(after_p)) if not any(k in ks for j, ks in enumerate(owned)
                                                                          if j != i)]
                        ok = (0 <= t < len(out.weights)
                              and same_params([after_p[k] for k in keep], [out.weights[t][k] for k in keep])
                              and same_state(after_s[i], states[t][i]) and all_finite(after_p))
                        if not ok:
                            out.bad_rollbacks.append(f"optimizer {i}: rollback at step {rb['step']} to_step {t}")
                    out.rollbacks.extend(rb for _, rb in new_rb)
                    corrupt = not all_finite(after_p)
                else:  # an optimizer whose gradients (or loss) are non-finite must not move, weights or state
                    for b, sa, sb, mine in zip(bad, before_s, after_s, owned):
                        if b and not (same_params([before_p[k] for k in mine], [after_p[k] for k in mine])
                                      and same_state(sa, sb)):
                            if corrupt and step not in out.moved_while_corrupt:  # a written NaN/Inf weight
                                out.moved_while_corrupt.append(step)
                            out.applied.extend(f for f in here if f.kind != "weight" and f not in out.applied)
                out.corrupt_steps += int(not all_finite(after_p))
                out.weights.append(after_p)
                states.append(after_s)
            out.finite_end = all_finite(model.parameters())
            out.states = states
            if any(f.kind == "weight" for f in faults):
                out.recovered_weights = bool(out.rollbacks) and out.finite_end
        except Exception as e:  # the loop itself must never fail: record it for the oracle
            out.error = f"{type(e).__name__}: {e}"
        finally:
            for g in guards:
                g.close()
    out.actions = [a for s in sinks for a in s.actions()]
    out.warnings = [f"{w.category.__name__}: {str(w.message)[:300]}" for w in caught]
    return out


# ---------------------------------------------------------------------------------------------- run directories

RUN_FILES = ("meta.json", "stats.jsonl", "events.jsonl")
ODD_VALUES: list[Any] = [None, True, -1, 0, 2.5, 1e308, "nan", "x", "", "$\\frac{a}{$", "<b>x</b>", [], [1, "a"], {},
                         {"a": {"b": [None]}}, "9" * 400, -(2**70)]
ODD_LINES: list[str] = ["", "{", "}", "[1, 2]", '"text"', "42", "null", "true", "{}", '{"step": "7"}', '{"step": -3}',
                        '{"step": 1e999}', '{"step": 3, "grad_norm": [1]}', '{"type": "action"}',
                        '{"type": "diagnosis", "kind": null, "step": 2}', "[" * 3000 + "]" * 3000, "\x00" * 16,
                        "NaN", '{"step": 5, "loss": NaN}', '{"step": 1, "step": 2}', '{"a": "\\ud800"}']


def garble(d: Any, rng: random.Random, n: int | None = None) -> list[str]:
    """Damage the run directory ``d`` (a pathlib.Path) with 1 to 3 seeded mutations; returns what was done.

    Mutations: cut a file at a random byte, insert a line of random bytes or an odd JSON line, replace a field of
    a random record (or of meta.json) by a value of the wrong type, drop a field, shuffle or duplicate lines, empty
    or delete a file, replace a file with random bytes."""
    done = []
    for _ in range(n if n is not None else rng.randint(1, 3)):
        name = rng.choice(RUN_FILES)
        path = d / name
        op = rng.choice(["cut", "bytes_line", "odd_line", "field", "drop_field", "shuffle", "duplicate", "empty",
                         "delete", "binary"])
        if not path.is_file():
            path.write_bytes(b"")
        data = path.read_bytes()
        lines = data.split(b"\n")
        if op == "cut":
            path.write_bytes(data[:rng.randrange(len(data) + 1)])
        elif op == "bytes_line":
            alphabet = b'\x00\xff\xfe{}[]":,0123456789abc \t\\\xc3\xa9'
            junk = bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 80)))
            lines.insert(rng.randrange(len(lines) + 1), junk)
            path.write_bytes(b"\n".join(lines))
        elif op == "odd_line":
            lines.insert(rng.randrange(len(lines) + 1), rng.choice(ODD_LINES).encode("utf-8", "surrogatepass"))
            path.write_bytes(b"\n".join(lines))
        elif op in ("field", "drop_field"):
            whole = name == "meta.json"  # one indented object, not one per line
            i = rng.randrange(len(lines))
            try:
                obj = json.loads(data if whole else lines[i])
            except ValueError:
                obj = None
            if isinstance(obj, dict) and obj:
                target, key = obj, rng.choice(sorted(obj))
                nested = [k for k, v in obj.items() if isinstance(v, dict) and v]
                if nested and rng.random() < 0.4:  # a field inside grad_norm, options, detail...
                    target = obj[rng.choice(nested)]
                    key = rng.choice(sorted(target))
                elif isinstance(obj.get("layers"), list) and obj["layers"] and rng.random() < 0.4:
                    target = rng.choice(obj["layers"])
                    key = rng.choice(sorted(target)) if isinstance(target, dict) and target else key
                    target = target if isinstance(target, dict) else obj
                if op == "field":
                    target[key] = rng.choice(ODD_VALUES)
                else:
                    target.pop(key, None)
                if whole:
                    path.write_text(json.dumps(obj, indent=2))
                else:
                    lines[i] = json.dumps(obj).encode()
                    path.write_bytes(b"\n".join(lines))
        elif op == "shuffle":
            body = [ln for ln in lines if ln]
            rng.shuffle(body)
            path.write_bytes(b"\n".join(body) + b"\n")
        elif op == "duplicate":
            i = rng.randrange(len(lines))
            lines.insert(rng.randrange(len(lines) + 1), lines[i])
            path.write_bytes(b"\n".join(lines))
        elif op == "empty":
            path.write_bytes(b"")
        elif op == "delete":
            path.unlink()
        elif op == "binary":
            path.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randint(1, 300))))
        done.append(f"{op} {name}")
    return done


@dataclass
class ReportAnswer:
    """What ``gradguard report`` did: exit code, stdout, stderr, Python warnings raised while it ran."""

    code: int
    out: str
    err: str
    warnings: list[str]

    def clean(self, run_dir: str) -> str | None:
        """None when the answer is a rendered report (exit 0, notes only) or one clear line naming a file of
        ``run_dir`` (exit 2); else what is wrong with it."""
        if "Traceback" in self.out + self.err:
            return "traceback"
        if self.warnings:
            return f"warnings: {self.warnings}"
        if self.code == 0:
            bad = [ln for ln in self.err.splitlines() if not ln.startswith("gradguard report: note: ")]
            if bad or not self.out.splitlines() or not self.out.splitlines()[-1].startswith("wrote "):
                return f"exit 0 but stderr {bad} stdout {self.out[-200:]!r}"
            return None
        lines = self.err.splitlines()
        if self.code == 2 and len(lines) == 1 and lines[0].startswith("gradguard report: ") and run_dir in lines[0]:
            return None
        return f"exit {self.code}: {self.err.strip()[:400]}"


def report(run_dir: Any, output: Any, plots: bool = True) -> ReportAnswer:
    """``gradguard report RUN_DIR -o OUTPUT`` in this process (``main``, as the console script calls it), with
    stdout, stderr and warnings caught. ``plots=False`` draws no figures (matplotlib costs ~2 s a report): the
    loading, checking, verdict and page are the same."""
    import contextlib
    import io

    from gradguard.cli import main

    out, err = io.StringIO(), io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.ExitStack() as stack:
        warnings.simplefilter("always")
        if not plots:
            from unittest import mock
            stack.enter_context(mock.patch("gradguard.report.html.figures", lambda run: {}))
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(["report", str(run_dir), "-o", str(output)])
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:  # what a user would see: a traceback
                import traceback

                err.write(traceback.format_exc())
                code = 1
    return ReportAnswer(code, out.getvalue(), err.getvalue(), [f"{w.category.__name__}: {w.message}" for w in caught])


# ---------------------------------------------------------------------------------------------- bad input

ODD_INPUTS: list[Any] = [None, True, 0, -1, 2.5, NAN, INF, -1e308, "x", "", [], {}, [1, 2], {"a": 1}, 10**20]


@dataclass
class BadInput:
    """One bad input and what gradguard made of it. ``clean``: refused with a ValueError/TypeError naming what
    was wrong and nothing changed, or accepted and the Guard still works (no internal failure, NaN step skipped)."""

    what: str
    clean: bool
    detail: str


def small_guarded(seed: int = 0, **guard_kw: Any) -> tuple[nn.Module, torch.optim.Optimizer, gg.Guard]:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    return m, opt, gg.Guard(m, opt, console=False, repair="auto", **guard_kw)


def _train(m: nn.Module, opt: torch.optim.Optimizer, steps: int, nan_at: int | None = None,
           sink: RecordingSink | None = None) -> bool:
    """Train ``steps`` steps with a NaN loss at ``nan_at``; whether that step left the weights bitwise alone (or,
    when ``sink`` saw a rollback during it, left them finite)."""
    held = True
    for i in range(steps):
        opt.zero_grad()
        loss = m(torch.randn(8, 4)).square().mean()
        (loss * NAN if i == nan_at else loss).backward()
        before = params_copy(m)
        rollbacks = len(sink.actions("rollback")) if sink is not None else 0
        opt.step()
        if i == nan_at:
            rolled = sink is not None and len(sink.actions("rollback")) > rollbacks
            held = all_finite(m.parameters()) if rolled else same_params(before, params_copy(m))
    return held


def _still_works(m: nn.Module, opt: torch.optim.Optimizer, guard: gg.Guard,
                 sink: RecordingSink | None = None) -> str | None:
    """None when 12 more steps with a NaN one run under the Guard as documented; else what went wrong."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            held = _train(m, opt, 12, nan_at=4, sink=sink)
            guard.state_dict()
            _ = guard.diagnoses
        except Exception as e:
            return f"then {type(e).__name__}: {e}"
    if caught:
        return "then " + "; ".join(f"{w.category.__name__}: {str(w.message).splitlines()[0]}" for w in caught)
    if not held or not all_finite(m.parameters()):
        return "then a NaN step reached the weights"
    return None


def state_paths(state: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path into a Guard state (lists: their first 3 items)."""
    out = [path] if path else []
    if isinstance(state, dict):
        for k, v in state.items():
            out += state_paths(v, (*path, k))
    elif isinstance(state, list):
        for i, v in enumerate(state[:3]):
            out += state_paths(v, (*path, i))
    return out


def trained_state() -> dict[str, Any]:
    """A Guard state after 30 steps, through JSON as a checkpoint would carry it."""
    m, opt, g = small_guarded()
    _train(m, opt, 30)
    state = json.loads(json.dumps(g.state_dict()))
    g.close()
    return state


def try_state(state: dict[str, Any], path: tuple[Any, ...], value: Any) -> BadInput:
    """Load ``state`` with ``path`` set to ``value`` (or deleted: ``value is KeyError``) into a trained Guard."""
    import copy

    bad = copy.deepcopy(state)
    node = bad
    for k in path[:-1]:
        node = node[k]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    what = f"load_state_dict: {'.'.join(map(str, path))} = {'<deleted>' if value is KeyError else repr(value)[:40]}"
    sink = RecordingSink()
    m, opt, g = small_guarded(sinks=[sink])
    _train(m, opt, 30)
    before = json.dumps(g.state_dict())
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                g.load_state_dict(bad)
            except ValueError as e:
                unchanged = json.dumps(g.state_dict()) == before
                named = str(path[0]) in str(e) or "layers" in str(e)  # or says the state is another model's
                return BadInput(what, unchanged and named and not caught,
                                f"ValueError: {e}" + ("" if unchanged else " (the Guard changed)")
                                + ("" if named else " (names no key)"))
            except Exception as e:
                return BadInput(what, False, f"{type(e).__name__}: {e}")
        problem = _still_works(m, opt, g, sink)
        return BadInput(what, problem is None, "accepted" + (f", {problem}" if problem else ""))
    finally:
        g.close()


# Guard options by hand from the README: (option, a predicate for the values it documents). Values it leaves open
# (an infinite clip norm) are tried and must give a working Guard or a clear error, whichever gradguard chooses.
def _whole(low: int) -> Callable[[Any], bool | None]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low


def _open_unit(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1


def _clip(v: Any) -> bool | None:
    if v == INF:
        return None
    return v is None or v in ("zclip", "autoclip", "agc") or (
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0)


OPTION_DOMAINS: dict[str, Callable[[Any], bool | None]] = {
    "log_every": _whole(1), "sample_every": _whole(1), "snapshot_every": _whole(1), "lr_restore_after": _whole(1),
    "max_rollbacks": _whole(0), "ema_beta": _open_unit, "lr_backoff": _open_unit,
    "nonfinite_check": lambda v: v in ("auto", "step", "deferred") if isinstance(v, str) else False,
    "repair": lambda v: v is None or v is False or v is True or v == "auto" if not isinstance(v, (int, float)) or
    isinstance(v, bool) else (None if v == 0 else False),
    "console": lambda v: isinstance(v, bool), "auto_loss": lambda v: isinstance(v, bool),
    "thresholds": lambda v: v is None, "clip": _clip,
    "frozen": lambda v: v in ([], ()) if isinstance(v, (list, tuple)) else (None if v == {} or v == "" else False),
    "stochastic": lambda v: v in ([], ()) if isinstance(v, (list, tuple)) else (None if v == {} or v == "" else False),
    "sinks": lambda v: v in ([], ()) if isinstance(v, (list, tuple)) else (None if v == {} or v == "" else False),
    "log_dir": lambda v: v is None if not isinstance(v, str) else None,
}


def try_option(name: str, value: Any, tmp: Any) -> BadInput:
    """``Guard(model, opt, name=value)``: a documented value attaches and works; any other is refused with a
    ValueError/TypeError naming the option, and leaves no hook behind."""
    valid = OPTION_DOMAINS[name](value)
    if name == "log_dir" and isinstance(value, str):
        value = str(tmp / (value or "empty"))  # never a folder in the working directory
    what = f"Guard({name}={value!r:.40})"
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            g = gg.Guard(m, opt, **{"console": False, "repair": "auto", name: value})
        except (ValueError, TypeError) as e:
            left = bool(m._forward_pre_hooks or m._forward_hooks or opt._optimizer_step_pre_hooks
                        or "step" in opt.__dict__)
            named = name in str(e) or name.rstrip("s") in str(e)  # "a sink needs ..." names sinks=
            ok = valid is not True and named and not left and not caught
            return BadInput(what, ok, f"{type(e).__name__}: {e}" + (" (hooks left)" if left else ""))
        except Exception as e:
            return BadInput(what, False, f"{type(e).__name__}: {e}")
        if valid is False:
            g.close()
            return BadInput(what, False, "accepted, though the README does not document it")
    if name == "repair" and not value:  # a Guard that does not repair: the NaN step is applied, as documented
        g.close()
        return BadInput(what, True, "accepted (no repair)")
    problem = _still_works(m, opt, g)
    g.close()
    return BadInput(what, problem is None, "accepted" + (f", {problem}" if problem else ""))


BAD_LOSSES: list[Any] = [torch.tensor(True), torch.tensor(1 + 2j), torch.ones(3), torch.ones(2, 2), torch.tensor([]),
                         True, "1.0", None, [1.0], {}, object()]


def try_loss(value: Any) -> BadInput:
    """``guard.observe_loss(value)`` with a value that is not a real scalar: a TypeError/ValueError saying so."""
    what = f"observe_loss({value!r:.40})"
    m, opt, g = small_guarded()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                g.observe_loss(value)
            except (TypeError, ValueError) as e:
                return BadInput(what, "loss" in str(e) and not caught, f"{type(e).__name__}: {e}")
            except Exception as e:
                return BadInput(what, False, f"{type(e).__name__}: {e}")
        return BadInput(what, False, "accepted")
    finally:
        g.close()


# ---------------------------------------------------------------------------------------------- SIGKILL mid-run

# A training script that says which step it finished after each one (the parent kills it after a chosen one).
# With log_every=1 the statistics line of a step is written and flushed before the step returns, so every step
# the child announced must be in stats.jsonl, and each NaN step it announced must be a skip_step in events.jsonl.
CHILD = r"""
import json
import sys

sys.path.insert(0, sys.argv[1])
import torch

torch.set_num_threads(1)
from torch import nn

import faultkit as fk
import gradguard as gg

run_dir, steps, nan_steps = sys.argv[2], int(sys.argv[3]), set(json.loads(sys.argv[4]))
model = fk.make_model(0)
opt = torch.optim.Adam(model.parameters(), lr=0.01)
guard = gg.Guard(model, opt, repair="auto", console=False, log_dir=run_dir, log_every=1)
for step, (x, y) in enumerate(fk.make_data(1, steps)):
    loss = nn.functional.mse_loss(model(x), y)
    opt.zero_grad()
    (loss * float("nan") if step in nan_steps else loss).backward()
    opt.step()
    print("done", step, flush=True)
guard.close()
"""


@dataclass
class Killed:
    """A run directory after SIGKILL. ``lost``: complete (newline-ended) lines that do not parse; ``cut``: a last
    line without its newline (never flushed whole); ``missing_steps``: steps the child finished that have no
    stats line; ``missing_skips``: NaN steps it finished that have no skip_step in events.jsonl."""

    returncode: int
    done: int
    lines: int = 0
    lost: int = 0
    cut: int = 0
    missing_steps: list[int] = field(default_factory=list)
    missing_skips: list[int] = field(default_factory=list)


def read_jsonl(path: Any) -> tuple[list[dict[str, Any]], int, int]:
    """The records of a JSONL file; the number of complete lines that do not parse as a JSON object; and 1 when
    the file ends in a line without its newline."""
    data = path.read_bytes() if path.exists() else b""
    *complete, tail = data.split(b"\n")
    records, lost = [], 0
    for line in complete:
        try:
            obj = json.loads(line)
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            records.append(obj)
        else:
            lost += 1
    return records, lost, int(bool(tail))


def kill_mid_run(run_dir: Any, script: Any, after: int, delay: float, nan_steps: Sequence[int],
                 steps: int = 400) -> Killed:
    """Start the child, let it finish step ``after``, wait ``delay`` seconds, SIGKILL it, and read what it left."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(Path(__file__).parent), str(run_dir), str(steps),
                             json.dumps(list(nan_steps))], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    done = -1
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            done = int(line.split()[1])
            if done >= after:
                break
        time.sleep(delay)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        proc.stdout.close()
        if proc.stderr is not None:
            proc.stderr.close()
    out = Killed(proc.returncode, done)
    stats, lost_s, cut_s = read_jsonl(Path(run_dir) / "stats.jsonl")
    events, lost_e, cut_e = read_jsonl(Path(run_dir) / "events.jsonl")
    out.lines = len(stats) + len(events) + lost_s + lost_e
    out.lost, out.cut = lost_s + lost_e, cut_s + cut_e
    seen = {r.get("step") for r in stats}
    out.missing_steps = [s for s in range(done + 1) if s not in seen]
    skips = {r.get("step") for r in events if r.get("type") == "action" and r.get("kind") == "skip_step"}
    out.missing_skips = [s for s in nan_steps if s <= done and s not in skips]
    return out


# ---------------------------------------------------------------------------------------------- LBFGS (a closure)


def _lbfgs_closure(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                   here: Sequence[Fault]) -> tuple[Callable[[], torch.Tensor], list[int]]:
    """The closure of one LBFGS step, injecting ``here``'s faults at their call; and its call counter."""
    calls = [0]

    def closure() -> torch.Tensor:
        calls[0] += 1
        opt.zero_grad()
        xx = x
        for f in here:
            if f.kind == "input" and f.micro == calls[0] - 1:
                xx = x.clone()
                xx[f.at] = f.value
        loss = nn.functional.mse_loss(model(xx), y)
        for f in here:
            if f.kind == "loss" and f.micro == calls[0] - 1:
                loss = loss * f.value
        loss.backward()
        for f in here:
            if f.kind == "grad" and f.micro == calls[0] - 1:
                _inject_grad(model, f)
        return loss

    return closure, calls


def run_lbfgs(faults: Sequence[Fault], steps: int = 16, seed: int = 0, guard: bool = True) -> Outcome:
    """LBFGS stepped with a closure, under ``Guard(repair="auto")``. A fault's ``micro`` is the closure call of its
    step that it hits (LBFGS calls the closure several times a step). The oracle for a faulty step: the weights
    after it are bitwise those before it (LBFGS's memory may be cleared: documented); for a weight fault: a
    rollback to finite weights, and finite weights to the end."""
    model = make_model(seed)
    model[2].p = 0.0  # LBFGS's line search needs the same function at every call: no dropout
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4, history_size=5)
    data = make_data(seed + 1, steps)
    out = Outcome(list(faults))
    sink = RecordingSink()
    g = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            g = gg.Guard(model, opt, repair="auto", console=False, sinks=[sink]) if guard else None
            out.weights.append(params_copy(model))
            for step in range(steps):
                here = [f for f in faults if f.step == step]
                for f in here:
                    if f.kind == "weight":
                        _inject_weight(model, f)
                closure, calls = _lbfgs_closure(model, opt, *data[step], here)
                before = params_copy(model)
                n_rb = len(sink.actions("rollback"))
                opt.step(closure)
                after = params_copy(model)
                hit = [f for f in here if f.kind != "weight" and f.micro < calls[0]]
                if hit and len(sink.actions("rollback")) == n_rb and not same_params(before, after):
                    out.applied.extend(hit)
                out.corrupt_steps += int(not all_finite(after))
                out.weights.append(after)
            out.rollbacks = sink.actions("rollback")
            out.finite_end = all_finite(model.parameters())
            if any(f.kind == "weight" for f in faults):
                out.recovered_weights = bool(out.rollbacks) and out.finite_end
        except Exception as e:
            out.error = f"{type(e).__name__}: {e}"
        finally:
            if g is not None:
                g.close()
    out.actions = sink.actions()
    out.warnings = [f"{w.category.__name__}: {str(w.message)[:300]}" for w in caught]
    return out

"""Faults in the other shapes of a training loop: gradient accumulation, two optimizers on one model (one Guard
each), a parameter group added after attach, LBFGS with a closure, SparseAdam on a sparse embedding; and an Inf
written into a weight that the loss cannot see.

The oracles are the loop's own copies (see faultkit): a faulty step leaves the weights and the state of every
optimizer whose gradients are non-finite bitwise as they were, a rollback lands bitwise on the copies of its
``to_step``, and the weights are finite to the end.
"""

from __future__ import annotations

import random

import faultkit as fk
import pytest
import torch

KINDS = ["loss", "grad", "input", "weight"]


def _faults(rng: random.Random, kind: str, steps: int, accum: int = 1, after: int = 0,
            model: torch.nn.Module | None = None) -> list[fk.Fault]:
    """Two faults of ``kind`` after step ``after`` (one NaN for a weight: each is rolled back on its own)."""
    model = model if model is not None else fk.make_model(0)
    if kind == "weight":
        f = fk.plan(rng, "weight", model, steps=14, n=1, values=[fk.NAN])[0]
        return [fk.Fault(f.step + after, "weight", fk.NAN, 0, f.at)]
    faults = fk.plan(rng, kind, model, steps=steps - after, n=2, accum=accum)
    return [fk.Fault(f.step + after, f.kind, f.value, f.micro, f.at) for f in faults]


def _find(label: str) -> fk.OptCase:
    return next(c for c in fk.OPTIMIZERS if c.label == label)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("label", ["SGD-momentum", "Adam-fused", "RMSprop-foreach", "Adagrad-fused"])
def test_gradient_accumulation(label: str, kind: str) -> None:
    """3 micro-batches per step; the fault hits one of them (a NaN micro-batch poisons the accumulated gradient)."""
    rng = random.Random(fk.seed_of("accum", label, kind))
    out = fk.run(_find(label), _faults(rng, kind, 16, accum=3), steps=28 if kind == "weight" else 16, accum=3,
                 seed=fk.seed_of("accum", label, kind, "run"))
    assert out.clean, out.why()
    assert not out.harmless


def two_optimizers(model: torch.nn.Module) -> list[torch.optim.Optimizer]:
    """The body with SGD and momentum, the head with fused Adam: a fine-tuning set-up."""
    body = [p for n, p in model.named_parameters() if not n.startswith("5.")]
    return [torch.optim.SGD(body, lr=0.05, momentum=0.9), torch.optim.Adam(model[5].parameters(), lr=0.01,
                                                                            fused=True)]


@pytest.mark.parametrize("kind", KINDS)
def test_two_optimizers_on_one_model(kind: str) -> None:
    """A NaN gradient in the head stops the head's step only: the body's step is applied, exactly as a loop that
    left out the head's step by hand would apply it."""
    rng = random.Random(fk.seed_of("two", kind))
    faults = _faults(rng, kind, 16)
    seed = fk.seed_of("two", kind, "run")
    steps = 28 if kind == "weight" else 16
    out = fk.run(two_optimizers, faults, steps=steps, seed=seed)
    assert out.clean, out.why()
    if kind != "weight":
        by_hand = fk.run(two_optimizers, faults, guard=None, steps=steps, seed=seed, skip_by_hand=True)
        assert all(fk.same_params(a, b) for a, b in zip(out.weights, by_hand.weights))


def test_a_nan_in_one_optimizers_gradients_skips_that_one_only() -> None:
    faults = [fk.Fault(6, "grad", fk.NAN, 0, (4, 3))]  # the head's weight (Adam's)
    out = fk.run(two_optimizers, faults, steps=10)
    assert out.clean, out.why()
    moved = [not torch.equal(a, b) for a, b in zip(out.weights[6], out.weights[7])]
    assert moved == [True, True, True, True, False, False]  # the body stepped, the head did not


def test_a_rollback_by_one_of_two_guards_leaves_a_consistent_state() -> None:
    """Three NaN steps in the head: the head's Guard rolls back. A Guard owns one optimizer, so the rollback puts
    back the head's weights and Adam state (bitwise those before its to_step) and leaves the body alone: its
    weights and SGD momentum both go on from where they were, never one rewound without the other."""
    out = fk.run(two_optimizers, [fk.Fault(s, "grad", fk.NAN, 0, (4, 3)) for s in (10, 12, 14)], steps=16)
    assert out.clean and out.rollbacks, out.why()  # clean: the head landed on to_step, the body was not touched
    assert [a["kind"] for a in out.actions if a["kind"] == "rollback"] == ["rollback"]
    rb = out.rollbacks[0]
    t, now = rb["detail"]["to_step"], rb["step"] + 1  # the copies before step to_step, and after the rollback
    body, head = slice(0, 4), slice(4, 6)
    assert fk.same_params(out.weights[now][head], out.weights[t][head])
    assert fk.same_state(out.states[now][1], out.states[t][1])
    assert not fk.same_params(out.weights[now][body], out.weights[t][body])  # the body went on training ...
    assert not fk.same_state(out.states[now][0], out.states[t][0])  # ... its momentum with it


def _grow(step: int, model: torch.nn.Module, opts: list[torch.optim.Optimizer]) -> None:
    """Unfreeze the first layer at step 8 and give it to the optimizer as a new group."""
    if step == 8:
        for p in model[0].parameters():
            p.requires_grad_(True)
        opts[0].add_param_group({"params": list(model[0].parameters())})


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("label", ["SGD-momentum", "Adam-fused", "Adagrad", "Rprop-foreach"])
def test_add_param_group_after_attach(label: str, kind: str) -> None:
    case = _find(label)

    def build(model: torch.nn.Module) -> list[torch.optim.Optimizer]:
        for p in model[0].parameters():
            p.requires_grad_(False)
        return [case.build([p for p in model.parameters() if p.requires_grad])]

    rng = random.Random(fk.seed_of("group", label, kind))
    faults = _faults(rng, kind, 22, after=8)
    if kind == "grad":  # one of them in the new group
        faults[0] = fk.Fault(faults[0].step, "grad", faults[0].value, 0, (rng.randrange(2), rng.randrange(6)))
    out = fk.run(build, faults, steps=30 if kind == "weight" else 22, on_step=_grow,
                 seed=fk.seed_of("group", label, kind, "run"))
    assert out.clean, out.why()
    assert all(r["detail"]["to_step"] >= 8 for r in out.rollbacks)  # the older snapshots lack the new group


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("kind", ["loss", "grad", "input"])
def test_lbfgs_with_a_closure(kind: str, seed: int) -> None:
    """The fault hits one closure call inside a step (LBFGS calls it up to max_iter times, plus its line search)."""
    rng = random.Random(fk.seed_of("lbfgs", kind, seed))
    f = fk.plan(rng, kind, fk.make_model(0), steps=10, n=1)[0]
    fault = fk.Fault(f.step, kind, f.value, rng.randrange(3), f.at)
    out = fk.run_lbfgs([fault], steps=12, seed=seed)
    assert out.clean and not out.applied, out.why()
    assert [a["step"] for a in out.actions if a["kind"] == "skip_step"] == [fault.step]
    assert not fk.same_params(out.weights[fault.step + 1], out.weights[-1])  # training went on


def test_lbfgs_with_a_nan_weight_is_rolled_back() -> None:
    out = fk.run_lbfgs([fk.Fault(4, "weight", fk.NAN, 0, (0, 0))], steps=16)
    assert out.rollbacks, out.why()
    assert out.finite_end, f"{len(out.rollbacks)} rollbacks announced, weights still NaN: {out.why()}"


def sparse_adam(model: torch.nn.Module) -> list[torch.optim.Optimizer]:
    """SparseAdam for the sparse embedding, Adam for the head (SparseAdam refuses dense gradients)."""
    return [torch.optim.SparseAdam(list(model.emb.parameters()), lr=0.01),
            torch.optim.Adam(model.head.parameters(), lr=0.01)]


@pytest.mark.parametrize("kind", ["loss", "grad", "weight"])
def test_sparse_adam(kind: str) -> None:
    rng = random.Random(fk.seed_of("sparse", kind))
    model = fk.make_embed_net(0)
    faults = _faults(rng, kind, 16, model=model)
    if kind == "weight":  # in the head: a NaN in an embedding row no batch reads would be invisible to any loss
        faults = [fk.Fault(faults[0].step, "weight", fk.NAN, 0, (1, rng.randrange(24)))]
    if kind == "grad":  # one in the sparse gradient
        faults[0] = fk.Fault(faults[0].step, "grad", faults[0].value, 0, (0, rng.randrange(40)))
    out = fk.run(sparse_adam, faults, steps=28 if kind == "weight" else 16, model_fn=fk.make_embed_net,
                 seed=fk.seed_of("sparse", kind, "run"))
    assert out.clean, out.why()
    assert not out.harmless


@pytest.mark.parametrize("value", [fk.INF, -fk.INF])
def test_an_inf_weight_the_loss_cannot_see_is_still_repaired(value: float) -> None:
    """Inf in the first layer's weight: tanh(+-inf) = +-1, so the loss stays finite, and its gradient is 0 * x
    (finite). The model is corrupted all the same: an input with a 0 in that feature gives NaN (inf * 0)."""
    out = fk.run(fk.OPTIMIZERS[0], [fk.Fault(3, "weight", value, 0, (0, 0))], steps=40)
    assert out.finite_end, f"non-finite weights for {out.corrupt_steps} of 40 steps, actions {out.why()}"

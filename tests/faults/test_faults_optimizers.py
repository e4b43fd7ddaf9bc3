"""NaN/Inf in the loss, the gradients, the inputs and the weights, at seeded random steps, on every torch.optim
optimizer this build runs (for-loop, foreach and fused variants).

Oracles, none of them gradguard's own account: copies of the weights and optimizer state taken by the loop before
each faulty step (bitwise equal after it), the copies after every step (a rollback must land bitwise on the one
its ``to_step`` names), and the same run without a Guard in which the loop itself leaves out the faulty steps.
"""

from __future__ import annotations

import random

import faultkit as fk
import pytest

OPTS = [pytest.param(c, id=c.label) for c in fk.OPTIMIZERS]
# One for-loop variant of each class and every fused one (their own skip path): enough for the faults whose path
# through gradguard does not depend on the optimizer (benchmarks/faults.py runs every pair).
CORE = [pytest.param(c, id=c.label) for c in fk.OPTIMIZERS if c.label == c.family or c.kwargs.get("fused")]
SWEEP = ([pytest.param(c.values[0], "grad", id=f"{c.id}-grad") for c in OPTS]
         + [pytest.param(c.values[0], kind, id=f"{c.id}-{kind}") for kind in ("loss", "input") for c in CORE])


def _skip_unsupported(case: fk.OptCase) -> None:
    why = fk.unsupported(case)
    if why:
        pytest.skip(f"not in this build of torch: {why}")


@pytest.mark.parametrize(("case", "kind"), SWEEP)
def test_a_nonfinite_step_never_reaches_weights_or_state(case: fk.OptCase, kind: str) -> None:
    _skip_unsupported(case)
    rng = random.Random(fk.seed_of(case.label, kind))
    faults = fk.plan(rng, kind, fk.make_model(0), steps=16, n=2, first=rng.random() < 0.5)
    seed = fk.seed_of(case.label, kind, "run")
    guarded = fk.run(case, faults, steps=16, seed=seed)
    assert guarded.clean, guarded.why()
    assert not guarded.harmless, f"faults that changed nothing: {guarded.harmless}"  # the faults were real
    assert {a["step"] for a in guarded.actions if a["kind"] == "skip_step"} == {f.step for f in faults}
    assert {a["kind"] for a in guarded.actions} == {"skip_step"}, guarded.why()
    # The whole trajectory is the one of a loop that leaves the faulty steps out by hand: skipping changed nothing
    # else (optimizer state, learning rate, the RNG of the dropout after the Guard's replay of the NaN forward).
    by_hand = fk.run(case, faults, guard=None, steps=16, seed=seed, skip_by_hand=True)
    assert by_hand.error is None
    for step, (a, b) in enumerate(zip(guarded.weights, by_hand.weights)):
        assert fk.same_params(a, b), f"weights differ from the hand-skipped run before step {step}"


@pytest.mark.parametrize("case", OPTS)
def test_a_nan_written_into_a_weight_is_rolled_back(case: fk.OptCase) -> None:
    _skip_unsupported(case)
    rng = random.Random(fk.seed_of(case.label, "weight"))
    fault = fk.plan(rng, "weight", fk.make_model(0), steps=16, n=1, values=[fk.NAN])[0]
    out = fk.run(case, [fault], steps=28, seed=fk.seed_of(case.label, "weight", "run"))
    # Nothing moved while the weight was NaN, the rollback landed bitwise on the copies of its to_step, and the
    # weights are finite from then to the end.
    assert out.clean, out.why()
    assert out.rollbacks and out.rollbacks[0]["step"] <= fault.step + 10, out.why()  # promptly, not at the end
    assert out.corrupt_steps == out.rollbacks[0]["step"] - fault.step  # NaN from the fault to the rollback only


@pytest.mark.parametrize("case", CORE)
def test_a_clean_run_is_bitwise_the_same_with_or_without_a_guard(case: fk.OptCase) -> None:
    """Watching changes nothing; nor does repair="auto" on a healthy run inside ZClip's 25-step warm-up (after it,
    ZClip may clip a spike: that is its purpose, not a change the user did not ask for)."""
    _skip_unsupported(case)
    seed = fk.seed_of(case.label, "clean")
    plain = fk.run(case, [], guard=None, steps=16, seed=seed)
    for mode in ("watch", "auto"):
        guarded = fk.run(case, [], guard=mode, steps=16, seed=seed)
        assert guarded.error is None and not guarded.warnings, guarded.why()
        assert guarded.actions == [], f"{mode}: acted on a healthy run: {guarded.why()}"
        for step, (a, b) in enumerate(zip(plain.weights, guarded.weights)):
            assert fk.same_params(a, b), f"{mode}: weights differ before step {step}"


def _skip_log_cases() -> list[object]:
    """Every fused optimizer, skipping at step 0 (before it has state: the skip is decided on the host) and at step
    5 (the kernel's found_inf skips it, except fused SGD without momentum, which never has state)."""
    return [pytest.param(c, at, id=f"{c.label}@{at}") for c in fk.OPTIMIZERS if c.kwargs.get("fused")
            for at in (0, 5)]


@pytest.mark.parametrize(("case", "at"), _skip_log_cases())
def test_each_skipped_step_is_one_action(case: fk.OptCase, at: int) -> None:
    _skip_unsupported(case)
    out = fk.run(case, [fk.Fault(at, "grad", fk.NAN, 0, (2, 3))], steps=12)
    assert out.clean, out.why()
    assert [a["step"] for a in out.actions if a["kind"] == "skip_step"] == [at]  # once in actions/events.jsonl

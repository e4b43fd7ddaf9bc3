"""Early divergence (the loss thrown up within the first steps) and ``stalled`` (no learning, nothing else wrong).

Oracles: the losses the training loop itself computed (the early rule must fire exactly when the loss first
stands 10x above its first value, or the norm 1000x) and runs whose outcome is known by construction (labels
with no signal cannot be learned; a healthy digits run learns). Several seeds each: a property, not a trajectory.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import pytest
import torch
from scenarios import ListSink
from torch import nn

import gradguard as gg
from gradguard.demo import digits, mlp
from gradguard.detect.early import BOTH_GRAD, BOTH_LOSS, EARLY_STEPS, GRAD_RISE, LOSS_RISE, RISES, STAY


def train_digits(lr: float, act: type[nn.Module], seed: int, steps: int):
    torch.manual_seed(seed)
    xtr, ytr, _, _ = digits(0)
    m = mlp(3, 64, act)
    opt = torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9)
    guard = gg.Guard(m, opt, console=False)
    gen = torch.Generator().manual_seed(seed)
    losses, norms = [], []
    for _ in range(steps):
        idx = torch.randint(0, len(xtr), (64,), generator=gen)
        loss = nn.functional.cross_entropy(m(xtr[idx]), ytr[idx])
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in m.parameters()])).item())
        opt.step()
    found = guard.diagnoses
    guard.close()
    return found, losses, norms


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_learning_rate_far_too_high_is_reported_within_the_first_steps(seed: int) -> None:
    found, losses, norms = train_digits(30.0, nn.Tanh, seed, 12)
    # The oracle, from the loop's own losses and norms: the first step where the norm is GRAD_RISE x its first (the
    # loss not below its first), or the RISES-th step whose loss is LOSS_RISE x its first, or BOTH_LOSS x with the
    # norm BOTH_GRAD x, or STAY or more steps after the first LOSS_RISE step with their median loss BOTH_LOSS x.
    def rose(i: int) -> bool:
        return losses[i] >= LOSS_RISE * losses[0] or (losses[i] >= BOTH_LOSS * losses[0]
                                                      and norms[i] >= BOTH_GRAD * norms[0])

    def stayed(s: int) -> bool:
        big = next((i for i in range(s) if losses[i] >= LOSS_RISE * losses[0]), None)
        return big is not None and s - big >= STAY and np.median(losses[big + 1:s + 1]) >= BOTH_LOSS * losses[0]

    expect = next(s for s in range(EARLY_STEPS)
                  if (norms[s] >= GRAD_RISE * norms[0] and losses[s] >= losses[0])
                  or sum(rose(i) for i in range(s + 1)) >= RISES or stayed(s))
    early = [d for d in found if d.kind == "exploding" and "first steps" in d.message]
    assert len(early) == 1 and early[0].step == expect
    assert early[0].evidence["loss"] == pytest.approx(losses[expect], rel=1e-5)
    assert early[0].evidence["first_loss"] == pytest.approx(losses[0], rel=1e-5)
    assert early[0].severity == "error" and early[0].layers


@pytest.mark.parametrize("seed", [0, 1])
def test_a_healthy_run_raises_nothing_early_or_stalled(seed: int) -> None:
    found, losses, _ = train_digits(0.05, nn.ReLU, seed, 250)
    assert losses[-1] < 0.2 * losses[0]  # it did learn
    assert found == []


def train_random_labels(seed: int, steps: int = 300):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 10))
    x, y = torch.randn(20000, 20), torch.randint(0, 10, (20000,))  # no signal in the labels: nothing to learn
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
    guard = gg.Guard(m, opt, console=False)
    return fit(guard, m, opt, x, y, 128, steps, torch.Generator().manual_seed(seed))


def fit(guard: gg.Guard, m: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, batch: int,
        steps: int, gen: torch.Generator) -> tuple[list[gg.Diagnosis], list[float]]:
    """Train a classifier on random batches of (x, y) under ``guard``; its diagnoses (read, then closed) and the
    loop's own losses."""
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        loss = nn.functional.cross_entropy(m(x[idx]), y[idx])
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    found = guard.diagnoses
    guard.close()
    return found, losses


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_run_that_cannot_learn_is_stalled_and_says_what_was_ruled_out(seed: int) -> None:
    found, losses = train_random_labels(seed)
    assert [d.kind for d in found] == ["stalled"]
    d = found[0]
    # The first full window of evidence; a loss drifting down within its noise gets up to two windows after the
    # start level (steps 10-42) to show a descent (stalled.SETTLE): random labels drift as the net memorises a few.
    assert 99 <= d.step <= 42 + 2 * 100 + 25, d.step
    window = np.array(losses[d.step - 99:d.step + 1])
    assert d.evidence["loss_mean"] == pytest.approx(window.mean(), rel=1e-5)
    assert d.evidence["loss_mean"] > 0.5 * np.log(10)  # near chance: ln(10) for 10 classes
    assert "Ruled out:" in d.message and "plateau" in d.message


def early_on(losses: list[float], totals: list[float], reads: int = 1):
    """detect_early_divergence on a history of these per-step losses and total norms, read ``reads`` rows at a
    time (as a Guard with log_every=reads would), one layer carrying the whole norm."""
    from gradguard.detect.early import detect_early_divergence
    from gradguard.detect.history import History

    h = History(["l0"], np.full(1, 100.0), np.zeros(1, dtype=bool))
    for start in range(0, len(losses), reads):
        n = len(losses[start:start + reads])
        t = np.asarray(totals[start:start + n], dtype=np.float64)
        h.append(np.arange(start, start + n), t, np.asarray(losses[start:start + n], dtype=np.float64),
                 np.ones(n, dtype=bool), t[:, None])
        v = detect_early_divergence(h, range(len(h.steps) - n, len(h.steps)))
        if v is not None:
            return v.diagnosis
    return None


@pytest.mark.parametrize("reads", [1, 3, 10])
def test_a_loss_that_doubles_with_a_tenfold_norm_twice_is_early_divergence(reads: int) -> None:
    # amp_accum's shape at lr x100: 2.3, 3.4, 7.4, 2.8 ... with the norm 6-18x its first. Step 2 is the first with
    # both loss >= 2x (4.6) and norm >= 10x (5.8); step 5 the second: the diagnosis names step 5, however the
    # steps are grouped into reads.
    losses = [2.3, 3.4, 7.4, 2.8, 2.8, 5.3, 9.5, 4.4, 2.4, 15.4]
    totals = [0.58, 3.5, 7.2, 2.8, 3.6, 7.3, 10.4, 7.4, 3.2, 18.2]
    d = early_on(losses, totals, reads)
    assert d is not None and d.kind == "exploding" and d.step == 5
    assert d.evidence["loss"] == 5.3 and d.evidence["grad_norm"] == 7.3


def test_a_loss_ten_times_its_first_on_a_second_step_is_early_divergence() -> None:
    d = early_on([2.0, 25.0, 3.0, 4.0, 30.0, 1.0], [1.0, 2.0, 1.0, 1.0, 3.0, 1.0])
    assert d is not None and d.step == 4 and d.evidence["loss_ratio"] == 15.0
    assert "step 1 too" in d.message


@pytest.mark.parametrize("reads", [1, 2, 10])
def test_a_loss_ten_times_its_first_that_stays_up_is_early_divergence(reads: int) -> None:
    # ema_checkpoint's shape at lr x100: 0.86, 14.9 (17x), then 6.8 and 3.4 (median 5.9x >= 2x) by step 3.
    losses = [0.86, 14.85, 6.79, 3.38, 5.30, 2.88, 2.34, 0.50, 1.01, 0.71]
    totals = [2.17, 7.57, 3.57, 1.74, 2.68, 1.56, 2.61, 0.24, 1.41, 0.36]
    d = early_on(losses, totals, reads)
    assert d is not None and d.step == STAY + 1 and d.evidence["first_rise_step"] == 1
    assert "17.3x its start at step 1, and above 2x on most steps since" in d.message


def test_a_loss_that_climbs_to_ten_times_its_first_is_early_divergence() -> None:
    # A regression at a learning rate far too high, every step worse: 1.08x, 3.4x (its norm 9.6x, just short of
    # BOTH_GRAD), then 60x. The 60x step follows a step already above BOTH_LOSS: a climb, named at once.
    d = early_on([37.1, 40.1, 125.8, 2220.0, 1.8e8], [10.5, 32.8, 100.9, 995.6, 5.2e6])
    assert d is not None and d.step == 3 and "climbing: 3.39x its start the step before" in d.message


def test_one_outlier_step_or_one_signal_alone_is_not_early_divergence() -> None:
    base = [2.3] * EARLY_STEPS
    one_outlier = early_on([2.3, 2.2, 6.0, 2.1, *base[4:]], [1.0, 1.0, 12.0, 1.0, *[1.0] * 6])
    # Heavy-tailed regression targets (Student-t, 1.5 degrees of freedom): one batch's loss 69x the first.
    heavy_tail = early_on([7.7, 9.8, 7.4, 531.2, 14.6, 4.8, 19.9, 11.0, 9.4, 15.1],
                          [1.0, 1.2, 1.0, 9.1, 1.4, 0.8, 1.6, 1.2, 1.1, 1.4])
    loss_only = early_on([0.4, 1.3, 1.2, 1.4, 1.1, *[1.2] * 5], [1.0, 1.5, 1.4, 1.6, 1.3, *[1.4] * 5])
    norm_only = early_on([2.3, 2.2, 2.1, 2.0, *[1.9] * 6], [0.1, 1.0, 2.0, 3.0, *[4.0] * 6])
    assert (one_outlier, heavy_tail, loss_only, norm_only) == (None, None, None, None)


def test_stalled_is_a_kind() -> None:
    assert "stalled" in gg.KINDS


def stalled_on(losses: np.ndarray):
    """detect_stalled on a history of these losses, with healthy constant gradients in three layers."""
    from gradguard.detect.history import History, Thresholds
    from gradguard.detect.stalled import detect_stalled

    n = len(losses)
    grads = np.ones((n, 3))
    h = History(["l0", "l1", "l2"], np.full(3, 100.0), np.zeros(3, dtype=bool))
    h.append(np.arange(n), np.sqrt((grads ** 2).sum(1)), losses, np.ones(n, dtype=bool), grads)
    return detect_stalled(h, Thresholds(), set())


def percent_in(message: str, verb: str) -> float:
    import re

    found = re.search(rf"the loss {verb} by ([0-9.,]+)%", message)
    assert found is not None, message
    return float(found.group(1).replace(",", ""))


def test_a_stalled_loss_that_rose_says_it_rose_by_a_positive_amount() -> None:
    # The last 100 steps of a loss creeping up from 2.0 to 2.6: stalled (no progress), and it rose.
    losses = np.linspace(2.0, 2.6, 100)
    v = stalled_on(losses)
    assert v is not None
    third = len(losses) // 3  # the window's first and last thirds, as the message is defined on
    first, last = losses[:third].mean(), losses[-third:].mean()
    rise = 100 * (last - first) / first
    assert "improved by" not in v.diagnosis.message
    assert percent_in(v.diagnosis.message, "rose") == pytest.approx(rise, abs=0.5)


def test_a_stalled_loss_that_fell_a_little_says_it_improved() -> None:
    losses = np.linspace(2.0, 1.99, 100)
    v = stalled_on(losses)
    assert v is not None
    third = len(losses) // 3
    first, last = losses[:third].mean(), losses[-third:].mean()
    gain = 100 * (first - last) / first
    assert gain < 2  # below the 2% a window needs to count as learning
    assert percent_in(v.diagnosis.message, "improved") == pytest.approx(gain, rel=0.05)


def regression(lr: float, seed: int, steps: int = 300, **options: Any):
    """pytorch/examples' polynomial regression as written there: hand-written SGD on ``param.data``, no optimizer
    (the Guard counts a step per backward), smooth L1 loss; the loop's own losses beside the diagnoses."""
    torch.manual_seed(seed)
    w_target, b_target = torch.randn(4, 1) * 5, torch.randn(1) * 5
    fc = nn.Linear(4, 1)
    guard = gg.Guard(fc, None, **{"console": False, **options})
    losses = []
    for _ in range(steps):
        x = torch.randn(32).unsqueeze(1)
        x = torch.cat([x ** i for i in range(1, 5)], 1)
        out = nn.functional.smooth_l1_loss(fc(x), x.mm(w_target) + b_target.item())
        losses.append(out.item())
        fc.zero_grad()
        out.backward()
        for p in fc.parameters():
            p.data.add_(-lr * p.grad)
    found = guard.diagnoses
    guard.close()
    return found, losses


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_run_that_never_recovers_from_early_divergence_is_not_called_stalled_after_it(seed: int) -> None:
    # lr 100x the example's 0.1: the loss jumps within the first steps and never comes back to its first value.
    # Before, once the divergence's cooldown passed, `stalled` was raised again and again, saying that exploding
    # gradients had been ruled out.
    found, losses = regression(10.0, seed)
    assert np.mean(losses[-100:]) > losses[0]  # the loop's own numbers: the run never recovered
    assert {d.kind for d in found} == {"exploding"}  # a later spike may be reported too (it is one)
    assert "first steps" in found[0].message and found[0].step < EARLY_STEPS


@pytest.mark.parametrize("seed", [0, 1])
def test_the_regression_at_its_own_learning_rate_raises_nothing(seed: int) -> None:
    found, losses = regression(0.1, seed)
    assert np.median(losses[-100:]) < 0.1 * losses[0]  # it fits the polynomial (x^4 features: heavy-tailed batches)
    assert found == []


def _diverged_then(after: np.ndarray):
    """A history whose loss starts at 1.0, diverges early (12, 15: the early rule fires at step 2), then follows
    ``after``; healthy constant gradients in three layers. Returns the history and the early verdict."""
    from gradguard.detect.early import detect_early_divergence
    from gradguard.detect.history import History

    losses = np.concatenate([[1.0, 12.0, 15.0], after])
    n = len(losses)
    grads = np.ones((n, 3))
    h = History(["l0", "l1", "l2"], np.full(3, 100.0), np.zeros(3, dtype=bool))
    h.append(np.arange(3), np.sqrt((grads[:3] ** 2).sum(1)), losses[:3], np.ones(3, dtype=bool), grads[:3])
    early = detect_early_divergence(h, range(3))
    h.append(np.arange(3, n), np.sqrt((grads[3:] ** 2).sum(1)), losses[3:], np.ones(n - 3, dtype=bool), grads[3:])
    return h, early


def test_early_divergence_marks_the_loss_to_come_back_to_and_a_stall_above_it_is_its_damage() -> None:
    from gradguard.detect.history import Thresholds, explained_by_explosion
    from gradguard.detect.stalled import detect_stalled

    rng = np.random.default_rng(0)
    h, early = _diverged_then(13.0 + rng.normal(0, 1, 200))  # stuck far above the first loss
    assert early is not None and early.diagnosis.step == 2
    assert h.exploded == (2, 1.0)  # the step, and the loss at initialisation
    assert explained_by_explosion(h, Thresholds()) is not None
    assert detect_stalled(h, Thresholds(), set()) is None
    h.exploded = None  # the same losses with no explosion on record: a stall, as before
    assert detect_stalled(h, Thresholds(), set()) is not None


def test_a_stall_after_the_loss_came_back_from_early_divergence_is_still_reported() -> None:
    from gradguard.detect.history import Thresholds, explained_by_explosion
    from gradguard.detect.stalled import detect_stalled

    rng = np.random.default_rng(0)
    h, early = _diverged_then(1.0 + rng.normal(0, 0.01, 200))  # back at the first loss, and flat there
    assert early is not None and h.exploded == (2, 1.0)
    assert explained_by_explosion(h, Thresholds()) is None
    v = detect_stalled(h, Thresholds(), set())
    assert v is not None and "Ruled out:" in v.diagnosis.message


def test_a_run_that_ends_without_recovering_from_its_explosion_says_so_once_at_close(tmp_path) -> None:
    out, mine = io.StringIO(), ListSink()
    found, losses = regression(10.0, 0, console=out, log_dir=tmp_path / "run", sinks=[mine])
    explosion = found[0].step
    # The oracle, from the loop's own losses: the last window's steps after the explosion, against step 0's loss.
    after = losses[-100:]
    lines = out.getvalue().splitlines()
    note = [x for x in lines if x.startswith("[gradguard] step 299: The loss never came back")]
    assert len(note) == 1
    assert note[0] == (f"[gradguard] step 299: The loss never came back from the explosion at step {explosion}: it "
                       f"averaged {np.mean(after):.4g} over the last 100 steps, against {losses[0]:.4g} before it.")
    assert lines.index(note[0]) < len(lines) - 1 and lines[-1].startswith("[gradguard] summary:")  # before it
    events = [json.loads(x) for x in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert [(e["type"], e["kind"], e["step"]) for e in events if e["type"] == "note"] == [
        ("note", "not_recovered", 299)]
    assert all(r["type"] != "note" for r in mine.records)  # a user's sink takes what its contract lists


def test_a_healthy_run_says_nothing_at_close() -> None:
    out = io.StringIO()
    found, losses = regression(0.1, 0, console=out)
    assert found == [] and np.median(losses[-100:]) < 0.1 * losses[0]
    assert out.getvalue() == ""  # no diagnosis, no note, no summary


def far_too_high(seed: int, steps: int = 20, **options: Any) -> tuple[list[gg.Diagnosis], list[float], gg.Guard]:
    """A ReLU MLP under SGD with momentum at lr 20 (about 1000x a healthy rate): the loss is thrown up by the third
    step, so the early rule and the per-step growth rule both see it."""
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.SGD(m.parameters(), lr=20.0, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4096, 16, generator=gen)
    y = (x @ torch.randn(16, 10, generator=gen)).argmax(1)
    guard = gg.Guard(m, opt, **{"console": False, **options})
    return (*fit(guard, m, opt, x, y, 64, steps, gen), guard)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_divergence_two_rules_see_in_the_first_steps_is_reported_once(seed: int) -> None:
    found, losses, _ = far_too_high(seed)
    assert max(losses[:EARLY_STEPS]) > LOSS_RISE * losses[0]  # the loop's own numbers: it diverged at once
    first = [d for d in found if d.kind == "exploding" and d.step < EARLY_STEPS]
    assert len(first) == 1 and "first steps" in first[0].message
    assert first[0].evidence["first_loss"] == pytest.approx(losses[0], rel=1e-5)


def test_the_ladder_still_hears_both_rules_of_one_early_event() -> None:
    # repair="auto" rolls back to the state at attach on an early divergence (its "early" key), silent or not.
    _, _, guard = far_too_high(0, steps=12, repair="auto")
    assert [a.kind for a in guard.actions if a.kind == "rollback"] == ["rollback"]

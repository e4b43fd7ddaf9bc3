import math

import numpy as np

from gradguard.detect.history import Ema, History


def test_ema_matches_reference_formula_and_skips_nonfinite() -> None:
    beta = 0.9
    xs = [1.0, 2.0, float("nan"), 4.0, 3.0, float("inf"), 10.0]
    ema = Ema(beta)
    mean = var = 0.0
    count = 0
    for x in xs:
        m0, s0, z = ema.push(x)
        assert (m0, s0) == (mean, math.sqrt(var))
        if count >= 2 and math.isfinite(x):
            assert math.isclose(z, (x - mean) / math.sqrt(var))
        if math.isfinite(x):  # reference: West / ZClip EMA recursions, by hand
            if count == 0:
                mean, var = x, 0.0
            else:
                d = x - mean
                mean, var = mean + (1 - beta) * d, beta * (var + (1 - beta) * d * d)
            count += 1
    assert (ema.mean, ema.var, ema.count) == (mean, var, 5)
    # 1, 2, 4, 3, 10 by hand: mean 1 -> 1.1 -> 1.39 -> 1.551 -> 2.3959
    assert math.isclose(ema.mean, 2.3959)


def test_history_trims_and_keeps_running_statistics() -> None:
    h = History(["a"], np.array([4.0]), np.zeros(1, dtype=bool), beta=0.5, keep=5)
    for start in (0, 4, 8):
        steps = np.arange(start, start + 4)
        h.append(steps, steps.astype(float) + 1, np.ones(4), np.ones(4, dtype=bool), np.full((4, 1), 2.0))
    assert list(h.steps) == [7, 8, 9, 10, 11] and h.grad.shape == (5, 1)
    assert list(h.finite_count) == [8, 9, 10, 11, 12] and h.grad_ema.count == 12
    assert h.baseline_total(before=2) is None and h.baseline_total(before=3) == 2.0  # median of 1, 2, 3
    assert h.baseline_total(before=100) == 5.5  # median of the first ten: 1..10
    np.testing.assert_allclose(h.rms_grad(slice(None)), np.full((5, 1), 1.0))  # 2 / sqrt(4)

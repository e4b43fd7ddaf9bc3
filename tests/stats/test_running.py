import math

import torch

from gradguard.stats.running import RunningMoments


def test_ema_matches_reference_formula_and_skips_nonfinite() -> None:
    beta = 0.9
    xs = [1.0, 2.0, float("nan"), 4.0, 3.0, float("inf"), 10.0]
    rm = RunningMoments(beta, torch.device("cpu"))
    mean = var = 0.0
    count = 0
    for x in xs:
        z = rm.zscore(torch.tensor(x)).item()
        if count >= 2 and var > 0 and math.isfinite(x):
            assert math.isclose(z, (x - mean) / math.sqrt(var), rel_tol=1e-5)
        rm.update(torch.tensor(x))
        if math.isfinite(x):  # reference: West / ZClip EMA recursions, written out by hand
            if count == 0:
                mean, var = x, 0.0
            else:
                d = x - mean
                mean = mean + (1 - beta) * d
                var = beta * (var + (1 - beta) * d * d)
            count += 1
        assert math.isclose(rm.mean.item(), mean, rel_tol=1e-6)
        assert math.isclose(rm.var.item(), var, rel_tol=1e-5, abs_tol=1e-9)
    assert rm.count.item() == 5


def test_state_dict_round_trip() -> None:
    a = RunningMoments(0.97, torch.device("cpu"))
    for x in (1.0, 5.0, 2.0):
        a.update(torch.tensor(x))
    b = RunningMoments(0.5, torch.device("cpu"))
    b.load_state_dict(a.state_dict())
    assert (b.beta, b.mean.item(), b.var.item(), b.count.item()) == (0.97, a.mean.item(), a.var.item(), 3.0)

import pytest
import torch
from torch import nn

from gradguard.stats.activations import ActivationSampler, active_units, relative_slope, saturated_fraction


def test_active_units_by_hand() -> None:
    out = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 2.0]])  # unit 0 never > 0
    assert active_units(out).tolist() == [0.0, 1.0, 1.0]
    fmap = torch.zeros(2, 3, 4, 4)
    fmap[1, 2, 3, 3] = 1.0  # only channel 2 fires, once
    assert active_units(fmap).tolist() == [0.0, 0.0, 1.0]


def test_saturated_fraction_by_hand() -> None:
    s = torch.sigmoid(torch.tensor([0.0, 7.0, -7.0, 1.0]))  # |x| > 6 is flat: sigmoid' < 1% of 0.25
    assert saturated_fraction(nn.Sigmoid(), s).item() == 0.5
    t = torch.tanh(torch.tensor([0.0, 4.0, -4.0, 1.0]))  # |x| > 3 is flat: tanh' < 0.01
    assert saturated_fraction(nn.Tanh(), t).item() == 0.5


@pytest.mark.parametrize("act, peak", [(nn.Sigmoid(), 0.25), (nn.Tanh(), 1.0), (nn.Softsign(), 1.0),
                                       (nn.Hardtanh(-2.0, 2.0), 1.0)])
def test_relative_slope_is_the_mean_derivative_over_its_peak(act: nn.Module, peak: float) -> None:
    x = (torch.randn(64, 32, generator=torch.Generator().manual_seed(0)) * 3).requires_grad_(True)
    y = act(x)
    (dydx,) = torch.autograd.grad(y.sum(), x)  # the oracle: autograd's derivative at every input
    torch.testing.assert_close(relative_slope(act, y), dydx.mean() / peak, rtol=1e-5, atol=1e-6)


def test_sampler_records_flat_fraction_and_slope_of_a_sigmoid() -> None:
    sig = nn.Sigmoid()
    sampler = ActivationSampler([("sig", sig)])
    sampler.arm()
    with torch.enable_grad():
        sig(torch.tensor([[0.0, 7.0, -7.0, 1.0]]))
    sampler.disarm()
    ((name, call, what, stats),) = sampler.act_records
    s = torch.sigmoid(torch.tensor([0.0, 7.0, -7.0, 1.0]))
    assert (name, call, what) == ("sig", 0, "saturated") and stats[0].item() == 0.5
    torch.testing.assert_close(stats[1], (4 * s * (1 - s)).mean())  # sigmoid' = s(1 - s), peak 1/4


def test_time_gradient_of_rnn_input_matches_autograd() -> None:
    rnn = nn.RNN(2, 4, batch_first=True)
    sampler = ActivationSampler([("rnn", rnn)])
    x = torch.randn(3, 20, 2)
    sampler.arm()
    out, _ = rnn(x)
    out[:, -1].sum().backward()
    sampler.disarm()
    ((name, early, late, steps),) = sampler.time_records
    # Oracle: the gradient of the same loss w.r.t. a copy of the input, by autograd.
    x2 = x.clone().requires_grad_(True)
    out2, _ = rnn(x2)
    (g,) = torch.autograd.grad(out2[:, -1].sum(), x2)
    per_t = g.square().sum(dim=(0, 2)).sqrt()
    assert name == "rnn" and steps == 20
    assert torch.allclose(early, per_t[:2].mean()) and torch.allclose(late, per_t[-2:].mean())
    assert not sampler.handles

import torch
from torch import nn

from gradguard.stats.activations import ActivationSampler, active_units, saturated_fraction


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

import torch
from torch import nn

from gradguard.stats.sentinel import locate


class Sqrt(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(x)


class Inline(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.log(self.a(x) - 100.0))  # NaN made between submodules


def test_locates_the_module_that_made_it() -> None:
    m = nn.Sequential(nn.Linear(3, 3), Sqrt(), nn.Linear(3, 1))
    with torch.no_grad():
        m[0].weight.fill_(-1.0)
        m[0].bias.zero_()
    origin = locate(m, (torch.ones(2, 3),), {})
    assert origin is not None and (origin.module, origin.reason) == ("1", "output")


def test_between_submodules_names_the_parent() -> None:
    m = nn.Sequential(nn.Linear(3, 3), Inline())
    origin = locate(m, (torch.randn(2, 3),), {})
    assert origin is not None and (origin.module, origin.reason) == ("1", "between")


def test_input_and_corrupted_parameters() -> None:
    m = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    assert locate(m, (torch.tensor([[float("nan"), 0.0, 0.0]]),), {}).reason == "input"
    with torch.no_grad():
        m[1].weight[0, 0] = float("inf")
    origin = locate(m, (torch.ones(1, 3),), {})
    assert origin is not None and (origin.module, origin.reason) == ("1", "parameters")
    assert locate(nn.Sequential(nn.Linear(3, 3)), (torch.ones(1, 3),), {}) is None


def test_replay_leaves_buffers_rng_and_hooks_unchanged() -> None:
    m = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Dropout(0.5), Sqrt())
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(4, 3)
    state = torch.get_rng_state()
    locate(m, (x,), {})
    assert torch.equal(torch.get_rng_state(), state)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in m.modules())

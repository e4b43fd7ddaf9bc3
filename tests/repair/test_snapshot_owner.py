"""What a Guard's rollback may put back when other optimizers train other parts of the model: only what its own
optimizer owns (its parameters, the buffers of the modules holding them, frozen parameters); with one optimizer
training everything, the whole state_dict. Oracles: the state_dict keys written out by hand, and a rollback that
leaves the other optimizer's parameters and buffers bitwise alone."""

from __future__ import annotations

import torch
from torch import nn

from gradguard.repair.ladder import Ladder
from gradguard.repair.snapshot import foreign_keys, owned_model_state


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2), nn.Linear(2, 2))


def test_the_keys_another_optimizer_owns() -> None:
    m = _model()
    for p in m[4].parameters():
        p.requires_grad_(False)  # frozen: no optimizer changes it, any rollback may put it back
    body = torch.optim.SGD([*m[0].parameters(), *m[1].parameters()], lr=0.1, momentum=0.9)
    head = torch.optim.Adam(m[3].parameters())
    bn = {"1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked"}
    assert foreign_keys(m, head) & set(m.state_dict()) == {"0.weight", "0.bias", *bn}
    assert foreign_keys(m, body) & set(m.state_dict()) == {"3.weight", "3.bias"}
    whole = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    state, partial = owned_model_state(m, whole)
    assert not partial and list(state) == list(m.state_dict())


def test_a_rollback_leaves_the_other_optimizers_parameters_and_buffers_alone() -> None:
    m = _model()
    body = torch.optim.SGD([*m[0].parameters(), *m[1].parameters(), *m[4].parameters()], lr=0.1, momentum=0.9)
    head = torch.optim.Adam(m[3].parameters(), lr=0.01)
    ladder = Ladder()
    ladder.take_snapshot(m, head, 0)
    saved_head = [p.detach().clone() for p in m[3].parameters()]
    for _ in range(3):
        for o in (body, head):
            o.zero_grad()
        m(torch.randn(16, 4)).square().mean().backward()
        body.step()
        head.step()
    other = {k: v.clone() for k, v in m.state_dict().items() if not k.startswith("3.")}
    action = ladder.rollback(m, head, 3)
    assert action is not None and action.detail["to_step"] == 0
    assert all(torch.equal(a, b) for a, b in zip(m[3].parameters(), saved_head))
    assert head.state_dict()["state"] == {}  # the head's Adam is back at its state before step 0
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in other.items())  # body, BatchNorm, last layer

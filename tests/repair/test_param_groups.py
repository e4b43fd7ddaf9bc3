"""optimizer.add_param_group after attach (unfreezing a backbone part way): the new parameters are watched and
guarded, and a rollback after the change works. Oracles: torch's own norms of the gradients, and the weights as
they were before a NaN step."""

from __future__ import annotations

import torch
from torch import nn

import gradguard as gg


def make() -> tuple[nn.Sequential, torch.optim.Optimizer]:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    for p in m[0].parameters():
        p.requires_grad_(False)  # the frozen "backbone"
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.05)
    return m, opt


def step(m: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, nan: bool = False) -> None:
    loss = nn.functional.mse_loss(m(x), y)
    opt.zero_grad()
    (loss * float("nan") if nan else loss).backward()
    opt.step()


def unfreeze(m: nn.Sequential, opt: torch.optim.Optimizer) -> None:
    """The frozen first layer joins training in a group of its own."""
    for p in m[0].parameters():
        p.requires_grad_(True)
    opt.add_param_group({"params": list(m[0].parameters()), "lr": 0.01})


def train_then_unfreeze(steps: int, **guard_kw: object) -> tuple[nn.Sequential, torch.optim.Optimizer, gg.Guard,
                                                                    torch.Tensor, torch.Tensor]:
    """``steps`` steps with the first layer frozen under a Guard, then that layer joins (add_param_group)."""
    m, opt = make()
    guard = gg.Guard(m, opt, console=False, log_every=5, **guard_kw)  # type: ignore[arg-type]
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    for _ in range(steps):
        step(m, opt, x, y)
    unfreeze(m, opt)
    return m, opt, guard, x, y


def test_new_group_is_measured_from_the_step_it_joins() -> None:
    m, opt, guard, x, y = train_then_unfreeze(7)
    want = []
    for _ in range(6):
        loss = nn.functional.mse_loss(m(x), y)
        opt.zero_grad()
        loss.backward()
        want.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad)
                                                          for p in m[0].parameters()])).item())
        opt.step()
    guard.close()
    h = guard.history
    assert h is not None and h.layers == ["0", "2", "4"]  # the unfrozen first layer is the earliest, not the last
    col = h.layers.index("0")
    got = h.grad[:, col]
    assert (got[:7] == -1.0).all()  # absent before it joined
    torch.testing.assert_close(torch.tensor(got[7:13], dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                               rtol=1e-5, atol=0)
    # the total norm now includes the new layer (clip_grad_norm_'s definition over every parameter)
    assert h.total[-1] > 0


def test_a_nan_gradient_in_the_new_group_is_skipped_and_a_rollback_still_works() -> None:
    m, opt, guard, x, y = train_then_unfreeze(5, repair="auto")
    step(m, opt, x, y)
    before = [p.detach().clone() for p in m.parameters()]
    # NaN only in the new layer's gradient: the old layers' gradients stay finite
    loss = nn.functional.mse_loss(m(x), y)
    opt.zero_grad()
    loss.backward()
    m[0].weight.grad[0, 0] = float("nan")
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))  # not applied
    assert any(a.kind == "skip_step" for a in guard.actions)
    # Keep injecting: repeated non-finite steps lead to a rollback, which must restore (not raise, not switch off)
    for _ in range(40):
        loss = nn.functional.mse_loss(m(x), y)
        opt.zero_grad()
        loss.backward()
        m[0].weight.grad[0, 0] = float("nan")
        opt.step()
    assert all(torch.isfinite(p).all() for p in m.parameters())
    assert not guard._wiring.failed
    # rolled back to the state at the change (step 5): the older snapshots cannot hold the new group
    assert [a.detail["to_step"] for a in guard.actions if a.kind == "rollback"][:1] == [5]
    guard.close()


def test_activations_of_an_unfrozen_backbone_are_sampled_and_judged() -> None:
    """Dead units in a layer that joins through add_param_group are found and tied to that layer: 12 of 16 units
    are given a bias of -50, so they never fire (75%, known by construction)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))
    with torch.no_grad():
        m[0].bias[:12] = -50.0
    for p in m[0].parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD(list(m[2].parameters()) + list(m[4].parameters()), lr=0.01)
    guard = gg.Guard(m, opt, console=False)
    for step in range(120):
        if step == 20:
            for p in m[0].parameters():
                p.requires_grad_(True)
            opt.add_param_group({"params": list(m[0].parameters())})
        x = torch.randn(32, 8)
        opt.zero_grad()
        (m(x) - x[:, :1]).square().mean().backward()
        opt.step()
    dead = [d for d in guard.diagnoses if d.kind == "dead_units"]
    assert dead and "0" in dead[0].layers and "75%" in dead[0].message
    guard.close()


def test_a_rollback_decided_between_add_param_group_and_the_next_step_leaves_everything_as_it_is() -> None:
    # The Guard adopts a new group at the next step, after reading what is pending: a rollback the ladder decides in
    # that read has only snapshots from before the group, which optimizer.load_state_dict refuses. It used to raise
    # there and switch the Guard off (found when an early exploding verdict preceded the change). Now no rollback:
    # the model and the optimizer are bitwise as they were, and guarding goes on.
    m, opt, guard, x, y = train_then_unfreeze(7, repair="auto")
    weights = [p.detach().clone() for p in m.parameters()]
    state = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in opt.state_dict()["state"].items()}
    ladder = guard._wiring.repairer.ladder
    assert ladder.rollback(m, opt, 7, initial=True) is None
    assert all(torch.equal(a, b) for a, b in zip(weights, m.parameters()))
    assert opt.state_dict()["state"].keys() == state.keys() and len(opt.param_groups) == 2
    step(m, opt, x, y, nan=True)  # still guarding: the NaN step is skipped, the new group included
    assert all(torch.isfinite(p).all() for p in m.parameters())
    assert not guard._wiring.failed
    guard.close()

"""The Guard attached to real loops: statistics against oracles, transparency, wrappers, state, logs, bad input."""

from __future__ import annotations

import copy
import gc
import json
import math
import warnings
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.stats.norms import ABSENT


class Branchy(nn.Module):
    """Two heads; ``aux`` is used only on even calls, so it has no gradient on odd steps."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.main = nn.Linear(8, 3)
        self.aux = nn.Linear(8, 3)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.body(x))
        self.calls += 1
        return self.main(h) + (self.aux(h) if self.calls % 2 == 1 else 0.0)


def _layer_oracle(model: nn.Module, layer: str) -> float:
    mod = dict(model.named_modules())[layer]
    grads = [p.grad for p in mod.parameters(recurse=False) if p.grad is not None]
    if not grads:
        return ABSENT
    return torch.linalg.vector_norm(torch.cat([g.double().flatten() for g in grads])).item()


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, guard_kw: dict | None,
           on_grads: Callable[[int], None] | None = None, seed: int = 0) -> gg.Guard | None:
    gen = torch.Generator().manual_seed(seed)
    guard = gg.Guard(model, opt, console=False, **guard_kw) if guard_kw is not None else None
    for step in range(steps):
        x = torch.randn(16, 6, generator=gen)
        loss = model(x).square().mean()
        if guard is not None:
            guard.observe_loss(loss)
        opt.zero_grad()
        loss.backward()
        if on_grads is not None:
            on_grads(step)
        opt.step()
    return guard


def test_statistics_match_oracles_every_step() -> None:
    model = Branchy()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    expected: list[dict[str, float]] = []
    weights: list[dict[str, torch.Tensor]] = []

    def record(step: int) -> None:
        expected.append({n: _layer_oracle(model, n) for n in ("body", "main", "aux")})
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})

    guard = _train(model, opt, 12, {"log_every": 5, "sample_every": 4}, record)
    h = guard.history
    assert h.layers == ["body", "main", "aux"]  # forward order
    assert list(h.steps) == list(range(12))
    for step, exp in enumerate(expected):
        for i, name in enumerate(h.layers):
            got = h.grad[step, i]
            assert math.isclose(got, exp[name], rel_tol=1e-5), (step, name, got, exp[name])
        present = [v for v in exp.values() if v != ABSENT]
        assert math.isclose(h.total[step], math.sqrt(sum(v * v for v in present)), rel_tol=1e-5)
    assert (h.grad[1::2, h.layers.index("aux")] == ABSENT).all()  # no gradient on odd steps: marked, not zero
    # Update-to-weight ratio on sampled steps 0, 4, 8: ||w_after - w_before|| per layer, from the test's copies.
    assert h.sample_steps == [0, 4, 8]
    for k, step in enumerate(h.sample_steps):
        for i, name in enumerate(h.layers):
            before = [weights[step][f"{name}.{p}"].double() for p in ("weight", "bias")]
            after = [weights[step + 1][f"{name}.{p}"].double() for p in ("weight", "bias")]
            w = torch.linalg.vector_norm(torch.cat([b.flatten() for b in before])).item()
            u = torch.linalg.vector_norm(torch.cat([(a - b).flatten() for a, b in zip(after, before)])).item()
            assert math.isclose(h.weight[k][i], w, rel_tol=1e-5)
            assert math.isclose(h.update[k][i], u, rel_tol=1e-4, abs_tol=1e-9)
    guard.close()


def test_running_moments_of_norm_and_loss_match_formula() -> None:
    model = Branchy()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = _train(model, opt, 30, {"ema_beta": 0.9, "log_every": 7})
    h = guard.history
    for series, mean_col, ema in ((h.total, h.mean, h.grad_ema), (h.loss, h.loss_mean, h.loss_ema)):
        mean = var = 0.0
        for i, x in enumerate(series):  # reference recursion written out by hand; mean_col is "before step i"
            if i > 0:
                assert math.isclose(mean_col[i], mean, rel_tol=1e-12)
            if i == 0:
                mean = x
            else:
                d = x - mean
                mean += 0.1 * d
                var = 0.9 * (var + 0.1 * d * d)
        assert math.isclose(ema.mean, mean, rel_tol=1e-12) and math.isclose(ema.var, var, rel_tol=1e-12)
    guard.close()


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    lambda p: torch.optim.Adam(p, lr=1e-2),
    lambda p: torch.optim.AdamW(p, lr=1e-2, foreach=True),
    lambda p: torch.optim.AdamW(p, lr=1e-2, fused=True),
    lambda p: torch.optim.Adam(p, lr=1e-2, fused=True),
    lambda p: torch.optim.SGD(p, lr=0.05, fused=True),
    lambda p: torch.optim.RMSprop(p, lr=1e-3),
], ids=["sgd", "adam", "adamw-foreach", "adamw-fused", "adam-fused", "sgd-fused", "rmsprop"])
def test_guard_leaves_training_bitwise_unchanged(make_opt: Callable) -> None:
    torch.manual_seed(3)
    plain = Branchy()
    guarded = copy.deepcopy(plain)
    _train(plain, make_opt(plain.parameters()), 15, None)
    opt = make_opt(guarded.parameters())
    guard = _train(guarded, opt, 15, {"log_every": 4, "sample_every": 3})
    assert len(guard.history.steps) == 15
    guard.close()
    for (n, a), b in zip(plain.named_parameters(), guarded.parameters()):
        assert torch.equal(a, b), n
    # Closed: no hook of ours is left on the optimizer or on any module.
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    for m in guarded.modules():
        assert not m._forward_pre_hooks and not m._forward_hooks and not m._backward_hooks
    # ... and training after close goes on exactly as without gradguard.
    _train(plain, make_opt(plain.parameters()), 3, None, seed=9)
    _train(guarded, make_opt(guarded.parameters()), 3, None, seed=9)
    for a, b in zip(plain.parameters(), guarded.parameters()):
        assert torch.equal(a, b)


def test_param_groups_frozen_and_tied() -> None:
    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(30, 8)
            self.frozen = nn.Linear(8, 8).requires_grad_(False)
            self.body = nn.Linear(8, 8)
            self.head = nn.Linear(8, 30)
            self.head.weight = self.embed.weight

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.body(self.frozen(self.embed(t)))))

    m = LM()
    opt = torch.optim.AdamW([{"params": [m.body.weight, m.body.bias], "lr": 1e-3},
                             {"params": [m.embed.weight, m.head.bias], "lr": 1e-2}])
    guard = gg.Guard(m, opt, console=False)
    t = torch.randint(0, 30, (4, 5))
    loss = nn.functional.cross_entropy(m(t).flatten(0, 1), t.flatten())
    opt.zero_grad()
    loss.backward()
    expected_total = nn.utils.clip_grad_norm_(m.parameters(), float("inf")).item()  # dedups the tied weight
    opt.step()
    h = guard.history
    assert h.layers == ["embed", "body", "head"]  # forward order; frozen layer not tracked
    assert math.isclose(h.total[0], expected_total, rel_tol=1e-5)
    guard.close()


def test_mixed_precision_parameters() -> None:
    m = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 8).to(torch.bfloat16), nn.Linear(8, 3).to(torch.float16))

    class Cast(nn.Module):
        def __init__(self, inner: nn.Sequential) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.inner[0](x)
            h = self.inner[1](h.bfloat16())
            return self.inner[2](h.half()).float()

    model = Cast(m)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    grads: list[float] = []
    guard = _train(model, opt, 3, {}, lambda s: grads.append(
        [_layer_oracle(model, n) for n in ("inner.0", "inner.1", "inner.2")]))
    h = guard.history
    np.testing.assert_allclose(h.grad, np.array(grads), rtol=1e-3)
    guard.close()


def test_dataparallel_and_compile_names_without_prefix() -> None:
    base = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    for wrapped in (nn.DataParallel(base), torch.compile(base, backend="eager")):
        opt = torch.optim.SGD(wrapped.parameters(), lr=0.01)
        guard = _train(wrapped, opt, 3, {})
        h = guard.history
        assert h.layers == ["0", "2"] and len(h.steps) == 3 and np.isfinite(h.total).all()
        guard.close()
        assert not wrapped._forward_pre_hooks and not opt._optimizer_step_pre_hooks


def test_ddp_single_process(tmp_path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        base = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
        ddp = nn.parallel.DistributedDataParallel(base)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
        grads: list[list[float]] = []
        guard = _train(ddp, opt, 3, {}, lambda s: grads.append([_layer_oracle(base, n) for n in ("0", "2")]))
        h = guard.history
        assert h.layers == ["0", "2"]
        np.testing.assert_allclose(h.grad, np.array(grads), rtol=1e-5)
        guard.close()
        # DDP's reducer holds the process group: free it while the group is alive (freeing it after
        # destroy_process_group can deadlock in gloo's destructor, seen once here).
        del guard, opt, ddp
        gc.collect()
    finally:
        dist.destroy_process_group()


def test_no_optimizer_check_by_hand() -> None:
    m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    guard = gg.Guard(m, None, console=False)
    for _ in range(3):
        m.zero_grad()
        m(torch.randn(5, 4)).sum().backward()
        assert guard.check() == []
    want = [_layer_oracle(m, "0"), _layer_oracle(m, "1")]
    np.testing.assert_allclose(guard.history.grad[-1], want, rtol=1e-5)
    guard.close()
    with pytest.raises(RuntimeError, match="closed"):
        guard.check()


def test_state_dict_resume_continues_running_statistics() -> None:
    def run(split: int | None) -> gg.Guard:
        torch.manual_seed(5)
        m = Branchy()
        opt = torch.optim.SGD(m.parameters(), lr=0.02)
        gen = torch.Generator().manual_seed(1)
        guard = gg.Guard(m, opt, console=False)
        for step in range(40):
            if split is not None and step == split:
                state = guard.state_dict()
                guard.close()
                guard = gg.Guard(m, opt, console=False)
                guard.load_state_dict(state)
            loss = m(torch.randn(8, 6, generator=gen)).square().mean()
            guard.observe_loss(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
        guard.check()  # read pending statistics
        return guard

    full, resumed = run(None), run(25)
    assert resumed.step == full.step == 40
    hf, hr = full.history, resumed.history
    assert list(hr.steps) == list(range(25, 40))
    for a, b in ((hf.grad_ema, hr.grad_ema), (hf.loss_ema, hr.loss_ema)):
        assert math.isclose(a.mean, b.mean, rel_tol=1e-9) and math.isclose(a.var, b.var, rel_tol=1e-9)
        assert a.count == b.count == 40
    assert hf.baseline_total(40) == hr.baseline_total(40) and hr.finite_count[-1] == 40
    np.testing.assert_array_equal(np.stack(hf.first_grads), np.stack(hr.first_grads))
    assert json.loads(json.dumps(full.state_dict())) == full.state_dict()  # plain values, JSON round trip
    with pytest.raises(ValueError, match="other layers"):
        gg.Guard(nn.Linear(2, 2), None, console=False).load_state_dict(full.state_dict())


def test_log_dir_schema_and_line_flushing(tmp_path) -> None:
    m = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    guard = gg.Guard(m, opt, console=False, log_dir=tmp_path, log_every=5)
    gen = torch.Generator().manual_seed(0)
    for step in range(12):
        loss = m(torch.randn(8, 6, generator=gen)).square().mean()
        if step == 11:
            loss = loss * float("nan")
        guard.observe_loss(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    # Read while the Guard is still open: every line is already on disk.
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["schema"] == 1 and [lay["name"] for lay in meta["layers"]] == ["0", "2"]
    stats = [json.loads(line) for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    assert [s["step"] for s in stats] == [4, 9, 11]  # every log_every steps; step 11 drained at once (NaN)
    assert set(stats[0]["grad_norm"]) == {"0", "2"} and stats[0]["loss"] is not None
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert events[0]["type"] == "diagnosis" and events[0]["kind"] == "nonfinite" and events[0]["step"] == 11
    assert stats[-1]["loss"] == "nan"  # NaN is written, not hidden
    guard.close()


def test_bad_input() -> None:
    m = nn.Linear(3, 1)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="repair must be"):
        gg.Guard(m, opt, repair="fix-it")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pass the optimizer"):
        gg.Guard(m, None, repair="auto")
    with pytest.raises(TypeError, match="nn.Module"):
        gg.Guard(opt, opt)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="log_every"):
        gg.Guard(m, opt, log_every=0)
    guard = gg.Guard(m, opt, console=False)
    with pytest.raises(TypeError, match="loss tensor"):
        guard.observe_loss("0.5")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scalar"):
        guard.observe_loss(torch.ones(3))
    guard.observe_loss(0.5)  # a Python number is fine
    guard.close()
    guard.close()  # twice is fine
    guard.observe_loss(torch.tensor(1.0))  # documented no-op after close
    assert guard.diagnoses == []


def test_internal_failure_switches_off_and_training_continues(monkeypatch) -> None:
    m = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 3))
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    guard = gg.Guard(m, opt, console=False)

    def boom(self, tensors, *args):
        raise RuntimeError("boom")

    # Every norm gradguard takes fails: the device fold and the CPU host path's Python fold alike.
    monkeypatch.setattr("gradguard.stats.norms.LayerNorms.__call__", boom)
    monkeypatch.setattr("gradguard.stats.norms.LayerNorms.host_with_total", boom)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            m(torch.randn(4, 6)).sum().backward()
            opt.step()
    internal = [w for w in caught if issubclass(w.category, gg.GuardInternalWarning)]
    assert len(internal) == 1 and "boom" in str(internal[0].message)
    assert not opt._optimizer_step_pre_hooks and not m._forward_pre_hooks
    guard.close()


def test_hot_path_never_reads_device_values(monkeypatch) -> None:
    """Between host reads, the hooks only launch tensor work: any value read raises here."""
    m = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    guard = gg.Guard(m, opt, console=False, log_every=1000, sample_every=2, nonfinite_check="deferred")

    def forbidden(*a, **k):
        raise AssertionError("host read in the per-step path")

    for _ in range(6):
        loss = m(torch.randn(4, 6)).square().mean()
        loss.backward()
        with monkeypatch.context() as mp:
            for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__",
                         "nonzero"):
                mp.setattr(torch.Tensor, name, forbidden)
            guard.observe_loss(loss)
            guard._pre_step_hook(opt, (), {})
            guard._post_step_hook(opt, (), {})
        opt.zero_grad()
    assert len(guard.history.steps) == 6
    guard.close()

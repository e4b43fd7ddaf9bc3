"""gradguard.inference and mode_table: exact restore, grad modes, Monte-Carlo dropout, outputs equal to
model.eval() + torch.no_grad() (the oracle), compiled models and a transformers model from a config."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradguard as gg


class Custom(nn.Module):
    """Reads self.training in its own forward, and overrides train() with a side effect."""

    def __init__(self, d_in: int = 8) -> None:
        super().__init__()
        self.lin = nn.Linear(d_in, 4)
        self.train_calls = 0

    def train(self, mode: bool = True) -> Custom:
        self.train_calls += 1
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * (2.0 if self.training else 1.0)


def net() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), Custom(), nn.Linear(4, 2))


def flags(m: nn.Module) -> list[bool]:
    return [x.training for x in m.modules()]


def test_eval_and_inference_mode_inside_exact_restore_outside() -> None:
    m = net()
    m[1].eval()  # a user-frozen BatchNorm stays in eval after the block
    before = flags(m)
    calls = m[4].train_calls
    with gg.inference(m):
        assert not any(flags(m))
        assert torch.is_inference_mode_enabled() and not torch.is_grad_enabled()
    assert flags(m) == before and before[2] is False
    assert m[4].train_calls == calls  # the user's train() override was not run


def test_restore_when_nested_and_on_exception() -> None:
    m = net()
    m[3].eval()
    before = flags(m)
    with pytest.raises(RuntimeError, match="boom"), gg.inference(m):
        with gg.inference(m, grad="no_grad"):
            assert not any(flags(m)) and not torch.is_grad_enabled()
        assert not any(flags(m))  # the outer block's eval state is back after the inner one
        raise RuntimeError("boom")
    assert flags(m) == before and torch.is_grad_enabled()
    with gg.inference(m, grad="no_grad"):  # outputs may feed autograd later: no_grad, not inference_mode
        assert not torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


def test_decorator_and_recursion() -> None:
    m = net()
    before = flags(m)

    @gg.inference(m)
    def predict(x: torch.Tensor, depth: int) -> torch.Tensor:
        assert not any(flags(m))
        return predict(x, depth - 1) if depth else m(x)

    out = predict(torch.randn(3, 4), 2)
    assert flags(m) == before and not out.requires_grad


def test_outputs_equal_eval_plus_no_grad_and_are_deterministic() -> None:
    torch.manual_seed(0)
    m = net()
    x = torch.randn(5, 4)
    m.train()
    m(torch.randn(16, 4))  # give BatchNorm running statistics
    m.eval()
    with torch.no_grad():
        want = m(x)  # the oracle
    m.train()
    with gg.inference(m):
        a, b = m(x), m(x)
    assert torch.equal(a, want) and torch.equal(b, want)
    with gg.inference(m):
        single = m(x[:1])  # a batch of one works in eval (in training BatchNorm would raise)
    assert torch.allclose(single, want[:1], atol=1e-6)  # same values (a 1-row matmul may round differently)


def test_monte_carlo_dropout_keeps_batchnorm_in_eval() -> None:
    torch.manual_seed(0)
    m = net()
    x = torch.randn(5, 4)
    stats = m[1].running_mean.clone()
    with gg.inference(m, keep_training=nn.Dropout):
        assert m[3].training and not m[1].training and not m[4].training
        a, b = m(x), m(x)
    assert not torch.equal(a, b)  # dropout samples differ
    assert torch.equal(m[1].running_mean, stats)  # BatchNorm untouched
    with gg.inference(m, keep_training=lambda name, mod: name in ("1", "3")):
        assert m[3].training and not m[1].training  # BatchNorm is never kept in training
    with gg.inference(m, keep_training=[m[3]]):
        assert m[3].training
    assert all(flags(m))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="grad must be"):
        gg.inference(net(), grad="off")
    with pytest.raises(TypeError, match="nn.Module"):
        gg.inference("model")  # type: ignore[arg-type]


def test_compiled_model() -> None:
    m = net()
    compiled = torch.compile(m, backend="eager")
    before = flags(m)
    x = torch.randn(3, 4)
    m.eval()
    with torch.no_grad():
        want = m(x)
    m.train()
    with gg.inference(compiled):
        got = compiled(x)
    assert torch.allclose(got, want) and flags(m) == before and compiled.training


def test_mode_table_by_behaviour() -> None:
    m = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.1), nn.LSTM(8, 8, num_layers=2, dropout=0.2),
                      nn.InstanceNorm1d(8), Custom(), nn.RReLU())  # not run: profiles only
    m[1].eval()
    rows = {r.name: r for r in gg.mode_table(m)}
    assert set(rows) == {"", "1", "2", "3", "5", "6"}  # Linear and InstanceNorm without running stats are plain
    assert rows["1"].mutates_state_in_training and not rows["1"].training
    assert rows["2"].stochastic_in_training and rows["3"].stochastic_in_training and rows["6"].stochastic_in_training
    assert rows["5"].changes_in_eval and not rows["5"].stochastic_in_training  # found by reading its code
    assert "BatchNorm1d" in str(gg.mode_table(m))
    assert gg.mode_table(m).to_dicts()[1]["name"] == "1"
    assert len(gg.mode_table(m, all_modules=True)) == 9  # every module: root, 7 children, Custom.lin


def test_transformers_model_from_config() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32)
    model = transformers.BertModel(cfg)
    rows = gg.mode_table(model)
    assert sum(r.stochastic_in_training for r in rows) >= 5  # embedding, attention and output dropouts
    ids = torch.randint(0, 100, (2, 10))
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids).last_hidden_state
    model.train()
    with gg.inference(model):
        got = model(input_ids=ids).last_hidden_state
    assert torch.allclose(got, want) and model.training


def test_keep_training_container_reaches_children_and_a_failing_predicate_changes_nothing() -> None:
    m = nn.Sequential(nn.Linear(4, 4), nn.ModuleList([nn.Dropout(0.5), nn.Linear(4, 4)]))
    with gg.inference(m, keep_training=m[1]):
        assert m[1][0].training and m[1][1].training and not m[0].training
    m[0].eval()
    before = flags(m)

    def broken(name: str, mod: nn.Module) -> bool:
        if name == "1.0":
            raise RuntimeError("bad predicate")
        return False

    with pytest.raises(RuntimeError, match="bad predicate"), gg.inference(m, keep_training=broken):
        pass
    assert flags(m) == before and torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    from gradguard.modes import DELIBERATE_TRAINING

    assert DELIBERATE_TRAINING == {}  # nothing left marked as kept-in-training


def test_dataparallel_wrapper_flag_is_restored() -> None:
    inner = net()
    dp = nn.DataParallel(inner)
    dp.train()
    inner[1].eval()
    before = [dp.training, *flags(inner)]
    with gg.inference(dp):
        assert not dp.training and not any(flags(inner))
    assert [dp.training, *flags(inner)] == before

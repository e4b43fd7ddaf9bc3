"""Each mode check fires on its pitfall and stays silent on correct code."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradguard as gg


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 16)
        self.bn = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(torch.relu(self.bn(self.fc(x)))))


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, guard: gg.Guard, n: int = 3) -> None:
    for _ in range(n):
        loss = model(torch.randn(8, 6)).square().mean()
        guard.observe_loss(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()


def setup(model: nn.Module | None = None) -> tuple[nn.Module, torch.optim.Optimizer, gg.Guard]:
    m = model or Net()
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    return m, opt, gg.Guard(m, opt, console=False)


def kinds(g: gg.Guard) -> list[str]:
    return [d.kind for d in g.diagnoses]


def test_validation_under_no_grad_without_eval() -> None:
    m, opt, g = setup()
    train_steps(m, opt, g)
    stats = m.bn.running_mean.clone()
    with torch.no_grad():
        m(torch.randn(4, 6))  # the classic mistake: no_grad but still in training mode
    assert not torch.equal(m.bn.running_mean, stats)  # the oracle: the statistics really moved
    by = {d.kind: d for d in g.diagnoses}
    assert set(by) == {"train_mode_inference", "inference_mutates_state"}
    assert by["train_mode_inference"].layers == ["bn", "drop"] and by["train_mode_inference"].step == 3
    assert "dropout is active" in by["train_mode_inference"].message.lower()
    assert "batchnorm normalises with this batch's statistics" in by["train_mode_inference"].message.lower()
    assert by["inference_mutates_state"].layers == ["bn"]
    assert "overwriting BatchNorm running statistics" in by["inference_mutates_state"].message
    assert {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"} <= set(
        by["inference_mutates_state"].message.replace("'", " ").split())
    with torch.no_grad():
        m(torch.randn(4, 6))
    assert len(g.diagnoses) == 2  # reported once
    g.close()


def test_correct_loops_are_silent() -> None:
    m, opt, g = setup()
    for _ in range(3):
        train_steps(m, opt, g)
        with gg.inference(m):
            m(torch.randn(4, 6))
        m.eval()
        with torch.no_grad():
            m(torch.randn(4, 6))
        m.train()
        with gg.inference(m, keep_training=nn.Dropout):  # Monte-Carlo dropout, on purpose
            m(torch.randn(4, 6))
    assert g.diagnoses == []
    g.close()


class SloppyDropout(nn.Module):
    """F.dropout left at its default training=True: random even in eval."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.dropout(self.fc(x), 0.5)


class SloppyAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(6, 18)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).view(1, 1, x.shape[0], 18).chunk(3, dim=-1)  # the batch rows attend to each other
        return nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.2).view(x.shape[0], 6)


@pytest.mark.parametrize("sloppy", [SloppyDropout, SloppyAttention])
def test_eval_forward_drawing_random_numbers_is_named(sloppy: type[nn.Module]) -> None:
    m = nn.Sequential(nn.Linear(6, 6), sloppy(), nn.Linear(6, 2))
    m, opt, g = setup(m)
    x = torch.randn(4, 6)
    with gg.inference(m):
        a, b = m(x), m(x)
    assert not torch.equal(a, b)  # the oracle: eval outputs really are random
    (d,) = g.diagnoses
    assert d.kind == "stochastic_inference" and d.layers == ["1"]
    # a dropout left on is a bug, whichever function drew: an error, the function named
    assert d.severity == "error" and ("(dropout)" if sloppy is SloppyDropout else
                                      "(scaled_dot_product_attention)") in d.message
    g.close()


def test_a_sampler_in_eval_is_a_warning_naming_the_draw() -> None:
    class Sampler(nn.Module):  # a noise layer / a VAE's reparameterisation: samples in eval, maybe by design
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + torch.randn_like(x) * x.new_ones(()).normal_()

    m = nn.Sequential(nn.Linear(6, 6), Sampler(), nn.Linear(6, 2))
    m, opt, g = setup(m)
    with gg.inference(m):
        a, b = m(torch.ones(4, 6)), m(torch.ones(4, 6))
    assert not torch.equal(a, b)  # the oracle: eval outputs really are random
    (d,) = g.diagnoses
    assert d.kind == "stochastic_inference" and d.layers == ["1"] and d.severity == "warning"
    assert "sampled random numbers in '1' (randn_like, normal_)" in d.message
    assert "guard.mark_stochastic(module)" in d.remedies[0] and "--stochastic '1'" in d.remedies[0]
    g.close()


def test_optimizer_training_a_model_left_in_eval() -> None:
    m, opt, g = setup()
    m.eval()  # e.g. loaded for evaluation, then fine-tuned
    train_steps(m, opt, g)
    (d,) = g.diagnoses
    assert d.kind == "eval_mode_training" and d.layers == ["bn", "drop"] and d.step == 0
    assert "dropout is off" in d.message.lower() and d.severity == "warning"
    g.close()


def test_deliberately_frozen_batchnorm_is_silent() -> None:
    m, opt, g = setup()
    m.bn.eval()
    m.bn.requires_grad_(False)  # frozen statistics and affine: a fine-tuning choice
    train_steps(m, opt, g)
    assert g.diagnoses == []
    g.close()
    m2, opt2, g2 = setup()
    m2.bn.eval()  # trainable affine, statistics frozen: silent once the user says so
    g2.mark_frozen(m2.bn)
    train_steps(m2, opt2, g2)
    assert g2.diagnoses == []
    g2.close()
    m3, opt3, g3 = setup()
    m3.bn.eval()
    train_steps(m3, opt3, g3)
    assert [(d.kind, d.layers) for d in g3.diagnoses] == [("eval_mode_training", ["bn"])]
    g3.close()


class Cache(nn.Module):
    """Keeps a running max of its inputs in a buffer, in every mode: state changes during evaluation."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.register_buffer("seen_max", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen_max.copy_(torch.maximum(self.seen_max, x.detach().max()))
        return self.fc(x)


def test_custom_buffer_changed_by_eval_forward() -> None:
    m = nn.Sequential(Cache(), nn.Linear(6, 2))
    m, opt, g = setup(m)
    train_steps(m, opt, g)
    assert g.diagnoses == []  # changing state while training is fine
    with gg.inference(m, grad="no_grad"):
        m(torch.randn(3, 6) + 10)
    (d,) = g.diagnoses
    assert d.kind == "inference_mutates_state" and d.layers == ["0"] and "'0.seen_max'" in d.message
    g.close()


def test_compiled_and_transformers_models() -> None:
    m = Net()
    compiled = torch.compile(m, backend="eager")
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    g = gg.Guard(compiled, opt, console=False)
    train_steps(compiled, opt, g, 2)
    with torch.no_grad():
        compiled(torch.randn(4, 6))
    assert "train_mode_inference" in kinds(g)
    g.close()

    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32)
    bert = transformers.BertModel(cfg)
    opt = torch.optim.AdamW(bert.parameters(), lr=1e-4)
    g = gg.Guard(bert, opt, console=False)
    ids = torch.randint(0, 100, (2, 10))
    for _ in range(2):
        loss = bert(input_ids=ids).last_hidden_state.square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with gg.inference(bert):
        bert(input_ids=ids)
    assert g.diagnoses == []  # training in train mode and evaluating in eval mode: silent
    with torch.no_grad():
        bert(input_ids=ids)
    (d,) = g.diagnoses
    assert d.kind == "train_mode_inference" and "embeddings.dropout" in d.layers and len(d.layers) >= 5
    g.close()


def test_spectral_norm_vectors_and_a_guard_without_optimizer() -> None:
    from torch.nn.utils.parametrizations import spectral_norm

    m = nn.Sequential(spectral_norm(nn.Linear(6, 6)), nn.Linear(6, 2))
    g = gg.Guard(m, None, console=False)  # no optimizer: the mode checks still watch forwards
    u = m[0].parametrizations.weight[0]._u.clone()
    with torch.no_grad():
        m(torch.randn(3, 6))  # training mode: the power iteration updates _u and _v
    assert not torch.equal(u, m[0].parametrizations.weight[0]._u)  # the oracle
    by = {d.kind: d for d in g.diagnoses}
    assert "'0.parametrizations.weight.0._u'" in by["inference_mutates_state"].message
    assert by["train_mode_inference"].layers == ["0.parametrizations.weight.0"]  # found by reading its code
    g.close()


def test_layers_that_compute_the_same_in_both_modes_are_not_flagged() -> None:
    m = nn.Sequential(nn.Linear(6, 6), nn.Dropout(0.0), nn.LayerNorm(6), nn.Linear(6, 2))
    m, opt, g = setup(m)
    train_steps(m, opt, g)
    with torch.no_grad():
        m(torch.randn(4, 6))  # training mode, but nothing here depends on it
    rnn = nn.LSTM(6, 6, num_layers=2, dropout=0.0)
    assert [r.name for r in gg.mode_table(rnn)] == [""]  # only the root row: the LSTM has no dropout
    assert g.diagnoses == []
    g.close()


def test_frozen_backbone_in_eval_with_a_training_head_is_training() -> None:
    class TwoPart(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Dropout(0.2))
            self.head = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.backbone(x))

    m = TwoPart()
    m.backbone.requires_grad_(False)
    opt = torch.optim.SGD(m.head.parameters(), lr=0.01)
    g = gg.Guard(m, opt, console=False)
    m.eval()
    m.head.train()  # fine-tune the head only; the frozen backbone stays in eval on purpose
    train_steps(m, opt, g)
    assert g.diagnoses == []  # the head's BatchNorm updating during training is not an "inference" change
    g.close()


def test_reentrant_checkpoint_of_the_root_is_not_an_evaluation() -> None:
    from torch.utils.checkpoint import checkpoint

    m = Net()
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    g = gg.Guard(m, opt, console=False)
    for _ in range(2):
        x = torch.randn(8, 6, requires_grad=True)
        loss = checkpoint(m, x, use_reentrant=True).square().mean()  # forward runs under no_grad
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert g.diagnoses == []
    g.close()


def test_monte_carlo_dropout_by_hand_is_information_and_marked_sampling_is_silent() -> None:
    m, opt, g = setup()
    train_steps(m, opt, g)
    m.eval()
    m.drop.train()  # MC dropout without gradguard.inference
    with torch.no_grad():
        m(torch.randn(4, 6))
    (d,) = g.diagnoses
    assert d.kind == "train_mode_inference" and d.severity == "info" and "keep_training" in d.message
    g.close()

    class Sampler(nn.Module):  # a VAE-style sampler: random in eval on purpose
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + torch.randn_like(x)

    m2 = nn.Sequential(nn.Linear(6, 6), Sampler())
    g2 = gg.Guard(m2, None, console=False, stochastic=[m2[1]])
    with gg.inference(m2):
        for _ in range(3):
            m2(torch.randn(2, 6))
    assert g2.diagnoses == []
    g2.close()


def test_stochastic_eval_replays_once_not_per_forward(monkeypatch) -> None:
    import gradguard.detect.mode_watcher as guard_module

    calls = []
    real = guard_module.locate_rng
    monkeypatch.setattr(guard_module, "locate_rng", lambda *a: calls.append(1) or real(*a))
    m = nn.Sequential(nn.Linear(6, 6), SloppyDropout(), nn.Linear(6, 2))
    g = gg.Guard(m, None, console=False)
    with gg.inference(m):
        for _ in range(20):
            m(torch.randn(4, 6))
    assert len(calls) == 1 and [d.layers for d in g.diagnoses] == [["1"]]
    g.close()

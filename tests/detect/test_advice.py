"""Remedies fit the model: real small models driven into each condition, and hand-built diagnoses through
``advise``. Each test says what the advice must say for that model and what it must not."""

from __future__ import annotations

import math

import torch
from torch import nn

import gradguard as gg
from gradguard.demo_data import Recurrent, adding_batch
from gradguard.detect import advice, exploding, nonfinite, units, vanishing
from gradguard.detect.advice import ModelFacts, advise, model_facts

SWAP = "instead of sigmoid/tanh"  # the generic "use a ReLU-family activation" remedy
GATED = "instead of a plain RNN"  # the generic "use a gated recurrent layer" remedy
TURN_ON_REPAIR = "Guard(model, optimizer, repair='auto')"


def relu_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


def train_relu(lr: float = 0.05, steps: int = 180, spike_at: int | None = None, nan_at: int | None = None,
               **guard: object) -> gg.Guard:
    """A ReLU MLP on a linearly separable 10-class problem; at ``spike_at`` one batch is scaled 1000x (a corrupted
    batch), at ``nan_at`` one input is NaN."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x_all = torch.randn(512, 32, generator=gen)
    y_all = (x_all @ torch.randn(32, 10, generator=gen)).argmax(1)
    model = relu_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    with gg.Guard(model, opt, console=False, **guard) as g:  # type: ignore[arg-type]
        for i in range(steps):
            idx = torch.randint(0, 512, (64,), generator=gen)
            x = x_all[idx] * (1000.0 if i == spike_at else 1.0)
            if i == nan_at:
                x = x.clone()
                x[0, 0] = math.nan
            loss = nn.functional.cross_entropy(model(x), y_all[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return g


def train_adding(cell: str, steps: int) -> gg.Guard:
    """The adding problem at T=100 (Hochreiter & Schmidhuber): the start of the sequence matters."""
    torch.manual_seed(0)
    model = Recurrent(cell)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    with gg.Guard(model, opt, console=False) as g:
        for _ in range(steps):
            x, y = adding_batch(32, 100, gen)
            loss = nn.functional.mse_loss(model(x), y)
            g.observe_loss(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return g


def first(g: gg.Guard, kind: str) -> gg.Diagnosis:
    found = [d for d in g.diagnoses if d.kind == kind]
    assert found, [(d.step, d.kind) for d in g.diagnoses]
    return found[0]


def said(d: gg.Diagnosis) -> str:
    return " | ".join(d.remedies)


# ------------------------------------------------------------------------------------------------ real models


def test_relu_units_that_died_after_an_explosion_name_it_as_the_cause() -> None:
    # Control: the same run without the corrupted batch kills no unit and explodes nowhere.
    calm = train_relu()
    assert not [d for d in calm.diagnoses if d.kind in ("dead_units", "exploding")]
    g = train_relu(spike_at=80)
    boom, dead = first(g, "exploding"), first(g, "dead_units")
    assert boom.step == 80 and dead.step > boom.step
    assert dead.remedies[0].startswith("these units died after the explosion at step 80: fix the explosion first")
    assert "after the explosion at step 80" in dead.message
    assert SWAP not in said(dead) and "LeakyReLU" in said(dead)  # a ReLU net: keep a gradient below zero
    for d in g.diagnoses:  # the explosion itself has no cause named
        assert d is dead or "after the explosion" not in d.message


def test_relu_net_is_not_told_to_swap_sigmoid_and_vanishing_behind_dead_units_names_them() -> None:
    g = train_relu(lr=1.0, steps=200)  # far too high: units die, then the layers below them get no gradient
    vanish = first(g, "vanishing")
    dead = [d for d in g.diagnoses if d.kind == "dead_units" and d.step <= vanish.step][-1]  # the latest before
    assert SWAP not in said(vanish) and "ReLU-family" not in said(vanish)
    assert vanish.remedies[0].startswith(f"the gradient vanishes behind the dead units reported at step {dead.step}")
    assert f"in '{dead.layers[0]}'" in vanish.message


def test_sigmoid_mlp_is_told_to_swap_its_sigmoids() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*[x for _ in range(6) for x in (nn.Linear(16, 16), nn.Sigmoid())], nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with gg.Guard(model, opt, console=False) as g:
        for _ in range(150):
            loss = nn.functional.mse_loss(model(torch.randn(32, 16)), torch.randn(32, 4))
            g.observe_loss(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
    d = first(g, "vanishing")
    assert d.remedies[0].startswith("use a ReLU-family activation (ReLU, LeakyReLU, GELU) instead of the model's "
                                    "Sigmoid in hidden layers")
    assert "tanh" not in d.remedies[0].split(":")[0]  # no tanh in this model


def test_lstm_is_not_told_to_use_a_gated_layer() -> None:
    d = first(train_adding("lstm", 130), "vanishing")
    assert d.layers == ["rnn"] and "through time" in d.message
    assert GATED not in said(d) and "plain" not in said(d)
    assert d.remedies[0].startswith("'rnn' is an LSTM already: set its forget-gate bias to 1")
    assert "identity" not in said(d)  # IRNN is for a plain RNN


def test_tanh_rnn_is_told_to_use_a_gated_layer_instead_of_its_rnn() -> None:
    d = first(train_adding("rnn", 130), "vanishing")
    assert d.layers == ["rnn"]
    assert d.remedies[0] == "use a gated recurrent layer (nn.LSTM or nn.GRU) instead of the plain nn.RNN 'rnn'"
    assert "forget-gate" not in d.remedies[0]


def test_nonfinite_advice_does_not_say_to_turn_on_repair_when_it_is_on() -> None:
    off = first(train_relu(steps=80, nan_at=60), "nonfinite")
    assert TURN_ON_REPAIR in said(off)  # control: with repair off, it is the first thing to suggest
    on = first(train_relu(steps=80, nan_at=60, repair="auto"), "nonfinite")
    assert TURN_ON_REPAIR not in said(on)
    assert on.remedies[-1].startswith("repair='auto' is on")
    assert any("epsilon" in r for r in on.remedies)  # the cause is still to be fixed


def test_exploding_advice_with_clipping_on_does_not_say_to_start_clipping() -> None:
    g = train_relu(steps=100, spike_at=80, clip=1.0)
    d = first(g, "exploding")
    assert exploding.REMEDIES[1] not in d.remedies
    assert any(r.startswith("the gradients are already clipped (clip=1.0)") for r in d.remedies)
    assert TURN_ON_REPAIR in said(d)  # repair is off: still worth suggesting


def test_a_loop_without_an_optimizer_is_never_told_to_turn_repair_on() -> None:
    """Guard(repair='auto') needs an optimizer (it raises without one): a hand-written SGD loop that diverges or
    meets NaN gets every other remedy, but not that one."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x_all = torch.randn(512, 32, generator=gen)
    y_all = (x_all @ torch.randn(32, 10, generator=gen)).argmax(1)
    model = relu_mlp()
    with gg.Guard(model, None, console=False) as g:  # each backward is a step
        for i in range(40):
            idx = torch.randint(0, 512, (64,), generator=gen)
            x = x_all[idx] if i != 30 else torch.full((64, 32), math.nan)
            loss = nn.functional.cross_entropy(model(x), y_all[idx])
            model.zero_grad()
            loss.backward()
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(p.grad, alpha=-50.0)  # far too high: it diverges at once
    kinds = {d.kind for d in g.diagnoses}
    assert {"exploding", "nonfinite"} <= kinds, [(d.step, d.kind) for d in g.diagnoses]
    for d in g.diagnoses:
        assert d.remedies and not any("repair='auto'" in r for r in d.remedies), (d.kind, d.remedies)
    with_optimizer = advise(diag("nonfinite", 5, nonfinite.REMEDIES), ModelFacts())
    assert TURN_ON_REPAIR in said(with_optimizer)  # control: with an optimizer it is offered
    assert TURN_ON_REPAIR not in said(advise(diag("nonfinite", 5, nonfinite.REMEDIES), ModelFacts(optimizer=False)))


# ------------------------------------------------------------------------------------------------ by hand


def diag(kind: str, step: int, remedies: list[str], layers: list[str] | None = None,
         evidence: dict[str, float] | None = None) -> gg.Diagnosis:
    return gg.Diagnosis(kind, "warning", step, layers or [], f"{kind} found.", evidence or {}, list(remedies))


def test_activations_held_as_functions_are_read_too() -> None:
    # nn.TransformerEncoderLayer keeps F.relu (or F.gelu) as a function: its model uses ReLU, and the vanishing
    # remedy "use a ReLU-family activation instead of sigmoid/tanh" does not fit it (pytorch/examples' word LM).
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32), 2, enable_nested_tensor=False)
    f = model_facts(enc, repair=False, clip=None)
    assert f.activations and f.saturating == ()

    class Block(nn.Module):
        def __init__(self, act) -> None:
            super().__init__()
            self.fc, self.act = nn.Linear(4, 4), act

    assert model_facts(Block(torch.tanh), False, None).saturating == ("tanh",)
    assert model_facts(Block(nn.functional.silu), False, None).activations
    assert not model_facts(nn.Sequential(nn.Linear(4, 4), nn.PixelUnshuffle(2)), False, None).activations


def test_model_facts_read_activation_recurrent_and_norm_types() -> None:
    f = model_facts(relu_mlp(), repair=False, clip=None)
    assert f == ModelFacts(saturating=(), activations=True, recurrent={}, norms=(), repair=False, clip=None)
    seq = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.LayerNorm(4), nn.Sigmoid(), nn.BatchNorm1d(4))
    assert model_facts(seq, True, "zclip") == ModelFacts(("Tanh", "Sigmoid"), True, {}, ("LayerNorm", "BatchNorm1d"),
                                                          True, "zclip")
    assert model_facts(Recurrent("lstm"), False, 1.0).recurrent == {"rnn": "LSTM"}
    gru = nn.Module()
    gru.enc = nn.GRU(2, 4)
    gru.dec = nn.RNN(4, 4, nonlinearity="relu")
    assert model_facts(gru, False, None).recurrent == {"enc": "GRU", "dec": "RNN_RELU"}
    # Softmax and attention are no hidden activations: the model below has none that advice can read.
    assert not model_facts(nn.Sequential(nn.Linear(4, 4), nn.Softmax(-1)), False, None).activations


def test_functional_activations_leave_the_generic_remedy_in_place() -> None:
    d = diag("vanishing", 100, vanishing.REMEDIES_DEPTH)
    assert advise(d, ModelFacts()) is d  # nothing known about the model: nothing changed
    assert SWAP not in said(advise(d, ModelFacts(activations=True)))  # ReLU family seen, no saturating one


def test_norm_layers_present_turn_add_normalisation_into_residual_connections() -> None:
    d = advise(diag("vanishing", 100, vanishing.REMEDIES_DEPTH), ModelFacts(norms=("LayerNorm",)))
    assert d.remedies[-1] == "add residual connections (the model already normalises, with LayerNorm)"
    dead = advise(diag("dead_units", 100, units.DEAD_REMEDIES), ModelFacts(norms=("BatchNorm1d",)))
    assert "BatchNorm" not in said(dead)


def test_gru_time_advice_and_unknown_recurrent_layers() -> None:
    d = diag("vanishing", 100, vanishing.REMEDIES_TIME, ["enc"], {"early_late_time_ratio": 1e-9})
    gru = advise(d, ModelFacts(recurrent={"enc": "GRU", "dec": "RNN_TANH"}))
    assert GATED not in said(gru) and "forget-gate" not in said(gru) and "identity" not in said(gru)
    assert gru.remedies[0] == "initialise the recurrent weights orthogonally: gradguard.reinit(model, 'orthogonal')"
    assert advise(d, ModelFacts(recurrent={"a": "GRU", "b": "LSTM"})) is d  # 'enc' unknown, two kinds: unchanged


def test_a_condition_seen_before_the_explosion_is_not_its_consequence() -> None:
    boom = diag("exploding", 200, exploding.REMEDIES, ["0"])
    before = diag("dead_units", 100, units.DEAD_REMEDIES, ["1", "0"])
    again = diag("dead_units", 300, units.DEAD_REMEDIES, ["1", "0"])
    assert "explosion" not in said(advise(again, ModelFacts(activations=True), [before, boom]))
    assert "explosion at step 200" in said(advise(again, ModelFacts(activations=True), [boom]))
    late = diag("dead_units", 200 + advice.CAUSE_WITHIN + 1, units.DEAD_REMEDIES, ["1", "0"])
    assert "explosion" not in said(advise(late, ModelFacts(activations=True), [boom]))


def test_nonfinite_after_an_explosion_names_it_and_clip_is_not_suggested_twice() -> None:
    boom = diag("exploding", 15, exploding.REMEDIES, ["4"])
    nan = diag("nonfinite", 20, nonfinite.REMEDIES, ["4"])
    d = advise(nan, ModelFacts(clip="1.0"), [boom])
    assert d.remedies[0] == ("the NaN/Inf came after the explosion at step 15: fix the explosion first (lower the "
                             "learning rate)")
    assert nonfinite.REMEDIES[1] not in d.remedies and "Guard(clip=1.0)" not in said(d)
    assert not any(r.startswith("lower the learning rate (the gradients are") for r in d.remedies)  # said once
    assert "after the explosion at step 15" in d.message
    assert "explosion" not in said(advise(nan, ModelFacts(), []))


def test_a_clip_seen_cutting_a_step_counts_as_clipping_on() -> None:
    # The script clips with its own clip_grad_norm_: gradguard saw it cut a spike (evidence "clipped_norm").
    spike = gg.Diagnosis("exploding", "error", 53, ["2"], "Gradient spike.", {"total_grad_norm": 15.9,
                                                                              "clipped_norm": 1.0},
                         list(exploding.REMEDIES))
    first_ = advise(spike, ModelFacts(activations=True))
    assert exploding.REMEDIES[1] not in first_.remedies
    assert "the gradients are already clipped (cut to 1 at step 53)" in said(first_)
    dead = advise(diag("dead_units", 150, units.DEAD_REMEDIES, ["3", "2"]), ModelFacts(activations=True), [first_])
    assert dead.remedies[0] == ("these units died after the explosion at step 53: fix the explosion first (lower the "
                                "learning rate)")


def test_residual_blocks_are_read_and_post_norm_transformers_are_told_to_put_the_norm_first() -> None:
    # pytorch/examples' word LM: nn.TransformerEncoder with its default post-norm layers (norm_first=False). Its
    # layers add their input back and normalise: "add normalisation or residual connections" fits nothing there.
    post = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32), 2, enable_nested_tensor=False)
    f = model_facts(post, repair=False, clip=None)
    assert f.residual == ("TransformerEncoderLayer",) and f.post_norm and f.norms == ("LayerNorm",)
    d = advise(diag("vanishing", 100, vanishing.REMEDIES_DEPTH), f)
    assert not any("add residual" in r or "add normalisation" in r for r in d.remedies)
    assert any("norm_first=True" in r for r in d.remedies)
    # Pre-norm layers: residual and normalised already, nothing of that remedy is left to say.
    pre = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, norm_first=True), 2, enable_nested_tensor=False)
    f = model_facts(pre, repair=False, clip=None)
    assert f.residual == ("TransformerEncoderLayer",) and not f.post_norm
    d = advise(diag("vanishing", 100, vanishing.REMEDIES_DEPTH), f)
    assert not any("residual" in r or "normalis" in r or "norm_first" in r for r in d.remedies)
    assert d.remedies  # the initialisation remedy stays


def test_residual_blocks_without_normalisation_are_told_to_normalise_inside_them() -> None:
    class ResidualBlock(nn.Module):  # a user's own block, known by its name
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + torch.relu(self.fc(x))

    net = nn.Sequential(nn.Linear(4, 8), ResidualBlock(), ResidualBlock(), nn.Linear(8, 2))
    f = model_facts(net, repair=False, clip=None)
    assert f.residual == ("ResidualBlock",) and not f.post_norm and f.norms == ()
    d = advise(diag("vanishing", 100, vanishing.REMEDIES_DEPTH), f)
    assert d.remedies[-1].startswith("add normalisation (LayerNorm/BatchNorm) inside each residual block")
    assert "ResidualBlock" in d.remedies[-1]
    # Plain blocks and names that merely contain "Res" are no residual blocks.
    assert model_facts(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), False, None).residual == ()


def test_transformers_blocks_are_residual() -> None:
    transformers = __import__("pytest").importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=16)
    f = model_facts(transformers.GPT2LMHeadModel(cfg), repair=False, clip=None)
    assert f.residual == ("GPT2Block",) and not f.post_norm

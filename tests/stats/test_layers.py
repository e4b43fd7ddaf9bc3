import pytest
import torch
from torch import nn

from gradguard.stats.layers import ROOT, build_layer_map, is_compiled, unwrap


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 20)
        self.head.weight = self.embed.weight  # tied, as in language models

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(self.embed(x))))


def test_layers_are_owning_modules_in_registration_order() -> None:
    m = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5)))
    lm = build_layer_map(m, None)
    assert lm.names == ["0", "2.0", "2.1"]
    assert lm.param_names == ["0.weight", "0.bias", "2.0.weight", "2.0.bias", "2.1.weight", "2.1.bias"]
    assert lm.numel == [3 * 4 + 4, 4 * 5 + 5, 5 + 5]


def test_tied_parameter_counted_once_under_first_owner() -> None:
    lm = build_layer_map(Tied(), None)
    assert lm.names == ["embed", "body", "head"]
    assert lm.param_names == ["embed.weight", "body.weight", "body.bias", "head.bias"]
    assert lm.numel == [160, 72, 20]


def test_frozen_and_optimizer_subset() -> None:
    m = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 5))
    m[0].weight.requires_grad_(False)
    lm = build_layer_map(m, None)
    assert lm.param_names == ["0.bias", "1.weight", "1.bias"]
    opt = torch.optim.SGD([m[1].weight], lr=0.1)
    assert build_layer_map(m, opt).param_names == ["1.weight"]


def test_wrappers_are_looked_through() -> None:
    m = nn.Sequential(nn.Linear(3, 4))
    assert unwrap(nn.DataParallel(m)) is m
    compiled = torch.compile(m, backend="eager")
    assert unwrap(compiled) is m and is_compiled(compiled) and not is_compiled(m)
    assert build_layer_map(nn.DataParallel(m), None).names == ["0"]


def test_bad_input_errors_say_what_to_do() -> None:
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        build_layer_map(frozen, None)
    m = nn.Linear(2, 2)
    other = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="not in the model"):
        build_layer_map(m, torch.optim.SGD([*m.parameters(), other], lr=0.1))


def test_reorder_keeps_parameter_mapping() -> None:
    m = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 5), nn.Linear(5, 6))
    lm = build_layer_map(m, None)
    lm.reorder(["2", "0"])
    assert lm.names == ["2", "0", "1"]
    for p, li in zip(lm.params, lm.layer_of):
        owner = lm.modules[li]
        assert any(p is q for q in owner.parameters(recurse=False))


class OwnParameter(nn.Module):
    """A model with a parameter of its own (a learned start state, as makemore's RNN.start) besides a layer."""

    def __init__(self) -> None:
        super().__init__()
        self.start = nn.Parameter(torch.zeros(1, 8))
        self.fc = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(x + self.start))


def test_the_models_own_parameters_are_the_layer_root() -> None:
    lm = build_layer_map(OwnParameter(), None)
    assert lm.names == [ROOT, "fc"] and ROOT == "(root)"
    assert lm.param_names == ["start", "fc.weight", "fc.bias"]  # parameter names stay the model's own
    assert lm.numel == [8, 9]
    # Forward order arrives as module names, where the model itself is "": it still finds its layer.
    lm.reorder(["fc", ""])
    assert lm.names == ["fc", ROOT] and lm.layer_of == [1, 0, 0]
    # A bare layer used as the model is its own root.
    assert build_layer_map(nn.Linear(2, 2), None).names == [ROOT]


def test_root_layer_reads_the_same_in_console_events_stats_and_meta(tmp_path) -> None:
    import io
    import json

    import gradguard as gg

    torch.manual_seed(0)
    m = OwnParameter()
    opt = torch.optim.SGD(m.parameters(), lr=50.0)  # far too high: a diagnosis names the layers
    console = io.StringIO()
    with gg.Guard(m, opt, console=console, log_dir=tmp_path) as guard:
        for _ in range(12):
            x = torch.randn(64, 8)
            loss = (m(x) - x.sum(1, keepdim=True)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        found = guard.diagnoses
    named = [d for d in found if d.layers]
    assert named and all("" not in d.layers for d in found)
    assert ROOT in {n for d in named for n in d.layers}
    assert f"'{ROOT}'" in console.getvalue() and "''" not in console.getvalue()
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert [entry["name"] for entry in meta["layers"]] == [ROOT, "fc"]
    rows = [json.loads(line) for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    assert rows and all(set(r["grad_norm"]) == {ROOT, "fc"} for r in rows)

"""meta.json describes the layers the run has: written whole at attach, and again (a new file renamed over the
old one) when the tracked layers change, as after ``optimizer.add_param_group``. Oracles: the model's own
parameter names and sizes, and the files on disk."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

import gradguard as gg
from gradguard.report.outputs import SinkWarning


def _layers(path: Path) -> list[tuple[str, int]]:
    return [(d["name"], d["numel"]) for d in json.loads((path / "meta.json").read_text())["layers"]]


def _frozen_first_layer() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    for p in m[0].parameters():
        p.requires_grad_(False)
    return m, torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)


def test_layers_changed_rewrites_meta_whole(tmp_path: Path) -> None:
    m, opt = _frozen_first_layer()
    guard = gg.Guard(m, opt, console=False, log_dir=tmp_path)
    assert _layers(tmp_path) == [("2", 8 * 2 + 2)]
    before = json.loads((tmp_path / "meta.json").read_text())
    guard._outputs.layers_changed([("0", 4 * 8 + 8), ("2", 8 * 2 + 2)])
    after = json.loads((tmp_path / "meta.json").read_text())
    assert _layers(tmp_path) == [("0", 40), ("2", 18)]
    assert {k: v for k, v in after.items() if k != "layers"} == {k: v for k, v in before.items() if k != "layers"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.jsonl", "meta.json", "stats.jsonl"]  # no temp
    guard.close()


def test_a_meta_that_cannot_be_rewritten_warns_once_naming_it(tmp_path: Path) -> None:
    m, opt = _frozen_first_layer()
    guard = gg.Guard(m, opt, console=False, log_dir=tmp_path)
    (tmp_path / "meta.json").unlink()
    (tmp_path / "meta.json").mkdir()  # a rename over a directory fails
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        guard._outputs.layers_changed([("0", 40), ("2", 18)])
    assert [w.category for w in caught] == [SinkWarning]
    assert str(tmp_path / "meta.json") in str(caught[0].message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.jsonl", "meta.json", "stats.jsonl"]
    guard.close()


def test_meta_names_the_layers_of_a_group_added_after_attach(tmp_path: Path) -> None:
    m, opt = _frozen_first_layer()
    guard = gg.Guard(m, opt, console=False, log_dir=tmp_path)
    for step in range(6):
        if step == 3:
            for p in m[0].parameters():
                p.requires_grad_(True)
            opt.add_param_group({"params": list(m[0].parameters())})
        opt.zero_grad()
        m(torch.randn(8, 4)).square().mean().backward()
        opt.step()
    guard.close()
    want = [(n, sum(p.numel() for p in mod.parameters())) for n, mod in m.named_children() if list(mod.parameters())]
    assert _layers(tmp_path) == want  # in depth order: the unfrozen first layer first

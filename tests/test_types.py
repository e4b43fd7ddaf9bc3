import json

import pytest

import gradguard as gg


def test_kinds_are_the_contract() -> None:
    assert gg.KINDS == ("exploding", "vanishing", "nonfinite", "dead_units", "saturation", "stalled",
                        "train_mode_inference", "inference_mutates_state", "stochastic_inference",
                        "eval_mode_training")


def test_diagnosis_rejects_unknown_kind_and_severity() -> None:
    with pytest.raises(ValueError, match="unknown diagnosis kind"):
        gg.Diagnosis("exploded", "error", 0, [], "x")
    with pytest.raises(ValueError, match="unknown severity"):
        gg.Diagnosis("exploding", "fatal", 0, [], "x")
    with pytest.raises(ValueError, match="unknown action kind"):
        gg.Action("explode", 0)


def test_to_dict_is_json_and_tagged() -> None:
    d = gg.Diagnosis("vanishing", "warning", 7, ["0"], "msg", {"ratio": 1e-9}, ["fix"])
    rec = json.loads(json.dumps(d.to_dict()))
    assert rec == {"type": "diagnosis", "kind": "vanishing", "severity": "warning", "step": 7, "layers": ["0"],
                   "message": "msg", "evidence": {"ratio": 1e-9}, "remedies": ["fix"]}
    assert gg.Action("clip", 3, {"coef": 0.5}).to_dict() == {"type": "action", "kind": "clip", "step": 3,
                                                               "detail": {"coef": 0.5}}

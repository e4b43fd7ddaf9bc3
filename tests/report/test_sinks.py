import io
import json

import gradguard as gg
from gradguard.report.sinks import ConsoleSink, JsonlSink


def test_jsonl_keeps_nonfinite_numbers_and_flushes(tmp_path) -> None:
    sink = JsonlSink(tmp_path / "e.jsonl")
    sink.write({"step": 1, "loss": float("nan"), "norms": [float("inf"), 1.5, float("-inf")]})
    assert json.loads((tmp_path / "e.jsonl").read_text()) == {"step": 1, "loss": "nan",
                                                               "norms": ["inf", 1.5, "-inf"]}
    sink.close()
    sink.write({"step": 2})  # after close: ignored, nothing raised
    assert len((tmp_path / "e.jsonl").read_text().splitlines()) == 1


def test_console_prints_kind_layers_message_and_first_fix() -> None:
    buf = io.StringIO()
    sink = ConsoleSink(buf)
    d = gg.Diagnosis("vanishing", "warning", 99, ["0", "2"], "the early layers stopped", {}, ["use ReLU", "other"])
    sink.write(d.to_dict())
    text = buf.getvalue()
    assert "step 99 warning: vanishing in '0', '2'" in text and "the early layers stopped" in text
    assert "fix: use ReLU" in text and "other" not in text

"""TensorBoard, W&B and MLflow sinks: what reaches each tracker's own files, read back with the tracker's own reader
(or, for W&B offline, the record log), compared with norms computed here by torch.linalg.vector_norm."""

from __future__ import annotations

import glob
import json
import math
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from scenarios import ListSink
from torch import nn

import gradguard as gg

STEPS, NAN_AT = 6, 4  # a NaN gradient at step 4: nonfinite diagnosis, then NaN weights, NaN everywhere at step 5


class Net(nn.Module):
    """Layer names a tracker may refuse: "(root)" (parameters of the model itself), "body.in[0]", "body.out$"."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 6))
        self.body = nn.ModuleDict({"in[0]": nn.Linear(6, 8), "out$": nn.Linear(8, 3)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body["out$"](torch.tanh(self.body["in[0]"](x * self.scale)))


def _layers(model: Net) -> dict[str, list[nn.Parameter]]:
    return {"(root)": [model.scale], "body.in[0]": list(model.body["in[0]"].parameters()),
            "body.out$": list(model.body["out$"].parameters())}


def _norm(ts: list[torch.Tensor]) -> float:
    return torch.linalg.vector_norm(torch.cat([t.detach().flatten() for t in ts])).item()


def _train(sink: Any, steps: int = STEPS, nan_at: int | None = NAN_AT, log_step: Any = None,
           **options: Any) -> tuple[dict[int, dict[str, Any]], list[dict[str, Any]]]:
    """Train Net with the sink attached. Returns the oracle per step (gradient, weight and update norms per layer,
    total gradient norm, loss) and every record the Guard sent."""
    torch.manual_seed(0)
    model = Net()
    layers = _layers(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = ListSink()
    guard = gg.Guard(model, opt, console=False, log_every=2, sample_every=2, sinks=[sink, seen], **options)
    gen = torch.Generator().manual_seed(1)
    oracle: dict[int, dict[str, Any]] = {}
    for i in range(steps):
        opt.zero_grad()
        loss = model(torch.randn(8, 6, generator=gen)).square().mean()
        guard.observe_loss(loss)
        loss.backward()
        if i == nan_at:
            model.body["out$"].bias.grad[0] = float("nan")
        before = {n: [p.detach().clone() for p in ps] for n, ps in layers.items()}
        o: dict[str, Any] = {"loss": loss.item(), "total": _norm([p.grad for ps in layers.values() for p in ps])}
        o["grad"] = {n: _norm([p.grad for p in ps]) for n, ps in layers.items()}
        o["weight"] = {n: _norm(ps) for n, ps in before.items()}
        opt.step()
        o["update"] = {n: _norm([b - p for b, p in zip(before[n], ps)]) for n, ps in layers.items()}
        oracle[i] = o
        if log_step is not None:
            log_step(i, loss.item())
    guard.close()
    return oracle, seen.records


def _same(got: float, want: float) -> bool:
    """Equal within fp32 rounding; NaN equals NaN and Inf equals Inf (non-finite values must arrive unchanged)."""
    if math.isnan(want) or math.isinf(want):
        return got == want or (math.isnan(got) and math.isnan(want))
    return got == pytest.approx(want, rel=1e-5, abs=1e-7)


def _check_series(series: dict[int, float], want: dict[int, float], what: str) -> None:
    assert sorted(series) == sorted(want), what
    for step, value in want.items():
        assert _same(series[step], value), f"{what} at step {step}: {series[step]} != {value}"


def _expected(oracle: dict[int, dict[str, Any]], records: list[dict[str, Any]]) -> dict[str, dict[int, float]]:
    """The series a tracker should hold, named as gradguard names them, values from the torch oracle."""
    stats = [r for r in records if r["type"] == "stats"]
    assert NAN_AT in [r["step"] for r in stats] and STEPS - 1 in [r["step"] for r in stats]
    want: dict[str, dict[int, float]] = {"total_grad_norm": {}, "loss": {}}
    for r in stats:
        o = oracle[r["step"]]
        want["total_grad_norm"][r["step"]] = o["total"]
        want["loss"][r["step"]] = o["loss"]
        for layer, g in o["grad"].items():
            want.setdefault(f"grad_norm/{layer}", {})[r["step"]] = g
    samples = {r["sample_step"]: r for r in stats if "sample_step" in r}
    assert len(samples) >= 2
    for s, r in samples.items():
        for layer in oracle[s]["weight"]:
            w, u = oracle[s]["weight"][layer], oracle[s]["update"][layer]
            want.setdefault(f"weight_norm/{layer}", {})[s] = w
            # Which entries exist is the record's business (gradguard sends null for an update it did not
            # measure); their values are the oracle's.
            if r["update_ratio"][layer] is not None:
                want.setdefault(f"update_ratio/{layer}", {})[s] = u / w
    return want


def _nonfinite(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    found = [r for r in records if r["type"] == "diagnosis" and r["kind"] == "nonfinite"]
    assert found and found[0]["step"] == NAN_AT
    return found


def test_importing_gradguard_imports_no_tracker() -> None:
    code = ("import sys, gradguard, gradguard.report\n"
            "from gradguard.report import TensorBoardSink, WandbSink, MlflowSink\n"
            "import gradguard.report.tensorboard, gradguard.report.wandb, gradguard.report.mlflow\n"
            "heavy = [m for m in sys.modules if m.split('.')[0] in ('tensorboard', 'wandb', 'mlflow', 'tensorflow')"
            " or m.startswith('torch.utils.tensorboard')]\n"
            "print(heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_tensorboard_scalars_text_and_nan(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    from gradguard.report import TensorBoardSink

    oracle, records = _train(TensorBoardSink(tmp_path / "tb"))
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    for name, want in _expected(oracle, records).items():
        tag = "gradguard/" + name + ("(root)" if name.endswith("/") else "")
        _check_series({e.step: e.value for e in acc.Scalars(tag)}, want, tag)
    assert math.isnan(acc.Scalars("gradguard/grad_norm/body.out$")[-1].value)  # NaN kept, not dropped
    texts = [(e.step, tensor_util.make_ndarray(e.tensor_proto).item().decode())
             for e in acc.Tensors("gradguard/diagnoses/text_summary")]
    d = _nonfinite(records)[0]
    assert any(step == NAN_AT and "nonfinite" in t and d["message"][:30] in t.replace("\\", "") for step, t in texts)


def test_tensorboard_users_writer_clips_and_actions(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util
    from torch.utils.tensorboard import SummaryWriter

    from gradguard.report import TensorBoardSink

    writer = SummaryWriter(str(tmp_path))
    sink = TensorBoardSink(writer, prefix="gg")
    _train(sink, steps=3, nan_at=None, clip=1e-3)  # clips every step
    sink.write({"type": "action", "kind": "skip_step", "step": 7, "detail": {"why": "x"}})  # closed: ignored
    sink = TensorBoardSink(writer, prefix="gg")
    sink.write({"type": "action", "kind": "skip_step", "step": 7, "detail": {"why": "non-finite gradients"}})
    writer.add_scalar("user/after", 1.0, 7)  # the user's writer is still open after guard.close()
    writer.flush()
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    assert "user/after" in acc.Tags()["scalars"]
    clipped = {e.step: e.value for e in acc.Scalars("gg/clipped_norm")}  # a scalar per clipped step, not text
    assert sorted(clipped) == [0, 1, 2] and all(v == pytest.approx(1e-3, rel=1e-4) for v in clipped.values())
    (action,) = [tensor_util.make_ndarray(e.tensor_proto).item().decode()
                 for e in acc.Tensors("gg/actions/text_summary")]
    assert "skip\\_step" in action and "non-finite gradients" in action
    writer.close()
    with pytest.raises(TypeError, match="SummaryWriter"):
        TensorBoardSink(42)


def _wandb_records(path: str) -> list[Any]:
    """The records of a .wandb file: a 7-byte header, then LevelDB log format (32 KiB blocks of chunks, each with a
    4-byte CRC, 2-byte length, 1-byte type: 1 full, 2 first, 3 middle, 4 last), each record a protobuf Record."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    pos, buf, block = 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos: pos + 7])
        buf, pos = buf + data[pos + 7: pos + 7 + n], pos + 7 + n
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            yield rec
            buf = b""


def test_wandb_offline_history_tables_and_summary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    from gradguard.report import WandbSink

    assert wandb.run is None
    with pytest.raises(RuntimeError, match=r"wandb\.init\(\)"):
        WandbSink()
    settings = wandb.Settings(console="off", x_disable_stats=True, x_disable_meta=True, x_disable_machine_info=True)
    run = wandb.init(project="gradguard-test", dir=str(tmp_path), settings=settings)
    try:
        sink = WandbSink(alerts=True)  # offline: no alert may be stored for a later sync
        # The user's own logging, one row per step without step=: it must coexist with gradguard's rows.
        oracle, records = _train(sink, log_step=lambda i, loss: run.log({"train/loss": loss, "train/it": i}))
    finally:
        run.finish()
        wandb.teardown()  # stop the background service now rather than at interpreter exit
    (path,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    rows, defined, alerts = [], {}, 0
    for rec in _wandb_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            row: dict[str, Any] = {}
            for item in rec.history.item:  # a table arrives as nested keys: ("gradguard/diagnoses", "path")
                keys = [item.key] if item.key else list(item.nested_key)
                target = row
                for k in keys[:-1]:
                    target = target.setdefault(k, {})
                target[keys[-1]] = json.loads(item.value_json)
            rows.append(row)
        elif kind == "metric":
            defined[rec.metric.name] = rec.metric.step_metric
        elif kind == "alert":
            alerts += 1
    assert alerts == 0
    assert [r["_step"] for r in rows] == list(range(len(rows)))  # W&B's step: contiguous, nothing dropped
    assert [r["train/it"] for r in rows if "train/it" in r] == list(range(STEPS))  # no user row lost
    ours = [r for r in rows if "gradguard/step" in r]
    stats = [r for r in records if r["type"] == "stats"]
    assert len(ours) == len(stats)  # one row per statistics read (diagnoses ride in it)
    for name, want in _expected(oracle, records).items():
        key = "gradguard/" + name + ("(root)" if name.endswith("/") else "")
        x = "gradguard/sample_step" if name.startswith(("weight_norm", "update_ratio")) else "gradguard/step"
        assert defined[key] == x  # plotted against gradguard's step, not W&B's
        _check_series({r[x]: r[key] for r in ours if key in r}, want, key)
    diag_rows = []  # each logged increment of the INCREMENTAL table holds the rows added since the last one
    for r in ours:
        if "gradguard/diagnoses" in r:
            table = Path(path).parent / "files" / r["gradguard/diagnoses"]["path"]
            diag_rows += json.loads(table.read_text())["data"]
    d = _nonfinite(records)
    assert [row[0] for row in diag_rows if row[1] == "nonfinite"] == [x["step"] for x in d]
    assert any(row[4] == d[0]["message"] and row[5] == d[0]["remedies"][0] for row in diag_rows)
    assert sink.counts["nonfinite"] == len(d)


def test_mlflow_metrics_artifact_tags_and_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mlflow = pytest.importorskip("mlflow")
    from gradguard.report import MlflowSink

    # MLflow 3 keeps the file store only on request (a database store needs SQLAlchemy, not in mlflow-skinny).
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(RuntimeError, match=r"mlflow\.start_run\(\)"):
        MlflowSink()
    with mlflow.start_run() as run:
        oracle, records = _train(MlflowSink())
    run_id = run.info.run_id
    client = mlflow.MlflowClient(tracking_uri=uri)
    # Hand-written MLflow names: "(root)" -> "_root_", "[", "]", "$" -> "_" (MLflow refuses them); dots kept.
    names = {"(root)": "_root_", "body.in[0]": "body.in_0_", "body.out$": "body.out_"}
    for name, want in _expected(oracle, records).items():
        field, _, layer = name.partition("/")
        key = f"gradguard/{field}/{names[layer]}" if "/" in name else f"gradguard/{field}"
        _check_series({m.step: m.value for m in client.get_metric_history(run_id, key)}, want, key)
    lines = [json.loads(x) for x in Path(client.download_artifacts(run_id, "gradguard/events.jsonl",
                                                                   str(tmp_path))).read_text().splitlines()]
    d = _nonfinite(records)
    fields = ("type", "kind", "step", "severity", "layers", "message", "remedies")
    assert [{f: x[f] for f in fields} for x in lines if x["kind"] == "nonfinite"] == [{f: x[f] for f in fields}
                                                                                     for x in d]
    tags = client.get_run(run_id).data.tags
    assert tags["gradguard/count/nonfinite"] == str(len(d))

    # An explicit run id and tracking URI: no active run needed; a clip action becomes a metric at its step.
    sink = MlflowSink(run_id=run_id, prefix="gg", tracking_uri=uri)
    sink.write({"type": "action", "kind": "clip", "step": 9, "detail": {"norm": 3.0, "clipped_norm": 1.0}})
    sink.write({"type": "stats", "step": 10, "total_grad_norm": float("inf"), "grad_norm": {"a/../b": 2.0}})
    sink.close()
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "gg/clipped_norm")] == [(9, 1.0)]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "gg/total_grad_norm")] == [(10, math.inf)]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "gg/grad_norm/a/__/b")] == [(10, 2.0)]
    assert client.get_run(run_id).data.tags["gg/count/clip"] == "1"


class FakeRun:
    """Records what a WandbSink asks of a run (the real offline run is tested above)."""

    def __init__(self) -> None:
        self.logs: list[tuple[dict[str, Any], dict[str, Any]]] = []
        self.summary: dict[str, Any] = {}
        self.offline = False

    def define_metric(self, name: str, step_metric: str | None = None) -> None:
        pass

    def log(self, row: dict[str, Any], **kwargs: Any) -> None:
        self.logs.append((dict(row), kwargs))


def test_wandb_commit_false_never_passes_step_and_flushes_events_on_close() -> None:
    pytest.importorskip("wandb")
    from gradguard.report import WandbSink

    run = FakeRun()
    sink = WandbSink(run, commit=False)
    sink.write({"type": "action", "kind": "clip", "step": 1, "detail": {"norm": 5.0, "clipped_norm": 1.0}})
    sink.write({"type": "stats", "step": 1, "total_grad_norm": 5.0, "grad_norm": {"a": 5.0}})
    sink.write({"type": "diagnosis", "kind": "exploding", "step": 2, "severity": "warning", "layers": ["a"],
                "message": "m", "evidence": {"x": float("nan")}, "remedies": ["r"]})
    assert run.summary == {"gradguard/count/clip": 1, "gradguard/count/exploding": 1}
    sink.close()
    sink.close()
    assert [kw for _, kw in run.logs] == [{"commit": False}, {"commit": False}]  # never step=
    (first, _), (last, _) = run.logs
    assert first["gradguard/clipped_norm"] == 1.0 and first["gradguard/grad_norm/a"] == 5.0
    assert last["gradguard/step"] == 2 and "gradguard/diagnoses" in last

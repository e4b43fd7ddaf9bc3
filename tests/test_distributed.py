"""torch.distributed: DDP and FSDP2 on 2 CPU processes (gloo) against one process on the same global batch.

The oracle is a plain single-process run of the same model on the whole batch, measured by the test itself with
torch.linalg.vector_norm; gradguard's per-layer and total norms, loss, decisions (skip, clip) and final weights on
every rank must equal it. Only rank 0 writes logs and prints; one all-reduce per step at most.
"""

from __future__ import annotations

import gc
import io
import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import gradguard as gg

STEPS = 12
NAN_STEP = 7  # an inf in one rank's batch at this step: the all-reduced gradients are NaN on every rank
BATCH = 16


class TiedNet(nn.Module):
    """Embedding and output head share one weight (counted once)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor, bump: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids).mean(1) * bump
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(h)))))


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, 20, (BATCH, 5), generator=gen)
    y = torch.randint(0, 20, (BATCH,), generator=gen)
    bump = torch.ones(BATCH, 1)
    if step == NAN_STEP:
        bump[-1] = float("inf")  # in the second half of the batch: rank 1's share
    return ids, y, bump


def _layer_norms(model: nn.Module) -> dict[str, float]:
    out = {}
    for name, mod in model.named_modules():
        grads = [p.grad for p in mod.parameters(recurse=False) if p.grad is not None]
        if name == "head":
            continue  # its weight is emb's (counted once, under emb)
        if grads:
            full = [g.full_tensor() if hasattr(g, "full_tensor") else g for g in grads]
            out[name] = torch.linalg.vector_norm(torch.cat([g.double().flatten() for g in full])).item()
    return out


def _run(model: nn.Module, train_model: nn.Module, rank: int, world: int, guard_kw: dict, log_dir: str | None,
         stream: io.StringIO) -> dict:
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    guard = gg.Guard(train_model, opt, console=stream, log_every=4, sample_every=3, log_dir=log_dir, **guard_kw)
    calls: list[int] = []
    real = dist.all_reduce if world > 1 else None

    def counting(t: torch.Tensor, *a, **k):  # type: ignore[no-untyped-def]
        calls.append(t.numel())
        return real(t, *a, **k)  # type: ignore[misc]

    oracle = []
    per_step_calls = []
    if world > 1:
        dist.all_reduce = counting  # type: ignore[assignment]
    try:
        for step in range(STEPS):
            ids, y, bump = _data(step)
            share = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
            loss = nn.functional.cross_entropy(train_model(ids[share], bump[share]), y[share])
            guard.observe_loss(loss)
            opt.zero_grad()
            loss.backward()
            oracle.append(_layer_norms(model))
            before = len(calls)
            opt.step()
            per_step_calls.append(len(calls) - before)
    finally:
        if world > 1:
            dist.all_reduce = real  # type: ignore[assignment]
    h = guard.history
    guard.close()
    params = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().tolist()
              for n, p in model.named_parameters()}
    return {
        "layers": list(h.layers), "grad": h.grad.tolist(), "total": h.total.tolist(), "loss": h.loss.tolist(),
        "steps": h.steps.tolist(), "oracle": oracle, "params": params, "calls": per_step_calls, "sizes": calls,
        "diagnoses": [(d.kind, d.step) for d in guard.diagnoses],
        "actions": [(a.kind, a.step) for a in guard.actions], "console": stream.getvalue(),
        "weights": [list(w) for w in h.weight], "updates": [list(u) for u in h.update],
    }


def _build(kind: str) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    model = TiedNet()
    if kind == "ddp":
        return model, nn.parallel.DistributedDataParallel(model)
    if kind == "fsdp":
        from torch.distributed.fsdp import fully_shard

        fully_shard(model.fc1)
        fully_shard(model.fc2)
        fully_shard(model)  # the root holds the tied embedding/head weight
        return model, model
    return model, model


def _hot_path(model: nn.Module, rank: int) -> dict:
    """The per-step hooks under FSDP2 with every Tensor value read replaced by one that raises."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, opt, console=False, log_every=1000, sample_every=2, nonfinite_check="deferred")

    def forbidden(*a, **k):  # type: ignore[no-untyped-def]
        raise AssertionError("host read in the per-step path")

    names = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__", "nonzero")
    saved = {n: getattr(torch.Tensor, n) for n in names}
    for step in range(5):
        ids, y, bump = _data(step)
        loss = nn.functional.cross_entropy(model(ids[rank::2], bump[rank::2]), y[rank::2])
        loss.backward()
        try:
            for n in names:
                setattr(torch.Tensor, n, forbidden)
            guard.observe_loss(loss)
            guard._pre_step_hook(opt, (), {})
            guard._post_step_hook(opt, (), {})
        finally:
            for n, f in saved.items():
                setattr(torch.Tensor, n, f)
        opt.zero_grad()
    n = len(guard.history.steps)
    guard.close()
    return {"rows": n}


def _worker(rank: int, world: int, init: str, out: str, kind: str, guard_kw: dict, log_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model, train_model = _build(kind.removesuffix("_hot"))
        if kind.endswith("_hot"):
            res = _hot_path(model, rank)
        else:
            res = _run(model, train_model, rank, world, guard_kw, log_dir, io.StringIO())
        Path(out, f"{rank}.json").write_text(json.dumps(res))
        # Free DDP's reducer / FSDP's state while the group is alive (gloo can abort or deadlock when they are
        # destroyed after it), and let no rank tear gloo down while the other still talks to it.
        del model, train_model
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn(kind: str, guard_kw: dict, tmp: Path) -> list[dict]:
    init = f"file://{tempfile.mktemp(dir=tmp)}"
    mp.spawn(_worker, args=(2, init, str(tmp), kind, guard_kw, str(tmp / "logs")), nprocs=2, join=True)
    return [json.loads((tmp / f"{r}.json").read_text()) for r in range(2)]


def _single(guard_kw: dict) -> dict:
    model, _ = _build("single")
    return json.loads(json.dumps(_run(model, model, 0, 1, guard_kw, None, io.StringIO())))


def _nan_equal(a: list, b: list, rel: float) -> None:
    t_a, t_b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    assert torch.allclose(t_a, t_b, rtol=rel, atol=1e-7, equal_nan=True), (a, b)


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_two_processes_equal_one_process(kind: str, tmp_path: Path) -> None:
    guard_kw = {"repair": "auto", "clip": 1.0}
    ref = _single(guard_kw)
    ranks = _spawn(kind, guard_kw, tmp_path)
    # The oracle of the single process is the test's own norm of its gradients, before clipping; gradguard agrees.
    col = {n: i for i, n in enumerate(ref["layers"])}
    for st, row in zip(ref["steps"], ref["grad"]):
        for name, value in ref["oracle"][st].items():
            _nan_equal([row[col[name]]], [value], 1e-5)
    for r, res in enumerate(ranks):
        assert res["layers"] == ref["layers"]  # names without wrapper prefixes; the tied weight once, under emb
        assert res["steps"] == ref["steps"]
        _nan_equal(res["grad"], ref["grad"], 1e-5)
        _nan_equal(res["total"], ref["total"], 1e-5)
        _nan_equal(res["loss"], ref["loss"], 1e-5)
        _nan_equal(res["weights"], ref["weights"], 1e-5)
        _nan_equal(res["updates"], ref["updates"], 1e-4)
        assert res["diagnoses"] == ref["diagnoses"], r
        assert res["actions"] == ref["actions"], r  # the same skip and clips at the same steps
        for name in ref["params"]:
            _nan_equal(res["params"][name], ref["params"][name], 1e-4)
        assert max(res["calls"]) == 1, res["calls"]  # one all-reduce per step, never more
        assert max(res["sizes"]) <= 2 + 3 * len(ref["layers"])  # a small one
    assert ("skip_step", NAN_STEP) in [tuple(a) for a in ref["actions"]]
    assert ("nonfinite", NAN_STEP) in [tuple(d) for d in ref["diagnoses"]]
    # Only rank 0 speaks and writes.
    assert "nonfinite" in ranks[0]["console"] and ranks[1]["console"] == ""
    logs = tmp_path / "logs"
    assert (logs / "meta.json").exists()
    assert sum(1 for line in (logs / "events.jsonl").read_text().splitlines() if '"nonfinite"' in line) == 1


def test_not_initialised_is_single_process() -> None:
    assert not (dist.is_available() and dist.is_initialized())
    assert gg.Guard.__init__ is not None
    from gradguard.stats.distributed import world

    assert world() == (0, 1)
    assert os.environ.get("RANK") in (None, "0")


def test_fsdp_per_step_path_reads_no_device_value(tmp_path: Path) -> None:
    assert [r["rows"] for r in _spawn("fsdp_hot", {}, tmp_path)] == [5, 5]

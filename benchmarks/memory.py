"""gradguard's own memory, against the model's parameter bytes (target: < 1 %).

Two independent measures after N training steps:

- **Reachable state** (``GuardSizer``): every object reachable from the Guard's attributes is visited once: tensor
  storages (deduplicated by storage), NumPy buffers (``nbytes`` of the array that owns the memory, so views that
  keep a larger buffer alive are charged the whole buffer), and every other Python object (``sys.getsizeof``).
  The user's objects the Guard only refers to (model, optimizer, parameters and their views, gradients, buffers,
  optimizer state) are not counted; the last training batch, kept by reference for the NaN replay, is reported
  apart. The repair ladder's snapshot (a deliberate host copy of model and optimizer) is reported apart too.
  The state is measured at three points: after a statistics read (rows drained), with ``log_every - 1`` rows
  pending (the most the Guard holds between reads), and inside a sample step, between the pre-step hook and the
  post-step hook, where a transient copy of the weights exists.
- **tracemalloc** of the host side, from before the Guard is created to step 200 (it slows every Python
  allocation several times over): Python and NumPy allocations made by gradguard's code (innermost frame) that are
  still alive, beside the walker's NumPy + Python bytes at the same step, as a check of the walker. torch's CPU
  tensors do not go through Python's allocator and are not seen by tracemalloc.

Run from the repository root: ``python -m benchmarks.memory [--only mlp|gpt2] [--steps N] [--configs ...]
[--quick]``. GPT-2 trains on a 1 x 32-token batch here (the Guard's state does not depend on the batch; only the
step time does), so that enough steps fit in a few minutes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import tracemalloc
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import FunctionType, MethodType, ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn

import gradguard as gg
from benchmarks.overhead import gpt2, mlp48

GG_DIR = str(Path(gg.__file__).parent)
TRACEMALLOC_STEPS = 200


@dataclass
class Sizes:
    """Bytes by kind, and by the Guard attribute through which they were first reached."""

    tensor: int = 0
    numpy: int = 0
    python: int = 0
    by_attr: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.tensor + self.numpy + self.python

    def top(self, k: int = 3) -> str:
        items = sorted(self.by_attr.items(), key=lambda kv: -kv[1])[:k]
        return ", ".join(f"{name} {b / 1024:.1f} KiB" for name, b in items if b)


def _storage_key(t: torch.Tensor) -> tuple[int, int] | None:
    try:
        s = t.untyped_storage()
        return (s.data_ptr(), s.nbytes())
    except (RuntimeError, NotImplementedError):  # sparse, meta or other storage-less tensors
        return None


def _numpy_owner(a: np.ndarray) -> np.ndarray:
    """The array that owns the memory ``a`` views (a view keeps its whole base alive)."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


class GuardSizer:
    """Walk the objects reachable from a Guard and add up their bytes, leaving out the user's own objects.

    Args:
        model, optimizer: the user's; their parameters, gradients, buffers and optimizer state are left out (and so
            is any tensor sharing their storage, e.g. ``p.detach()``).
    """

    SKIP_TYPES = (nn.Module, torch.optim.Optimizer, ModuleType, type, torch.device, torch.dtype)

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        user: list[torch.Tensor] = [*model.parameters(), *model.buffers()]
        user += [p.grad for p in model.parameters() if p.grad is not None]
        for state in optimizer.state.values():
            user += [v for v in state.values() if isinstance(v, torch.Tensor)]
        self.user_ids = {id(t) for t in user}
        self.user_storages = {k for k in map(_storage_key, user) if k is not None}

    def measure(self, guard: gg.Guard, apart: Iterable[str] = ("_last_inputs",)) -> tuple[Sizes, dict[str, Sizes]]:
        """Sizes of the Guard's own state, and separately of the attributes named in ``apart`` and of the repair
        ladder's snapshot."""
        seen: set[int] = {id(guard)}
        storages: set[tuple[int, int]] = set()
        own, separate = Sizes(), {}
        ladder = getattr(guard, "ladder", None)
        snapshot = getattr(ladder, "snapshot", None)
        if snapshot is not None:
            separate["repair snapshot"] = Sizes()
            self._walk(snapshot, separate["repair snapshot"], "snapshot", seen, storages)
        for name in apart:
            separate[name] = Sizes()
            self._walk(getattr(guard, name, None), separate[name], name, seen, storages, count_user=True)
        own.python += sys.getsizeof(guard) + sys.getsizeof(vars(guard))
        for name, value in vars(guard).items():
            if name in apart:
                continue
            if name == "_history" and value is not None:
                # one level deeper, so the report can say which of the History's buffers holds the bytes
                seen.add(id(value))
                own.python += sys.getsizeof(value) + sys.getsizeof(vars(value))
                for field_name, field_value in vars(value).items():
                    self._walk(field_value, own, f"_history.{field_name}", seen, storages)
            else:
                self._walk(value, own, name, seen, storages)
        return own, separate

    def _walk(self, root: Any, sizes: Sizes, attr: str, seen: set[int], storages: set[tuple[int, int]],
              count_user: bool = False) -> None:
        stack = [root]
        while stack:
            obj = stack.pop()
            if obj is None or id(obj) in seen or isinstance(obj, bool) or (type(obj) is int and -5 <= obj <= 256):
                continue  # None, True/False and small ints are shared interpreter singletons
            seen.add(id(obj))
            if isinstance(obj, torch.Tensor):
                key = _storage_key(obj)
                user = id(obj) in self.user_ids or key in self.user_storages
                if key is not None and key not in storages and (count_user or not user):
                    storages.add(key)
                    sizes.tensor += key[1]
                    sizes.by_attr[attr] = sizes.by_attr.get(attr, 0) + key[1]
                continue
            if isinstance(obj, self.SKIP_TYPES):
                continue
            if isinstance(obj, np.ndarray):
                owner = _numpy_owner(obj)
                if id(owner) not in seen or owner is obj:
                    seen.add(id(owner))
                    sizes.numpy += owner.nbytes
                    sizes.by_attr[attr] = sizes.by_attr.get(attr, 0) + owner.nbytes
                continue
            size = sys.getsizeof(obj)
            sizes.python += size
            sizes.by_attr[attr] = sizes.by_attr.get(attr, 0) + size
            if isinstance(obj, dict):
                stack += list(obj.keys()) + list(obj.values())
            elif isinstance(obj, (list, tuple, set, frozenset, deque)):
                stack += list(obj)
            elif isinstance(obj, MethodType):
                stack.append(obj.__self__)
            elif isinstance(obj, FunctionType):
                stack += [c.cell_contents for c in obj.__closure__ or () if _cell_filled(c)]
            elif isinstance(obj, (str, bytes, float, int, complex)):
                continue
            else:
                d = getattr(obj, "__dict__", None)
                if isinstance(d, dict):
                    sizes.python += sys.getsizeof(d)
                    stack += list(d.values())
                for slot in getattr(type(obj), "__slots__", ()):
                    stack.append(getattr(obj, slot, None))


def _cell_filled(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - an empty cell raises
        return True
    except ValueError:
        return False


def workload(name: str) -> tuple[nn.Module, Callable[[nn.Module], Callable[[], torch.Tensor]]]:
    """The benchmark models; GPT-2 on a 1 x 32-token batch so thousands of steps fit in minutes."""
    torch.manual_seed(0)
    if name == "mlp":
        return mlp48()
    model, _ = gpt2()
    ids = torch.randint(0, model.config.vocab_size, (1, 32))
    return model, lambda m: lambda: m(input_ids=ids, labels=ids).loss


CONFIGS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "clip=1.0": {"clip": 1.0},
    "clip='zclip'": {"clip": "zclip"},
    "clip='autoclip'": {"clip": "autoclip"},
    "clip='agc'": {"clip": "agc"},
    "repair='auto'": {"repair": "auto"},
    "log_dir=tmp": {"log_dir": None},  # filled with a temporary directory
}


def run(model_name: str, config: str, steps: int) -> dict[str, Any]:
    """Train ``steps`` steps under a Guard and measure its state (see the module docstring)."""
    model, loss_of = workload(model_name)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kw = dict(CONFIGS[config])
    tmp = tempfile.TemporaryDirectory(prefix="gradguard-mem-")
    if "log_dir" in kw:
        kw["log_dir"] = tmp.name
    # Registered before the Guard's, so it runs before the Guard's post-step hook: on a sample step the transient
    # weight copy still exists then.
    inside: dict[str, Sizes] = {}
    want_inside = {"flag": False}
    guard_ref: list[gg.Guard] = []

    def before_guard_post(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if want_inside["flag"]:
            want_inside["flag"] = False
            inside["sample step"] = GuardSizer(model, opt).measure(guard_ref[0])[0]

    opt.register_step_post_hook(before_guard_post)
    tracemalloc.start(1)  # one frame per trace: the innermost is the one attributed
    guard = gg.Guard(model, opt, console=False, **kw)
    guard_ref.append(guard)
    loss_fn = loss_of(model)

    def step() -> None:
        loss = loss_fn()
        guard.observe_loss(loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    # tracemalloc slows every Python allocation (torch's module calls included) several times over: it covers the
    # first tm_steps steps only, and is compared with the walker's host-side bytes at that same point.
    tm_steps = min(steps, TRACEMALLOC_STEPS)
    for _ in range(tm_steps):
        step()
    snap = tracemalloc.take_snapshot()
    tracemalloc.stop()
    # Live allocations whose innermost Python frame is gradguard's (NumPy's buffers are attributed to the line that
    # called NumPy); allocations inside torch's or the stdlib's Python code on gradguard's behalf are not counted.
    host = sum(s.size for s in snap.filter_traces([tracemalloc.Filter(True, GG_DIR + "/*")]).statistics("filename"))
    sizer = GuardSizer(model, opt)
    at_tm = sizer.measure(guard)[0]
    for _ in range(steps - tm_steps):
        step()
    points = {}
    # steps is a multiple of log_every: the last step drained the rows
    points["after a read"], separate = sizer.measure(guard)
    while guard.step % guard.log_every != guard.log_every - 1:  # the most rows pending between two reads
        step()
    points["rows pending"] = sizer.measure(guard)[0]
    while guard.step % guard.sample_every != 0:
        step()
    want_inside["flag"] = True
    step()  # a sample step: measured from inside, before the Guard's post-step hook frees the weight copy
    points.update(inside)
    guard.close()
    tmp.cleanup()
    return {"model": model_name, "config": config, "steps": steps, "param_bytes": param_bytes,
            "points": points, "separate": separate, "tracemalloc_host": host, "tm_steps": tm_steps,
            "walker_host_at_tm": at_tm.numpy + at_tm.python,
            "layers": guard.layers.num_layers, "actions": len(guard._actions)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=["mlp", "gpt2"])
    ap.add_argument("--steps", type=int, help="training steps before measuring (default: mlp 2000, gpt2 700)")
    ap.add_argument("--configs", nargs="*", choices=list(CONFIGS), help="default: all")
    ap.add_argument("--quick", action="store_true", help="60 steps, defaults only: checks that it runs")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    configs = ["defaults"] if args.quick and not args.configs else (args.configs or list(CONFIGS))
    print(f"torch {torch.__version__}, gradguard {gg.__version__}")
    for model_name in ("mlp", "gpt2"):
        if args.only not in (None, model_name):
            continue
        steps = 60 if args.quick else (args.steps or {"mlp": 2000, "gpt2": 700}[model_name])
        steps -= steps % 10  # end on a statistics read (log_every=10)
        print(f"\n{model_name}: {steps} steps per configuration. Guard state: bytes reachable from the Guard, the "
              "larger of after a statistics read and with log_every - 1 rows pending; sample step: the same inside a "
              "sample step (transient weight copy); tracemalloc: see the module docstring")
        print("| Guard | params | Guard state | % of params | after read / rows pending | tensors / numpy / python | "
              "largest parts | inside a sample step (% of params) | host at step 200: tracemalloc / walker | apart |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for config in configs:
            r = run(model_name, config, steps)
            pb, pts = r["param_bytes"], r["points"]
            w = max(pts["after a read"], pts["rows pending"], key=lambda s: s.total)
            apart = "; ".join(f"{k}: {v.total / 1024:.1f} KiB" for k, v in r["separate"].items()) or "-"
            inside = pts.get("sample step")
            inside_cell = f"{inside.total / 1024:.1f} KiB ({100 * inside.total / pb:.1f} %)" if inside else "-"
            actions = f" ({r['actions']} actions kept)" if r["actions"] else ""
            print(f"| {config}{actions} | {pb / 2**20:.2f} MiB | {w.total / 1024:.1f} KiB | "
                  f"{100 * w.total / pb:.2f} % | "
                  f"{pts['after a read'].total / 1024:.1f} / {pts['rows pending'].total / 1024:.1f} KiB | "
                  f"{w.tensor / 1024:.1f} / {w.numpy / 1024:.1f} / {w.python / 1024:.1f} KiB | {w.top()} | "
                  f"{inside_cell} | {r['tracemalloc_host'] / 1024:.1f} / {r['walker_host_at_tm'] / 1024:.1f} KiB | "
                  f"{apart} |", flush=True)


if __name__ == "__main__":
    main()

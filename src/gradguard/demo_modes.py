"""``gradguard demo modes``: what forgetting ``model.eval()`` (or restoring modes wrongly) does, in numbers.

A small MLP with BatchNorm and Dropout is trained on scikit-learn's digits, then evaluated three ways (the numbers
printed are read on the host on purpose: this is a demonstration after training, not a training loop):
``torch.no_grad()`` alone (still in training mode), ``model.eval()`` + ``torch.no_grad()``, and
``gradguard.inference(model)``. A Guard attached to the model says what went wrong, as it happens.

Room: above the Guard. It may touch: ``demo_data``, ``guard``, ``modes``.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

import torch
from torch import nn

from .demo_data import digits
from .guard import Guard
from .modes import inference, mode_table


def _model() -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Dropout(0.3), nn.Linear(128, 10))


def _peak_forward_bytes(model: nn.Module, x: torch.Tensor, grad: str) -> int:
    """Peak memory allocated during one forward (its output kept, as a caller would), measured by torch's
    profiler from its allocation events (CPU), or by the CUDA allocator's peak counter on a GPU."""
    ctx = {"grad": torch.enable_grad(), "no_grad": torch.no_grad(), "inference_mode": torch.inference_mode()}[grad]
    if x.is_cuda:
        torch.cuda.synchronize()  # measurement only, outside any training loop
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with ctx:
            out = model(x)
        del out
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof, ctx:
        out = model(x)
    del out
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """The profiler's native library prints start/stop lines on file descriptor 2; keep the demo readable."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def main() -> int:
    """Run the modes demo. Returns the exit code."""
    torch.manual_seed(0)
    xtr, ytr, xte, yte = digits()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    guard = Guard(model, opt, console=sys.stdout)
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        idx = torch.randint(0, len(xtr), (64,), generator=gen)
        loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()

    print("\n== the model's mode table ==")
    print(mode_table(model))

    x = xte[:32]
    bn = model[1]
    assert isinstance(bn, nn.BatchNorm1d) and bn.running_mean is not None
    print("\n== 1. torch.no_grad() alone: the model is still in training mode ==", flush=True)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    stats = bn.running_mean.clone()
    with torch.no_grad():
        outs = [model(x) for _ in range(3)]
    spread = max((outs[0] - o).abs().max().item() for o in outs[1:])
    moved = (bn.running_mean - stats).abs().max().item()
    print(f"-> the same 32 images, three calls: outputs differ by up to {spread:.3f} (dropout is active)")
    print(f"-> BatchNorm running mean moved by up to {moved:.4f} (validation data overwrote the statistics)")
    with torch.no_grad():  # image 0 normalised among images 1-15, then among images 16-30
        a = model[:2](x[:16])[0]
        b = model[:2](torch.cat([x[:1], x[16:31]]))[0]
    print(f"-> the same image in two different batches: its BatchNorm outputs differ by up to "
          f"{(a - b).abs().max().item():.3f} (batch statistics)")
    try:
        with torch.no_grad():
            model(x[:1])
        print("-> a batch of one ran")
    except ValueError as e:
        print(f"-> a batch of one fails in training mode: {e}")

    model.load_state_dict(trained)  # undo the damage (all BatchNorm statistics) before showing the right way
    print("\n== 2. gradguard.inference(model) ==", flush=True)
    with inference(model):
        outs = [model(x) for _ in range(3)]
        one = model(x[:1])
    model.eval()
    with torch.no_grad():
        want = model(x)
    model.train()
    same = all(torch.equal(o, outs[0]) for o in outs)
    print(f"-> three calls identical: {same}; equal to model.eval() + torch.no_grad(): "
          f"{torch.equal(outs[0], want)}; a batch of one works: {tuple(one.shape)}")
    print(f"-> modes restored afterwards: model.training={model.training}")
    with inference(model):
        acc = (model(xte).argmax(1) == yte).float().mean().item()
    print(f"-> test accuracy {100 * acc:.1f}%")

    print("\n== 3. memory: what no_grad / inference_mode save on a forward ==", flush=True)
    big = xtr[:1024]
    model.eval()
    peaks = {g: _peak_forward_bytes(model, big, g) for g in ("grad", "no_grad", "inference_mode")}
    model.train()
    print(f"-> peak memory of one forward, batch of 1024: {peaks['grad'] / 2**20:.2f} MiB with gradients, "
          f"{peaks['no_grad'] / 2**20:.2f} MiB under no_grad, {peaks['inference_mode'] / 2**20:.2f} MiB under "
          f"inference_mode: {peaks['grad'] / max(peaks['inference_mode'], 1):.1f}x less without autograd's "
          "saved activations")
    guard.close()
    print("\nThe Guard printed each mistake above as it happened; with gradguard.inference() it stayed quiet.",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

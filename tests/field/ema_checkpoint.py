"""Training with an exponential moving average (EMA) of the weights and whole-model checkpoints, in the style of
the research scripts that keep a "shadow" model for evaluation and save the model object itself:

- the script works in its own run directory (``os.chdir``; a fresh temporary one unless ``--workdir`` is given);
- a copy of its own source, found through ``__file__``, is saved into the run directory beside the checkpoints,
  as many scripts do so that a run can be reproduced from its outputs alone;
- the EMA model is a ``copy.deepcopy`` of the model, taken once training is under way (``--ema-start``), and
  updated after every step;
- checkpoints are ``torch.save(model, path)`` (the whole pickled module, not a state_dict) and are read back at
  the end with ``torch.load(..., weights_only=False)``, which pickled modules need.

The task is a two-spirals classification generated in the script (seeded), learnt by an MLP with BatchNorm.

    python ema_checkpoint.py --steps 150 --lr 0.05 --seed 0

Prints the training loss every ``--print-every`` steps as ``step N loss X``, a line per checkpoint, and the test
accuracy of the final model, the EMA model and the last checkpoint read back from disk.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

# Resolved at import, before any chdir: afterwards a relative path would point into the run directory.
SCRIPT = Path(__file__).resolve()


def spirals(n: int, noise: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two interleaved spirals, ``n`` points each: a classic task no linear model can separate."""
    t = torch.rand(n, generator=g) * 3 * math.pi + 0.5
    arm = torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=1) / (3 * math.pi)
    x = torch.cat([arm, -arm]) + noise * torch.randn(2 * n, 2, generator=g)
    y = torch.cat([torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long)])
    return x, y


class Net(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(2, width), nn.BatchNorm1d(width), nn.ReLU(),
            nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU(),
            nn.Linear(width, 2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.mul_(decay).add_(p.detach(), alpha=1.0 - decay)
    # BatchNorm's running statistics are not trained: the EMA takes them as they are.
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was = model.training
    model.eval()  # BatchNorm uses its running statistics, not the test batch's
    acc = (model(x).argmax(1) == y).float().mean().item()
    model.train(was)
    return acc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--ema-decay", type=float, default=0.95)
    ap.add_argument("--ema-start", type=int, default=20, help="step at which the EMA copy is taken")
    ap.add_argument("--ckpt-every", type=int, default=50)
    ap.add_argument("--workdir", default=None, help="run directory (default: a fresh temporary one, removed after)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--print-every", type=int, default=25)
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)

    start_dir = os.getcwd()
    temp = None if args.workdir else tempfile.mkdtemp(prefix="ema-run-")
    run_dir = Path(args.workdir or temp).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    os.chdir(run_dir)  # from here on every relative path is inside the run directory
    try:
        # Keep the code beside its results; the digest goes into the log so two runs can be matched to a source.
        source = SCRIPT.read_bytes()
        shutil.copyfile(SCRIPT, "train_source.py")
        print(f"source {SCRIPT.name} {len(source.splitlines())} lines sha256 {hashlib.sha256(source).hexdigest()[:12]}")
        train(args)
    finally:
        os.chdir(start_dir)  # a temporary directory cannot be removed while it is the working directory
        if temp is not None:
            shutil.rmtree(temp)


def train(args: argparse.Namespace) -> None:
    g = torch.Generator().manual_seed(args.seed)
    x_train, y_train = spirals(400, 0.02, g)
    x_test, y_test = spirals(200, 0.02, g)

    model = Net(args.width)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    criterion = nn.CrossEntropyLoss()
    ema = None

    model.train()
    for step in range(args.steps):
        idx = torch.randint(len(x_train), (args.batch_size,), generator=g)
        loss = criterion(model(x_train[idx]), y_train[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == args.ema_start:
            # Taken after a warm-up: an average that starts from random weights drags the shadow model back
            # toward them for a long time.
            ema = copy.deepcopy(model)
            ema.requires_grad_(False)
        elif ema is not None:
            ema_update(ema, model, args.ema_decay)
        if step % args.print_every == 0 or step == args.steps - 1:
            print(f"step {step:4d} loss {loss.item():.4f}")
        if (step + 1) % args.ckpt_every == 0 or step == args.steps - 1:  # and always the final model
            path = Path("checkpoints") / f"model_{step + 1:05d}.pt"
            path.parent.mkdir(exist_ok=True)
            torch.save(model, path)  # the whole module: its class must be importable when it is loaded
            print(f"saved {path.as_posix()} ({path.stat().st_size > 0})")

    assert Path("train_source.py").read_bytes() == SCRIPT.read_bytes()  # the saved copy is this very file
    last = sorted(Path("checkpoints").glob("model_*.pt"))[-1]
    restored = torch.load(last, weights_only=False)  # a pickled module is not "weights only"
    print(f"test accuracy model {accuracy(model, x_test, y_test):.4f}")
    if ema is not None:
        print(f"test accuracy ema {accuracy(ema, x_test, y_test):.4f}")
    print(f"test accuracy {last.name} {accuracy(restored, x_test, y_test):.4f}")


if __name__ == "__main__":
    main()

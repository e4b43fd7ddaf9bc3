"""Mixed-precision training with gradient accumulation on scikit-learn's handwritten digits, in the style of the
"automatic mixed precision" recipes: the forward runs under ``torch.autocast`` (float16 on the CPU here), the loss is
scaled by ``torch.amp.GradScaler`` so small float16 gradients do not flush to zero, ``--accum`` micro-batches are
accumulated per optimizer step, and before the step the gradients are unscaled (``scaler.unscale_``) so that
``clip_grad_norm_`` sees their true size. The scaler skips a step whose gradients overflowed and lowers its scale.

    python amp_accum.py --steps 60 --lr 0.05 --seed 0

``--steps`` counts optimizer steps (each one ``--accum`` micro-batches). Prints the loss of every ``--print-every``-th
optimizer step as ``step N loss X`` (the mean over its micro-batches), the scaler's scale at the end, and the test
accuracy.
"""

from __future__ import annotations

import argparse

import torch
from sklearn.datasets import load_digits
from torch import nn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--accum", type=int, default=4, help="micro-batches per optimizer step")
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--print-every", type=int, default=10)
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)

    digits = load_digits()  # bundled with scikit-learn: 1797 8x8 images, no download
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0  # pixel values are 0..16
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(42))  # one fixed split for every seed
    test_idx, train_idx = perm[:360], perm[360:]
    x_train, y_train, x_test, y_test = x[train_idx], y[train_idx], x[test_idx], y[test_idx]
    # Standardise with the training statistics only.
    mean, std = x_train.mean(0), x_train.std(0) + 1e-3
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std

    model = nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Dropout(0.1),
        nn.Linear(128, 128), nn.ReLU(), nn.Dropout(0.1),
        nn.Linear(128, 10),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True)
    scaler = torch.amp.GradScaler("cpu")
    criterion = nn.CrossEntropyLoss()
    dtype = getattr(torch, args.dtype)

    g = torch.Generator().manual_seed(args.seed)
    order, pos = torch.randperm(len(x_train), generator=g), 0

    def micro_batch() -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal order, pos
        if pos + args.micro_batch > len(order):  # next epoch: a fresh shuffle
            order, pos = torch.randperm(len(x_train), generator=g), 0
        idx = order[pos:pos + args.micro_batch]
        pos += args.micro_batch
        return x_train[idx], y_train[idx]

    model.train()
    optimizer.zero_grad(set_to_none=True)
    for step in range(args.steps):
        step_loss = 0.0
        for _ in range(args.accum):
            xb, yb = micro_batch()
            with torch.autocast(device_type="cpu", dtype=dtype):
                loss = criterion(model(xb), yb)
            # Divide by the number of micro-batches: the accumulated gradient is then that of the mean loss over
            # the whole effective batch, and the learning rate does not depend on --accum.
            scaler.scale(loss / args.accum).backward()
            step_loss += loss.item() / args.accum
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        scaler.step(optimizer)  # skipped if unscale_ found inf/NaN
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if step % args.print_every == 0 or step == args.steps - 1:
            print(f"step {step:4d} loss {step_loss:.4f}")

    model.eval()
    with torch.no_grad(), torch.autocast(device_type="cpu", dtype=dtype):
        acc = (model(x_test).argmax(1) == y_test).float().mean().item()
    print(f"scale {scaler.get_scale():g}")
    print(f"test accuracy {acc:.4f}")


if __name__ == "__main__":
    main()

"""An LSTM learns to continue sine waves, trained full-batch with L-BFGS, in the style of the classic
"time sequence prediction" example: two stacked ``LSTMCell``s unrolled by hand over the sequence, MSE on the
next value, ``optimizer.step(closure)`` where the closure re-evaluates the loss and its gradient as often as
L-BFGS asks.

    python lstm_lbfgs.py --steps 6 --lr 0.8 --seed 0

Prints the loss of every ``--print-every``-th L-BFGS step (the loss at the start of the step, as ``step N loss X``),
the test loss after it, and the test loss of a free-running continuation of the waves at the end.
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn


def sine_waves(n: int, length: int, period: float, seed: int) -> torch.Tensor:
    """``n`` sine waves of one period, each shifted by a random phase: (n, length)."""
    g = torch.Generator().manual_seed(seed)
    shift = torch.randint(-4 * int(period), 4 * int(period), (n, 1), generator=g)
    t = torch.arange(length).unsqueeze(0) + shift
    return torch.sin(2 * math.pi * t / period).float()


class Sequence(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.cell1 = nn.LSTMCell(1, hidden)
        self.cell2 = nn.LSTMCell(hidden, hidden)
        self.out = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor, future: int = 0) -> torch.Tensor:
        """Read ``x`` (batch, time) one value at a time, then feed the model its own predictions ``future`` times."""
        b = x.size(0)
        h1, c1, h2, c2 = (torch.zeros(b, self.hidden) for _ in range(4))
        outputs = []
        y = x.new_zeros(b, 1)
        for xt in x.split(1, dim=1):
            h1, c1 = self.cell1(xt, (h1, c1))
            h2, c2 = self.cell2(h1, (h2, c2))
            y = self.out(h2)
            outputs.append(y)
        for _ in range(future):  # free-running: the prediction is the next input
            h1, c1 = self.cell1(y, (h1, c1))
            h2, c2 = self.cell2(h1, (h2, c2))
            y = self.out(h2)
            outputs.append(y)
        return torch.cat(outputs, dim=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6, help="L-BFGS steps (each runs up to --max-iter evaluations)")
    ap.add_argument("--lr", type=float, default=0.8)
    ap.add_argument("--max-iter", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=24)
    ap.add_argument("--length", type=int, default=50)
    ap.add_argument("--future", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--print-every", type=int, default=1)
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)

    data = sine_waves(24, args.length + args.future + 1, period=20.0, seed=args.seed)
    # Train on 20 waves, test on 4; the target of each input is the value one time step later.
    seen = data[:, : args.length + 1]
    train_x, train_y = seen[4:, :-1], seen[4:, 1:]
    test_x, test_y = seen[:4, :-1], seen[:4, 1:]
    test_future = data[:4, args.length + 1:]

    model = Sequence(args.hidden)
    criterion = nn.MSELoss()
    # L-BFGS builds a curvature estimate from the last few gradients; full-batch, deterministic: no shuffling.
    optimizer = torch.optim.LBFGS(model.parameters(), lr=args.lr, max_iter=args.max_iter)

    for step in range(args.steps):
        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = criterion(model(train_x), train_y)
            loss.backward()
            return loss

        loss = optimizer.step(closure)  # the loss of the first evaluation, i.e. before this step's updates
        with torch.no_grad():
            test_loss = criterion(model(test_x), test_y).item()
        if step % args.print_every == 0 or step == args.steps - 1:
            print(f"step {step:4d} loss {loss.item():.6f} test {test_loss:.6f}")

    with torch.no_grad():
        pred = model(test_x, future=args.future)
        future_loss = criterion(pred[:, -args.future:], test_future).item()
    print(f"free-running test loss over {args.future} steps {future_loss:.6f}")


if __name__ == "__main__":
    main()

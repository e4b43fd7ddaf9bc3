"""What the demos and the reproductions train on: scikit-learn's bundled digits, the generated adding problem, and
the small models the stories compare. Plain functions of a seed: no Guard here (``demo`` and ``demo_modes`` both
import from this module, never from each other).

Room: above the Guard. It may touch: no other module.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn


def digits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8x8 digits, shuffled with ``seed``, standardised: 1400 train / 397 test samples.

    Raises:
        ImportError: scikit-learn is not installed, with the command that installs it.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # optional extra
        raise ImportError("the demo data comes from scikit-learn: pip install 'gradguard[demo]'") from e
    x, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(seed).permutation(len(x))
    x, y = x[perm], y[perm]
    x = (x - x[:1400].mean(0)) / (x[:1400].std(0) + 1e-6)
    xt = torch.tensor(x, dtype=torch.float32)
    yt = torch.tensor(y, dtype=torch.long)
    return xt[:1400], yt[:1400], xt[1400:], yt[1400:]


def adding_batch(batch: int, length: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The adding problem (Hochreiter & Schmidhuber 1997): (value, marker) pairs over ``length`` steps; the target
    is the sum of the two marked values, one in each half. Predicting the mean scores an MSE of 1/6."""
    values = torch.rand(batch, length, generator=gen)
    marks = torch.zeros(batch, length)
    half = length // 2
    rows = torch.arange(batch)
    marks[rows, torch.randint(0, half, (batch,), generator=gen)] = 1.0
    marks[rows, torch.randint(half, length, (batch,), generator=gen)] = 1.0
    return torch.stack([values, marks], dim=-1), (values * marks).sum(1, keepdim=True)


def mlp(depth: int, width: int, act: type[nn.Module], init: Callable[[nn.Linear], None] | None = None,
        d_in: int = 64, d_out: int = 10) -> nn.Sequential:
    """``depth`` hidden Linear+activation blocks and a Linear head (module names '0', '1', ...)."""
    layers: list[nn.Module] = []
    d = d_in
    for _ in range(depth):
        lin = nn.Linear(d, width)
        if init is not None:
            init(lin)
        layers += [lin, act()]
        d = width
    layers.append(nn.Linear(d, d_out))
    return nn.Sequential(*layers)


def kaiming(lin: nn.Linear) -> None:
    """He et al. 2015 initialisation for a layer followed by ReLU, zero bias."""
    nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
    nn.init.zeros_(lin.bias)


class Recurrent(nn.Module):
    """A recurrent layer (tanh RNN or LSTM) reading the sequence, a linear head on its last state."""

    def __init__(self, cell: str, hidden: int = 32) -> None:
        super().__init__()
        self.rnn = nn.RNN(2, hidden, batch_first=True) if cell == "rnn" else nn.LSTM(2, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])

"""``gradguard demo``: three short runs on scikit-learn's bundled digits, with gradguard's diagnoses printed.

1. a deep sigmoid MLP (vanishing gradients: the early layers stop learning);
2. the same depth with ReLU and Kaiming initialisation (healthy: gradguard stays silent);
3. a shallow MLP with a learning rate far too high (exploding gradients, then NaN).

Runs in seconds on a laptop CPU. Needs scikit-learn (``pip install 'gradguard[demo]'``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from .guard import Guard


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


def _train(title: str, model: nn.Module, lr: float, steps: int, seed: int = 0) -> None:
    print(f"\n== {title} ==", flush=True)
    xtr, ytr, xte, yte = digits()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    with Guard(model, opt, console=sys.stdout) as guard:
        for _ in range(steps):
            idx = torch.randint(0, len(xtr), (64,), generator=gen)
            loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            guard.observe_loss(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
        found = guard.diagnoses
    with torch.no_grad():
        acc = (model.eval()(xte).argmax(1) == yte).float().mean().item()  # demo output, after training
    kinds = ", ".join(sorted({d.kind for d in found})) or "none: healthy"
    print(f"-> test accuracy {100 * acc:.1f}% after {steps} steps; diagnoses: {kinds}", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the three demo trainings. Returns the exit code."""
    torch.manual_seed(0)
    torch.set_num_threads(min(4, torch.get_num_threads()))
    _train("deep sigmoid MLP (10 layers, SGD lr 0.1)", mlp(10, 64, nn.Sigmoid), lr=0.1, steps=300)
    torch.manual_seed(0)
    _train("same depth, ReLU + Kaiming init (SGD lr 0.01)", mlp(10, 64, nn.ReLU, kaiming), lr=0.01, steps=300)
    torch.manual_seed(0)
    _train("3-layer ReLU MLP, learning rate far too high (SGD lr 1.0)", mlp(3, 128, nn.ReLU), lr=1.0, steps=60)
    print("\nEach diagnosis names the layers, the numbers behind it and what to do. "
          "Attach it to your own loop with gradguard.Guard(model, optimizer).", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

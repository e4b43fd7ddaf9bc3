"""The README's doctor example, timed: a 10-layer sigmoid MLP on scikit-learn's digits, each candidate remedy for
its vanishing gradients tried in a 300-step trial (SGD, lr 0.1, momentum 0.9, batch 64), ranked by ``gg.doctor``.

Prints each trial, best first, with its test accuracy, then the torch threads used and the wall time of the trials
(imports and data loading left out). The README's sentence on the doctor quotes this output::

    OMP_NUM_THREADS=1 python benchmarks/doctor_time.py
"""

from __future__ import annotations

import time

import torch
from torch import nn

import gradguard as gg
from gradguard.demo_data import digits, mlp


def main() -> None:
    """Run the doctor on the deep sigmoid MLP and print the ranking, the threads and the time taken."""
    xtr, ytr, xte, yte = digits()

    def build() -> tuple[nn.Module, torch.optim.Optimizer]:
        m = mlp(10, 64, nn.Sigmoid)
        return m, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)

    def train(m: nn.Module, opt: torch.optim.Optimizer) -> list[float]:
        gen = torch.Generator().manual_seed(0)
        losses = []
        for _ in range(300):
            idx = torch.randint(0, len(xtr), (64,), generator=gen)
            loss = nn.functional.cross_entropy(m(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    def accuracy(m: nn.Module | None) -> float:
        if m is None:
            return float("nan")
        with gg.inference(m):
            return (m(xte).argmax(1) == yte).float().mean().item()

    torch.manual_seed(0)
    vanishing = gg.Diagnosis("vanishing", "warning", 99, ["0"], "Vanishing gradients through depth")
    start = time.perf_counter()
    trials = gg.doctor(build, train, vanishing)
    took = time.perf_counter() - start
    for trial in trials:
        print(f"test accuracy {accuracy(trial.model):6.1%}  {trial}")
    print(f"{len(trials)} trials of 300 steps in {took:.1f} s on {torch.get_num_threads()} torch thread(s)")


if __name__ == "__main__":
    main()

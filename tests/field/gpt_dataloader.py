"""A small GPT learns to add two 2-digit numbers, fed by a ``DataLoader`` with worker processes, in the style of
the "GPT learns addition" demos: each example is the digits of ``a``, ``b`` and of the sum written backwards
(``a=12, b=39`` -> ``1 2 3 9 1 5 0``), so the model produces the sum from its lowest digit up, the order in which
carries are computed. The loss covers the sum digits only (the others are ``ignore_index``).

The model is PyTorch's own ``nn.TransformerEncoder`` with a causal mask (pre-LayerNorm layers), as in the
tutorials that build a language model from library layers.

    python gpt_dataloader.py --steps 200 --lr 5e-3 --seed 0

``num_workers=2`` needs the ``if __name__ == "__main__":`` guard (worker start methods that re-import this file).
Prints the training loss every ``--print-every`` steps as ``step N loss X``, then the exact-match accuracy of
greedy decoding on held-out pairs.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

NDIGIT = 2
SEQ = 3 * NDIGIT + 1  # a, b, then the sum (NDIGIT + 1 digits, reversed)


def encode(a: int, b: int) -> list[int]:
    s = a + b
    return [int(c) for c in f"{a:0{NDIGIT}d}{b:0{NDIGIT}d}"] + [int(c) for c in f"{s:0{NDIGIT + 1}d}"[::-1]]


class Addition(Dataset):
    """Every pair (a, b) whose index lands in ``split``; inputs are all tokens but the last, targets the next
    token, with the prompt's own positions masked out (the model is not asked to predict the random operands)."""

    def __init__(self, pairs: list[tuple[int, int]]) -> None:
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        seq = torch.tensor(encode(*self.pairs[i]), dtype=torch.long)
        x, y = seq[:-1].clone(), seq[1:].clone()
        y[: 2 * NDIGIT - 1] = -100  # positions whose next token is still part of the question
        return x, y


class AdderGPT(nn.Module):
    def __init__(self, width: int, heads: int, layers: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(10, width)
        self.pos = nn.Parameter(torch.zeros(1, SEQ, width))
        layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        # enable_nested_tensor only helps padded batches, and warns with norm_first: off.
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, 10)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.size(1)
        mask = nn.Transformer.generate_square_subsequent_mask(t)  # -inf above the diagonal: no peeking ahead
        h = self.encoder(self.tok(idx) + self.pos[:, :t], mask=mask, is_causal=True)
        return self.head(self.ln(h))


@torch.no_grad()
def accuracy(model: nn.Module, pairs: list[tuple[int, int]]) -> float:
    """Greedy decoding of the sum digits, one at a time, from the question alone."""
    model.eval()
    seqs = torch.tensor([encode(a, b) for a, b in pairs])
    idx = seqs[:, : 2 * NDIGIT]
    for _ in range(NDIGIT + 1):
        nxt = model(idx)[:, -1].argmax(-1, keepdim=True)
        idx = torch.cat([idx, nxt], dim=1)
    model.train()
    return (idx[:, 2 * NDIGIT:] == seqs[:, 2 * NDIGIT:]).all(1).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--width", type=int, default=48)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--print-every", type=int, default=25)
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)

    # A fixed split of all 10,000 pairs: the test pairs are never seen in training.
    order = torch.randperm(10 ** (2 * NDIGIT), generator=torch.Generator().manual_seed(1234)).tolist()
    pairs = [(i // 10 ** NDIGIT, i % 10 ** NDIGIT) for i in order]
    test_pairs, train_pairs = pairs[:500], pairs[500:]

    # The shuffling generator is seeded: the same batches in the same order on every run, workers or not.
    # persistent_workers keeps the two worker processes alive across epochs (starting them costs more than a step).
    loader = DataLoader(Addition(train_pairs), batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                        persistent_workers=args.workers > 0, generator=torch.Generator().manual_seed(args.seed))

    model = AdderGPT(args.width, args.heads, args.layers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    criterion = nn.CrossEntropyLoss(ignore_index=-100)

    step = 0
    model.train()
    while step < args.steps:
        for x, y in loader:
            logits = model(x)
            loss = criterion(logits.reshape(-1, 10), y.reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step % args.print_every == 0 or step == args.steps - 1:
                print(f"step {step:4d} loss {loss.item():.4f}")
            step += 1
            if step == args.steps:
                break

    print(f"test exact-match accuracy {accuracy(model, test_pairs):.3f}")


if __name__ == "__main__":
    main()

"""Character-level GPT on the Zen of Python, in the style of the small "train a GPT on Shakespeare" scripts.

A decoder-only transformer (pre-LayerNorm blocks, causal self-attention, GELU MLP) learns to predict the next
character. The optimisation is the usual recipe of those scripts: AdamW with weight decay on the matrices only,
a linear warm-up followed by a cosine decay (``LambdaLR``), and ``clip_grad_norm_`` before every step.

    python char_gpt.py --steps 150 --lr 3e-3 --seed 0

Prints the training loss every ``--print-every`` steps as ``step N loss X``, then the validation loss and a greedy
sample. Everything is seeded, so two runs with the same flags print the same numbers.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import io
import math

import torch
from torch import nn
from torch.nn import functional as F


def corpus() -> str:
    """The Zen of Python: `import this` prints it (rot13-encoded in the module), so keep the import quiet."""
    with contextlib.redirect_stdout(io.StringIO()):
        import this
    return codecs.decode(this.s, "rot13")


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, block: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        # A buffer, not a parameter: the mask moves with the model and is saved with it, but is never trained.
        self.register_buffer("mask", torch.tril(torch.ones(block, block, dtype=torch.bool)).view(1, 1, block, block))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        # (b, heads, t, head_dim): every head attends over the time axis independently
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))
        att = att.masked_fill(~self.mask[:, :, :t, :t], float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).contiguous().view(b, t, c)
        return self.proj(y)


class Block(nn.Module):
    def __init__(self, width: int, heads: int, block: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads, block)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Pre-norm residual blocks: the residual stream itself is never normalised, which keeps deep stacks stable.
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int, width: int, heads: int, layers: int, block: int) -> None:
        super().__init__()
        self.block = block
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(block, width)
        self.blocks = nn.Sequential(*[Block(width, heads, block) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        # GPT-2's small-normal initialisation; PyTorch's defaults are tuned for other architectures.
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        t = idx.size(1)
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        logits = self.head(self.ln_f(self.blocks(x)))
        loss = None if targets is None else F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=3e-3, help="peak learning rate, reached after --warmup steps")
    ap.add_argument("--warmup", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--width", type=int, default=48)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--print-every", type=int, default=25)
    args = ap.parse_args()

    torch.set_num_threads(1)  # tiny model: more threads only add contention
    torch.manual_seed(args.seed)

    text = corpus()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    n = int(0.9 * len(data))
    train, val = data[:n], data[n:]
    print(f"corpus {len(text)} chars, vocab {len(chars)}")

    def batch(split: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ix = torch.randint(len(split) - args.block - 1, (args.batch_size,))
        x = torch.stack([split[i:i + args.block] for i in ix])
        y = torch.stack([split[i + 1:i + 1 + args.block] for i in ix])
        return x, y

    model = GPT(len(chars), args.width, args.heads, args.layers, args.block)
    # Weight decay on matrices only: decaying LayerNorm gains and biases just pulls them toward zero for no gain.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))

    def lr_factor(step: int) -> float:
        # Linear warm-up lets Adam's second-moment estimates settle before full-size steps; then cosine to 10%.
        if step < args.warmup:
            return (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)

    model.train()
    for step in range(args.steps):
        x, y = batch(train)
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optimizer.step()
        scheduler.step()
        if step % args.print_every == 0 or step == args.steps - 1:
            print(f"step {step:4d} loss {loss.item():.4f}")

    model.eval()
    with torch.no_grad():
        losses = [model(*batch(val))[1].item() for _ in range(8)]
        print(f"val loss {sum(losses) / len(losses):.4f}")
        # Greedy decoding: deterministic, and harmless even if training diverged (argmax of NaN is still an index).
        idx = torch.tensor([[stoi["B"]]])
        for _ in range(40):
            logits, _ = model(idx[:, -args.block:])
            idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    print("sample", repr("".join(chars[i] for i in idx[0].tolist())))


if __name__ == "__main__":
    main()

"""Word-level LSTM language model trained with plain, hand-written SGD, in the style of the classic
"word language model" example: the corpus is laid out in ``--batch-size`` parallel columns, the model reads it in
windows of ``--bptt`` words (truncated backpropagation through time, the hidden state carried over but detached),
gradients are clipped with ``clip_grad_norm_`` and the update is ``p -= lr * grad`` written by hand, with the
learning rate divided by 4 whenever the validation loss stops improving.

    python word_lm_sgd.py --steps 150 --lr 10 --seed 0

The corpus is generated here from a small grammar (seeded), so no download is needed. Prints the training loss
every ``--print-every`` steps as ``step N loss X``, the validation loss at every evaluation, and the test
perplexity at the end.
"""

from __future__ import annotations

import argparse
import math
import random

import torch
from torch import nn

# A toy grammar: enough structure (agreement of determiners, verbs taking objects) for an LSTM to learn quickly.
NOUNS = ["cat", "dog", "bird", "child", "teacher", "farmer", "horse", "robot"]
VERBS_T = ["sees", "likes", "chases", "feeds", "follows"]
VERBS_I = ["sleeps", "runs", "sings", "waits"]
ADJS = ["big", "small", "old", "quick", "lazy"]
PLACES = ["garden", "house", "river", "market"]


def sentence(rng: random.Random) -> list[str]:
    def np_() -> list[str]:
        words = [rng.choice(["the", "a"])]
        if rng.random() < 0.4:
            words.append(rng.choice(ADJS))
        return words + [rng.choice(NOUNS)]

    words = np_()
    if rng.random() < 0.6:
        words += [rng.choice(VERBS_T)] + np_()
    else:
        words += [rng.choice(VERBS_I)]
    if rng.random() < 0.3:
        words += ["in", "the", rng.choice(PLACES)]
    return words + ["<eos>"]


def make_corpus(n_sentences: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [w for _ in range(n_sentences) for w in sentence(rng)]


def batchify(ids: torch.Tensor, bsz: int) -> torch.Tensor:
    """Lay the token stream out as ``bsz`` columns; each column is read top to bottom as one long sequence."""
    n = ids.size(0) // bsz
    return ids[: n * bsz].view(bsz, n).t().contiguous()


def get_batch(source: torch.Tensor, i: int, bptt: int) -> tuple[torch.Tensor, torch.Tensor]:
    seq_len = min(bptt, len(source) - 1 - i)
    return source[i:i + seq_len], source[i + 1:i + 1 + seq_len].reshape(-1)


class RNNModel(nn.Module):
    """Embedding -> LSTM -> linear decoder, the decoder tied to the embedding (Press & Wolf 2017)."""

    def __init__(self, vocab: int, size: int, layers: int, dropout: float) -> None:
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(vocab, size)
        self.rnn = nn.LSTM(size, size, layers, dropout=dropout)
        self.decoder = nn.Linear(size, vocab)
        self.decoder.weight = self.encoder.weight  # tied: one matrix, fewer parameters, better perplexity
        self.layers, self.size = layers, size
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def forward(self, x: torch.Tensor, hidden: tuple[torch.Tensor, torch.Tensor]):
        out, hidden = self.rnn(self.drop(self.encoder(x)), hidden)
        return self.decoder(self.drop(out)).view(-1, self.decoder.out_features), hidden

    def init_hidden(self, bsz: int) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.zeros(self.layers, bsz, self.size)
        return z, z.clone()


def repackage(hidden: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Cut the graph between windows: without it, backward would run through the whole history every step."""
    return tuple(h.detach() for h in hidden)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150, help="training windows (BPTT batches) in all")
    ap.add_argument("--lr", type=float, default=10.0, help="initial learning rate (plain SGD)")
    ap.add_argument("--clip", type=float, default=0.25)
    ap.add_argument("--bptt", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--size", type=int, default=32, help="embedding and hidden size (tied)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--print-every", type=int, default=25)
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)

    words = make_corpus(900, args.seed)
    vocab = sorted(set(words))
    stoi = {w: i for i, w in enumerate(vocab)}
    ids = torch.tensor([stoi[w] for w in words], dtype=torch.long)
    n = len(ids)
    train = batchify(ids[: int(0.8 * n)], args.batch_size)
    val = batchify(ids[int(0.8 * n): int(0.9 * n)], 10)
    test = batchify(ids[int(0.9 * n):], 10)
    print(f"corpus {n} words, vocab {len(vocab)}")

    model = RNNModel(len(vocab), args.size, args.layers, args.dropout)
    criterion = nn.CrossEntropyLoss()

    def evaluate(source: torch.Tensor) -> float:
        model.eval()  # dropout off
        total, count = 0.0, 0
        hidden = model.init_hidden(source.size(1))
        with torch.no_grad():
            for i in range(0, source.size(0) - 1, args.bptt):
                x, y = get_batch(source, i, args.bptt)
                out, hidden = model(x, hidden)
                total += len(x) * criterion(out, y).item()
                count += len(x)
        model.train()
        return total / count

    lr = args.lr
    best_val = None
    hidden = model.init_hidden(args.batch_size)
    i = 0
    model.train()
    for step in range(args.steps):
        if i >= train.size(0) - 2:  # end of the columns: a new epoch starts from a fresh hidden state
            i, hidden = 0, model.init_hidden(args.batch_size)
        x, y = get_batch(train, i, args.bptt)
        i += args.bptt
        hidden = repackage(hidden)
        model.zero_grad()
        out, hidden = model(x, hidden)
        loss = criterion(out, y)
        loss.backward()
        # Clipping keeps the occasional huge LSTM gradient from throwing the weights off (Pascanu et al. 2013).
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        for p in model.parameters():
            p.data.add_(p.grad, alpha=-lr)
        if step % args.print_every == 0 or step == args.steps - 1:
            print(f"step {step:4d} loss {loss.item():.4f}")
        if (step + 1) % args.eval_every == 0:
            v = evaluate(val)
            print(f"val loss {v:.4f} lr {lr:g}")
            if best_val is not None and not v < best_val:
                lr /= 4.0  # annealing: a plateau means the steps are now too big for the valley
            else:
                best_val = v

    t = evaluate(test)
    # A diverged run can leave a loss too large for exp(): say so rather than crash.
    ppl = math.exp(t) if t < 700 else float("inf")
    print(f"test loss {t:.4f} ppl {ppl:.2f}")


if __name__ == "__main__":
    main()

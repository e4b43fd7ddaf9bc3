"""``gradguard demo [vanishing|exploding|modes|all]``: each phenomenon and its fix, side by side, on real bundled
data (scikit-learn's digits) and the generated adding problem, with gradguard's diagnoses, a final table and an
HTML report per run. Trains on one torch thread: 43 s on a 2-core machine busy with other work (README). Needs
``pip install 'gradguard[demo]'``.

- vanishing: a deep sigmoid MLP vs the same depth with ReLU + Kaiming; a tanh RNN vs an LSTM on the adding problem
  at T=100 (vanishing through time: the start of the sequence is forgotten);
- exploding: a learning rate far too high, untreated, with clipping alone, repaired by ``repair="auto"`` while it
  trains, and set right by hand;
- modes: the train/eval pitfalls (``gradguard.demo_modes``).

Room: above the Guard. It may touch: ``demo_data``, ``demo_modes``, ``guard``, ``report.html``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO, cast

import torch
from torch import nn

from .demo_data import Recurrent, adding_batch, digits, kaiming, mlp
from .guard import Guard

__all__ = ["Recurrent", "adding_batch", "digits", "kaiming", "main", "mlp"]


@dataclass
class Result:
    story: str
    run: str
    metric: str
    value: float
    kinds: list[str]
    report: Path | None


class _Progress:
    """rich progress bars when rich is installed, a plain line per run otherwise."""

    def __init__(self) -> None:
        try:
            from rich.progress import Progress

            self.bar: Any = Progress(transient=True)
        except ImportError:
            self.bar = None

    def __enter__(self) -> _Progress:
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def task(self, label: str, total: int) -> Callable[[], None]:
        if self.bar is None:
            print(f"   {label} ...", flush=True)
            return lambda: None
        tid = self.bar.add_task(label, total=total)
        return lambda: self.bar.advance(tid)


class _Labelled:
    """The console stream of one run: each block gradguard prints starts ``[gradguard: LABEL]`` instead of
    ``[gradguard]``, so the diagnoses of two runs that look alike (a tanh RNN and an LSTM both vanishing in 'rnn')
    say which run they belong to. Everything else is the wrapped stream's (rich reads ``isatty`` for colour).

    Args:
        stream: the stream written to. label: the run's label, as in the final table.
    """

    def __init__(self, stream: TextIO, label: str) -> None:
        self._stream = stream
        self._tag = f"[gradguard: {label}]"

    def write(self, text: str) -> int:
        self._stream.write(text.replace("[gradguard]", self._tag))
        return len(text)

    def __getattr__(self, name: str) -> Any:  # flush, isatty, encoding, fileno: the wrapped stream's
        return getattr(self._stream, name)


def _console(label: str) -> TextIO:
    """Where one run's live diagnoses go: stdout, labelled with the run."""
    return cast(TextIO, _Labelled(sys.stdout, label))


def _slug(label: str) -> str:
    return "-".join("".join(c if c.isalnum() or c == "." else " " for c in label.lower()).split())


def _first_seen(guard: Guard) -> list[str]:
    """Each diagnosis kind with the step it was first reported at, and the repairs made (clips left out)."""
    first: dict[str, int] = {}
    for d in guard.diagnoses:
        first.setdefault(d.kind, d.step)
    repairs = sorted({a.kind for a in guard.actions if a.kind != "clip"})
    return [f"{k} (step {s})" for k, s in first.items()] + ([f"repaired: {'+'.join(repairs)}"] if repairs else [])


def _report(log_dir: Path) -> Path | None:
    try:
        from .report.html import write_report

        return write_report(log_dir)
    except Exception:  # the report is a bonus (matplotlib may be missing); the demo's numbers stand without it
        return None


def _train_digits(story: str, label: str, model: nn.Module, lr: float, steps: int, out: Path, progress: _Progress,
                  clip: float | None = None, repair: bool = False) -> Result:
    xtr, ytr, xte, yte = digits()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    log_dir = out / story / _slug(label)
    tick = progress.task(label, steps)
    with Guard(model, opt, console=_console(label), log_dir=log_dir, repair="auto" if repair else False) as guard:
        for _ in range(steps):
            idx = torch.randint(0, len(xtr), (64,), generator=gen)
            loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            guard.observe_loss(loss)
            opt.zero_grad()
            loss.backward()
            if clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            tick()
        kinds = _first_seen(guard)
    model.eval()
    with torch.no_grad():
        acc = (model(xte).argmax(1) == yte).float().mean().item()  # demo output, after training
    return Result(story, label, "test accuracy", 100 * acc, kinds, _report(log_dir))


def _train_adding(story: str, label: str, model: nn.Module, steps: int, out: Path, progress: _Progress,
                  length: int = 100) -> Result:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    log_dir = out / story / _slug(label)
    tick = progress.task(label, steps)
    with Guard(model, opt, console=_console(label), log_dir=log_dir) as guard:
        for _ in range(steps):
            x, y = adding_batch(32, length, gen)
            loss = nn.functional.mse_loss(model(x), y)
            guard.observe_loss(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
            tick()
        kinds = _first_seen(guard)
    x, y = adding_batch(512, length, torch.Generator().manual_seed(1))
    with torch.no_grad():
        mse = nn.functional.mse_loss(model.eval()(x), y).item()  # demo output, after training
    return Result(story, label, "test MSE (1/6 = guessing)", mse, kinds, _report(log_dir))


def vanishing(out: Path, progress: _Progress) -> list[Result]:
    """Deep sigmoid MLP vs ReLU + Kaiming; tanh RNN vs LSTM on the adding problem (T=100)."""
    torch.manual_seed(0)
    r = [_train_digits("vanishing", "sigmoid MLP, 10 layers", mlp(10, 64, nn.Sigmoid), 0.1, 300, out, progress)]
    torch.manual_seed(0)
    r.append(_train_digits("vanishing", "ReLU + Kaiming, 10 layers", mlp(10, 64, nn.ReLU, kaiming), 0.01, 300,
                           out, progress))
    torch.manual_seed(0)
    r.append(_train_adding("vanishing", "tanh RNN, T=100", Recurrent("rnn"), 400, out, progress))
    torch.manual_seed(0)
    r.append(_train_adding("vanishing", "LSTM, T=100", Recurrent("lstm"), 1300, out, progress))
    return r


def exploding(out: Path, progress: _Progress) -> list[Result]:
    """A learning rate far too high: untreated, with clipping alone, repaired by gradguard while it trains, and
    set right by hand."""
    r = []
    for label, lr, clip, repair in (("lr 1.0", 1.0, None, False), ("lr 1.0, clip norm 1", 1.0, 1.0, False),
                                    ("lr 1.0, repair='auto'", 1.0, None, True), ("lr 0.1", 0.1, None, False)):
        torch.manual_seed(0)
        r.append(_train_digits("exploding", label, mlp(3, 128, nn.ReLU), lr, 300, out, progress, clip, repair))
    return r


def _table(results: list[Result]) -> None:
    headers = ("story", "run", "result", "diagnoses", "report")
    rows = [(r.story, r.run, f"{r.metric} {r.value:.3g}" if r.metric.startswith("test MSE")
             else f"{r.metric} {r.value:.1f}%", ", ".join(r.kinds) or "none (healthy)",
             str(r.report) if r.report else "-") for r in results]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print("\n" + " | ".join(headers))
        for row in rows:
            print(" | ".join(row))
        return
    table = Table(*headers, title="gradguard demo: each problem and its fix")
    for row in rows:
        table.add_row(*row)
    Console(file=sys.stdout, width=220).print(table)


def main(story: str = "all", out_dir: str | Path = "gradguard-demo") -> int:
    """Run the chosen demo story on one torch thread (restored afterwards).

    One thread: the models are small (a thread pool costs more than it saves), other work on the machine slows the
    demo less, and the thread count cannot change the numbers it prints (the README's table is its output).

    Args:
        story: "vanishing", "exploding", "modes" or "all".
        out_dir: where the run directories and HTML reports are written.

    Returns:
        The exit code.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(story, Path(out_dir))
    finally:
        torch.set_num_threads(threads)


def _run(story: str, out: Path) -> int:
    """The stories of ``main``, on one thread. Returns the exit code."""
    results: list[Result] = []
    with _Progress() as progress:
        if story in ("all", "vanishing"):
            print("\n== vanishing gradients: through depth and through time ==", flush=True)
            results += vanishing(out, progress)
        if story in ("all", "exploding"):
            print("\n== exploding gradients: a learning rate far too high ==", flush=True)
            results += exploding(out, progress)
    if results:
        _table(results)
    if story in ("all", "modes"):
        from .demo_modes import main as modes_main

        modes_main()
    print("\nAttach it to your own loop with gradguard.Guard(model, optimizer), or run an unmodified script with "
          "`gradguard run script.py`.", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:2]))

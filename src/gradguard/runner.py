"""``gradguard run SCRIPT [ARGS...]``: run an unmodified training script with every optimizer it steps watched.

A global optimizer step pre-hook sees each optimizer at its first step; the model it trains is found then, once,
as the outermost ``nn.Module`` that owns the optimizer's parameters (a one-time scan of live objects, so nothing is
added to any forward), and a Guard is attached to that model and optimizer.

The script runs the way ``python SCRIPT ARGS...`` runs it, and the tests compare the two: a fresh ``__main__``
module with an absolute ``__file__``, ``sys.argv[0]`` as typed, ``sys.path[0]`` the script's real directory, a
directory or zip file with a ``__main__.py`` run through runpy as Python does, the traceback of an uncaught exception
without gradguard's frames, and Python's own exit status (``SystemExit`` and ``KeyboardInterrupt`` are handed back
to the interpreter, which turns them into the status exactly as for a plain run). gradguard only adds its lines on
stderr; if gradguard itself fails it says so once and the script runs on unwatched.

Room: above the Guard. It may touch: ``gradguard``, ``guard``, ``report.outputs``, ``script``, ``stats``,
``stats.layers``, ``stats.script_hooks``.
"""

from __future__ import annotations

import gc
import json
import os
import shlex
import sys
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from . import __version__
from .guard import Guard
from .report.outputs import run_meta
from .script import RunError, execute, find_target, fresh_main, print_uncaught, silence_excepthook_for, trim_traceback
from .stats import script_hooks
from .stats.layers import is_compiled, unwrap

LOG_FILES = ("meta.json", "stats.jsonl", "events.jsonl")  # what a Guard writes into its log_dir


def _say(message: str) -> None:
    """One gradguard line on stderr (the script's stdout stays the script's alone)."""
    print(f"[gradguard] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# The run directory


def default_out_dir(script: Path) -> Path:
    """A new folder under ./gradguard-runs/ named after the script and the time (relative, for display)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    stem = script.stem if script.stem not in ("", ".", "..") else Path(os.path.abspath(script)).name
    base = Path("gradguard-runs") / f"{stem}-{stamp}"
    out, k = base, 1
    while out.exists():
        k += 1
        out = Path(f"{base}-{k}")
    return out


def _prepare_out_dir(out_dir: Path, clear: bool = True) -> None:
    """Create the run directory and (``clear``) empty it of an earlier run's logs (JSONL logs append: runs would mix).

    Raises:
        RunError: it cannot be created or written.
    """
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
        for d in [out_dir, *sorted(out_dir.glob("optimizer-*"))] if clear else []:
            for name in LOG_FILES:
                if (d / name).is_file():
                    (d / name).unlink()
    except OSError as e:
        raise RunError(f"cannot write the run directory {out_dir}: {e.strerror or e}") from e


def write_empty_run(out_dir: Path, script: str, log_every: int, note: str, started: str) -> None:
    """meta.json and empty stats.jsonl/events.jsonl for a run without a watched step, so it can be read back.

    The keys are those a Guard writes (schema 1) with no model: readers see a run of zero steps, not a missing one.
    """
    meta = run_meta(__version__, None, None, [], {"log_every": log_every})
    meta.update(started=started, script=script, note=note)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2))
    for name in ("stats.jsonl", "events.jsonl"):
        (out_dir / name).touch()


# ----------------------------------------------------------------------------------------------------------------
# Watching


def owning_model(optimizer: torch.optim.Optimizer | None) -> nn.Module | None:
    """The outermost live module owning every parameter the optimizer trains (None if there is none). Without an
    optimizer: the outermost module owning the parameters that have a gradient now (a loop that updates the
    weights by hand, just after its backward).

    Scans live objects once per optimizer: among modules that hold all of the optimizer's parameters, the one
    that is not a submodule of another candidate (the user's model, not a layer of it). A ``torch.compile`` wrapper
    holds its model as a submodule, so the wrapper is the one found (the Guard looks through it).
    """
    wanted = {id(p) for g in optimizer.param_groups for p in g["params"]} if optimizer is not None else None
    candidates = []
    # type(), not isinstance(): isinstance falls back to obj.__class__, which raises ReferenceError on a dead
    # weakref.proxy (torch.compile leaves some among the live objects) and makes some deprecated aliases warn.
    live = [obj for obj in gc.get_objects() if issubclass(type(obj), nn.Module)]
    for obj in live:
        try:
            if wanted is None:  # no optimizer: the parameters a backward just reached
                if any(p.grad is not None and p.requires_grad for p in obj.parameters()):
                    candidates.append(obj)
                continue
            ids = {id(p) for p in obj.parameters()}
        except Exception:  # a half-built module; not ours to judge
            continue
        if wanted <= ids:
            candidates.append(obj)
    if not candidates:
        return None
    inner = {id(sub) for c in candidates for sub in c.modules() if sub is not c}
    roots = [c for c in candidates if id(c) not in inner]
    if wanted is None:  # several models with gradients: the one holding most of them
        return max(roots, key=lambda m: sum(1 for p in m.parameters() if p.grad is not None))
    # Several unrelated roots (a wrapper and its module both alive): prefer the one with the fewest parameters
    # beyond the optimizer's, i.e. the tightest owner.
    return min(roots, key=lambda m: sum(1 for _ in m.parameters()))


class Watcher:
    """Attaches a Guard to each optimizer at its first step; closes them all at the end."""

    def __init__(self, out: Path, log_every: int, repair: bool, stochastic: Sequence[str] = ()) -> None:
        self.out = out
        self.log_every = log_every
        self.repair = repair
        self.stochastic = list(stochastic)  # module names (--stochastic), looked up in each watched model
        # (guard, model, optimizer): the names in the summary come from our own references, not Guard internals
        self.watched: list[tuple[Guard, nn.Module, torch.optim.Optimizer | None]] = []
        self.stepped: list[str] = []  # class names of the optimizers that stepped, watched or not
        self.seen: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()
        self.handle = register_optimizer_step_pre_hook(self._on_step)
        # Loops without a torch.optim optimizer (hand-written SGD): found by their backward calls.
        self.backwards = 0
        self.scout = _BackwardScout(self)
        script_hooks.listen(self.scout)

    def _stochastic_in(self, model: nn.Module) -> list[nn.Module]:
        """The modules of ``model`` named by --stochastic (the names gradguard prints: "(root)" is the model)."""
        inner = unwrap(model)  # the names gradguard prints are those inside compile/DDP wrappers
        found = []
        for name in self.stochastic:
            try:
                found.append(inner if name in ("", "(root)") else inner.get_submodule(name))
            except AttributeError:
                _say(f"--stochastic {name!r}: {type(inner).__name__} has no such module; it is not marked")
        return found

    def on_backward(self, root: torch.Tensor | None) -> None:
        """A backward ran before any optimizer step. If no live torch.optim optimizer holds the parameters it
        reached, the loop updates its weights by hand: watch the model they belong to, every backward a step,
        this one the first. (An optimizer that exists but has not stepped yet, accumulating, is waited for.)"""
        if self.stepped or self.watched:
            return
        self.backwards += 1
        if self.backwards > 3:  # looked three times (a later-made optimizer, an unusual loop): stop scanning
            return
        try:
            model = owning_model(None)
            if model is None or _has_optimizer(model):
                return
            guard = Guard(model, None, log_every=self.log_every, log_dir=self.out,
                          stochastic=self._stochastic_in(model))
            self.watched.append((guard, model, None))
            guard.adopt_backward(root)  # this backward is its first step
            if self.repair:
                self._no_repair(guard.step)
        except Exception as e:  # the user's script must run on regardless
            _say(f"could not watch the model of this loop ({type(e).__name__}: {e}); the script runs on, unwatched")

    def _no_repair(self, step: int) -> None:
        """Say once, on stderr and in events.jsonl, that --repair cannot act on this loop: repair skips, backs off and
        rolls back optimizer steps, and a loop that updates its weights itself has none."""
        text = ("--repair needs a torch.optim optimizer: this loop updates its weights itself, so gradguard watches "
                "it but cannot repair it (no optimizer step to skip, no learning rate to back off)")
        _say(text)
        record = {"type": "note", "kind": "repair_unavailable", "step": int(step), "message": text}
        try:
            with open(self.out / "events.jsonl", "a", encoding="utf-8") as f:  # the Guard's sink appends too
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            _say(f"could not note it in {self.out / 'events.jsonl'} ({e.strerror or e})")

    @property
    def guards(self) -> list[Guard]:
        return [g for g, _, _ in self.watched]

    def _on_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if optimizer in self.seen:
            return
        self.seen.add(optimizer)
        name = type(optimizer).__name__
        self.stepped.append(name)
        try:
            # A Guard attached to this loop before its first optimizer step (several backwards accumulated first)
            # gives way to the optimizer's Guard, which writes the same run directory from the start.
            for entry in [e for e in self.watched if e[2] is None]:
                entry[0].close()
                self.watched.remove(entry)
                for log in LOG_FILES:
                    (self.out / log).unlink(missing_ok=True)
            model = owning_model(optimizer)
            if model is None:
                _say(f"an optimizer ({name}) trains parameters of no live model; it is not watched")
                return
            log_dir = self.out if not self.watched else self.out / f"optimizer-{len(self.watched)}"
            # The Guard registers its own step hooks on this optimizer now; they run for this very step.
            guard = Guard(model, optimizer, log_every=self.log_every, log_dir=log_dir,
                          repair="auto" if self.repair else False, stochastic=self._stochastic_in(model))
            self.watched.append((guard, model, optimizer))
            if self.scout.last_loss is not None:
                # The backwards of this first step ran before the Guard existed: their loss is step 0's.
                guard.observe_loss(self.scout.last_loss)
        except Exception as e:  # the user's script must run on regardless: say it once for this optimizer
            _say(f"could not watch {name} ({type(e).__name__}: {e}); the script runs on, unwatched")

    def close(self) -> None:
        """Remove the global hooks and close every Guard (flushes their logs); never raises."""
        self.handle.remove()
        script_hooks.stop(self.scout)
        for g, _, optimizer in self.watched:
            try:
                g.close()
            except Exception as e:
                _say(f"could not close the Guard of {_name(optimizer)} ({type(e).__name__}: {e}); "
                     "its logs may be incomplete")


def _has_optimizer(model: nn.Module) -> bool:
    """Whether a live torch.optim optimizer holds any of ``model``'s parameters (a one-time scan of live objects)."""
    ids = {id(p) for p in model.parameters()}
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.optim.Optimizer):
            try:
                if any(id(p) in ids for g in obj.param_groups for p in g["params"]):
                    return True
            except Exception:  # a half-built optimizer: not ours to judge
                continue
    return False


def _name(optimizer: torch.optim.Optimizer | None) -> str:
    return type(optimizer).__name__ if optimizer is not None else "no optimizer (a step per backward)"


class _BackwardScout:
    """Tells the Watcher of every backward (``stats.script_hooks`` listener); probes nothing, records nothing."""

    def __init__(self, watcher: Watcher) -> None:
        self.watcher = watcher
        # The sum of the backward roots before the first optimizer step: step 0's loss, as the Guard reads a
        # step's loss (accumulated micro-batches add up); None when a root was not a scalar.
        self.last_loss: torch.Tensor | None = None

    def probe(self) -> None:
        return None

    def backward_done(self, root: Any, probe: Any) -> None:
        if not self.watcher.stepped:
            loss = script_hooks.unscaled(root) if isinstance(root, torch.Tensor) else None
            self.last_loss = loss if loss is None or self.last_loss is None else self.last_loss + loss
        self.watcher.on_backward(root)

    def before_script_clip(self, grads: Any) -> None:
        pass

    def script_clipped(self, max_norm: float) -> None:
        pass


# ----------------------------------------------------------------------------------------------------------------
# The run


def run(script: str, args: list[str], out: str | None = None, log_every: int = 10, repair: bool = False,
        stochastic: Sequence[str] = ()) -> int:
    """Run ``script`` as ``python script args...`` would, with gradguard watching. Returns the exit code.

    Like the interpreter, this takes the process over: ``sys.argv``, ``sys.path[0]`` and ``sys.modules['__main__']``
    are the script's from here on (its atexit handlers and pickles of ``__main__`` classes need them after it
    returns). A ``SystemExit`` or ``KeyboardInterrupt`` from the script propagates after gradguard has closed its
    Guards, so the interpreter gives the exit status it gives a plain run (for ``KeyboardInterrupt``: killed by
    SIGINT, after the atexit handlers).

    Raises:
        RunError: the script cannot be run or the output directory cannot be written (nothing has run yet).
    """
    target = find_target(script)
    # Resolved now: the script may chdir before its first step, and the run directory must not move with it.
    shown = Path(out) if out else default_out_dir(Path(script))
    out_dir = Path(os.path.abspath(shown))
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    # Under torchrun every rank runs this with the same --out, and only rank 0's Guard writes logs: the other
    # ranks must neither clear the directory (rank 0 may be writing there already) nor fill it with an empty run.
    lead = os.environ.get("RANK", "0") == "0"
    _prepare_out_dir(out_dir, clear=lead)

    main = fresh_main(target)
    sys.argv = [target.given, *args]
    if getattr(sys.flags, "safe_path", False):
        # Under -P the interpreter put no start-up directory on sys.path, and `python -P script.py` adds none
        # either; a directory or zip is added even then (its __main__ must be importable).
        if target.importer:
            sys.path.insert(0, target.path0)
    elif sys.path:
        # sys.path[0] holds gradguard's own start-up directory (the cwd for -m, the bin directory for the console
        # script): the script's directory takes its place, as it would have been there alone under python.
        sys.path[0] = target.path0
    else:
        sys.path.insert(0, target.path0)
    sys.modules["__main__"] = main

    watcher = Watcher(out_dir, log_every, repair, stochastic)
    try:
        execute(target, main)
    except SystemExit:
        _finish(watcher, shown, target.given, started, lead)
        raise  # the interpreter turns its code into the status (and prints a non-integer one) as for python
    except BaseException as exc:
        trim_traceback(exc)
        print_uncaught(exc)
        _finish(watcher, shown, target.given, started, lead)
        if isinstance(exc, KeyboardInterrupt):
            # Python ends an interrupted program by re-raising SIGINT after its atexit handlers (status 130 in a
            # shell, -2 for subprocess); letting the exception reach the interpreter does exactly that.
            silence_excepthook_for(exc)
            raise
        return 1
    _finish(watcher, shown, target.given, started, lead)
    return 0


def _finish(watcher: Watcher, shown: Path, script: str, started: str, lead: bool) -> None:
    """Close the Guards, make sure the run directory can be read, print the one-line summary. Never raises."""
    watcher.close()
    try:
        sys.stdout.flush()  # the script's output first, then ours
    except Exception:  # a closed or broken stdout is the script's business, reported by Python at exit
        pass
    try:
        if lead and not (watcher.out / "meta.json").is_file():
            note = ("the script stepped no optimizer" if not watcher.stepped
                    else f"no optimizer could be watched ({', '.join(watcher.stepped)})")
            write_empty_run(watcher.out, script, watcher.log_every, note, started)
        _say(_summary(watcher, shown))
    except Exception as e:
        _say(f"could not finish the run directory {shown} ({type(e).__name__}: {e})")


def _summary(watcher: Watcher, shown: Path) -> str:
    """The last line: what was watched, what was found, and where to look (a command that works)."""
    where = f"{shown}{os.sep}"
    report = f"gradguard report {shlex.quote(str(shown))}"
    if not watcher.watched:
        why = ("the script stepped no optimizer" if not watcher.stepped
               else f"no optimizer it stepped could be watched ({', '.join(watcher.stepped)})")
        return f"watched nothing: {why}; run directory {where} holds no statistics"
    diagnoses = [d for g in watcher.guards for d in g.diagnoses]
    kinds = sorted({d.kind for d in diagnoses})
    watched = ", ".join(f"{type(unwrap(m)).__name__}{' (compiled)' if is_compiled(m) else ''} + {_name(o)}"
                        for _, m, o in watcher.watched)
    n = len(diagnoses)
    found = "no diagnosis" if not n else f"{n} diagnos{'is' if n == 1 else 'es'}: {', '.join(kinds)}"
    counts: dict[str, int] = {}
    for g in watcher.guards:
        for kind, n in g.action_counts.items():
            counts[kind] = counts.get(kind, 0) + n
    acted = f"; actions: {', '.join(f'{n} {kind}' for kind, n in sorted(counts.items()))}" if counts else ""
    return f"watched {watched}; {found}{acted}; run directory {where} ({report})"

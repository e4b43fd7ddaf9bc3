"""``gradguard run SCRIPT [ARGS...]``: run an unmodified training script with every optimizer it steps watched.

A global optimizer step pre-hook sees each optimizer at its first step; the model it trains is found then, once,
as the outermost ``nn.Module`` that owns the optimizer's parameters (a one-time scan of live objects, so nothing is
added to any forward), and a Guard is attached to that model and optimizer. The script runs as ``__main__`` with
its own ``sys.argv``, in the current working directory; its exit code is gradguard's.
"""

from __future__ import annotations

import gc
import os
import runpy
import sys
import time
import traceback
import warnings
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .guard import Guard


class RunError(Exception):
    """A problem with the command itself (not with the script): reported in one line, exit code 2."""


def default_out_dir(script: Path) -> Path:
    """A new folder under ./gradguard-runs/ named after the script and the time."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path("gradguard-runs") / f"{script.stem}-{stamp}"
    out, k = base, 1
    while out.exists():
        k += 1
        out = Path(f"{base}-{k}")
    return out


def owning_model(optimizer: torch.optim.Optimizer) -> nn.Module | None:
    """The outermost live module owning every parameter the optimizer trains (None if there is none).

    Scans live objects once per optimizer: among modules that hold all of the optimizer's parameters, the one
    that is not a submodule of another candidate (the user's model, not a layer of it).
    """
    wanted = {id(p) for g in optimizer.param_groups for p in g["params"]}
    candidates = []
    with warnings.catch_warnings():
        # isinstance() touches every live object; some (deprecated torch aliases) warn when touched
        warnings.simplefilter("ignore")
        live = [obj for obj in gc.get_objects() if isinstance(obj, nn.Module)]
    for obj in live:
        try:
            ids = {id(p) for p in obj.parameters()}
        except Exception:  # a half-built module; not ours to judge
            continue
        if wanted <= ids:
            candidates.append(obj)
    if not candidates:
        return None
    inner = {id(sub) for c in candidates for sub in c.modules() if sub is not c}
    roots = [c for c in candidates if id(c) not in inner]
    # Several unrelated roots (a wrapper and its module both alive): prefer the one with the fewest parameters
    # beyond the optimizer's, i.e. the tightest owner.
    return min(roots, key=lambda m: sum(1 for _ in m.parameters()))


class Watcher:
    """Attaches a Guard to each optimizer at its first step; closes them all at the end."""

    def __init__(self, out: Path, log_every: int, repair: bool) -> None:
        self.out = out
        self.log_every = log_every
        self.repair = repair
        self.guards: list[Guard] = []
        self.seen: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()
        self.handle = register_optimizer_step_pre_hook(self._on_step)

    def _on_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if optimizer in self.seen:
            return
        self.seen.add(optimizer)
        try:
            model = owning_model(optimizer)
            if model is None:
                print(f"[gradguard] an optimizer ({type(optimizer).__name__}) trains parameters of no live model; "
                      "it is not watched", file=sys.stderr, flush=True)
                return
            log_dir = self.out if not self.guards else self.out / f"optimizer-{len(self.guards)}"
            # The Guard registers its own step hooks on this optimizer now; they run for this very step.
            self.guards.append(Guard(model, optimizer, log_every=self.log_every, log_dir=log_dir,
                                     repair="auto" if self.repair else False))
        except Exception as e:  # the user's script must run on regardless
            print(f"[gradguard] could not watch {type(optimizer).__name__}: {e}", file=sys.stderr, flush=True)

    def close(self) -> None:
        self.handle.remove()
        for g in self.guards:
            g.close()


def run(script: str, args: list[str], out: str | None = None, log_every: int = 10, repair: bool = False) -> int:
    """Run ``script`` as ``python script args...`` would, with gradguard watching. Returns the exit code.

    Raises:
        RunError: the script does not exist or the output directory cannot be written.
    """
    path = Path(script)
    if not path.is_file():
        raise RunError(f"no such script: {script}")
    out_dir = Path(out) if out else default_out_dir(path)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise RunError(f"cannot write the run directory {out_dir}: {e.strerror or e}") from e

    watcher = Watcher(out_dir, log_every, repair)
    saved_argv, saved_path0 = sys.argv[:], sys.path[0] if sys.path else None
    sys.argv = [str(path), *args]
    if sys.path:
        sys.path[0] = str(path.resolve().parent)  # as `python script` puts the script's folder first
    code = 0
    try:
        runpy.run_path(str(path), run_name="__main__")
    except SystemExit as e:
        code = _exit_code(e.code)
    except BaseException:  # show it as Python would, then exit 1 like Python
        exc_type, exc, tb = sys.exc_info()
        # Drop gradguard's own frames (runner, runpy) from the top of the traceback.
        while tb is not None and not tb.tb_frame.f_code.co_filename.endswith(str(path.name)):
            tb = tb.tb_next
        traceback.print_exception(exc_type, exc, tb)
        code = 130 if exc_type is KeyboardInterrupt else 1
    finally:
        sys.argv = saved_argv
        if saved_path0 is not None:
            sys.path[0] = saved_path0
        watcher.close()
        sys.stdout.flush()
        _summary(watcher, out_dir)
    return code


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)  # sys.exit("message") prints it and exits 1, as Python does
    return 1


def _summary(watcher: Watcher, out_dir: Path) -> None:
    n = sum(len(g.diagnoses) for g in watcher.guards)
    kinds = sorted({d.kind for g in watcher.guards for d in g.diagnoses})
    watched = ", ".join(f"{type(g.inner).__name__} + {type(g.optimizer).__name__}" for g in watcher.guards) or "nothing"
    msg = (f"[gradguard] watched {watched}; {n} diagnosis(es){': ' + ', '.join(kinds) if kinds else ''}; "
           f"run directory {out_dir}{os.sep} (gradguard report {out_dir})")
    print(msg, file=sys.stderr, flush=True)

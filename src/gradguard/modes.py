"""Train vs. inference mode: a context manager that switches both correctly, the per-module mode table, and the
behaviour profile the mode detectors use.

``model.eval()`` changes how layers compute (Dropout keeps every unit, BatchNorm uses its running statistics, any
custom ``self.training`` branch flips); ``torch.no_grad()`` / ``torch.inference_mode()`` only stop gradient
tracking. ``gradguard.inference`` does both, and on exit gives every module back its own previous flag.

Room: the mode watcher. It may touch: ``stats.layers``.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import textwrap
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import Any

import torch
from torch import nn

from .stats.layers import unwrap

DROPOUT_TYPES: tuple[type[nn.Module], ...] = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                                               nn.AlphaDropout, nn.FeatureAlphaDropout)
NORM_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)

_READS_FLAG: dict[type, bool] = {}


def _reads_training_flag(cls: type) -> bool:
    """Whether the forward that ``cls`` runs reads ``self.training`` (an attribute access in its code, found with
    ``ast``: docstrings, comments and other methods do not count). Looked at once per class; a class whose source
    cannot be read counts as not reading it."""
    if cls not in _READS_FLAG:
        _READS_FLAG[cls] = _forward_reads_flag(cls)
    return _READS_FLAG[cls]


def _forward_reads_flag(cls: type) -> bool:
    forward = getattr(cls, "forward", None)
    if forward is None or forward is nn.Module.forward:
        return False
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(forward)))
    except (OSError, TypeError, SyntaxError):
        return False
    return any(isinstance(node, ast.Attribute) and node.attr == "training" and isinstance(node.value, ast.Name)
               and node.value.id == "self" for node in ast.walk(tree))


@dataclass(frozen=True)
class ModeProfile:
    """How one module's computation depends on its training flag.

    Attributes:
        stochastic_in_training: draws random numbers in training mode (Dropout family, RReLU, RNN inter-layer
            dropout, attention dropout).
        mutates_state_in_training: updates buffers in training mode (BatchNorm/InstanceNorm running statistics).
        changes_in_eval: computes differently in eval mode (the above, or its code reads ``self.training``).
    """

    stochastic_in_training: bool
    mutates_state_in_training: bool
    changes_in_eval: bool


def profile(module: nn.Module) -> ModeProfile:
    """The ModeProfile of one module (its own behaviour, not its children's)."""
    stochastic = isinstance(module, nn.RReLU) or (isinstance(module, DROPOUT_TYPES)
                                                  and float(getattr(module, "p", 1.0)) > 0)
    if isinstance(module, nn.RNNBase):
        stochastic = bool(module.dropout > 0 and module.num_layers > 1)
    if isinstance(module, nn.MultiheadAttention):
        stochastic = bool(module.dropout > 0)
    mutates = isinstance(module, NORM_TYPES) and bool(getattr(module, "track_running_stats", False))
    if type(module).__module__.startswith("torch.nn.modules."):
        # torch's own layers are judged by what they do: a Dropout with p=0, an LSTM without dropout, a norm
        # without running statistics or a transformer layer whose fast path depends on the flag compute the same
        # numbers in both modes.
        changes = bool(stochastic or mutates)
    else:  # anyone else's code: does its forward read self.training?
        changes = bool(stochastic or mutates or _reads_training_flag(type(module)))
    return ModeProfile(stochastic, mutates, changes)


def behaviour_modules(model: nn.Module) -> list[tuple[str, nn.Module, ModeProfile]]:
    """Modules of ``model`` whose computation depends on the training flag, with their profiles."""
    out = []
    for name, m in unwrap(model).named_modules():
        p = profile(m)
        if p.changes_in_eval:
            out.append((name, m, p))
    return out


# ---------------------------------------------------------------------------------------------- inference()

#: ids of modules that a ``gradguard.inference(keep_training=...)`` block keeps in training on purpose (with the
#: number of open blocks doing so), so the mode detectors do not call Monte-Carlo dropout a mistake.
DELIBERATE_TRAINING: dict[int, int] = {}

KeepTraining = Iterable[nn.Module] | type | tuple[type, ...] | Callable[[str, nn.Module], bool] | None


def _selector(keep: KeepTraining) -> Callable[[str, nn.Module], bool]:
    if keep is None:
        return lambda name, m: False
    if isinstance(keep, type) or (isinstance(keep, tuple) and all(isinstance(k, type) for k in keep)):
        types = keep
        return lambda name, m: isinstance(m, types)
    if isinstance(keep, nn.Module):
        ids = {id(x) for x in keep.modules()}  # a container keeps its children in training too
        return lambda name, m: id(m) in ids
    if callable(keep):
        return keep
    ids = {id(x) for m in keep if isinstance(m, nn.Module) for x in m.modules()}
    return lambda name, m: id(m) in ids


class inference(contextlib.ContextDecorator):  # noqa: N801 - used like a function, as torch.no_grad is
    """Evaluate a model correctly: eval mode on the whole tree plus ``torch.inference_mode()`` (or ``no_grad``).

    Usable as ``with gradguard.inference(model): ...`` and as a decorator ``@gradguard.inference(model)``.
    On exit, on every path (exceptions included) and when nested, every module gets back its own previous
    training flag: a BatchNorm the user froze in eval stays in eval, a module in training stays in training.
    Flags are restored by setting ``module.training`` directly, not by calling ``train()``: a user's ``train()``
    override that does more (unfreezing, logging) is not run on exit, the same as on entry.

    Args:
        model: the model (DataParallel/DDP/compile wrappers are fine).
        grad: "inference_mode" (fastest; outputs cannot be used by autograd later) or "no_grad" (outputs can
            feed autograd later, e.g. as targets; needed under FSDP, whose parameters must not become inference
            tensors).
        keep_training: modules that stay in training mode inside the block, for Monte-Carlo dropout: module
            objects, a module type (or tuple of types), or a predicate ``(name, module) -> bool``. Modules
            that update running statistics (BatchNorm, InstanceNorm) are never kept in training: they would
            overwrite their statistics with the evaluation data.

    References:
        Gal & Ghahramani, "Dropout as a Bayesian Approximation: Representing Model Uncertainty in Deep
        Learning", ICML 2016 (Monte-Carlo dropout).
    """

    def __init__(self, model: nn.Module, *, grad: str = "inference_mode", keep_training: KeepTraining = None
                 ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"gradguard.inference needs a torch.nn.Module, got {type(model).__name__}")
        if grad not in ("inference_mode", "no_grad"):
            raise ValueError(f"grad must be 'inference_mode' or 'no_grad', got {grad!r}")
        self.model = model
        self.grad = grad
        self.keep_training = keep_training
        self._saved: list[tuple[nn.Module, bool]] | None = None
        self._kept: list[int] = []
        self._grad_ctx: contextlib.AbstractContextManager[Any] | None = None

    def _recreate_cm(self) -> inference:
        # Each decorated call gets its own context, so recursion and threads do not share saved flags.
        return inference(self.model, grad=self.grad, keep_training=self.keep_training)

    def __enter__(self) -> nn.Module:
        keep = _selector(self.keep_training)
        mods = list(unwrap(self.model).named_modules())
        if self.model is not mods[0][1]:
            mods.insert(0, ("", self.model))  # the wrapper's own flag is restored too
        # Decide everything before changing anything: a failing predicate leaves the model untouched.
        wanted = [bool(keep(name, m)) and not isinstance(m, NORM_TYPES) for name, m in mods]
        self._saved = [(m, m.training) for _, m in mods]
        self._kept = []
        try:
            for (_, m), flag in zip(mods, wanted):
                m.training = flag
                if flag:
                    self._kept.append(id(m))
                    DELIBERATE_TRAINING[id(m)] = DELIBERATE_TRAINING.get(id(m), 0) + 1
            self._grad_ctx = torch.inference_mode() if self.grad == "inference_mode" else torch.no_grad()
            self._grad_ctx.__enter__()
        except BaseException:
            self._grad_ctx = None
            self.__exit__(None, None, None)
            raise
        return self.model

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if self._grad_ctx is not None:
                self._grad_ctx.__exit__(exc_type, exc, tb)
        finally:
            for m, flag in self._saved or []:
                m.training = flag
            for key in self._kept:
                DELIBERATE_TRAINING[key] -= 1
                if not DELIBERATE_TRAINING[key]:
                    del DELIBERATE_TRAINING[key]
            self._saved, self._grad_ctx, self._kept = None, None, []


# ---------------------------------------------------------------------------------------------- mode_table()


@dataclass(frozen=True)
class ModeRow:
    """One module of the mode table."""

    name: str
    type: str
    training: bool
    stochastic_in_training: bool
    mutates_state_in_training: bool
    changes_in_eval: bool


class ModeTable(list[ModeRow]):
    """Rows of ``mode_table``: a list of ModeRow, printable (rich when installed) and convertible to dicts."""

    def to_dicts(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self]

    def __str__(self) -> str:
        head = ("module", "type", "training", "stochastic", "mutates state", "changes in eval")
        rows = [(r.name or "(root)", r.type, *("yes" if v else "-" for v in (r.training, r.stochastic_in_training,
                 r.mutates_state_in_training, r.changes_in_eval))) for r in self]
        widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
        return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in (head, *rows))

    def print(self) -> None:
        """Print as a rich table when rich is installed, plain text otherwise."""
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            print(str(self))
            return
        table = Table("module", "type", "training", "stochastic", "mutates state", "changes in eval")
        for r in self:
            table.add_row(r.name or "(root)", r.type, *("yes" if v else "-" for v in (
                r.training, r.stochastic_in_training, r.mutates_state_in_training, r.changes_in_eval)))
        Console().print(table)


def mode_table(model: nn.Module, *, all_modules: bool = False) -> ModeTable:
    """Per module: training flag, stochastic in training, mutates state in training, changes behaviour in eval.

    Args:
        model: the model.
        all_modules: list every module, not only those whose behaviour depends on the flag (plus the root).

    Returns:
        A ModeTable (a list of ModeRow; ``print(table)`` or ``table.print()`` to show it).
    """
    rows = ModeTable()
    for name, m in unwrap(model).named_modules():
        p = profile(m)
        if all_modules or p.changes_in_eval or name == "":
            rows.append(ModeRow(name, type(m).__name__, m.training, p.stochastic_in_training,
                                p.mutates_state_in_training, p.changes_in_eval))
    return rows

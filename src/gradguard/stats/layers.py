"""Which layer owns which parameter.

A *layer* is the module that directly owns a parameter (``module.named_parameters(recurse=False)``), named by its
qualified name in ``model.named_modules()``; parameters registered on the model itself (an ``nn.Parameter``
attribute of the root module, a learned start state) form the layer ``ROOT``, "(root)", since the root's qualified
name is empty. A parameter shared by several modules (tied embeddings) belongs to the first module that owns it, so
it is counted once. Wrappers (DataParallel, DistributedDataParallel, ``torch.compile``) are looked through so names
carry no ``module.`` or ``_orig_mod.`` prefix.

Room: the step recorder. It may touch: no other module.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

ROOT = "(root)"  # the layer of the parameters the model registers on itself (the report shows the same name)


def layer_name(module_name: str) -> str:
    """The layer name of the module called ``module_name`` in ``model.named_modules()``: the name itself, or
    ``ROOT`` for the model (whose name is empty: a layer named '' reads as nothing in a message)."""
    return module_name or ROOT


def unwrap(model: nn.Module) -> nn.Module:
    """The user's own module inside DataParallel / DDP / FSDP-style ``.module`` wrappers and ``torch.compile``."""
    seen = 0
    while seen < 8:  # wrappers nest (compile of DDP); a bound stops a pathological cycle
        seen += 1
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):  # torch.compile
            model = model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            break
    return model


def is_compiled(model: nn.Module) -> bool:
    """True for a ``torch.compile``d module (or a wrapper around one): adding submodule hooks would recompile it."""
    m = model
    for _ in range(8):
        # torch.compile(model) wraps it; model.compile() compiles in place and sets _compiled_call_impl
        if hasattr(m, "_orig_mod") or getattr(m, "_compiled_call_impl", None) is not None:
            return True
        if isinstance(m, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            m = m.module
        else:
            return False
    return False


@dataclass
class ParamGroup:
    """Tracked parameters that share a (device, dtype), so one fused kernel handles them all."""

    device: torch.device
    dtype: torch.dtype
    positions: list[int]  # indices into LayerMap.params


@dataclass
class LayerMap:
    """Parameters tracked by the Guard and the layer each belongs to.

    Attributes:
        names: layer names, in the order layers are reported (forward order once known, else registration order).
        params: tracked parameters (unique, trainable, held by the optimizer when there is one).
        param_names: qualified parameter names, aligned with ``params``.
        layer_of: for each tracked parameter, the index of its layer in ``names``.
        numel: number of tracked elements per layer.
    """

    names: list[str]
    params: list[nn.Parameter]
    param_names: list[str]
    layer_of: list[int]
    numel: list[int]
    modules: list[nn.Module] = field(default_factory=list)

    @property
    def num_layers(self) -> int:
        return len(self.names)

    def groups(self) -> list[ParamGroup]:
        """Tracked parameters grouped by (device, dtype), in first-seen order."""
        by_key: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
        for i, p in enumerate(self.params):
            by_key[(p.device, p.dtype)].append(i)
        return [ParamGroup(d, t, pos) for (d, t), pos in by_key.items()]

    def reorder(self, order: list[str]) -> None:
        """Put layers in ``order`` (e.g. the order forward calls them; module names, the model's own "" included);
        layers not in it keep their place after."""
        rank: dict[str, int] = {}
        for i, n in enumerate(order):
            rank.setdefault(layer_name(n), i)
        new = sorted(range(len(self.names)), key=lambda i: (rank.get(self.names[i], len(rank)), i))
        old_to_new = {old: new_i for new_i, old in enumerate(new)}
        self.names = [self.names[i] for i in new]
        self.numel = [self.numel[i] for i in new]
        self.modules = [self.modules[i] for i in new]
        self.layer_of = [old_to_new[j] for j in self.layer_of]


def build_layer_map(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> LayerMap:
    """Map every trainable parameter of ``model`` (and of ``optimizer``, when given) to its owning layer.

    Args:
        model: the user's model, possibly wrapped (DDP, DataParallel, torch.compile).
        optimizer: the optimizer training it, or None.

    Returns:
        The LayerMap, layers in registration order.

    Raises:
        ValueError: the model has no trainable parameter, or the optimizer holds parameters the model does not own.
    """
    inner = unwrap(model)
    owner: dict[int, tuple[str, str, nn.Module, nn.Parameter]] = {}
    for mod_name, module in inner.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            if id(p) not in owner:  # a tied parameter belongs to its first owner: counted once
                full = f"{mod_name}.{p_name}" if mod_name else p_name
                owner[id(p)] = (mod_name, full, module, p)

    if optimizer is not None:
        opt_params = [p for g in optimizer.param_groups for p in g["params"]]
        foreign = [p for p in opt_params if id(p) not in owner]
        if foreign:
            shapes = ", ".join(str(tuple(p.shape)) for p in foreign[:5])
            raise ValueError(
                f"the optimizer holds {len(foreign)} parameter(s) that are not in the model (shapes {shapes}). "
                "Pass the model that owns every parameter the optimizer trains (the outer model, not a submodule), "
                "or build the optimizer from model.parameters()."
            )
        wanted = {id(p) for p in opt_params}
        chosen = [v for k, v in owner.items() if k in wanted and v[3].requires_grad]
    else:
        chosen = [v for v in owner.values() if v[3].requires_grad]

    if not chosen:
        raise ValueError(
            "the model has no trainable parameter (none with requires_grad=True"
            + (" held by the optimizer" if optimizer is not None else "")
            + "), so there are no gradients to watch. Unfreeze a layer, or use gradguard.inference() alone "
            "for a model that is only evaluated."
        )

    names: list[str] = []
    modules: list[nn.Module] = []
    index: dict[str, int] = {}
    params: list[nn.Parameter] = []
    param_names: list[str] = []
    layer_of: list[int] = []
    numel: list[int] = []
    for mod_name, full, module, p in chosen:
        name = layer_name(mod_name)
        if name not in index:
            index[name] = len(names)
            names.append(name)
            modules.append(module)
            numel.append(0)
        li = index[name]
        params.append(p)
        param_names.append(full)
        layer_of.append(li)
        numel[li] += p.numel()
    return LayerMap(names=names, params=params, param_names=param_names, layer_of=layer_of, numel=numel,
                    modules=modules)

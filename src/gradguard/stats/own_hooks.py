"""Forward hooks that stay with the module they watch: copies and pickles of the module never carry them.

A hook is stored in the module's hook tables, so ``copy.deepcopy(model)`` (an EMA copy) and ``torch.save(model)``
(a whole-model checkpoint) would copy it, and with it the Guard behind it: open log files fail to pickle, and a
deep copy would be a second, silent watcher judging the EMA weights as the training model. While gradguard has a
hook on a module, the module gets its own ``__getstate__`` (an instance attribute, found before the class's
method), which returns the module's state without gradguard's hooks and without itself. Once gradguard's last
hook on the module is removed, the attribute goes too and the module is exactly as it was.

Room: the step recorder. It may touch: no other module.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle

# The hook tables of nn.Module: id -> hook, and the id sets that say how each hook is called.
_TABLES = ("_forward_pre_hooks", "_forward_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs",
           "_forward_hooks_always_called")
_KEY = "__getstate__"


class _StateWithoutOurHooks:
    """A module's ``__getstate__`` while gradguard has hooks on it: the class's state minus those hooks."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module  # a reference cycle through the module's __dict__; collected with the module
        self.ids: set[int] = set()

    def __call__(self) -> dict[str, Any]:
        state = dict(type(self.module).__getstate__(self.module))
        state.pop(_KEY, None)
        for name in _TABLES:
            table = state.get(name)
            if isinstance(table, dict):
                state[name] = OrderedDict((k, v) for k, v in table.items() if k not in self.ids)
        return state


class OwnHandle:
    """Removes one of gradguard's hooks, and the module's ``__getstate__`` with the last of them."""

    def __init__(self, module: nn.Module, handle: RemovableHandle) -> None:
        self.module = module
        self.handle = handle

    def remove(self) -> None:
        self.handle.remove()
        own = self.module.__dict__.get(_KEY)
        if isinstance(own, _StateWithoutOurHooks):
            own.ids.discard(self.handle.id)
            if not own.ids:
                del self.module.__dict__[_KEY]


def _own(module: nn.Module, handle: RemovableHandle) -> OwnHandle:
    own = module.__dict__.get(_KEY)
    if not isinstance(own, _StateWithoutOurHooks):
        own = _StateWithoutOurHooks(module)
        module.__dict__[_KEY] = own  # not through nn.Module.__setattr__: a plain attribute, not a submodule
    own.ids.add(handle.id)
    return OwnHandle(module, handle)


def forward_pre_hook(module: nn.Module, hook: Callable[..., Any], **kwargs: Any) -> OwnHandle:
    """``module.register_forward_pre_hook(hook, **kwargs)``, kept out of copies and pickles of the module."""
    return _own(module, module.register_forward_pre_hook(hook, **kwargs))


def forward_hook(module: nn.Module, hook: Callable[..., Any], **kwargs: Any) -> OwnHandle:
    """``module.register_forward_hook(hook, **kwargs)``, kept out of copies and pickles of the module."""
    return _own(module, module.register_forward_hook(hook, **kwargs))

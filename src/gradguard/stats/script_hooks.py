"""What a training script does outside the optimizer, seen without changing a line of it.

- **The loss**: the scalar a script calls ``.backward()`` on is the root of the step's backward. It is seen by
  wrapping ``torch.autograd.backward`` (``Tensor.backward`` calls it); a root that ``torch.amp.GradScaler.scale``
  made is divided by its scale again (device arithmetic, no sync). Non-scalar roots (``backward(gradient)``) are
  left alone.
- **The script's own clipping**: ``torch.nn.utils.clip_grad_norm_`` and ``clip_grad_value_`` (and what calls them:
  Accelerate, Lightning's precision plugins) group the gradients with ``_group_tensors_by_device_and_dtype``
  before they measure or change them; gradguard wraps that name inside ``torch.nn.utils.clip_grad`` only, so the
  step's gradients are recorded before the clip, whichever way the script imported the function. The max norm
  comes from ``_clip_grads_with_norm_``. The script's results are unchanged: the originals run as before.

The wrappers are installed while at least one Guard listens and removed with the last one. Each listener is told
through a small protocol (``Listener``); a listener's failure never reaches the script (it handles its own).

Room: the step recorder. It may touch: no other module.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Protocol

import torch
import torch.nn.utils.clip_grad as clip_grad


class Listener(Protocol):
    def backward_done(self, root: torch.Tensor | None, probes: Any) -> None: ...
    def probe(self) -> Any: ...
    def before_script_clip(self, grads: list[torch.Tensor]) -> None: ...
    def script_clipped(self, max_norm: float) -> None: ...


_listeners: weakref.WeakSet[Any] = weakref.WeakSet()
# The same listeners as weak references in a tuple, rebuilt when one comes or goes: read on every backward, where
# iterating a WeakSet costs ~3.5 us and this ~0.5 us (a listener collected without stop() reads None: skipped).
_active: tuple[weakref.ref[Any], ...] = ()
_originals: dict[str, Any] = {}
_orig_backward: Any = None  # kept after uninstall: a backward already inside our wrapper still calls it
_last_scaler: Any = None  # weakref to the GradScaler that scaled the latest loss
_local = threading.local()  # re-entrancy: our own calls of these functions are not the script's


def listen(listener: Listener) -> None:
    """Start telling ``listener``; installs the wrappers with the first listener."""
    global _active
    _listeners.add(listener)
    _active = tuple(weakref.ref(x) for x in _listeners)
    if not _originals:
        _install()


def stop(listener: Listener) -> None:
    """Stop telling ``listener``; removes the wrappers with the last one."""
    global _active
    _listeners.discard(listener)
    _active = tuple(weakref.ref(x) for x in _listeners)
    if not _listeners and _originals:
        _uninstall()


def _install() -> None:
    global _orig_backward
    _orig_backward = _originals["backward"] = torch.autograd.backward
    _originals["group"] = clip_grad._group_tensors_by_device_and_dtype
    _originals["with_norm"] = clip_grad._clip_grads_with_norm_
    _originals["scale"] = torch.amp.GradScaler.scale
    torch.autograd.backward = _backward
    clip_grad._group_tensors_by_device_and_dtype = _group
    clip_grad._clip_grads_with_norm_ = _clip_grads_with_norm_
    torch.amp.GradScaler.scale = _scale  # type: ignore[method-assign]


def _uninstall() -> None:
    # Put back only what is still ours: something installed after us keeps its own wrapper.
    if torch.autograd.backward is _backward:
        torch.autograd.backward = _originals["backward"]
    if clip_grad._group_tensors_by_device_and_dtype is _group:
        clip_grad._group_tensors_by_device_and_dtype = _originals["group"]
    if clip_grad._clip_grads_with_norm_ is _clip_grads_with_norm_:
        clip_grad._clip_grads_with_norm_ = _originals["with_norm"]
    if torch.amp.GradScaler.scale is _scale:
        torch.amp.GradScaler.scale = _originals["scale"]  # type: ignore[method-assign]
    _originals.clear()


def _busy() -> bool:
    return getattr(_local, "busy", False)


def _backward(tensors: Any, grad_tensors: Any = None, *args: Any, **kwargs: Any) -> Any:
    original = _orig_backward
    listeners = [x for x in (r() for r in _active) if x is not None]
    if not listeners or _busy():
        return original(tensors, grad_tensors, *args, **kwargs)
    probes = []
    for listener in listeners:
        try:
            probes.append(listener.probe())
        except Exception:
            probes.append(None)
    result = original(tensors, grad_tensors, *args, **kwargs)
    root = tensors if isinstance(tensors, torch.Tensor) else (
        tensors[0] if isinstance(tensors, (list, tuple)) and len(tensors) == 1 else None)
    if root is not None and (grad_tensors is not None or root.numel() != 1):
        root = None  # backward(gradient) or several roots: no loss to read
    _local.busy = True
    try:
        for listener, probe in zip(listeners, probes):
            listener.backward_done(root, probe)
    finally:
        _local.busy = False
    return result


def scale_of(root: torch.Tensor) -> torch.Tensor | None:
    """The scale ``torch.amp.GradScaler.scale`` multiplied a backward root by, or None for an unscaled root."""
    scale = getattr(root, "_gradguard_scale", None)
    return scale if isinstance(scale, torch.Tensor) else None


def unscaled(root: torch.Tensor) -> torch.Tensor:
    """The loss behind a backward root: a GradScaler-scaled root divided by its scale (device op, no sync)."""
    scale = scale_of(root)
    loss = root.detach()
    return loss / scale.to(loss.device) if scale is not None else loss


def scaler_found_inf(optimizer: Any) -> torch.Tensor | None:
    """The overflow flag (sum over devices) that the latest GradScaler's ``unscale_(optimizer)`` found, if the
    gradients of ``optimizer`` were unscaled this step; None otherwise. Device tensors only: no sync."""
    scaler = _last_scaler() if _last_scaler is not None else None
    try:
        state = scaler._per_optimizer_states[id(optimizer)] if scaler is not None else None
        found = state.get("found_inf_per_device") if state else None
        if found:
            flags = [v.reshape(()).float() for v in found.values()]
            return torch.stack([f.to(flags[0].device) for f in flags]).sum()
    except Exception:  # a GradScaler of another version: the scaler still skips what it must
        return None
    return None


def _scale(self: Any, outputs: Any) -> Any:
    global _last_scaler
    out = _originals["scale"](self, outputs)
    _last_scaler = weakref.ref(self)
    if isinstance(out, torch.Tensor) and out is not outputs and isinstance(getattr(self, "_scale", None),
                                                                           torch.Tensor):
        try:
            out._gradguard_scale = self._scale  # type: ignore[attr-defined]  # read by unscaled()
        except Exception:
            pass
    return out


def _group(tensorlistlist: Any, *args: Any, **kwargs: Any) -> Any:
    if _listeners and not _busy() and tensorlistlist:
        grads = [g for g in tensorlistlist[0] if isinstance(g, torch.Tensor)]
        _local.busy = True
        try:
            for listener in list(_listeners):
                listener.before_script_clip(grads)
        finally:
            _local.busy = False
    return _originals["group"](tensorlistlist, *args, **kwargs)


def _clip_grads_with_norm_(parameters: Any, max_norm: float, total_norm: torch.Tensor, *args: Any,
                           **kwargs: Any) -> Any:
    # A Python number in every caller we know; a tensor max_norm would need a sync to read, so it is not recorded.
    if _listeners and not _busy() and isinstance(max_norm, (int, float)):
        _local.busy = True
        try:
            for listener in list(_listeners):
                listener.script_clipped(float(max_norm))
        finally:
            _local.busy = False
    return _originals["with_norm"](parameters, max_norm, total_norm, *args, **kwargs)

"""Checking a saved Guard state before any of it is loaded: garbage gets a ValueError naming the key, and the
Guard is left exactly as it was (every part is loaded into a throw-away copy first).

Room: the facade. It may touch: ``detect.history``, ``detect.reporter``, ``repair``, ``repair.ladder``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from .detect.history import History
from .detect.reporter import Reporter
from .repair import AutoClip, ClipMethod, ZClip
from .repair.ladder import Ladder

STEP_MAX = 2**53  # steps (and step numbers) beyond float64's exact integers: no run gets there, and larger ones
#                   overflow the int64 arrays the history keeps
MEAN_MAX, VAR_MAX = 1e150, 1e300  # far beyond any norm or loss; their squares and differences stay finite
F32_MAX = 3.4028234663852886e38  # a clip's state lives in float32 tensors: beyond this it turns into inf


def _fail(key: str, what: str) -> ValueError:
    return ValueError(f"not a gradguard Guard state: {key} {what}; pass what Guard.state_dict() returned")


def _number(value: Any, key: str, *, low: float | None = None, high: float | None = None, integer: bool = False,
            inf_ok: bool = False, nan_ok: bool = False) -> None:
    """Refuse ``value`` unless it is a number (not a bool; an int when ``integer``) in [low, high], finite (or +inf
    with ``inf_ok``, NaN with ``nan_ok``). Integers are bounded by ``STEP_MAX`` whatever ``high`` says: a Python
    int beyond int64 passes every comparison and then fails inside NumPy."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise _fail(key, f"must be {'an integer' if integer else 'a number'}, got {value!r}")
    if isinstance(value, int) and abs(value) > STEP_MAX:
        raise _fail(key, f"must be at most {STEP_MAX} in size, got {value!r}")
    if nan_ok and math.isnan(value):
        return
    if not (math.isfinite(value) or (inf_ok and value == math.inf)):
        raise _fail(key, f"must be finite, got {value!r}")
    if low is not None and value < low:
        raise _fail(key, f"must be >= {low}, got {value!r}")
    if high is not None and value > high and not (inf_ok and value == math.inf):
        raise _fail(key, f"must be <= {high:g}, got {value!r}")


def _pairs(value: Any, key: str, low: float) -> None:
    """A list of [step, value] pairs (the history's first totals and losses)."""
    if not isinstance(value, list):
        raise _fail(key, f"must be a list of [step, value] pairs, got {type(value).__name__}")
    for i, pair in enumerate(value):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise _fail(f"{key[:-1]}.{i}'", f"must be a [step, value] pair, got {pair!r:.40}")
        _number(pair[0], f"{key[:-1]}.{i}.0'", low=0, integer=True)
        _number(pair[1], f"{key[:-1]}.{i}.1'", low=low, high=MEAN_MAX)


def _check_history(history: Mapping[str, Any], layers: list[str], ema_beta: float) -> None:
    """The history's running statistics and early baselines: the values the detectors compute with."""
    names = history["layers"]
    for i, name in enumerate(names):
        if not isinstance(name, str):
            raise _fail(f"'history.layers.{i}'", f"must be a layer name (a string), got {name!r:.40}")
    if set(names) != set(layers):
        raise ValueError("this state was saved for a model with other layers; load it into a Guard on the same "
                         "model architecture")
    for key in ("grad_ema", "loss_ema"):
        ema = history.get(key)
        if not isinstance(ema, Mapping):
            raise _fail(f"'history.{key}'", "must be a dict")
        # the gradient norm's mean is a mean of norms (>= 0); a loss may be negative
        _number(ema.get("mean"), f"'history.{key}.mean'", low=0 if key == "grad_ema" else -MEAN_MAX, high=MEAN_MAX)
        _number(ema.get("var"), f"'history.{key}.var'", low=0, high=VAR_MAX)
        _number(ema.get("count"), f"'history.{key}.count'", low=0, integer=True)
        beta: Any = ema.get("beta")
        _number(beta, f"'history.{key}.beta'")
        if not 0 < beta < 1:  # 1 or more: the variance goes negative, and its square root fails
            raise _fail(f"'history.{key}.beta'", f"must be in (0, 1), got {beta!r}")
    try:  # the rest of the history: load it into a throw-away one (its shape), then check its values
        probe = History(list(layers), np.ones(len(layers)), np.zeros(len(layers), dtype=bool), ema_beta)
        probe.load_state_dict(dict(history))
    except Exception as e:
        raise _fail("'history'", f"cannot be read ({type(e).__name__}: {e})") from e
    if "finite_count" in history:
        _number(history["finite_count"], "'history.finite_count'", low=0, integer=True)
    for key, low in (("first_totals", 0.0), ("first_losses", -MEAN_MAX)):
        if key in history:
            _pairs(history[key], f"'history.{key}'", low)
    grads = history.get("first_grads", [])
    if not isinstance(grads, list) or not all(isinstance(g, list) for g in grads):
        raise _fail("'history.first_grads'", "must be a list of lists of per-layer norms")
    for i, g in enumerate(grads):
        for j, v in enumerate(g):
            _number(v, f"'history.first_grads.{i}.{j}'", low=-1, high=MEAN_MAX)  # -1: the layer had no gradient
    exploded = history.get("exploded")
    if exploded is not None:
        _pairs([exploded], "'history.exploded'", -MEAN_MAX)


def _floats(value: Any, key: str, length: int | None, *, inf_ok: bool) -> None:
    """None, a number, or (``length`` given) a list of that many numbers: each NaN (a norm that was not finite),
    +inf where ``inf_ok``, or in [0, float32's largest]: a clip's statistics are norms."""
    if value is None:
        return
    if length is not None:
        if not isinstance(value, list) or len(value) != length:
            raise _fail(key, f"must be a list of {length} norms or null, got {value!r:.40}")
        for i, v in enumerate(value):
            _number(v, f"{key[:-1]}.{i}'", low=0, high=F32_MAX, inf_ok=inf_ok, nan_ok=True)
        return
    _number(value, key, low=0, high=F32_MAX, inf_ok=inf_ok, nan_ok=True)


def _check_clip(clip: ClipMethod, saved: Mapping[str, Any]) -> None:
    """gradguard's own stateful clips: every value typed and in range, then a probe of the loaded copy, whose
    coefficient must be a number in [0, 1] (a mean of -1e308 is -inf in float32 and gives -inf, which would turn
    every gradient non-finite)."""
    probe: Any = copy.deepcopy(clip)
    try:
        probe.load_state_dict(dict(saved))
    except Exception as e:
        raise _fail("'clip'", f"cannot be read ({type(e).__name__}: {e})") from e
    if isinstance(clip, ZClip):
        _number(saved["calls"], "'clip.calls'", low=0, integer=True)
        _floats(saved["buffer"], "'clip.buffer'", clip.warmup_steps, inf_ok=False)
        for key in ("mean", "var"):
            if isinstance(saved[key], list):
                raise _fail(f"'clip.{key}'", f"must be a number or null, got {saved[key]!r:.40}")
            _floats(saved[key], f"'clip.{key}'", None, inf_ok=False)
            if saved[key] is None and saved["calls"] >= clip.warmup_steps:
                raise _fail(f"'clip.{key}'", f"must be a number after the warm-up ({saved['calls']} calls)")
    elif isinstance(clip, AutoClip):
        _number(saved["count"], "'clip.count'", low=0, integer=True)
        _floats(saved["norms"], "'clip.norms'", clip.history, inf_ok=True)
    else:
        return  # a strategy of the user's: loading it into a copy is the check
    try:
        coefs = [float(probe.coefficient(torch.tensor(x))) for x in (0.0, 1.0, 1e3)]
    except Exception as e:
        raise _fail("'clip'", f"cannot be used ({type(e).__name__}: {e})") from e
    if not all(0.0 <= c <= 1.0 for c in coefs):
        raise _fail("'clip'", f"gives clip coefficients {coefs} (they must be in [0, 1]): a value is out of range")


_LADDER_LOW = {"streak": 0, "early_rollbacks": 0, "rollbacks": 0, "backoffs": 0, "max_rollbacks": 0,
               "restore_after": 1, "snapshot_every": 1, "best_level": -MEAN_MAX}


def check_state(state: Any, layers: list[str], clip: ClipMethod | None, ladder: Ladder | None,
                ema_beta: float) -> None:
    """Raise ValueError unless ``state`` can be loaded whole into a Guard with these layers, clip and ladder.

    Args:
        state: what ``Guard.state_dict()`` returned (possibly through JSON).
        layers: the Guard's layer names. clip, ladder: the Guard's (None when it has none). ema_beta: its decay.

    Raises:
        ValueError: naming the first key that is missing or wrong.
    """
    if not isinstance(state, Mapping):
        raise _fail("the state", f"must be a dict, got {type(state).__name__}")
    for key in ("step", "history", "reporter"):
        if key not in state:
            raise _fail(f"'{key}'", "is missing")
    _number(state["step"], "'step'", low=0, integer=True)
    history = state["history"]
    if not isinstance(history, Mapping) or not isinstance(history.get("layers"), list):
        raise _fail("'history.layers'", "must be a list of layer names")
    _check_history(history, layers, ema_beta)
    reporter = state["reporter"]
    if not isinstance(reporter, Mapping) or not isinstance(reporter.get("active"), list):
        raise _fail("'reporter.active'", "must be a list")
    for i, entry in enumerate(reporter["active"]):
        if isinstance(entry, (list, tuple)) and len(entry) == 3:
            _number(entry[2], f"'reporter.active.{i}.2'", integer=True)  # the step it was last seen at
    try:
        Reporter(1).load_state_dict(dict(reporter))
    except Exception as e:
        raise _fail("'reporter'", f"cannot be read ({type(e).__name__}: {e})") from e
    if clip is not None and state.get("clip"):
        if not isinstance(state["clip"], Mapping):
            raise _fail("'clip'", "must be a dict")
        _check_clip(clip, state["clip"])
    if ladder is not None and state.get("ladder"):
        saved = state["ladder"]
        if not isinstance(saved, Mapping):
            raise _fail("'ladder'", "must be a dict")
        known = ladder.state_dict()
        for key, value in saved.items():
            if key not in known:
                raise _fail(f"'ladder.{key}'", "is not a setting of the repair ladder")
            if isinstance(known[key], bool):
                if not isinstance(value, bool):
                    raise _fail(f"'ladder.{key}'", f"must be true or false, got {value!r}")
            else:
                # best_level is +inf until the ladder trusts its first snapshot; counters and settings are >= 0
                _number(value, f"'ladder.{key}'", integer=isinstance(known[key], int), inf_ok=key == "best_level",
                        low=_LADDER_LOW.get(key), high=MEAN_MAX)
        if "lr_backoff" in saved and not 0 < saved["lr_backoff"] < 1:
            raise _fail("'ladder.lr_backoff'", f"must be in (0, 1), got {saved['lr_backoff']!r}")
        for key in ("lr_mult", "ceiling"):
            if key in saved and not 0 < saved[key] <= 1:
                raise _fail(f"'ladder.{key}'", f"must be in (0, 1], got {saved[key]!r}")


def save_state(recorder: Any, judge: Any, repairer: Any) -> dict[str, Any]:
    """The Guard's state (``Guard.state_dict``) from its rooms: the step, history, reporter, clip and ladder."""
    clip, ladder = repairer.clip, repairer.ladder
    return {"version": 1, "step": recorder.step, "history": judge.history_state(),
            "reporter": judge.reporter.state_dict(),
            "clip": clip.state_dict() if clip is not None else {},
            "ladder": ladder.state_dict() if ladder is not None else {}}


def load_state(state: dict[str, Any], recorder: Any, judge: Any, repairer: Any) -> None:
    """Load ``state`` into the rooms, after ``check_state`` (which raises before anything is changed)."""
    clip, ladder = repairer.clip, repairer.ladder
    check_state(state, list(recorder.layers.names), clip, ladder, judge.ema_beta)
    recorder.step = int(state["step"])
    judge.reporter.load_state_dict(state["reporter"])
    if clip is not None and state.get("clip"):
        clip.load_state_dict(state["clip"])
    if ladder is not None and state.get("ladder"):
        ladder.load_state_dict(state["ladder"])
    judge.load_history_state(state["history"])

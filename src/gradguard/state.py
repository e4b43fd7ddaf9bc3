"""Checking a saved Guard state before any of it is loaded: garbage gets a ValueError naming the key, and the
Guard is left exactly as it was (every part is loaded into a throw-away copy first)."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from .detect.history import History
from .detect.reporter import Reporter
from .repair.clip import ClipMethod
from .repair.ladder import Ladder


def _fail(key: str, what: str) -> ValueError:
    return ValueError(f"not a gradguard Guard state: {key} {what}; pass what Guard.state_dict() returned")


def _number(value: Any, key: str, *, low: float | None = None, integer: bool = False,
            inf_ok: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise _fail(key, f"must be {'an integer' if integer else 'a number'}, got {value!r}")
    if not (math.isfinite(value) or (inf_ok and value == math.inf)):
        raise _fail(key, f"must be finite, got {value!r}")
    if low is not None and value < low:
        raise _fail(key, f"must be >= {low}, got {value!r}")


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
    if set(history["layers"]) != set(layers):
        raise ValueError("this state was saved for a model with other layers; load it into a Guard on the same "
                         "model architecture")
    for key in ("grad_ema", "loss_ema"):
        ema = history.get(key)
        if not isinstance(ema, Mapping):
            raise _fail(f"'history.{key}'", "must be a dict")
        for field in ("mean", "var"):
            _number(ema.get(field), f"'history.{key}.{field}'")
        _number(ema.get("count"), f"'history.{key}.count'", low=0, integer=True)
        _number(ema.get("beta"), f"'history.{key}.beta'", low=0)
    try:  # the rest of the history: load it into a throw-away one
        probe = History(list(layers), np.ones(len(layers)), np.zeros(len(layers), dtype=bool), ema_beta)
        probe.load_state_dict(dict(history))
    except Exception as e:
        raise _fail("'history'", f"cannot be read ({type(e).__name__}: {e})") from e
    reporter = state["reporter"]
    if not isinstance(reporter, Mapping) or not isinstance(reporter.get("active"), list):
        raise _fail("'reporter.active'", "must be a list")
    try:
        Reporter(1).load_state_dict(dict(reporter))
    except Exception as e:
        raise _fail("'reporter'", f"cannot be read ({type(e).__name__}: {e})") from e
    if clip is not None and state.get("clip"):
        try:
            copy.deepcopy(clip).load_state_dict(state["clip"])
        except Exception as e:
            raise _fail("'clip'", f"cannot be read ({type(e).__name__}: {e})") from e
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
                # best_level is +inf until the ladder trusts its first snapshot
                _number(value, f"'ladder.{key}'", integer=isinstance(known[key], int), inf_ok=key == "best_level")
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

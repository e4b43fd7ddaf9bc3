"""Bad input, swept: every Guard option with values of the wrong type or range, losses that are not real scalars,
and saved states with one field deleted or replaced. The oracle is the README's contract: a documented value
attaches and guards; anything else gets a ValueError/TypeError naming the option or key, changes nothing and
leaves no hook; a state that is accepted must leave a Guard that still works (a NaN step skipped, no internal
failure, no warning)."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import faultkit as fk
import pytest

VALUES = [*fk.ODD_INPUTS, 0.5, 5, "auto", "zclip"]


OPTION_CASES = [pytest.param(name, value, id=f"{name}-{i}") for name in fk.OPTION_DOMAINS
                for i, value in enumerate(VALUES)]


@pytest.mark.parametrize(("name", "value"), OPTION_CASES)
def test_an_option(name: str, value: Any, tmp_path: Path) -> None:
    r = fk.try_option(name, value, tmp_path)
    assert r.clean, f"{r.what}: {r.detail}"


@pytest.mark.parametrize("value", fk.BAD_LOSSES, ids=lambda v: type(v).__name__)
def test_a_loss_that_is_not_a_real_scalar(value: Any) -> None:
    r = fk.try_loss(value)
    assert r.clean, f"{r.what}: {r.detail}"


_STATE = fk.trained_state()
_PATHS = fk.state_paths(_STATE)
_GARBAGE: list[Any] = [KeyError, None, "x", -1, 10**20, math.nan, -1e308, [1, 2], {}]


def _state_cases() -> list[Any]:
    rng = random.Random(13)
    picked = [(rng.choice(_PATHS), rng.choice(_GARBAGE)) for _ in range(36)]
    picked += [(("step",), 10**20), (("history", "layers", 0), [1, 2]), (("history", "grad_ema", "beta"), 10**20),
               (("history", "loss_ema", "var"), -1), (("history", "grad_ema", "mean"), -1e308),
               (("clip", "mean"), None), (("clip", "mean"), -1e308), (("ladder", "best_level"), 10**20)]
    return [pytest.param(path, value, id=f"{'.'.join(map(str, path))}={_shown(value)}") for path, value in picked]


def _shown(value: Any) -> str:
    return "del" if value is KeyError else repr(value)[:12]


@pytest.mark.parametrize(("path", "value"), _state_cases())
def test_a_garbage_state(path: tuple[Any, ...], value: Any) -> None:
    r = fk.try_state(_STATE, path, value)
    assert r.clean, f"{r.what}: {r.detail}"

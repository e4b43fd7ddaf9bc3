"""The detectors' median equals numpy's nanmedian (the oracle) on every shape, dtype and NaN/Inf pattern they see."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from gradguard.detect.history import nanmedian


@pytest.mark.parametrize("rows", [1, 2, 3, 7, 100, 400])  # 400 x cols crosses to numpy's own path
def test_nanmedian_is_numpys(rows: int) -> None:
    rng = np.random.default_rng(rows)
    for _ in range(200):
        shape = (rows, int(rng.integers(1, 7)))
        dtype = rng.choice([np.float32, np.float64])
        a = (rng.standard_normal(shape) * 10.0 ** rng.integers(-30, 30)).astype(dtype)
        a[rng.random(shape) < rng.random() * 0.7] = np.nan  # all-NaN columns included
        a[rng.random(shape) < 0.05] = np.inf
        a[rng.random(shape) < 0.05] = -np.inf
        for axis in (0, 1):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                want = np.nanmedian(a, axis=axis)
            got = nanmedian(a, axis)
            assert got.dtype == want.dtype and got.shape == want.shape
            assert np.array_equal(got, want, equal_nan=True), (a, axis, got, want)


def test_nanmedian_by_hand() -> None:
    a = np.array([[1.0, np.nan], [4.0, np.nan], [2.0, 5.0], [10.0, np.nan]])
    assert nanmedian(a, 0).tolist()[0] == 3.0  # (2 + 4) / 2
    assert nanmedian(a, 0).tolist()[1] == 5.0
    assert np.isnan(nanmedian(np.full((3, 2), np.nan), 0)).all()

"""History keeps its columns in buffers shown as views; the oracle is the plain definition: every row appended,
concatenated, the last ``keep`` kept."""

from __future__ import annotations

import numpy as np

from gradguard.detect.history import History


def test_columns_are_the_last_keep_rows_of_everything_appended() -> None:
    rng = np.random.default_rng(5)
    for keep in (1, 7, 32):
        h = History(["a", "b"], np.array([4.0, 4.0]), np.zeros(2, dtype=bool), keep=keep)
        all_steps, all_grad, all_loss = np.zeros(0, dtype=np.int64), np.zeros((0, 2), dtype=np.float32), []
        step = 0
        for read in range(60):
            m = int(rng.choice([1, 3, 10, keep, keep + 5, 3 * keep]))
            steps = np.arange(step, step + m)
            step += m
            g = rng.random((m, 2)).astype(np.float32)
            loss = rng.random(m)
            h.append(steps, np.sqrt((g.astype(float) ** 2).sum(1)), loss, np.ones(m, dtype=bool), g)
            all_steps = np.concatenate([all_steps, steps])
            all_grad = np.concatenate([all_grad, g])
            all_loss += loss.tolist()
            np.testing.assert_array_equal(h.steps, all_steps[-keep:])
            np.testing.assert_array_equal(h.grad, all_grad[-keep:])
            np.testing.assert_array_equal(h.loss, np.array(all_loss)[-keep:])
            assert len(h.total) == len(h.z) == len(h.finite_count) == len(h.clipped) == min(step, keep)
            assert h.finite_count[-1] == step  # every total was finite
            if read == 30:  # a column set from outside (as add_param_group widens the layout) is appended to
                h.grad = np.concatenate([h.grad[:, :1], h.grad[:, 1:]], axis=1)


def test_a_huge_keep_costs_only_the_rows_there_are() -> None:
    # keep follows log_every: Guard(log_every=10**20) must not allocate for 10**20 rows.
    h = History(["a"], np.array([4.0]), np.zeros(1, dtype=bool), keep=10 ** 20)
    for read in range(50):
        steps = np.arange(read * 10, read * 10 + 10)
        h.append(steps, np.ones(10), np.ones(10), np.ones(10, dtype=bool), np.ones((10, 1)))
    np.testing.assert_array_equal(h.steps, np.arange(500))
    assert h.steps.base is not None and len(h.steps.base) <= 2 * 500 + 64  # grown by doubling, not to keep

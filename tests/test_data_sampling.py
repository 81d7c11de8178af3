"""Clip sampling (SPEC 10.2) and label reduction (SPEC 10.1)."""

import numpy as np
import pytest

from cffm_jax.data.vspw import eval_clip_indices, reduce_zero_label, train_clip_indices


@pytest.mark.parametrize(
    "t, expected",
    [
        (0, [0]),
        (1, [1]),
        (2, [2]),
        (3, [0, 1, 2, 3]),
        (4, [0, 2, 3, 4]),
        (5, [0, 2, 4, 5]),
        (6, [0, 2, 4, 6]),
        (7, [0, 3, 5, 7]),
        (8, [0, 3, 6, 8]),
        (9, [0, 3, 6, 9]),
        (10, [1, 4, 7, 10]),
        (57, [48, 51, 54, 57]),
    ],
)
def test_eval_clip_indices(t, expected):
    assert eval_clip_indices(t) == expected


def test_eval_clip_indices_rejects_negative():
    with pytest.raises(ValueError):
        eval_clip_indices(-1)


def test_train_clip_forward_and_reversed():
    n = 30
    seen_targets = {False: set(), True: set()}
    for seed in range(400):
        indices, rev = train_clip_indices(n, np.random.default_rng(seed))
        assert len(indices) == 4
        if rev:
            # Reversed list: positions t-9, t-6, t-3, t of the reversed video are future frames.
            t = indices[-1]
            assert indices == [t + 9, t + 6, t + 3, t]
            assert 0 <= t <= n - 10
        else:
            t = indices[-1]
            assert indices == [t - 9, t - 6, t - 3, t]
            assert 9 <= t <= n - 1
        seen_targets[rev].add(t)
    # Both directions occur and the target covers every allowed position.
    assert seen_targets[False] == set(range(9, n))
    assert seen_targets[True] == set(range(0, n - 9))


def test_train_clip_draw_order_reversal_then_target():
    rng = np.random.default_rng(7)
    reverse = rng.random() < 0.5
    t = int(rng.integers(9, 20))
    indices, rev = train_clip_indices(20, np.random.default_rng(7))
    assert rev == reverse
    assert indices[-1] == (19 - t if reverse else t)


def test_train_clip_minimum_length():
    for seed in range(20):
        indices, rev = train_clip_indices(10, np.random.default_rng(seed))
        assert indices == ([9, 6, 3, 0] if rev else [0, 3, 6, 9])
    with pytest.raises(ValueError):
        train_clip_indices(9, np.random.default_rng(0))


def test_reduce_zero_label():
    raw = np.array([[0, 1, 2], [124, 255, 7]], np.uint8)
    np.testing.assert_array_equal(reduce_zero_label(raw), [[255, 0, 1], [123, 255, 6]])
    assert reduce_zero_label(raw).dtype == np.uint8
    # every uint8 value (a lookup table) and wider integers (arithmetic) against the rule
    every = np.arange(256).reshape(16, 16)
    expected = np.where((every == 0) | (every == 255), 255, every - 1)
    for dtype in (np.uint8, np.int32):
        np.testing.assert_array_equal(reduce_zero_label(every.astype(dtype)), expected)

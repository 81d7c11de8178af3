"""Tests for cffm_jax.kmeans: official k-means parity (kmeans_tiny.npz), early stop, batching, init."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cffm_jax import kmeans as km

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "kmeans_tiny.npz"


@pytest.fixture(scope="module")
def kmeans_tiny():
    with np.load(FIXTURE) as data:
        arrays = {k: data[k] for k in data.files if k != "meta"}
        meta = json.loads(str(data["meta"]))
    return arrays, meta


def reference_kmeans(x: np.ndarray, centers: np.ndarray, max_iter: int, tol: float):
    """Plain numpy transcription of the official algorithm (SPEC section 6)."""
    x = x.astype(np.float32)
    centers = centers.astype(np.float32)
    k = centers.shape[0]
    labels, n_iter = None, 0
    while n_iter < max_iter:
        n_iter += 1
        sim = 2 * x @ centers.T - (x**2).sum(1)[:, None] - (centers**2).sum(1)[None, :]
        labels = sim.argmax(1)
        new = np.zeros_like(centers)
        for j in range(k):
            members = x[labels == j]
            if len(members):
                new[j] = members.mean(0)
        shift = ((new - centers) ** 2).sum()
        centers = new
        if shift <= tol:
            break
    return centers, labels, n_iter


@pytest.mark.parametrize("case", ["", "_dup"])
def test_matches_official_fixture(kmeans_tiny, case):
    arrays, meta = kmeans_tiny
    x = arrays["input/features"]
    init = x[arrays["input/init_idx" + case]]
    res = km.kmeans_with_info(x, k=100, max_iter=10, tol=1e-4, init_centers=init)
    np.testing.assert_array_equal(np.asarray(res.labels), arrays["output/labels" + case])
    np.testing.assert_allclose(np.asarray(res.centers), arrays["output/centers" + case], atol=1e-5, rtol=1e-5)
    assert int(res.n_iter) == meta["iterations_run"]["case1" if case == "" else "case2_dup"]
    assert res.centers.dtype == jnp.float32 and res.labels.dtype == jnp.int32
    centers, labels = km.kmeans(x, k=100, init_centers=init)
    np.testing.assert_array_equal(np.asarray(labels), np.asarray(res.labels))
    np.testing.assert_array_equal(np.asarray(centers), np.asarray(res.centers))


def test_empty_cluster_centre_is_exactly_zero(kmeans_tiny):
    arrays, _ = kmeans_tiny
    x = arrays["input/features"]
    init = x[arrays["input/init_idx_dup"]]
    # One iteration: cluster 7 duplicates cluster 3, loses every tie and becomes the zero vector.
    res = km.kmeans_with_info(x, k=100, max_iter=1, init_centers=init)
    assert int(res.n_iter) == 1
    assert not np.any(np.asarray(res.labels) == 7)
    np.testing.assert_array_equal(np.asarray(res.centers)[7], np.zeros(32, np.float32))
    np.testing.assert_array_equal(arrays["output/centers_dup"][7], np.zeros(32, np.float32))


def test_update_centers_means_and_zero_for_empty():
    x = jnp.array([[1.0, 2.0], [3.0, 4.0], [10.0, 0.0]])
    centers = km.update_centers(x, jnp.array([0, 0, 2], jnp.int32), 3)
    np.testing.assert_array_equal(np.asarray(centers), [[2.0, 3.0], [0.0, 0.0], [10.0, 0.0]])


def _blobs(rng: np.random.Generator, n_per: int, k: int, d: int, spread: float = 0.05) -> np.ndarray:
    means = rng.normal(size=(k, d)) * 5
    x = means[:, None, :] + spread * rng.normal(size=(k, n_per, d))
    return rng.permutation(x.reshape(k * n_per, d)).astype(np.float32)


def test_early_stop_matches_numpy_reference():
    rng = np.random.default_rng(0)
    x = _blobs(rng, n_per=40, k=4, d=6)
    init = x[[0, 1, 2, 3, 4]]  # five centres for four blobs: converges in a few iterations
    res = km.kmeans_with_info(x, k=5, max_iter=10, tol=1e-4, init_centers=init)
    ref_centers, ref_labels, ref_iter = reference_kmeans(x, init, 10, 1e-4)
    assert ref_iter < 10
    assert int(res.n_iter) == ref_iter
    assert float(res.shift) <= 1e-4
    np.testing.assert_array_equal(np.asarray(res.labels), ref_labels)
    np.testing.assert_allclose(np.asarray(res.centers), ref_centers, atol=1e-5)
    # A negative tolerance disables the early stop: all max_iter iterations run, same fixed point.
    full = km.kmeans_with_info(x, k=5, max_iter=10, tol=-1.0, init_centers=init)
    assert int(full.n_iter) == 10
    np.testing.assert_array_equal(np.asarray(full.labels), ref_labels)


def test_random_data_matches_numpy_reference_for_all_iterations():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 16)).astype(np.float32)
    init = x[rng.choice(300, 12, replace=False)]
    for max_iter in (1, 3, 7):
        res = km.kmeans_with_info(x, k=12, max_iter=max_iter, tol=1e-4, init_centers=init)
        ref_centers, ref_labels, ref_iter = reference_kmeans(x, init, max_iter, 1e-4)
        assert int(res.n_iter) == ref_iter == max_iter
        np.testing.assert_array_equal(np.asarray(res.labels), ref_labels)
        np.testing.assert_allclose(np.asarray(res.centers), ref_centers, atol=1e-5)


def test_batched_equals_one_by_one():
    rng = np.random.default_rng(2)
    # Video 0 converges early, videos 1 and 2 run longer: the per-video early stop must be independent.
    xs = np.stack([_blobs(rng, 50, 3, 8), rng.normal(size=(150, 8)), rng.normal(size=(150, 8))])
    xs = xs.astype(np.float32)
    inits = np.stack([x[:4] for x in xs])
    batched = km.kmeans_batched(xs, k=4, max_iter=10, init_centers=inits)
    assert batched.centers.shape == (3, 4, 8) and batched.labels.shape == (3, 150)
    assert len(set(np.asarray(batched.n_iter).tolist())) > 1
    for v in range(3):
        single = km.kmeans_with_info(xs[v], k=4, max_iter=10, init_centers=inits[v])
        np.testing.assert_array_equal(np.asarray(batched.labels[v]), np.asarray(single.labels))
        np.testing.assert_allclose(np.asarray(batched.centers[v]), np.asarray(single.centers), atol=1e-6)
        assert int(batched.n_iter[v]) == int(single.n_iter)

    # The core also works under jax.vmap (same results, slower on CPU than the native batch dimension).
    vmapped = jax.jit(jax.vmap(lambda x, c: km.lloyd(x, c, max_iter=10, tol=1e-4)))(xs, inits)
    np.testing.assert_array_equal(np.asarray(vmapped.labels), np.asarray(batched.labels))
    np.testing.assert_array_equal(np.asarray(vmapped.n_iter), np.asarray(batched.n_iter))
    np.testing.assert_allclose(np.asarray(vmapped.centers), np.asarray(batched.centers), atol=1e-6)

    key = jax.random.key(5)
    batched_random = km.kmeans_batched(xs, k=4, key=key)
    for v, key_v in enumerate(jax.random.split(key, 3)):
        single = km.kmeans_with_info(xs[v], k=4, key=key_v)
        np.testing.assert_array_equal(np.asarray(batched_random.labels[v]), np.asarray(single.labels))


def _row_indices(x: np.ndarray, rows: np.ndarray) -> list[int]:
    return [int(np.flatnonzero((x == r).all(1))[0]) for r in rows]


@pytest.mark.parametrize("init", ["random", "k-means++"])
def test_seeded_init_is_deterministic_and_distinct(init):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(60, 5)).astype(np.float32)
    init_fn = km.random_init if init == "random" else km.kmeans_plus_plus_init
    a = np.asarray(init_fn(jnp.asarray(x), 20, jax.random.key(0)))
    b = np.asarray(init_fn(jnp.asarray(x), 20, jax.random.key(0)))
    c = np.asarray(init_fn(jnp.asarray(x), 20, jax.random.key(1)))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    idx = _row_indices(x, a)  # every centre is a row of x ...
    assert len(set(idx)) == 20  # ... and no row is picked twice
    # The entry point with a key reproduces itself and starts from the same rows.
    c1, l1 = km.kmeans(x, k=20, key=jax.random.key(0), init=init, max_iter=1)
    c2, l2 = km.kmeans(x, k=20, key=jax.random.key(0), init=init, max_iter=1)
    np.testing.assert_array_equal(np.asarray(c1), np.asarray(c2))
    np.testing.assert_array_equal(np.asarray(l1), np.asarray(l2))
    ref_centers, ref_labels, _ = reference_kmeans(x, a, 1, 1e-4)
    np.testing.assert_array_equal(np.asarray(l1), ref_labels)


def test_all_k_rows_when_k_equals_n():
    x = np.arange(24, dtype=np.float32).reshape(8, 3)
    rows = np.asarray(km.random_init(jnp.asarray(x), 8, jax.random.key(0)))
    assert sorted(_row_indices(x, rows)) == list(range(8))


def test_argument_errors():
    x = np.zeros((10, 3), np.float32)
    with pytest.raises(ValueError, match="unknown init"):
        km.kmeans(x, k=2, key=jax.random.key(0), init="kmeans++")
    with pytest.raises(ValueError, match="k must be"):
        km.kmeans(x, k=11, key=jax.random.key(0))
    with pytest.raises(ValueError, match="init_centers must have shape"):
        km.kmeans(x, k=2, init_centers=np.zeros((3, 3), np.float32))
    with pytest.raises(ValueError, match="needs init_centers or a jax.random key"):
        km.kmeans(x, k=2)
    with pytest.raises(ValueError, match="max_iter"):
        km.kmeans(x, k=2, key=jax.random.key(0), max_iter=0)
    with pytest.raises(ValueError, match="3 dims"):
        km.kmeans_batched(x, k=2, key=jax.random.key(0))

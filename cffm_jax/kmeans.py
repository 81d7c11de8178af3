"""Jitted Lloyd k-means reproducing the official prototype k-means (SPEC.md section 6).

The official CFFM++ prototype generator clusters the (10*h8*w8, E) feature matrix of each video with
``fast_pytorch_kmeans.KMeans(n_clusters=100, max_iter=10, mode='euclidean')``. This module reproduces that
algorithm exactly, given the same initial centres:

* assignment: ``argmax_k (2 x.c_k - |x|^2 - |c_k|^2)`` evaluated in float32 in that order, ties to the lowest
  index;
* update: new centre = mean of its points; an empty cluster's centre becomes the **zero vector**;
* stop when ``sum((new - old)^2) <= tol`` (checked after the update) or after ``max_iter`` iterations;
* the returned labels are the assignment of the LAST iteration (made against the centres before that
  iteration's update); the returned centres are after the last update.

Initialisation (``init``):

* ``'random'`` (default): K distinct rows of ``x`` drawn with a seeded ``jax.random`` key. The official code
  is unseeded and, depending on the library version, draws with replacement (``torch.randint``) or without
  (``np.random.choice``); distinct rows are used here, so prototypes are reproducible but not bit-identical
  to the released files (which nobody can reproduce).
* ``'k-means++'``: D^2 sampling seeded by ``key``. A deviation from the official random init, offered as an
  option only.
* explicit ``init_centers`` override both.

Everything is a small pure function with static ``k``, ``max_iter`` and shapes, so it jits once per problem
size; :func:`lloyd` also takes a leading batch dimension and clusters V videos in one call
(:func:`kmeans_batched`). Memory: the (N, K) similarity matrix (26 MB for 64,800 x 100) is materialised;
nothing of size N x K x D is.

Determinism: on CPU results are bit-reproducible. On GPU the centre sums use scatter-add (``segment_sum``),
whose float32 summation order is not fixed unless XLA runs with ``--xla_gpu_deterministic_ops=true``; without
it, reruns can differ at float32 rounding level (and, rarely, flip a near-tie label in a later iteration).

Speed (``scripts/benchmark_kmeans.py``, 64,800 x 256, K=100, 10 iterations, 2 CPU cores): about 3x faster than
both fast-pytorch-kmeans 0.2.2 and scikit-learn's Lloyd, with labels identical to fast-pytorch-kmeans.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from cffm_jax import xla_options

_HIGHEST = jax.lax.Precision.HIGHEST
_INITS = ("random", "k-means++")


class KMeansResult(NamedTuple):
    """Result of :func:`kmeans_with_info`.

    Attributes:
      centers: (K, D) float32 centres after the last update.
      labels: (N,) int32 assignment of the last iteration.
      n_iter: () int32 number of Lloyd iterations run (1..max_iter).
      shift: () float32 summed squared centre shift of the last iteration.
    """

    centers: jax.Array
    labels: jax.Array
    n_iter: jax.Array
    shift: jax.Array


def assign(x: jax.Array, centers: jax.Array, x_sq: jax.Array | None = None) -> jax.Array:
    """Nearest-centre labels exactly as the official k-means computes them.

    The similarity ``2 x.c - |x|^2 - |c|^2`` is evaluated in float32 in that order (the |x|^2 term does not
    change the argmax mathematically, but it does change the float rounding, and with it near-ties).

    Args:
      x: (..., N, D) float32 points.
      centers: (..., K, D) float32 centres (same leading dims as ``x``).
      x_sq: optional (..., N) precomputed ``sum(x * x, axis=-1)`` (loop invariant).

    Returns:
      (..., N) int32 index of the maximum similarity (ties to the lowest index).
    """
    if x_sq is None:
        x_sq = jnp.sum(x * x, axis=-1)
    sim = 2.0 * jnp.einsum("...nd,...kd->...nk", x, centers, precision=_HIGHEST)
    sim = sim - x_sq[..., :, None]
    sim = sim - jnp.sum(centers * centers, axis=-1)[..., None, :]
    return jnp.argmax(sim, axis=-1).astype(jnp.int32)


def update_centers(x: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """Mean of the points of each cluster; an empty cluster's centre is the zero vector.

    Uses ``segment_sum`` (about 10x faster than a (K, N) one-hot matmul on CPU for 64,800 x 256, K=100; the
    sums differ from the official one-hot matmul only by float32 summation order).

    Args:
      x: (N, D) float32 points.
      labels: (N,) int32 cluster indices in [0, k).
      k: number of clusters (static).

    Returns:
      (K, D) float32 centres.
    """
    sums = jax.ops.segment_sum(x, labels, num_segments=k)
    counts = jax.ops.segment_sum(jnp.ones_like(labels, dtype=x.dtype), labels, num_segments=k)[:, None]
    return jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), 0.0)


def lloyd(x: jax.Array, init_centers: jax.Array, *, max_iter: int = 10, tol: float = 1e-4) -> KMeansResult:
    """Lloyd iterations from given centres, for one point set or a batch (un-jitted core).

    A batch of V sets is clustered natively (one batched matmul per iteration; the centre sums of all sets are
    one ``segment_sum`` over V*K segments of the (V*N, D) rows, flattened once outside the loop). Each set
    stops on its own: once its shift is <= tol its state is frozen, so every set's result equals an
    unbatched run on it. The function also works under ``jax.vmap``, but there XLA's CPU scatter is ~20x
    slower; pass the batch dimension instead.

    Args:
      x: (N, D) or (V, N, D) float32 points.
      init_centers: (K, D) or (V, K, D) float32 initial centres.
      max_iter: maximum number of iterations (>= 1, static).
      tol: a set stops once the summed squared centre shift of an iteration is <= tol.

    Returns:
      :class:`KMeansResult` with a leading V dimension on every field iff ``x`` has one.
    """
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    x = jnp.asarray(x, jnp.float32)
    centers = jnp.asarray(init_centers, jnp.float32)
    if x.ndim == 2:
        res = lloyd(x[None], centers[None], max_iter=max_iter, tol=tol)
        return KMeansResult(*(field[0] for field in res))
    v, n, d = x.shape
    k = centers.shape[1]
    x_sq = jnp.sum(x * x, axis=-1)
    x_rows = x.reshape(v * n, d)
    offsets = (jnp.arange(v, dtype=jnp.int32) * k)[:, None]

    def body(state):
        old, old_labels, n_iter, old_shift, active = state
        labels = assign(x, old, x_sq)
        new = update_centers(x_rows, (labels + offsets).reshape(v * n), v * k).reshape(v, k, d)
        shift = jnp.sum((new - old) ** 2, axis=(1, 2))
        n_iter = n_iter + active.astype(jnp.int32)
        return (
            jnp.where(active[:, None, None], new, old),
            jnp.where(active[:, None], labels, old_labels),
            n_iter,
            jnp.where(active, shift, old_shift),
            active & (shift > tol) & (n_iter < max_iter),
        )

    init = (
        centers,
        jnp.zeros((v, n), jnp.int32),
        jnp.zeros((v,), jnp.int32),
        jnp.full((v,), jnp.inf, jnp.float32),
        jnp.ones((v,), bool),
    )
    centers, labels, n_iter, shift, _ = jax.lax.while_loop(lambda s: jnp.any(s[-1]), body, init)
    return KMeansResult(centers, labels, n_iter, shift)


@functools.partial(jax.jit, static_argnames=("k",))
def random_init(x: jax.Array, k: int, key: jax.Array) -> jax.Array:
    """K distinct rows of ``x`` chosen uniformly at random.

    Args:
      x: (N, D) points, N >= k.
      k: number of rows (static).
      key: ``jax.random`` key.

    Returns:
      (K, D) float32 rows of ``x``.
    """
    idx = jax.random.choice(key, x.shape[0], (k,), replace=False)
    return jnp.asarray(x, jnp.float32)[idx]


@xla_options.jit("default", precision="highest", static_argnames=("k",))
def kmeans_plus_plus_init(x: jax.Array, k: int, key: jax.Array) -> jax.Array:
    """k-means++ (D^2-weighted) seeding; a deviation from the official uniform random init.

    Args:
      x: (N, D) points, N >= k.
      k: number of centres (static).
      key: ``jax.random`` key.

    Returns:
      (K, D) float32 rows of ``x``.
    """
    x = jnp.asarray(x, jnp.float32)
    n = x.shape[0]
    key, first_key = jax.random.split(key)
    first = jax.random.randint(first_key, (), 0, n)
    x2 = jnp.sum(x * x, axis=1)

    def sq_dist(c):
        return jnp.maximum(x2 - 2.0 * jnp.matmul(x, c, precision=_HIGHEST) + jnp.sum(c * c), 0.0)

    def body(j, state):
        idx, min_d2 = state
        logits = jnp.where(min_d2 > 0, jnp.log(jnp.where(min_d2 > 0, min_d2, 1.0)), -jnp.inf)
        # All remaining distances zero (fewer distinct points than k): fall back to uniform.
        logits = jnp.where(jnp.any(min_d2 > 0), logits, 0.0)
        pick = jax.random.categorical(jax.random.fold_in(key, j), logits)
        idx = idx.at[j].set(pick)
        return idx, jnp.minimum(min_d2, sq_dist(x[pick]))

    idx0 = jnp.zeros((k,), jnp.int32).at[0].set(first)
    idx, _ = jax.lax.fori_loop(1, k, body, (idx0, sq_dist(x[first])))
    return x[idx]


def _initial_centers(x: jax.Array, k: int, init_centers, key, init: str) -> jax.Array:
    if init_centers is not None:
        return jnp.asarray(init_centers, jnp.float32)
    if key is None:
        raise ValueError("kmeans needs init_centers or a jax.random key")
    if init == "random":
        return random_init(x, k, key)
    return kmeans_plus_plus_init(x, k, key)


def _check_args(x_shape: tuple[int, ...], k: int, init: str, init_centers, n_batch_dims: int) -> None:
    if init not in _INITS:
        raise ValueError(f"unknown init {init!r}; valid: {', '.join(_INITS)}")
    if len(x_shape) != 2 + n_batch_dims:
        raise ValueError(f"x must have {2 + n_batch_dims} dims, got shape {x_shape}")
    n, d = x_shape[-2:]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, N={n}], got {k}")
    if init_centers is not None:
        expected = (*x_shape[:n_batch_dims], k, d)
        if tuple(init_centers.shape) != expected:
            raise ValueError(f"init_centers must have shape {expected}, got {tuple(init_centers.shape)}")


@xla_options.jit("default", precision="highest", static_argnames=("k", "max_iter", "init"))
def _kmeans_jit(x, init_centers, key, *, k, max_iter, tol, init) -> KMeansResult:
    centers = _initial_centers(x, k, init_centers, key, init)
    return lloyd(x, centers, max_iter=max_iter, tol=tol)


@xla_options.jit("default", precision="highest", static_argnames=("k", "max_iter", "init"))
def _kmeans_batched_jit(x, init_centers, keys, *, k, max_iter, tol, init) -> KMeansResult:
    if init_centers is None:
        init_centers = jax.vmap(lambda xv, kv: _initial_centers(xv, k, None, kv, init))(x, keys)
    return lloyd(x, init_centers, max_iter=max_iter, tol=tol)


def kmeans_with_info(
    x: jax.Array,
    *,
    k: int,
    max_iter: int = 10,
    tol: float = 1e-4,
    init_centers: jax.Array | None = None,
    key: jax.Array | None = None,
    init: str = "random",
) -> KMeansResult:
    """Official-equivalent Lloyd k-means on one point set, with the iteration count.

    Args:
      x: (N, D) points (cast to float32).
      k: number of clusters.
      max_iter: maximum number of iterations.
      tol: early-stop threshold on the summed squared centre shift.
      init_centers: optional (K, D) initial centres; when given, ``key``/``init`` are ignored.
      key: ``jax.random`` key for ``init`` (required without ``init_centers``).
      init: ``'random'`` (K distinct rows) or ``'k-means++'``.

    Returns:
      :class:`KMeansResult` with centers (K, D) float32, labels (N,) int32, n_iter and shift.
    """
    x = jnp.asarray(x, jnp.float32)
    _check_args(x.shape, k, init, init_centers, 0)
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    return _kmeans_jit(x, init_centers, key, k=k, max_iter=max_iter, tol=tol, init=init)


def kmeans(
    x: jax.Array,
    *,
    k: int,
    max_iter: int = 10,
    tol: float = 1e-4,
    init_centers: jax.Array | None = None,
    key: jax.Array | None = None,
    init: str = "random",
) -> tuple[jax.Array, jax.Array]:
    """Official-equivalent Lloyd k-means (see :func:`kmeans_with_info` for the arguments).

    Returns:
      centers (K, D) float32 and labels (N,) int32.
    """
    res = kmeans_with_info(x, k=k, max_iter=max_iter, tol=tol, init_centers=init_centers, key=key, init=init)
    return res.centers, res.labels


def kmeans_batched(
    x: jax.Array,
    *,
    k: int,
    max_iter: int = 10,
    tol: float = 1e-4,
    init_centers: jax.Array | None = None,
    key: jax.Array | None = None,
    init: str = "random",
) -> KMeansResult:
    """Independent k-means on V point sets of equal shape in one jitted call (batched :func:`lloyd`).

    Each set stops independently (its state is frozen once its shift is <= tol), so the result for each
    video equals :func:`kmeans_with_info` on that video alone.

    Args:
      x: (V, N, D) points.
      k, max_iter, tol, init: as in :func:`kmeans_with_info`.
      init_centers: optional (V, K, D) initial centres.
      key: one ``jax.random`` key, split into V per-video keys (video v uses ``jax.random.split(key, V)[v]``).

    Returns:
      :class:`KMeansResult` with centers (V, K, D), labels (V, N), n_iter (V,), shift (V,).
    """
    x = jnp.asarray(x, jnp.float32)
    _check_args(x.shape, k, init, init_centers, 1)
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    keys = None
    if init_centers is None:
        if key is None:
            raise ValueError("kmeans_batched needs init_centers or a jax.random key")
        keys = jax.random.split(key, x.shape[0])
    return _kmeans_batched_jit(x, init_centers, keys, k=k, max_iter=max_iter, tol=tol, init=init)

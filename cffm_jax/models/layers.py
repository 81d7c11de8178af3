"""Small building blocks shared by the MiT backbone and the CFFM heads.

Everything is channels-last (NHWC). The helpers reproduce PyTorch semantics where the official code relies on
them: bilinear resizing with ``align_corners=False`` and no antialiasing (SPEC.md section 2 and 13), the exact
erf GELU, and the PyTorch default initialisers (only relevant when training from scratch).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

ARGMAX_GROUPS = 6  # see argmax_classes
ARGMAX_MIN_CLASSES = 48
# Values of the models' ``matmul_precision`` (jax.default_matmul_precision's names); 'default' = XLA's own.
MATMUL_PRECISIONS = ("default", "high", "highest", "bfloat16", "tensorfloat32", "float32")


@functools.cache
def _normalize_table() -> np.ndarray:
    """(256 * 3,) float32: ``cffm_jax.data.transforms.normalize`` of every uint8 value in each RGB channel."""
    from cffm_jax.data.transforms import normalize

    return normalize(np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)).reshape(-1)


def normalize_images(images: jax.Array) -> jax.Array:
    """uint8 RGB images (..., 3) -> float32 ``(x - mean) / std`` with the ImageNet statistics, equal to the bit to
    the data transforms' ``cffm_jax.data.transforms.normalize``; images of any other dtype are taken as normalised
    already and returned unchanged.

    Evaluation and prediction hand the networks uint8 frames (a quarter of float32's bytes to stack and copy to
    the device) and normalise them here, inside the program that encodes them. A lookup of the 768 values that
    ``normalize`` gives, not the arithmetic: XLA turns the division by constants into a multiplication by their
    reciprocals (up to 2.4e-7 off).
    """
    if images.dtype != jnp.uint8:
        return images
    index = images.astype(jnp.int32) * 3 + jnp.arange(3, dtype=jnp.int32)
    return jnp.take(jnp.asarray(_normalize_table()), index, mode="clip")


def matmul_precision_scope(precision: str | None) -> contextlib.AbstractContextManager:
    """``jax.default_matmul_precision(precision)`` around a model's computation (it applies to the matrix
    products and convolutions traced inside, including their autodiff transposes); None or 'default': XLA's own.

    On GPUs XLA's default runs float32 products on the TF32 matrix units (TPUs: bfloat16 passes): the official
    logits then move by ~3e-3 (measured on an H100: 2.9e-3 to 5.5e-3 on the tiny fixtures, against 2e-6 at
    'highest'). XLA:CPU computes float32 products in float32 at every setting.
    """
    if precision is None or precision == "default":
        return contextlib.nullcontext()
    if precision not in MATMUL_PRECISIONS:
        raise ValueError(f"unknown matmul_precision {precision!r}; valid: {', '.join(MATMUL_PRECISIONS)}")
    return jax.default_matmul_precision(precision)


def in_matmul_precision_scope(method):
    """Decorator of a module method: runs it in ``matmul_precision_scope(self.matmul_precision)``."""

    @functools.wraps(method)
    def scoped(self, *args, **kwargs):
        with matmul_precision_scope(self.matmul_precision):
            return method(self, *args, **kwargs)

    return scoped


# ---------------------------------------------------------------------------------------------------------
# Initialisers matching the official code (SPEC.md section 4.1, "Init").


def torch_linear_kernel_init() -> nn.initializers.Initializer:
    """PyTorch's default ``nn.Linear``/``nn.Conv2d`` weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int) -> nn.initializers.Initializer:
    """PyTorch's default bias init for a layer with ``fan_in`` inputs: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def trunc_normal_init(std: float = 0.02) -> nn.initializers.Initializer:
    """timm ``trunc_normal_(std)``: normal truncated at +-2 (absolute, i.e. ~ +-100 std for std=.02)."""

    def init(key, shape, dtype=jnp.float32):
        # timm truncates at absolute values a=-2, b=2; for std=0.02 this is effectively an untruncated normal.
        return jnp.clip(std * jax.random.normal(key, shape, dtype), -2.0, 2.0)

    return init


def conv_fan_out_init(groups: int = 1) -> nn.initializers.Initializer:
    """MiT conv init: normal(0, sqrt(2 / fan_out)) with fan_out = kh * kw * out_channels / groups."""

    def init(key, shape, dtype=jnp.float32):
        kh, kw, _, out = shape
        fan_out = kh * kw * out // groups
        return math.sqrt(2.0 / fan_out) * jax.random.normal(key, shape, dtype)

    return init


# ---------------------------------------------------------------------------------------------------------
# Functional helpers.


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, as PyTorch ``nn.GELU()``: 0.5 x (1 + erf(x / sqrt(2))).

    Written out rather than ``jax.nn.gelu(approximate=False)`` (same values to 1e-7), whose erfc form is 2.5x slower
    on XLA:CPU.
    """
    return 0.5 * x * (1.0 + jax.lax.erf(x * np.float32(1.0 / math.sqrt(2.0))).astype(x.dtype))


def _bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source rows and weights of PyTorch's bilinear resize (``align_corners=False``) along one axis.

    Computed in float32 exactly as PyTorch does (scale = in / out, src = (dst + 0.5) * scale - 0.5, clamped at 0);
    computing them in float64 instead moves some outputs by ~3e-5.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    src = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    src = np.maximum(src, np.float32(0.0))
    lo = np.minimum(np.floor(src).astype(np.int32), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    return lo, hi, (src - lo.astype(np.float32)).astype(np.float32)


def _resize_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
    """Two-tap interpolation along ``axis`` to ``size`` (a no-op at the same size)."""
    in_size = x.shape[axis]
    if in_size == size:
        return x
    lo, hi, frac = _bilinear_taps(in_size, size)
    shape = [1] * x.ndim
    shape[axis] = size
    frac = jnp.asarray(frac.reshape(shape), dtype=x.dtype)
    a, b = jnp.take(x, lo, axis=axis), jnp.take(x, hi, axis=axis)
    return a + (b - a) * frac


@functools.lru_cache(maxsize=256)
def _adjoint_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The transpose of the two-tap interpolation as a gather: which outputs each input receives from.

    Returns:
      index: int32 (M, in_size), output positions (padding: 0); weight: float32 (M, in_size), their weights
      (``1 - frac`` for the lower tap, ``frac`` for the upper one, 1 where both taps are the same row; padding: 0).
      M is the most outputs any input feeds: 10 for a 4x upsampling, 2 for a slight downsampling.
    """
    lo, hi, frac = _bilinear_taps(in_size, out_size)
    sources: list[list[tuple[int, np.float32]]] = [[] for _ in range(in_size)]
    for o in range(out_size):
        if lo[o] == hi[o]:
            sources[lo[o]].append((o, np.float32(1.0)))
        else:
            sources[lo[o]].append((o, np.float32(1.0) - frac[o]))
            sources[hi[o]].append((o, frac[o]))
    m = max(len(s) for s in sources)
    index = np.zeros((m, in_size), np.int32)
    weight = np.zeros((m, in_size), np.float32)
    for i, pairs in enumerate(sources):
        for k, (o, w) in enumerate(pairs):
            index[k, i], weight[k, i] = o, w
    return index, weight


def _resize_axis_adjoint(g: jax.Array, axis: int, in_size: int) -> jax.Array:
    """The transpose of :func:`_resize_axis`: for every input row, the weighted sum of the output rows it feeds,
    as M static gathers."""
    if g.shape[axis] == in_size:
        return g
    index, weight = _adjoint_taps(in_size, g.shape[axis])
    shape = [1] * g.ndim
    shape[axis] = in_size
    out = None
    for rows, w in zip(index, weight, strict=True):
        term = jnp.take(g, rows, axis=axis) * jnp.asarray(w.reshape(shape), g.dtype)
        out = term if out is None else out + term
    return out


def _resize_adjoint(g: jax.Array, in_size: tuple[int, int]) -> jax.Array:
    """The gradient of both resizes below: the transposed interpolation (the two axes commute).

    Autodiff would transpose the gathers into scatter-adds, which XLA:CPU runs one element at a time (~0.6 s for
    the 4 x 480 x 480 x 124 logits of a CFFM-B0 training step; this form: ~0.1 s).
    """
    return _resize_axis_adjoint(_resize_axis_adjoint(g, 1, in_size[0]), 2, in_size[1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _resize_separable(x: jax.Array, in_size: tuple[int, int], size: tuple[int, int]) -> jax.Array:
    del in_size
    return _resize_axis(_resize_axis(x, 1, size[0]), 2, size[1])


def resize_bilinear(x: jax.Array, size: Sequence[int]) -> jax.Array:
    """Bilinear resize of ``x`` (N, H, W, C) to ``size`` = (h, w).

    Same result as PyTorch ``F.interpolate(mode='bilinear', align_corners=False)`` (to ~1e-6): half-pixel centres,
    source coordinates clamped at the border, and no antialiasing when downsampling. Separable two-tap gathers with
    static indices; 4-15x faster on XLA:CPU than ``jax.image.resize``, which builds dense interpolation matrices.
    The gradient is the transposed interpolation, as static gathers too (:func:`_resize_adjoint`).
    """
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[1:3]) == size:
        return x
    return _resize_separable(x, tuple(x.shape[1:3]), size)


def resize_bilinear_flat(x: jax.Array, size: Sequence[int]) -> jax.Array:
    """:func:`resize_bilinear` (the same float32 operations, hence the same values) from four gathers of whole
    channel vectors of the flattened (N, H * W, C) map instead of one gather per axis.

    Used by the per-frame decoder (``cffm_jax.models.decoder.fused_decoder`` and the 1/8 features): there XLA:CPU
    lays the per-axis version's maps out channels-major and transposes them, and this form keeps them
    channels-minor. MiT-B0 stages of 4 frames at 480x480 to the 1/8 features: 156 -> 80 ms; on its own, or in
    the other resizes of the model, it is no faster than :func:`resize_bilinear`. Same gradient.
    """
    in_h, in_w = x.shape[1:3]
    h, w = int(size[0]), int(size[1])
    if in_h == h or in_w == w:
        return resize_bilinear(x, size)
    return _resize_flat(x, (in_h, in_w), (h, w))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _resize_flat(x: jax.Array, in_size: tuple[int, int], size: tuple[int, int]) -> jax.Array:
    n, c = x.shape[0], x.shape[-1]
    (in_h, in_w), (h, w) = in_size, size
    rows_lo, rows_hi, frac_h = _bilinear_taps(in_h, h)
    cols_lo, cols_hi, frac_w = _bilinear_taps(in_w, w)
    flat = x.reshape(n, in_h * in_w, c)

    def take(rows: np.ndarray, cols: np.ndarray) -> jax.Array:
        return jnp.take(flat, (rows[:, None] * in_w + cols[None, :]).reshape(-1), axis=1).reshape(n, h, w, c)

    frac_h = jnp.asarray(frac_h.reshape(1, h, 1, 1), x.dtype)
    frac_w = jnp.asarray(frac_w.reshape(1, 1, w, 1), x.dtype)
    # Rows first, then columns, as the per-axis version: a + (b - a) * frac at each step.
    left = take(rows_lo, cols_lo)
    left = left + (take(rows_hi, cols_lo) - left) * frac_h
    right = take(rows_lo, cols_hi)
    right = right + (take(rows_hi, cols_hi) - right) * frac_h
    return left + (right - left) * frac_w


def _linear_resize_vjp(resize):
    """Registers :func:`_resize_adjoint` as the gradient of a resize ``resize(x, in_size, size)``."""

    def fwd(x: jax.Array, in_size: tuple[int, int], size: tuple[int, int]) -> tuple[jax.Array, None]:
        return resize(x, in_size, size), None

    def bwd(in_size: tuple[int, int], size: tuple[int, int], _: None, g: jax.Array) -> tuple[jax.Array]:
        del size
        return (_resize_adjoint(g, in_size),)

    resize.defvjp(fwd, bwd)


_linear_resize_vjp(_resize_separable)
_linear_resize_vjp(_resize_flat)


@functools.lru_cache(maxsize=64)
def upsampling_phases(n_in: int, n_out: int) -> tuple[tuple[int, np.float32], ...] | None:
    """The bilinear upsampling from ``n_in`` to ``n_out = s * n_in`` entries as ``s`` phases, when exact.

    Output ``s * i + r`` is ``a + (b - a) * f`` with ``a, b = p[i + o], p[i + o + 1]`` of the input edge-padded by
    one entry and ``(o, f)`` the r-th pair returned (:func:`upsample_phases` applies it, with the phases on an axis
    of their own: the blocked loss of ``cffm_jax.losses`` permutes its labels to match instead of interleaving).
    Returns None unless ``s`` is an integer >= 2 for which this gives bitwise the values of
    :func:`resize_bilinear` (checked here on random values; it holds for powers of two, where PyTorch's float32
    source coordinates are exact).
    """
    if n_out % n_in or n_out // n_in < 2:
        return None
    s = n_out // n_in
    plan = []
    for r in range(s):
        f = (r + 0.5) / s - 0.5
        plan.append((0, np.float32(f + 1.0)) if f < 0 else (1, np.float32(f)))
    lo, hi, frac = _bilinear_taps(n_in, n_out)
    x = np.random.default_rng(0).standard_normal(n_in).astype(np.float32)
    padded = np.pad(x, 1, mode="edge")
    got = np.empty(n_out, np.float32)
    for r, (o, f) in enumerate(plan):
        a, b = padded[o : o + n_in], padded[o + 1 : o + 1 + n_in]
        got[r::s] = a + (b - a) * f
    return tuple(plan) if np.array_equal(got, x[lo] + (x[hi] - x[lo]) * frac) else None


def upsample_phases(x: jax.Array, axis: int, plan: tuple, n: int) -> jax.Array:
    """x with ``n + 2`` (edge-padded) entries along ``axis`` -> the phases stacked on a new axis at ``axis``."""
    terms = []
    for o, f in plan:
        a = lax.slice_in_dim(x, o, o + n, axis=axis)
        terms.append(a + (lax.slice_in_dim(x, o + 1, o + 1 + n, axis=axis) - a) * f)
    return jnp.stack(terms, axis=axis)


def upsample_phases_adjoint(g: jax.Array, axis: int, plan: tuple, n: int) -> jax.Array:
    """The transpose of :func:`upsample_phases`: phases at ``axis`` -> ``n + 2`` entries along ``axis``."""
    out = None
    for r, (o, f) in enumerate(plan):
        q = lax.index_in_dim(g, r, axis, keepdims=False)
        for start, weight in ((o, np.float32(1.0) - f), (o + 1, f)):
            pad = [(0, 0)] * q.ndim
            pad[axis] = (start, 2 - start)
            term = jnp.pad(q * weight, pad)
            out = term if out is None else out + term
    return out


def fold_edge_padding(g: jax.Array, axis: int, n: int) -> jax.Array:
    """The transpose of edge padding by one: ``n + 2`` entries -> ``n``, the pads added to the first and last."""

    def part(start: int, stop: int) -> jax.Array:
        return lax.slice_in_dim(g, start, stop, axis=axis)

    if n == 1:
        return part(0, 1) + part(1, 2) + part(2, 3)
    return jnp.concatenate([part(0, 1) + part(1, 2), part(2, n), part(n, n + 1) + part(n + 1, n + 2)], axis=axis)


@jax.custom_vjp
def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """``softmax(q k^T) v``: q (B, L, d) already scaled, k and v (B, S, d) -> (B, L, d); softmax over the S keys.

    The gradient is written out (:func:`_attention_bwd`): with ``rowsum(dP * P)`` taken as ``rowsum(dO * O)``
    (the same value) the softmax's backward is elementwise after the ``dO v^T`` product, which XLA:CPU fuses into
    the product; autodiff's version reduces over the keys inside that fusion. MiT-B0 stage 1 (4 x 14400 queries,
    225 keys), forward + backward of this core: 278 -> 199 ms.
    """
    return _attention_fwd(q, k, v)[0]


_MAX_SLICE = 32  # XLA:CPU (TreeReductionRewriter) turns a reduction over more than 32 values into a reduce-window


def max_last(x: jax.Array) -> jax.Array:
    """``jnp.max(x, -1, keepdims=True, initial=-inf)``, as elementwise maxima of overlapping slices of at most 32
    values and one short reduction: XLA:CPU rewrites a longer reduction into a reduce-window + reduce, whose
    reduce-window runs one element at a time (MiT-B0 stage 1, 4 x 14400 rows of 225 scores: ~5 ms; the MiT-B0
    forward ~5% faster). The same value bit for bit when no value is NaN. Other backends get ``jnp.max``.

    The elementwise maxima are written as compare-and-select, not ``jnp.maximum``: in programs with XLA's default
    YNNPACK fusions (the training step, the decode step) YNNPACK takes ``maximum`` but not the slices feeding it,
    so XLA wrote every slice out (8 copies of the score tensor per attention); a select stays in XLA's own loop
    fusion with its slices. MiT-B0 stage 1 scores, ``exp(x - max_last(x))`` alone: 101 -> 40 ms with YNNPACK,
    37 ms either way without.
    """
    n = x.shape[-1]
    if n > _MAX_SLICE and jax.default_backend() == "cpu":
        starts = list(range(0, n - _MAX_SLICE, _MAX_SLICE - 1)) + [n - _MAX_SLICE]
        x = functools.reduce(lambda a, b: jnp.where(b > a, b, a), [x[..., s : s + _MAX_SLICE] for s in starts])
    return jnp.max(x, axis=-1, keepdims=True, initial=-jnp.inf)  # as jax.nn.softmax (-inf for no values)


def softmax_last(x: jax.Array) -> jax.Array:
    """``jax.nn.softmax(x, axis=-1)`` for finite ``x`` (the same operations), with :func:`max_last`."""
    unnormalized = jnp.exp(x - lax.stop_gradient(max_last(x)))
    return unnormalized / jnp.sum(unnormalized, axis=-1, keepdims=True)


def _attention_fwd(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, tuple]:
    p = softmax_last(jnp.einsum("bqd,bkd->bqk", q, k))
    out = jnp.einsum("bqk,bkd->bqd", p, v)
    return out, (q, k, v, p, out)


def _attention_bwd(residuals: tuple, g: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    q, k, v, p, out = residuals
    scores_grad = p * (jnp.einsum("bqd,bkd->bqk", g, v) - jnp.sum(g * out, axis=-1, keepdims=True))
    return (
        jnp.einsum("bqk,bkd->bqd", scores_grad, k),
        jnp.einsum("bqk,bqd->bkd", scores_grad, q),
        jnp.einsum("bqk,bqd->bkd", p, g),
    )


attention.defvjp(_attention_fwd, _attention_bwd)


def argmax_classes(x: jax.Array) -> jax.Array:
    """``jnp.argmax(x, axis=-1)`` (the first index of the maximum) for finite ``x``, faster on XLA:CPU.

    XLA:CPU reduces over the class axis one element at a time. With many classes they are split into
    ``ARGMAX_GROUPS`` contiguous groups first: an elementwise pass keeps, for each position within a group, the
    maximum over the groups (strict ``>``, so the lowest group wins ties), then a reduction over the positions
    that orders (value, class index) pairs by value, then by the lower index. Same result as ``jnp.argmax`` when
    no value is NaN. The labels of the 124 VSPW classes, logits upsampling fused in, on their own: 95 -> 39 ms for
    a 480x480 frame, 260 -> 166 ms for 480x864 -> 480x853; in the streaming decode step per target: 480x864
    697 -> 631 ms, 480x864 -> 480x853 900 -> 677 ms, 480x480 unchanged (6 groups; 4 or 8 groups are slower in
    some of these cases: XLA's fusion decides).
    """
    k = x.shape[-1]
    if k < ARGMAX_MIN_CLASSES:
        return jnp.argmax(x, axis=-1).astype(jnp.int32)
    size = -(-k // ARGMAX_GROUPS)
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, size * ARGMAX_GROUPS - k)], constant_values=-jnp.inf)
    positions = jnp.arange(size, dtype=jnp.int32)
    best, index = x[..., :size], jnp.broadcast_to(positions, x.shape[:-1] + (size,))
    for g in range(1, ARGMAX_GROUPS):
        group = x[..., g * size : (g + 1) * size]
        better = group > best
        best, index = jnp.where(better, group, best), jnp.where(better, positions + g * size, index)

    def first_max(a: tuple[jax.Array, jax.Array], b: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        take_b = (b[0] > a[0]) | ((b[0] == a[0]) & (b[1] < a[1]))
        return jnp.where(take_b, b[0], a[0]), jnp.where(take_b, b[1], a[1])

    init = (jnp.array(-jnp.inf, x.dtype), jnp.array(np.iinfo(np.int32).max, jnp.int32))
    return jax.lax.reduce((best, index), init, first_max, (x.ndim - 1,))[1]


# ---------------------------------------------------------------------------------------------------------
# Modules.


class DropPath(nn.Module):
    """Stochastic depth (per-sample residual dropout), active only when ``deterministic`` is False.

    Uses the ``'dropout'`` RNG stream. Kept samples are scaled by 1 / (1 - rate), as timm's ``DropPath``.
    """

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        if deterministic or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(mask, x / keep, jnp.zeros_like(x))

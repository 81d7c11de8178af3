"""Small building blocks shared by the MiT backbone and the CFFM heads.

Everything is channels-last (NHWC). The helpers reproduce PyTorch semantics where the official code relies on
them: bilinear resizing with ``align_corners=False`` and no antialiasing (SPEC.md section 2 and 13), the exact
erf GELU, and the PyTorch default initialisers (only relevant when training from scratch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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
    if x.shape[axis] == size:
        return x
    lo, hi, frac = _bilinear_taps(x.shape[axis], size)
    shape = [1] * x.ndim
    shape[axis] = size
    frac = jnp.asarray(frac.reshape(shape), dtype=x.dtype)
    a, b = jnp.take(x, lo, axis=axis), jnp.take(x, hi, axis=axis)
    return a + (b - a) * frac


def resize_bilinear(x: jax.Array, size: Sequence[int]) -> jax.Array:
    """Bilinear resize of ``x`` (N, H, W, C) to ``size`` = (h, w).

    Same result as PyTorch ``F.interpolate(mode='bilinear', align_corners=False)`` (to ~1e-6): half-pixel centres,
    source coordinates clamped at the border, and no antialiasing when downsampling. Separable two-tap gathers with
    static indices; 4-15x faster on XLA:CPU than ``jax.image.resize``, which builds dense interpolation matrices.
    """
    x = _resize_axis(x, 1, int(size[0]))
    return _resize_axis(x, 2, int(size[1]))


def resize_bilinear_flat(x: jax.Array, size: Sequence[int]) -> jax.Array:
    """:func:`resize_bilinear` (the same float32 operations, hence the same values) from four gathers of whole
    channel vectors of the flattened (N, H * W, C) map instead of one gather per axis.

    Used by the per-frame decoder (``cffm_jax.models.decoder.fused_decoder`` and the 1/8 features): there XLA:CPU
    lays the per-axis version's maps out channels-major and transposes them, and this form keeps them
    channels-minor. MiT-B0 stages of 4 frames at 480x480 to the 1/8 features: 156 -> 80 ms; on its own, or in
    the other resizes of the model, it is no faster than :func:`resize_bilinear`.
    """
    n, in_h, in_w, c = x.shape
    h, w = int(size[0]), int(size[1])
    if in_h == h or in_w == w:
        return resize_bilinear(x, size)
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

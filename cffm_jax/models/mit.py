"""MiT (SegFormer Mix Transformer) backbone, SPEC.md section 3.

Channels-last: frames (N, H, W, 3) -> four stage outputs (N, H_s, W_s, C_s) at strides 4, 8, 16, 32.
Module names follow the official state dict (``patch_embed1/proj``, ``block1_0/attn/kv``, ``norm1``...) so that
weight conversion is a table of transposes (see ``cffm_jax.convert``).

Known differences from the official code: none in evaluation. In training, stochastic depth draws its masks from
JAX's RNG, so individual dropped samples differ from PyTorch's (the distribution is the same).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cffm_jax.models.layers import (
    DropPath,
    attention,
    conv_fan_out_init,
    gelu,
    in_matmul_precision_scope,
    normalize_images,
    trunc_normal_init,
)

# SPEC.md section 3. All variants: num_heads (1, 2, 5, 8), sr_ratios (8, 4, 2, 1), mlp_ratios (4, 4, 4, 4).
VARIANTS: dict[str, dict[str, tuple[int, ...]]] = {
    "mit_b0": {"embed_dims": (32, 64, 160, 256), "depths": (2, 2, 2, 2)},
    "mit_b1": {"embed_dims": (64, 128, 320, 512), "depths": (2, 2, 2, 2)},
    "mit_b2": {"embed_dims": (64, 128, 320, 512), "depths": (3, 4, 6, 3)},
    "mit_b3": {"embed_dims": (64, 128, 320, 512), "depths": (3, 4, 18, 3)},
    "mit_b4": {"embed_dims": (64, 128, 320, 512), "depths": (3, 8, 27, 3)},
    "mit_b5": {"embed_dims": (64, 128, 320, 512), "depths": (3, 6, 40, 3)},
}
COMMON = {"num_heads": (1, 2, 5, 8), "sr_ratios": (8, 4, 2, 1), "mlp_ratios": (4, 4, 4, 4)}

# LayerNorm epsilons (SPEC.md section 12.1).
BLOCK_NORM_EPS = 1e-6  # block norm1/norm2 and the stage norms
PATCH_NORM_EPS = 1e-5  # patch_embed{s}.norm and attn.norm (spatial reduction)

_dense_init = {"kernel_init": trunc_normal_init(0.02), "bias_init": nn.initializers.zeros}


def _dense(features: int, name: str, dtype: Any) -> nn.Dense:
    return nn.Dense(features, name=name, dtype=dtype, **_dense_init)


# Patch embeddings whose patches (kernel^2 x input channels) are at most this long get the row-wise weight gradient
# of conv_with_row_weight_grad on CPU (MiT-B0: the first two; longer patches were faster with XLA's).
ROW_WEIGHT_GRAD_MAX_PATCH = 512


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6, 7, 8))
def conv_with_row_weight_grad(
    x: jax.Array,
    kernel: jax.Array,
    window_strides: Sequence[int],
    padding: Sequence[tuple[int, int]],
    lhs_dilation: Any = None,
    rhs_dilation: Any = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    precision: Any = None,
) -> jax.Array:
    """``lax.conv_general_dilated`` (as ``nn.Conv`` calls it: NHWC, HWIO) whose kernel gradient is summed by rows.

    Same forward values. The kernel gradient is a loop over blocks of output rows: each step gathers the block's
    patches (kernel^2 x input channels, from the input rows it covers) while they are in cache and multiplies them
    with the block's output gradient, per frame (a sharded batch stays sharded); the frames' sums are added after
    the loop. XLA:CPU's own weight gradient of a strided convolution with few input channels is slow: MiT-B0's
    7x7 / 4 patch embedding of 4 x 480 x 480 x 3 frames 69 -> 18-30 ms, the 3x3 / 2 one of 4 x 120 x 120 x 32
    28 -> 14 ms; with longer patches (64 or more input channels) XLA's was faster. The input gradient is XLA's.
    """
    return _conv_forward(
        x,
        kernel,
        window_strides,
        padding,
        lhs_dilation,
        rhs_dilation,
        dimension_numbers,
        feature_group_count,
        precision,
    )


def _conv_forward(x: jax.Array, kernel: jax.Array, *static: Any) -> jax.Array:
    strides, padding, lhs_dilation, rhs_dilation, dimension_numbers, groups, precision = static
    return jax.lax.conv_general_dilated(
        x, kernel, strides, padding, lhs_dilation, rhs_dilation, dimension_numbers, groups, precision=precision
    )


def _conv_fwd(x: jax.Array, kernel: jax.Array, *static: Any) -> tuple[jax.Array, tuple]:
    return _conv_forward(x, kernel, *static), (x, kernel)


def _conv_bwd(*args: Any) -> tuple[jax.Array, jax.Array]:
    *static, (x, kernel), g = args
    strides, padding, lhs_dilation, rhs_dilation, dims, groups, _ = static
    grad_x = jax.vjp(lambda a: _conv_forward(a, kernel, *static), x)[1](g)[0]
    nhwc = dims == jax.lax.conv_dimension_numbers(x.shape, kernel.shape, ("NHWC", "HWIO", "NHWC"))
    square = strides[0] == strides[1] and kernel.shape[0] == kernel.shape[1] and len(set(map(tuple, padding))) == 1
    plain = groups == 1 and all(d in (None, 1) for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
    if nhwc and square and plain and padding[0][0] == padding[0][1]:
        grad_kernel = _conv_kernel_grad_by_rows(x, g, kernel.shape[0], strides[0], padding[0][0])
    else:
        grad_kernel = jax.vjp(lambda b: _conv_forward(x, b, *static), kernel)[1](g)[0]
    return grad_x, grad_kernel.astype(kernel.dtype)


conv_with_row_weight_grad.defvjp(_conv_fwd, _conv_bwd)


def _conv_kernel_grad_by_rows(x: jax.Array, g: jax.Array, k: int, s: int, p: int) -> jax.Array:
    """Kernel gradient (k, k, C_in, C_out) of a k x k convolution with stride s and zero padding p, x (N, H, W,
    C_in), g (N, H', W', C_out): a loop over blocks of output rows (see :func:`conv_with_row_weight_grad`)."""
    n, h, w, c_in = x.shape
    _, h_out, w_out, c_out = g.shape
    r = max(d for d in (1, 2, 3) if h_out % d == 0)  # output rows per step
    # Pad so that every output row's window is in range (rows/columns beyond the windows are left out).
    span_h, span_w = s * (h_out - 1) + k, s * (w_out - 1) + k
    padded = jnp.pad(x, ((0, 0), (p, max(0, span_h - h - p)), (p, max(0, span_w - w - p)), (0, 0)))

    def step(acc: jax.Array, i: jax.Array) -> tuple[jax.Array, None]:
        band = jax.lax.dynamic_slice_in_dim(padded, i * s * r, s * (r - 1) + k, axis=1)
        g_rows = jax.lax.dynamic_slice_in_dim(g, i * r, r, axis=1).reshape(n, r * w_out, c_out)
        taps = [
            band[:, dy : dy + s * (r - 1) + 1 : s, dx : dx + s * (w_out - 1) + 1 : s]
            for dy in range(k)
            for dx in range(k)
        ]
        patches = jnp.concatenate(taps, axis=-1).reshape(n, r * w_out, k * k * c_in)
        return acc + jnp.einsum("npi,npo->nio", patches, g_rows, preferred_element_type=jnp.float32), None

    acc, _ = jax.lax.scan(step, jnp.zeros((n, k * k * c_in, c_out), jnp.float32), jnp.arange(h_out // r))
    return jnp.sum(acc, axis=0).reshape(k, k, c_in, c_out)


class OverlapPatchEmbed(nn.Module):
    """Strided conv (kernel k, stride s, padding k//2) + LayerNorm(eps 1e-5): (N, H, W, C) -> (N, H', W', dim)."""

    dim: int
    kernel: int
    stride: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.kernel // 2
        rows = jax.default_backend() == "cpu" and self.kernel**2 * x.shape[-1] <= ROW_WEIGHT_GRAD_MAX_PATCH
        x = nn.Conv(
            self.dim,
            (self.kernel, self.kernel),
            strides=(self.stride, self.stride),
            padding=((p, p), (p, p)),
            kernel_init=conv_fan_out_init(),
            bias_init=nn.initializers.zeros,
            dtype=self.dtype,
            conv_general_dilated=conv_with_row_weight_grad if rows else None,
            name="proj",
        )(x)
        return nn.LayerNorm(epsilon=PATCH_NORM_EPS, dtype=self.dtype, name="norm")(x)


class EfficientSelfAttention(nn.Module):
    """Self-attention whose keys/values come from a map reduced by a strided conv (kernel = stride = sr)."""

    dim: int
    num_heads: int
    sr_ratio: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (N, H, W, C) normed tokens as a map -> (N, H, W, C)."""
        n, h, w, c = x.shape
        head_dim = c // self.num_heads
        q = _dense(self.dim, "q", self.dtype)(x)
        kv_in = x
        if self.sr_ratio > 1:
            r = self.sr_ratio
            kv_in = nn.Conv(
                self.dim,
                (r, r),
                strides=(r, r),
                padding="VALID",
                kernel_init=conv_fan_out_init(),
                bias_init=nn.initializers.zeros,
                dtype=self.dtype,
                name="sr",
            )(kv_in)
            kv_in = nn.LayerNorm(epsilon=PATCH_NORM_EPS, dtype=self.dtype, name="norm")(kv_in)
        kv = _dense(2 * self.dim, "kv", self.dtype)(kv_in)
        k, v = jnp.split(kv, 2, axis=-1)  # k = first C outputs, v = last C
        q, k, v = (einops.rearrange(t, "n h w (heads d) -> (n heads) (h w) d", heads=self.num_heads) for t in (q, k, v))
        out = attention(q * head_dim**-0.5, k, v)
        out = einops.rearrange(out, "(n heads) (h w) d -> n h w (heads d)", n=n, h=h, w=w)
        return _dense(self.dim, "proj", self.dtype)(out)


class DWConv(nn.Module):
    """Depthwise 3x3 conv, stride 1, zero padding 1 (official ``mlp.dwconv.dwconv``).

    Parameters have the layout of ``nn.Conv(feature_group_count=dim)``: kernel (3, 3, 1, dim), bias (dim,). Computed
    as nine shifted multiply-adds: the same arithmetic as the convolution, and on XLA:CPU ~20x faster than its
    grouped-convolution lowering (438 ms -> 19 ms for a 4 x 120 x 120 x 128 map on 2 cores).
    """

    dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(N, H, W, dim) -> (N, H, W, dim)."""
        dwconv = DepthwiseParams(self.dim, name="dwconv")
        kernel, bias = dwconv()
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return depthwise_conv3x3(x, kernel, bias)


def _shifted_sum(
    padded: jax.Array, kernel: jax.Array, h: int, w: int, flip: bool, out: jax.Array | None = None
) -> jax.Array:
    """``out`` + the sum over the 3x3 taps (i, j) of padded[:, i:i+h, j:j+w] * kernel[i, j, 0], in tap order
    (taps mirrored if ``flip``)."""
    for i in range(3):
        for j in range(3):
            a, b = (2 - i, 2 - j) if flip else (i, j)
            term = padded[:, a : a + h, b : b + w, :] * kernel[i, j, 0]
            out = term if out is None else out + term
    return out


def _column_sum(x: jax.Array) -> jax.Array:
    """(P, C) -> (C,): halves P with contiguous elementwise adds while it is even, then one small reduction.

    XLA:CPU runs a reduction over a major axis one element at a time (9 of them for a 4 x 120 x 120 x 128 map:
    ~115 ms); the halving keeps the channels vectorised (~80 ms, memory-bound).
    """
    while x.shape[0] > 1 and x.shape[0] % 2 == 0:
        half = x.shape[0] // 2
        x = x[:half] + x[half:]
    return x.sum(axis=0)


@jax.custom_vjp
def depthwise_conv3x3(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """Depthwise 3x3 convolution, stride 1, zero padding 1: x (N, H, W, C), kernel (3, 3, 1, C), bias (C,).

    Nine shifted multiply-adds. The gradient is written out (:func:`_depthwise_bwd`): autodiff's transpose of
    the padded slices is a sum of nine padded maps that XLA:CPU lays out channels-major and transposes (~0.3 s
    per stage-1 block of a CFFM-B0 training step).
    """
    h, w = x.shape[1:3]
    return _shifted_sum(jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))), kernel, h, w, flip=False, out=bias)


def _depthwise_fwd(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> tuple[jax.Array, tuple]:
    return depthwise_conv3x3(x, kernel, bias), (x, kernel, bias)


def _depthwise_bwd(residuals: tuple, g: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Input gradient: the same convolution of ``g`` with the taps mirrored; kernel gradient: per tap, the sum
    over positions of shifted input times ``g``; bias gradient: the sum of ``g``.

    The kernel and bias gradients are sums over all positions: on CPU row by row
    (:func:`_param_grads_by_rows`), on accelerators tap by tap (:func:`_param_grads_by_taps`).
    """
    x, kernel, bias = residuals
    h, w = x.shape[1:3]
    pad = ((0, 0), (1, 1), (1, 1), (0, 0))
    grad_x = _shifted_sum(jnp.pad(g, pad), kernel, h, w, flip=True)
    by_rows = jax.default_backend() == "cpu"
    grad_kernel, grad_bias = (_param_grads_by_rows if by_rows else _param_grads_by_taps)(jnp.pad(x, pad), g)
    return grad_x, grad_kernel.astype(kernel.dtype), grad_bias.astype(bias.dtype)


def _param_grads_by_taps(padded: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(kernel gradient (3, 3, 1, C), bias gradient (C,)) of :func:`depthwise_conv3x3`; ``padded`` is its input
    zero-padded by one, ``g`` the output gradient. One whole-map product and sum per tap.

    The nine taps run as a loop (``lax.map``) rather than nine unrolled expressions: XLA fuses the producer of
    ``g`` (GELU derivative, and the forward convolution it needs) into each of its consumers, so unrolled it
    recomputes it nine times (~220 ms per stage-1 Mix-FFN of a CFFM-B0 training step on CPU); a loop body is a
    fusion boundary, and ``g`` is computed once.
    """
    c = g.shape[-1]

    def tap(t: jax.Array) -> jax.Array:
        window = jax.lax.dynamic_slice(padded, (0, t // 3, t % 3, 0), g.shape)
        return _column_sum((window * g).reshape(-1, c))

    return jax.lax.map(tap, jnp.arange(9)).reshape(3, 3, 1, c), _column_sum(g.reshape(-1, c))


def _param_grads_by_rows(padded: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    """:func:`_param_grads_by_taps` as a loop over rows of ``g``: each step takes the row's nine shifted input
    rows times ``g``'s row (and ``g``'s row itself) and sums them over the row's positions with a product by a
    row of ones, per frame (a sharded batch stays sharded), while the three input rows and the ``g`` row are in
    cache; the per-frame sums are added after the loop.

    By taps, each of the nine products read the whole input and ``g`` from memory, and XLA:CPU's reductions over
    positions (halving or not) ran far below the machine's bandwidth. CFFM-B0 at 480x480 (4 frames), kernel
    gradient alone: stage 1 (120 x 120 x 128) 55-64 -> 23-30 ms, stage 2 (60 x 60 x 256) 62 -> 12-14 ms, stage 3
    16-18 -> 7-16 ms, stage 4 15-16 -> 7 ms. A loop of hundreds of small steps would be slow on accelerators, so
    they keep the taps.
    """
    n, h, w, c = g.shape
    ones = jnp.ones((n, 1, w), g.dtype)

    def row(acc: jax.Array, i: jax.Array) -> tuple[jax.Array, None]:
        rows = jax.lax.dynamic_slice(padded, (0, i, 0, 0), (n, 3, w + 2, c))
        g_row = jax.lax.dynamic_slice(g, (0, i, 0, 0), (n, 1, w, c))[:, 0]
        terms = [rows[:, dy, dx : dx + w] * g_row for dy in range(3) for dx in range(3)] + [g_row]
        sums = [jnp.matmul(ones, t, preferred_element_type=jnp.float32) for t in terms]  # (N, 1, C) each
        return acc + jnp.concatenate(sums, axis=1), None

    acc, _ = jax.lax.scan(row, jnp.zeros((n, 10, c), jnp.float32), jnp.arange(h))
    sums = jnp.sum(acc, axis=0)
    return sums[:9].reshape(3, 3, 1, c), sums[9]


depthwise_conv3x3.defvjp(_depthwise_fwd, _depthwise_bwd)


class DepthwiseParams(nn.Module):
    """The parameters of a 3x3 depthwise conv: kernel (3, 3, 1, dim), bias (dim,)."""

    dim: int

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array]:
        kernel = self.param("kernel", conv_fan_out_init(groups=self.dim), (3, 3, 1, self.dim))
        bias = self.param("bias", nn.initializers.zeros, (self.dim,))
        return kernel, bias


class MixFFN(nn.Module):
    """fc1 -> depthwise 3x3 conv -> exact GELU -> fc2."""

    dim: int
    hidden_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = _dense(self.hidden_dim, "fc1", self.dtype)(x)
        x = DWConv(self.hidden_dim, self.dtype, name="dwconv")(x)
        x = gelu(x)
        return _dense(self.dim, "fc2", self.dtype)(x)


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(norm1(x)), then x + MixFFN(norm2(x)), with stochastic depth."""

    dim: int
    num_heads: int
    mlp_ratio: int
    sr_ratio: int
    drop_path: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        drop = DropPath(self.drop_path, name="drop_path")
        y = nn.LayerNorm(epsilon=BLOCK_NORM_EPS, dtype=self.dtype, name="norm1")(x)
        y = EfficientSelfAttention(self.dim, self.num_heads, self.sr_ratio, self.dtype, name="attn")(y)
        x = x + drop(y, deterministic=not train)
        y = nn.LayerNorm(epsilon=BLOCK_NORM_EPS, dtype=self.dtype, name="norm2")(x)
        y = MixFFN(self.dim, self.dim * self.mlp_ratio, self.dtype, name="mlp")(y)
        return x + drop(y, deterministic=not train)


class MixVisionTransformer(nn.Module):
    """MiT backbone. Call with frames (N, H, W, 3), float32 normalised or uint8 RGB (normalised first,
    :func:`~cffm_jax.models.layers.normalize_images`); returns the four stage outputs (N, H_s, W_s, C_s).

    Stage outputs are also sown as intermediates ``stage1``..``stage4`` (collection ``'intermediates'``).
    """

    embed_dims: tuple[int, ...] = VARIANTS["mit_b0"]["embed_dims"]
    depths: tuple[int, ...] = VARIANTS["mit_b0"]["depths"]
    num_heads: tuple[int, ...] = COMMON["num_heads"]
    sr_ratios: tuple[int, ...] = COMMON["sr_ratios"]
    mlp_ratios: tuple[int, ...] = COMMON["mlp_ratios"]
    drop_path_rate: float = 0.1
    dtype: Any = jnp.float32
    matmul_precision: str | None = None  # layers.matmul_precision_scope; build_model sets it from the config

    @nn.compact
    @in_matmul_precision_scope
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, ...]:
        x = normalize_images(x)
        rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths))
        outputs = []
        block_index = 0
        for s in range(4):
            kernel, stride = (7, 4) if s == 0 else (3, 2)
            x = OverlapPatchEmbed(self.embed_dims[s], kernel, stride, self.dtype, name=f"patch_embed{s + 1}")(x)
            for i in range(self.depths[s]):
                x = Block(
                    self.embed_dims[s],
                    self.num_heads[s],
                    self.mlp_ratios[s],
                    self.sr_ratios[s],
                    float(rates[block_index]),
                    self.dtype,
                    name=f"block{s + 1}_{i}",
                )(x, train)
                block_index += 1
            x = nn.LayerNorm(epsilon=BLOCK_NORM_EPS, dtype=self.dtype, name=f"norm{s + 1}")(x)
            self.sow("intermediates", f"stage{s + 1}", x)
            outputs.append(x)
        return tuple(outputs)

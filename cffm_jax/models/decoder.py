"""The all-MLP decoder of the CFFM heads (SPEC.md section 4.2, steps 1-3 and 5), applied per frame.

Stage features c1..c4 (N, h_s, w_s, C_s) -> per-pixel Linear to E -> bilinear to the 1/4 size -> concatenated in the
order [c4, c3, c2, c1] -> ``linear_fuse`` (1x1 conv without bias, BatchNorm, ReLU) -> ``_c`` (N, h, w, E).
These are the head's building blocks; ``cffm_jax.models.cffm.CFFMHead`` owns them directly so that the parameter
names stay the official ones (``linear_c4/proj``, ``linear_fuse/conv``, ``linear_fuse/bn``). ``fused_decoder``
computes the same function in a cheaper order.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cffm_jax.models.layers import resize_bilinear_flat, torch_bias_init, torch_linear_kernel_init


def torch_dense(features: int, fan_in: int, name: str, dtype: Any, use_bias: bool = True) -> nn.Dense:
    """A Dense layer with PyTorch's default Linear/Conv initialisation."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        kernel_init=torch_linear_kernel_init(),
        bias_init=torch_bias_init(fan_in),
        dtype=dtype,
        name=name,
    )


class DenseParams(nn.Module):
    """The parameters of a Dense layer, ``kernel`` (in, features) and ``bias`` (features,), without applying them.

    Lets the head combine several layers' weights before touching the large feature maps (see ``fused_decoder``).
    """

    features: int
    use_bias: bool = True
    kernel_init: Any = torch_linear_kernel_init()

    @nn.compact
    def __call__(self, in_features: int) -> tuple[jax.Array, jax.Array | None]:
        kernel = self.param("kernel", self.kernel_init, (in_features, self.features))
        bias = self.param("bias", torch_bias_init(in_features), (self.features,)) if self.use_bias else None
        return kernel, bias


class MLP(nn.Module):
    """Per-pixel Linear ``proj`` (official ``linear_c{s}``); calling it returns its (kernel, bias)."""

    embed_dim: int

    @nn.compact
    def __call__(self, in_features: int) -> tuple[jax.Array, jax.Array]:
        return DenseParams(self.embed_dim, name="proj")(in_features)


class LinearFuse(nn.Module):
    """``linear_fuse``: 1x1 conv (no bias) -> BatchNorm (eps 1e-5, PyTorch momentum 0.1) -> ReLU."""

    embed_dim: int
    dtype: Any = jnp.float32

    def setup(self):
        # kaiming normal, fan_out, relu (mmcv ConvModule)
        self.conv = DenseParams(
            self.embed_dim, use_bias=False, kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal")
        )
        self.bn = nn.BatchNorm(momentum=0.9, epsilon=1e-5, dtype=self.dtype)

    def kernel(self, in_features: int) -> jax.Array:
        """The 1x1 conv's kernel (in_features, E)."""
        return self.conv(in_features)[0]

    def normalize(self, x: jax.Array, use_running_average: bool) -> jax.Array:
        """BatchNorm and ReLU of the conv's output."""
        return nn.relu(self.bn(x, use_running_average=use_running_average))


def fused_decoder(stages: tuple[jax.Array, ...], mlps: tuple[MLP, ...], fuse: LinearFuse, dtype: Any) -> jax.Array:
    """The linear part of the all-MLP decoder: stage features -> ``linear_fuse``'s conv output (N, h, w, E).

    Mathematically ``conv(concat[up(c4 P4), up(c3 P3), up(c2 P2), c1 P1])`` with ``up`` the bilinear resize to the
    stride-4 size. Both the projections and the conv act on channels only, and bilinear resizing is linear with
    weights summing to 1, so the conv's slice for each stage is folded into that stage's projection and applied at
    the stage's own resolution: ``sum_s up(c_s (P_s W_s) + b_s W_s)``. This removes the 4E -> E matrix product at
    1/4 resolution (15 of ~20 GFLOP of the B0 decoder at 4 x 480 x 480); results equal the official order of
    operations to float32 rounding.

    Args:
      stages: c1..c4 (N, h_s, w_s, C_s).
      mlps: the ``linear_c4, linear_c3, linear_c2, linear_c1`` modules (concatenation order).
      fuse: the ``linear_fuse`` module.
    """
    c1, c2, c3, c4 = stages
    size = c1.shape[1:3]
    e = fuse.embed_dim
    fuse_kernel = fuse.kernel(len(mlps) * e)
    fused = None
    for slot, (mlp, feat) in enumerate(zip(mlps, (c4, c3, c2, c1), strict=True)):
        kernel, bias = mlp(feat.shape[-1])
        w = fuse_kernel[slot * e : (slot + 1) * e]
        feat, kernel, bias = nn.dtypes.promote_dtype(feat, kernel @ w, bias @ w, dtype=dtype)
        y = resize_bilinear_flat(feat @ kernel + bias, size)
        fused = y if fused is None else fused + y
    return fused

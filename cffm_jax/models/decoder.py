"""The all-MLP decoder of the CFFM heads (SPEC.md section 4.2, steps 1-3 and 5), applied per frame.

Stage features c1..c4 (N, h_s, w_s, C_s) -> per-pixel Linear to E -> bilinear to the 1/4 size -> concatenated in the
order [c4, c3, c2, c1] -> ``linear_fuse`` (1x1 conv without bias, BatchNorm, ReLU) -> ``_c`` (N, h, w, E).
These are the head's building blocks; ``cffm_jax.models.cffm.CFFMHead`` owns them directly so that the parameter
names stay the official ones (``linear_c4/proj``, ``linear_fuse/conv``, ``linear_fuse/bn``).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cffm_jax.models.layers import torch_bias_init, torch_linear_kernel_init


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


class MLP(nn.Module):
    """Per-pixel Linear ``proj`` (official ``linear_c{s}``)."""

    embed_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return torch_dense(self.embed_dim, x.shape[-1], "proj", self.dtype)(x)


class LinearFuse(nn.Module):
    """``linear_fuse``: 1x1 conv (no bias) -> BatchNorm (eps 1e-5, PyTorch momentum 0.1) -> ReLU."""

    embed_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool) -> jax.Array:
        x = nn.Dense(
            self.embed_dim,
            use_bias=False,
            kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),  # kaiming fan_out, relu
            dtype=self.dtype,
            name="conv",
        )(x)
        x = nn.BatchNorm(
            use_running_average=use_running_average,
            momentum=0.9,
            epsilon=1e-5,
            dtype=self.dtype,
            name="bn",
        )(x)
        return nn.relu(x)

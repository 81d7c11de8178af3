"""CFFM++ prototype block ``decoder_swin`` (SPEC.md section 5, step 4): pixel-to-prototype attention.

Every pixel of the (un-enhanced) target features attends to the video's global prototypes (k-means centres):
``S' = S + proj_cluster(attn(q(norm1(S)), kv_cluster(norm1(P))))``, then ``S' + fc2(GELU(fc1(norm2(S'))))``.
The same LayerNorm ``norm1`` normalises pixels and prototypes. Pixel-to-pixel attention is switched off in the
official block, so its window partition has no effect and is not reproduced; the parameters it owns but never uses
(the key/value rows of ``attn.qkv``, ``attn.proj``, ``attn.relative_position_bias_table``) are kept, unused, so that
checkpoints round-trip and parameter counts equal the official ones.

Initialisation of this block (it is freshly initialised when CFFM++ starts from a CFFM checkpoint): Linear kernels
trunc_normal(.02) with zero biases, LayerNorms 1/0, the unused bias table trunc_normal(.02) (the Swin convention).
"""

from __future__ import annotations

from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from cffm_jax.models.layers import gelu, trunc_normal_init

_dense_init = {"kernel_init": trunc_normal_init(0.02), "bias_init": nn.initializers.zeros}


class SlicedDense(nn.Module):
    """A Dense layer (params ``kernel`` (in, features), ``bias``) of which only the first ``outputs`` are computed.

    ``outputs=0`` only declares the parameters (for the official block's dead layers) and returns None.
    """

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, outputs: int) -> jax.Array | None:
        kernel = self.param("kernel", _dense_init["kernel_init"], (x.shape[-1], self.features))
        bias = self.param("bias", _dense_init["bias_init"], (self.features,))
        if outputs == 0:
            return None
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel[:, :outputs], bias[:outputs], dtype=self.dtype)
        return x @ kernel + bias


class PrototypeAttention(nn.Module):
    """Multi-head attention of pixel queries over prototype keys/values (official ``attn`` of the cluster block)."""

    dim: int
    num_heads: int = 8
    window_size: int = 7
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array, prototypes: jax.Array) -> jax.Array:
        """pixels (B, N, E) and prototypes (B, Kp, E), both already normalised -> (B, N, E)."""
        e = self.dim
        q = SlicedDense(3 * e, self.dtype, name="qkv")(pixels, outputs=e)  # k/v rows are dead
        kv = nn.Dense(2 * e, dtype=self.dtype, name="qkv_cluster", **_dense_init)(prototypes)
        k, v = jnp.split(kv, 2, axis=-1)
        q = einops.rearrange(q, "b n (h d) -> b h n d", h=self.num_heads)
        k = einops.rearrange(k, "b m (h d) -> b h m d", h=self.num_heads)
        v = einops.rearrange(v, "b m (h d) -> b h m d", h=self.num_heads)
        scale = (e // self.num_heads) ** -0.5
        attn = jax.nn.softmax(jnp.einsum("bhnd,bhmd->bhnm", q * scale, k), axis=-1)
        out = einops.rearrange(jnp.einsum("bhnm,bhmd->bhnd", attn, v), "b h n d -> b n (h d)")
        out = nn.Dense(e, dtype=self.dtype, name="proj_cluster", **_dense_init)(out)
        # Dead in the official forward; declared so that checkpoints round-trip and parameter counts match.
        SlicedDense(e, self.dtype, name="proj")(out, outputs=0)
        self.param(
            "relative_position_bias_table",
            trunc_normal_init(0.02),
            ((2 * self.window_size - 1) ** 2, self.num_heads),
        )
        return out


class FeedForward(nn.Module):
    """``mlp``: fc1 -> exact GELU -> fc2."""

    dim: int
    hidden_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Dense(self.hidden_dim, dtype=self.dtype, name="fc1", **_dense_init)(x)
        return nn.Dense(self.dim, dtype=self.dtype, name="fc2", **_dense_init)(gelu(x))


class PrototypeBlock(nn.Module):
    """One cluster block (official ``decoder_swin.blocks.0``): attention to prototypes + MLP, pre-norm."""

    dim: int
    num_heads: int = 8
    mlp_ratio: float = 4.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, prototypes: jax.Array) -> jax.Array:
        """x (B, N, E) target-frame tokens, prototypes (B, Kp, E) -> (B, N, E)."""
        norm1 = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="norm1")
        x = x + PrototypeAttention(self.dim, self.num_heads, dtype=self.dtype, name="attn")(norm1(x), norm1(prototypes))
        y = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="norm2")(x)
        return x + FeedForward(self.dim, int(self.dim * self.mlp_ratio), self.dtype, name="mlp")(y)


class PrototypeTransformer(nn.Module):
    """``decoder_swin``: the CFFM++ prototype block applied to a target feature map.

    Call with x (B, h8, w8, E) (the un-enhanced target features) and prototypes (B, Kp, E) -> (B, h8, w8, E).
    """

    dim: int
    num_heads: int = 8
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, prototypes: jax.Array) -> jax.Array:
        b, h, w, e = x.shape
        tokens = x.reshape(b, h * w, e)
        tokens = PrototypeBlock(self.dim, self.num_heads, dtype=self.dtype, name="blocks_0")(tokens, prototypes)
        return tokens.reshape(b, h, w, e)

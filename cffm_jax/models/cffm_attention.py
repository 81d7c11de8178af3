"""Coarse-to-fine cross-frame attention of CFFM, the head's ``decoder_focal`` (SPEC.md section 4.3).

Official ``BasicLayer3d3`` -> ``CffmTransformerBlock3d3`` -> ``WindowAttention3d3``. Each 7x7 window of the
target frame (the last frame of the clip) attends to 289 keys, in this order (SPEC 4.3 step 4):

* 49 keys of its own window,
* 132 keys of the "rolled ring" around it (four cyclic rolls by +-expand_size, wrapping around the map),
* 25 keys of the 7x7-pooled target map (5x5 neighbourhood, zero padded),
* 49 / 25 / 9 keys of the reference frames 0 / 1 / 2 (oldest to newest), pooled coarsest to finest.

Implementation: the target map and all pooled maps are projected by ``attn.qkv`` in one matmul and stacked
into one flat key/value source with an extra all-zero row (the unfold padding); every window's 289 keys are
then one gather with a static index table computed with numpy at trace time. The relative-position biases of
all key groups form one (heads, 49, 289) tensor, the -100 padding masks a static (nW, 289) table.

Parameter names follow the official state-dict keys with ``.N`` merged into ``_N`` (``blocks_0/pool_layers_0``,
``blocks_0/attn/relative_position_bias_table_to_windows_clips_2``...): Dense kernels are the transposed torch
weights, the bias tables keep the torch layout. The integer index buffers of the official state dict are not
parameters; :func:`index_buffers` recomputes them.

Known differences from the official code: none (the official layer has no dropout or drop-path active either).
``use_fast_variance=False`` LayerNorms reproduce PyTorch's two-pass variance.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cffm_jax.models.layers import (
    gelu,
    max_last,
    resize_bilinear,
    torch_bias_init,
    torch_linear_kernel_init,
    trunc_normal_init,
)

CPU_SCORE_CHUNK_BYTES = 4 << 20  # see _default_window_chunk
MASK_VALUE = -100.0  # SPEC 4.3 step 5 / section 12.4: added to the scores of unfold-padding keys.

# ---------------------------------------------------------------------------------------------------------
# Static index tables (numpy, computed at trace time).


def relative_position_index(window_size: int, key_h: int, key_w: int) -> np.ndarray:
    """Index into a relative-position table for a (ws, ws) query grid and a (key_h, key_w) key grid.

    idx[q, k] = (yq - yk + key_h - 1) * (ws + key_w - 1) + (xq - xk + key_w - 1), positions row-major
    (SPEC 4.3 step 5). With key grid = query grid this is the standard Swin index.

    Returns:
      int64 array (ws*ws, key_h*key_w).
    """
    yq, xq = np.divmod(np.arange(window_size * window_size), window_size)
    yk, xk = np.divmod(np.arange(key_h * key_w), key_w)
    dy = yq[:, None] - yk[None, :] + key_h - 1
    dx = xq[:, None] - xk[None, :] + key_w - 1
    return (dy * (window_size + key_w - 1) + dx).astype(np.int64)


def _rolled_ring(window_size: int, expand_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The rolled-ring keys of SPEC 4.3 step 4b.

    Returns:
      valid_ind_rolled: int64 (n,), the kept indices into the concatenation of the four rolled 49-blocks.
      offsets: int64 (n, 2), (dy, dx) of each kept key relative to the window's top-left corner.
    """
    ws, e = window_size, expand_size
    valid, offsets = [], []
    for block, (sy, sx) in enumerate(((-e, -e), (-e, e), (e, -e), (e, e))):
        for i in range(ws):
            for j in range(ws):
                oy, ox = i - sy, j - sx  # torch.roll: rolled[y, x] = k[y - sy, x - sx]
                if 0 <= oy < ws and 0 <= ox < ws:  # inside the own window: excluded (the 4x4 corner)
                    continue
                valid.append(block * ws * ws + i * ws + j)
                offsets.append((oy, ox))
    return np.asarray(valid, np.int64), np.asarray(offsets, np.int64)


def index_buffers(
    window_size: int = 7,
    expand_size: int = 3,
    focal_window: int = 5,
    focal_kernel_clips: Sequence[int] = (7, 5, 3),
) -> dict[str, np.ndarray]:
    """The integer buffers the official state dict stores under ``decoder_focal.blocks.{i}.attn.*``.

    Returns:
      dict with int64 arrays ``relative_position_index`` (49, 49), ``valid_ind_rolled`` (132,),
      ``relative_position_index_0`` (49, 25) and ``relative_position_index_clips_{j}`` (49, kk_j^2)
      (shapes for the default settings).
    """
    ws = window_size
    out = {
        "relative_position_index": relative_position_index(ws, ws, ws),
        "valid_ind_rolled": _rolled_ring(ws, expand_size)[0],
        "relative_position_index_0": relative_position_index(ws, focal_window, focal_window),
    }
    for j, kk in enumerate(focal_kernel_clips):
        out[f"relative_position_index_clips_{j}"] = relative_position_index(ws, kk, kk)
    return out


def _unfold_index(grid_h: int, grid_w: int, n_h: int, n_w: int, kernel: int, stride: int) -> np.ndarray:
    """Cells of a (grid_h, grid_w) map seen by each window of a zero-padded unfold (padding kernel // 2).

    Returns:
      int64 (n_h * n_w, kernel * kernel): flat cell index (row-major in the grid), or -1 for padding.
    """
    pad = kernel // 2
    for size, n in ((grid_h, n_h), (grid_w, n_w)):
        if (size + 2 * pad - kernel) // stride + 1 != n:
            raise ValueError(f"unfold of {size} cells (kernel {kernel}, stride {stride}) gives no {n} windows")
    a, b = np.meshgrid(np.arange(n_h), np.arange(n_w), indexing="ij")
    u, v = np.divmod(np.arange(kernel * kernel), kernel)
    rows = stride * a.reshape(-1, 1) + u[None] - pad
    cols = stride * b.reshape(-1, 1) + v[None] - pad
    inside = (rows >= 0) & (rows < grid_h) & (cols >= 0) & (cols < grid_w)
    return np.where(inside, rows * grid_w + cols, -1)


@functools.lru_cache(maxsize=64)
def key_layout(
    hp: int,
    wp: int,
    window_size: int = 7,
    expand_size: int = 3,
    focal_window: int = 5,
    focal_l_clips: tuple[int, ...] = (1, 2, 3),
    focal_kernel_clips: tuple[int, ...] = (7, 5, 3),
) -> tuple[np.ndarray, np.ndarray, tuple[tuple[int, int], ...]]:
    """Where every window's keys come from in the flat key/value source (SPEC 4.3 step 4).

    The flat source is the concatenation of: the padded target map (hp * wp rows, row-major), the pooled
    target (nWh * nWw), the pooled reference grids (l*nWh * l*nWw each, in clip order), one all-zero row.

    Args:
      hp, wp: padded target size (multiples of window_size).
    Returns:
      index: int32 (nW, K) rows of the flat source (K = 289 for the defaults; windows row-major).
      mask: float32 (nW, K), MASK_VALUE at unfold-padding keys, else 0.
      grids: the (rows, cols) of the pooled target and of each pooled reference grid.
    """
    ws = window_size
    n_h, n_w = hp // ws, wp // ws
    # Own window followed by the rolled ring, both wrapping around the padded map cyclically.
    yk, xk = np.divmod(np.arange(ws * ws), ws)
    offsets = np.concatenate([np.stack([yk, xk], 1), _rolled_ring(ws, expand_size)[1]])
    a, b = np.meshgrid(np.arange(n_h), np.arange(n_w), indexing="ij")
    rows = (ws * a.reshape(-1, 1) + offsets[None, :, 0]) % hp
    cols = (ws * b.reshape(-1, 1) + offsets[None, :, 1]) % wp
    parts = [rows * wp + cols]
    start = hp * wp
    grids = [(n_h, n_w)] + [(level * n_h, level * n_w) for level in focal_l_clips]
    unfolds = [(focal_window, 1)] + list(zip(focal_kernel_clips, focal_l_clips, strict=True))
    unfolded = []
    for (gh, gw), (kernel, stride) in zip(grids, unfolds, strict=True):
        cells = _unfold_index(gh, gw, n_h, n_w, kernel, stride)
        unfolded.append(np.where(cells >= 0, cells + start, -1))
        start += gh * gw
    zero_row = start
    for cells in unfolded:
        parts.append(np.where(cells >= 0, cells, zero_row))
    index = np.concatenate(parts, axis=1).astype(np.int32)
    mask = np.concatenate(
        [np.zeros_like(parts[0], np.float32)]
        + [np.where(c >= 0, 0.0, MASK_VALUE).astype(np.float32) for c in unfolded],
        axis=1,
    )
    return index, mask, tuple(grids)


def _default_window_chunk(bytes_per_window: int, n_win: int) -> int:
    """Windows per attention chunk: all of them on accelerators; on CPU chunks of about 4 MiB of scores.

    Chunking only changes speed and memory, not the result (each window's attention is independent).
    Measured on a 2-core CPU at 60x108, E=256: ~10% less CPU time for the whole block than one chunk.
    """
    if jax.default_backend() != "cpu":
        return n_win
    n_chunks = -(-n_win // max(1, CPU_SCORE_CHUNK_BYTES // bytes_per_window))
    return -(-n_win // n_chunks)


# ---------------------------------------------------------------------------------------------------------
# Modules.


class WindowPool(nn.Module):
    """``nn.Linear(window**2, 1)`` over the positions of non-overlapping windows (``pool_method='fc'``).

    Parameters have the layout of ``nn.Dense(1)``: kernel (window**2, 1), bias (1,).
    """

    window: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(N, H, W, C), H and W multiples of ``window`` -> (N, H / window, W / window, C)."""
        ws = self.window
        kernel = self.param("kernel", nn.initializers.constant(1.0 / ws**2), (ws * ws, 1), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (1,), jnp.float32)
        n, h, w, c = x.shape
        # A weighted sum over the window positions, channels stay minor (an einsum over (p q) would transpose the
        # map first: 2-3x slower on XLA:CPU).
        x = x.reshape(n, h // ws, ws, w // ws, ws, c)
        weights = kernel[:, 0].astype(self.dtype).reshape(1, 1, ws, 1, ws, 1)
        return (x * weights).sum(axis=(2, 4)) + bias[0].astype(self.dtype)


class CFFMAttention(nn.Module):
    """``WindowAttention3d3``: 7x7-window queries of the target against 289 own/ring/pooled/reference keys."""

    dim: int
    num_heads: int = 8
    window_size: int = 7
    expand_size: int = 3
    focal_window: int = 5
    focal_l_clips: tuple = (1, 2, 3)
    focal_kernel_clips: tuple = (7, 5, 3)
    window_chunk: int | None = None
    dtype: jnp.dtype = jnp.float32

    def _bias(self) -> jax.Array:
        """All relative-position biases as one (heads, ws*ws, K) tensor, in key order."""
        ws, nh = self.window_size, self.num_heads
        n_ring = len(_rolled_ring(ws, self.expand_size)[0])
        tn = trunc_normal_init(0.02)
        name = "relative_position_bias_table"
        own = self.param(name, nn.initializers.zeros_init(), ((2 * ws - 1) ** 2, nh))  # zero init (SPEC 12.8)
        ring = self.param(f"{name}_to_neighbors", tn, (1, nh, ws * ws, n_ring))
        pooled = self.param(f"{name}_to_windows_0", tn, (nh, (ws + self.focal_window - 1) ** 2))
        parts = [
            jnp.transpose(own[relative_position_index(ws, ws, ws)], (2, 0, 1)),
            ring[0],
            pooled[:, relative_position_index(ws, self.focal_window, self.focal_window)],
        ]
        for j, kk in enumerate(self.focal_kernel_clips):
            table = self.param(f"{name}_to_windows_clips_{j}", tn, (nh, (ws + kk - 1) ** 2))
            parts.append(table[:, relative_position_index(ws, kk, kk)])
        return jnp.concatenate(parts, axis=-1).astype(self.dtype)

    @nn.compact
    def __call__(self, target: jax.Array, pooled: Sequence[jax.Array]) -> jax.Array:
        """Window attention of the target.

        Args:
          target: (B, Hp, Wp, E) normed, zero-padded target map.
          pooled: the window-pooled (not yet projected) maps: target (B, nWh, nWw, E), then reference j
            (B, l_j*nWh, l_j*nWw, E) for each clip j.
        Returns:
          (B, Hp, Wp, E) attention output (after ``proj``).
        """
        batch, hp, wp, dim = target.shape
        ws, nh = self.window_size, self.num_heads
        hd = dim // nh
        index, mask, grids = key_layout(
            hp,
            wp,
            ws,
            self.expand_size,
            self.focal_window,
            tuple(self.focal_l_clips),
            tuple(self.focal_kernel_clips),
        )
        for p, grid in zip(pooled, grids, strict=True):
            if p.shape[1:3] != grid:
                raise ValueError(f"pooled map of shape {p.shape} does not match grid {grid}")
        n_win, n_keys = index.shape

        # One projection for the target and all pooled maps (SPEC 4.3 steps 3, 4c, 4d).
        tokens = [target.reshape(batch, hp * wp, dim)] + [p.reshape(batch, -1, dim) for p in pooled]
        tokens = jnp.concatenate(tokens, axis=1)
        qkv = nn.Dense(
            3 * dim,
            dtype=self.dtype,
            kernel_init=torch_linear_kernel_init(),
            bias_init=torch_bias_init(dim),
            name="qkv",
        )(tokens)
        qkv = einops.rearrange(qkv, "b n (s h d) -> s b h n d", s=3, h=nh)
        n_h = hp // ws
        q = qkv[0, :, :, : hp * wp] * hd**-0.5
        q = einops.rearrange(q, "b h (nh p nw q) d -> b h (nh nw) (p q) d", nh=n_h, p=ws, q=ws)
        # Keys/values: a static gather from the flat source, whose appended last row is the zero padding. Keys
        # and values are gathered from separate tables, straight into the layout of the batched products (one
        # gather from a stacked table needs a transposing copy afterwards: ~15% slower on XLA:CPU).
        pad_row = ((0, 0), (0, 0), (0, 1), (0, 0))
        k_table, v_table = jnp.pad(qkv[1], pad_row), jnp.pad(qkv[2], pad_row)
        bias = self._bias()[:, None]  # (heads, 1, 49, K)

        # Windows are processed in chunks (sequentially, lax.map) so that on CPU each chunk's score tensor stays
        # in cache; on accelerators all windows form one chunk.
        chunk = min(n_win, self.window_chunk or _default_window_chunk(batch * nh * ws * ws * n_keys * 4, n_win))
        n_chunks = -(-n_win // chunk)
        extra = n_chunks * chunk - n_win  # dummy windows (keys: the zero row), dropped below
        index = np.pad(index, ((0, extra), (0, 0)), constant_values=k_table.shape[2] - 1)
        mask = np.pad(mask, ((0, extra), (0, 0)))
        q = jnp.pad(q, ((0, 0), (0, 0), (0, extra), (0, 0), (0, 0)))
        q = einops.rearrange(q, "b h (m c) p d -> m b h c p d", c=chunk)

        def attend(q_c: jax.Array, index_c: jax.Array, mask_c: jax.Array) -> jax.Array:
            """(B, heads, c, 49, d) queries, (c * K,) key rows, (c, 1, K) masks -> (B, heads, c, 49, d)."""
            k = jnp.take(k_table, index_c, axis=2, mode="clip").reshape(batch, nh, chunk, n_keys, hd)
            v = jnp.take(v_table, index_c, axis=2, mode="clip").reshape(batch, nh, chunk, n_keys, hd)
            scores = (jnp.einsum("bhnqd,bhnkd->bhnqk", q_c, k) + bias + mask_c).astype(jnp.float32)
            # Softmax with the normalisation after the product with the values (49 x d divisions per window
            # instead of 49 x K): the same function, one pass less over the scores (~10% of the attention on CPU).
            weights = jnp.exp(scores - jax.lax.stop_gradient(max_last(scores)))
            out = jnp.einsum("bhnqk,bhnkd->bhnqd", weights.astype(self.dtype), v)
            return out / weights.sum(axis=-1, keepdims=True).astype(self.dtype)

        index = jnp.asarray(index.reshape(n_chunks, chunk * n_keys))
        mask = jnp.asarray(mask.reshape(n_chunks, chunk, 1, n_keys), self.dtype)
        if n_chunks == 1:
            out = attend(q[0], index[0], mask[0])[None]
        else:
            out = jax.lax.map(lambda args: attend(*args), (q, index, mask))
        out = einops.rearrange(out, "m b h c p d -> b (m c) p (h d)")[:, :n_win]
        out = einops.rearrange(out, "b (nh nw) (p q) e -> b (nh p) (nw q) e", nh=n_h, p=ws)
        return nn.Dense(
            dim,
            dtype=self.dtype,
            kernel_init=torch_linear_kernel_init(),
            bias_init=torch_bias_init(dim),
            name="proj",
        )(out)


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2 (PyTorch default Linear init)."""

    hidden: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(..., E) -> (..., E)."""
        dim = x.shape[-1]
        x = nn.Dense(
            self.hidden,
            dtype=self.dtype,
            kernel_init=torch_linear_kernel_init(),
            bias_init=torch_bias_init(dim),
            name="fc1",
        )(x)
        x = gelu(x)
        return nn.Dense(
            dim,
            dtype=self.dtype,
            kernel_init=torch_linear_kernel_init(),
            bias_init=torch_bias_init(self.hidden),
            name="fc2",
        )(x)


class CFFMBlock(nn.Module):
    """``CffmTransformerBlock3d3``: enhances the target by attention to itself and the pooled references."""

    dim: int
    num_heads: int = 8
    window_size: int = 7
    expand_size: int = 3
    focal_window: int = 5
    focal_l_clips: tuple = (1, 2, 3)
    focal_kernel_clips: tuple = (7, 5, 3)
    mlp_ratio: float = 4.0
    ln_eps: float = 1e-5
    window_chunk: int | None = None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, target: jax.Array, refs: jax.Array) -> jax.Array:
        """One block (SPEC 4.3 steps 1-6).

        Args:
          target: (B, h8, w8, E) raw target features.
          refs: (B, T-1, h8, w8, E) raw reference features, oldest first.
        Returns:
          (B, h8, w8, E) the enhanced target.
        """
        batch, h, w, dim = target.shape
        ws = self.window_size
        hp, wp = -(-h // ws) * ws, -(-w // ws) * ws
        n_h, n_w = hp // ws, wp // ws
        norm1 = nn.LayerNorm(epsilon=self.ln_eps, use_fast_variance=False, dtype=self.dtype, name="norm1")
        pad = ((0, 0), (0, hp - h), (0, wp - w), (0, 0))

        target_n = jnp.pad(norm1(target), pad)
        pooled = [WindowPool(ws, dtype=self.dtype, name="pool_layers_0")(target_n)]
        for j, level in enumerate(self.focal_l_clips):
            # SPEC 4.3 step 4d: frames 1 and 2 are resized from 7n to 6n (zero padding included) before pooling.
            ref = jnp.pad(norm1(refs[:, j]), pad)
            wsg = ws // level
            ref = resize_bilinear(ref, (level * n_h * wsg, level * n_w * wsg))
            pooled.append(WindowPool(wsg, dtype=self.dtype, name=f"pool_layers_clips_{j}")(ref))

        attn = CFFMAttention(
            dim=dim,
            num_heads=self.num_heads,
            window_size=ws,
            expand_size=self.expand_size,
            focal_window=self.focal_window,
            focal_l_clips=tuple(self.focal_l_clips),
            focal_kernel_clips=tuple(self.focal_kernel_clips),
            window_chunk=self.window_chunk,
            dtype=self.dtype,
            name="attn",
        )(target_n, pooled)
        y = target + attn[:, :h, :w]
        norm2 = nn.LayerNorm(epsilon=self.ln_eps, use_fast_variance=False, dtype=self.dtype, name="norm2")
        return y + Mlp(int(dim * self.mlp_ratio), dtype=self.dtype, name="mlp")(norm2(y))


class CFFMTransformer(nn.Module):
    """The head's ``decoder_focal`` (official ``BasicLayer3d3``): ``depth`` CFFM blocks on the target frame.

    Attributes:
      dim: channels E. depth: number of blocks.
      num_heads ... ln_eps: the official hard-coded settings (SPEC 4.3).
      window_chunk: windows per attention chunk (a speed/memory knob, same result); None = automatic
        (all windows on accelerators, ~4 MiB of scores per chunk on CPU).
      dtype: computation dtype (parameters are float32; the softmax is computed in float32).
    """

    dim: int
    depth: int
    num_heads: int = 8
    window_size: int = 7
    expand_size: int = 3
    focal_window: int = 5
    focal_l_clips: tuple = (1, 2, 3)
    focal_kernel_clips: tuple = (7, 5, 3)
    mlp_ratio: float = 4.0
    ln_eps: float = 1e-5
    window_chunk: int | None = None
    dtype: jnp.dtype = jnp.float32

    def __call__(self, x: jax.Array) -> jax.Array:
        """Enhance the last frame of a clip.

        Args:
          x: (B, T, h8, w8, E) features, references first (oldest first), target last; T = 4.
        Returns:
          (B, T, h8, w8, E): frames 0..T-2 unchanged, frame T-1 enhanced.
        """
        n_clips = len(self.focal_l_clips) + 1
        if x.ndim != 5 or x.shape[1] != n_clips:
            raise ValueError(f"expected (B, T={n_clips}, H, W, E) features, got shape {x.shape}")
        target = self.enhance_target(x[:, -1], x[:, :-1])
        return jnp.concatenate([x[:, :-1], target[:, None].astype(x.dtype)], axis=1)

    @nn.compact
    def enhance_target(self, target: jax.Array, refs: jax.Array) -> jax.Array:
        """The enhanced target alone (for streaming evaluation with cached reference features).

        Args:
          target: (B, h8, w8, E) target features.
          refs: (B, T-1, h8, w8, E) reference features, oldest first (T-1 = 3).
        Returns:
          (B, h8, w8, E) enhanced target.
        """
        if refs.ndim != 5 or refs.shape[1] != len(self.focal_l_clips) or refs.shape[2:] != target.shape[1:]:
            raise ValueError(
                f"expected refs (B, {len(self.focal_l_clips)}, H, W, E) matching target {target.shape}, "
                f"got {refs.shape}"
            )
        if self.dim != target.shape[-1] or self.dim % self.num_heads:
            raise ValueError(f"features have {target.shape[-1]} channels; need dim={self.dim}, divisible by heads")
        for i in range(self.depth):
            target = CFFMBlock(
                dim=self.dim,
                num_heads=self.num_heads,
                window_size=self.window_size,
                expand_size=self.expand_size,
                focal_window=self.focal_window,
                focal_l_clips=tuple(self.focal_l_clips),
                focal_kernel_clips=tuple(self.focal_kernel_clips),
                mlp_ratio=self.mlp_ratio,
                ln_eps=self.ln_eps,
                window_chunk=self.window_chunk,
                dtype=self.dtype,
                name=f"blocks_{i}",
            )(target, refs)
        return target

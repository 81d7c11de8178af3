"""The whole CFFM / CFFM++ model: MiT backbone + CFFM head (SPEC.md sections 4, 5 and 7).

``CFFM.__call__(clip, train=False, prototypes=None)`` takes a clip (B, T, H, W, 3) (references first, oldest first;
the target frame last) and returns

* evaluation, T == num_clips: the target-frame logits (B, H/4, W/4, K) (CFFM: ``x2``; CFFM++: ``x2 + 0.5 * x3``);
* evaluation, T != num_clips (the first frames of a video): the per-frame logits of the last frame (B, H/4, W/4, K);
* training: (B, T+1, H/4, W/4, K) = the T per-frame logits followed by the target-branch logits (CFFM: ``x2``;
  CFFM++: ``x3``, with the per-frame logits detached).

H/4 means the size of the stride-4 backbone stage (floor arithmetic of the patch-embedding convs). Use
``upsample_logits`` for full-resolution logits as the official segmentor computes them.

The head is split into a per-frame part (``encode_frames``: backbone, all-MLP decoder, ``linear_fuse``, per-frame
logits and the 1/8 features) and a temporal part (``decode_clip``: the CFFM cross-frame attention, ``linear_pred2``
and the CFFM++ prototype branch), so streaming inference can cache per-frame results and run only the temporal part
per target frame. Named intermediates are sown into the ``'intermediates'`` collection: ``backbone/stage1..4``,
``decode_head/perframe_logits``, ``decode_head/focal_in``, ``decode_head/focal_out_target``,
``decode_head/logits_cffm`` (x2), and for CFFM++ ``decode_head/cluster_feats`` and ``decode_head/logits_cluster`` (x3).

CFFM++ (SPEC section 5): ``linear_fuse``'s BatchNorm always uses its running statistics and everything before the
prototype branch is detached, so only ``decoder_swin`` and ``linear_pred3`` receive gradients (see
``cffm_jax.models.trainable_mask``).
"""

from __future__ import annotations

from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from cffm_jax.models.cffm_attention import CFFMTransformer
from cffm_jax.models.decoder import MLP, LinearFuse, fused_decoder, torch_dense
from cffm_jax.models.layers import in_matmul_precision_scope, resize_bilinear, resize_bilinear_flat
from cffm_jax.models.mit import MixVisionTransformer
from cffm_jax.models.prototype_attention import PrototypeTransformer

_NEEDS_PROTOTYPES = "CFFM++ needs the video's prototypes (B, Kp, E): pass prototypes=..."


def quarter_size(size: tuple[int, int]) -> tuple[int, int]:
    """The logits' (h, w) for an input of ``size`` (H, W): the stride-4 patch embedding's output size
    (kernel 7, padding 3), e.g. 480 -> 120, 61 -> 16."""
    return tuple((int(n) + 2 * 3 - 7) // 4 + 1 for n in size)


def upsample_logits(logits: jax.Array, size: tuple[int, int]) -> jax.Array:
    """(B, h, w, K) logits -> (B, H, W, K), bilinear with PyTorch ``align_corners=False`` semantics."""
    return resize_bilinear(logits, size)


class CFFMHead(nn.Module):
    """The CFFM (``prototypes=False``) or CFFM++ (``prototypes=True``) decode head."""

    embed_dim: int = 256
    decoder_depth: int = 1
    decoder_num_heads: int = 8
    num_classes: int = 124
    num_clips: int = 4
    dropout_ratio: float = 0.1
    use_prototypes: bool = False
    prototype_num_heads: int = 8
    dtype: Any = jnp.float32

    def setup(self):
        e = self.embed_dim
        self.linear_c4 = MLP(e)
        self.linear_c3 = MLP(e)
        self.linear_c2 = MLP(e)
        self.linear_c1 = MLP(e)
        self.linear_fuse = LinearFuse(e, self.dtype)
        self.linear_pred = torch_dense(self.num_classes, e, "linear_pred", self.dtype)
        self.linear_pred2 = torch_dense(self.num_classes, 2 * e, "linear_pred2", self.dtype)
        self.decoder_focal = CFFMTransformer(
            dim=e, depth=self.decoder_depth, num_heads=self.decoder_num_heads, dtype=self.dtype
        )
        # Channel dropout (PyTorch Dropout2d): one mask value per sample and channel.
        self.dropout = nn.Dropout(self.dropout_ratio, broadcast_dims=(1, 2))
        if self.use_prototypes:
            self.decoder_swin = PrototypeTransformer(e, self.prototype_num_heads, dtype=self.dtype)
            self.linear_pred3 = torch_dense(self.num_classes, e, "linear_pred3", self.dtype)

    def encode_frames(
        self, stages: tuple[jax.Array, ...], train: bool = False, with_logits: bool = True
    ) -> tuple[jax.Array | None, jax.Array]:
        """Per-frame part. stages: c1..c4 (N, h_s, w_s, C_s) -> (per-frame logits (N, h, w, K),
        1/8 features (N, h // 2, w // 2, E))."""
        size = stages[0].shape[1:3]
        mlps = (self.linear_c4, self.linear_c3, self.linear_c2, self.linear_c1)
        fused = fused_decoder(stages, mlps, self.linear_fuse, self.dtype)
        if self.use_prototypes:  # CFFM++: linear_fuse in eval mode and under no_grad, always
            c = jax.lax.stop_gradient(self.linear_fuse.normalize(fused, use_running_average=True))
        else:
            c = self.linear_fuse.normalize(fused, use_running_average=not train)
        logits = self.linear_pred(self.dropout(c, deterministic=not train)) if with_logits else None
        feats = resize_bilinear_flat(c, (size[0] // 2, size[1] // 2))
        return logits, feats

    def decode_clip(
        self,
        feats: jax.Array,
        size: tuple[int, int],
        train: bool = False,
        prototypes: jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Temporal part. feats (B, T, h8, w8, E) with T == num_clips -> target logits (B, h, w, K) at ``size``.

        In training returns (x2, x3) for CFFM++ (x3 None for CFFM) so the caller assembles the training output.
        """
        self.sow("intermediates", "focal_in", feats)
        enhanced = self.decoder_focal(feats)[:, -1]
        self.sow("intermediates", "focal_out_target", enhanced)
        target = feats[:, -1]
        z = jnp.concatenate([target, enhanced], axis=-1)
        x2 = resize_bilinear(self.linear_pred2(self.dropout(z, deterministic=not train)), size)
        self.sow("intermediates", "logits_cffm", x2)
        if not self.use_prototypes:
            return (x2, None) if train else x2
        if prototypes is None:
            raise ValueError(_NEEDS_PROTOTYPES)
        x2 = jax.lax.stop_gradient(x2)
        s = self.decoder_swin(jax.lax.stop_gradient(target), prototypes.astype(target.dtype))
        self.sow("intermediates", "cluster_feats", s)
        x3 = resize_bilinear(self.linear_pred3(self.dropout(s, deterministic=not train)), size)
        self.sow("intermediates", "logits_cluster", x3)
        if train:
            return x2, x3
        return x2 + 0.5 * x3

    def check_clip(self, num_frames: int, train: bool, prototypes: jax.Array | None) -> None:
        """Raises ``ValueError`` for a clip the head cannot decode (before any work is done on it)."""
        if train and num_frames != self.num_clips:
            raise ValueError(f"Training clips must have num_clips={self.num_clips} frames, got {num_frames}")
        if self.use_prototypes and prototypes is None and num_frames == self.num_clips:
            raise ValueError(_NEEDS_PROTOTYPES)

    def __call__(
        self,
        stages: tuple[jax.Array, ...],
        batch_size: int,
        train: bool = False,
        prototypes: jax.Array | None = None,
    ) -> jax.Array:
        """stages for B*T frames (batch-major) -> the outputs described in the module docstring."""
        self.check_clip(stages[0].shape[0] // batch_size, train, prototypes)
        logits, feats = self.encode_frames(stages, train)
        logits = einops.rearrange(logits, "(b t) h w k -> b t h w k", b=batch_size)
        feats = einops.rearrange(feats, "(b t) h w e -> b t h w e", b=batch_size)
        self.sow("intermediates", "perframe_logits", logits)
        num_frames = logits.shape[1]
        if num_frames != self.num_clips:
            return logits[:, -1]  # early exit: plain per-frame logits of the last frame
        out = self.decode_clip(feats, logits.shape[2:4], train, prototypes)
        if not train:
            return out
        x2, x3 = out
        if self.use_prototypes:
            return jnp.concatenate([jax.lax.stop_gradient(logits), x3[:, None]], axis=1)
        return jnp.concatenate([logits, x2[:, None]], axis=1)


class CFFM(nn.Module):
    """MiT backbone + CFFM/CFFM++ head. See the module docstring for inputs and outputs."""

    backbone: MixVisionTransformer
    decode_head: CFFMHead
    matmul_precision: str | None = None  # layers.matmul_precision_scope; build_model sets it from the config

    @in_matmul_precision_scope
    def __call__(self, clip: jax.Array, train: bool = False, prototypes: jax.Array | None = None) -> jax.Array:
        """clip (B, T, H, W, 3) float32, normalised; prototypes (B, Kp, E) for CFFM++."""
        b, t = clip.shape[:2]
        self.decode_head.check_clip(t, train, prototypes)  # before the backbone runs (eager calls fail fast)
        frames = einops.rearrange(clip, "b t h w c -> (b t) h w c")
        stages = self.backbone(frames, train=train)
        return self.decode_head(stages, b, train=train, prototypes=prototypes)

    @in_matmul_precision_scope
    def encode_frames(self, frames: jax.Array, with_logits: bool = True) -> tuple[jax.Array | None, jax.Array]:
        """Evaluation, per frame: frames (N, H, W, 3) -> (per-frame logits (N, h, w, K), 1/8 features
        (N, h // 2, w // 2, E)). The per-frame logits are what the model predicts for a frame without temporal
        context (the first frames of a video); ``with_logits=False`` skips them (None)."""
        return self.decode_head.encode_frames(self.backbone(frames, train=False), train=False, with_logits=with_logits)

    @in_matmul_precision_scope
    def decode_clip(self, feats: jax.Array, size: tuple[int, int], prototypes: jax.Array | None = None) -> jax.Array:
        """Evaluation, temporal part: 1/8 features of a clip (B, T, h8, w8, E) (from ``encode_frames``) ->
        target logits (B, h, w, K) with (h, w) = ``size`` = the 1/4 size of the frames."""
        return self.decode_head.decode_clip(feats, size, train=False, prototypes=prototypes)

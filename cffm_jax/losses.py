"""Segmentation loss of the CFFM / CFFM++ heads (SPEC.md section 8).

The head's training output holds T + 1 logit maps per clip: the T per-frame maps of the all-MLP decoder and
the map of the target branch (CFFM-enhanced target frame). The official loss (mmseg 0.13
``CrossEntropyLoss`` inside ``BaseDecodeHead_clips_flow.losses``) is::

    loss_seg = 0.5 * CE(resize(frames), all T labels) + 1.0 * CE(resize(target), label of frame T-1)

where ``resize`` is PyTorch-compatible bilinear upsampling to the label size and CE is the per-pixel softmax
cross entropy with ``ignore_index`` whose mean is taken over **all** pixels: ignored pixels contribute 0 to
the sum but are counted in the denominator (SPEC section 12.10). ``acc_seg`` (logged only) is the top-1
accuracy in percent of the per-frame maps over all pixels, ignored pixels counting as wrong.

Memory behaviour. At 480x480, K = 124 and B*T = 32 the upsampled per-frame logits alone are ~3.6 GB in
float32, and their gradient is another 3.6 GB. The cross entropy here is written as
``logsumexp(x) - x[label]`` with the label logit picked by an iota comparison (``where(class == label, x, 0)``
summed over classes), so:

* no one-hot tensor and no log-softmax tensor of size K is materialised: the forward pass reads the
  upsampled logits in two fused reductions (logsumexp, picked logit) plus one for the argmax of ``acc_seg``;
* the gradient with respect to the upsampled logits, ``(softmax(x) - onehot(label)) * valid / num_pixels``,
  is one fused elementwise expression (no scatter into a zero buffer, as the transpose of
  ``take_along_axis`` would be), which then goes through the transposed resize (static gathers, not
  autodiff's scatter-adds: ``cffm_jax.models.layers``) back to the head's resolution.

Without chunking (``frames_per_chunk=None``, the default) XLA keeps the upsampled logits alive from the
forward pass until the loss's backward pass and needs one more buffer of the same size for their gradient:
peak extra memory ~2 x N*H*W*K*4 bytes. With ``frames_per_chunk=c`` the frames are processed ``c`` at a time
in a ``lax.map`` whose body is rematerialised (``jax.checkpoint``): only the head-resolution logits are
saved, and the peak is ~2 x c*H*W*K*4 bytes (e.g. ~0.23 GB for c = 1 at 480x480, K = 124), at the cost of
recomputing the resize in the backward pass and of running the chunks sequentially. Measured with XLA's
``memory_analysis`` of ``jit(grad(loss))`` (CPU backend, jax 0.10.2) for logits (8, 5, 120, 120, 124) and
labels (8, 4, 480, 480): temporary buffers 4.30 GiB unchunked, 1.94 GiB with ``frames_per_chunk=8``,
0.57 GiB with ``frames_per_chunk=1`` (8.54 / 2.14 / 0.67 GiB when the resize's gradient was autodiff's
scatter-add).

Everything is computed in float32 whatever the input dtype (bfloat16 logits are cast before the resize).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from cffm_jax.models.layers import argmax_classes, resize_bilinear


def _ce_and_correct(logits: jax.Array, labels: jax.Array, ignore_index: int) -> tuple[jax.Array, jax.Array]:
    """Summed cross entropy and number of correct top-1 pixels, on already-resized logits.

    Args:
      logits: (N, H, W, K) float32.
      labels: (N, H, W) integer; ``ignore_index`` marks ignored pixels.
    Returns:
      (sum of per-pixel CE over non-ignored pixels, float32 scalar; number of pixels whose argmax equals the
      label, int32 scalar).
    """
    labels = labels.astype(jnp.int32)
    classes = lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.sum(jnp.where(classes == labels[..., None], logits, 0.0), axis=-1)
    nll = jnp.where(labels != ignore_index, lse - picked, 0.0)
    pred = argmax_classes(lax.stop_gradient(logits))
    correct = jnp.sum((pred == labels).astype(jnp.int32))
    return jnp.sum(nll), correct


def _resized_ce_and_correct(
    logits: jax.Array, labels: jax.Array, ignore_index: int, frames_per_chunk: int | None
) -> tuple[jax.Array, jax.Array]:
    """Resize ``logits`` (N, h, w, K) to the size of ``labels`` (N, H, W); return summed CE and #correct."""
    if logits.ndim != 4 or labels.ndim != 3 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"want logits (N, h, w, K), labels (N, H, W); got {logits.shape}, {labels.shape}")
    size = labels.shape[1:3]

    def body(lg: jax.Array, lb: jax.Array) -> tuple[jax.Array, jax.Array]:
        return _ce_and_correct(resize_bilinear(lg.astype(jnp.float32), size), lb, ignore_index)

    n = logits.shape[0]
    if frames_per_chunk is None or frames_per_chunk >= n:
        return body(logits, labels)
    if n % frames_per_chunk:
        raise ValueError(f"frames_per_chunk={frames_per_chunk} does not divide the number of frames {n}")
    chunks = n // frames_per_chunk
    lg = logits.reshape(chunks, frames_per_chunk, *logits.shape[1:])
    lb = labels.reshape(chunks, frames_per_chunk, *labels.shape[1:])
    sums, correct = lax.map(jax.checkpoint(lambda a: body(*a)), (lg, lb))
    return jnp.sum(sums), jnp.sum(correct)


def cross_entropy_mean_all(
    logits: jax.Array, labels: jax.Array, ignore_index: int = 255, *, frames_per_chunk: int | None = None
) -> jax.Array:
    """Softmax cross entropy averaged over all pixels, ignored ones included in the denominator (mmseg 0.13).

    Args:
      logits: (N, h, w, K), any float dtype; bilinearly resized (align_corners=False) to the label size when
        (h, w) != (H, W), a no-op otherwise.
      labels: (N, H, W) integer class ids in [0, K) or ``ignore_index``.
      ignore_index: label value whose pixels contribute 0.
      frames_per_chunk: process this many frames at a time with rematerialisation (see module docstring).
    Returns:
      float32 scalar: sum of per-pixel CE over non-ignored pixels / (N * H * W).
    """
    nll_sum, _ = _resized_ce_and_correct(logits, labels, ignore_index, frames_per_chunk)
    return nll_sum / labels.size


def segmentation_loss(
    logits: jax.Array,
    labels: jax.Array,
    *,
    ignore_index: int = 255,
    frame_weight: float = 0.5,
    target_weight: float = 1.0,
    frames_per_chunk: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The CFFM / CFFM++ training loss (SPEC.md section 8).

    Args:
      logits: (B, T+1, h, w, K) head training output; entries 0..T-1 are per-frame logits, entry T the target
        branch's logits. Any float dtype; computed in float32.
      labels: (B, T, H, W) integer labels (class ids 0..K-1, ``ignore_index`` for ignored pixels); frame
        T-1 is the target frame.
      ignore_index: ignored label value (255 for VSPW).
      frame_weight: weight of the per-frame CE (0.5 in the official code).
      target_weight: weight of the target-branch CE (1.0).
      frames_per_chunk: optional memory bound, see the module docstring; must divide B*T (and, if smaller than
        B, also B).
    Returns:
      (loss, aux): ``loss`` float32 scalar = frame_weight * ce_frames + target_weight * ce_target; ``aux``
      holds float32 scalars ``ce_frames``, ``ce_target`` and ``acc_seg`` (top-1 accuracy of the per-frame
      logits in percent over all B*T*H*W pixels, ignored pixels counted as wrong).
    """
    if logits.ndim != 5 or labels.ndim != 4:
        raise ValueError(
            f"expected logits (B, T+1, h, w, K) and labels (B, T, H, W), got {logits.shape}, {labels.shape}"
        )
    b, t = labels.shape[:2]
    if logits.shape[:2] != (b, t + 1):
        raise ValueError(f"logits {logits.shape} must start with (B, T+1) = {(b, t + 1)} ({labels.shape=})")
    frame_logits = logits[:, :t].reshape(b * t, *logits.shape[2:])
    frame_labels = labels.reshape(b * t, *labels.shape[2:])
    frames_sum, frames_correct = _resized_ce_and_correct(
        frame_logits, frame_labels, ignore_index, frames_per_chunk
    )
    target_sum, _ = _resized_ce_and_correct(logits[:, t], labels[:, t - 1], ignore_index, frames_per_chunk)
    ce_frames = frames_sum / frame_labels.size
    ce_target = target_sum / (b * labels.shape[2] * labels.shape[3])
    loss = frame_weight * ce_frames + target_weight * ce_target
    acc_seg = 100.0 * frames_correct.astype(jnp.float32) / frame_labels.size
    return loss, {"ce_frames": ce_frames, "ce_target": ce_target, "acc_seg": acc_seg}

"""Segmentation loss of the CFFM / CFFM++ heads (SPEC.md section 8).

The head's training output holds T + 1 logit maps per clip: the T per-frame maps of the all-MLP decoder and
the map of the target branch (CFFM-enhanced target frame). The official loss (mmseg 0.13
``CrossEntropyLoss`` inside ``BaseDecodeHead_clips_flow.losses``) is::

    loss_seg = 0.5 * CE(resize(frames), all T labels) + 1.0 * CE(resize(target), label of frame T-1)

where ``resize`` is PyTorch-compatible bilinear upsampling to the label size and CE is the per-pixel softmax
cross entropy with ``ignore_index`` whose mean is taken over **all** pixels: ignored pixels contribute 0 to
the sum but are counted in the denominator (SPEC section 12.10). ``acc_seg`` (logged only) is the top-1
accuracy in percent of the per-frame maps over all pixels, ignored pixels counting as wrong.

Memory and speed. At 480x480, K = 124 and B*T = 32 the upsampled per-frame logits alone are ~3.6 GB in float32.

* Default path (``frames_per_chunk=None``, when the label size is the logits' size times a power of two on each
  axis, as in training: 1/4 resolution): :func:`_blocked_ce` never materialises them. A ``lax.scan`` over blocks
  of low-resolution rows makes each block's label-resolution logits (a few MB, ``BLOCK_BYTES``) with the same
  float32 operations as :func:`resize_bilinear`, takes their cross entropy, top-1 hits and gradient
  ``softmax(x) - onehot(label)`` while the block is in cache, and applies the transposed upsampling; the gradient
  with respect to the low-resolution logits is computed in the forward pass and only scaled in the backward pass.
  Each step of the loop takes the block's rows of all N frames, so that a batch sharded over devices stays
  sharded (a loop over frames made XLA replicate the logits on every device). Extra memory: a few times the size
  of the low-resolution logits. Measured (CPU, jax 0.10.2) for logits (1, 5, 120, 120, 124) and labels
  (1, 4, 480, 480), the loss and its gradient: 0.80 -> 0.61 s, temporary buffers 1104 -> 200 MiB against the
  unblocked path; for (8, 5, 120, 120, 124) logits 1.57 GiB of temporary buffers (4.30 GiB unblocked, see below).
  (One frame per step was faster on one device, 0.50 s.)
* Otherwise, and whenever ``frames_per_chunk`` is given: the logits are resized (:func:`resize_bilinear`) and the
  cross entropy is ``logsumexp(x) - x[label]`` with the label logit picked by an iota comparison; no one-hot or
  log-softmax tensor of size K is materialised, and the gradient ``(softmax(x) - onehot(label)) * valid /
  num_pixels`` is one fused elementwise expression followed by the transposed resize. Without chunking XLA keeps
  the upsampled logits alive until the backward pass and needs one more buffer of the same size for their
  gradient: ~2 x N*H*W*K*4 bytes. With ``frames_per_chunk=c`` the frames are processed ``c`` at a time in a
  ``lax.map`` whose body is rematerialised (``jax.checkpoint``): ~2 x c*H*W*K*4 bytes, at the cost of
  recomputing the resize in the backward pass. ``memory_analysis`` of ``jit(grad(loss))`` for logits
  (8, 5, 120, 120, 124) and labels (8, 4, 480, 480): temporary buffers 4.30 GiB unchunked, 1.94 GiB with
  ``frames_per_chunk=8``, 0.57 GiB with ``frames_per_chunk=1``.

``acc_seg`` counts a pixel as a hit when the label's logit is the maximum; on the unblocked path by the first
index of the maximum, on the blocked one as ``x[label] >= max(x)`` (so a label tied for the maximum with an
earlier class counts there as a hit; ties of float32 logits are rare outside degenerate weights).

Everything is computed in float32 whatever the input dtype (bfloat16 logits are cast before the resize).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cffm_jax.models.layers import (
    argmax_classes,
    fold_edge_padding,
    resize_bilinear,
    upsample_phases,
    upsample_phases_adjoint,
    upsampling_phases,
)

# Label-resolution logits of one block of the blocked loss (all N frames, see _blocked_ce), at most (but at least
# one low-resolution row): about the two cores' 2 x 1 MiB of L2 on the development machine.
BLOCK_BYTES = 2 * 2**20


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
    exact_phases = upsampling_phases(logits.shape[1], size[0]) and upsampling_phases(logits.shape[2], size[1])
    if frames_per_chunk is None and exact_phases:
        return _blocked_ce(logits.astype(jnp.float32), labels.astype(jnp.int32), ignore_index)
    if frames_per_chunk is None or frames_per_chunk >= n:
        return body(logits, labels)
    if n % frames_per_chunk:
        raise ValueError(f"frames_per_chunk={frames_per_chunk} does not divide the number of frames {n}")
    chunks = n // frames_per_chunk
    lg = logits.reshape(chunks, frames_per_chunk, *logits.shape[1:])
    lb = labels.reshape(chunks, frames_per_chunk, *labels.shape[1:])
    sums, correct = lax.map(jax.checkpoint(lambda a: body(*a)), (lg, lb))
    return jnp.sum(sums), jnp.sum(correct)


def _blocked_ce_parts(logits: jax.Array, labels: jax.Array, ignore_index: int, with_grad: bool) -> tuple:
    """Summed CE, #correct and (if ``with_grad``) d(summed CE)/d(logits), block by block of low-resolution rows.

    The loop runs over blocks of rows with all N frames in each step, so that a batch sharded over devices stays
    sharded (each device runs the loop on its frames).
    """
    n, h, w, k = logits.shape
    big_h, big_w = labels.shape[1:]
    row_plan, col_plan = upsampling_phases(h, big_h), upsampling_phases(w, big_w)
    sh, sw = big_h // h, big_w // w
    rows = max([r for r in range(1, h + 1) if h % r == 0 and n * sh * r * big_w * k * 4 <= BLOCK_BYTES] or [1])
    blocks = h // rows
    # Each block's rows with one row of context above and below, all edge-padded by one (the clamped border);
    # (blocks, rows + 2, N, w + 2, K).
    padded = jnp.pad(logits, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    index = (np.arange(blocks)[:, None] * rows + np.arange(rows + 2)[None, :]).reshape(-1)
    slabs = jnp.moveaxis(jnp.take(padded, index, axis=1), 1, 0).reshape(blocks, rows + 2, n, w + 2, k)
    # Labels in the pixel order of the blocks: (block, row phase, row, frame, column phase, column).
    labels = labels.reshape(n, blocks, rows, sh, w, sw).transpose(1, 3, 2, 0, 5, 4)

    def block(carry: None, xs: tuple[jax.Array, jax.Array]) -> tuple[None, tuple]:
        slab, label = xs
        x = upsample_phases(upsample_phases(slab, 0, row_plan, rows), 3, col_plan, w)  # (sh, rows, N, sw, w, K)
        top = jnp.max(x, axis=-1, keepdims=True)
        top_finite = jnp.where(jnp.isfinite(top), top, 0.0)  # as jax.nn.logsumexp
        exp = jnp.exp(x - top_finite)
        total = jnp.sum(exp, axis=-1, keepdims=True)
        onehot = lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1) == label[..., None]
        picked = jnp.sum(jnp.where(onehot, x, 0.0), axis=-1)
        valid = label != ignore_index
        nll = jnp.sum(jnp.where(valid, (jnp.log(total) + top_finite)[..., 0] - picked, 0.0))
        hit = valid & (label >= 0) & (label < k) & (picked >= top[..., 0])
        correct = jnp.sum(hit.astype(jnp.int32))
        if not with_grad:
            return carry, (nll, correct)
        grad = jnp.where(valid[..., None], exp / total - onehot.astype(exp.dtype), 0.0)
        grad = fold_edge_padding(upsample_phases_adjoint(grad, 3, col_plan, w), 3, w)  # (sh, rows, N, w, K)
        return carry, (nll, correct, upsample_phases_adjoint(grad, 0, row_plan, rows))  # (rows + 2, N, w, K)

    _, out = lax.scan(block, None, (slabs, labels))
    nll, correct = jnp.sum(out[0]), jnp.sum(out[1])
    if not with_grad:
        return nll, correct
    # Each block's gradient covers its rows and one row above and below: add the overlaps (and the edge pads).
    parts = jnp.moveaxis(out[2], 2, 0)  # (N, blocks, rows + 2, w, K)
    above, below = parts[:, :, 0], parts[:, :, rows + 1]
    to_first = jnp.concatenate([above[:, :1], below[:, :-1]], axis=1)[:, :, None]
    to_last = jnp.concatenate([above[:, 1:], below[:, -1:]], axis=1)[:, :, None]
    if rows == 1:
        grad = parts[:, :, 1:2] + to_first + to_last
    else:
        grad = jnp.concatenate(
            [parts[:, :, 1:2] + to_first, parts[:, :, 2:rows], parts[:, :, rows : rows + 1] + to_last], axis=2
        )
    return nll, correct, grad.reshape(n, h, w, k)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _blocked_ce(logits: jax.Array, labels: jax.Array, ignore_index: int) -> tuple[jax.Array, jax.Array]:
    """:func:`_resized_ce_and_correct` for integer (power-of-two) upsampling factors, in blocks of rows.

    logits (N, h, w, K) float32, labels (N, s*h, t*w) int32. The label-resolution logits of a block of rows (a few
    MB) are made from the low-resolution rows by the phases of ``layers.upsampling_phases`` (the same float32
    operations as :func:`resize_bilinear`), and their cross entropy, top-1 hits and gradient are computed while the
    block is in cache; the gradient with respect to the low-resolution logits (the transposed upsampling) is made in the
    forward pass, so the backward pass only scales it. Memory: the blocks' gradients (~(1 + 2/rows) x the logits)
    instead of N*s*h*t*w*K floats twice. A hit is ``picked >= max`` (a label tied with another class for the
    maximum counts as a hit; the unblocked path takes the first maximum).
    """
    return _blocked_ce_parts(logits, labels, ignore_index, with_grad=False)


def _blocked_ce_fwd(logits: jax.Array, labels: jax.Array, ignore_index: int) -> tuple[tuple, jax.Array]:
    nll, correct, grad = _blocked_ce_parts(logits, labels, ignore_index, with_grad=True)
    return (nll, correct), grad


def _blocked_ce_bwd(ignore_index: int, grad: jax.Array, cotangents: tuple) -> tuple[jax.Array, None]:
    del ignore_index
    return cotangents[0] * grad, None


_blocked_ce.defvjp(_blocked_ce_fwd, _blocked_ce_bwd)


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

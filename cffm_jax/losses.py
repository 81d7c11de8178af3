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
  of low-resolution pixels (whole rows, or on CPU a row cut into blocks of columns: ``BLOCK_BYTES``, about the L2
  cache) makes each block's label-resolution logits with the same float32 operations as :func:`resize_bilinear`,
  takes their cross entropy, top-1 hits and gradient ``softmax(x) - onehot(label)`` while the block is in cache,
  applies the transposed upsampling and adds the result into the gradient carried by the loop; the gradient with
  respect to the low-resolution logits is computed in the forward pass and only scaled in the backward pass.
  Each step of the loop takes the block of all N frames, so that a batch sharded over devices stays sharded (a
  loop over frames made XLA replicate the logits on every device). Extra memory: about twice the low-resolution
  logits. Measured (CPU, jax 0.10.2, interleaved runs) for logits (1, 5, 120, 120, 124) and labels
  (1, 4, 480, 480), the loss and its gradient: 0.80 s and 1104 MiB of temporary buffers unblocked; 0.61 s and
  200 MiB in blocks of whole rows with the blocks' gradients stacked (the previous version); 0.51 s and 70 MiB
  now (0.54 s for the previous version in the same runs). For (8, 5, 120, 120, 124) logits: 6.0 -> 4.4 s and
  1.54 -> 0.56 GiB against the previous version (4.30 GiB unblocked, see below).
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
# one low-resolution pixel; one row on accelerators): the L2 of the development machine's two cores. Interleaved
# runs of the loss + gradient of (1, 5, 120, 120, 124) logits: 0.5-1.5 MiB fastest, 256 KiB (more loop steps)
# and 4 MiB slower.
BLOCK_BYTES = 2**20


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


def _block_shape(n: int, h: int, w: int, k: int, sh: int, sw: int) -> tuple[int, int]:
    """(rows, columns) of low-resolution pixels per block of :func:`_blocked_ce_parts`.

    Whole rows (as many as divide ``h``) when one row of all N frames' label-resolution logits fits in
    ``BLOCK_BYTES``. Otherwise one row, which on CPU is cut into the widest blocks of columns (dividing ``w``) that
    fit; on accelerators a row stays whole, keeping the loop short (each step launches its own kernels there).
    """
    pixel_bytes = n * sh * sw * k * 4
    for rows in range(h, 0, -1):
        if h % rows == 0 and rows * w * pixel_bytes <= BLOCK_BYTES:
            return rows, w
    if jax.default_backend() != "cpu":
        return 1, w
    return 1, max(c for c in range(1, w + 1) if w % c == 0 and (c == 1 or c * pixel_bytes <= BLOCK_BYTES))


def _blocked_ce_parts(logits: jax.Array, labels: jax.Array, ignore_index: int, with_grad: bool) -> tuple:
    """Summed CE, #correct and (if ``with_grad``) d(summed CE)/d(logits), block by block of low-resolution pixels.

    The loop runs over blocks of rows (and columns) with all N frames in each step, so that a batch sharded over
    devices stays sharded (each device runs the loop on its frames).
    """
    n, h, w, k = logits.shape
    big_h, big_w = labels.shape[1:]
    row_plan, col_plan = upsampling_phases(h, big_h), upsampling_phases(w, big_w)
    sh, sw = big_h // h, big_w // w
    rows, cols = _block_shape(n, h, w, k, sh, sw)
    row_blocks, col_blocks = h // rows, w // cols
    padded = jnp.pad(logits, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    # Labels in the pixel order of the blocks: (block, frame, row phase, row, column phase, column).
    labels = labels.reshape(n, row_blocks, rows, sh, col_blocks, cols, sw).transpose(1, 4, 0, 3, 2, 6, 5)
    labels = labels.reshape(row_blocks * col_blocks, n, sh, rows, sw, cols)
    starts = np.stack(np.meshgrid(np.arange(row_blocks) * rows, np.arange(col_blocks) * cols, indexing="ij"), -1)
    starts = jnp.asarray(starts.reshape(-1, 2), jnp.int32)

    def block(acc: jax.Array | None, xs: tuple[jax.Array, jax.Array]) -> tuple:
        start, label = xs
        zero = jnp.zeros((), jnp.int32)
        at = (zero, start[0], start[1], zero)
        slab = lax.dynamic_slice(padded, at, (n, rows + 2, cols + 2, k))
        x = upsample_phases(upsample_phases(slab, 1, row_plan, rows), 3, col_plan, cols)  # (N, sh, rows, sw, cols, K)
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
            return acc, (nll, correct)
        grad = jnp.where(valid[..., None], exp / total - onehot.astype(exp.dtype), 0.0)
        grad = upsample_phases_adjoint(upsample_phases_adjoint(grad, 3, col_plan, cols), 1, row_plan, rows)
        acc = lax.dynamic_update_slice(acc, lax.dynamic_slice(acc, at, grad.shape) + grad, at)
        return acc, (nll, correct)

    # The gradient of the edge-padded logits: each block adds its part, neighbouring blocks share their borders.
    init = jnp.zeros_like(padded) if with_grad else None
    acc, (nll, correct) = lax.scan(block, init, (starts, labels))
    nll, correct = jnp.sum(nll), jnp.sum(correct)
    if not with_grad:
        return nll, correct
    return nll, correct, fold_edge_padding(fold_edge_padding(acc, 1, h), 2, w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _blocked_ce(logits: jax.Array, labels: jax.Array, ignore_index: int) -> tuple[jax.Array, jax.Array]:
    """:func:`_resized_ce_and_correct` for integer (power-of-two) upsampling factors, in blocks of pixels.

    logits (N, h, w, K) float32, labels (N, s*h, t*w) int32. The label-resolution logits of a block (at most
    ``BLOCK_BYTES``) are made from the low-resolution block and its one-pixel border by the phases of
    ``layers.upsampling_phases`` (the same float32 operations as :func:`resize_bilinear`), and their cross entropy,
    top-1 hits and gradient are computed while the block is in cache; the gradient with respect to the
    low-resolution logits (the transposed upsampling) is made in the forward pass, so the backward pass only scales
    it. Memory: the edge-padded logits and their gradient instead of N*s*h*t*w*K floats twice. A hit is
    ``picked >= max`` (a label tied with another class for the maximum counts as a hit; the unblocked path takes
    the first maximum).
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
    frames_sum, frames_correct = _resized_ce_and_correct(frame_logits, frame_labels, ignore_index, frames_per_chunk)
    target_sum, _ = _resized_ce_and_correct(logits[:, t], labels[:, t - 1], ignore_index, frames_per_chunk)
    ce_frames = frames_sum / frame_labels.size
    ce_target = target_sum / (b * labels.shape[2] * labels.shape[3])
    loss = frame_weight * ce_frames + target_weight * ce_target
    acc_seg = 100.0 * frames_correct.astype(jnp.float32) / frame_labels.size
    return loss, {"ce_frames": ce_frames, "ce_target": ce_target, "acc_seg": acc_seg}

"""Evaluation metrics of the official CFFM evaluation (SPEC.md section 11): mIoU family and video consistency.

All inputs are **already mapped** label maps: ground truth after VSPW's reduce-zero-label rule (raw 0 -> 255,
raw v -> v - 1, raw 255 stays 255; SPEC section 10.1) and predictions as the model's class ids 0..K-1, both at
the original frame size. The official mVC script applies the same GT mapping, so one pair of arrays feeds
both the confusion matrix and the video consistency. All reported values are percentages.

Confusion matrix (``confusion_matrix``, jitted, on device). ``cm[g, p]`` counts pixels with ground truth ``g``
and prediction ``p`` (rows = GT, columns = prediction). Pixels whose label equals ``ignore_index`` are
dropped; so are labels or predictions outside [0, K) (neither occurs with VSPW labels and argmax
predictions). Implemented as a scatter-add of ones at ``g * K + p`` into K*K int32 bins (static K, works under
``jit``). Counting precision: with jax's default 32-bit mode the device counts are int32, exact as long as one
call (or one device-side accumulation, see ``MetricsAccumulator``) covers fewer than 2**31 pixels; the VSPW
val set has more than that in total, so totals are accumulated on the host in int64. No global
``jax_enable_x64`` is needed.

From a confusion matrix (numpy, float64), with I_c = cm[c, c], GT_c = sum_p cm[c, p] (labelled pixels of class
c), P_c = sum_g cm[g, c] (pixels predicted as c) and U_c = GT_c + P_c - I_c:

* ``per_class_iou``: IoU_c = I_c / U_c, NaN where U_c = 0.
* ``miou`` (mmseg 0.13 ``dataset.evaluate``, the number CFFM reports): nanmean of IoU_c over classes with
  U_c > 0. Differs from the textbook "mean over all K classes": classes absent from both GT and prediction are
  skipped, while a class that is predicted but absent from the GT has IoU 0 and does count.
* ``miou_gt_present`` (the VSPW ``Evaluator`` "mIoU" printed alongside, also printed by the mVC script): mean
  of IoU_c over classes with GT_c > 0 only (``nansum(IoU * present) / #present``); false-positive-only classes
  are skipped, so it is >= ``miou`` whenever such classes exist.
* ``aacc``: sum_c I_c / sum_c GT_c, pixel accuracy over labelled (non-ignored) pixels.
* ``per_class_acc``: Acc_c = I_c / GT_c (recall), NaN where GT_c = 0; ``macc`` = nanmean of it (mmseg mAcc and
  the Evaluator's "Acc_class").
* ``fwiou`` (VSPW Evaluator "FWIoU"): sum over classes with GT_c > 0 of freq_c * IoU_c, with
  freq_c = GT_c / sum GT. This is the textbook frequency-weighted IoU (Long et al. 2015) restricted to
  labelled pixels.

Video consistency (``VideoConsistency``, the official ``VC_perclip.py``), for window lengths n in (8, 16):

* videos with <= 16 frames are skipped for both n (``min_frames = 17``);
* windows start at i in ``range(F - n)``: the last possible start F - n is **not** included (off by one as in
  the official script), so a 17-frame video has 1 window for n = 16 and 9 for n = 8;
* G = AND_{j=1..n-1} (gt_i == gt_{i+j}) and P = AND_{j=1..n-1} (pred_i == pred_{i+j}), pixelwise;
  acc_i = sum(G & P) / sum(G), NaN when sum(G) = 0. The ignore label 255 is compared like any other value;
* mVC_n = nanmean of acc_i over all windows of all videos pooled together (not a mean of per-video means).

The streaming implementation uses that every frame of a window equals its first one exactly when every frame
equals the one before it: it keeps, per pixel, the length of the current run of equal GT values (and of equal
predictions) and the last frame, so G of the window of length n ending at frame q is ``run_gt[q] >= n - 1``.
When frame f arrives, frame f-1 is known not to be the last one, so the windows ending at f-1 are evaluated (by a
jitted kernel, for a group of frames at a time); windows ending at the final frame are thus never evaluated, which
is exactly the off-by-one range above. Per-window counts are kept per video and committed to the pooled totals
when the video turns out to have >= 17 frames. Memory: four (H, W) arrays on the device, whatever n and the video
length.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

VC_WINDOWS = (8, 16)
VC_MIN_FRAMES = 17
_INT32_MAX = 2**31 - 1


# ---------------------------------------------------------------------------------------------------------
# Confusion matrix.


@functools.partial(jax.jit, static_argnames=("num_classes", "ignore_index"))
def confusion_matrix(pred: jax.Array, label: jax.Array, num_classes: int, ignore_index: int = 255) -> jax.Array:
    """Confusion matrix of one batch of label maps, on device.

    Args:
      pred: integer predictions of any shape (e.g. (H, W) or (N, H, W)), class ids in [0, num_classes).
      label: integer ground truth of the same shape; ``ignore_index`` pixels are dropped.
      num_classes: K (static).
      ignore_index: ignored label value (static).
    Returns:
      (K, K) int32 counts, rows = ground truth, columns = prediction. Exact while ``pred.size < 2**31``.
    """
    if pred.shape != label.shape:
        raise ValueError(f"prediction shape {pred.shape} != label shape {label.shape}")
    if pred.size > _INT32_MAX:
        raise ValueError(f"{pred.size} pixels overflow int32 counts; split the call")
    k = num_classes
    pred = pred.astype(jnp.int32).ravel()
    label = label.astype(jnp.int32).ravel()
    valid = (label != ignore_index) & (label >= 0) & (label < k) & (pred >= 0) & (pred < k)
    index = jnp.where(valid, label * k + pred, k * k)  # k * k is out of range and dropped
    counts = jnp.zeros(k * k, jnp.int32).at[index].add(1, mode="drop")
    return counts.reshape(k, k)


def _on_device(x: Any) -> jax.Array:
    """``x`` as a device array: one ``jax.device_put`` for host data (``jnp.asarray`` of a numpy array also runs a
    device program of its own, ~4x the main thread's time for a 480x853 frame on a CPU)."""
    return x if isinstance(x, jax.Array) else jax.device_put(np.asarray(x))


@functools.partial(jax.jit, static_argnames=("num_classes", "ignore_index"), donate_argnums=0)
def _add_confusion(cm: jax.Array, pred: jax.Array, label: jax.Array, num_classes: int, ignore_index: int):
    return cm + confusion_matrix(pred, label, num_classes, ignore_index)


# ---------------------------------------------------------------------------------------------------------
# Scores from a confusion matrix (numpy float64, percent).


def _areas(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    cm = np.asarray(cm, np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"expected a square confusion matrix, got shape {cm.shape}")
    intersect = np.diag(cm)
    area_gt = cm.sum(axis=1)
    area_pred = cm.sum(axis=0)
    return intersect, area_gt, area_pred


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den elementwise, NaN where den == 0, without warnings."""
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _nanmean(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else math.nan


def per_class_iou(cm: np.ndarray) -> np.ndarray:
    """IoU_c = I_c / U_c in percent, (K,) float64, NaN for classes absent from both GT and prediction."""
    intersect, area_gt, area_pred = _areas(cm)
    return 100.0 * _safe_div(intersect, area_gt + area_pred - intersect)


def per_class_acc(cm: np.ndarray) -> np.ndarray:
    """Acc_c = I_c / GT_c (per-class recall) in percent, (K,) float64, NaN for classes absent from the GT."""
    intersect, area_gt, _ = _areas(cm)
    return 100.0 * _safe_div(intersect, area_gt)


def miou(cm: np.ndarray) -> float:
    """mmseg 0.13 mIoU in percent: nanmean of IoU over classes with a non-empty union."""
    return _nanmean(per_class_iou(cm))


def miou_gt_present(cm: np.ndarray) -> float:
    """VSPW Evaluator mIoU in percent: mean IoU over the classes present in the GT (NaN if none)."""
    _, area_gt, _ = _areas(cm)
    present = area_gt > 0
    return float(per_class_iou(cm)[present].mean()) if present.any() else math.nan


def aacc(cm: np.ndarray) -> float:
    """Pixel accuracy over labelled pixels in percent: sum I / sum GT."""
    intersect, area_gt, _ = _areas(cm)
    total = area_gt.sum()
    return float(100.0 * intersect.sum() / total) if total else math.nan


def macc(cm: np.ndarray) -> float:
    """Mean class accuracy in percent: nanmean over GT-present classes of I_c / GT_c."""
    return _nanmean(per_class_acc(cm))


def fwiou(cm: np.ndarray) -> float:
    """Frequency-weighted IoU in percent: sum over GT-present classes of (GT_c / sum GT) * IoU_c."""
    _, area_gt, _ = _areas(cm)
    total = area_gt.sum()
    if not total:
        return math.nan
    present = area_gt > 0
    return float(np.sum(area_gt[present] / total * per_class_iou(cm)[present]))


def summarize_confusion(cm: np.ndarray) -> dict[str, Any]:
    """All confusion-matrix scores in percent.

    Returns:
      dict with floats ``miou``, ``miou_gt_present``, ``aacc``, ``macc``, ``fwiou`` and (K,) float64 arrays
      ``per_class_iou``, ``per_class_acc`` (NaN where undefined).
    """
    return {
        "miou": miou(cm),
        "miou_gt_present": miou_gt_present(cm),
        "aacc": aacc(cm),
        "macc": macc(cm),
        "fwiou": fwiou(cm),
        "per_class_iou": per_class_iou(cm),
        "per_class_acc": per_class_acc(cm),
    }


# ---------------------------------------------------------------------------------------------------------
# Video consistency.


def vc_window_accuracies(preds: np.ndarray, gts: np.ndarray, window: int) -> np.ndarray:
    """Per-window consistency accuracies of one whole video, as the official ``VC_perclip.py`` loop (numpy).

    Does not apply the short-video skip (see ``VideoConsistency``).

    Args:
      preds: (F, H, W) integer predictions of the F frames of one video, in order.
      gts: (F, H, W) integer ground truth (already mapped; 255 is compared like a label).
      window: n, the window length.
    Returns:
      (max(F - n, 0),) float64 fractions acc_i for i in range(F - n), NaN where the GT is never constant.
    """
    preds, gts = np.asarray(preds), np.asarray(gts)
    if preds.shape != gts.shape or preds.ndim != 3:
        raise ValueError(f"expected preds and gts of equal shape (F, H, W), got {preds.shape} and {gts.shape}")
    accs = []
    for i in range(preds.shape[0] - window):
        gt_common = np.ones(gts.shape[1:], bool)
        pred_common = np.ones(preds.shape[1:], bool)
        for j in range(1, window):
            gt_common &= gts[i] == gts[i + j]
            pred_common &= preds[i] == preds[i + j]
        den = int(gt_common.sum())
        accs.append(int((gt_common & pred_common).sum()) / den if den else math.nan)
    return np.asarray(accs, np.float64)


@functools.partial(jax.jit, static_argnames=("windows",), donate_argnums=(0,))
def _window_counts(
    state: tuple[jax.Array, ...], preds: jax.Array, gts: jax.Array, windows: tuple[int, ...]
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """The windows that end at the frame before each of B new frames, by run lengths.

    A window of frames i..q has G = AND_j (gt_i == gt_{i+j}) where every frame equals the first, i.e. where every
    frame equals the one before it: where the run of equal consecutive GT values ending at frame q is at least
    n - 1 long (the same for P). So one (H, W) run length per label map replaces a buffer of n frames.

    A video's first frame is compared with the zeros of a fresh state. That lengthens only runs that reach back to
    frame 0, whose windows (ending at q >= n - 1 with a run of q) count either way.

    Args:
      state: the last frame's (pred, gt) and their run lengths (uint8, saturating at 255), all (H, W).
      preds, gts: (B, H, W) the next B frames.
      windows: the window lengths n (static).
    Returns:
      (B, len(windows), 2) int32 (sum(G & P), sum(G)) of the window of length n ending at the frame before new
      frame j, and the state after the B frames.
    """
    last_pred, last_gt, run_pred, run_gt = state
    counts = []
    for j in range(preds.shape[0]):
        per_window = []
        for n in windows:
            gt_common = run_gt >= n - 1
            both = gt_common & (run_pred >= n - 1)
            per_window.append(jnp.stack([jnp.sum(both, dtype=jnp.int32), jnp.sum(gt_common, dtype=jnp.int32)]))
        counts.append(jnp.stack(per_window))
        pred, gt = preds[j].astype(last_pred.dtype), gts[j].astype(last_gt.dtype)
        run_pred = jnp.where(pred == last_pred, jnp.minimum(run_pred, 254) + 1, 0).astype(jnp.uint8)
        run_gt = jnp.where(gt == last_gt, jnp.minimum(run_gt, 254) + 1, 0).astype(jnp.uint8)
        last_pred, last_gt = pred, gt
    return jnp.stack(counts), (last_pred, last_gt, run_pred, run_gt)


class _Pooled:
    """Running nanmean of window accuracies: sum of non-NaN fractions, their count, and the NaN count."""

    def __init__(self) -> None:
        self.total = 0.0
        self.valid = 0
        self.nan = 0

    def add_counts(self, num: int, den: int) -> None:
        if den:
            self.total += num / den
            self.valid += 1
        else:
            self.nan += 1

    def merge(self, other: _Pooled) -> None:
        self.total += other.total
        self.valid += other.valid
        self.nan += other.nan

    def percent(self) -> float:
        return 100.0 * self.total / self.valid if self.valid else math.nan


class VideoConsistency:
    """Streaming mVC_n (``VC_perclip.py``): feed the frames of each video in order, videos one after another.

    Usage: ``add_frame(pred, gt)`` (or ``add_frames`` of several) for every frame of a video, then
    ``end_video()``; or ``add_video(preds, gts)`` for a whole video. ``result()`` gives ``{'mvc8': ..., 'mvc16': ...}``
    in percent (NaN when no window is defined). The device keeps the last frame and, per pixel, how many frames in a
    row have had its value (predictions and GT: four (H, W) arrays, whatever the window lengths); each
    ``add_frames`` call is one device program for all its frames and windows; per-window counts stay on device until
    ``_flush_every`` of them are pending, then move to host floats.

    Args:
      windows: window lengths n (default (8, 16)).
      min_frames: videos with fewer frames are skipped for every n (official: 17, i.e. <= 16 skipped).
    """

    _flush_every = 64
    _add_video_chunk = 8  # frames per add_frames call of add_video (the program unrolls its frames and windows)

    def __init__(self, windows: Sequence[int] = VC_WINDOWS, min_frames: int = VC_MIN_FRAMES) -> None:
        self.windows = tuple(int(n) for n in windows)
        if not self.windows or min(self.windows) < 2 or max(self.windows) > 256:
            raise ValueError(f"window lengths must be in [2, 256] (uint8 run lengths), got {windows}")
        self.min_frames = int(min_frames)
        self._pooled = {n: _Pooled() for n in self.windows}
        self.num_videos = 0
        self.num_skipped_videos = 0
        self._start_video()

    def _start_video(self) -> None:
        self._state: tuple[jax.Array, ...] | None = None  # last (pred, gt) and their run lengths (_window_counts)
        self._num_frames = 0
        self._frame_shape: tuple[int, ...] | None = None
        self._video = {n: _Pooled() for n in self.windows}
        self._pending: list[tuple[list[tuple[int, int, int]], jax.Array]] = []  # (valid (j, i, n), counts)
        self._pending_windows = 0

    def _flush_pending(self) -> None:
        if not self._pending:
            return
        counts = jax.device_get([c for _, c in self._pending])
        for (valid, _), batch in zip(self._pending, counts, strict=True):
            for j, i, n in valid:
                self._video[n].add_counts(int(batch[j, i, 0]), int(batch[j, i, 1]))
        self._pending, self._pending_windows = [], 0

    def add_frame(self, pred: Any, gt: Any) -> None:
        """Append the next frame of the current video.

        Args:
          pred: (H, W) integer prediction (numpy or jax array).
          gt: (H, W) integer ground truth, already mapped (255 is compared like a label).
        """
        if np.shape(pred) != np.shape(gt) or len(np.shape(pred)) != 2:
            raise ValueError(f"prediction shape {np.shape(pred)} != GT shape {np.shape(gt)} (want equal (H, W))")
        self.add_frames(_on_device(pred)[None], _on_device(gt)[None])

    def add_frames(self, preds: Any, gts: Any, real: int | None = None) -> None:
        """Append the next B frames of the current video: ``preds``, ``gts`` (B, H, W), one device program for all.

        Equal to B calls of :meth:`add_frame` (the same windows, pooled in the same order). ``real``: only the first
        ``real`` frames belong to the video, the rest pads the batch to a size compiled already; the video must end
        next (:meth:`end_video`).
        """
        if np.shape(preds) != np.shape(gts) or len(np.shape(preds)) != 3:
            raise ValueError(f"prediction shape {np.shape(preds)} != GT shape {np.shape(gts)} (want equal (B, H, W))")
        shape = tuple(np.shape(preds)[1:])
        if self._frame_shape is not None and shape != self._frame_shape:
            raise ValueError(
                f"frame {self._num_frames} has shape {shape} but earlier frames of this video have {self._frame_shape}"
            )
        self._frame_shape = shape
        preds, gts = _on_device(preds), _on_device(gts)
        if self._state is None:
            # four buffers (all donated), in one call: jnp.zeros runs a device program per array, per video
            zeros = [np.zeros(shape, dtype) for dtype in (preds.dtype, gts.dtype, np.uint8, np.uint8)]
            self._state = tuple(jax.device_put(zeros))
        last_pred, last_gt, run_pred, run_gt = self._state
        dtypes = jnp.promote_types(last_pred.dtype, preds.dtype), jnp.promote_types(last_gt.dtype, gts.dtype)
        if (last_pred.dtype, last_gt.dtype) != dtypes:  # a wider integer type than the video's first frames
            last_pred, last_gt = last_pred.astype(dtypes[0]), last_gt.astype(dtypes[1])
        state = (last_pred, last_gt, run_pred, run_gt)
        counts, self._state = _window_counts(state, preds, gts, self.windows)
        # Frame j of the batch closes the windows that end at the frame before it: those with n frames before it.
        real = preds.shape[0] if real is None else int(real)
        valid = [(j, i, n) for j in range(real) for i, n in enumerate(self.windows) if self._num_frames + j >= n]
        if valid:
            self._pending.append((valid, counts))
            self._pending_windows += len(valid)
        if self._pending_windows >= self._flush_every:
            self._flush_pending()
        self._num_frames += real

    def end_video(self) -> None:
        """Finish the current video: its windows count if it has >= ``min_frames`` frames."""
        if self._num_frames == 0:
            return
        self._flush_pending()
        if self._num_frames >= self.min_frames:
            for n in self.windows:
                self._pooled[n].merge(self._video[n])
            self.num_videos += 1
        else:
            self.num_skipped_videos += 1
        self._start_video()

    def add_video(self, preds: Any, gts: Any) -> None:
        """Add one whole video: ``preds``, ``gts`` (F, H, W); ends any video in progress first."""
        self.end_video()
        if np.shape(preds) != np.shape(gts) or len(np.shape(preds)) != 3:
            raise ValueError(f"expected preds and gts of equal shape (F, H, W), got {np.shape(preds)}, {np.shape(gts)}")
        for start in range(0, len(preds), self._add_video_chunk):
            self.add_frames(preds[start : start + self._add_video_chunk], gts[start : start + self._add_video_chunk])
        self.end_video()

    def state(self) -> list[float]:
        """The pooled totals of the ended videos (``total, valid, nan`` per window, then the video counts)."""
        pooled = [v for n in self.windows for v in (self._pooled[n].total, self._pooled[n].valid, self._pooled[n].nan)]
        return pooled + [self.num_videos, self.num_skipped_videos]

    def merge_state(self, state: Sequence[float]) -> None:
        """Adds another instance's :meth:`state` (same windows; its videos differ from this one's)."""
        for i, n in enumerate(self.windows):
            total, valid, nan = state[3 * i : 3 * i + 3]
            self._pooled[n].total += float(total)
            self._pooled[n].valid += int(valid)
            self._pooled[n].nan += int(nan)
        self.num_videos += int(state[-2])
        self.num_skipped_videos += int(state[-1])

    def num_windows(self) -> dict[int, int]:
        """Committed windows per n (NaN windows included), excluding the video in progress."""
        return {n: p.valid + p.nan for n, p in self._pooled.items()}

    def result(self) -> dict[str, float]:
        """``{'mvc8': ..., 'mvc16': ...}`` in percent (keys follow ``windows``).

        A video in progress is included if it already has >= ``min_frames`` frames (its windows up to the
        frame before the latest one are final), without ending it.
        """
        self._flush_pending()
        out = {}
        for n in self.windows:
            pooled = _Pooled()
            pooled.merge(self._pooled[n])
            if self._num_frames >= self.min_frames:
                pooled.merge(self._video[n])
            out[f"mvc{n}"] = pooled.percent()
        return out


# ---------------------------------------------------------------------------------------------------------
# Evaluation-loop accumulator.


class MetricsAccumulator:
    """Confusion matrix and video consistency over a streamed evaluation.

    Call ``update(video, frame_idx, pred, label)`` for every frame: the frames of a video in order with
    consecutive indices, videos one after another (a video may not come back). Frames are scored in groups of
    ``batch_frames`` (one copy to the device and two device programs per group instead of five calls per frame: the
    evaluation loop's thread, which also feeds the model, shares the GIL with the frame loaders); a video's last
    group is padded with ignored frames. The confusion matrix is accumulated on device in int32 and moved to a host
    int64 total before 2**31 pixels are reached; the video consistency keeps the last frame and per-pixel run
    lengths (see ``VideoConsistency``).

    Args:
      num_classes: K (124 for VSPW).
      ignore_index: label ignored by the confusion matrix (compared like a label by the VC).
      vc_windows: VC window lengths.
      vc_min_frames: shorter videos are skipped by the VC.
      batch_frames: frames per group.
    """

    def __init__(
        self,
        num_classes: int = 124,
        ignore_index: int = 255,
        vc_windows: Sequence[int] = VC_WINDOWS,
        vc_min_frames: int = VC_MIN_FRAMES,
        batch_frames: int = 4,
    ) -> None:
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self._cm_host = np.zeros((self.num_classes, self.num_classes), np.int64)
        self._cm_device: jax.Array | None = None
        self._device_pixels = 0
        self._vc = VideoConsistency(vc_windows, vc_min_frames)
        self._video: str | None = None
        self._last_frame = -1
        self._finished: set[str] = set()
        self._merged_videos = 0
        self.num_frames = 0
        self.batch_frames = max(1, int(batch_frames))
        self._frames: list[tuple[np.ndarray, np.ndarray]] = []  # the current video's frames not scored yet
        self._padded_video: str | None = None  # update_frames padded this video's last group: it must end
        self._frame_shape: tuple[int, ...] | None = None

    def _flush_frames(self, video_ends: bool) -> None:
        """Scores the buffered frames: padded to ``batch_frames`` with ignored frames when the video ends (the padding
        closes no window that counts, and the video consistency's state after it is dropped), as they are otherwise
        (another program size, only when scores are asked for in the middle of a video)."""
        if not self._frames:
            return
        count = len(self._frames)
        rows = self.batch_frames if video_ends and count < self.batch_frames else count
        preds = np.zeros((rows, *self._frames[0][0].shape), np.result_type(*[p for p, _ in self._frames]))
        preds[:count] = [p for p, _ in self._frames]
        labels = self._padded_labels([g for _, g in self._frames], rows)
        self._frames = []
        self._score(*jax.device_put((preds, labels)), count)  # one call: jnp.asarray adds a device program per array

    def _padded_labels(self, labels: Sequence[Any], rows: int) -> np.ndarray:
        """(rows, H, W) host array of ``labels``, then ignored frames."""
        dtype = np.promote_types(np.result_type(*labels), np.min_scalar_type(self.ignore_index))
        out = np.full((rows, *np.shape(labels[0])), self.ignore_index, dtype)
        out[: len(labels)] = labels
        return out

    def _score(self, preds: jax.Array, labels: Any, count: int) -> None:
        """Adds a group of frames, (B, H, W) ``preds`` and ``labels`` (the first ``count`` belong to the video, the
        rest are padding with ignored labels), to the confusion matrix and the video consistency."""
        pixels = int(preds.size)
        if self._device_pixels + pixels > _INT32_MAX:
            self._flush_confusion()
        if self._cm_device is None:
            self._cm_device = jnp.zeros((self.num_classes, self.num_classes), jnp.int32)
        labels = _on_device(labels)
        self._cm_device = _add_confusion(self._cm_device, preds, labels, self.num_classes, self.ignore_index)
        self._device_pixels += pixels
        self._vc.add_frames(preds, labels, real=count)

    def _flush_confusion(self) -> None:
        if self._cm_device is not None:
            self._cm_host += np.asarray(jax.device_get(self._cm_device), np.int64)
            self._cm_device = None
            self._device_pixels = 0

    def update(self, video: str, frame_idx: int, pred: Any, label: Any) -> None:
        """Add one frame.

        Args:
          video: video name; a new name ends the previous video.
          frame_idx: index of the frame in its video; must follow the previous one of the same video by 1.
          pred: (H, W) integer prediction (class ids 0..K-1), numpy or jax array.
          label: (H, W) integer ground truth, already mapped (reduce-zero-label), same size as ``pred``.
        """
        if np.shape(pred) != np.shape(label) or len(np.shape(pred)) != 2:
            raise ValueError(
                f"video {video!r} frame {frame_idx}: prediction shape {np.shape(pred)} does not match label "
                f"shape {np.shape(label)} (both must be (H, W) at the original frame size)"
            )
        self._next_frames(video, frame_idx, 1, tuple(np.shape(pred)))
        self._frames.append((np.asarray(pred), np.asarray(label)))
        self.num_frames += 1
        if len(self._frames) >= self.batch_frames:
            self._flush_frames(video_ends=False)

    def update_frames(self, video: str, first_idx: int, preds: jax.Array, labels: Sequence[Any]) -> None:
        """Add N consecutive frames whose predictions are on the device, as one group: equal to N calls of
        :meth:`update`, without moving the predictions to the host and back.

        Args:
          video: video name; a new name ends the previous video.
          first_idx: index of the first of the frames in its video.
          preds: (B, H, W) integer predictions on the device, B >= N: rows past N pad the group, and then the video
            must end next (the padding rows' predictions are not scored).
          labels: N (H, W) integer ground truths, already mapped.
        """
        count, shape = len(labels), tuple(preds.shape[1:])
        if preds.ndim != 3 or not 0 < count <= preds.shape[0]:
            raise ValueError(f"video {video!r}: {count} labels for predictions of shape {preds.shape}")
        for t, label in enumerate(labels, first_idx):
            if tuple(np.shape(label)) != shape:
                raise ValueError(
                    f"video {video!r} frame {t}: prediction shape {shape} does not match label shape "
                    f"{np.shape(label)} (both must be (H, W) at the original frame size)"
                )
        self._next_frames(video, first_idx, count, shape)
        self._flush_frames(video_ends=False)  # frames added one by one before these
        self._score(preds, self._padded_labels(labels, preds.shape[0]), count)
        self.num_frames += count
        self._padded_video = self._video if preds.shape[0] > count else None

    def _next_frames(self, video: str, first_idx: int, count: int, shape: tuple[int, ...]) -> None:
        """Checks and records that frames first_idx..first_idx+count-1 of ``video`` (of size ``shape``) come next."""
        if video != self._video:
            if video in self._finished:
                raise ValueError(f"video {video!r} was already finished; frames of a video must be contiguous")
            self.end_video()
            self._video = video
            self._last_frame = first_idx - 1
            self._frame_shape = shape
        elif self._padded_video == video:
            raise ValueError(f"video {video!r}: frames after a padded group; the video had to end there")
        if first_idx != self._last_frame + 1:
            raise ValueError(
                f"video {video!r}: frame {first_idx} follows frame {self._last_frame}; frames must be consecutive"
            )
        if shape != self._frame_shape:
            raise ValueError(
                f"video {video!r} frame {first_idx} has shape {shape}, its first frame {self._frame_shape}: "
                "all frames of a video must have one size"
            )
        self._last_frame = first_idx + count - 1

    def end_video(self) -> None:
        """Ends the video in progress (its VC windows count from now on; it may not come back)."""
        self._flush_frames(video_ends=True)
        if self._video is not None:
            self._finished.add(self._video)
            self._video = None
        self._padded_video = None
        self._vc.end_video()

    def state(self) -> np.ndarray:
        """Everything :meth:`compute` needs, as one float64 vector (counts are exact below 2**53).

        Ends the video in progress. ``a.merge_state(b.state())`` gives ``a`` the scores of the frames of both
        (the videos of ``a`` and ``b`` must differ): this is how evaluation pools the videos that several
        processes scored, each one a part of the split.
        """
        self.end_video()
        counts = [self.num_frames, len(self._finished) + self._merged_videos]
        return np.concatenate([self.confusion_matrix().ravel().astype(np.float64), counts, self._vc.state()])

    def merge_state(self, state: np.ndarray) -> None:
        """Adds the scores captured by another accumulator's :meth:`state` (same K and VC windows)."""
        state = np.asarray(state, np.float64)
        k2, nw = self.num_classes**2, len(self._vc.windows)
        if state.shape != (k2 + 2 + 3 * nw + 2,):
            raise ValueError(f"state of shape {state.shape} does not fit K={self.num_classes}, {nw} VC windows")
        self._flush_confusion()
        self._cm_host += state[:k2].astype(np.int64).reshape(self.num_classes, self.num_classes)
        self.num_frames += int(state[k2])
        self._merged_videos += int(state[k2 + 1])
        self._vc.merge_state(state[k2 + 2 :])

    def confusion_matrix(self) -> np.ndarray:
        """The accumulated (K, K) int64 confusion matrix (rows = GT, columns = prediction)."""
        self._flush_frames(video_ends=False)
        self._flush_confusion()
        return self._cm_host.copy()

    def compute(self) -> dict[str, Any]:
        """Scores so far, in percent; may be called at any time (the current video is not ended).

        Returns:
          dict with floats ``miou``, ``miou_gt_present``, ``aacc``, ``macc``, ``fwiou``, ``mvc8``, ``mvc16``,
          lists ``per_class_iou`` and ``per_class_acc`` (K floats, NaN where undefined) and ints
          ``num_frames``, ``num_videos``.
        """
        scores = summarize_confusion(self.confusion_matrix())  # scores the buffered frames too
        scores["per_class_iou"] = scores["per_class_iou"].tolist()
        scores["per_class_acc"] = scores["per_class_acc"].tolist()
        scores.update(self._vc.result())
        scores["num_frames"] = self.num_frames
        scores["num_videos"] = len(self._finished) + (self._video is not None) + self._merged_videos
        return scores

"""Clip transforms in numpy (SPEC.md section 10.3).

Training (:func:`train_transform`), applied jointly to the frames of a clip unless noted:
ratio resize of (853, 480) with ratio in [0.5, 2.0) and keep-ratio (mmcv ``imrescale`` size rule), random
480x480 crop drawn on the target frame with the ``cat_max_ratio=0.75`` redraw rule, horizontal flip with
p=0.5, photometric distortion drawn independently for every frame, ImageNet normalisation (RGB), padding to
the crop size (image 0 after normalisation, label 255). Test (:func:`test_transform`): keep-ratio rescale to
fit (853, 480), then a bilinear resize to the next multiples of 32 (853x480 -> 864x480, W x H), normalise
(evaluation takes the uint8 frames of :func:`test_resize` and normalises them on the device).

Every random draw comes from the ``np.random.Generator`` passed in; the pipeline seeds one per record, so
results are reproducible and independent of worker count. Draw order of :func:`train_transform`: resize
ratio, crop offsets (y, x) per try, flip, then per frame the photometric draws in the order of the reference
(brightness flag/delta, mode, contrast, saturation, hue, contrast).

Differences from cv2/mmcv (documented, deliberate):
* No OpenCV dependency. :func:`resize_bilinear` re-implements OpenCV's ``INTER_LINEAR`` for uint8 (half-pixel
  centres, no antialiasing, 11-bit fixed-point weights, border taps clamped horizontally with weights (1, 0)
  but with fractional weights on clamped rows vertically, and the SIMD vertical rounding
  ``((S0>>4)*b0>>16 + (S1>>4)*b1>>16 + 2) >> 2``). Checked bit-exact against opencv-python-headless 5.0.0
  (x86-64) on 40 random sizes and on 853x480 at ratios 0.5-2.0, and the row-wise version of 2026-11-28 on 400
  more (windows, 1/3/4 channels, one axis unchanged: 853x480 -> 864x480); an OpenCV build without SIMD rounds once
  instead of twice and can differ by 1 grey level. PIL's bilinear filter is *not* used: it antialiases when
  downsampling, which cv2 does not.
* :func:`resize_nearest` re-implements OpenCV's (legacy) ``INTER_NEAREST``: source index
  ``floor(dst_index * src/dst)``; bit-exact in the same check.
* HSV conversions re-implement OpenCV's uint8 ``RGB2HSV`` (integer tables, H in [0, 180); bit-exact on
  all 5.6M tested colours) and ``HSV2RGB`` (float formula, rounded; 14 of 200,000 random colours differ by
  1 in one channel, at rounding ties).
* Training crops are taken *before* resizing the images (only the crop window of the resized image is
  computed); this is exact, since each output pixel of a resize depends only on its own coordinates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from cffm_jax.data.vspw import IGNORE_INDEX

IMG_SCALE = (853, 480)  # (long, short) edge bound, written (W, H) in the reference configs.
RATIO_RANGE = (0.5, 2.0)
CROP_SIZE = (480, 480)  # (H, W)
CAT_MAX_RATIO = 0.75
CROP_TRIES = 10
SIZE_DIVISOR = 32
MEAN = np.array([123.675, 116.28, 103.53], np.float32)  # RGB
STD = np.array([58.395, 57.12, 57.375], np.float32)

_COEF_BITS = 11
_COEF_SCALE = 1 << _COEF_BITS


# ----------------------------------------------------------------------------------------------------------
# Geometry


def rescale_size(size_wh: tuple[int, int], scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv ``rescale_size``: the largest keep-ratio size fitting (long <= max(scale), short <= min(scale)).

    Args:
      size_wh: (W, H) of the input.
      scale: two edge bounds, in any order.

    Returns:
      (W', H') = (int(W*s + 0.5), int(H*s + 0.5)) with s = min(long_max/long, short_max/short), and at least 1
      pixel per side (mmcv's rounds a very narrow frame, e.g. 2 x 900, to 0 and its resize then fails; the official
      frames never come near).
    """
    w, h = size_wh
    s = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return max(1, int(w * float(s) + 0.5)), max(1, int(h * float(s) + 0.5))


def _linear_taps(src: int, dst: int, start: int, stop: int, *, clamp_weights: bool):
    """OpenCV INTER_LINEAR source taps and 11-bit weights for destination positions start..stop-1.

    Horizontally OpenCV moves border taps inside the image with weights (1, 0) (``clamp_weights``);
    vertically it keeps the fractional weights and clamps the two row indices, which can round differently.
    """
    scale = 1.0 / (dst / src)
    f = ((np.arange(start, stop, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    s = np.floor(f).astype(np.int64)
    f = (f - s.astype(np.float32)).astype(np.float32)
    if clamp_weights:
        low = s < 0
        f[low], s[low] = 0.0, 0
        high = s >= src - 1
        f[high], s[high] = 0.0, src - 1
    w0 = np.round((np.float32(1.0) - f) * np.float32(_COEF_SCALE)).astype(np.int32)
    w1 = np.round(f * np.float32(_COEF_SCALE)).astype(np.int32)
    return np.clip(s, 0, src - 1), np.clip(s + 1, 0, src - 1), w0, w1


def resize_bilinear(
    image: np.ndarray,
    size_wh: tuple[int, int],
    window: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
    """Bilinear resize of a uint8 image like OpenCV ``INTER_LINEAR`` (see the module docstring).

    Args:
      image: (H, W, C) uint8.
      size_wh: output size (W', H').
      window: optional (y0, y1, x0, x1): compute only this window of the (H', W') output.

    Returns:
      (H', W', C) uint8, or (y1 - y0, x1 - x0, C) with a window.
    """
    h, w = image.shape[:2]
    channels = image.shape[2]
    out_w, out_h = size_wh
    y0, y1, x0, x1 = window if window is not None else (0, out_h, 0, out_w)
    if (out_w, out_h) == (w, h):
        return image[y0:y1, x0:x1].copy()
    # The arrays are (rows, columns * channels): numpy's inner loops then run along whole rows, not over the 3
    # channels (3x faster). An axis whose size does not change has the taps (s, s + 1) with weights (2048, 0): its
    # pass is a shift, with the same integers.
    if out_h == h:
        rows = np.arange(y0, y1)
    else:
        sy0, sy1, b0, b1 = _linear_taps(h, out_h, y0, y1, clamp_weights=False)
        # Horizontal pass once per distinct source row, then the vertical pass.
        rows, inverse = np.unique(np.concatenate([sy0, sy1]), return_inverse=True)
    src = image[rows]
    if out_w == w:
        horiz = src[:, x0:x1].reshape(len(rows), -1).astype(np.int32)
        horiz <<= _COEF_BITS - 4  # (p * 2048) >> 4
    else:
        sx0, sx1, a0, a1 = _linear_taps(w, out_w, x0, x1, clamp_weights=True)
        # np.take along the columns gives C-ordered results; src[:, sx0] does not, and its reshape copies (2 ms)
        horiz = np.take(src, sx0, axis=1).reshape(len(rows), -1) * np.repeat(a0, channels)  # uint8 * int32
        horiz += np.take(src, sx1, axis=1).reshape(len(rows), -1) * np.repeat(a1, channels)
        horiz >>= 4  # values up to 255 * 2048 / 16: the int16 range of OpenCV's SIMD vertical pass
    if out_h == h:
        out = horiz
        out >>= 5  # (S * 2048) >> 16
    else:
        n = len(sy0)
        out = horiz[inverse[:n]] * b0[:, None]
        out >>= 16
        lower = horiz[inverse[n:]] * b1[:, None]
        lower >>= 16
        out += lower
    out += 2
    out >>= 2
    return np.clip(out, 0, 255).astype(np.uint8).reshape(y1 - y0, x1 - x0, channels)


def resize_nearest(
    label: np.ndarray,
    size_wh: tuple[int, int],
    window: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
    """Nearest-neighbour resize like OpenCV ``INTER_NEAREST`` (values are preserved exactly).

    Args:
      label: (H, W) or (H, W, C) array of any dtype.
      size_wh: output size (W', H').
      window: optional (y0, y1, x0, x1) window of the output to compute.

    Returns:
      (H', W', ...) or the window of it, same dtype.
    """
    h, w = label.shape[:2]
    out_w, out_h = size_wh
    y0, y1, x0, x1 = window if window is not None else (0, out_h, 0, out_w)
    ys = np.minimum(np.floor(np.arange(y0, y1) * (1.0 / (out_h / h))).astype(np.int64), h - 1)
    xs = np.minimum(np.floor(np.arange(x0, x1) * (1.0 / (out_w / w))).astype(np.int64), w - 1)
    return np.take(np.take(label, ys, axis=0), xs, axis=1)  # rows, then columns: 4x faster than one 2-D index


def random_crop_box(
    label: np.ndarray,
    crop_hw: tuple[int, int],
    rng: np.random.Generator,
    *,
    cat_max_ratio: float = CAT_MAX_RATIO,
    ignore_index: int = IGNORE_INDEX,
    tries: int = CROP_TRIES,
) -> tuple[int, int, int, int]:
    """Draws a crop box on ``label`` (mmseg ``RandomCrop`` with ``cat_max_ratio``).

    A box is drawn uniformly (offsets in [0, max(H - ch, 0)] and [0, max(W - cw, 0)]); while the crop does
    not contain more than one class (ignoring ``ignore_index``) with no class covering ``cat_max_ratio`` or
    more of the non-ignored pixels, it is redrawn, at most ``tries`` times; the last draw is kept unchecked.

    Args:
      label: (H, W) labels of the target frame, already resized.
      crop_hw: (ch, cw).
      rng: random generator (draws y then x offset per box).

    Returns:
      (y0, y1, x0, x1), clipped to the label size.
    """
    h, w = label.shape
    ch, cw = crop_hw

    def draw() -> tuple[int, int, int, int]:
        oy = int(rng.integers(0, max(h - ch, 0) + 1))
        ox = int(rng.integers(0, max(w - cw, 0) + 1))
        return oy, min(oy + ch, h), ox, min(ox + cw, w)

    box = draw()
    if cat_max_ratio < 1.0:
        for _ in range(tries):
            y0, y1, x0, x1 = box
            counts = _class_counts(label[y0:y1, x0:x1], ignore_index)
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            box = draw()
    return box


def _class_counts(label: np.ndarray, ignore_index: int) -> np.ndarray:
    """Pixel counts of the classes present in ``label``, ``ignore_index`` left out (in class order).

    uint8 labels (the training pipeline's) are counted with ``np.bincount``: 0.3 ms for a 480x480 crop, where
    ``np.unique`` sorts (2-6 ms).
    """
    if label.dtype == np.uint8:
        counts = np.bincount(label.ravel(), minlength=256)
        if 0 <= ignore_index < 256:
            counts[ignore_index] = 0
        return counts[counts > 0]
    values, counts = np.unique(label, return_counts=True)
    return counts[values != ignore_index]


# ----------------------------------------------------------------------------------------------------------
# Photometric distortion


def _convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


_HSV_SHIFT = 12
_SDIV = np.array([0] + [round((255 << _HSV_SHIFT) / i) for i in range(1, 256)], np.int32)
_HDIV = np.array([0] + [round((180 << _HSV_SHIFT) / (6.0 * i)) for i in range(1, 256)], np.int32)


def rgb_to_hsv(image: np.ndarray) -> np.ndarray:
    """OpenCV uint8 RGB -> HSV (H in [0, 180), S and V in [0, 255]).

    Args:
      image: (..., 3) uint8 RGB.

    Returns:
      (..., 3) uint8 HSV.
    """
    rgb = image.astype(np.int32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = np.maximum(np.maximum(r, g), b)
    diff = v - np.minimum(np.minimum(r, g), b)
    s = (diff * _SDIV[v] + (1 << (_HSV_SHIFT - 1))) >> _HSV_SHIFT
    hue = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    hue = (hue * _HDIV[diff] + (1 << (_HSV_SHIFT - 1))) >> _HSV_SHIFT
    hue = np.where(hue < 0, hue + 180, hue)
    return np.stack([hue, s, v], -1).astype(np.uint8)


# Which of (v, p, q, t) gives (r, g, b) in each hue sector (OpenCV's HSV2RGB table, in RGB order).
_SECTOR_RGB = np.array([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]])


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """OpenCV uint8 HSV (H in [0, 180)) -> RGB.

    The float32 formula ``h' = (6 h / 180) mod 6``, ``sector = floor(h')``, ``f = h' - sector``, the candidates
    (v, v(1 - s), v(1 - s f), v(1 - s (1 - f))) picked per sector, ``rint(255 x)``. Computed on flat pixel arrays
    with the candidates gathered by one flat index per channel (2.4x faster than ``np.choose``); the mod only when
    some H is >= 180 (below, it changes nothing). Checked equal to the direct formula on all 2^24 inputs.

    Args:
      hsv: (..., 3) uint8.

    Returns:
      (..., 3) uint8 RGB.
    """
    shape = hsv.shape[:-1]
    flat = hsv.reshape(-1, 3)
    h = flat[:, 0].astype(np.float32)
    h *= np.float32(6.0 / 180.0)
    if flat.shape[0] and flat[:, 0].max() >= 180:
        h = np.mod(h, np.float32(6.0))
    s = flat[:, 1].astype(np.float32)
    s *= np.float32(1.0 / 255.0)
    v = flat[:, 2].astype(np.float32)
    v *= np.float32(1.0 / 255.0)
    sector = h.astype(np.intp)  # h in [0, 6): truncation is the floor
    frac = h - sector.astype(np.float32)
    n = v.shape[0]
    candidates = np.empty((4, n), np.float32)  # v, p, q, t (with s = 0 all four are v)
    candidates[0] = v
    np.multiply(v, 1 - s, out=candidates[1])
    np.multiply(v, 1 - s * frac, out=candidates[2])
    np.multiply(v, 1 - s * (1 - frac), out=candidates[3])
    candidates = candidates.reshape(-1)
    pixel = np.arange(n)
    rgb = np.empty((n, 3), np.float32)
    for c in range(3):
        rgb[:, c] = candidates[_SECTOR_RGB[:, c][sector] * n + pixel]
    rgb *= np.float32(255.0)
    np.rint(rgb, out=rgb)
    np.clip(rgb, 0, 255, out=rgb)
    return rgb.astype(np.uint8).reshape(*shape, 3)


def photometric_distortion(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmseg ``PhotoMetricDistortion`` on one RGB frame.

    brightness + U(-32, 32) (p=.5); mode = randint(2); mode 1: contrast x U(.5, 1.5) (p=.5) now; saturation
    x U(.5, 1.5) in HSV (p=.5); hue + randint(-18, 18) mod 180 (p=.5); mode 0: contrast last. Every step
    clips to [0, 255] and truncates to uint8.

    Args:
      image: (H, W, 3) uint8 RGB.
      rng: random generator.

    Returns:
      (H, W, 3) uint8 RGB.
    """
    img = image
    if rng.integers(2):
        img = _convert(img, beta=rng.uniform(-32, 32))
    mode = rng.integers(2)

    def contrast(x: np.ndarray) -> np.ndarray:
        return _convert(x, alpha=rng.uniform(0.5, 1.5)) if rng.integers(2) else x

    if mode == 1:
        img = contrast(img)
    if rng.integers(2):
        hsv = rgb_to_hsv(img)
        hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(0.5, 1.5))
        img = hsv_to_rgb(hsv)
    if rng.integers(2):
        hsv = rgb_to_hsv(img)
        hsv[..., 0] = (hsv[..., 0].astype(np.int64) + rng.integers(-18, 18)) % 180
        img = hsv_to_rgb(hsv)
    if mode == 0:
        img = contrast(img)
    return img


# ----------------------------------------------------------------------------------------------------------
# Normalisation and the two pipelines


def normalize(image: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 RGB -> float32 ``(x - mean) / std`` with the ImageNet statistics.

    Computed on rows of ``W * 3`` values against the statistics tiled to that length: numpy's inner loops then run
    over whole rows instead of 3 channels (the same float32 operations, 3-4x faster).
    """
    if image.ndim < 2:
        return (image.astype(np.float32) - MEAN) / STD
    rows = image.reshape(-1, image.shape[-2] * image.shape[-1]).astype(np.float32)
    width = image.shape[-2]
    rows -= np.tile(MEAN, width)
    rows /= np.tile(STD, width)
    return rows.reshape(image.shape)


def pad_to(array: np.ndarray, hw: tuple[int, int], value: float) -> np.ndarray:
    """Pads the leading (H, W) axes of ``array`` at the bottom/right to ``hw`` with ``value``."""
    ph, pw = hw[0] - array.shape[0], hw[1] - array.shape[1]
    if ph < 0 or pw < 0:
        raise ValueError(f"cannot pad {array.shape[:2]} to smaller {hw}")
    if ph == 0 and pw == 0:
        return array
    widths = [(0, ph), (0, pw)] + [(0, 0)] * (array.ndim - 2)
    return np.pad(array, widths, constant_values=value)


def train_transform(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    rng: np.random.Generator,
    *,
    crop_size: tuple[int, int] = CROP_SIZE,
    img_scale: tuple[int, int] = IMG_SCALE,
    ratio_range: tuple[float, float] = RATIO_RANGE,
    cat_max_ratio: float = CAT_MAX_RATIO,
    flip_prob: float = 0.5,
    photometric: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """The training pipeline on one clip (same geometry for every frame, photometry per frame).

    Args:
      images: T frames (H, W, 3) uint8 RGB of one size, target last.
      labels: T labels (H, W) uint8 (reduced, 255 = ignore).
      rng: the record's random generator.
      crop_size: (ch, cw).
      img_scale: base scale, multiplied by a ratio drawn from ``ratio_range``.

    Returns:
      clip (T, ch, cw, 3) float32 normalised, labels (T, ch, cw) int32.
    """
    h, w = images[-1].shape[:2]
    ratio = rng.random() * (ratio_range[1] - ratio_range[0]) + ratio_range[0]
    scale = (int(img_scale[0] * ratio), int(img_scale[1] * ratio))
    new_wh = rescale_size((w, h), scale)
    box = random_crop_box(resize_nearest(labels[-1], new_wh), crop_size, rng, cat_max_ratio=cat_max_ratio)
    flip = rng.random() < flip_prob
    out_images, out_labels = [], []
    for image, label in zip(images, labels, strict=True):
        img = resize_bilinear(image, new_wh, box)
        lab = resize_nearest(label, new_wh, box)
        if flip:
            img, lab = img[:, ::-1], lab[:, ::-1]
        if photometric:
            img = photometric_distortion(img, rng)
        out_images.append(pad_to(normalize(img), crop_size, 0.0))
        out_labels.append(pad_to(lab, crop_size, IGNORE_INDEX))
    return np.stack(out_images), np.stack(out_labels).astype(np.int32)


def test_size(
    size_wh: tuple[int, int], img_scale: tuple[int, int] = IMG_SCALE, size_divisor: int = SIZE_DIVISOR
) -> tuple[int, int]:
    """Network input size (W', H') of a frame of size ``size_wh`` in the test pipeline."""
    w, h = rescale_size(size_wh, img_scale)
    return math.ceil(w / size_divisor) * size_divisor, math.ceil(h / size_divisor) * size_divisor


def test_resize(
    image: np.ndarray, *, img_scale: tuple[int, int] = IMG_SCALE, size_divisor: int = SIZE_DIVISOR
) -> np.ndarray:
    """The resizes of the test pipeline (``AlignedResize_clips``, no flip) on one frame: what
    :func:`test_transform` normalises.

    Keep-ratio rescale to fit ``img_scale``, then bilinear resize (not pad) of each side to the next multiple
    of ``size_divisor``: a 853x480 (W x H) frame becomes 864x480.

    Args:
      image: (H, W, 3) uint8 RGB.

    Returns:
      (H', W', 3) uint8 RGB. Evaluation hands it to the networks as it is: they normalise uint8 frames on the
      device (``cffm_jax.models.layers.normalize_images``, equal to :func:`normalize` to the bit).
    """
    h, w = image.shape[:2]
    rw, rh = rescale_size((w, h), img_scale)
    img = resize_bilinear(image, (rw, rh))
    aw, ah = math.ceil(rw / size_divisor) * size_divisor, math.ceil(rh / size_divisor) * size_divisor
    return resize_bilinear(img, (aw, ah))


def test_transform(
    image: np.ndarray, *, img_scale: tuple[int, int] = IMG_SCALE, size_divisor: int = SIZE_DIVISOR
) -> np.ndarray:
    """The test pipeline (``AlignedResize_clips``, no flip) on one frame: :func:`test_resize`, then normalise.

    Args:
      image: (H, W, 3) uint8 RGB.

    Returns:
      (H', W', 3) float32.
    """
    return normalize(test_resize(image, img_scale=img_scale, size_divisor=size_divisor))

"""Colours and image files for segmentation outputs: palette, colour masks, overlays, PNG and GIF writers.

Label conventions (SPEC.md section 10.1). The model predicts class ids 0..K-1 (K = 124 for VSPW). VSPW mask
files hold *raw* values: 0 = 'others' (ignored), v = class v - 1, 255 = ignored. Prediction files in the VSPW
submission layout (``cffm_jax.evaluate --predictions-out``) therefore store ``class id + 1``
(:func:`ids_to_raw`), so they map back to class ids through the same reduce-zero-label rule as the ground
truth (:func:`cffm_jax.data.vspw.reduce_zero_label`). Colours are indexed by raw value everywhere (the palette
of the PNG files and :func:`colorize`), so class c has the colour ``palette()[c + 1]`` in every output; raw 0
is black.

The palette is the PASCAL VOC bit-interleaving colour map (index i spreads the bits of i over the high bits of
R, G and B), a common choice for label PNGs: neighbouring indices get clearly different colours.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

NUM_COLORS = 256


def palette(num_colors: int = NUM_COLORS) -> np.ndarray:
    """The VOC colour map: (num_colors, 3) uint8; index 0 is black.

    Index i: for bit position j = 0..7 (from the most significant output bit down), R takes bit 3j of i,
    G bit 3j + 1 and B bit 3j + 2.
    """
    index = np.arange(num_colors)
    rgb = np.zeros((num_colors, 3), np.int64)
    for j in range(8):
        for channel in range(3):
            bit = (index >> (3 * j + channel)) & 1
            rgb[:, channel] |= bit << (7 - j)
    return rgb.astype(np.uint8)


_PALETTE = palette()


def ids_to_raw(ids: np.ndarray) -> np.ndarray:
    """Class ids (H, W) in 0..254 -> raw mask values id + 1 as uint8 (the VSPW file convention)."""
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() > 253):
        raise ValueError(f"class ids must be in 0..253 to be stored as raw values id + 1, got {ids.min()}..{ids.max()}")
    return (ids.astype(np.int32) + 1).astype(np.uint8)


def _colors_of(ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids).astype(np.int64)
    raw = np.where(ids == 255, 255, ids + 1)
    return _PALETTE[np.clip(raw, 0, NUM_COLORS - 1)]


_UINT8_COLORS = _colors_of(np.arange(256))  # the colour of every uint8 id (1080p: 33 -> 8 ms with np.take)


def colorize(ids: np.ndarray) -> np.ndarray:
    """Class ids (H, W) -> (H, W, 3) uint8 colours: class c gets ``palette()[c + 1]``, 255 gets index 255."""
    ids = np.asarray(ids)
    return np.take(_UINT8_COLORS, ids, axis=0) if ids.dtype == np.uint8 else _colors_of(ids)


def overlay(image: np.ndarray, colors: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blends a colour mask over a frame: (1 - alpha) * image + alpha * colors.

    Args:
      image: (H, W, 3) uint8 RGB frame.
      colors: (H, W, 3) uint8 colour mask of the same size.
      alpha: weight of the mask.
    Returns:
      (H, W, 3) uint8.
    """
    if image.shape != colors.shape:
        raise ValueError(f"frame shape {image.shape} != mask shape {colors.shape}")
    out = (1.0 - alpha) * image.astype(np.float32) + alpha * colors.astype(np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def save_palette_png(path: str | os.PathLike, raw: np.ndarray) -> None:
    """Writes (H, W) uint8 raw values as an indexed PNG with the palette (the values are preserved)."""
    raw = np.asarray(raw)
    if raw.ndim != 2:
        raise ValueError(f"expected an (H, W) mask, got shape {raw.shape}")
    im = Image.fromarray(raw.astype(np.uint8), mode="P")
    im.putpalette(_PALETTE.reshape(-1).tolist())
    im.save(path, format="PNG")


def save_gray_png(path: str | os.PathLike, values: np.ndarray) -> None:
    """Writes (H, W) uint8 values as a greyscale PNG (e.g. raw class ids)."""
    Image.fromarray(np.asarray(values).astype(np.uint8), mode="L").save(path, format="PNG")


def save_rgb_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Writes an (H, W, 3) uint8 image as PNG."""
    Image.fromarray(np.asarray(image, np.uint8), mode="RGB").save(path, format="PNG")


def thumbnail(image: np.ndarray, max_side: int) -> np.ndarray:
    """Downscales (H, W, 3) uint8 so that its longer side is at most ``max_side`` (no upscaling)."""
    h, w = image.shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1:
        return image
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))


def save_gif(path: str | os.PathLike, frames: Sequence[np.ndarray], fps: float = 10.0) -> None:
    """Writes (H, W, 3) uint8 frames as an endlessly looping animated GIF."""
    if not frames:
        raise ValueError("an animated GIF needs at least one frame")
    images = [Image.fromarray(np.asarray(f, np.uint8)) for f in frames]
    duration = max(20, round(1000.0 / fps))
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:], duration=duration, loop=0)

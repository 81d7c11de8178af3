"""Synthetic VSPW-layout video dataset: default data of demos, tests and benchmarks (SPEC.md section 10.1).

``python -m cffm_jax.data.synthetic --out DIR [--videos N --frames F --size HxW --seed S]`` writes::

    DIR/{train,val,test}.txt                 (not for a split of 0 videos)
    DIR/data/<video>/origin/<frame>.jpg     JPEG frames
    DIR/data/<video>/mask/<frame>.png       palette PNG masks with *raw* VSPW values

Scenes: two textured background classes (raw labels 1 and 2) split by a wavy horizon that pans slowly,
a few moving, rotating, mutually occluding textured shapes of the other classes (raw 3..K), a
grey noisy blob labelled 0 ('others', ignored after ``reduce_zero_label``), and thin 255 (ignore) bands
along the inside of some object outlines. Every class has its own hue AND its own texture (stripes, checker,
dots, waves, grid, rings, blotches), identical across videos up to a small per-video jitter, so a tiny model
can learn it in minutes; motion is smooth, so temporal context helps. Output is deterministic for a seed.
By default the test split has no masks, like VSPW.
"""

from __future__ import annotations

import argparse
import colorsys
import dataclasses
import io
import os

import numpy as np
from PIL import Image

DEFAULT_NUM_CLASSES = 6  # raw labels 0..6: 0 = others, 1..2 backgrounds, 3..6 objects.
_PATTERNS = ("stripes", "checker", "dots", "waves", "grid", "rings", "blotches")


def _class_style(c: int, num_classes: int) -> tuple[float, str, float, float]:
    """(hue in [0, 1), pattern, period factor, orientation) of raw class c >= 1 — fixed for all videos."""
    hue = ((c - 1) / num_classes + 0.07) % 1.0
    pattern = _PATTERNS[(c - 1) % len(_PATTERNS)]
    period = 1.0 + 0.35 * ((c * 7) % 4)
    angle = (c * 0.9) % np.pi
    return hue, pattern, period, angle


def _pattern(name: str, u: np.ndarray, v: np.ndarray, period: float, phase: np.ndarray) -> np.ndarray:
    """A texture value in [0, 1] at local coordinates (u, v) (pixels), period in pixels."""
    tau = 2 * np.pi
    if name == "stripes":
        return 0.5 + 0.5 * np.sin(tau * u / period + phase[0])
    if name == "checker":
        return ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    if name == "dots":
        du = (u / period) % 1.0 - 0.5
        dv = (v / period) % 1.0 - 0.5
        return (du * du + dv * dv < 0.09).astype(np.float32)
    if name == "waves":
        return 0.5 + 0.5 * np.sin(tau * (u + 0.35 * period * np.sin(tau * v / (2 * period))) / period)
    if name == "grid":
        du = np.abs((u / period) % 1.0 - 0.5)
        dv = np.abs((v / period) % 1.0 - 0.5)
        return ((du > 0.36) | (dv > 0.36)).astype(np.float32)
    if name == "rings":
        return 0.5 + 0.5 * np.sin(tau * np.sqrt(u * u + v * v) / period + phase[0])
    if name == "blotches":
        x = np.sin(u / period * 1.7 + phase[0]) + np.sin(v / period * 2.3 + phase[1])
        x = x + np.sin((u + v) / period * 1.1 + phase[2])
        return (x > 0.4).astype(np.float32) * 0.8 + 0.1
    raise ValueError(f"unknown pattern {name!r}; valid: {_PATTERNS}")


def _texture(c: int, num_classes: int, u: np.ndarray, v: np.ndarray, unit: float, jitter: np.ndarray) -> np.ndarray:
    """(..., 3) float RGB in [0, 1] of raw class c (0 = grey 'others') at local pixel coordinates (u, v)."""
    if c == 0:
        val = 0.5 + 0.25 * np.sin(u / (1.3 * unit) + jitter[0]) * np.sin(v / (0.9 * unit) + jitter[1])
        return np.repeat(val[..., None], 3, -1).astype(np.float32)
    hue, pattern, period, angle = _class_style(c, num_classes)
    a = angle + 0.25 * (jitter[3] - 0.5)
    ru = u * np.cos(a) - v * np.sin(a)
    rv = u * np.sin(a) + v * np.cos(a)
    p = _pattern(pattern, ru, rv, period * 6.0 * unit, jitter[:3] * 2 * np.pi)
    hue = hue + 0.04 * (jitter[4] - 0.5)
    dark = np.array(colorsys.hsv_to_rgb(hue % 1.0, 0.55, 0.35), np.float32)
    light = np.array(colorsys.hsv_to_rgb((hue + 0.05) % 1.0, 0.9, 0.95), np.float32)
    return dark + p[..., None].astype(np.float32) * (light - dark)


@dataclasses.dataclass
class _Shape:
    cls: int
    kind: str  # ellipse, rectangle, diamond
    center: np.ndarray  # (2,) y, x at frame 0
    velocity: np.ndarray  # (2,) pixels per frame
    radii: np.ndarray  # (2,)
    angle: float
    spin: float
    outline: bool
    jitter: np.ndarray


def _bounce(x0: float, v: float, t: int, lo: float, hi: float) -> float:
    """Position at time t of a point moving at speed v reflected inside [lo, hi]."""
    span = hi - lo
    x = (x0 - lo + v * t) % (2 * span)
    return lo + (x if x <= span else 2 * span - x)


def _render_video(
    rng: np.random.Generator, frames: int, size: tuple[int, int], num_classes: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Returns per-frame (H, W, 3) uint8 images and (H, W) uint8 raw masks."""
    h, w = size
    unit = min(h, w) / 120.0
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    bg_top, bg_bottom = (1, 2) if rng.random() < 0.7 else (2, 1)
    horizon = h * rng.uniform(0.35, 0.6)
    wave_amp, wave_len = h * rng.uniform(0.02, 0.08), w * rng.uniform(0.4, 1.0)
    pan = rng.uniform(-1.5, 1.5, size=2) * unit
    bg_jitter = rng.random((2, 5))
    shapes = []
    object_classes = list(range(3, num_classes + 1)) or [1]
    for _ in range(int(rng.integers(2, 5))):
        radius = rng.uniform(0.12, 0.3) * min(h, w)
        shapes.append(
            _Shape(
                cls=int(rng.choice(object_classes)),
                kind=str(rng.choice(["ellipse", "rectangle", "diamond"])),
                center=np.array([rng.uniform(0.2, 0.8) * h, rng.uniform(0.15, 0.85) * w]),
                velocity=rng.uniform(-1, 1, size=2) * np.array([0.012 * h, 0.02 * w]),
                radii=np.array([radius, radius * rng.uniform(0.6, 1.6)]),
                angle=rng.uniform(0, np.pi),
                spin=rng.uniform(-0.04, 0.04),
                outline=bool(rng.random() < 0.5),
                jitter=rng.random(5),
            )
        )
    others = _Shape(
        cls=0,
        kind="ellipse",
        center=np.array([rng.uniform(0.2, 0.8) * h, rng.uniform(0.1, 0.9) * w]),
        velocity=rng.uniform(-0.5, 0.5, size=2) * unit,
        radii=np.array([0.1, 0.16]) * min(h, w) * rng.uniform(0.7, 1.3),
        angle=rng.uniform(0, np.pi),
        spin=0.0,
        outline=False,
        jitter=rng.random(5),
    )
    shapes.insert(int(rng.integers(0, len(shapes) + 1)), others)
    noise_rng = np.random.default_rng(rng.integers(2**32))
    images, masks = [], []
    for t in range(frames):
        gu, gv = xx + pan[1] * t, yy + pan[0] * t
        top = yy < horizon + wave_amp * np.sin(2 * np.pi * gu / wave_len)
        label = np.where(top, bg_top, bg_bottom).astype(np.uint8)
        image = np.where(
            top[..., None],
            _texture(bg_top, num_classes, gu, gv, unit, bg_jitter[0]),
            _texture(bg_bottom, num_classes, gu, gv, unit, bg_jitter[1]),
        )
        for s in shapes:
            cy = _bounce(s.center[0], s.velocity[0], t, 0.1 * h, 0.9 * h)
            cx = _bounce(s.center[1], s.velocity[1], t, 0.05 * w, 0.95 * w)
            a = s.angle + s.spin * t
            r = float(s.radii.max()) * 1.5 + 1
            y0, y1 = max(int(cy - r), 0), min(int(cy + r) + 1, h)
            x0, x1 = max(int(cx - r), 0), min(int(cx + r) + 1, w)
            if y0 >= y1 or x0 >= x1:
                continue
            du, dv = xx[y0:y1, x0:x1] - cx, yy[y0:y1, x0:x1] - cy
            u = du * np.cos(a) + dv * np.sin(a)
            v = -du * np.sin(a) + dv * np.cos(a)
            nu, nv = u / s.radii[1], v / s.radii[0]
            if s.kind == "ellipse":
                f = np.sqrt(nu * nu + nv * nv)
            elif s.kind == "rectangle":
                f = np.maximum(np.abs(nu), np.abs(nv))
            else:
                f = np.abs(nu) + np.abs(nv)
            inside = f <= 1.0
            image_box, label_box = image[y0:y1, x0:x1], label[y0:y1, x0:x1]
            image_box[inside] = _texture(s.cls, num_classes, u, v, unit, s.jitter)[inside]
            label_box[inside] = s.cls
            if s.outline:
                label_box[inside & (f > 1.0 - 1.5 / float(s.radii.min()))] = 255
        image = image * 255.0 + noise_rng.normal(0.0, 3.0, image.shape)
        images.append(np.clip(np.rint(image), 0, 255).astype(np.uint8))
        masks.append(label)
    return images, masks


def _palette() -> list[int]:
    rng = np.random.default_rng(1234)
    pal = rng.integers(0, 256, size=(256, 3))
    pal[0] = 0
    pal[255] = 255
    return pal.astype(np.uint8).reshape(-1).tolist()


def encode_jpeg(image: np.ndarray, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_mask(mask: np.ndarray) -> bytes:
    """(H, W) uint8 raw mask -> palette PNG bytes (indices preserved)."""
    im = Image.fromarray(mask)
    im.putpalette(_palette())
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def generate(
    out_dir: str,
    *,
    videos: int = 8,
    val_videos: int = 3,
    test_videos: int = 2,
    frames: int = 24,
    size: tuple[int, int] = (120, 200),
    seed: int = 0,
    num_classes: int = DEFAULT_NUM_CLASSES,
    test_masks: bool = False,
) -> str:
    """Writes a synthetic dataset in the VSPW layout.

    Args:
      out_dir: output folder (created; existing files of the same names are overwritten).
      videos, val_videos, test_videos: number of videos per split; a split of 0 videos gets no split file.
      frames: frames per video.
      size: (H, W) of the frames.
      seed: generation seed (output is deterministic for a seed).
      num_classes: raw labels are 0 ('others'), 1..num_classes and 255; needs num_classes >= 2.
      test_masks: also write masks for the test split (VSPW has none).

    Returns:
      ``out_dir``.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (two background classes), got {num_classes}")
    os.makedirs(out_dir, exist_ok=True)
    counts = {"train": videos, "val": val_videos, "test": test_videos}
    index = 0
    for split, count in counts.items():
        names = []
        for _ in range(count):
            name = f"{index:03d}_syn_{split}"
            names.append(name)
            rng = np.random.default_rng([seed, index])
            images, masks = _render_video(rng, frames, tuple(size), num_classes)
            origin = os.path.join(out_dir, "data", name, "origin")
            os.makedirs(origin, exist_ok=True)
            write_masks = split != "test" or test_masks
            if write_masks:
                os.makedirs(os.path.join(out_dir, "data", name, "mask"), exist_ok=True)
            for t, (image, mask) in enumerate(zip(images, masks, strict=True)):
                with open(os.path.join(origin, f"{t:08d}.jpg"), "wb") as f:
                    f.write(encode_jpeg(image))
                if write_masks:
                    with open(os.path.join(out_dir, "data", name, "mask", f"{t:08d}.png"), "wb") as f:
                        f.write(encode_mask(mask))
            index += 1
        # A split of 0 videos gets no file (and loses one of an earlier run into out_dir): the dataset has no such
        # split, and an empty split file is an error to a reader asking for it (``read_split``).
        path = os.path.join(out_dir, f"{split}.txt")
        if names:
            with open(path, "w", encoding="utf-8") as f:
                f.write("".join(n + "\n" for n in names))
        elif os.path.exists(path):
            os.remove(path)
    return out_dir


def _parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(x) for x in text.lower().split("x"))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"size must be HxW, e.g. 120x200, got {text!r}") from e
    return h, w


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--videos", type=int, default=8, help="train videos")
    parser.add_argument("--val-videos", type=int, default=3)
    parser.add_argument("--test-videos", type=int, default=2)
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--size", type=_parse_size, default=(120, 200), help="HxW, e.g. 480x853")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-classes", type=int, default=DEFAULT_NUM_CLASSES)
    parser.add_argument("--test-masks", action="store_true", help="also write test masks")
    args = parser.parse_args(argv)
    generate(
        args.out,
        videos=args.videos,
        val_videos=args.val_videos,
        test_videos=args.test_videos,
        frames=args.frames,
        size=args.size,
        seed=args.seed,
        num_classes=args.num_classes,
        test_masks=args.test_masks,
    )
    total = args.videos + args.val_videos + args.test_videos
    print(f"wrote {total} videos x {args.frames} frames ({args.size[0]}x{args.size[1]}) to {args.out}")  # noqa: T201


if __name__ == "__main__":
    main()

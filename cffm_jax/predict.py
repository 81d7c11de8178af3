"""Segment your own video with a CFFM / CFFM++ checkpoint (the test protocol of SPEC.md sections 7 and 10).

    python -m cffm_jax.predict --checkpoint PATH [--model NAME] [--num-classes K] --input VIDEO_OR_FRAME_DIR
        --output DIR [--img-scale W H] [--prototypes DIR] [--batch-size N] [--overwrite] [--no-streaming]

Input: a folder of frames (``.jpg``/``.jpeg``/``.png``/``.bmp``/``.webp`` in natural order of their names:
``frame2`` before ``frame10``; hidden files skipped; EXIF orientation applied; 16-bit PNGs read by their top 8
bits), an animated GIF / WebP / APNG (read with Pillow), or a video file (``.mp4``, ``.avi``, ...; read with PyAV,
the ``av`` package: ``pip install av``). All frames must have the same size. Frames are processed in temporal
order with the streaming feature cache (``cffm_jax.streaming``): frames 0-2 without temporal context, then the
official clips [t-9, t-6, t-3, t] (the special sets for t < 9), at the test size (rescale to fit
``img_scale``, default 853x480, sides to multiples of 32), predictions at the original frame size.

CFFM++ needs the video's prototypes: from a prototype store (``--prototypes DIR``, looked up by the video name
= the folder name or the file name without extension) or, by default, computed on the fly as the official
generator does (SPEC section 6): the 1/8 features of 10 evenly spaced frames, k-means with K = 100, initialised with
the video's own key (``--prototype-seed`` and the video name), so they equal ``python -m cffm_jax.prototypes``' store.

Output (written into ``.DIR.partial`` and renamed to ``DIR`` when everything is written)::

    DIR/labels/<frame>.png    class ids 0..K-1 as 8-bit greyscale
    DIR/masks/<frame>.png     colour-coded masks (class c -> cffm_jax.visualize.palette()[c + 1])
    DIR/overlay/<frame>.png   the masks blended over the frames
    DIR/preview.gif           animated overlay preview (at most 200 frames, long side <= 480 pixels)
    DIR/manifest.json         checkpoint, model, input, frame names, settings

``<frame>`` is the frame's file name without extension, or its 6-digit index for a video file.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, ImageSequence, UnidentifiedImageError
from tqdm import tqdm

from cffm_jax import compilation_cache, host_memory
from cffm_jax.checkpoint import default_img_scale
from cffm_jax.data.pipeline import EvalFrame
from cffm_jax.data.transforms import IMG_SCALE, test_resize
from cffm_jax.logging_utils import check_output_folder
from cffm_jax.visualize import colorize, overlay, save_gif, save_gray_png, save_rgb_png, thumbnail

log = logging.getLogger("cffm_jax.predict")  # the same name under python -m

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
PIL_ANIMATIONS = ("GIF", "WEBP", "PNG")
PREVIEW_MAX_FRAMES = 200
PREVIEW_MAX_SIDE = 480
MANIFEST = "manifest.json"


class InputError(ValueError):
    """The input video or frame folder cannot be used; the message names the file and the problem."""


# ---------------------------------------------------------------------------------------------------------
# Inputs: a folder of frames, an animated image (Pillow) or a video file (PyAV).


class FrameReader:
    """A video as frames: ``name``, ``frame_names`` and :meth:`iterate` over (H, W, 3) uint8 RGB frames."""

    name: str
    frame_names: list[str]

    @property
    def num_frames(self) -> int:
        return len(self.frame_names)

    def iterate(self, indices: Sequence[int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yields (index, frame) in temporal order, for all frames or only ``indices``."""
        raise NotImplementedError

    def read(self, indices: Sequence[int]) -> list[np.ndarray]:
        """The frames at ``indices`` (repeats allowed), in the given order."""
        frames = dict(self.iterate(sorted(set(indices))))
        return [frames[i] for i in indices]


def _rgb(image: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a frame, upright (EXIF orientation applied, as image viewers show phone pictures).

    16-bit greyscale frames keep their top 8 bits (PIL's own conversion clips them to 255: all white); other
    greyscale images of more than 8 bits (32-bit integer or float) have no one 8-bit reading and are refused.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I;16"):
        return np.repeat((np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)[..., None], 3, axis=-1)
    if image.mode in ("I", "F"):
        raise ValueError(f"{image.mode!r} images (32-bit greyscale) are not frames: save them as 8 or 16 bits")
    return np.asarray(image.convert("RGB"), np.uint8)


def _natural_key(name: str) -> list:
    """Sort key that orders numbers by value: ``2.png`` before ``10.png`` (zero-padded names sort as before)."""
    return [(0, int(part), part) if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


class FolderFrames(FrameReader):
    """Image files of a folder in natural order of their names (numbers by value: ``frame2`` before ``frame10``);
    hidden files (``.`` first, e.g. macOS ``._000.png``) are not frames."""

    def __init__(self, path: Path):
        self.path = path
        files = sorted(
            (p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and p.name[0] != "."),
            key=lambda p: _natural_key(p.name),
        )
        if not files:
            raise InputError(f"{path}: no frames found (expected image files: {', '.join(IMAGE_SUFFIXES)})")
        stems = [p.stem for p in files]
        if len(set(stems)) != len(stems):
            dupes = sorted({s for s in stems if stems.count(s) > 1})
            raise InputError(f"{path}: several frames share a name: {', '.join(dupes[:5])}")
        self.files = files
        # A VSPW-layout video folder <video>/origin is named after <video> (e.g. for prototype store lookups).
        self.name = path.resolve().parent.name if path.name == "origin" else path.name
        self.frame_names = stems

    def iterate(self, indices: Sequence[int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
        for t in range(self.num_frames) if indices is None else indices:
            try:
                with Image.open(self.files[t]) as im:
                    yield t, _rgb(im)
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
                raise InputError(f"{self.files[t]}: cannot read frame: {e}") from e


class AnimatedImageFrames(FrameReader):
    """An animated GIF / WebP / APNG (or a single still image) read with Pillow."""

    def __init__(self, path: Path, num_frames: int):
        self.path = path
        self.name = path.stem
        self.frame_names = [f"{t:06d}" for t in range(num_frames)]

    def iterate(self, indices: Sequence[int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
        wanted = None if indices is None else set(indices)
        try:
            with Image.open(self.path) as im:
                for t, frame in enumerate(ImageSequence.Iterator(im)):
                    if wanted is None or t in wanted:
                        yield t, _rgb(frame)
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise InputError(f"{self.path}: cannot decode frame: {e}") from e


def _import_av():
    try:
        import av
    except ImportError as e:
        raise InputError(
            "reading video files needs PyAV, which is not installed: pip install av (or extract the frames "
            "to a folder, e.g. ffmpeg -i video.mp4 frames/%06d.png, and pass the folder)"
        ) from e
    return av


class VideoFileFrames(FrameReader):
    """A video file decoded with PyAV (the first video stream). Opening it counts the frames (one decode), and warns
    when they fall short of what the file's header announces (a truncated or damaged file decodes without an error,
    as far as it goes: half of a Matroska file gave 9 of its 30 frames)."""

    def __init__(self, path: Path):
        self.path = path
        self.name = path.stem
        self._announced: int | None = None
        self.frame_names = [f"{t:06d}" for t in range(sum(1 for _ in self._decode()))]
        if not self.frame_names:
            raise InputError(f"{path}: the video has no frames")
        announced = self._announced
        if announced is not None and announced - self.num_frames > max(2, 0.05 * announced):
            log.warning(
                "%s: decoded %d frames, but its header announces %d: the file may be truncated or damaged; the "
                "predictions cover the %d frames decoded",
                path,
                self.num_frames,
                announced,
                self.num_frames,
            )

    def _decode(self) -> Iterator[Any]:
        av = _import_av()
        try:
            with av.open(str(self.path)) as container:
                if not container.streams.video:
                    raise InputError(f"{self.path}: no video stream")
                self._announced = _announced_frames(container, av.time_base)
                yield from container.decode(video=0)
        except (av.error.FFmpegError, OSError) as e:
            raise InputError(f"{self.path}: cannot decode video: {e}") from e

    def iterate(self, indices: Sequence[int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
        wanted = None if indices is None else set(indices)
        for t, frame in enumerate(self._decode()):
            if wanted is None or t in wanted:
                yield t, frame.to_ndarray(format="rgb24")
            if wanted is not None and t >= max(wanted):
                return


def _announced_frames(container: Any, time_base: int) -> int | None:
    """The frame count a video file's header gives for its first video stream: the stream's own count, else the
    container's duration times the stream's average frame rate; None when it gives neither."""
    stream = container.streams.video[0]
    if stream.frames:
        return int(stream.frames)
    if container.duration and stream.average_rate:
        return round(container.duration / time_base * float(stream.average_rate))
    return None


def open_input(path: str | os.PathLike) -> FrameReader:
    """Opens a folder of frames, an animated image or a video file (see the module docstring).

    Raises:
      InputError: the path does not exist, holds no frames, or cannot be decoded.
    """
    path = Path(path)
    if path.is_dir():
        return FolderFrames(path)
    if not path.is_file():
        raise InputError(f"{path}: input not found (expected a video file or a folder of frames)")
    try:
        with Image.open(path) as im:
            if im.format in PIL_ANIMATIONS or path.suffix.lower() in IMAGE_SUFFIXES:
                return AnimatedImageFrames(path, getattr(im, "n_frames", 1))
    except UnidentifiedImageError as e:
        if path.suffix.lower() in IMAGE_SUFFIXES + (".gif",):
            raise InputError(f"{path}: cannot read image: {e}") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{path}: cannot read image: {e}") from e
    return VideoFileFrames(path)


# ---------------------------------------------------------------------------------------------------------
# Prediction.


@dataclasses.dataclass(frozen=True)
class _UserFrame(EvalFrame):
    """An :class:`EvalFrame` that also carries the original RGB frame and its output name."""

    rgb: np.ndarray | None = None
    name: str = ""


def _frames(reader: FrameReader, img_scale: tuple[int, int], num_loaders: int) -> Iterator[_UserFrame]:
    """The frames through the test transform, in order: decoded in a background thread, transformed on
    ``num_loaders`` threads."""
    from cffm_jax.streaming import ordered_map, prefetch

    def transform(item: tuple[int, np.ndarray]) -> _UserFrame:
        t, rgb = item
        image = test_resize(rgb, img_scale=img_scale)
        return _UserFrame(image, None, (rgb.shape[0], rgb.shape[1]), rgb=rgb, name=reader.frame_names[t])

    return ordered_map(transform, prefetch(reader.iterate()), num_loaders)


def load_model(checkpoint: str, model: str | None = None, num_classes: int | None = None):
    """(variables, model config) of a CFFM / CFFM++ checkpoint, checked against ``--model``/``--num-classes``.

    Raises:
      cffm_jax.checkpoint.CheckpointError: the checkpoint holds another model or class count.
    """
    from cffm_jax.checkpoint import CheckpointError, check_video_model, load_for_inference
    from cffm_jax.models import model_config

    expected = None
    if model is not None:
        expected = model_config(model, **({} if num_classes is None else {"num_classes": num_classes}))
    variables, config = load_for_inference(checkpoint, model=expected)
    check_video_model(config, checkpoint)
    if num_classes is not None and config.num_classes != num_classes:
        raise CheckpointError(
            f"{checkpoint} predicts {config.num_classes} classes, but --num-classes {num_classes} was given"
        )
    return variables, config


OUTPUTS = ("labels", "masks", "overlay", "preview.gif", MANIFEST)  # what predict_video writes into its folder


def _is_predict_output(folder: Path) -> bool:
    """Whether ``folder`` holds an earlier output of :func:`predict_video` and nothing else."""
    names = {p.name for p in folder.iterdir()}
    return MANIFEST in names and names <= set(OUTPUTS)


def video_prototypes(segmenter, reader: FrameReader, img_scale: tuple[int, int], seed: int) -> np.ndarray:
    """CFFM++ prototypes of a user's video on the fly: those ``python -m cffm_jax.prototypes`` would store for a
    video of this name with this seed (and ``evaluate --prototypes auto`` computes): the official frames, the
    video's own k-means key."""
    from cffm_jax.prototype_store import prototype_frame_indices
    from cffm_jax.streaming import compute_prototypes

    images = [test_resize(f, img_scale=img_scale) for f in reader.read(prototype_frame_indices(reader.num_frames))]
    return compute_prototypes(segmenter, images, seed=seed, video=reader.name)


def predict_video(
    reader: FrameReader,
    segmenter,
    out_dir: str | os.PathLike,
    *,
    img_scale: tuple[int, int] = IMG_SCALE,
    prototypes: np.ndarray | None = None,
    streaming: bool = True,
    overwrite: bool = False,
    alpha: float = 0.5,
    fps: float = 10.0,
    progress: bool = True,
    manifest: dict[str, Any] | None = None,
    num_loaders: int | None = None,
) -> Path:
    """Segments every frame of ``reader`` and writes the outputs listed in the module docstring.

    Args:
      reader: the input frames (:func:`open_input`).
      segmenter: a :class:`cffm_jax.streaming.VideoSegmenter`.
      out_dir: output folder (must not exist or be empty, unless ``overwrite``).
      img_scale: test rescale bound (W, H).
      prototypes: (Kp, E) prototypes for CFFM++.
      streaming: feature-cache streaming (default) or the clip-by-clip reference.
      overwrite: replace a non-empty ``out_dir`` that holds an earlier output of this function (and nothing else).
      alpha: mask weight in the overlays.
      fps: frame rate of the preview GIF.
      progress: show a progress bar.
      manifest: extra entries for ``manifest.json``.
      num_loaders: threads transforming frames ahead of the model (default
        :func:`cffm_jax.streaming.loader_threads`: min(8, CPU count)).
    Returns:
      the output folder.
    """
    from cffm_jax import streaming as streaming_lib

    out = Path(out_dir)
    check_output_folder(out, overwrite, _is_predict_output)
    tmp = out.with_name(f".{out.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    for sub in ("labels", "masks", "overlay"):
        (tmp / sub).mkdir(parents=True)
    every = max(1, math.ceil(reader.num_frames / PREVIEW_MAX_FRAMES))
    preview: list[np.ndarray] = []
    threads = num_loaders or streaming_lib.loader_threads()

    def write(frame: _UserFrame, ids: np.ndarray, with_thumbnail: bool) -> np.ndarray | None:
        """The frame's three PNGs (an overlay PNG of a 1080p frame takes 0.2-0.5 s to encode); its preview image."""
        colors = colorize(ids)
        blended = overlay(frame.rgb, colors, alpha)
        save_gray_png(tmp / "labels" / f"{frame.name}.png", ids)
        save_rgb_png(tmp / "masks" / f"{frame.name}.png", colors)
        save_rgb_png(tmp / "overlay" / f"{frame.name}.png", blended)
        return thumbnail(blended, PREVIEW_MAX_SIDE) if with_thumbnail else None

    pool = concurrent.futures.ThreadPoolExecutor(max(2, threads), thread_name_prefix="png")
    futures: collections.deque[concurrent.futures.Future] = collections.deque()
    try:
        frames = _frames(reader, tuple(img_scale), threads)
        results = segmenter.segment(frames, prototypes, streaming=streaming)
        for result in tqdm(results, total=reader.num_frames, unit="frame", disable=not progress, desc="predict"):
            ids = np.asarray(result.pred)
            futures.append(pool.submit(write, result.frame, ids, result.index % every == 0))
            while len(futures) > 4 * max(2, threads) or (futures and futures[0].done()):
                if (image := futures.popleft().result()) is not None:  # in frame order
                    preview.append(image)
        for future in futures:
            if (image := future.result()) is not None:
                preview.append(image)
        save_gif(tmp / "preview.gif", preview, fps=fps / every)
        info = {
            **(manifest or {}),
            "num_frames": reader.num_frames,
            "frame_names": reader.frame_names,
            "img_scale": list(img_scale),
            "streaming": streaming,
            "labels": "class ids 0..K-1 (8-bit greyscale PNG)",
            "masks": "colours: cffm_jax.visualize.palette()[class id + 1]",
        }
        (tmp / MANIFEST).write_text(json.dumps(info, indent=2) + "\n")
    except BaseException:
        pool.shutdown(cancel_futures=True)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pool.shutdown()
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cffm_jax.predict",
        description="Segment a video (file or folder of frames) with a CFFM/CFFM++ checkpoint.",
        allow_abbrev=False,
    )
    parser.add_argument("--checkpoint", required=True, help="weights dir, training workdir or raw .pth")
    parser.add_argument("--model", help="expected model name (e.g. cffm_b1); required for a raw .pth")
    parser.add_argument("--num-classes", type=int, help="expected number of classes (default: the model's)")
    parser.add_argument(
        "--input",
        required=True,
        help="video file, animated GIF/WebP, or folder of frames (natural name order: 2.png before 10.png)",
    )
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument(
        "--img-scale",
        nargs=2,
        type=int,
        metavar=("W", "H"),
        help="test rescale bound (default: a training workdir's own, else the official 853 480)",
    )
    parser.add_argument("--prototypes", help="CFFM++: prototype store dir (default: computed on the fly)")
    parser.add_argument("--prototype-seed", type=int, default=0, help="k-means seed for on-the-fly prototypes")
    parser.add_argument("--batch-size", type=int, help="frames per batch (multiple of the device count)")
    parser.add_argument("--loader-threads", type=int, help="threads transforming frames (default min(8, CPU count))")
    parser.add_argument("--no-streaming", action="store_true", help="clip-by-clip reference instead of streaming")
    parser.add_argument("--alpha", type=float, default=0.5, help="mask opacity in the overlays")
    parser.add_argument("--fps", type=float, default=10.0, help="frame rate of preview.gif")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> Path:
    """Runs the command line (module docstring); returns the output folder. Errors raise exceptions."""
    from cffm_jax.prototype_store import PrototypeStore, prototype_frame_indices
    from cffm_jax.streaming import VideoSegmenter

    args = _parser().parse_args(argv)
    host_memory.retain_freed_memory()  # before jax starts its threads
    compilation_cache.enable()
    img_scale = default_img_scale(args.img_scale, None, args.checkpoint)
    check_output_folder(args.output, args.overwrite, _is_predict_output, args.input, args.checkpoint, args.prototypes)
    reader = open_input(args.input)
    variables, config = load_model(args.checkpoint, args.model, args.num_classes)
    segmenter = VideoSegmenter(config, variables, batch_size=args.batch_size)
    prototypes = None
    prototype_source = ""
    if segmenter.needs_prototypes:
        if args.prototypes:
            prototypes = PrototypeStore(args.prototypes).get(reader.name)
            prototype_source = f"store {args.prototypes}"
        else:
            prototypes = video_prototypes(segmenter, reader, img_scale, args.prototype_seed)
            indices = prototype_frame_indices(reader.num_frames)
            prototype_source = f"on the fly: frames {indices}, k-means K=100, seed {args.prototype_seed}"
    elif args.prototypes:
        log.warning("ignoring --prototypes: %s is not a CFFM++ model", config.name)
    manifest = {
        "checkpoint": str(args.checkpoint),
        "model": config.name,
        "arch": config.arch,
        "num_classes": config.num_classes,
        "input": str(args.input),
        "prototypes": prototype_source,
    }
    out = predict_video(
        reader,
        segmenter,
        args.output,
        img_scale=img_scale,
        prototypes=prototypes,
        streaming=not args.no_streaming,
        overwrite=args.overwrite,
        alpha=args.alpha,
        fps=args.fps,
        progress=not args.no_progress,
        manifest=manifest,
        num_loaders=args.loader_threads,
    )
    frames = "frame" if reader.num_frames == 1 else "frames"
    print(f"wrote {reader.num_frames} {frames} of {reader.name!r} to {out}")  # noqa: T201
    return out


def _cli() -> int:
    from cffm_jax.checkpoint import CheckpointError
    from cffm_jax.logging_utils import run_cli

    return run_cli(
        main,
        (InputError, CheckpointError, FileExistsError, FileNotFoundError, ValueError),
        "nothing written (the output folder appears only when every frame is done)",
    )


if __name__ == "__main__":
    sys.exit(_cli())

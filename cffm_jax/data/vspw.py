"""VSPW dataset reading and clip sampling (SPEC.md section 10.1 and 10.2).

Layout (the VSPW 480p release, or a folder written by :mod:`cffm_jax.data.synthetic`)::

    <root>/{train,val,test}.txt            video names, one per line
    <root>/data/<video>/origin/*.jpg       frames, sorted by file name
    <root>/data/<video>/mask/*.png         raw masks (0 = 'others', 1..124 = classes, 255 = ignore)

Labels follow ``reduce_zero_label``: raw 0 -> 255, v -> v - 1, 255 stays 255, giving 124 classes with
ignore index 255. Images are decoded with PIL as RGB uint8 (the official code decodes BGR with cv2 and swaps
to RGB when normalising, so the network sees the same RGB values).

Frames are reached through a *frame source*: :class:`FolderSource` reads the folder above,
:class:`cffm_jax.data.tfds_vspw.TfdsSource` reads the packed array_record version; both yield the same
``(image, label)`` records. A record is identified by a :class:`VideoInfo` and a frame position ``t``.

Clip sampling (:func:`train_clip_indices`, :func:`eval_clip_indices`) is pure and shared with the
evaluation and prototype code. Frame order inside a clip: references first (oldest first), target last.

Bad input raises :class:`DatasetError` naming the file and the problem; ``skip_bad_videos=True`` drops
the videos whose problems are visible when the index is built (missing folders, count mismatches) and
logs a summary instead.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import re
from collections.abc import Sequence
from typing import Protocol

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

NUM_CLASSES = 124
IGNORE_INDEX = 255
SPLITS = ("train", "val", "test")
# The CFFM clip: three references at these offsets before the target (SPEC 10.2).
DILATIONS = (-9, -6, -3)
MIN_TRAIN_FRAMES = 1 - DILATIONS[0]  # 10: the earliest possible target is position 9.
FRAME_SUFFIX = ".jpg"
MASK_SUFFIX = ".png"
TFDS_NAME = "vspw"  # the TFDS builder's name: <data_dir>/vspw/<version>/
_TFDS_VERSION = re.compile(r"\d+\.\d+\.\d+")

# Reference frames used for the evaluation targets 3..8, which have fewer than 9 predecessors.
_EVAL_EARLY_CLIPS = {
    3: [0, 1, 2, 3],
    4: [0, 2, 3, 4],
    5: [0, 2, 4, 5],
    6: [0, 2, 4, 6],
    7: [0, 3, 5, 7],
    8: [0, 3, 6, 8],
}


class DatasetError(ValueError):
    """A problem with the dataset files; the message names the file (or video/split) and the problem."""


# ----------------------------------------------------------------------------------------------------------
# Clip sampling (SPEC 10.2)


def train_clip_indices(n_frames: int, rng: np.random.Generator) -> tuple[list[int], bool]:
    """Samples a training clip of a video with ``n_frames`` frames.

    With probability 0.5 the video's frame list is reversed; the target position t is uniform over
    9..n_frames-1 of that list and the clip is positions [t-9, t-6, t-3, t].

    Args:
      n_frames: number of frames of the video, at least 10.
      rng: random generator; draws (in order) the reversal flag then the target position.

    Returns:
      (indices, reversed): four frame indices into the video's *original* (name-sorted) frame order, in clip
      order (references first, target last), and whether the video was reversed.
    """
    if n_frames < MIN_TRAIN_FRAMES:
        raise ValueError(f"a training clip needs at least {MIN_TRAIN_FRAMES} frames, got {n_frames}")
    reverse = bool(rng.random() < 0.5)
    t = int(rng.integers(MIN_TRAIN_FRAMES - 1, n_frames))
    positions = [t + d for d in DILATIONS] + [t]
    if reverse:
        return [n_frames - 1 - p for p in positions], True
    return positions, False


def eval_clip_indices(t: int) -> list[int]:
    """Frame indices of the evaluation clip whose target is frame ``t`` (references oldest first, ``t`` last).

    t = 0, 1, 2 -> [t] (no temporal context); t = 3..8 -> the fixed sets of SPEC 10.2;
    t >= 9 -> [t-9, t-6, t-3, t].
    """
    if t < 0:
        raise ValueError(f"frame index must be >= 0, got {t}")
    if t < 3:
        return [t]
    if t in _EVAL_EARLY_CLIPS:
        return list(_EVAL_EARLY_CLIPS[t])
    return [t + d for d in DILATIONS] + [t]


# ----------------------------------------------------------------------------------------------------------
# Decoding and labels


def reduce_zero_label(mask: np.ndarray) -> np.ndarray:
    """Maps raw VSPW mask values to training labels: 0 -> 255, v -> v - 1 (1..254), 255 -> 255.

    Args:
      mask: (H, W) integer raw mask.

    Returns:
      (H, W) uint8 labels.
    """
    m = np.asarray(mask)
    if m.dtype == np.uint8:
        return _REDUCED[m]
    m = m.astype(np.int32)
    out = m - 1
    out[(m == 0) | (m == IGNORE_INDEX)] = IGNORE_INDEX
    return out.astype(np.uint8)


# reduce_zero_label of every uint8 value, a lookup table: 0 -> 255, v -> v - 1, 255 -> 255
_REDUCED = np.concatenate([[IGNORE_INDEX], np.arange(254), [IGNORE_INDEX]]).astype(np.uint8)


def _pil_error(error: Exception, buf: io.BytesIO, name: str) -> str:
    """PIL's message with the in-memory buffer it names (``<_io.BytesIO object at 0x...>``, decoding from bytes
    read earlier or from a TFDS record) replaced by the file's name."""
    return str(error).replace(repr(buf), name)


def decode_image(data: bytes, name: str) -> np.ndarray:
    """Decodes a JPEG (or any PIL-readable) frame to RGB.

    Args:
      data: the encoded file contents.
      name: file name used in error messages.

    Returns:
      (H, W, 3) uint8 RGB.
    """
    buf = io.BytesIO(data)
    try:
        with Image.open(buf) as im:
            im.load()
            rgb = im if im.mode == "RGB" else im.convert("RGB")  # convert copies even an RGB image
            array = np.asarray(rgb, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(f"{name}: cannot decode image (corrupt or truncated?): {_pil_error(e, buf, name)}") from e
    return array


def decode_mask(data: bytes, name: str, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Decodes a raw VSPW mask PNG and checks its values.

    Args:
      data: the encoded PNG contents (palette or greyscale).
      name: file name used in error messages.
      num_classes: valid raw values are 0..num_classes and 255.

    Returns:
      (H, W) uint8 *raw* mask (apply :func:`reduce_zero_label` for training labels).
    """
    buf = io.BytesIO(data)
    try:
        with Image.open(buf) as im:
            im.load()
            mode = im.mode
            arr = np.asarray(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(f"{name}: cannot decode mask (corrupt or truncated?): {_pil_error(e, buf, name)}") from e
    if arr.ndim != 2:
        raise DatasetError(f"{name}: mask must be single-channel (palette or greyscale), got PIL mode {mode}")
    if arr.dtype == np.uint8:  # the values present, by counting (np.unique sorts: 3x slower)
        values = np.flatnonzero(np.bincount(arr.ravel(), minlength=256))
    else:
        values = np.unique(arr)
    bad = values[((values > num_classes) & (values != IGNORE_INDEX)) | (values < 0)]
    if bad.size:
        raise DatasetError(f"{name}: mask values {bad[:10].tolist()} outside the valid range 0..{num_classes} and 255")
    return arr.astype(np.uint8)


def read_bytes(path: str) -> bytes:
    """Reads a file, raising :class:`DatasetError` naming it if that fails."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise DatasetError(f"{path}: cannot read file: {e.strerror or e}") from e


def check_same_size(image: np.ndarray, mask: np.ndarray | None, image_name: str, mask_name: str) -> None:
    """Raises :class:`DatasetError` if a frame (H, W, 3) and its mask (H, W) differ in size."""
    if mask is not None and image.shape[:2] != mask.shape:
        raise DatasetError(
            f"{mask_name}: mask size {mask.shape[1]}x{mask.shape[0]} (WxH) differs from its frame "
            f"{image_name} ({image.shape[1]}x{image.shape[0]})"
        )


# ----------------------------------------------------------------------------------------------------------
# Index


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """One video of a split.

    Attributes:
      name: the video name (folder name under ``data/``).
      index: its position in the split file (0-based); this is the ``video_index`` of the pipelines.
      frame_names: frame file stems in temporal (name-sorted) order.
      has_labels: whether masks exist for this video (the VSPW test split has none).
    """

    name: str
    index: int
    frame_names: tuple[str, ...]
    has_labels: bool

    @property
    def num_frames(self) -> int:
        return len(self.frame_names)


class FrameSource(Protocol):
    """Random access to the frames of one split (folder or TFDS)."""

    split: str
    split_names: list[str]  # every video name of the split file; video_index indexes this list
    videos: list[VideoInfo]  # the usable videos, in split-file order
    num_classes: int

    def load_frame(self, video: VideoInfo, t: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Returns ((H, W, 3) uint8 RGB image, (H, W) uint8 reduced labels or None)."""
        ...

    def frame_name(self, video: VideoInfo, t: int) -> str:
        """A human-readable name of frame t (its path for a folder), for error messages."""
        ...


def split_file(root: str, split: str) -> str:
    return os.path.join(root, f"{split}.txt")


def read_split(root: str, split: str) -> list[str]:
    """Reads ``<root>/<split>.txt``: the video names of a split, in file order.

    Raises:
      DatasetError: the file is missing, lists no video, or lists a video twice.
    """
    path = split_file(root, split)
    if not os.path.isfile(path):
        versions = tfds_versions(root)
        if versions:  # a data root with one version is read as TFDS; validate reads only folders
            pick = "; pass one of them" if len(versions) > 1 else ""
            raise DatasetError(
                f"{path}: split file not found: {root!r} is not a VSPW folder, it holds {len(versions)} prepared "
                f"TFDS version(s) ({', '.join(versions)}){pick}"
            )
        raise DatasetError(f"{path}: split file not found (is {root!r} a VSPW folder?)")
    with open(path, encoding="utf-8") as f:
        names = [line.strip() for line in f if line.strip()]
    if not names:
        raise DatasetError(f"{path}: empty split: the file lists no videos")
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise DatasetError(f"{path}: video {name!r} is listed twice")
        seen.add(name)
    return names


def splits_with_videos(root: str) -> tuple[list[str], list[str]]:
    """The splits of ``root`` among train/val/test: (those whose file lists videos, those whose file lists none).

    An empty split file stands for a split the dataset does not have (:mod:`cffm_jax.data.synthetic` wrote one for a
    split of 0 videos before it wrote none): what takes "every split present" skips it, while a split asked for by
    name must list videos (:func:`read_split`).
    """
    listed, empty = [], []
    for split in SPLITS:
        path = split_file(root, split)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                (listed if any(line.strip() for line in f) else empty).append(split)
    return listed, empty


def _list_files(folder: str, suffix: str) -> list[str]:
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(suffix))


def _mask_file(mask_dir: str, stem: str) -> str:
    return os.path.join(mask_dir, stem + MASK_SUFFIX)


def scan_video(root: str, name: str, index: int, *, require_labels: bool) -> VideoInfo:
    """Lists the frames (and masks) of one video and checks that they pair up.

    Args:
      root: dataset root.
      name: video name.
      index: position in the split file.
      require_labels: whether a missing ``mask`` folder is an error (else the video has no labels).

    Raises:
      DatasetError: missing video/frames folder, no frames, missing masks, or frame/mask names that differ.
    """
    video_dir = os.path.join(root, "data", name)
    origin = os.path.join(video_dir, "origin")
    mask_dir = os.path.join(video_dir, "mask")
    if not os.path.isdir(video_dir):
        raise DatasetError(f"{video_dir}: video {name!r} is listed in a split file but its folder is missing")
    if not os.path.isdir(origin):
        raise DatasetError(f"{origin}: frames folder of video {name!r} is missing")
    frames = _list_files(origin, FRAME_SUFFIX)
    if not frames:
        raise DatasetError(f"{origin}: video {name!r} has no {FRAME_SUFFIX} frames")
    stems = tuple(f[: -len(FRAME_SUFFIX)] for f in frames)
    if not os.path.isdir(mask_dir):
        if require_labels:
            raise DatasetError(f"{mask_dir}: mask folder of video {name!r} is missing")
        return VideoInfo(name, index, stems, has_labels=False)
    masks = _list_files(mask_dir, MASK_SUFFIX)
    mask_stems = tuple(f[: -len(MASK_SUFFIX)] for f in masks)
    if mask_stems != stems:
        missing = sorted(set(stems) - set(mask_stems))
        extra = sorted(set(mask_stems) - set(stems))
        parts = [f"{len(frames)} frames but {len(masks)} masks"]
        if missing:
            parts.append("missing masks: " + ", ".join(_mask_file(mask_dir, s) for s in missing[:5]))
        if extra:
            parts.append("masks without frame: " + ", ".join(_mask_file(mask_dir, s) for s in extra[:5]))
        raise DatasetError(f"{video_dir}: frame/mask mismatch in video {name!r}: " + "; ".join(parts))
    return VideoInfo(name, index, stems, has_labels=True)


def select_videos(
    candidates: Sequence[tuple[str, int]],
    scan,
    *,
    split_desc: str,
    min_frames: int,
    skip_bad_videos: bool,
) -> list[VideoInfo]:
    """Builds a video list, collecting every problem; raises all of them at once unless skipping.

    Args:
      candidates: (name, split index) pairs.
      scan: callable (name, index) -> VideoInfo, raising DatasetError for a bad video.
      split_desc: e.g. the split file path, for messages.
      min_frames: videos with fewer frames are dropped with a logged count (not an error).
      skip_bad_videos: drop bad videos with a logged summary instead of raising.
    """
    videos: list[VideoInfo] = []
    problems: list[str] = []
    short = 0
    for name, index in candidates:
        try:
            video = scan(name, index)
        except DatasetError as e:
            problems.append(str(e))
            continue
        if video.num_frames < min_frames:
            short += 1
            continue
        videos.append(video)
    if short:
        logger.info("%s: skipped %d videos with fewer than %d frames", split_desc, short, min_frames)
    if problems:
        summary = f"{split_desc}: {len(problems)} bad video(s):\n  " + "\n  ".join(problems)
        if not skip_bad_videos:
            raise DatasetError(summary)
        logger.warning("skipping %s", summary)
    if not videos:
        raise DatasetError(f"{split_desc}: no usable video (min_frames={min_frames}, {len(problems)} bad)")
    return videos


class FolderSource:
    """Frames of one split read from a VSPW-layout folder.

    Args:
      root: dataset root (contains ``train.txt`` and ``data/``).
      split: split name (a ``<split>.txt`` file).
      require_labels: masks must exist for every video (training); else videos without a ``mask`` folder
        yield ``None`` labels.
      min_frames: drop videos with fewer frames (logged count); 10 for training.
      skip_bad_videos: drop videos with structural problems (logged) instead of raising.
      num_classes: raw mask values must be in 0..num_classes or 255.
    """

    def __init__(
        self,
        root: str,
        split: str,
        *,
        require_labels: bool = False,
        min_frames: int = 1,
        skip_bad_videos: bool = False,
        num_classes: int = NUM_CLASSES,
    ):
        self.root = os.fspath(root)
        self.split = split
        self.num_classes = num_classes
        self.split_names = read_split(self.root, split)
        self.videos = select_videos(
            [(n, i) for i, n in enumerate(self.split_names)],
            lambda n, i: scan_video(self.root, n, i, require_labels=require_labels),
            split_desc=split_file(self.root, split),
            min_frames=min_frames,
            skip_bad_videos=skip_bad_videos,
        )

    def frame_path(self, video: VideoInfo, t: int) -> str:
        return folder_frame_path(self.root, video, t)

    def mask_path(self, video: VideoInfo, t: int) -> str:
        return folder_mask_path(self.root, video, t)

    def frame_name(self, video: VideoInfo, t: int) -> str:
        return self.frame_path(video, t)

    def load_frame(self, video: VideoInfo, t: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Returns ((H, W, 3) uint8 RGB, (H, W) uint8 reduced labels or None)."""
        return load_folder_frame(self.root, video, t, self.num_classes)


def folder_frame_path(root: str, video: VideoInfo, t: int) -> str:
    return os.path.join(root, "data", video.name, "origin", video.frame_names[t] + FRAME_SUFFIX)


def folder_mask_path(root: str, video: VideoInfo, t: int) -> str:
    return os.path.join(root, "data", video.name, "mask", video.frame_names[t] + MASK_SUFFIX)


def load_folder_frame(
    root: str, video: VideoInfo, t: int, num_classes: int = NUM_CLASSES
) -> tuple[np.ndarray, np.ndarray | None]:
    """Reads frame t of a video of a VSPW folder and checks it.

    Returns:
      ((H, W, 3) uint8 RGB image, (H, W) uint8 reduced labels, or None if the video has no masks).
    """
    image_path = folder_frame_path(root, video, t)
    image = decode_image(read_bytes(image_path), image_path)
    if not video.has_labels:
        return image, None
    mask_path = folder_mask_path(root, video, t)
    mask = decode_mask(read_bytes(mask_path), mask_path, num_classes)
    check_same_size(image, mask, image_path, mask_path)
    return image, reduce_zero_label(mask)


def tfds_versions(path: str) -> list[str]:
    """The prepared TFDS ``vspw`` version folders that ``path`` names, so that a data root may be any of the folders
    :mod:`cffm_jax.data.tfds_vspw` writes: the version folder itself (``<data_dir>/vspw/1.0.0``, it holds
    ``dataset_info.json``), the dataset folder (``<data_dir>/vspw``) or the TFDS data directory (``<data_dir>``).

    Only complete versions count: TFDS prepares into a temporary folder and gives it its version name at the end.
    """
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, "dataset_info.json")):
        return [path]
    found = []
    for parent in (path, os.path.join(path, TFDS_NAME)):
        if os.path.isdir(parent):
            for name in sorted(os.listdir(parent)):
                version = os.path.join(parent, name)
                if _TFDS_VERSION.fullmatch(name) and os.path.isfile(os.path.join(version, "dataset_info.json")):
                    found.append(version)
    return found


def tfds_version_dir(path: str) -> str:
    """The one prepared TFDS ``vspw`` version folder that ``path`` names (see :func:`tfds_versions`).

    Raises:
      DatasetError: ``path`` holds no prepared version, or several (listing them: the caller must pick).
    """
    versions = tfds_versions(path)
    if len(versions) == 1:
        return versions[0]
    if versions:
        raise DatasetError(
            f"{path}: holds {len(versions)} prepared TFDS version(s) ({', '.join(versions)}); pass one of them"
        )
    raise DatasetError(
        f"{path}: no prepared TFDS dataset: expected {TFDS_NAME}/<version>/dataset_info.json (the --data_dir of "
        f"cffm_jax.data.tfds_vspw), <version>/dataset_info.json or dataset_info.json in it"
    )


def is_tfds_dir(path: str) -> bool:
    """Whether ``path`` names exactly one prepared TFDS ``vspw`` version (see :func:`tfds_versions`)."""
    return len(tfds_versions(path)) == 1


def open_source(
    root: str,
    split: str,
    *,
    require_labels: bool = False,
    min_frames: int = 1,
    skip_bad_videos: bool = False,
    num_classes: int = NUM_CLASSES,
) -> FrameSource:
    """Opens a split of a VSPW folder, or of a prepared TFDS ``vspw`` dataset: its version folder
    (``<data_dir>/vspw/1.0.0``), or the dataset folder or data directory above it when they hold one version.

    Arguments as :class:`FolderSource`.
    """
    kwargs = dict(
        require_labels=require_labels,
        min_frames=min_frames,
        skip_bad_videos=skip_bad_videos,
        num_classes=num_classes,
    )
    if is_tfds_dir(root):
        from cffm_jax.data.tfds_vspw import TfdsSource  # Imports tensorflow_datasets only when needed.

        return TfdsSource(root, split, **kwargs)
    return FolderSource(root, split, **kwargs)


def load_clip(
    source: FrameSource, video: VideoInfo, indices: Sequence[int]
) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
    """Loads the frames ``indices`` of a video; all must have the same size.

    Returns:
      (images, labels): lists of (H, W, 3) uint8 and (H, W) uint8 (or None without labels).
    """
    images, labels = [], []
    for t in indices:
        image, label = source.load_frame(video, t)
        if images and image.shape != images[0].shape:
            raise DatasetError(
                f"{source.frame_name(video, t)}: frame size {image.shape[1]}x{image.shape[0]} differs from "
                f"{source.frame_name(video, indices[0])} ({images[0].shape[1]}x{images[0].shape[0]}) "
                f"in video {video.name!r}"
            )
        images.append(image)
        labels.append(label)
    return images, labels

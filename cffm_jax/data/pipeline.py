"""grain input pipelines for CFFM training and evaluation (SPEC.md section 10).

Training (:func:`make_train_dataset` / :func:`make_train_iterator`)::

    MapDataset.range(videos) -> repeat(repeat) -> shuffle(seed) -> repeat(num_epochs, None = forever)
      -> map_with_index(sample clip + load + train transform [+ prototypes])  # RNG seeded by (seed, index)
      -> slice [shard_index::shard_count] -> batch -> to_iter_dataset -> mp_prefetch(num_workers)

One item is one clip of one video (the reference draws one clip per video per pass over the split and repeats
the split 50 times per "epoch"; ``repeat=50`` reproduces that shuffle unit, the default is 1). Every random
draw of an item comes from ``np.random.default_rng([seed, index])`` with ``index`` the item's global position
in the infinite stream, so the output does not depend on ``num_workers`` or thread count, every host of a
multi-host job sees a disjoint slice of the same stream, and the iterator state
(``get_state()`` / ``set_state()``, a small dict that orbax can save) resumes the stream exactly.

Batches are dicts of numpy arrays:
``clips`` (B, T, H, W, 3) float32, ``labels`` (B, T, H, W) int32 (255 = ignore), ``video_index`` (B,) int32
(position of the video in the split file, see :func:`video_names`), ``frame_index`` (B, T) int32 (frame
positions in the name-sorted video, clip order: references first, target last) and, with a
``prototype_lookup``, ``prototypes`` (B, Kp, E) float32.

Evaluation processes each video frame by frame in temporal order (the model caches per-frame features), so it
uses plain sequential readers: :func:`list_eval_videos` -> :class:`EvalVideo` -> :meth:`EvalVideo.load` ->
:class:`EvalFrame`. :func:`make_eval_dataset` is a grain per-frame dataset for parallel, order-free uses.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
from collections.abc import Callable

import grain
import numpy as np

from cffm_jax.data import transforms
from cffm_jax.data.vspw import (
    MIN_TRAIN_FRAMES,
    NUM_CLASSES,
    DatasetError,
    FrameSource,
    VideoInfo,
    eval_clip_indices,
    is_tfds_dir,
    load_clip,
    open_source,
    read_split,
    train_clip_indices,
)

logger = logging.getLogger(__name__)

PrototypeLookup = Callable[[str], np.ndarray]


def _mark_flags_parsed() -> None:
    """grain reads absl flags in its worker processes; unparsed flags (e.g. under pytest) make it fail."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _default_shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    if shard_index is None or shard_count is None:
        import jax

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index must be in [0, {shard_count}), got {shard_index}")
    return shard_index, shard_count


def video_names(root: str, split: str) -> list[str]:
    """The video names of a split in file order; ``video_index`` of the pipelines indexes this list.

    Args:
      root: VSPW folder or prepared TFDS ``vspw`` version folder.
      split: split name.
    """
    if is_tfds_dir(root):
        from cffm_jax.data.tfds_vspw import tfds_split_names

        return tfds_split_names(root, split)
    return read_split(root, split)


@dataclasses.dataclass
class TrainClipLoader(grain.transforms.MapWithIndex):
    """Turns (stream index, video position) into one transformed training clip (a grain operation).

    Attributes:
      source: the frame source (pickled into the worker processes).
      seed: pipeline seed; the item's generator is ``np.random.default_rng([seed, index])``.
      crop_size: (H, W) of the crop.
      prototype_lookup: optional video name -> (Kp, E) prototypes (must be picklable for workers > 0).
      skip_bad_videos: on a decoding/validation error, log it and take the next video instead of raising.
      transform_kwargs: extra keyword arguments of :func:`cffm_jax.data.transforms.train_transform`.
    """

    source: FrameSource
    seed: int
    crop_size: tuple[int, int] = transforms.CROP_SIZE
    prototype_lookup: PrototypeLookup | None = None
    skip_bad_videos: bool = False
    transform_kwargs: dict = dataclasses.field(default_factory=dict)

    def load(self, video: VideoInfo, rng: np.random.Generator) -> dict[str, np.ndarray]:
        indices, _ = train_clip_indices(video.num_frames, rng)
        images, labels = load_clip(self.source, video, indices)
        clip, label = transforms.train_transform(
            images, labels, rng, crop_size=tuple(self.crop_size), **self.transform_kwargs
        )
        record = {
            "clips": clip,
            "labels": label,
            "video_index": np.int32(video.index),
            "frame_index": np.asarray(indices, np.int32),
        }
        if self.prototype_lookup is not None:
            record["prototypes"] = np.asarray(self.prototype_lookup(video.name), np.float32)
        return record

    def map_with_index(self, index: int, position: int) -> dict[str, np.ndarray]:
        videos = self.source.videos
        for attempt in range(len(videos)):
            video = videos[(int(position) + attempt) % len(videos)]
            rng = np.random.default_rng([self.seed, index, attempt])
            try:
                return self.load(video, rng)
            except DatasetError as e:
                if not self.skip_bad_videos:
                    raise
                logger.warning("skipping bad video %r for item %d: %s", video.name, index, e)
        raise DatasetError(f"every video of split {self.source.split!r} failed to load")


def make_train_dataset(
    root: str,
    *,
    split: str = "train",
    batch_size: int,
    crop_size: tuple[int, int] = transforms.CROP_SIZE,
    seed: int,
    num_workers: int = 0,
    shard_index: int | None = None,
    shard_count: int | None = None,
    prototype_lookup: PrototypeLookup | None = None,
    repeat: int = 1,
    num_epochs: int | None = None,
    skip_bad_videos: bool = False,
    num_classes: int = NUM_CLASSES,
    num_threads: int = 1,
    prefetch_buffer_size: int = 2,
    worker_buffer_size: int = 2,
    transform_kwargs: dict | None = None,
    start_batch: int = 0,
) -> grain.IterDataset:
    """The training pipeline as a grain ``IterDataset`` (see the module docstring).

    Args:
      root: VSPW folder, or a prepared TFDS ``vspw`` version folder.
      split: split to train on (every video needs masks; videos with < 10 frames are dropped, logged).
      batch_size: clips per batch on this process (per host).
      crop_size: (H, W) training crop.
      seed: pipeline seed (shuffle and augmentation).
      num_workers: grain worker processes (0 = in-process).
      shard_index, shard_count: this host's slice of the stream; default ``jax.process_index()`` and
        ``jax.process_count()``.
      prototype_lookup: video name -> (Kp, E) float32 prototypes, added as ``prototypes`` (CFFM++).
      repeat: copies of the video list per shuffled pass (the reference uses 50).
      num_epochs: passes over the repeated list; None = infinite (iteration-based training).
      skip_bad_videos: drop bad videos (logged) instead of raising :class:`DatasetError`.
      num_classes: number of classes (raw mask values 0..num_classes and 255 are valid).
      num_threads, prefetch_buffer_size: grain ``ReadOptions`` of each process.
      worker_buffer_size: batches buffered per worker process.
      transform_kwargs: overrides for :func:`cffm_jax.data.transforms.train_transform`.
      start_batch: the index of the first batch in this process's stream: a pipeline that skips ``k`` batches
        continues exactly where one that delivered ``k`` left off, with any ``num_workers`` (resuming a run whose
        saved iterator state was made with another worker count).

    Returns:
      An ``IterDataset`` of batch dicts.
    """
    shard_index, shard_count = _default_shard(shard_index, shard_count)
    source = open_source(
        root,
        split,
        require_labels=True,
        min_frames=MIN_TRAIN_FRAMES,
        skip_bad_videos=skip_bad_videos,
        num_classes=num_classes,
    )
    loader = TrainClipLoader(
        source=source,
        seed=seed,
        crop_size=tuple(crop_size),
        prototype_lookup=prototype_lookup,
        skip_bad_videos=skip_bad_videos,
        transform_kwargs=dict(transform_kwargs or {}),
    )
    ds = grain.MapDataset.range(len(source.videos))
    if repeat > 1:
        ds = ds.repeat(repeat)
    ds = ds.shuffle(seed=seed).repeat(num_epochs)
    ds = ds.map_with_index(loader)
    ds = ds[shard_index::shard_count]
    ds = ds.batch(batch_size, drop_remainder=True)
    if start_batch:
        ds = ds[start_batch:]
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size))
    if num_workers > 0:
        _mark_flags_parsed()
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=worker_buffer_size),
            worker_init_fn=_init_worker,
        )
    return it


def _init_worker(worker_index: int, worker_count: int) -> None:
    """Runs first in each data worker process: the main process alone decides when workers stop.

    SIGTERM and Ctrl-C reach every process of a job (a scheduler signals them all; a terminal signals its
    foreground process group). The main process answers them by saving a checkpoint and closing its iterator,
    which stops the workers (:mod:`cffm_jax.preemption`), so they ignore both; and a worker whose main process is
    gone (killed with SIGKILL) exits within a second instead of waiting forever to hand over its next batch.
    """
    del worker_index, worker_count
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parent = os.getppid()

    def exit_when_orphaned() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=exit_when_orphaned, name="exit-when-orphaned", daemon=True).start()


def make_train_iterator(root: str, **kwargs) -> grain.DatasetIterator:
    """``iter(make_train_dataset(root, **kwargs))``: a checkpointable iterator of training batches.

    ``it.get_state()`` returns a small dict to save (e.g. with orbax) and ``it.set_state(state)`` on a fresh
    iterator of the same pipeline resumes at exactly the next batch (with the same ``num_workers``: the state
    of a multi-worker iterator holds one entry per worker). Keyword arguments as :func:`make_train_dataset`
    (``batch_size`` and ``seed`` are required). With ``num_workers > 0`` end with :func:`close_train_iterator`.
    """
    return iter(make_train_dataset(root, **kwargs))


def close_train_iterator(it: grain.DatasetIterator) -> None:
    """Stops a training iterator's worker processes and frees the shared memory of the batches it delivered.

    With ``num_workers > 0`` every batch array lives in a shared-memory segment, which grain unlinks from a
    background thread once the array is freed. A process that exits right after its last batch is freed cuts
    that thread short; Python's resource tracker then unlinks the segments and warns "There appear to be N leaked
    shared_memory objects" (at the end of every training run). Free your references to the batches first: this
    waits for the thread to finish (later frees then unlink at once).
    """
    if hasattr(it, "close"):
        it.close()
    try:  # grain's private deleter (grain 0.2.18); without it there is nothing to wait for
        from grain._src.python.ipc.shared_memory_array import SharedMemoryArray

        deleter = SharedMemoryArray._del_thread_pool
    except (ImportError, AttributeError):
        return
    if deleter is not None:
        SharedMemoryArray._del_thread_pool = None
        deleter.close()
        deleter.join()


# ----------------------------------------------------------------------------------------------------------
# Evaluation


@dataclasses.dataclass(frozen=True)
class EvalFrame:
    """One frame in the test pipeline.

    Attributes:
      image: (H', W', 3) uint8 RGB network input (H', W' multiples of 32; ``transforms.test_resize``): the networks
        normalise uint8 frames themselves, on the device. A float32 image, normalised already
        (``transforms.test_transform``), is taken as well.
      label: (H, W) uint8 labels at the original size (255 = ignore), or None without masks.
      original_size: (H, W) of the frame, to resize predictions back.
    """

    image: np.ndarray
    label: np.ndarray | None
    original_size: tuple[int, int]


@dataclasses.dataclass(frozen=True)
class EvalVideo:
    """A video to evaluate frame by frame (in temporal order)."""

    source: FrameSource
    info: VideoInfo

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def index(self) -> int:
        """Position in the split file."""
        return self.info.index

    @property
    def num_frames(self) -> int:
        return self.info.num_frames

    @property
    def has_labels(self) -> bool:
        return self.info.has_labels

    @property
    def frame_names(self) -> list[str]:
        """Frame paths (folder source) or record names (TFDS), in temporal order."""
        return [self.source.frame_name(self.info, t) for t in range(self.num_frames)]

    def clip_indices(self, t: int) -> list[int]:
        """Frames of the evaluation clip of target t (:func:`cffm_jax.data.vspw.eval_clip_indices`)."""
        return eval_clip_indices(t)

    def load(
        self,
        t: int,
        *,
        img_scale: tuple[int, int] = transforms.IMG_SCALE,
        size_divisor: int = transforms.SIZE_DIVISOR,
    ) -> EvalFrame:
        """Loads frame t with the test transform."""
        return load_eval_frame(self, t, img_scale=img_scale, size_divisor=size_divisor)


def list_eval_videos(
    root: str,
    split: str = "val",
    *,
    skip_bad_videos: bool = False,
    num_classes: int = NUM_CLASSES,
) -> list[EvalVideo]:
    """The videos of a split for whole-video evaluation or streaming inference, in split-file order.

    Videos without a ``mask`` folder (e.g. VSPW test) load with ``label=None``.
    """
    source = open_source(root, split, skip_bad_videos=skip_bad_videos, num_classes=num_classes)
    return [EvalVideo(source, info) for info in source.videos]


def load_eval_frame(
    video: EvalVideo,
    t: int,
    *,
    img_scale: tuple[int, int] = transforms.IMG_SCALE,
    size_divisor: int = transforms.SIZE_DIVISOR,
) -> EvalFrame:
    """Frame t of ``video`` through the test transform (see :class:`EvalFrame`)."""
    image, label = video.source.load_frame(video.info, t)
    return EvalFrame(
        image=transforms.test_resize(image, img_scale=img_scale, size_divisor=size_divisor),
        label=label,
        original_size=(int(image.shape[0]), int(image.shape[1])),
    )


@dataclasses.dataclass
class _EvalFrameLoader(grain.transforms.Map):
    source: FrameSource
    img_scale: tuple[int, int]
    size_divisor: int

    def map(self, key: tuple[int, int]) -> dict[str, np.ndarray]:
        video = self.source.videos[key[0]]
        frame = load_eval_frame(
            EvalVideo(self.source, video), key[1], img_scale=self.img_scale, size_divisor=self.size_divisor
        )
        record = {
            "image": frame.image,
            "video_index": np.int32(video.index),
            "frame_index": np.int32(key[1]),
            "clip_frame_indices": np.asarray(eval_clip_indices(key[1]), np.int32),
            "original_size": np.asarray(frame.original_size, np.int32),
        }
        if frame.label is not None:
            record["label"] = frame.label
        return record


def make_eval_dataset(
    root: str,
    split: str = "val",
    *,
    img_scale: tuple[int, int] = transforms.IMG_SCALE,
    size_divisor: int = transforms.SIZE_DIVISOR,
    skip_bad_videos: bool = False,
    num_classes: int = NUM_CLASSES,
) -> grain.MapDataset:
    """A grain ``MapDataset``: one unbatched item per frame of every video (videos and frames in order).

    Items: ``image`` (H', W', 3) uint8 (see :class:`EvalFrame`), ``label`` (H, W) uint8 (absent without masks),
    ``video_index``, ``frame_index``, ``clip_frame_indices`` (1 or 4,) int32 and ``original_size`` (2,) int32.
    """
    source = open_source(root, split, skip_bad_videos=skip_bad_videos, num_classes=num_classes)
    keys = [(v, t) for v, info in enumerate(source.videos) for t in range(info.num_frames)]
    return grain.MapDataset.source(keys).map(_EvalFrameLoader(source, tuple(img_scale), size_divisor))

"""Whole-video evaluation of CFFM / CFFM++: official test protocol and metrics (SPEC.md sections 7, 10, 11).

Protocol (``cffm_jax.streaming``): every frame of every video of the split is a target; frames go through the
test transform (keep-ratio rescale to fit ``img_scale`` = (853, 480), each side resized to a multiple of 32);
clips follow SPEC 10.2 (frames 0-2 alone, 3-8 the fixed sets, then [t-9, t-6, t-3, t]); target logits are
resized bilinearly to the network input size, then to the original frame size, and the argmax is the
prediction. CFFM++ uses per-video prototypes (a :class:`cffm_jax.prototype_store.PrototypeStore`, or
``'auto'``: k-means of the video's own features on the fly, SPEC section 6). Streaming with a feature cache
is the default; ``--no-streaming`` runs the clip-by-clip reference (same predictions, each frame encoded up
to 4 times).

Reported metrics (``cffm_jax.metrics``, all in percent, over every labelled pixel of every frame; ground truth
mapped with reduce-zero-label, ignore label 255):

* ``miou``: mmseg 0.13 mIoU, the number CFFM reports (nanmean of per-class IoU over classes present in the GT
  or the predictions); ``per_class_iou``: the K per-class IoUs (None in JSON where undefined);
* ``miou_gt_present``: the VSPW ``Evaluator`` mIoU (mean over classes present in the GT);
* ``aacc``: pixel accuracy; ``macc``: mean class accuracy; ``fwiou``: frequency-weighted IoU;
* ``mvc8``, ``mvc16``: video consistency (``VC_perclip.py``; videos with <= 16 frames are skipped, so on a set
  of short videos these are NaN / null);
* ``num_frames``, ``num_videos``: labelled frames and videos scored.

Prediction files (``--predictions-out DIR``) use the VSPW submission layout ``DIR/<video>/<frame>.png``:
indexed PNGs at the original frame size holding **class id + 1** (1..K), i.e. raw VSPW mask values, so reading
them back through reduce-zero-label (raw v -> v - 1) gives the class ids, exactly like the ground truth.
Colours: ``cffm_jax.visualize.palette``. The folder is written as ``.DIR.partial`` and renamed to ``DIR`` when
complete.

Command lines::

    python -m cffm_jax.evaluate --config configs/X.py[:arg] [--config.<field>=<value> ...] [--checkpoint PATH]
        [--split val] [--json PATH] [--predictions-out DIR] [--max-videos N] [--no-streaming]
        [--batch-size N] [--prototypes DIR|auto] [--data-root ROOT] [--img-scale W H]
    python -m cffm_jax.evaluate --checkpoint PATH [--model NAME] --data-root ROOT ...   (no config)
    python -m cffm_jax.evaluate --predictions DIR --data-root ROOT [--split val] [--num-classes 124]
        [--json PATH]

``--checkpoint`` defaults to ``config.workdir`` (a training workdir); a raw ``.pth`` needs the model from the
config or ``--model``. The last form scores saved predictions against the ground truth without a model.

Several hosts: start one process per host with ``--coordinator-address host0:port --num-processes N
--process-id i`` (or nothing where the platform tells JAX, e.g. SLURM, Cloud TPU pods). The videos are split
between the processes (balanced by frame count), each one runs its share on its local devices, and the
metric totals are pooled, so every process returns the metrics of the whole split (process 0 prints and
writes the JSON). ``--predictions-out`` must then be on a filesystem that all processes share.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import functools
import itertools
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from cffm_jax import compilation_cache, host_memory
from cffm_jax.data.pipeline import EvalFrame, EvalVideo, list_eval_videos
from cffm_jax.data.transforms import IMG_SCALE
from cffm_jax.data.vspw import NUM_CLASSES, DatasetError, decode_mask, read_bytes, reduce_zero_label
from cffm_jax.experiment_config import ConfigError, config_error_message
from cffm_jax.logging_utils import check_output_folder
from cffm_jax.metrics import VC_MIN_FRAMES, MetricsAccumulator
from cffm_jax.streaming import DeviceChunk, VideoSegmenter, compute_prototypes, loader_threads, ordered_map
from cffm_jax.visualize import ids_to_raw, save_palette_png

log = logging.getLogger("cffm_jax.evaluate")  # the same name under python -m

METRIC_KEYS = ("miou", "miou_gt_present", "aacc", "macc", "fwiou", "mvc8", "mvc16")
PrototypeSource = Callable[[str], np.ndarray] | str | None


# ---------------------------------------------------------------------------------------------------------
# Prediction files.


class PredictionWriter:
    """Writes predictions in the VSPW submission layout ``<out>/<video>/<frame>.png`` (module docstring).

    Files go to ``.<out>.partial`` (PNG encoding on a small thread pool) and the folder is renamed to ``out``
    by :meth:`commit`; :meth:`abort` (or leaving a ``with`` block with an exception) deletes it.

    Args:
      out_dir: destination; must not exist or be empty unless ``overwrite``.
      overwrite: replace an existing non-empty ``out_dir`` at commit.
      join: write into the ``.partial`` folder that another process created (multi-process evaluation; that
        process checks and commits).
      keep: paths that ``overwrite`` must not delete (the data root, the checkpoint): an ``out_dir`` that holds one
        of them, or anything but ``<video>/<frame>.png`` files, is refused.
    """

    _max_pending = 32

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        overwrite: bool = False,
        workers: int = 2,
        join: bool = False,
        keep: Sequence[str | os.PathLike] = (),
    ):
        self.out = Path(out_dir)
        self.tmp = self.out.with_name(f".{self.out.name}.partial")
        if join:
            if not self.tmp.is_dir():
                raise FileNotFoundError(
                    f"{self.tmp} (created by process 0) is not visible from process {jax.process_index()}: "
                    "with several processes the predictions folder must be on a filesystem shared by all of them"
                )
        else:
            check_output_folder(self.out, overwrite, _is_submission_layout, *keep)
            if self.tmp.exists():
                shutil.rmtree(self.tmp)
            self.tmp.mkdir(parents=True)
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="png")
        self._pending: collections.deque[concurrent.futures.Future] = collections.deque()
        self._made: set[str] = set()

    def write(self, video: str, frame: str, ids: np.ndarray) -> None:
        """Queues ``<video>/<frame>.png`` with raw values ``ids + 1``; ids (H, W) are class ids."""
        if video not in self._made:
            (self.tmp / video).mkdir(parents=True, exist_ok=True)
            self._made.add(video)
        raw = ids_to_raw(ids)
        self._pending.append(self._pool.submit(save_palette_png, self.tmp / video / f"{frame}.png", raw))
        while len(self._pending) > self._max_pending:
            self._pending.popleft().result()

    def close(self) -> None:
        """Waits until every queued file is written and stops the encoding threads."""
        while self._pending:
            self._pending.popleft().result()
        self._pool.shutdown()

    def commit(self) -> Path:
        """Waits for every file and moves the folder into place; returns its path."""
        self.close()
        if self.out.exists():
            shutil.rmtree(self.out)
        self.tmp.rename(self.out)
        return self.out

    def abort(self) -> None:
        """Drops everything written so far."""
        self._pool.shutdown(cancel_futures=True)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> PredictionWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


# ---------------------------------------------------------------------------------------------------------
# Evaluation with a model.


def _select_videos(root: str, split: str, num_classes: int, max_videos: int) -> list[EvalVideo]:
    videos = list_eval_videos(root, split, num_classes=num_classes)
    return videos[:max_videos] if max_videos > 0 else videos


def split_videos(frame_counts: Sequence[int], num_processes: int) -> list[int]:
    """Owner process of each video: longest first to the least loaded process (ties: lower index).

    Deterministic, so every process computes the same assignment; each process keeps the split's order.
    """
    loads = [0] * num_processes
    owners = [0] * len(frame_counts)
    for i in sorted(range(len(frame_counts)), key=lambda i: (-frame_counts[i], i)):
        owner = min(range(num_processes), key=lambda p: (loads[p], p))
        owners[i] = owner
        loads[owner] += frame_counts[i]
    return owners


def _all_agree(ok: bool) -> bool:
    """True on every process iff ``ok`` is true on process 0 (a barrier that carries process 0's verdict)."""
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))


def _is_submission_layout(folder: Path) -> bool:
    """Whether ``folder`` holds only ``<video>/<frame>.png`` files (what :class:`PredictionWriter` writes)."""
    for video in folder.iterdir():
        if not video.is_dir() or any(not f.is_file() or f.suffix != ".png" for f in video.iterdir()):
            return False
    return True


def _open_writer(
    predictions_dir: str | os.PathLike | None, overwrite: bool, keep: Sequence[str | os.PathLike] = ()
) -> PredictionWriter | None:
    """The prediction writer of this process: process 0 creates the folder, the others join it."""
    if predictions_dir is None:
        return None
    if jax.process_count() == 1:
        return PredictionWriter(predictions_dir, overwrite=overwrite, keep=keep)
    writer, error = None, ""
    if jax.process_index() == 0:
        try:
            writer = PredictionWriter(predictions_dir, overwrite=overwrite, keep=keep)
        except OSError as e:
            error = str(e)
    if not _all_agree(not error):
        raise FileExistsError(error or f"{predictions_dir}: process 0 could not create it (see its log)")
    return writer if writer is not None else PredictionWriter(predictions_dir, join=True)


def _commit_writer(writer: PredictionWriter, videos: Sequence[EvalVideo]) -> None:
    """Every process's files written -> process 0 checks that all are there and renames the folder."""
    if jax.process_count() == 1:
        writer.commit()
        return
    writer.close()
    _all_agree(True)  # a barrier: every process's files are written
    missing = ""
    if jax.process_index() == 0:
        for video in videos:
            folder = writer.tmp / video.name
            count = len(list(folder.glob("*.png"))) if folder.is_dir() else 0
            if count != video.num_frames:
                missing = (
                    f"{folder}: {count} of {video.num_frames} predictions after every process finished (is "
                    "the predictions folder on a filesystem shared by all processes?)"
                )
                break
        if missing:
            writer.abort()
        else:
            writer.commit()
    if not _all_agree(not missing):
        raise DatasetError(missing or f"{writer.out}: process 0 found predictions missing (see its log)")


def _pool_processes(accumulator: MetricsAccumulator, predicted: int) -> tuple[MetricsAccumulator, int]:
    """Pools the metric totals of all processes (each scored its own videos); the same result everywhere."""
    if jax.process_count() == 1:
        return accumulator, predicted
    from jax.experimental import multihost_utils

    mine = np.concatenate([accumulator.state(), [predicted]])
    rows = np.asarray(multihost_utils.process_allgather(mine.view(np.uint8)))
    pooled = MetricsAccumulator(num_classes=accumulator.num_classes)
    total = 0
    for row in rows.reshape(jax.process_count(), -1):
        values = row.view(np.float64)
        pooled.merge_state(values[:-1])
        total += int(values[-1])
    return pooled, total


def _video_prototypes(
    prototypes: PrototypeSource, segmenter: VideoSegmenter, video: EvalVideo, img_scale: tuple[int, int]
) -> np.ndarray | None:
    if not segmenter.needs_prototypes:
        return None
    if prototypes is None:
        raise ValueError(
            "a CFFM++ model needs per-video prototypes: pass a prototype store (--prototypes DIR, "
            "config.data.prototypes_dir) or 'auto' to compute them on the fly"
        )
    if isinstance(prototypes, str):
        if prototypes != "auto":
            raise ValueError(f"prototypes must be a callable, 'auto' or None, got {prototypes!r}")
        from cffm_jax.prototype_store import prototype_frame_indices

        images = [video.load(t, img_scale=img_scale).image for t in prototype_frame_indices(video.num_frames)]
        return compute_prototypes(segmenter, images, video=video.name)  # = a seed-0 generated store
    return np.asarray(prototypes(video.name), np.float32)


def _score_chunk(accumulator: MetricsAccumulator, chunk: DeviceChunk) -> None:
    """Scores a chunk's frames that have ground truth (a video's frames all have it, or none: VSPW's test split)."""
    video: EvalVideo = chunk.key
    labels = [frame.label for frame in chunk.frames]
    if all(label is not None for label in labels):
        accumulator.update_frames(video.name, chunk.indices[0], chunk.labels, labels)
    elif any(label is not None for label in labels):
        preds = np.asarray(chunk.labels)
        for i, (t, label) in enumerate(zip(chunk.indices, labels, strict=True)):
            if label is not None:
                accumulator.update(video.name, t, preds[i], label)


def _write_chunk(writer: PredictionWriter, chunk: DeviceChunk) -> None:
    video: EvalVideo = chunk.key
    preds = np.asarray(chunk.labels)
    for i, t in enumerate(chunk.indices):
        writer.write(video.name, video.info.frame_names[t], preds[i])


def evaluate_videos(
    model_config: ml_collections.ConfigDict,
    variables: Any,
    data_root: str,
    *,
    split: str = "val",
    img_scale: tuple[int, int] = IMG_SCALE,
    prototypes: PrototypeSource = None,
    max_videos: int = 0,
    predictions_dir: str | os.PathLike | None = None,
    progress: bool = True,
    streaming: bool = True,
    batch_size: int | None = None,
    overwrite: bool = False,
    num_loaders: int | None = None,
    keep: Sequence[str | os.PathLike] = (),
) -> dict[str, Any]:
    """Evaluates a model on every frame of a split (the official test protocol, see the module docstring).

    Args:
      model_config: the model (``cffm_jax.models.model_config``), CFFM or CFFM++.
      variables: its ``{'params', 'batch_stats'}``.
      data_root: VSPW folder or prepared TFDS folder.
      split: split to evaluate; videos without masks are predicted (and saved) but not scored.
      img_scale: test rescale bound (W, H).
      prototypes: CFFM++ only: a callable video name -> (Kp, E) (e.g. a PrototypeStore), or ``'auto'``.
      max_videos: evaluate only the first N videos of the split (0 = all).
      predictions_dir: if given, also write the predictions there (VSPW submission layout).
      progress: show a tqdm progress bar.
      streaming: feature-cache streaming (default) or the clip-by-clip reference.
      batch_size: frames per batch, a multiple of the device count (default 1 per CPU device, 4 per
        accelerator: ``cffm_jax.streaming.default_batch_size``).
      overwrite: allow replacing a non-empty ``predictions_dir`` (an earlier output: one that holds anything else,
        ``data_root`` or a path in ``keep`` is refused).
      keep: more paths ``overwrite`` must never delete (the CLI's checkpoint and prototype store).
      num_loaders: threads that decode and transform frames ahead of the model, in order (default
        :func:`cffm_jax.streaming.loader_threads`: min(8, CPU count)).

    With several processes (``jax.distributed``), call it on every process: each one evaluates its share of
    the videos (:func:`split_videos`) on its local devices and all return the pooled metrics.

    Returns:
      dict with ``miou``, ``miou_gt_present``, ``aacc``, ``macc``, ``fwiou``, ``mvc8``, ``mvc16`` (percent,
      NaN where undefined), ``per_class_iou`` and ``per_class_acc`` (K-lists), ``num_frames``, ``num_videos``
      (labelled ones), ``num_predicted_frames``, ``seconds`` and ``frames_per_second``.
    """
    num_classes = int(model_config.num_classes)
    all_videos = _select_videos(data_root, split, num_classes, max_videos)
    owners = split_videos([v.num_frames for v in all_videos], jax.process_count())
    videos = [v for v, owner in zip(all_videos, owners, strict=True) if owner == jax.process_index()]
    segmenter = VideoSegmenter(model_config, variables, batch_size=batch_size)
    accumulator = MetricsAccumulator(num_classes=num_classes)
    writer = _open_writer(predictions_dir, overwrite, keep=(data_root, *keep))
    img_scale = tuple(int(s) for s in img_scale)
    total = sum(v.num_frames for v in videos)
    if jax.process_count() > 1:
        log.info(
            "process %d of %d evaluates %d of %d videos (%d frames)",
            jax.process_index(),
            jax.process_count(),
            len(videos),
            len(all_videos),
            total,
        )
    start = time.perf_counter()
    predicted = 0
    progress = progress and jax.process_index() == 0
    # One stream of frames over all the videos: the loading threads go on into the next video while the device
    # finishes one, and the segmenter dispatches its first chunk before the last results of the one before.
    keys = ((v, t) for v, video in enumerate(videos) for t in range(video.num_frames))
    frames = ordered_map(
        lambda key: videos[key[0]].load(key[1], img_scale=img_scale), keys, num_loaders or loader_threads()
    )
    try:

        def video_inputs() -> Iterator[tuple[EvalVideo, Iterator[EvalFrame], np.ndarray | None]]:
            for video in videos:
                protos = _video_prototypes(prototypes, segmenter, video, img_scale)
                yield video, itertools.islice(frames, video.num_frames), protos

        # The predictions stay on the device for the metrics; only the predictions writer fetches them, a chunk
        # late (the device works on the next one meanwhile).
        to_write: DeviceChunk | None = None
        with tqdm(total=total, unit="frame", disable=not progress, desc=f"eval {split}") as bar:
            for chunk in segmenter.device_chunks(video_inputs(), streaming=streaming):
                _score_chunk(accumulator, chunk)  # a new video ends the one before (its last frames are scored)
                if writer is not None:
                    if to_write is not None:
                        _write_chunk(writer, to_write)
                    to_write = chunk
                predicted += len(chunk.indices)
                bar.update(len(chunk.indices))
            if to_write is not None:
                _write_chunk(writer, to_write)
            accumulator.end_video()
        if writer is not None:
            _commit_writer(writer, all_videos)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        frames.close()  # an error in this thread: the frames not started yet are not loaded
    accumulator, predicted = _pool_processes(accumulator, predicted)
    seconds = time.perf_counter() - start
    if accumulator.num_frames == 0:
        log.warning("split %r of %s has no labelled frames: the metrics are undefined (NaN)", split, data_root)
    scores = accumulator.compute()
    scores["num_predicted_frames"] = predicted
    scores["seconds"] = seconds
    scores["frames_per_second"] = predicted / seconds if seconds > 0 else math.nan
    return scores


# ---------------------------------------------------------------------------------------------------------
# Scoring saved predictions.


def read_prediction(path: str | os.PathLike, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Reads a prediction PNG (raw values = class id + 1) -> (H, W) uint8 class ids (raw 0 -> 255)."""
    path = os.fspath(path)
    return reduce_zero_label(decode_mask(read_bytes(path), path, num_classes))


def _warn_unscored(root: Path, split: str, in_split: Sequence[EvalVideo], scored: Sequence[EvalVideo]) -> None:
    """Warns about what a predictions folder holds besides the predictions of the split's videos, which scoring
    ignores: entries that are no video of the split (another split's videos are expected, e.g. a whole submission),
    and files in a scored video's folder that are no frame of it."""
    names = {v.name for v in in_split}
    others = sorted(e.name for e in root.iterdir() if e.name not in names or not e.is_dir())
    extra = []
    for video in scored:
        folder = root / video.name
        if folder.is_dir():
            frames = {f"{name}.png" for name in video.info.frame_names}
            extra += sorted(f"{video.name}/{e.name}" for e in folder.iterdir() if e.name not in frames)
    if others:
        log.warning("%s: not scored, no video of split %r (%d): %s", root, split, len(others), _some(others))
    if extra:
        log.warning("%s: not scored, no frame of its video (%d): %s", root, len(extra), _some(extra))


def _some(names: Sequence[str], shown: int = 5) -> str:
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")


def score_predictions(
    predictions_dir: str | os.PathLike,
    data_root: str,
    *,
    split: str = "val",
    num_classes: int = NUM_CLASSES,
    max_videos: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Scores saved predictions (``<dir>/<video>/<frame>.png``, class id + 1) against a split's ground truth.

    Args:
      predictions_dir: folder in the VSPW submission layout.
      data_root: VSPW folder or prepared TFDS folder with the ground truth.
      split: split whose videos are scored (videos without masks are skipped).
      num_classes: K (prediction values must be in 0..K or 255).
      max_videos: score only the first N videos (0 = all).
      progress: show a progress bar.
    Returns:
      the same metric keys as :func:`evaluate_videos` (without the timing keys).
    Raises:
      DatasetError: a missing or unreadable prediction file, or one whose size differs from its frame's.
    """
    root = Path(predictions_dir)
    if not root.is_dir():
        raise DatasetError(f"{root}: predictions folder not found")
    in_split = list_eval_videos(data_root, split, num_classes=num_classes)
    videos = [v for v in in_split[: max_videos if max_videos > 0 else None] if v.has_labels]
    if not videos:
        raise DatasetError(f"split {split!r} of {data_root} has no video with masks to score against")
    _warn_unscored(root, split, in_split, videos)
    accumulator = MetricsAccumulator(num_classes=num_classes)

    def pair(video: EvalVideo, t: int) -> tuple[np.ndarray, np.ndarray]:
        path = root / video.name / f"{video.info.frame_names[t]}.png"
        if not path.is_file():
            raise DatasetError(f"{path}: prediction missing for frame {t} of video {video.name!r}")
        pred = read_prediction(path, num_classes)
        _, label = video.source.load_frame(video.info, t)
        if pred.shape != label.shape:
            raise DatasetError(
                f"{path}: prediction size {pred.shape[1]}x{pred.shape[0]} (WxH) differs from the ground "
                f"truth {label.shape[1]}x{label.shape[0]} of {video.source.frame_name(video.info, t)}"
            )
        return pred, label

    total = sum(v.num_frames for v in videos)
    with tqdm(total=total, unit="frame", disable=not progress, desc=f"score {split}") as bar:
        for video in videos:
            frames = ordered_map(functools.partial(pair, video), range(video.num_frames), loader_threads())
            for t, (pred, label) in enumerate(frames):
                accumulator.update(video.name, t, pred, label)
                bar.update()
            accumulator.end_video()
    return accumulator.compute()


# ---------------------------------------------------------------------------------------------------------
# Output.


def format_table(scores: dict[str, Any]) -> str:
    """The headline metrics as a two-column text table."""
    rows = [(key, scores[key]) for key in METRIC_KEYS if key in scores]
    rows += [(key, scores[key]) for key in ("num_videos", "num_frames", "frames_per_second") if key in scores]
    width = max(len(k) for k, _ in rows)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  -------"]
    for key, value in rows:
        text = f"{value:.2f}" if isinstance(value, float) else str(value)
        lines.append(f"{key:<{width}}  {text}")
    if any(isinstance(scores.get(k), float) and math.isnan(scores[k]) for k in ("mvc8", "mvc16")):
        lines.append(
            f"(mVC nan: no video has {VC_MIN_FRAMES} frames or more; the official consistency script skips the others)"
        )
    return "\n".join(lines)


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """Writes ``data`` as JSON (NaN -> null) via a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_json_safe(data), indent=2) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------
# Command line.


def resolve_data_root(config: ml_collections.ConfigDict) -> str:
    """``config.data.root``, or for '' the synthetic dataset in ``<workdir>/data`` (generated if missing)."""
    if config.data.root:
        return str(config.data.root)
    root = os.path.join(config.workdir, "data")
    if not os.path.isfile(os.path.join(root, f"{config.data.val_split}.txt")):
        from cffm_jax.data.synthetic import generate

        log.info("generating the synthetic dataset in %s", root)
        tmp = f"{root}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        generate(tmp, **config.data.synthetic.to_dict())
        shutil.rmtree(root, ignore_errors=True)
        os.replace(tmp, root)
    return root


def load_config(spec: str, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """Loads ``configs/X.py[:arg]`` (its ``get_config(arg)``) with ``--config.<field>=<value>`` overrides.

    Raises:
      ConfigError: the file cannot be loaded, or an override names an unknown field or has a bad value.
    """
    from absl import flags
    from ml_collections import config_flags

    argv = ["evaluate", f"--config={spec}", *overrides]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=flag_values, lock_config=True, sys_argv=argv)
    try:
        rest = flag_values(argv)
        config = flag_values.config
        config.keys()  # a file that failed to load raises here
    except Exception as e:  # absl and ml_collections raise a variety of types
        raise ConfigError(f"--config {spec}: {config_error_message(e)}") from e
    if len(rest) > 1:
        raise ValueError(f"unrecognized arguments: {' '.join(rest[1:])}")
    return config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cffm_jax.evaluate",
        description="Whole-video CFFM/CFFM++ evaluation (official protocol and metrics), or scoring of saved "
        "predictions. Config fields can be overridden with --config.<field>=<value>.",
        allow_abbrev=False,
    )
    model = parser.add_argument_group("evaluation of a model")
    model.add_argument("--config", help="experiment config file, configs/X.py[:arg]")
    model.add_argument("--checkpoint", help="weights dir, training workdir or raw .pth (default: config.workdir)")
    model.add_argument("--model", help="model name (e.g. cffm_b1) for a raw checkpoint without --config")
    model.add_argument("--predictions-out", help="also save predictions in the VSPW submission layout here")
    model.add_argument("--overwrite", action="store_true", help="replace a non-empty --predictions-out")
    model.add_argument("--prototypes", help="CFFM++: prototype store dir, or 'auto' to compute them on the fly")
    model.add_argument("--img-scale", nargs=2, type=int, metavar=("W", "H"), help="test rescale bound")
    model.add_argument("--no-streaming", action="store_true", help="clip-by-clip reference instead of streaming")
    model.add_argument("--batch-size", type=int, help="frames per batch (multiple of the device count)")
    model.add_argument(
        "--loader-threads", type=int, help="threads decoding and transforming frames (default min(8, CPU count))"
    )
    score = parser.add_argument_group("scoring saved predictions")
    score.add_argument("--predictions", help="folder <video>/<frame>.png to score (no model)")
    score.add_argument("--num-classes", type=int, default=NUM_CLASSES, help="K for --predictions")
    common = parser.add_argument_group("common")
    common.add_argument("--data-root", help="VSPW folder or TFDS folder (default: config.data.root)")
    common.add_argument("--split", help="split (default: config.data.val_split or 'val')")
    common.add_argument("--max-videos", type=int, default=0, help="only the first N videos (0 = all)")
    common.add_argument("--json", help="write every metric to this JSON file")
    common.add_argument("--no-progress", action="store_true", help="no progress bar")
    hosts = parser.add_argument_group("several hosts (default: from the environment, e.g. SLURM, Cloud TPU)")
    hosts.add_argument("--coordinator-address", default="", help="host:port of process 0")
    hosts.add_argument("--num-processes", type=int, default=0, help="number of processes")
    hosts.add_argument("--process-id", type=int, default=-1, help="this process's index")
    return parser


def _model_run(args: argparse.Namespace, config: ml_collections.ConfigDict | None) -> tuple[dict, dict]:
    from cffm_jax.checkpoint import check_video_model, default_img_scale, load_for_inference, warn_if_slow_dtype
    from cffm_jax.prototype_store import PrototypeStore

    checkpoint = args.checkpoint or (config.workdir if config is not None else None)
    if not checkpoint:
        raise ValueError("--checkpoint is required without --config")
    expected = config.model if config is not None else args.model
    variables, model_config = load_for_inference(checkpoint, model=expected)
    check_video_model(model_config, checkpoint)
    if config is not None:
        model_config = config.model  # same architecture (checked); keeps e.g. the computation dtype
    warn_if_slow_dtype(model_config)
    if args.data_root:
        data_root = args.data_root
    elif config is not None:
        data_root = resolve_data_root(config)
    else:
        raise ValueError("--data-root is required without --config")
    split = args.split or (config.data.val_split if config is not None else "val")
    img_scale = default_img_scale(args.img_scale, config.data.img_scale if config is not None else None, checkpoint)
    source = args.prototypes or (config.data.get("prototypes_dir", "") if config is not None else "")
    if not source and config is None and model_config.arch == "cffmpp":
        from cffm_jax.train_state import run_data_setting

        trained = run_data_setting(checkpoint, "prototypes_dir")  # the store the CFFM++ run trained with
        if trained and trained[0]:
            source = str(trained[0])
            log.info("prototypes from %s (data.prototypes_dir in %s)", source, trained[1])
    prototypes: PrototypeSource = None
    if model_config.arch == "cffmpp":
        if source == "auto":
            prototypes = "auto"
        elif source:
            prototypes = PrototypeStore(source)
            made_at = prototypes.info.get("img_scale")
            if made_at is not None and tuple(made_at) != tuple(img_scale):
                log.warning(
                    "the prototypes in %s were computed from frames rescaled to fit %dx%d, this evaluation rescales "
                    "to %dx%d: regenerate them at this scale (python -m cffm_jax.prototypes --img-scale ...) or "
                    "evaluate with --img-scale %d %d",
                    source,
                    *made_at,
                    *img_scale,
                    *made_at,
                )
    elif source:
        log.warning("ignoring prototypes %r: %s is not a CFFM++ model", source, model_config.name)
    scores = evaluate_videos(
        model_config,
        variables,
        data_root,
        split=split,
        img_scale=img_scale,
        prototypes=prototypes,
        max_videos=args.max_videos,
        predictions_dir=args.predictions_out,
        progress=not args.no_progress,
        streaming=not args.no_streaming,
        batch_size=args.batch_size,
        overwrite=args.overwrite,
        num_loaders=args.loader_threads,
        keep=(checkpoint, source if source != "auto" else ""),
    )
    run = {
        "checkpoint": str(checkpoint),
        "model": model_config.name,
        "arch": model_config.arch,
        "data_root": str(data_root),
        "split": split,
        "img_scale": list(img_scale),
        "streaming": not args.no_streaming,
        "prototypes": source if isinstance(source, str) else "",
        "max_videos": args.max_videos,
        "devices": [str(d) for d in jax.local_devices()],
        "predictions_out": args.predictions_out or "",
    }
    return scores, run


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the command line (see the module docstring); returns the scores. Errors raise exceptions."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    host_memory.retain_freed_memory()  # before jax starts its threads
    compilation_cache.enable()
    config = None
    if args.config:
        config = load_config(args.config, extra)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.predictions:
        if config is not None or args.checkpoint:
            parser.error("--predictions scores saved files; it takes no --config or --checkpoint")
        if not args.data_root:
            parser.error("--predictions needs --data-root")
        split = args.split or "val"
        scores = score_predictions(
            args.predictions,
            args.data_root,
            split=split,
            num_classes=args.num_classes,
            max_videos=args.max_videos,
            progress=not args.no_progress,
        )
        run = {"predictions": str(args.predictions), "data_root": str(args.data_root), "split": split}
    else:
        from cffm_jax import sharding

        sharding.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
        scores, run = _model_run(args, config)
        run["processes"] = jax.process_count()
    if jax.process_index() != 0:
        return scores
    print(format_table(scores))  # noqa: T201
    if args.json:
        write_json(args.json, {**scores, "run": run})
        print(f"wrote {args.json}")  # noqa: T201
    return scores


def _cli() -> int:
    from cffm_jax.checkpoint import CheckpointError
    from cffm_jax.logging_utils import run_cli

    return run_cli(
        main,
        (DatasetError, CheckpointError, FileExistsError, FileNotFoundError, ValueError),
        "no metrics, and nothing in --predictions-out (it appears only when an evaluation completes)",
    )


if __name__ == "__main__":
    sys.exit(_cli())

"""Whole-video inference: official test protocol, per-frame feature cache (SPEC.md 4.2, 5, 7, 10.2).

Test protocol (SPEC sections 7, 10.2, 10.3): every frame t of a video is the target of one clip,
``cffm_jax.data.vspw.eval_clip_indices(t)`` -- frames 0, 1, 2 alone (T = 1: the model returns the plain
per-frame logits), 3..8 the fixed sets ([0,1,2,3], [0,2,3,4], ...), t >= 9 [t-9, t-6, t-3, t]. Frames enter
the network at the test size (keep-ratio rescale to fit ``img_scale``, each side resized to a multiple of 32:
``cffm_jax.data.transforms.test_resize``; uint8 frames are normalised on the device). The target logits (1/4
resolution) are resized bilinearly (PyTorch ``align_corners=False``) first to the network input size and then to
the original frame size, and the argmax over classes is the prediction (the official softmax before the argmax does
not change it).

:class:`VideoSegmenter` runs that protocol in two modes that give the same predictions:

* **streaming** (default): each frame goes through ``encode_frames`` (backbone, all-MLP decoder, per-frame
  logits, 1/8 features) exactly once. The 1/8 features are written into a device-resident ring buffer of
  ``R = batch_size + 9`` frames (slot = frame index mod R), from which the clip features of every target are
  gathered for ``decode_clip`` (the CFFM cross-frame attention and, for CFFM++, the prototype branch). Frames
  0-2 take their own per-frame logits (a chunk of only such frames skips ``decode_clip``). Frames are processed
  in chunks of ``batch_size``: one ``encode_frames`` call on the chunk's frames, then one ``decode_clip`` call on
  the chunk's targets (whose references are at most 9 frames back, hence in the ring). Memory is bounded by the
  ring (the clip span plus one chunk), not by the video length. The encoder compiles once per network input
  size (the frame-size bucket of the test transform: 720p, 1080p and 4K frames all enter at 480x864). The
  resize of the logits to the original size and the argmax compile once per original size: on accelerators as a
  small program of their own (``_labels_step``), so the decoder too compiles once per input size; on CPU inside
  the decode step (``fuse_labels``: one program less per frame).
* **clip-by-clip** (``streaming=False``, the reference): the whole clip of every target through the model
  (T = 1 for frames 0-2, T = 4 after), as the official ``tools/test.py`` does; each frame passes through the
  backbone up to four times. :func:`clip_forward` computes ``model.apply`` there as two programs.

Several devices: the batch of frames (streaming encode), the batch of target clips (decode, clip mode) and the
resize/argmax are sharded over a 1-D ``('data',)`` mesh of the local devices; variables, prototypes and the
feature ring are replicated. ``batch_size`` must be a multiple of the device count.

Also here: :func:`compute_prototypes` (CFFM++ prototypes of a video on the fly, SPEC section 6), :func:`prefetch`
(iterate in a background thread) and :func:`ordered_map` (load frames on several threads, in order).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cffm_jax import xla_options
from cffm_jax.data.pipeline import EvalFrame
from cffm_jax.data.vspw import DILATIONS, eval_clip_indices
from cffm_jax.kmeans import kmeans
from cffm_jax.models import build_model
from cffm_jax.models.cffm import quarter_size, upsample_logits
from cffm_jax.models.layers import argmax_classes

log = logging.getLogger(__name__)

# Frames per chunk and device: on CPU one frame per chunk is fastest (the working set of the cross-frame attention
# stays in cache; CFFM-B0 streaming at 480x480: 0.43 s per target with 1, 0.50 s with 4 frames per chunk);
# accelerators need larger batches to be busy.
CPU_BATCH_PER_DEVICE = 1
ACCELERATOR_BATCH_PER_DEVICE = 4
# Frames before a target that a later target can still reference (the oldest clip member is t - 9).
CLIP_SPAN = -DILATIONS[0]
NUM_EARLY_FRAMES = 3  # targets 0, 1, 2 are predicted without temporal context (T = 1)
NUM_PROTOTYPES = 100


@dataclasses.dataclass(frozen=True)
class FrameResult:
    """The prediction for one frame.

    Attributes:
      index: frame position in the video.
      frame: the input frame (its ``label`` is passed through for evaluation).
      pred: (H, W) class ids at the original frame size (uint8 when K <= 256, else int32).
      logits: (h, w, K) float32 target logits at 1/4 of the network input size, if requested.
    """

    index: int
    frame: EvalFrame
    pred: np.ndarray
    logits: np.ndarray | None = None


def default_batch_size(devices: Sequence[jax.Device]) -> int:
    """Frames per chunk for ``devices``: 1 per CPU device, 4 per GPU/TPU device."""
    cpu = devices[0].platform == "cpu"
    return (CPU_BATCH_PER_DEVICE if cpu else ACCELERATOR_BATCH_PER_DEVICE) * len(devices)


def _labels(logits: jax.Array, input_size: tuple[int, int], output_size: tuple[int, int]) -> jax.Array:
    """(B, h, w, K) logits -> (B, H, W) class ids: bilinear to the input size, then to the original size."""
    x = upsample_logits(logits.astype(jnp.float32), input_size)
    x = upsample_logits(x, output_size)
    ids = argmax_classes(x)
    return ids.astype(jnp.uint8) if logits.shape[-1] <= 256 else ids.astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _labels_step(
    sizes: tuple[tuple[int, int], tuple[int, int]], sharding: NamedSharding | None, logits: jax.Array
) -> jax.Array:
    """:func:`_labels` as a program of its own: clip mode, early streaming chunks, and streaming decode steps
    without ``fuse_labels`` (there a video whose frames enter the network at a size seen before compiles only this
    and reuses the encoder and decoder programs, which depend on the network input size alone)."""
    return _labels(_constrain(logits, sharding), *sizes)


def _constrain(x: jax.Array, sharding: NamedSharding | None) -> jax.Array:
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def _broadcast_prototypes(prototypes: jax.Array | None, batch: int) -> jax.Array | None:
    return None if prototypes is None else jnp.broadcast_to(prototypes, (batch, *prototypes.shape))


@xla_options.jit("encoder", model_argnum=0, static_argnums=(0, 3))
def _encode(
    model: nn.Module, variables: Any, images: jax.Array, with_logits: bool = True
) -> tuple[jax.Array | None, jax.Array]:
    return model.apply(variables, images, with_logits=with_logits, method="encode_frames")


# Columns of a streaming chunk's slot table (B, 6) int32, one row per chunk row: the ring slot its frame's features go
# to, the ring slots of its target's 4 clip members, 1 where the target takes its per-frame logits (frames 0-2). One
# small host array per chunk, handed to the jitted step as it is (jit's own transfer: ~5x cheaper on the main thread
# than a ``jax.device_put`` per index array, which the loading threads' GIL makes slower still).
_WRITE_SLOT, _CLIP_SLOTS, _PERFRAME = 0, slice(1, 5), 5


def _write_ring(ring: jax.Array, feats: jax.Array, slots: jax.Array) -> jax.Array:
    """Stores a chunk's 1/8 features in their ring slots (``slots``: the chunk's slot table)."""
    return ring.at[slots[:, _WRITE_SLOT]].set(feats.astype(ring.dtype))


@xla_options.jit("default", model_argnum=0, static_argnums=(0, 1, 2, 3), donate_argnums=(5,))
def _decode_step(
    model: nn.Module,
    input_size: tuple[int, int],
    original_size: tuple[int, int] | None,
    sharding: NamedSharding | None,
    variables: Any,
    ring: jax.Array,
    logits: jax.Array | None,
    feats: jax.Array,
    slots: jax.Array,
    prototypes: jax.Array | None,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Writes a chunk's features into the ring and decodes its targets (``slots``: the chunk's slot table): logits
    (B, h, w, K) at 1/4 of the network ``input_size`` (targets among frames 0-2 take their per-frame ``logits``), and
    with ``original_size`` also their labels at that size (:func:`_labels`), else None."""
    ring = _write_ring(ring, feats, slots)
    clip_feats = _constrain(ring[slots[:, _CLIP_SLOTS]], sharding)  # (B, 4, h8, w8, E)
    batch = slots.shape[0]
    target = model.apply(
        variables,
        clip_feats,
        size=quarter_size(input_size),
        prototypes=_broadcast_prototypes(prototypes, batch),
        method="decode_clip",
    )
    out = target
    if logits is not None:  # some target of this chunk is one of a video's first frames
        out = jnp.where(slots[:, _PERFRAME, None, None, None] > 0, logits.astype(target.dtype), target)
    return ring, out, None if original_size is None else _labels(out, input_size, original_size)


# A chunk whose targets are all among frames 0-2 only stores its features: its targets take their own per-frame
# logits, no ``decode_clip`` (one frame per chunk on CPU: 3 of a video's decode steps saved).
_store_step = jax.jit(_write_ring, donate_argnums=(0,))


def encode_clips(
    model: nn.Module, sharding: NamedSharding | None, with_logits: bool, variables: Any, clips: jax.Array
) -> tuple[jax.Array | None, jax.Array]:
    """The per-frame part of a clip-mode forward: clips (B, T, H, W, 3) -> (per-frame logits (B, T, h, w, K) or
    None, 1/8 features (B, T, h8, w8, E))."""
    clips = _constrain(clips, sharding)
    b, t = clips.shape[:2]
    frames = clips.reshape(b * t, *clips.shape[2:])
    logits, feats = model.apply(variables, frames, with_logits=with_logits, method="encode_frames")
    logits = None if logits is None else logits.reshape(b, t, *logits.shape[1:])
    return logits, feats.reshape(b, t, *feats.shape[1:])


def decode_clips(
    model: nn.Module,
    size: tuple[int, int],
    sharding: NamedSharding | None,
    variables: Any,
    feats: jax.Array,
    prototypes: jax.Array | None,
) -> jax.Array:
    """The temporal part of a clip-mode forward: 1/8 features (B, T, h8, w8, E) -> target logits at ``size``."""
    feats = _constrain(feats, sharding)
    protos = _broadcast_prototypes(prototypes, feats.shape[0])
    return model.apply(variables, feats, size=size, prototypes=protos, method="decode_clip")


_encode_clips = xla_options.jit("encoder", model_argnum=0, static_argnums=(0, 1, 2))(encode_clips)
_decode_clips = xla_options.jit("default", model_argnum=0, static_argnums=(0, 1, 2))(decode_clips)


def clip_forward(
    model: nn.Module,
    variables: Any,
    clips: jax.Array,
    prototypes: jax.Array | None = None,
    sharding: NamedSharding | None = None,
) -> jax.Array:
    """``model.apply(variables, clips, prototypes=...)`` in evaluation, as two programs.

    Same outputs (to float32 rounding): T == num_clips gives the target logits, otherwise the per-frame logits of the
    last frame. The per-frame part compiles with the encoder's XLA options and the temporal part with XLA's defaults
    (``cffm_jax.xla_options``): 7% faster than one program on a 2-core CPU (CFFM-B0, 1 x 4 x 480 x 480).

    Args:
      clips: (B, T, H, W, 3) normalised (or uint8) frames, references first. prototypes: (Kp, E), CFFM++ only.
      sharding: optional sharding of the batch dimension.
    """
    if clips.shape[1] != model.decode_head.num_clips:
        logits, _ = _encode_clips(model, sharding, True, variables, clips)
        return logits[:, -1]
    _, feats = _encode_clips(model, sharding, False, variables, clips)
    return _decode_clips(model, quarter_size(clips.shape[2:4]), sharding, variables, feats, prototypes)


# Chunks whose predictions :meth:`VideoSegmenter.device_chunks` lets the device work on before the host waits for the
# oldest: without a wait, a host faster than the device would queue work, and its memory, without bound.
MAX_CHUNKS_IN_FLIGHT = 3


@dataclasses.dataclass(frozen=True)
class DeviceChunk:
    """Predictions of consecutive frames of one video, left on the device (:meth:`VideoSegmenter.device_chunks`).

    Attributes:
      key: the video's key.
      indices: the frames' positions in the video, consecutive.
      frames: the input frames (their ``label`` passed through).
      labels: (B, H, W) class ids at the original frame size, on the device (uint8 when K <= 256, else int32);
        B >= len(indices): rows past ``len(indices)`` pad the chunk.
    """

    key: Any
    indices: list[int]
    frames: list[EvalFrame]
    labels: jax.Array


@dataclasses.dataclass
class _Pending:
    """A dispatched chunk whose device results have not been fetched yet."""

    indices: list[int]
    frames: list[EvalFrame]
    logits: jax.Array
    labels: jax.Array


class VideoSegmenter:
    """Segments videos frame by frame with the official test protocol (see the module docstring).

    Args:
      config: model config (``cffm_jax.models.model_config``), arch 'cffm' or 'cffmpp'.
      variables: ``{'params', 'batch_stats'}`` of that model (numpy or jax arrays).
      batch_size: frames per chunk (a multiple of the device count); default :func:`default_batch_size`.
      devices: devices of the ('data',) mesh; default ``jax.local_devices()``.
      keep_logits: also return the 1/4-resolution target logits of every frame (tests, debugging).
      fuse_labels: compute the labels (resize to the original frame size, argmax) inside the streaming decode step:
        one program less per frame (CFFM-B1 streaming ~5% faster on a 2-core CPU), but then the decode step compiles
        once per original frame size too, not only per network input size. Default: on CPU, where that takes ~2
        s; not on accelerators, where the decoder compiles for 20+ s at float32 'highest'.
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        variables: Any,
        *,
        batch_size: int | None = None,
        devices: Sequence[jax.Device] | None = None,
        keep_logits: bool = False,
        fuse_labels: bool | None = None,
    ):
        if config.arch not in ("cffm", "cffmpp"):
            raise ValueError(f"video segmentation needs a CFFM or CFFM++ model, got arch {config.arch!r}")
        self.config = config
        self.model = build_model(config)
        devices = list(devices) if devices is not None else jax.local_devices()
        self.mesh = Mesh(np.asarray(devices), ("data",))
        num_devices = len(devices)
        self.batch_size = int(default_batch_size(devices) if batch_size is None else batch_size)
        if self.batch_size < 1 or self.batch_size % num_devices:
            raise ValueError(f"batch_size {self.batch_size} must be a positive multiple of {num_devices} devices")
        self._replicated = NamedSharding(self.mesh, PartitionSpec())
        self._batch = NamedSharding(self.mesh, PartitionSpec("data"))
        self._constraint = self._batch if num_devices > 1 else None
        self.variables = jax.device_put(variables, self._replicated)
        self.keep_logits = keep_logits
        self.fuse_labels = devices[0].platform == "cpu" if fuse_labels is None else bool(fuse_labels)
        self.ring_size = self.batch_size + CLIP_SPAN
        self._rings: dict[tuple[int, ...], jax.Array] = {}
        self._sizes_seen: set[tuple[int, int]] = set()  # network input sizes

    @property
    def needs_prototypes(self) -> bool:
        """Whether the model is CFFM++ (then every video needs its (Kp, E) prototypes)."""
        return self.config.arch == "cffmpp"

    # ----------------------------------------------------------------------------------------------------
    # Device placement helpers.

    def _put_batch(self, images: list[np.ndarray]) -> jax.Array:
        """Stacks arrays, pads to ``batch_size`` by repeating the last one, shards along the batch."""
        pad = self.batch_size - len(images)
        batch = np.stack(list(images) + [images[-1]] * pad)
        return jax.device_put(batch, self._batch)

    def _put_prototypes(self, prototypes: Any) -> jax.Array | None:
        if not self.needs_prototypes:
            return None
        if prototypes is None:
            raise ValueError(
                "CFFM++ needs the video's prototypes (Kp, E): pass a prototype store or compute them with "
                "cffm_jax.streaming.compute_prototypes"
            )
        prototypes = np.asarray(prototypes, np.float32)
        e = self.config.decoder_embed_dim
        if prototypes.ndim != 2 or prototypes.shape[1] != e:
            raise ValueError(f"prototypes must have shape (Kp, {e}) for this model, got {prototypes.shape}")
        return jax.device_put(prototypes, self._replicated)

    def encode(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """``encode_frames`` on any number of frames of one size, in chunks of ``batch_size``.

        Args:
          images: N network inputs (H, W, 3): uint8 RGB (``transforms.test_resize``) or float32 normalised.
        Returns:
          per-frame logits (N, H/4, W/4, K) and 1/8 features (N, H/8, W/8, E), float32 numpy.
        """
        logits, feats = [], []
        for start in range(0, len(images), self.batch_size):
            chunk = list(images[start : start + self.batch_size])
            out_logits, out_feats = _encode(self.model, self.variables, self._put_batch(chunk))
            logits.append(np.asarray(out_logits, np.float32)[: len(chunk)])
            feats.append(np.asarray(out_feats, np.float32)[: len(chunk)])
        return np.concatenate(logits), np.concatenate(feats)

    # ----------------------------------------------------------------------------------------------------
    # The two modes.

    def segment(
        self, frames: Iterable[EvalFrame], prototypes: Any = None, *, streaming: bool = True
    ) -> Iterator[FrameResult]:
        """Predicts every frame of one video, in order.

        Args:
          frames: the video's frames in temporal order through the test transform (``EvalFrame``: image
            (H', W', 3) uint8 or normalised float32, original_size (H, W); ``label`` is passed through untouched). All
            frames must have the same size.
          prototypes: (Kp, E) prototypes of this video (CFFM++ only).
          streaming: feature-cache mode (default) or the clip-by-clip reference.
        Yields:
          a :class:`FrameResult` per frame, in order. Device work for a chunk is dispatched before the
          previous chunk's results are fetched, so loading and device compute overlap.
        """
        for _, result in self.segment_videos([(None, frames, prototypes)], streaming=streaming):
            yield result

    def segment_videos(
        self, videos: Iterable[tuple[Any, Iterable[EvalFrame], Any]], *, streaming: bool = True
    ) -> Iterator[tuple[Any, FrameResult]]:
        """:meth:`segment` of several videos one after another, without the device waiting between them: a video's
        first chunk is dispatched before the results of the one before it are fetched.

        Args:
          videos: ``(key, frames, prototypes)`` per video, as :meth:`segment` takes them; drawn lazily, one video
            after the previous one's frames are exhausted (and the prototypes of a video in its turn).
          streaming: feature-cache mode (default) or the clip-by-clip reference.
        Yields:
          ``(key, FrameResult)`` per frame: the videos in order, each one's frames in order.
        """
        pending: tuple[Any, _Pending] | None = None
        for dispatched in self._dispatch(videos, streaming):
            if pending is not None:
                yield from self._fetch(*pending)
            pending = dispatched
        if pending is not None:
            yield from self._fetch(*pending)

    def device_chunks(
        self, videos: Iterable[tuple[Any, Iterable[EvalFrame], Any]], *, streaming: bool = True
    ) -> Iterator[DeviceChunk]:
        """:meth:`segment_videos` with the predictions left on the device, a chunk of frames at a time (evaluation
        scores them there): each chunk is yielded as soon as it is dispatched, and the host waits only for the chunk
        ``MAX_CHUNKS_IN_FLIGHT`` before it, to bound the work and memory queued on the device.
        """
        in_flight: collections.deque[jax.Array] = collections.deque()
        for key, pending in self._dispatch(videos, streaming):
            in_flight.append(pending.labels)
            if len(in_flight) > MAX_CHUNKS_IN_FLIGHT:
                in_flight.popleft().block_until_ready()
            yield DeviceChunk(key, pending.indices, pending.frames, pending.labels)

    def _dispatch(
        self, videos: Iterable[tuple[Any, Iterable[EvalFrame], Any]], streaming: bool
    ) -> Iterator[tuple[Any, _Pending]]:
        """Dispatches the chunks of every video in turn, yielding each with its video's key once dispatched."""
        step = self._stream_chunk if streaming else self._clip_chunk
        for key, frames, prototypes in videos:
            protos = self._put_prototypes(prototypes)
            images: dict[int, np.ndarray] = {}  # clip mode: recent frames, at most the clip span + one chunk
            for indices, chunk in _chunks(_checked(frames), self.batch_size):
                if indices[0] == 0:
                    self._note_size(chunk[0])
                yield key, step(indices, chunk, protos, images)

    def _sizes(self, frame: EvalFrame) -> tuple[tuple[int, int], tuple[int, int]]:
        return tuple(frame.image.shape[:2]), tuple(int(s) for s in frame.original_size)

    def _note_size(self, frame: EvalFrame) -> None:
        """Says when a video brings a network input size new to this segmenter: its programs compile first
        (minutes on a GPU at float32 'highest'), unless this process or the compilation cache has them already. A
        new original size alone compiles only the resize to it (``_labels_step``), or on CPU (``fuse_labels``) the
        decode step again (~2 s)."""
        input_size, original_size = self._sizes(frame)
        if input_size not in self._sizes_seen:
            self._sizes_seen.add(input_size)
            log.info(
                "first video with frames of %dx%d (network input %dx%d): compiling its programs, unless cached",
                *original_size,
                *input_size,
            )

    def _ring(self, feats: jax.Array) -> jax.Array:
        key = (*feats.shape[1:], str(feats.dtype))
        if key not in self._rings:
            ring = jnp.zeros((self.ring_size, *feats.shape[1:]), feats.dtype)
            self._rings[key] = jax.device_put(ring, self._replicated)
        return self._rings.pop(key)

    def _stream_chunk(
        self, indices: list[int], chunk: list[EvalFrame], protos: jax.Array | None, images: dict
    ) -> _Pending:
        del images
        b, r = self.batch_size, self.ring_size
        early = indices[0] < NUM_EARLY_FRAMES  # per-frame logits are needed only for frames 0-2
        logits, feats = _encode(self.model, self.variables, self._put_batch([f.image for f in chunk]), early)
        start = indices[0]
        targets = indices + [indices[-1]] * (b - len(indices))
        slots = np.empty((b, 6), np.int32)
        slots[:, _WRITE_SLOT] = np.arange(start, start + b) % r  # padding rows land in slots no target still needs
        slots[:, _CLIP_SLOTS] = [[s % r for s in _clip(t)] for t in targets]
        slots[:, _PERFRAME] = [t < NUM_EARLY_FRAMES for t in targets]
        ring = self._ring(feats)
        input_size, original_size = self._sizes(chunk[0])
        if slots[:, _PERFRAME].all():
            ring, out, labels = _store_step(ring, feats, slots), logits, None
        else:
            ring, out, labels = _decode_step(
                self.model,
                input_size,
                original_size if self.fuse_labels else None,
                self._constraint,
                self.variables,
                ring,
                logits,
                feats,
                slots,
                protos,
            )
        if labels is None:
            labels = _labels_step((input_size, original_size), self._constraint, out)
        self._rings[(*feats.shape[1:], str(feats.dtype))] = ring
        return _Pending(indices, chunk, out, labels)

    def _clip_chunk(
        self, indices: list[int], chunk: list[EvalFrame], protos: jax.Array | None, images: dict
    ) -> _Pending:
        for t, frame in zip(indices, chunk, strict=True):
            images[t] = frame.image
        sizes = self._sizes(chunk[0])
        outs, labels = [], []
        early = [t for t in indices if t < NUM_EARLY_FRAMES]
        late = [t for t in indices if t >= NUM_EARLY_FRAMES]
        for targets, p in ((early, None), (late, protos)):
            if not targets:
                continue
            clips = [np.stack([images[i] for i in eval_clip_indices(t)]) for t in targets]
            out = clip_forward(self.model, self.variables, self._put_batch(clips), p, self._constraint)
            ids = _labels_step(sizes, self._constraint, out)
            outs.append(out[: len(targets)])
            labels.append(ids[: len(targets)])
        oldest_needed = indices[-1] + 1 - CLIP_SPAN
        for i in [i for i in images if i < oldest_needed]:
            del images[i]
        return _Pending(indices, chunk, jnp.concatenate(outs), jnp.concatenate(labels))

    def _fetch(self, key: Any, pending: _Pending) -> Iterator[tuple[Any, FrameResult]]:
        labels = np.asarray(pending.labels)
        logits = np.asarray(pending.logits, np.float32) if self.keep_logits else None
        for i, (t, frame) in enumerate(zip(pending.indices, pending.frames, strict=True)):
            yield key, FrameResult(t, frame, labels[i], None if logits is None else logits[i])


def _clip(t: int) -> list[int]:
    """The 4 clip members of target t for the streaming decode (targets 0-2: a placeholder, never used)."""
    return [t] * 4 if t < NUM_EARLY_FRAMES else eval_clip_indices(t)


def _checked(frames: Iterable[EvalFrame]) -> Iterator[EvalFrame]:
    """Passes frames through, checking that every frame of the video has the first frame's sizes."""
    first: tuple | None = None
    for t, frame in enumerate(frames):
        sizes = (frame.image.shape, tuple(frame.original_size))
        if first is None:
            first = sizes
        elif sizes != first:
            raise ValueError(
                f"frame {t} has size {tuple(frame.original_size)} (network input {frame.image.shape[:2]}), "
                f"but frame 0 has {first[1]} ({first[0][:2]}): all frames of a "
                "video must have the same size"
            )
        yield frame


def _chunks(frames: Iterable[EvalFrame], size: int) -> Iterator[tuple[list[int], list[EvalFrame]]]:
    indices: list[int] = []
    chunk: list[EvalFrame] = []
    for t, frame in enumerate(frames):
        indices.append(t)
        chunk.append(frame)
        if len(chunk) == size:
            yield indices, chunk
            indices, chunk = [], []
    if chunk:
        yield indices, chunk


def compute_prototypes(
    segmenter: VideoSegmenter,
    images: Sequence[np.ndarray],
    *,
    num_prototypes: int = NUM_PROTOTYPES,
    seed: int = 0,
    max_iter: int = 10,
    video: str | None = None,
) -> np.ndarray:
    """CFFM++ prototypes of one video on the fly (SPEC section 6): k-means centres of its 1/8 features.

    Args:
      segmenter: a segmenter of the model whose ``encode_frames`` features are clustered.
      images: the video's prototype frames through the test transform (the official rule picks 10 frames,
        ``cffm_jax.prototype_store.prototype_frame_indices``), (H', W', 3) uint8 (``transforms.test_resize``) or
        float32 normalised, all the same size.
      num_prototypes: K of the k-means (100 in the official code).
      seed: seed of the k-means initialisation (the official code is unseeded).
      max_iter: k-means iterations (10 in the official code).
      video: the video's name: the k-means initialisation key is then ``cffm_jax.prototypes.video_key(seed,
        video)``, as for ``python -m cffm_jax.prototypes``, so the result equals a store generated with the same
        seed; None: ``jax.random.key(seed)``.
    Returns:
      (num_prototypes, E) float32.
    """
    _, feats = segmenter.encode(images)
    x = feats.reshape(-1, feats.shape[-1])  # rows ordered (frame, y, x), as the official generator
    if x.shape[0] < num_prototypes:
        raise ValueError(
            f"{x.shape[0]} feature vectors are too few for {num_prototypes} prototypes (frames too small?)"
        )
    if video is None:
        key = jax.random.key(seed)
    else:
        from cffm_jax.prototypes import video_key

        key = video_key(seed, video)
    centers, _ = kmeans(x, k=num_prototypes, key=key, max_iter=max_iter)
    return np.asarray(centers, np.float32)


_END = object()


def prefetch(iterable: Iterable[Any], size: int = 4) -> Iterator[Any]:
    """Iterates ``iterable`` in a background thread, at most ``size`` items ahead (e.g. frame decoding).

    Exceptions of the producer are re-raised in the consumer; closing the returned generator stops the thread
    at its next item.
    """
    q: queue.Queue = queue.Queue(maxsize=max(1, size))
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in iterable:
                if not put((item, None)):
                    return
            put((_END, None))
        except BaseException as e:  # forwarded to the consumer
            put((_END, e))

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = q.get()
            if item is _END:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()


def loader_threads() -> int:
    """Default number of frame-loading threads: min(8, CPU count). Decoding and the test transform (numpy, Pillow)
    release the GIL: on a 2-core Zen 4 one thread loads ~110 480x853 VSPW frames/s, two threads 1.2-1.7x as many;
    an H100 segments 341 frames/s with CFFM-B1 at TF32. On an H200 machine's 16-core Xeon, evaluation made 158 frames/s
    with 8 threads and 143 with 16 (BENCHMARKS.md)."""
    return min(8, os.cpu_count() or 1)


def ordered_map(
    fn: Callable[[Any], Any], items: Iterable[Any], workers: int, ahead: int | None = None
) -> Iterator[Any]:
    """``fn(item)`` for every item, computed on ``workers`` threads, yielded in the order of ``items``.

    At most ``ahead`` results (default ``2 * workers``) are computed or waiting ahead of the consumer; ``items`` is
    drawn lazily, by the consumer's thread. An exception of ``fn`` is raised when its item's turn comes. Closing
    the returned generator cancels the work not started yet.
    """
    workers = max(1, int(workers))
    ahead = max(1, ahead or 2 * workers)
    pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="load")
    pending: collections.deque[concurrent.futures.Future] = collections.deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=False, cancel_futures=True)

"""Per-video CFFM++ prototype generation (SPEC.md section 6; used by the CFFM++ head, section 5).

For every video of the chosen splits (default train + val + test, as the official run):

1. the 10 frames ``int((i + 0.5) * (n // 10))``, i = 0..9 (frame 0 ten times when n < 10;
   :func:`cffm_jax.prototype_store.prototype_frame_indices`) go through the test transform (SPEC 10.3:
   keep-ratio rescale to fit ``img_scale``, each side resized to a multiple of 32, normalise);
2. ``encode_frames`` of a trained CFFM (or CFFM++: its frozen encoder is the CFFM one) gives the
   ``linear_fuse`` output bilinearly resized to (int(h/2), int(w/2)); rows ordered (frame, y, x) form
   X (10*h8*w8, E);
3. Lloyd k-means (:mod:`cffm_jax.kmeans`: the official algorithm, K = 100, 10 iterations, tol 1e-4, K distinct
   random rows as the initial centres) clusters X; the K centres are the video's prototypes;
4. they are written atomically to a :class:`cffm_jax.prototype_store.PrototypeStore` (``<out>/<video>.npy``).

Reproducibility: the official initialisation is unseeded; here video v is initialised with the key
:func:`video_key` ``(seed, v)`` (the seed folded with a hash of the name), so a video's prototypes depend only
on the checkpoint, the seed, ``img_scale`` and the k-means settings, not on the processing order, the split
selection or resumption. On CPU reruns are bit-identical. On GPU the k-means centre sums use scatter-add,
which XLA makes deterministic only with ``--xla_gpu_deterministic_ops=true``; the command line adds that flag
to ``XLA_FLAGS`` unless the flag is already set.

Resumption: videos already in the store are skipped (``overwrite`` recomputes them); every file is written
atomically, so a killed run leaves only complete videos. The store's manifest records the settings (model,
seed, img_scale, frames, k-means settings) and the checkpoint; resuming with different settings or another
embedding dimension is an error, a different checkpoint path only a warning.

Devices: the frames of one video are encoded in batches of ``batch_frames`` (rounded up to a multiple of the
local device count, padded by repeating the last frame) sharded over a 1-D ``('data',)`` mesh of the local
devices, with replicated variables; the k-means of the video then runs on the first device. Each jitted
function compiles once per network input size. Frames are decoded in background threads while the device
works. One process: for several hosts, run one process per host on disjoint ``--splits`` (they may share the
store directory: writes are per video and atomic).

Command lines::

    python -m cffm_jax.prototypes --checkpoint PATH [--model NAME] --data-root ROOT --out DIR
        [--splits train,val,test] [--img-scale W H] [--num-prototypes 100] [--seed 0] [--batch-frames 10]
        [--overwrite] [--no-progress]
    python -m cffm_jax.prototypes --config configs/prototypes_vspw.py:b1 [--config.<field>=<value> ...]
        [flags]

With ``--config``, explicit flags win over config fields: checkpoint <- ``init_from`` (when the config has a
``prototypes`` section or is a CFFM++ config) or ``workdir``; data root <- ``data.root`` ('' = the synthetic
dataset in ``<workdir>/data``, generated if missing); out <- ``data.prototypes_dir``; splits <-
``data.splits``; img_scale <- ``data.img_scale``; seed <- ``seed``; num_prototypes, num_frames, max_iter,
tol, init, overwrite <- ``prototypes.*``; ``progress``.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import einops
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from cffm_jax import compilation_cache, host_memory, xla_options
from cffm_jax.checkpoint import default_img_scale
from cffm_jax.data.pipeline import EvalVideo, list_eval_videos, load_eval_frame, video_names
from cffm_jax.data.transforms import IMG_SCALE
from cffm_jax.data.vspw import DatasetError, is_tfds_dir, split_file
from cffm_jax.kmeans import kmeans_with_info
from cffm_jax.models import build_model
from cffm_jax.prototype_store import PrototypeStore, prototype_frame_indices

log = logging.getLogger("cffm_jax.prototypes")  # the same name under python -m

SPLITS = ("train", "val", "test")
NUM_PROTOTYPES = 100
NUM_FRAMES = 10
GENERATOR = "cffm_jax.prototypes"
# Model config fields that decide the features fed to k-means (everything of the encoder: backbone, MLP
# decoder, linear_fuse). A CFFM++ checkpoint shares them with the CFFM it was fine-tuned from.
_ENCODER_FIELDS = ("embed_dims", "depths", "num_heads", "sr_ratios", "mlp_ratios", "decoder_embed_dim")


def video_key(seed: int, video: str) -> jax.Array:
    """The k-means initialisation key of one video: ``fold_in(key(seed), first 4 bytes of sha256(name))``.

    Independent of the processing order and of Python's per-process string hashing.
    """
    digest = hashlib.sha256(video.encode("utf-8")).digest()
    return jax.random.fold_in(jax.random.key(seed), int.from_bytes(digest[:4], "little"))


@xla_options.jit("encoder", model_argnum=0, static_argnums=0)
def _encode_features(model, variables: Any, images: jax.Array) -> jax.Array:
    """(B, H, W, 3) uint8 or normalised frames -> (B, H/8, W/8, E) 1/8 features."""
    return model.apply(variables, images, with_logits=False, method="encode_frames")[1]


class PrototypeGenerator:
    """Computes the prototypes of one video from its prototype frames (see the module docstring).

    Args:
      model_config: ``cffm_jax.models.model_config`` of a CFFM or CFFM++ model.
      variables: ``{'params', 'batch_stats'}`` of that model (numpy or jax arrays).
      num_prototypes: K, the number of k-means centres.
      seed: base seed of the k-means initialisation (see :func:`video_key`).
      max_iter, tol, init: k-means settings (:func:`cffm_jax.kmeans.kmeans_with_info`).
      batch_frames: frames per ``encode_frames`` call, rounded up to a multiple of the device count.
      devices: devices of the ('data',) mesh; default ``jax.local_devices()``.
    """

    def __init__(
        self,
        model_config: ml_collections.ConfigDict,
        variables: Any,
        *,
        num_prototypes: int = NUM_PROTOTYPES,
        seed: int = 0,
        max_iter: int = 10,
        tol: float = 1e-4,
        init: str = "random",
        batch_frames: int = NUM_FRAMES,
        devices: Sequence[jax.Device] | None = None,
    ):
        check_model(model_config)
        if num_prototypes < 1:
            raise ValueError(f"num_prototypes must be >= 1, got {num_prototypes}")
        if batch_frames < 1:
            raise ValueError(f"batch_frames must be >= 1, got {batch_frames}")
        self.config = model_config
        self.model = build_model(model_config)
        self.num_prototypes = int(num_prototypes)
        self.seed = int(seed)
        self.max_iter = int(max_iter)
        self.tol = float(tol)
        self.init = init
        devices = list(devices) if devices is not None else jax.local_devices()
        self.devices = devices
        self.batch_frames = math.ceil(batch_frames / len(devices)) * len(devices)
        mesh = Mesh(np.asarray(devices), ("data",))
        self._batch = NamedSharding(mesh, PartitionSpec("data"))
        self.variables = jax.device_put(variables, NamedSharding(mesh, PartitionSpec()))

    @property
    def embed_dim(self) -> int:
        """E, the prototype dimension."""
        return int(self.config.decoder_embed_dim)

    def features(self, images: Sequence[np.ndarray]) -> jax.Array:
        """The matrix the official generator clusters.

        Args:
          images: N frames through the test transform, (H', W', 3) uint8 (``transforms.test_resize``, normalised on
            the device) or float32 normalised, all the same size.
        Returns:
          X (N * h8 * w8, E) float32 on the first device, rows ordered (frame, y, x).
        """
        images = list(images)
        if not images:
            raise ValueError("no frames to encode")
        shapes = {tuple(np.shape(im)) for im in images}
        if len(shapes) != 1:
            raise ValueError(f"the prototype frames of a video must have one size, got {sorted(shapes)}")
        chunks = []
        for start in range(0, len(images), self.batch_frames):
            chunk = images[start : start + self.batch_frames]
            batch = np.stack(chunk + [chunk[-1]] * (self.batch_frames - len(chunk)))
            feats = _encode_features(self.model, self.variables, jax.device_put(batch, self._batch))
            chunks.append(jax.device_put(feats, self.devices[0])[: len(chunk)])
        feats = chunks[0] if len(chunks) == 1 else jnp.concatenate(chunks)
        return einops.rearrange(feats.astype(jnp.float32), "n h w e -> (n h w) e")

    def prototypes(self, video: str, images: Sequence[np.ndarray]) -> np.ndarray:
        """K-means centres of the frames' 1/8 features, initialised with :func:`video_key` ``(seed, video)``.

        Args:
          video: the video name (selects the initialisation).
          images: its prototype frames, as for :meth:`features`.
        Returns:
          (K, E) float32 prototypes.
        """
        x = self.features(images)
        if x.shape[0] < self.num_prototypes:
            raise ValueError(
                f"video {video!r}: {x.shape[0]} feature vectors are too few for {self.num_prototypes} "
                "prototypes (frames too small?)"
            )
        result = kmeans_with_info(
            x,
            k=self.num_prototypes,
            max_iter=self.max_iter,
            tol=self.tol,
            key=video_key(self.seed, video),
            init=self.init,
        )
        return np.asarray(result.centers, np.float32)


def check_model(model_config: ml_collections.ConfigDict) -> None:
    """Raises ``ValueError`` unless the config is a CFFM or CFFM++ model (prototypes need its decoder)."""
    arch = model_config.get("arch")
    if arch not in ("cffm", "cffmpp"):
        raise ValueError(
            f"prototype generation needs a trained CFFM or CFFM++ model (its MLP decoder features), got "
            f"{model_config.get('name')!r} (arch {arch!r})"
        )


# ---------------------------------------------------------------------------------------------------------
# Videos and the store.


def _split_available(root: str, split: str) -> bool:
    """Whether ``split`` exists and lists a video (missing or empty splits are skipped, not errors)."""
    if is_tfds_dir(root):
        try:
            return bool(video_names(root, split))
        except DatasetError:
            return False
    path = split_file(root, split)
    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as f:
        return any(line.strip() for line in f)


def select_videos(data_root: str, splits: Sequence[str], num_classes: int) -> tuple[list[EvalVideo], tuple[str, ...]]:
    """The videos of ``splits`` in split order (a name in several splits counts once).

    Returns:
      (videos, skipped splits: missing or empty split files).
    Raises:
      DatasetError: no video in any split, or a problem in a split's videos.
    """
    if not splits:
        raise ValueError("no splits selected")
    videos: list[EvalVideo] = []
    seen: dict[str, str] = {}
    missing = []
    for split in splits:
        if not _split_available(data_root, split):
            log.info("split %r: no split file (or no videos) in %s, skipped", split, data_root)
            missing.append(split)
            continue
        for video in list_eval_videos(data_root, split, num_classes=num_classes):
            if video.name in seen:
                log.warning("video %r is in splits %r and %r; generated once", video.name, seen[video.name], split)
                continue
            seen[video.name] = split
            videos.append(video)
    if not videos:
        raise DatasetError(f"{data_root}: no videos in the splits {', '.join(splits)}")
    return videos, tuple(missing)


def _settings(
    model_config: ml_collections.ConfigDict,
    *,
    seed: int,
    img_scale: tuple[int, int],
    num_frames: int,
    max_iter: int,
    tol: float,
    init: str,
) -> dict[str, Any]:
    """What decides the prototypes besides the weights; recorded in (and checked against) the manifest."""
    return {
        "generator": GENERATOR,
        "model": model_config.name,
        "seed": int(seed),
        "img_scale": [int(s) for s in img_scale],
        "num_frames": int(num_frames),
        "kmeans": {"max_iter": int(max_iter), "tol": float(tol), "init": init},
    }


def open_store(
    out_dir: str | os.PathLike,
    *,
    embed_dim: int,
    num_prototypes: int,
    settings: Mapping[str, Any],
    info: Mapping[str, Any] | None = None,
) -> PrototypeStore:
    """Creates the store, or opens an existing one after checking that it was made with the same settings.

    Raises:
      ValueError: the existing store holds official prototypes, another E or K, or other settings.
    """
    if not (os.path.isdir(out_dir) and os.path.isfile(os.path.join(out_dir, "manifest.json"))):
        return PrototypeStore(
            out_dir,
            embed_dim=embed_dim,
            num_prototypes=num_prototypes,
            source="generated",
            info={**settings, **dict(info or {})},
        )
    store = PrototypeStore(out_dir)
    where = f"prototype store {store.root}"
    if store.source != "generated":
        raise ValueError(f"{where} holds {store.source} prototypes; write generated ones to another directory")
    if store.embed_dim != embed_dim:
        raise ValueError(
            f"{where} holds prototypes of dimension E={store.embed_dim}, but the model's features have "
            f"E={embed_dim}: use another output directory for this model"
        )
    if store.num_prototypes != num_prototypes:
        raise ValueError(
            f"{where} holds Kp={store.num_prototypes} prototypes per video, {num_prototypes} were requested"
        )
    wanted = json.loads(json.dumps(dict(settings)))
    diffs = [
        f"{key}: store has {store.info.get(key)!r}, requested {value!r}"
        for key, value in wanted.items()
        if store.info.get(key) != value
    ]
    if diffs:
        raise ValueError(
            f"{where} was generated with other settings (use another output directory or remove it):\n  "
            + "\n  ".join(diffs)
        )
    for key, value in (info or {}).items():
        if key in store.info and store.info[key] != value:
            log.warning("%s: %s was %r, now %r", where, key, store.info[key], value)
    return store


# ---------------------------------------------------------------------------------------------------------
# Generation.


@dataclasses.dataclass(frozen=True)
class GenerationSummary:
    """What :func:`generate_prototypes` did."""

    store: PrototypeStore
    generated: tuple[str, ...]
    skipped: tuple[str, ...]  # already in the store
    skipped_splits: tuple[str, ...]  # missing or empty split files
    seconds: float

    def __str__(self) -> str:
        text = (
            f"generated prototypes for {len(self.generated)} videos in {self.seconds:.1f} s "
            f"({len(self.skipped)} already present) into {self.store.root} "
            f"(Kp={self.store.num_prototypes}, E={self.store.embed_dim}); "
            f"store now holds {len(self.store)} videos"
        )
        if self.skipped_splits:
            text += f"; skipped splits without videos: {', '.join(self.skipped_splits)}"
        return text


def _submit_frames(
    video: EvalVideo, *, img_scale: tuple[int, int], num_frames: int, pool: concurrent.futures.Executor
) -> list[concurrent.futures.Future]:
    """Starts decoding the video's prototype frames (test transform, masks not read); one future per frame."""
    frames_only = EvalVideo(video.source, dataclasses.replace(video.info, has_labels=False))
    futures: dict[int, concurrent.futures.Future] = {}
    indices = prototype_frame_indices(video.num_frames, num_frames)
    for t in indices:
        if t not in futures:
            futures[t] = pool.submit(lambda t: load_eval_frame(frames_only, t, img_scale=img_scale).image, t)
    return [futures[t] for t in indices]


def _prefetched(
    videos: Sequence[EvalVideo], *, img_scale: tuple[int, int], num_frames: int, num_workers: int, ahead: int
) -> Iterator[tuple[EvalVideo, list[np.ndarray]]]:
    """Yields (video, frames) while the frames of the next ``ahead`` videos decode in background threads."""
    with concurrent.futures.ThreadPoolExecutor(num_workers, thread_name_prefix="prototype-frames") as pool:
        pending: collections.deque[tuple[EvalVideo, list[concurrent.futures.Future]]] = collections.deque()
        remaining = iter(videos)
        try:
            while True:
                while len(pending) <= ahead and (video := next(remaining, None)) is not None:
                    pending.append(
                        (video, _submit_frames(video, img_scale=img_scale, num_frames=num_frames, pool=pool))
                    )
                if not pending:
                    return
                video, futures = pending.popleft()
                yield video, [f.result() for f in futures]
        finally:
            for _, futures in pending:
                for f in futures:
                    f.cancel()


def generate_prototypes(
    model_config: ml_collections.ConfigDict,
    variables: Any,
    data_root: str,
    out_dir: str | os.PathLike,
    *,
    splits: Sequence[str] = SPLITS,
    img_scale: tuple[int, int] = IMG_SCALE,
    num_prototypes: int = NUM_PROTOTYPES,
    seed: int = 0,
    num_frames: int = NUM_FRAMES,
    max_iter: int = 10,
    tol: float = 1e-4,
    init: str = "random",
    batch_frames: int = NUM_FRAMES,
    overwrite: bool = False,
    info: Mapping[str, Any] | None = None,
    devices: Sequence[jax.Device] | None = None,
    num_workers: int | None = None,
    progress: bool = True,
) -> GenerationSummary:
    """Generates the prototypes of every video of ``splits`` into a store (see the module docstring).

    Args:
      model_config: a CFFM or CFFM++ model config.
      variables: its ``{'params', 'batch_stats'}``.
      data_root: VSPW folder or prepared TFDS folder.
      out_dir: the store directory (created, or resumed when it exists).
      splits: split names; missing or empty split files are skipped with a log line.
      img_scale: (W, H) bound of the test rescale.
      num_prototypes: K per video.
      seed: base seed of the per-video k-means initialisation.
      num_frames: frames per video (10 in the official code).
      max_iter, tol, init: k-means settings.
      batch_frames: frames per encode call (rounded up to a multiple of the device count).
      overwrite: recompute videos already in the store.
      info: extra provenance for a new store's manifest (e.g. ``{'checkpoint': path}``); on resumption a
        differing value is logged as a warning.
      devices: devices to encode on; default all local devices.
      num_workers: frame-decoding threads (default min(8, CPU count)).
      progress: show a tqdm progress bar (videos, with ETA).
    Returns:
      :class:`GenerationSummary`.
    Raises:
      ValueError: not a CFFM/CFFM++ model, a store made with other settings or E, bad arguments.
      DatasetError: no video in the selected splits, or unreadable data.
    """
    start = time.perf_counter()
    generator = PrototypeGenerator(
        model_config,
        variables,
        num_prototypes=num_prototypes,
        seed=seed,
        max_iter=max_iter,
        tol=tol,
        init=init,
        batch_frames=batch_frames,
        devices=devices,
    )
    img_scale = (int(img_scale[0]), int(img_scale[1]))
    videos, skipped_splits = select_videos(data_root, list(splits), model_config.num_classes)
    settings = _settings(
        model_config,
        seed=seed,
        img_scale=img_scale,
        num_frames=num_frames,
        max_iter=max_iter,
        tol=tol,
        init=init,
    )
    store = open_store(
        out_dir, embed_dim=generator.embed_dim, num_prototypes=num_prototypes, settings=settings, info=info
    )
    todo = [v for v in videos if overwrite or not store.has(v.name)]
    skipped = tuple(v.name for v in videos if not overwrite and store.has(v.name))
    log.info(
        "prototypes: %d videos to generate, %d already in %s; %d device(s), %d frames per encode call",
        len(todo),
        len(skipped),
        store.root,
        len(generator.devices),
        generator.batch_frames,
    )
    workers = num_workers or min(8, os.cpu_count() or 1)
    generated: list[str] = []
    frames = _prefetched(todo, img_scale=img_scale, num_frames=num_frames, num_workers=workers, ahead=2)
    with (
        contextlib.closing(frames),  # on an error, stops the decoding threads now
        tqdm(total=len(todo), unit="video", disable=not progress, desc="prototypes") as bar,
    ):
        for video, images in frames:
            store.put(video.name, generator.prototypes(video.name, images))
            generated.append(video.name)
            bar.update()
    return GenerationSummary(
        store=store,
        generated=tuple(generated),
        skipped=skipped,
        skipped_splits=skipped_splits,
        seconds=time.perf_counter() - start,
    )


# ---------------------------------------------------------------------------------------------------------
# Command line.


def _parse_splits(text: str) -> tuple[str, ...]:
    splits = tuple(s.strip() for s in text.split(",") if s.strip())
    if not splits:
        raise argparse.ArgumentTypeError(f"--splits needs comma-separated split names, got {text!r}")
    return splits


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cffm_jax.prototypes",
        description="Per-video CFFM++ prototypes (k-means of a trained CFFM's features, SPEC section 6). "
        "Config fields can be overridden with --config.<field>=<value>; explicit flags win over the config.",
        allow_abbrev=False,
    )
    parser.add_argument("--config", help="experiment config file, configs/X.py[:arg]")
    parser.add_argument("--checkpoint", help="weights dir, training workdir or raw .pth of a trained CFFM")
    parser.add_argument("--model", help="model name (e.g. cffm_b1) for a raw checkpoint")
    parser.add_argument("--data-root", help="VSPW folder or TFDS folder (default: config.data.root)")
    parser.add_argument("--out", help="prototype store directory (default: config.data.prototypes_dir)")
    parser.add_argument("--splits", type=_parse_splits, help="comma-separated splits (default train,val,test)")
    parser.add_argument("--img-scale", nargs=2, type=int, metavar=("W", "H"), help="test rescale bound")
    parser.add_argument("--num-prototypes", type=int, help=f"prototypes per video (default {NUM_PROTOTYPES})")
    parser.add_argument("--seed", type=int, help="k-means initialisation seed (default 0)")
    parser.add_argument("--batch-frames", type=int, default=NUM_FRAMES, help="frames per encode call")
    parser.add_argument("--overwrite", action="store_true", help="recompute videos already in the store")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _default_checkpoint(config: ml_collections.ConfigDict) -> str:
    """A prototype or CFFM++ config names the trained CFFM in ``init_from``; a CFFM config is its own run."""
    if "prototypes" in config or config.model.arch == "cffmpp":
        return str(config.get("init_from") or config.workdir)
    return str(config.workdir)


def _resolve_data_root(config: ml_collections.ConfigDict, splits: Sequence[str]) -> str:
    """``config.data.root``, or for '' the synthetic dataset in ``<workdir>/data`` (generated if missing)."""
    if config.data.root:
        return str(config.data.root)
    root = os.path.join(config.workdir, "data")
    if not any(os.path.isfile(split_file(root, s)) for s in splits):
        from cffm_jax.data.synthetic import generate

        log.info("generating the synthetic dataset in %s", root)
        generate(root, **config.data.synthetic.to_dict())
    return root


def load_model(
    checkpoint: str, model: str | None = None, config: ml_collections.ConfigDict | None = None
) -> tuple[Any, ml_collections.ConfigDict]:
    """(variables, model config) of a checkpoint for prototype generation.

    A raw file is converted as ``model`` (a name) or else as ``config.model`` -- for a CFFM++ config as the
    CFFM it is fine-tuned from (the official generator runs on a CFFM checkpoint). For a directory the stored
    model is used and its encoder (backbone, decoder width) must match ``model`` / ``config.model`` where
    given; CFFM and CFFM++ are interchangeable here. With a config, its computation dtype is used.

    Raises:
      CheckpointError: unreadable checkpoint, or an encoder that differs from the expected one.
      ValueError: not a CFFM/CFFM++ model.
    """
    from cffm_jax.checkpoint import CheckpointError, load_for_inference
    from cffm_jax.models import model_config as named_config

    expected = named_config(model) if model else (config.model if config is not None else None)
    if os.path.isfile(checkpoint):
        if not model and expected is not None and expected.get("arch") == "cffmpp":
            fields = expected.to_dict()
            for key in ("arch", "prototype_num_heads"):
                fields.pop(key)
            expected = named_config(fields.pop("name").replace("cffmpp_", "cffm_"), **fields)
        variables, found = load_for_inference(checkpoint, model=expected)
    else:
        variables, found = load_for_inference(checkpoint)
        if expected is not None:
            diffs = [
                f"{f}: checkpoint has {found.get(f)!r}, expected {expected.get(f)!r}"
                for f in _ENCODER_FIELDS
                if f in expected and _as_tuple(found.get(f)) != _as_tuple(expected.get(f))
            ]
            if diffs:
                raise CheckpointError(
                    f"{checkpoint}: the encoder of its {found.name} differs from the expected "
                    f"{expected.name}:\n  " + "\n  ".join(diffs)
                )
    check_model(found)
    if config is not None and config.model.get("dtype") and found.get("dtype") != config.model.dtype:
        found = ml_collections.ConfigDict(found.to_dict())
        found.dtype = config.model.dtype
    return variables, found


def _as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list | tuple) else value


def main(argv: Sequence[str] | None = None) -> GenerationSummary:
    """Runs the command line (see the module docstring); returns the summary. Errors raise exceptions."""
    from cffm_jax.evaluate import load_config

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
    proto = config.get("prototypes", ml_collections.ConfigDict()) if config is not None else ml_collections.ConfigDict()
    data = config.data if config is not None else ml_collections.ConfigDict()

    checkpoint = args.checkpoint or (_default_checkpoint(config) if config is not None else None)
    if not checkpoint:
        parser.error("--checkpoint is required without --config")
    splits = args.splits or tuple(data.get("splits", SPLITS))
    if args.data_root:
        data_root = args.data_root
    elif config is not None:
        data_root = _resolve_data_root(config, splits)
    else:
        parser.error("--data-root is required without --config")
    out = args.out or data.get("prototypes_dir", "")
    if not out:
        parser.error("--out is required (or config.data.prototypes_dir)")
    img_scale = default_img_scale(args.img_scale, data.get("img_scale") if config is not None else None, checkpoint)
    seed = args.seed if args.seed is not None else int(config.get("seed", 0) if config is not None else 0)
    num_prototypes = args.num_prototypes or int(proto.get("num_prototypes", NUM_PROTOTYPES))

    variables, model_config = load_model(checkpoint, args.model, config)
    summary = generate_prototypes(
        model_config,
        variables,
        data_root,
        out,
        splits=splits,
        img_scale=img_scale,
        num_prototypes=num_prototypes,
        seed=seed,
        num_frames=int(proto.get("num_frames", NUM_FRAMES)),
        max_iter=int(proto.get("max_iter", 10)),
        tol=float(proto.get("tol", 1e-4)),
        init=str(proto.get("init", "random")),
        batch_frames=args.batch_frames,
        overwrite=args.overwrite or bool(proto.get("overwrite", False)),
        info={"checkpoint": str(checkpoint)},
        progress=not args.no_progress and bool(config.get("progress", True) if config is not None else True),
    )
    print(summary)  # noqa: T201
    return summary


def _cli() -> int:
    from cffm_jax.checkpoint import CheckpointError
    from cffm_jax.logging_utils import run_cli

    return run_cli(
        main,
        (DatasetError, CheckpointError, FileNotFoundError, ValueError),
        "the store keeps every video finished so far; the same command goes on with the others",
    )


def _deterministic_gpu_flags() -> None:
    """Adds ``--xla_gpu_deterministic_ops=true`` to XLA_FLAGS (before any backend starts) unless it is set."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_gpu_deterministic_ops" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " --xla_gpu_deterministic_ops=true").strip()


if __name__ == "__main__":
    _deterministic_gpu_flags()
    sys.exit(_cli())

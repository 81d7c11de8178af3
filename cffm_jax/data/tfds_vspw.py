"""TFDS builder ``vspw``: VSPW packed into array_record shards, written and read without TensorFlow.

SPEC.md section 10.1. VSPW cannot be downloaded automatically: point ``manual_dir`` at the extracted
``VSPW_480p`` folder (the one holding ``train.txt`` and ``data/``), or at a synthetic folder::

    python -m cffm_jax.data.tfds_vspw --manual_dir data/vspw/VSPW_480p --data_dir ~/tensorflow_datasets

One example per frame, in split-file order then frame order (``disable_shuffling=True``, keys
``<video_index>_<frame>``): ``video``, ``video_index``, ``frame_index``, ``frame_name``, ``image`` (the
original JPEG bytes, not re-encoded), ``mask`` (the original raw PNG bytes; a 1x1 placeholder when
``has_mask`` is False, e.g. VSPW test) and ``has_mask``. A split file that lists no videos gives no split.
Every frame and mask is decoded and checked while writing, so a bad file stops the build with a
:class:`~cffm_jax.data.vspw.DatasetError` naming it (the command prints ``error: <file>: <problem>``).
The per-split video table (names, frame names, has-mask) is stored in the dataset's metadata, so readers
need not scan the records.

:class:`TfdsSource` reads a prepared version folder (``<data_dir>/vspw/1.0.0``; ``<data_dir>`` or
``<data_dir>/vspw`` when they hold that one version) as a frame source; it yields exactly the records of
:class:`~cffm_jax.data.vspw.FolderSource` on the folder it was built from, so the grain pipelines accept either
(:func:`cffm_jax.data.vspw.open_source` picks by looking for ``dataset_info.json``).
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys
import threading

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from cffm_jax.data.vspw import (
    NUM_CLASSES,
    SPLITS,
    DatasetError,
    FolderSource,
    VideoInfo,
    check_same_size,
    decode_image,
    decode_mask,
    read_bytes,
    reduce_zero_label,
    select_videos,
    split_file,
    splits_with_videos,
    tfds_version_dir,
)

logger = logging.getLogger("cffm_jax.data.tfds_vspw")  # this name also when run as __main__ (-m)

_PLACEHOLDER_MASK: bytes | None = None
_OPENING = threading.Lock()  # TfdsSource opens its data source once when several loader threads start together


def _placeholder_mask() -> bytes:
    global _PLACEHOLDER_MASK
    if _PLACEHOLDER_MASK is None:
        buf = io.BytesIO()
        Image.fromarray(np.full((1, 1), 255, np.uint8)).save(buf, format="PNG")
        _PLACEHOLDER_MASK = buf.getvalue()
    return _PLACEHOLDER_MASK


class Vspw(tfds.core.GeneratorBasedBuilder):
    """VSPW 480p video frames and raw masks, one example per frame."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Frames and raw masks of the VSPW 480p release, one example per frame."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download and extract VSPW 480p (https://www.vspwdataset.com/) and pass the folder that contains "
        "train.txt, val.txt, test.txt and data/ as manual_dir (e.g. data/vspw/VSPW_480p)."
    )
    # tfds locates a builder's source through importlib_resources, which is not installed with this stack
    # (ModuleNotFoundError inside download_and_prepare); the file path is all it needs (no checksums file).
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="VSPW video semantic segmentation: frames (JPEG) and raw masks (PNG, 0 = others, "
            "1..124 = classes, 255 = ignore), one example per frame in temporal order.",
            features=tfds.features.FeaturesDict(
                {
                    "video": tfds.features.Text(),
                    "video_index": np.int32,
                    "frame_index": np.int32,
                    "frame_name": tfds.features.Text(),
                    "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                    "mask": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
                    "has_mask": np.bool_,
                }
            ),
            homepage="https://www.vspwdataset.com/",
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        root = os.fspath(dl_manager.manual_dir)
        splits, empty = splits_with_videos(root)
        for split in empty:
            logger.info("%s lists no videos: the dataset gets no %r split", split_file(root, split), split)
        if not splits:
            raise DatasetError(f"{root}: no split file ({', '.join(s + '.txt' for s in SPLITS)}) lists a video")
        generators = {}
        for split in splits:
            source = FolderSource(root, split, num_classes=NUM_CLASSES)
            self.info.metadata[split] = {
                "names": source.split_names,
                "videos": [[v.name, v.index, list(v.frame_names), v.has_labels] for v in source.videos],
            }
            generators[split] = self._generate_examples(source)
        return generators

    def _generate_examples(self, source: FolderSource):
        for video in source.videos:
            for t, frame_name in enumerate(video.frame_names):
                image_path = source.frame_path(video, t)
                image_bytes = read_bytes(image_path)
                image = decode_image(image_bytes, image_path)
                mask_bytes = _placeholder_mask()
                if video.has_labels:
                    mask_path = source.mask_path(video, t)
                    mask_bytes = read_bytes(mask_path)
                    check_same_size(image, decode_mask(mask_bytes, mask_path), image_path, mask_path)
                yield (
                    f"{video.index:06d}_{t:06d}",
                    {
                        "video": video.name,
                        "video_index": video.index,
                        "frame_index": t,
                        "frame_name": frame_name,
                        "image": image_bytes,
                        "mask": mask_bytes,
                        "has_mask": video.has_labels,
                    },
                )


def build(manual_dir: str, data_dir: str) -> str:
    """Prepares the ``vspw`` dataset from a VSPW-layout folder (no TensorFlow needed).

    Args:
      manual_dir: the VSPW (or synthetic) folder.
      data_dir: TFDS data directory to write into.

    Returns:
      The prepared version folder (``<data_dir>/vspw/1.0.0``), read by :class:`TfdsSource` and the pipelines.
    """
    builder = Vspw(data_dir=os.fspath(data_dir), file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)))
    return os.fspath(builder.data_dir)


def _split_metadata(path: str, split: str) -> dict:
    path = tfds_version_dir(path)
    metadata = tfds.builder_from_directory(path).info.metadata
    if split not in metadata:
        raise DatasetError(f"{path}: no split {split!r} in this TFDS dataset (has {sorted(metadata)})")
    return metadata[split]


def tfds_split_names(path: str, split: str) -> list[str]:
    """Every video name of a split file, as stored in a prepared TFDS folder."""
    return list(_split_metadata(path, split)["names"])


class TfdsSource:
    """Frames of one split read from a prepared TFDS ``vspw`` version folder (array_record).

    Arguments as :class:`cffm_jax.data.vspw.FolderSource`, with ``path`` the version folder, or the dataset folder or
    data directory above it when they hold one version (:func:`cffm_jax.data.vspw.tfds_versions`).
    """

    def __init__(
        self,
        path: str,
        split: str,
        *,
        require_labels: bool = False,
        min_frames: int = 1,
        skip_bad_videos: bool = False,
        num_classes: int = NUM_CLASSES,
    ):
        self.path = tfds_version_dir(path)
        self.split = split
        self.num_classes = num_classes
        meta = _split_metadata(self.path, split)
        self.split_names = list(meta["names"])
        table = {name: (index, tuple(frames), bool(labels)) for name, index, frames, labels in meta["videos"]}
        self._offsets: dict[str, int] = {}
        offset = 0
        for name, _, frames, _ in meta["videos"]:
            self._offsets[name] = offset
            offset += len(frames)

        def scan(name: str, index: int) -> VideoInfo:
            if name not in table:
                raise DatasetError(f"{self.path}: video {name!r} of split {split!r} has no records")
            _, frames, has_labels = table[name]
            if require_labels and not has_labels:
                raise DatasetError(f"{self.path}: video {name!r} of split {split!r} has no masks")
            return VideoInfo(name, index, frames, has_labels)

        self.videos = select_videos(
            [(n, i) for i, n in enumerate(self.split_names)],
            scan,
            split_desc=f"{self.path} [{split}]",
            min_frames=min_frames,
            skip_bad_videos=skip_bad_videos,
        )
        self._data_source = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_data_source"] = None  # Re-opened lazily in each worker process.
        return state

    @property
    def data_source(self):
        """The split's array_record data source, opened on first use (once: frames load on several threads; reads
        of an open source are thread-safe, as grain's multi-threaded reading relies on)."""
        with _OPENING:
            if self._data_source is None:
                skip = tfds.decode.SkipDecoding()
                self._data_source = tfds.builder_from_directory(self.path).as_data_source(
                    split=self.split, decoders={"image": skip, "mask": skip}
                )
        return self._data_source

    def frame_name(self, video: VideoInfo, t: int) -> str:
        return f"{self.path} [{self.split}] {video.name}/{video.frame_names[t]}"

    def load_frame(self, video: VideoInfo, t: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Returns ((H, W, 3) uint8 RGB, (H, W) uint8 reduced labels or None)."""
        name = self.frame_name(video, t)
        record = self.data_source[self._offsets[video.name] + t]
        got = (record["video"].decode(), int(record["frame_index"]))
        if got != (video.name, t):
            raise DatasetError(f"{name}: record order mismatch, found {got[0]}/{got[1]} (dataset corrupt?)")
        image = decode_image(record["image"], name)
        if not video.has_labels:
            return image, None
        mask = decode_mask(record["mask"], name + " (mask)", self.num_classes)
        check_same_size(image, mask, name, name + " (mask)")
        return image, reduce_zero_label(mask)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description="Pack a VSPW-layout folder into TFDS array_record shards.")
    parser.add_argument("--manual_dir", required=True, help="VSPW folder with train.txt and data/")
    parser.add_argument("--data_dir", required=True, help="TFDS data directory to write into")
    args = parser.parse_args(argv)
    path = build(args.manual_dir, args.data_dir)
    print(path)  # noqa: T201
    return path


def _cli() -> int:
    from cffm_jax.logging_utils import run_cli

    return run_cli(
        main, (DatasetError,), "nothing prepared (TFDS writes into a temporary folder, removed); run the command again"
    )


if __name__ == "__main__":
    sys.exit(_cli())

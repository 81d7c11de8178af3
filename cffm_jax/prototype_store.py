"""Per-video CFFM++ prototypes on disk (SPEC.md sections 5 and 6).

CFFM++ needs, for every video, a (Kp, E) float32 matrix of prototypes (the k-means centres of its features,
SPEC section 6). The official code loads ``./cluster_centers/<video>/centers.pt`` (a torch tensor (1, Kp, E))
inside the head on every call (section 5, step 1); here prototypes live in a :class:`PrototypeStore` that
training, evaluation and the generator share, and :func:`import_official` converts the released files.

On-disk format (``FORMAT_VERSION`` 1) of a store directory ``root``::

    root/manifest.json    {"format": "cffm_jax.prototype_store", "version": 1, "embed_dim": E,
                           "num_prototypes": Kp, "source": "generated" | "official", "info": {...}}
    root/<video>.npy      float32 array (Kp, E), one per video (plain ``np.save``, no pickle)

``info`` is free-form provenance (model/checkpoint, seed, k-means settings, source archive). Every file is
written atomically (a hidden temporary file in ``root`` + ``os.replace``), so a killed writer never leaves a
partial ``<video>.npy`` that looks complete; leftover ``.*.tmp`` files are ignored.

Also here: :func:`prototype_frame_indices`, the official rule for the 10 frames of a video that the prototypes
are computed from (section 6). CLI::

    python -m cffm_jax.prototype_store import SRC DST [--embed-dim 256] [--videos-file list.txt]
    python -m cffm_jax.prototype_store info DST
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import os
import re
import shlex
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_NAME = "cffm_jax.prototype_store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SOURCES = ("generated", "official")
OFFICIAL_FILE = "centers.pt"

_VIDEO_NAME = re.compile(r"^[^/\\.][^/\\]*$")
_log = logging.getLogger(__name__)


def prototype_frame_indices(n_frames: int, num: int = 10) -> list[int]:
    """Frames the official generator clusters: ``int((i + 0.5) * (n_frames // num))`` for i in 0..num-1.

    With fewer than ``num`` frames the interval is 0 and frame 0 is used ``num`` times (SPEC section 6).

    Args:
      n_frames: number of frames of the video (>= 1).
      num: number of frames to pick (10 in the official code).

    Returns:
      ``num`` frame indices in temporal order.
    """
    if n_frames < 1:
        raise ValueError(f"a video needs at least one frame, got n_frames={n_frames}")
    interval = n_frames // num
    return [int((i + 0.5) * interval) for i in range(num)]


def _atomic_write(path: Path, write) -> None:
    """Write via ``write(file_object)`` to a hidden temp file next to ``path``, fsync, then rename over it."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_video_name(video: str) -> None:
    if not isinstance(video, str) or not _VIDEO_NAME.match(video):
        raise ValueError(f"invalid video name {video!r}: must be a non-empty file name not starting with '.'")


def _no_store_message(root: Path) -> str:
    """Why ``root`` cannot be opened, with the command that fills it.

    Users meet this through training, evaluation or prediction given a prototypes folder, so the remedy is a
    command; the API call that creates an empty store comes last, for library users.
    """
    state = "the folder does not exist" if not root.exists() else f"the folder has no {MANIFEST}"
    lines = [
        f"no prototype store at {root} ({state}); generate the CFFM++ prototypes there from a trained CFFM:",
        f"  python -m cffm_jax.prototypes --checkpoint <CFFM checkpoint> --data-root <VSPW root> "
        f"--out {shlex.quote(str(root))}",
    ]
    if any(root.glob(f"*/{OFFICIAL_FILE}")):
        lines += [
            f"or, since it holds the official <video>/{OFFICIAL_FILE} files, import them into a new folder:",
            f"  python -m cffm_jax.prototype_store import {shlex.quote(str(root))} <new folder>",
        ]
    lines.append("(library: PrototypeStore(dir, embed_dim=..., num_prototypes=..., source=...) creates an empty store)")
    return "\n".join(lines)


class PrototypeStore:
    """A directory of per-video (Kp, E) float32 prototypes with a manifest (format in the module docstring).

    Opening an existing store needs only ``root``; creating one needs ``embed_dim``, ``num_prototypes`` and
    ``source``. When the store exists, any of those given must agree with its manifest (so a resumed generator
    cannot mix models). Instances are picklable and can be passed to data-loader workers; calling one is
    :meth:`get`, so it serves directly as the pipeline's ``prototype_lookup``.

    Args:
      root: store directory.
      embed_dim: E, required to create a store.
      num_prototypes: Kp, required to create a store.
      source: ``'generated'`` or ``'official'``, required to create a store.
      info: provenance recorded in a new store's manifest (model, checkpoint, seed, ...).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        embed_dim: int | None = None,
        num_prototypes: int | None = None,
        source: str | None = None,
        info: dict[str, Any] | None = None,
    ):
        self.root = Path(root)
        manifest_path = self.root / MANIFEST
        if manifest_path.exists():
            self.manifest = _read_manifest(manifest_path)
            for name, value in (
                ("embed_dim", embed_dim),
                ("num_prototypes", num_prototypes),
                ("source", source),
            ):
                if value is not None and value != self.manifest[name]:
                    raise ValueError(
                        f"prototype store {self.root} has {name}={self.manifest[name]!r}, but {value!r} was requested"
                    )
            return
        if embed_dim is None or num_prototypes is None or source is None:
            raise FileNotFoundError(_no_store_message(self.root))
        if source not in SOURCES:
            raise ValueError(f"unknown source {source!r}; valid: {', '.join(SOURCES)}")
        if embed_dim < 1 or num_prototypes < 1:
            raise ValueError(f"embed_dim and num_prototypes must be positive, got {embed_dim}, {num_prototypes}")
        self.manifest = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "embed_dim": int(embed_dim),
            "num_prototypes": int(num_prototypes),
            "source": source,
            "info": dict(info or {}),
        }
        self.root.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.manifest, indent=2, sort_keys=True) + "\n"
        _atomic_write(manifest_path, lambda f: f.write(text.encode()))

    @property
    def embed_dim(self) -> int:
        """E, the prototype dimension."""
        return self.manifest["embed_dim"]

    @property
    def num_prototypes(self) -> int:
        """Kp, the number of prototypes per video."""
        return self.manifest["num_prototypes"]

    @property
    def source(self) -> str:
        """``'generated'`` or ``'official'``."""
        return self.manifest["source"]

    @property
    def info(self) -> dict[str, Any]:
        """Provenance recorded in the manifest."""
        return self.manifest["info"]

    def path(self, video: str) -> Path:
        """File that holds ``video``'s prototypes."""
        _check_video_name(video)
        return self.root / f"{video}.npy"

    def has(self, video: str) -> bool:
        """Whether ``video`` has prototypes in the store."""
        return self.path(video).is_file()

    def videos(self) -> list[str]:
        """Sorted names of all videos in the store."""
        return sorted(p.stem for p in self.root.glob("*.npy") if not p.name.startswith("."))

    def get(self, video: str) -> np.ndarray:
        """Prototypes of ``video``.

        Returns:
          (Kp, E) float32 array.

        Raises:
          FileNotFoundError: the video is not in the store.
          ValueError: the stored array has the wrong shape/dtype or non-finite values.
        """
        path = self.path(video)
        if not path.is_file():
            raise FileNotFoundError(f"no prototypes for video {video!r} in prototype store {self.root}")
        array = np.load(path, allow_pickle=False)
        return self._validated(array, f"{path}")

    def put(self, video: str, prototypes: np.ndarray) -> None:
        """Store ``video``'s prototypes atomically (replacing any previous ones).

        Args:
          video: video name.
          prototypes: (Kp, E) array, finite; stored as float32.
        """
        path = self.path(video)
        array = self._validated(np.asarray(prototypes), f"prototypes for video {video!r}")
        _atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))

    def _validated(self, array: np.ndarray, what: str) -> np.ndarray:
        expected = (self.num_prototypes, self.embed_dim)
        if array.shape != expected:
            raise ValueError(f"{what}: shape {array.shape}, but prototype store {self.root} holds (Kp, E) = {expected}")
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"{what}: dtype {array.dtype} is not floating point")
        array = array.astype(np.float32, copy=False)
        if not np.isfinite(array).all():
            raise ValueError(f"{what}: {int(np.size(array) - np.isfinite(array).sum())} non-finite values")
        return array

    def __call__(self, video: str) -> np.ndarray:
        """Same as :meth:`get`; the data pipeline's ``prototype_lookup``."""
        return self.get(video)

    def __contains__(self, video: str) -> bool:
        return self.has(video)

    def __len__(self) -> int:
        return len(self.videos())

    def __repr__(self) -> str:
        return (
            f"PrototypeStore({str(self.root)!r}, embed_dim={self.embed_dim}, "
            f"num_prototypes={self.num_prototypes}, source={self.source!r})"
        )


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if manifest.get("format") != FORMAT_NAME or manifest.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: not a {FORMAT_NAME} version {FORMAT_VERSION} manifest "
            f"(format={manifest.get('format')!r}, version={manifest.get('version')!r})"
        )
    missing = [k for k in ("embed_dim", "num_prototypes", "source", "info") if k not in manifest]
    if missing:
        raise ValueError(f"{path}: manifest lacks {', '.join(missing)}")
    return manifest


# ----------------------------------------------------------------------------------------------------
# Import of the official release (cluster_centers/<video>/centers.pt)


@dataclasses.dataclass(frozen=True)
class ImportSummary:
    """What :func:`import_official` did."""

    store: PrototypeStore
    imported: tuple[str, ...]
    ignored: tuple[str, ...]

    def __str__(self) -> str:
        s = self.store
        text = (
            f"imported {len(self.imported)} videos into {s.root} "
            f"(Kp={s.num_prototypes}, E={s.embed_dim}, source={s.source}); store now holds {len(s)} videos"
        )
        if self.ignored:
            text += f"; ignored {len(self.ignored)} videos not in the expected list"
        return text


def _official_entries(src: Path) -> tuple[dict[str, str], zipfile.ZipFile | None]:
    """Map video -> file (path in the folder or member name in the zip) of ``<video>/centers.pt`` files."""
    if src.is_file():
        if not zipfile.is_zipfile(src):
            raise ValueError(f"{src} is neither a directory nor a zip archive")
        archive = zipfile.ZipFile(src)
        names = [n for n in archive.namelist() if not n.endswith("/")]
    elif src.is_dir():
        archive = None
        names = [str(p.relative_to(src).as_posix()) for p in src.rglob(OFFICIAL_FILE)]
    else:
        raise FileNotFoundError(f"official prototype source {src} does not exist")
    entries: dict[str, str] = {}
    for name in sorted(names):
        parts = name.split("/")
        if parts[-1] != OFFICIAL_FILE or len(parts) < 2 or parts[-2].startswith("."):
            continue
        video = parts[-2]
        if video in entries:
            raise ValueError(f"{src}: video {video!r} appears twice ({entries[video]} and {name})")
        entries[video] = name
    if not entries:
        raise ValueError(f"{src} contains no <video>/{OFFICIAL_FILE} files")
    return entries, archive


def _load_official_tensor(data: bytes, where: str, expected_dim: int | None) -> np.ndarray:
    import torch  # optional dependency, only needed here

    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many exception types for a corrupt or foreign file
        raise ValueError(f"{where}: cannot be read as a torch file ({type(e).__name__}: {e})") from e
    if not isinstance(obj, torch.Tensor):
        raise ValueError(f"{where}: expected a tensor (1, Kp, E), found {type(obj).__name__}")
    if obj.ndim == 3 and obj.shape[0] == 1:
        obj = obj[0]
    if obj.ndim != 2 or not obj.is_floating_point():
        raise ValueError(f"{where}: expected a float tensor (1, Kp, E), found {obj.dtype} {tuple(obj.shape)}")
    if expected_dim is not None and obj.shape[1] != expected_dim:
        raise ValueError(f"{where}: embedding dim E={obj.shape[1]}, expected {expected_dim}")
    return obj.detach().to(torch.float32).numpy()


def import_official(
    src: str | os.PathLike,
    dst_store: PrototypeStore | str | os.PathLike,
    *,
    expected_dim: int | None = None,
    videos: Iterable[str] | None = None,
) -> ImportSummary:
    """Convert the official ``cluster_centers/<video>/centers.pt`` files into a :class:`PrototypeStore`.

    Args:
      src: the ``cluster_centers`` folder (or any folder above it), or a ``.zip`` of it; every
        ``<video>/centers.pt`` inside is one video (a torch tensor (1, Kp, E); read with
        ``torch.load(..., map_location='cpu', weights_only=True)``, zip members are read in memory).
      dst_store: an existing store, or a directory; a new store there gets Kp and E from the first tensor and
        ``source='official'``.
      expected_dim: if given, every tensor must have this E.
      videos: if given, all of these must be present in ``src`` (checked before anything is written) and only
        they are imported.

    Files are validated one by one as they are imported; on an error the videos before it are already in the
    store (each written atomically), and a rerun simply overwrites them.

    Returns:
      :class:`ImportSummary`.
    """
    src = Path(src)
    entries, archive = _official_entries(src)
    try:
        wanted = sorted(entries)
        ignored: list[str] = []
        if videos is not None:
            expected = list(dict.fromkeys(videos))
            missing = [v for v in expected if v not in entries]
            if missing:
                shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
                raise FileNotFoundError(
                    f"{src}: {len(missing)} expected videos have no <video>/{OFFICIAL_FILE}: {shown}"
                )
            ignored = sorted(set(entries) - set(expected))
            wanted = expected
        if not wanted:
            raise ValueError("no videos to import (the expected video list is empty)")

        def read(video: str) -> np.ndarray:
            name = entries[video]
            data = archive.read(name) if archive is not None else (src / name).read_bytes()
            where = f"{src}/{name}" if archive is None else f"{src}:{name}"
            return _load_official_tensor(data, where, expected_dim)

        store = dst_store
        for i, video in enumerate(wanted):
            array = read(video)
            if not isinstance(store, PrototypeStore):
                store = PrototypeStore(
                    store,
                    embed_dim=array.shape[1],
                    num_prototypes=array.shape[0],
                    source="official",
                    info={"imported_from": src.name},
                )
            if array.shape != (store.num_prototypes, store.embed_dim):
                raise ValueError(
                    f"{src}/{entries[video]}: (Kp, E) = {array.shape}, store {store.root} holds "
                    f"{(store.num_prototypes, store.embed_dim)}"
                )
            store.put(video, array)
            if (i + 1) % 500 == 0:
                _log.info("imported %d / %d videos", i + 1, len(wanted))
    finally:
        if archive is not None:
            archive.close()
    return ImportSummary(store=store, imported=tuple(wanted), ignored=tuple(ignored))


def _main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m cffm_jax.prototype_store", description="Per-video CFFM++ prototype stores."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="import the official cluster_centers/<video>/centers.pt release")
    imp.add_argument("src", help="cluster_centers folder (or a folder above it) or a .zip of it")
    imp.add_argument("dst", help="prototype store directory (created if needed)")
    imp.add_argument("--embed-dim", type=int, default=None, help="expected E (256 for the released files)")
    imp.add_argument("--videos-file", default=None, help="text file with one expected video name per line")
    info = sub.add_parser("info", help="summarise a prototype store")
    info.add_argument("store")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "import":
            videos = None
            if args.videos_file:
                lines = Path(args.videos_file).read_text().splitlines()
                videos = [line.strip() for line in lines if line.strip()]
            summary = import_official(args.src, args.dst, expected_dim=args.embed_dim, videos=videos)
            print(summary)  # noqa: T201
        else:
            store = PrototypeStore(args.store)
            print(f"{store!r}: {len(store)} videos; info {json.dumps(store.info, sort_keys=True)}")  # noqa: T201
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from e


if __name__ == "__main__":
    _main()

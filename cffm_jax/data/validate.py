"""Up-front check of a VSPW-layout dataset folder (SPEC.md section 10.1).

``python -m cffm_jax.data.validate ROOT [--split NAME ...] [--num-classes 124] [--workers 4] [--no-progress]``
checks that the split files exist, are non-empty, have no duplicates and do not share videos; that every listed
video exists; that every frame has a mask (for splits with masks) with the same name; that every frame and mask
decodes, that each mask has the size of its frame and only values 0..num_classes and 255, and that all frames
of a video have one size. It prints a report naming every bad file and exits with status 1 if anything is
bad (0 otherwise). A video whose frames and masks do not pair up is still checked file by file, so one run
reports every problem. Progress (videos, frames/s, ETA) goes to stderr every few seconds: full VSPW takes minutes.

Without ``--split``, the splits checked are those whose file exists; an empty split file is a note, not a
problem (it stands for a split the dataset does not have, as older synthetic datasets wrote for 0 test videos).
A split named with ``--split`` must list videos.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import os
import sys

from tqdm import tqdm

from cffm_jax.data.vspw import (
    FRAME_SUFFIX,
    MASK_SUFFIX,
    NUM_CLASSES,
    SPLITS,
    DatasetError,
    VideoInfo,
    check_same_size,
    decode_image,
    decode_mask,
    folder_frame_path,
    folder_mask_path,
    read_bytes,
    read_split,
    scan_video,
    split_file,
    splits_with_videos,
)

PROGRESS_INTERVAL_S = 5.0  # at ~1,000 frames/s a line every few seconds: alive, not a flood in a log file


@dataclasses.dataclass
class Report:
    """Result of :func:`validate_dataset`: ``problems`` lists one message per bad file / video / split; ``notes``
    what is worth knowing but not wrong (an empty split file)."""

    root: str
    splits: list[str]
    videos: int = 0
    frames: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        lines = [
            f"dataset {self.root}: splits {', '.join(self.splits) or '-'}; "
            f"{self.videos} videos, {self.frames} frames checked"
        ]
        lines.extend(f"note: {n}" for n in self.notes)
        if self.ok:
            lines.append("OK: no problems found")
        else:
            lines.append(f"{len(self.problems)} problem(s):")
            lines.extend(f"  {p}" for p in self.problems)
        return "\n".join(lines)


def _attempt(problems: list[str], check, *args):
    """``check(*args)``, or None with its :class:`DatasetError` appended to ``problems``."""
    try:
        return check(*args)
    except DatasetError as e:
        problems.append(str(e))
        return None


def _read_image(path: str):
    return decode_image(read_bytes(path), path)


def _read_mask(path: str, num_classes: int):
    return decode_mask(read_bytes(path), path, num_classes)


def _check_video(root: str, video: VideoInfo, num_classes: int) -> list[str]:
    """Every problem of a video's frames and masks: a frame that does not decode does not hide its mask's.

    A video without labels is either unlabelled (no mask folder: test) or one whose frames and masks do not pair
    up (see :func:`_scan_unpaired`); for the latter, each frame's mask that exists is checked as for a labelled one.
    """
    problems: list[str] = []
    size = None
    for t in range(video.num_frames):
        path = folder_frame_path(root, video, t)
        mask_path = folder_mask_path(root, video, t)
        image = _attempt(problems, _read_image, path)
        mask = None
        if video.has_labels or os.path.isfile(mask_path):
            mask = _attempt(problems, _read_mask, mask_path, num_classes)
        if image is None:
            continue
        if mask is not None:
            _attempt(problems, check_same_size, image, mask, path, mask_path)
        if size is None:
            size = (image.shape, path)
        elif image.shape != size[0]:
            problems.append(
                f"{path}: frame size {image.shape[1]}x{image.shape[0]} differs from "
                f"{size[1]} ({size[0][1]}x{size[0][0]})"
            )
    return problems


def _scan_unpaired(root: str, name: str, index: int, report: Report, num_classes: int) -> VideoInfo | None:
    """For a video whose frames and masks do not pair up: checks the masks without a frame on their own and
    returns the video without labels (its frames, and the masks that have a frame, are checked by
    :func:`_check_video`), or None if it has no frames."""
    origin = os.path.join(root, "data", name, "origin")
    mask_dir = os.path.join(root, "data", name, "mask")
    frames = sorted(os.listdir(origin)) if os.path.isdir(origin) else []
    stems = tuple(f[: -len(FRAME_SUFFIX)] for f in frames if f.lower().endswith(FRAME_SUFFIX))
    if os.path.isdir(mask_dir):
        for f in sorted(os.listdir(mask_dir)):
            if f.lower().endswith(MASK_SUFFIX) and f[: -len(MASK_SUFFIX)] not in stems:
                _attempt(report.problems, _read_mask, os.path.join(mask_dir, f), num_classes)
    return VideoInfo(name, index, stems, has_labels=False) if stems else None


def validate_dataset(
    root: str,
    splits: list[str] | None = None,
    *,
    num_classes: int = NUM_CLASSES,
    workers: int = 4,
    progress: bool = False,
) -> Report:
    """Checks a dataset folder completely; never raises for bad data (it is listed in the report).

    Args:
      root: dataset folder.
      splits: split names to check; default every one of train/val/test whose file lists videos (an empty one
        is noted).
      num_classes: valid raw mask values are 0..num_classes and 255.
      workers: threads decoding files.
      progress: show a progress line on stderr (videos done, frames/s, ETA), updated every few seconds.

    Returns:
      A :class:`Report`.
    """
    root = os.fspath(root)
    notes = []
    if splits is None:
        splits, empty = splits_with_videos(root)
        notes = [f"{split_file(root, s)} lists no videos: no {s!r} split, nothing to check" for s in empty]
        if not splits:
            report = Report(root, [], notes=notes)
            report.problems.append(f"{root}: no split file ({', '.join(s + '.txt' for s in SPLITS)}) lists a video")
            return report
    report = Report(root, list(splits), notes=notes)
    owner: dict[str, str] = {}
    videos: list[VideoInfo] = []
    for split in splits:
        try:
            names = read_split(root, split)
        except DatasetError as e:
            report.problems.append(str(e))
            continue
        for index, name in enumerate(names):
            if name in owner:
                report.problems.append(
                    f"{split_file(root, split)}: video {name!r} is also listed in split {owner[name]!r}"
                )
            owner.setdefault(name, split)
            try:
                video = scan_video(root, name, index, require_labels=False)
            except DatasetError as e:
                report.problems.append(str(e))
                video = _scan_unpaired(root, name, index, report, num_classes)
                if video is None:
                    continue
            videos.append(video)
    total_frames = sum(v.num_frames for v in videos)
    with (
        concurrent.futures.ThreadPoolExecutor(max(workers, 1)) as pool,
        tqdm(
            total=total_frames,
            unit="frame",
            desc="validate",
            disable=not (progress and videos),
            mininterval=PROGRESS_INTERVAL_S,
            dynamic_ncols=True,
        ) as bar,
    ):
        results = pool.map(lambda video: _check_video(root, video, num_classes), videos)
        for video, problems in zip(videos, results, strict=True):
            report.videos += 1
            report.frames += video.num_frames
            report.problems.extend(problems)
            bar.set_postfix_str(f"{report.videos}/{len(videos)} videos", refresh=False)
            bar.update(video.num_frames)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check a VSPW-layout dataset folder.")
    parser.add_argument("root", help="dataset folder (contains train.txt and data/)")
    parser.add_argument("--split", action="append", help="split to check (repeatable); default: all present")
    parser.add_argument("--num-classes", type=int, default=NUM_CLASSES)
    parser.add_argument("--workers", type=int, default=4, help="decoding threads")
    parser.add_argument("--no-progress", action="store_true", help="no progress line")
    args = parser.parse_args(argv)
    report = validate_dataset(
        args.root, args.split, num_classes=args.num_classes, workers=args.workers, progress=not args.no_progress
    )
    print(report.format())  # noqa: T201
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())

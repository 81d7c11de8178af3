"""Up-front check of a VSPW-layout dataset folder (SPEC.md section 10.1).

``python -m cffm_jax.data.validate ROOT [--split NAME ...] [--num-classes 124] [--workers 4]`` checks that
the split files exist, are non-empty, have no duplicates and do not share videos; that every listed video
exists; that every frame has a mask (for splits with masks) with the same name; that every frame and mask
decodes, that each mask has the size of its frame and only values 0..num_classes and 255, and that all frames
of a video have one size. It prints a report naming every bad file and exits with status 1 if anything is
bad (0 otherwise).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import os
import sys

from cffm_jax.data.vspw import (
    FRAME_SUFFIX,
    MASK_SUFFIX,
    NUM_CLASSES,
    SPLITS,
    DatasetError,
    VideoInfo,
    decode_mask,
    folder_frame_path,
    load_folder_frame,
    read_bytes,
    read_split,
    scan_video,
    split_file,
)


@dataclasses.dataclass
class Report:
    """Result of :func:`validate_dataset`: ``problems`` lists one message per bad file / video / split."""

    root: str
    splits: list[str]
    videos: int = 0
    frames: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        lines = [
            f"dataset {self.root}: splits {', '.join(self.splits) or '-'}; "
            f"{self.videos} videos, {self.frames} frames checked"
        ]
        if self.ok:
            lines.append("OK: no problems found")
        else:
            lines.append(f"{len(self.problems)} problem(s):")
            lines.extend(f"  {p}" for p in self.problems)
        return "\n".join(lines)


def _check_video(root: str, video: VideoInfo, num_classes: int) -> list[str]:
    problems = []
    size = None
    for t in range(video.num_frames):
        try:
            image, _ = load_folder_frame(root, video, t, num_classes)
        except DatasetError as e:
            problems.append(str(e))
            continue
        path = folder_frame_path(root, video, t)
        if size is None:
            size = (image.shape, path)
        elif image.shape != size[0]:
            problems.append(
                f"{path}: frame size {image.shape[1]}x{image.shape[0]} differs from "
                f"{size[1]} ({size[0][1]}x{size[0][0]})"
            )
    return problems


def _scan_unpaired(root: str, name: str, index: int, report: Report, num_classes: int) -> VideoInfo | None:
    """For a video whose frames and masks do not pair up: checks every mask file on its own and returns the
    video without labels (so its frames are still checked), or None if it has no frames folder."""
    origin = os.path.join(root, "data", name, "origin")
    mask_dir = os.path.join(root, "data", name, "mask")
    if os.path.isdir(mask_dir):
        for f in sorted(os.listdir(mask_dir)):
            if f.lower().endswith(MASK_SUFFIX):
                path = os.path.join(mask_dir, f)
                try:
                    decode_mask(read_bytes(path), path, num_classes)
                except DatasetError as e:
                    report.problems.append(str(e))
    if not os.path.isdir(origin):
        return None
    stems = tuple(f[: -len(FRAME_SUFFIX)] for f in sorted(os.listdir(origin)) if f.lower().endswith(FRAME_SUFFIX))
    return VideoInfo(name, index, stems, has_labels=False) if stems else None


def validate_dataset(
    root: str,
    splits: list[str] | None = None,
    *,
    num_classes: int = NUM_CLASSES,
    workers: int = 4,
) -> Report:
    """Checks a dataset folder completely; never raises for bad data (it is listed in the report).

    Args:
      root: dataset folder.
      splits: split names to check; default every one of train/val/test whose file exists.
      num_classes: valid raw mask values are 0..num_classes and 255.
      workers: threads decoding files.

    Returns:
      A :class:`Report`.
    """
    root = os.fspath(root)
    if splits is None:
        splits = [s for s in SPLITS if os.path.isfile(split_file(root, s))]
        if not splits:
            report = Report(root, [])
            report.problems.append(f"{root}: no split file ({', '.join(s + '.txt' for s in SPLITS)}) found")
            return report
    report = Report(root, list(splits))
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
    with concurrent.futures.ThreadPoolExecutor(max(workers, 1)) as pool:
        results = pool.map(lambda video: _check_video(root, video, num_classes), videos)
        for video, problems in zip(videos, results, strict=True):
            report.videos += 1
            report.frames += video.num_frames
            report.problems.extend(problems)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check a VSPW-layout dataset folder.")
    parser.add_argument("root", help="dataset folder (contains train.txt and data/)")
    parser.add_argument("--split", action="append", help="split to check (repeatable); default: all present")
    parser.add_argument("--num-classes", type=int, default=NUM_CLASSES)
    parser.add_argument("--workers", type=int, default=4, help="decoding threads")
    args = parser.parse_args(argv)
    report = validate_dataset(args.root, args.split, num_classes=args.num_classes, workers=args.workers)
    print(report.format())  # noqa: T201
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Shared helpers of the data tests: tiny synthetic VSPW folders and ways to damage them."""

from __future__ import annotations

import os
import shutil

import numpy as np

from cffm_jax.data import synthetic

TINY = dict(videos=3, val_videos=2, test_videos=1, frames=12, size=(48, 64), seed=0)


def make_dataset(path, **overrides) -> str:
    """Writes a tiny synthetic dataset (3 train / 2 val / 1 test videos of 12 frames, 48x64) into ``path``."""
    return synthetic.generate(os.fspath(path), **{**TINY, **overrides})


def copy_dataset(src: str, dst) -> str:
    shutil.copytree(src, os.fspath(dst))
    return os.fspath(dst)


def video_dir(root: str, split: str, i: int = 0) -> str:
    with open(os.path.join(root, f"{split}.txt")) as f:
        name = f.read().split()[i]
    return os.path.join(root, "data", name)


def frame_file(root: str, split: str, i: int = 0, t: int = 0, kind: str = "origin") -> str:
    folder = os.path.join(video_dir(root, split, i), kind)
    return os.path.join(folder, sorted(os.listdir(folder))[t])


def write_mask(path: str, mask: np.ndarray) -> None:
    with open(path, "wb") as f:
        f.write(synthetic.encode_mask(mask.astype(np.uint8)))


def assert_batches_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)

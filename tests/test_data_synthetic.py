"""Synthetic dataset: deterministic, VSPW layout, readable, passes validate, exercises 0 and 255."""

import filecmp
import os
import subprocess
import sys

import numpy as np
from data_helpers import make_dataset

from cffm_jax.data import validate
from cffm_jax.data.vspw import FolderSource, decode_mask, read_bytes


def _files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_deterministic_for_a_seed(tmp_path):
    a = make_dataset(tmp_path / "a")
    b = make_dataset(tmp_path / "b")
    c = make_dataset(tmp_path / "c", seed=1)
    assert _files(a) == _files(b)
    match, mismatch, errors = filecmp.cmpfiles(a, b, _files(a), shallow=False)
    assert not mismatch and not errors and len(match) == len(_files(a))
    frame = os.path.join("data", "000_syn_train", "origin", "00000000.jpg")
    assert not filecmp.cmp(os.path.join(a, frame), os.path.join(c, frame), shallow=False)


def test_layout_labels_and_validate(tmp_path):
    root = make_dataset(tmp_path / "d", videos=4, frames=10)
    assert {"train.txt", "val.txt", "test.txt", "data"} <= set(os.listdir(root))
    train = FolderSource(root, "train", require_labels=True)
    assert len(train.videos) == 4 and all(v.num_frames == 10 for v in train.videos)
    assert not FolderSource(root, "test").videos[0].has_labels  # like VSPW: no test masks
    raw_values = set()
    for video in train.videos:
        for t in range(video.num_frames):
            path = train.mask_path(video, t)
            raw_values |= set(np.unique(decode_mask(read_bytes(path), path)).tolist())
            image, label = train.load_frame(video, t)
            assert image.shape == (48, 64, 3) and label.shape == (48, 64)
    assert raw_values <= set(range(7)) | {255}
    assert {0, 1, 2, 255} <= raw_values and len(raw_values - {0, 255}) >= 4
    assert validate.validate_dataset(root).ok


def test_objects_move_smoothly(tmp_path):
    root = make_dataset(tmp_path / "e", videos=1, val_videos=0, test_videos=0)
    source = FolderSource(root, "train")
    video = source.videos[0]
    labels = [source.load_frame(video, t)[1] for t in range(video.num_frames)]
    changed = [np.mean(labels[t] != labels[t + 1]) for t in range(len(labels) - 1)]
    assert 0 < np.mean(changed) < 0.2  # things move, but consecutive frames stay similar


def test_cli(tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "cffm_jax.data.synthetic", "--out", str(out), "--videos", "1"]
    cmd += ["--val-videos", "1", "--test-videos", "0", "--frames", "3", "--size", "24x40", "--seed", "2"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    assert "wrote 2 videos x 3 frames (24x40)" in result.stdout
    assert len(os.listdir(out / "data" / "000_syn_train" / "origin")) == 3


def test_a_split_of_no_videos_gets_no_file_and_the_dataset_validates(tmp_path):
    """configs/demo.py asks for 0 test videos: the folder must pass validate and pack into TFDS as it is."""
    root = make_dataset(tmp_path / "demo")  # an earlier run into the same folder, with test videos
    make_dataset(root, test_videos=0)
    assert not os.path.exists(os.path.join(root, "test.txt"))
    assert validate.main([root, "--no-progress"]) == 0

"""The TFDS ``vspw`` builder (array_record, no TensorFlow) yields the same records as the folder reader."""

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from data_helpers import assert_batches_equal, frame_file, make_dataset

from cffm_jax.data import pipeline, tfds_vspw
from cffm_jax.data.vspw import DatasetError, FolderSource, open_source


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = make_dataset(tmp_path_factory.mktemp("vspw"))
    packed = tfds_vspw.build(root, tmp_path_factory.mktemp("tfds"))
    return root, packed


def test_builds_without_tensorflow(folders):
    import importlib.util

    _, packed = folders
    assert importlib.util.find_spec("tensorflow") is None  # the point of the array_record path
    assert packed.endswith("vspw/1.0.0")


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_same_records(folders, split):
    root, packed = folders
    raw, tf = FolderSource(root, split), open_source(packed, split)
    assert isinstance(tf, tfds_vspw.TfdsSource)
    assert tf.split_names == raw.split_names and tf.videos == raw.videos
    assert pipeline.video_names(packed, split) == raw.split_names
    for video in raw.videos:
        for t in range(video.num_frames):
            image_a, label_a = raw.load_frame(video, t)
            image_b, label_b = tf.load_frame(video, t)
            np.testing.assert_array_equal(image_a, image_b)
            if split == "test":
                assert label_a is None and label_b is None
            else:
                np.testing.assert_array_equal(label_a, label_b)


def test_same_training_batches(folders):
    root, packed = folders
    kw = dict(batch_size=2, crop_size=(24, 24), seed=3, shard_index=0, shard_count=1)
    a, b = pipeline.make_train_iterator(root, **kw), pipeline.make_train_iterator(packed, **kw)
    for _ in range(2):
        assert_batches_equal(next(a), next(b))
    frame_a = pipeline.list_eval_videos(root, "val")[1].load(3, img_scale=(64, 48))
    frame_b = pipeline.list_eval_videos(packed, "val")[1].load(3, img_scale=(64, 48))
    np.testing.assert_array_equal(frame_a.image, frame_b.image)
    np.testing.assert_array_equal(frame_a.label, frame_b.label)


def test_source_pickles_for_worker_processes(folders):
    import pickle

    source = open_source(folders[1], "val")
    video = source.videos[0]
    image, _ = source.load_frame(video, 0)  # opens the array_record reader
    clone = pickle.loads(pickle.dumps(source))
    np.testing.assert_array_equal(clone.load_frame(video, 0)[0], image)


def test_frames_load_on_several_threads(folders):
    """Evaluation loads frames on several threads (cffm_jax.streaming.ordered_map), the packed source included: the
    first loads open its reader at the same time."""
    from cffm_jax.streaming import ordered_map

    for root in folders:
        sequential = pipeline.list_eval_videos(root, "val")[1]
        expected = [sequential.load(t, img_scale=(64, 48)) for t in range(sequential.num_frames)]
        video = pipeline.list_eval_videos(root, "val")[1]  # a fresh source: reader not open yet
        loaded = list(ordered_map(lambda t, v=video: v.load(t, img_scale=(64, 48)), range(video.num_frames), 4))
        assert len(loaded) == len(expected)
        for a, b in zip(loaded, expected, strict=True):
            np.testing.assert_array_equal(a.image, b.image)
            np.testing.assert_array_equal(a.label, b.label)


def test_unknown_split_is_a_clear_error(folders):
    from cffm_jax.data.vspw import DatasetError

    with pytest.raises(DatasetError, match="no split 'nope'"):
        open_source(folders[1], "nope")


def test_data_root_may_be_the_data_dir_or_the_dataset_folder(folders):
    """README passes ``--data_dir /data/tfds``; that folder, ``/data/tfds/vspw`` and the version folder all work."""
    packed = folders[1]
    dataset_folder = os.path.dirname(packed)
    data_dir = os.path.dirname(dataset_folder)
    for root in (data_dir, dataset_folder):
        source = open_source(root, "val")
        assert isinstance(source, tfds_vspw.TfdsSource) and source.path == packed
        assert pipeline.video_names(root, "val") == FolderSource(folders[0], "val").split_names


def test_several_versions_are_listed_for_the_user_to_pick(folders, tmp_path):
    versions = [str(tmp_path / "vspw" / v) for v in ("1.0.0", "1.1.0")]
    for version in versions:
        shutil.copytree(folders[1], version)
    os.makedirs(tmp_path / "vspw" / "incomplete.X1_1.2.0")  # one TFDS is still writing: not a version
    listed = re.escape(f"holds 2 prepared TFDS version(s) ({', '.join(versions)}); pass one of them")
    for root in (tmp_path, tmp_path / "vspw"):
        with pytest.raises(DatasetError, match=listed):
            open_source(root, "val")
        with pytest.raises(DatasetError, match=listed):
            tfds_vspw.TfdsSource(root, "val")
    assert open_source(versions[1], "val").path == versions[1]
    with pytest.raises(DatasetError, match="split file not found"):
        open_source(tmp_path / "nothing", "val")


def test_an_empty_split_file_gives_no_split(tmp_path):
    """Synthetic datasets of 0 test videos used to get an empty test.txt (configs/demo.py): it packs all the same."""
    root = make_dataset(tmp_path / "demo", test_videos=0)
    open(os.path.join(root, "test.txt"), "w").close()
    packed = tfds_vspw.build(root, tmp_path / "tfds")
    assert len(open_source(packed, "val").videos) == 2
    with pytest.raises(DatasetError, match="no split 'test'"):
        open_source(packed, "test")


def test_cli_prints_a_dataset_error_without_traceback(tmp_path):
    root = make_dataset(tmp_path / "bad", videos=1, val_videos=0, test_videos=0, frames=2)
    mask = frame_file(root, "train", 0, 1, "mask")
    with open(mask, "wb") as f:
        f.write(b"not a png")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "cffm_jax.data.tfds_vspw", "--manual_dir", root, "--data_dir", str(tmp_path / "tfds")]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"error: {mask}: cannot decode mask (corrupt or truncated?)" in result.stderr

"""The TFDS ``vspw`` builder (array_record, no TensorFlow) yields the same records as the folder reader."""

import numpy as np
import pytest
from data_helpers import assert_batches_equal, make_dataset

from cffm_jax.data import pipeline, tfds_vspw
from cffm_jax.data.vspw import FolderSource, open_source


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

"""grain training pipeline and evaluation readers (SPEC 10) on a tiny synthetic dataset."""

import itertools
import subprocess
import sys

import numpy as np
import pytest
from data_helpers import assert_batches_equal, make_dataset

from cffm_jax.data import pipeline
from cffm_jax.data.vspw import read_split

CROP = (32, 32)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("vspw"))


def _iterator(root, **kw):
    args = dict(batch_size=2, crop_size=CROP, seed=0, shard_index=0, shard_count=1)
    return pipeline.make_train_iterator(root, **{**args, **kw})


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_train_batch_layout(root):
    batch = next(_iterator(root))
    assert set(batch) == {"clips", "labels", "video_index", "frame_index"}
    assert batch["clips"].shape == (2, 4, *CROP, 3) and batch["clips"].dtype == np.float32
    assert batch["labels"].shape == (2, 4, *CROP) and batch["labels"].dtype == np.int32
    assert batch["video_index"].shape == (2,) and batch["video_index"].dtype == np.int32
    assert batch["frame_index"].shape == (2, 4) and batch["frame_index"].dtype == np.int32
    assert set(np.unique(batch["labels"])) <= set(range(6)) | {255}
    assert len(set(np.unique(batch["labels"])) - {255}) >= 2
    assert (batch["video_index"] >= 0).all() and (batch["video_index"] < 3).all()
    for frames in batch["frame_index"]:
        steps = np.diff(frames)
        assert (steps == 3).all() or (steps == -3).all()  # references first, target last (maybe reversed)


def test_deterministic_and_seeded(root):
    a = _take(_iterator(root), 2)
    b = _take(_iterator(root), 2)
    c = _take(_iterator(root, seed=1), 2)
    for x, y in zip(a, b, strict=True):
        assert_batches_equal(x, y)
    assert not np.array_equal(a[0]["clips"], c[0]["clips"])


def test_resume_from_state_mid_epoch(root):
    it = _iterator(root)
    _take(it, 3)  # 3 videos, batches of 2: the state is in the middle of the second epoch
    state = it.get_state()
    expected = _take(it, 4)
    resumed = _iterator(root)
    resumed.set_state(state)
    for x, y in zip(expected, _take(resumed, 4), strict=True):
        assert_batches_equal(x, y)
    fresh = _take(_iterator(root), 4)
    assert not np.array_equal(fresh[0]["clips"], expected[0]["clips"])


def test_multi_worker_equals_single_worker(root):
    single = _take(_iterator(root), 4)
    it = _iterator(root, num_workers=2)
    try:
        multi = _take(it, 4)
    finally:
        it.close()
    for x, y in zip(single, multi, strict=True):
        assert_batches_equal(x, y)


def test_start_batch_continues_the_stream_with_any_worker_count(root):
    """A pipeline that skips k batches delivers what one that delivered k batches delivers next (also past an
    epoch and with worker processes): how a run resumes when its saved iterator state fits another worker count."""
    full = _take(_iterator(root), 5)
    it = _iterator(root, start_batch=2, num_workers=2)
    try:
        skipped = _take(it, 3)
    finally:
        it.close()
    for x, y in zip(full[2:], skipped, strict=True):
        assert_batches_equal(x, y)


def test_shards_split_the_stream(root):
    full = _take(_iterator(root, batch_size=1), 6)
    for index in range(2):
        shard = _take(_iterator(root, batch_size=1, shard_index=index, shard_count=2), 3)
        for x, y in zip(full[index::2], shard, strict=True):
            assert_batches_equal(x, y)


def test_finite_epochs_with_repeat(root):
    it = _iterator(root, batch_size=1, repeat=2, num_epochs=1)
    videos = [int(b["video_index"][0]) for b in it]
    assert sorted(videos) == [0, 0, 1, 1, 2, 2]


def test_prototypes_are_looked_up_per_video(root):
    names = pipeline.video_names(root, "train")
    assert names == read_split(root, "train")
    lookup = {name: np.full((5, 8), i, np.float32) for i, name in enumerate(names)}
    batch = next(_iterator(root, prototype_lookup=lookup.__getitem__))
    assert batch["prototypes"].shape == (2, 5, 8) and batch["prototypes"].dtype == np.float32
    np.testing.assert_array_equal(batch["prototypes"][:, 0, 0], batch["video_index"])


def test_eval_videos_and_frames(root):
    videos = pipeline.list_eval_videos(root, "val")
    assert [v.name for v in videos] == read_split(root, "val")
    video = videos[1]
    assert video.index == 1 and video.num_frames == 12 and video.has_labels
    assert video.frame_names[0].endswith("00000000.jpg")
    frame = video.load(4, img_scale=(64, 48))
    assert frame.image.shape == (64, 64, 3) and frame.image.dtype == np.uint8  # H 48 -> 64 (multiple of 32)
    assert frame.label.shape == (48, 64) and frame.label.dtype == np.uint8
    assert frame.original_size == (48, 64)
    assert video.clip_indices(4) == [0, 2, 3, 4]
    assert pipeline.load_eval_frame(video, 4).image.shape == (480, 640, 3)  # default (853, 480) scale
    test_frame = pipeline.list_eval_videos(root, "test")[0].load(0, img_scale=(64, 48))
    assert test_frame.label is None and test_frame.image.shape == (64, 64, 3)


def test_eval_dataset_items(root):
    ds = pipeline.make_eval_dataset(root, "val", img_scale=(64, 48))
    assert len(ds) == 2 * 12
    item = ds[12 + 5]
    assert int(item["video_index"]) == 1 and int(item["frame_index"]) == 5
    assert item["clip_frame_indices"].tolist() == [0, 2, 4, 5]
    assert item["image"].shape == (64, 64, 3) and item["label"].shape == (48, 64)
    frame = pipeline.list_eval_videos(root, "val")[1].load(5, img_scale=(64, 48))
    np.testing.assert_array_equal(item["image"], frame.image)
    assert [int(x["frame_index"]) for x in itertools.islice(iter(ds), 3)] == [0, 1, 2]


_LAST_BATCH_SCRIPT = """
import sys
import jax
from cffm_jax.data import pipeline

if __name__ == "__main__":
    it = pipeline.make_train_iterator(sys.argv[1], batch_size=2, crop_size=(32, 32), seed=0, num_workers=1)
    batch = {k: jax.device_put(v) for k, v in next(it).items()}  # as training does with the last batch
    batch = None
    if sys.argv[2] == "helper":
        pipeline.close_train_iterator(it)
    else:
        it.close()
    del it
    print("OK")
"""


def test_close_train_iterator_leaves_no_shared_memory(root, tmp_path):
    """A process that exits right after freeing its last batch: grain unlinks the batches' shared memory from a
    background thread, which the exit cuts short, and Python's resource tracker then warns of leaked segments
    (with ``it.close()`` alone this script's stderr has the warning on every run) unless close_train_iterator
    waited for that thread."""
    script = tmp_path / "last_batch.py"
    script.write_text(_LAST_BATCH_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), str(root), "helper"], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0 and "OK" in done.stdout, done.stderr[-3000:]
    assert "leaked shared_memory" not in done.stderr, done.stderr[-3000:]

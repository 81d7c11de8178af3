"""Bad input: clear DatasetErrors naming the file, skip_bad_videos, and the validate CLI (SPEC 10.1)."""

import logging
import os

import numpy as np
import pytest
from data_helpers import copy_dataset, frame_file, make_dataset, video_dir, write_mask

from cffm_jax.data import pipeline, validate
from cffm_jax.data.vspw import DatasetError, FolderSource, load_clip


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("pristine"))


@pytest.fixture
def root(pristine, tmp_path):
    return copy_dataset(pristine, tmp_path / "vspw")


def _load_all(source):
    for video in source.videos:
        load_clip(source, video, range(video.num_frames))


def _truncate(path):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 3])


def test_missing_mask_names_the_file(root):
    path = frame_file(root, "train", 1, 3, "mask")
    os.remove(path)
    with pytest.raises(DatasetError, match="missing masks: " + path):
        FolderSource(root, "train")


def test_extra_mask_is_a_count_mismatch(root):
    extra = os.path.join(video_dir(root, "val", 0), "mask", "99999999.png")
    write_mask(extra, np.zeros((48, 64)))
    with pytest.raises(DatasetError, match=r"12 frames but 13 masks.*masks without frame: " + extra):
        FolderSource(root, "val")


def test_unreadable_mask(root):
    path = frame_file(root, "train", 0, 2, "mask")
    with open(path, "wb") as f:
        f.write(b"not a png")
    with pytest.raises(DatasetError, match=path + ": cannot decode mask"):
        _load_all(FolderSource(root, "train"))


def test_truncated_jpeg(root):
    path = frame_file(root, "val", 1, 5)
    _truncate(path)
    with pytest.raises(DatasetError, match=path + ": cannot decode image"):
        _load_all(FolderSource(root, "val"))


def test_mask_size_mismatch(root):
    path = frame_file(root, "train", 2, 0, "mask")
    write_mask(path, np.ones((40, 64)))
    with pytest.raises(DatasetError, match=path + r": mask size 64x40 \(WxH\) differs from its frame"):
        _load_all(FolderSource(root, "train"))


def test_mask_values_out_of_range(root):
    path = frame_file(root, "train", 0, 0, "mask")
    mask = np.ones((48, 64))
    mask[3, 4] = 200
    write_mask(path, mask)
    with pytest.raises(DatasetError, match=path + r": mask values \[200\] outside the valid range 0..124"):
        _load_all(FolderSource(root, "train"))
    # The same value is fine for a dataset declared with more classes.
    _load_all(FolderSource(root, "train", num_classes=200))


def test_frames_of_different_sizes_in_a_clip(root):
    video = video_dir(root, "test", 0)
    from PIL import Image

    Image.fromarray(np.zeros((50, 64, 3), np.uint8)).save(os.path.join(video, "origin", "00000004.jpg"))
    with pytest.raises(DatasetError, match=r"00000004.jpg: frame size 64x50 differs from"):
        _load_all(FolderSource(root, "test"))


def test_missing_video_and_empty_split(root, tmp_path):
    with open(os.path.join(root, "val.txt"), "a") as f:
        f.write("ghost_video\n")
    with pytest.raises(DatasetError, match="ghost_video.*listed in a split file but its folder is missing"):
        FolderSource(root, "val")
    open(os.path.join(root, "train.txt"), "w").close()
    with pytest.raises(DatasetError, match="train.txt: empty split"):
        FolderSource(root, "train")
    with pytest.raises(DatasetError, match="split file not found"):
        FolderSource(root, "nosuchsplit")


def test_train_split_requires_masks(root):
    with pytest.raises(DatasetError, match="mask folder of video .* is missing"):
        pipeline.make_train_iterator(root, split="test", batch_size=1, seed=0, shard_index=0, shard_count=1)


def test_skip_bad_videos_at_index_time(root, caplog):
    bad = video_dir(root, "train", 1)
    os.remove(frame_file(root, "train", 1, 0, "mask"))
    with caplog.at_level(logging.WARNING):
        source = FolderSource(root, "train", skip_bad_videos=True)
    assert [v.index for v in source.videos] == [0, 2]  # video_index still counts from the split file
    assert "1 bad video" in caplog.text and bad in caplog.text


def test_short_videos_are_dropped_for_training_with_a_count(tmp_path, caplog):
    root = make_dataset(tmp_path / "short", frames=9)
    with caplog.at_level(logging.INFO), pytest.raises(DatasetError, match="no usable video"):
        pipeline.make_train_iterator(root, batch_size=1, seed=0, shard_index=0, shard_count=1)
    assert "skipped 3 videos with fewer than 10 frames" in caplog.text
    assert len(pipeline.list_eval_videos(root, "train")) == 3  # evaluation keeps them


def test_corrupt_video_during_training(root, caplog):
    for t in range(12):
        _truncate(frame_file(root, "train", 0, t))
    kw = dict(batch_size=1, crop_size=(16, 16), seed=0, shard_index=0, shard_count=1)
    with pytest.raises(DatasetError, match="cannot decode image"):
        for _ in range(6):
            next(pipeline.make_train_iterator(root, **kw))
    with caplog.at_level(logging.WARNING):
        it = pipeline.make_train_iterator(root, skip_bad_videos=True, **kw)
        videos = [int(next(it)["video_index"][0]) for _ in range(6)]
    assert 0 not in videos and set(videos) == {1, 2}
    assert "skipping bad video" in caplog.text


def test_validate_cli_reports_every_bad_file(root, capsys):
    assert validate.main([root]) == 0
    assert "OK: no problems found" in capsys.readouterr().out
    jpeg = frame_file(root, "train", 0, 7)
    _truncate(jpeg)
    mask = frame_file(root, "val", 1, 2, "mask")
    bad = np.zeros((48, 64))
    bad[0, 0] = 150
    write_mask(mask, bad)
    missing = frame_file(root, "val", 0, 4, "mask")
    os.remove(missing)
    jpeg_unpaired = frame_file(root, "val", 0, 9)  # its video's masks do not pair up: still checked
    _truncate(jpeg_unpaired)
    mask_unpaired = frame_file(root, "val", 0, 1, "mask")
    write_mask(mask_unpaired, bad)
    with open(os.path.join(root, "test.txt"), "a") as f:
        f.write("ghost\n" + open(os.path.join(root, "train.txt")).read().split()[2] + "\n")
    assert validate.main([root]) == 1
    out = capsys.readouterr().out
    assert "7 problem(s)" in out
    for text in [
        jpeg,
        mask,
        missing,
        jpeg_unpaired,
        mask_unpaired,
        "ghost",
        "is also listed in split 'train'",
    ]:
        assert text in out
    assert validate.main([root, "--split", "train"]) == 1
    assert "1 problem(s)" in capsys.readouterr().out


def test_validate_notes_an_empty_split_file_but_fails_on_an_empty_split_asked_for(root, capsys):
    """Older synthetic datasets (0 test videos) have an empty test.txt: not a problem unless that split is asked
    for; a split file listing a missing video stays one."""
    test_split = os.path.join(root, "test.txt")
    open(test_split, "w").close()
    assert validate.main([root, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"note: {test_split} lists no videos" in out and "OK: no problems found" in out
    assert validate.main([root, "--no-progress", "--split", "test"]) == 1
    assert f"{test_split}: empty split" in capsys.readouterr().out
    with open(test_split, "w") as f:
        f.write("ghost\n")
    assert validate.main([root, "--no-progress"]) == 1
    assert "ghost" in capsys.readouterr().out


def test_validate_reports_every_problem_in_one_run(root):
    """A video whose frames and masks do not pair up still gets its masks' sizes checked; a frame that does not
    decode does not hide a bad mask."""
    os.remove(frame_file(root, "train", 0, 5))  # the masks of video 0 no longer pair up with its frames
    small = frame_file(root, "train", 0, 2, "mask")
    write_mask(small, np.ones((40, 64)))
    jpeg = frame_file(root, "train", 1, 3)
    _truncate(jpeg)
    mask = frame_file(root, "train", 1, 3, "mask")
    bad = np.ones((48, 64))
    bad[0, 0] = 150
    write_mask(mask, bad)
    report = validate.validate_dataset(root, ["train"])
    assert len(report.problems) == 4, report.format()
    problems = "\n".join(report.problems)
    assert "frame/mask mismatch in video" in problems
    assert small + ": mask size 64x40 (WxH) differs from its frame" in problems
    assert jpeg + ": cannot decode image" in problems
    assert mask + ": mask values [150]" in problems


def test_corrupt_file_messages_name_the_file_not_a_buffer(root):
    jpeg = frame_file(root, "val", 0, 1)
    with open(jpeg, "wb") as f:
        f.write(b"not a jpeg")
    with pytest.raises(DatasetError) as error:
        _load_all(FolderSource(root, "val"))
    assert "BytesIO" not in str(error.value)
    assert str(error.value) == f"{jpeg}: cannot decode image (corrupt or truncated?): cannot identify image file {jpeg}"
    mask = frame_file(root, "train", 0, 0, "mask")
    with open(mask, "wb") as f:
        f.write(b"not a png")
    report = validate.validate_dataset(root, ["train"])
    assert report.problems == [f"{mask}: cannot decode mask (corrupt or truncated?): cannot identify image file {mask}"]


def test_validate_shows_progress_on_stderr(root, capsys):
    """Full VSPW takes minutes: videos done, frames/s and the ETA go to stderr (the report alone to stdout)."""
    assert validate.main([root]) == 0
    captured = capsys.readouterr()
    assert "6/6 videos" in captured.err and "frame/s" in captured.err and "72/72" in captured.err
    assert "frame/s" not in captured.out
    assert validate.main([root, "--no-progress"]) == 0
    assert capsys.readouterr().err == ""

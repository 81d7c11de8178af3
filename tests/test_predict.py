"""Segmenting users' videos (cffm_jax.predict): frame folders, animated GIFs, video files, bad input.

Uses the tiny CFFM++ fixture (on-the-fly prototypes) on synthetic frames of 48x80 with --img-scale 80 48, the
same shapes as test_streaming.py, so the jitted functions are shared within one pytest process.
"""

import json
import logging
import os
import shutil

import numpy as np
import pytest
from PIL import Image, ImageSequence
from test_streaming import BATCH, IMG_SCALE, tiny_model

from cffm_jax import predict
from cffm_jax.checkpoint import CheckpointError, save_variables
from cffm_jax.data import transforms
from cffm_jax.data.pipeline import EvalFrame
from cffm_jax.data.synthetic import generate
from cffm_jax.prototype_store import prototype_frame_indices
from cffm_jax.streaming import VideoSegmenter, compute_prototypes
from cffm_jax.visualize import colorize, palette

NUM_FRAMES = 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("predict")
    root = generate(str(tmp / "data"), videos=0, val_videos=1, test_videos=0, frames=NUM_FRAMES, size=(48, 80))
    (video,) = open(os.path.join(root, "val.txt")).read().split()
    frames_dir = tmp / "my_video"
    shutil.copytree(os.path.join(root, "data", video, "origin"), frames_dir)
    weights = {}
    for name in ("cffm", "cffmpp"):
        config, variables = tiny_model(f"{name}_tiny.npz")
        weights[name] = str(save_variables(tmp / f"{name}_weights", variables, config))
    rgb = [np.asarray(Image.open(frames_dir / f)) for f in sorted(os.listdir(frames_dir))]
    return {"tmp": tmp, "frames_dir": frames_dir, "weights": weights, "rgb": rgb}


def _run(setup, input_path, out, *extra):
    argv = ["--checkpoint", setup["weights"]["cffmpp"], "--input", str(input_path), "--output", str(out),
            "--img-scale", *map(str, IMG_SCALE), "--batch-size", str(BATCH), "--no-progress",
            *extra]  # fmt: skip
    return predict.main(argv)


def _expected_labels(frames_rgb, video=None):
    """Class ids predicted directly with the library: prototypes of seed 0 and the video's own k-means key (what
    ``python -m cffm_jax.prototypes`` stores; ``video=None``: the plain seed's key), streaming."""
    config, variables = tiny_model("cffmpp_tiny.npz")
    segmenter = VideoSegmenter(config, variables, batch_size=BATCH)
    images = [transforms.test_transform(f, img_scale=IMG_SCALE) for f in frames_rgb]
    protos = compute_prototypes(segmenter, [images[t] for t in prototype_frame_indices(len(images))], video=video)
    frames = [EvalFrame(im, None, f.shape[:2]) for im, f in zip(images, frames_rgb, strict=True)]
    return [r.pred for r in segmenter.segment(frames, protos)]


def _check_outputs(out, names, frames_rgb, video):
    assert sorted(os.listdir(out)) == ["labels", "manifest.json", "masks", "overlay", "preview.gif"]
    for sub in ("labels", "masks", "overlay"):
        assert sorted(os.listdir(out / sub)) == [f"{n}.png" for n in names]
    expected = _expected_labels(frames_rgb, video)
    for name, ids, rgb in zip(names, expected, frames_rgb, strict=True):
        labels = np.asarray(Image.open(out / "labels" / f"{name}.png"))
        np.testing.assert_array_equal(labels, ids)
        np.testing.assert_array_equal(np.asarray(Image.open(out / "masks" / f"{name}.png")), colorize(ids))
        blend = np.asarray(Image.open(out / "overlay" / f"{name}.png")).astype(int)
        assert blend.shape == rgb.shape
        assert np.abs(blend - (rgb.astype(int) + colorize(ids)) / 2).max() <= 1
    with Image.open(out / "preview.gif") as gif:
        assert gif.n_frames == len(names) and gif.size == (80, 48)
        previews = [np.asarray(f.convert("RGB")).astype(int) for f in ImageSequence.Iterator(gif)]
    overlays = [np.asarray(Image.open(out / "overlay" / f"{n}.png")).astype(int) for n in names]
    for t, preview in enumerate(previews):  # in frame order (frames are written on several threads)
        distances = [np.abs(preview - o).mean() for o in overlays]
        assert int(np.argmin(distances)) == t or distances[t] == min(distances), (t, distances)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["frame_names"] == names and manifest["arch"] == "cffmpp"
    assert manifest["prototypes"].startswith("on the fly")
    assert len(np.unique(np.stack(expected))) > 1


def test_colorize_is_the_palette_of_the_raw_values():
    """Class c has colour palette()[c + 1] and 255 (ignored) palette()[255], for uint8 and wider ids."""
    ids = np.arange(256, dtype=np.uint8).reshape(16, 16)
    expected = palette()[np.where(ids.astype(int) == 255, 255, ids.astype(int) + 1)]
    np.testing.assert_array_equal(colorize(ids), expected)
    np.testing.assert_array_equal(colorize(ids.astype(np.int32)), expected)
    assert colorize(ids).dtype == np.uint8 and colorize(ids).shape == (16, 16, 3)


def test_folder_of_frames(setup, capsys):
    out = setup["tmp"] / "out_folder"
    assert _run(setup, setup["frames_dir"], out) == out
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote {NUM_FRAMES} frames of 'my_video' to {out}"
    names = [f"{t:08d}" for t in range(NUM_FRAMES)]
    _check_outputs(out, names, setup["rgb"], "my_video")
    assert not (setup["tmp"] / ".out_folder.partial").exists()


def test_a_single_frame(setup, capsys):
    """One image is a video of one frame (its prototypes come from that frame ten times); the summary says 'frame'."""
    single = setup["tmp"] / "single"
    single.mkdir()
    first = sorted(os.listdir(setup["frames_dir"]))[0]
    shutil.copy(setup["frames_dir"] / first, single / first)
    out = _run(setup, single, setup["tmp"] / "out_single")
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote 1 frame of 'single' to {out}"
    assert os.listdir(out / "labels") == [first.replace(".jpg", ".png")]


def test_prototypes_from_a_store(setup):
    """--prototypes DIR: the store's entry for the video (named after the folder) is used."""
    from cffm_jax.prototype_store import PrototypeStore

    config, variables = tiny_model("cffmpp_tiny.npz")
    segmenter = VideoSegmenter(config, variables, batch_size=BATCH)
    images = [transforms.test_transform(f, img_scale=IMG_SCALE) for f in setup["rgb"]]
    protos = compute_prototypes(segmenter, [images[t] for t in prototype_frame_indices(len(images))])
    store = PrototypeStore(setup["tmp"] / "store", embed_dim=32, num_prototypes=100, source="generated")
    with pytest.raises(FileNotFoundError, match="no prototypes for video 'my_video'"):
        _run(setup, setup["frames_dir"], setup["tmp"] / "out_store", "--prototypes", str(store.root))
    store.put("my_video", protos)
    out = _run(setup, setup["frames_dir"], setup["tmp"] / "out_store", "--prototypes", str(store.root))
    expected = _expected_labels(setup["rgb"])
    for t, ids in enumerate(expected):
        np.testing.assert_array_equal(np.asarray(Image.open(out / "labels" / f"{t:08d}.png")), ids)
    assert json.loads((out / "manifest.json").read_text())["prototypes"].startswith("store")


def test_on_the_fly_prototypes_equal_the_generators(setup):
    """predict's CFFM++ prototypes for a video are those `python -m cffm_jax.prototypes` stores for it (same seed,
    the video's own k-means key), not those of another initialisation."""
    from cffm_jax.prototypes import PrototypeGenerator

    config, variables = tiny_model("cffmpp_tiny.npz")
    reader = predict.open_input(setup["frames_dir"])
    got = predict.video_prototypes(VideoSegmenter(config, variables, batch_size=BATCH), reader, IMG_SCALE, 0)
    images = [transforms.test_resize(f, img_scale=IMG_SCALE) for f in reader.read(prototype_frame_indices(12))]
    np.testing.assert_allclose(
        got, PrototypeGenerator(config, variables, seed=0).prototypes("my_video", images), atol=1e-5
    )


def test_animated_gif(setup):
    gif = setup["tmp"] / "clip.gif"
    images = [Image.fromarray(f) for f in setup["rgb"]]
    images[0].save(gif, save_all=True, append_images=images[1:], duration=100, loop=0)
    with Image.open(gif) as im:
        decoded = [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)]
    out = setup["tmp"] / "out_gif"
    _run(setup, gif, out)
    _check_outputs(out, [f"{t:06d}" for t in range(NUM_FRAMES)], decoded, "clip")


def test_video_file(setup):
    av = pytest.importorskip("av", reason="PyAV (the 'av' package) reads video files")
    path = setup["tmp"] / "clip.mp4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 80, 48, "yuv420p"
        for rgb in setup["rgb"]:
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    reader = predict.open_input(path)
    assert reader.num_frames == NUM_FRAMES and reader.name == "clip"
    decoded = [f for _, f in reader.iterate()]
    assert np.abs(decoded[3].astype(int) - setup["rgb"][3].astype(int)).mean() < 20  # lossy, but the same video
    out = setup["tmp"] / "out_video"
    _run(setup, path, out)
    _check_outputs(out, [f"{t:06d}" for t in range(NUM_FRAMES)], decoded, "clip")


def test_truncated_video_file_is_named(tmp_path, caplog):
    """A truncated file decodes without an error as far as it goes: a Matroska file cut in half gives 9 of its 30
    frames. Opening it says how many frames its header announces; a whole file says nothing."""
    av = pytest.importorskip("av", reason="PyAV (the 'av' package) reads video files")
    path = tmp_path / "long.mkv"
    rng = np.random.default_rng(0)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for _ in range(30):
            rgb = rng.integers(0, 256, (64, 64, 3), np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with caplog.at_level(logging.WARNING, logger="cffm_jax.predict"):
        assert predict.open_input(path).num_frames == 30
        assert not caplog.records
        data = path.read_bytes()
        cut = tmp_path / "cut.mkv"
        cut.write_bytes(data[: len(data) // 2])
        frames = predict.open_input(cut).num_frames
    assert 0 < frames < 20
    (record,) = caplog.records
    assert f"{cut}: decoded {frames} frames, but its header announces 30" in record.getMessage()

    # a raw stream announces neither a frame count nor a duration: nothing to compare, no warning
    raw = tmp_path / "raw.m4v"
    with av.open(str(raw), mode="w", format="m4v") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for _ in range(5):
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cffm_jax.predict"):
        assert predict.open_input(raw).num_frames == 5
    assert not caplog.records


# ---------------------------------------------------------------------------------------------------------
# Bad input: a clear error and no output folder.


def test_bad_inputs(setup):
    tmp = setup["tmp"]
    out = tmp / "out_bad"
    (tmp / "empty").mkdir()
    with pytest.raises(predict.InputError, match="no frames found"):
        _run(setup, tmp / "empty", out)
    with pytest.raises(predict.InputError, match="input not found"):
        _run(setup, tmp / "missing.mp4", out)
    (tmp / "garbage.mp4").write_bytes(b"\x00not a video" * 100)
    with pytest.raises(predict.InputError, match="PyAV|cannot decode video"):
        _run(setup, tmp / "garbage.mp4", out)
    (tmp / "garbage.gif").write_bytes(b"GIF89a-broken")
    with pytest.raises(predict.InputError, match="cannot read image"):
        _run(setup, tmp / "garbage.gif", out)
    assert not out.exists()


def test_checkpoint_for_another_model_or_class_count(setup):
    out = setup["tmp"] / "out_model"
    with pytest.raises(CheckpointError, match="different model"):
        _run(setup, setup["frames_dir"], out, "--model", "cffm_b1")
    with pytest.raises(CheckpointError, match="predicts 7 classes, but --num-classes 124"):
        _run(setup, setup["frames_dir"], out, "--num-classes", "124")
    assert not out.exists()


def test_failure_midway_leaves_no_output(setup):
    tmp = setup["tmp"]
    broken = shutil.copytree(setup["frames_dir"], tmp / "broken_frames")
    (broken / "00000011.jpg").write_bytes(b"truncated")  # not one of the 10 prototype frames
    out = tmp / "out_broken"
    with pytest.raises(predict.InputError, match="00000011.jpg: cannot read frame"):
        _run(setup, broken, out)
    assert not out.exists() and not (tmp / ".out_broken.partial").exists()

    mixed = shutil.copytree(setup["frames_dir"], tmp / "mixed_sizes")
    Image.fromarray(setup["rgb"][0]).resize((64, 40)).save(mixed / "00000010.jpg")
    with pytest.raises(ValueError, match="all frames of a video must have the same size"):
        _run(setup, mixed, out)
    assert not out.exists() and not (tmp / ".out_broken.partial").exists()


def test_overwrite_replaces_only_an_earlier_output(setup):
    """--overwrite deletes an earlier output of predict, never a folder that holds the input (or its parent) or
    files predict did not write: the audit's `--input ow --output ow --overwrite` deleted the frames."""
    frames = setup["tmp"] / "ow"
    shutil.copytree(setup["frames_dir"], frames)
    for out in (frames, setup["tmp"]):  # the input itself, a parent of it
        with pytest.raises(FileExistsError, match="which --overwrite would delete"):
            _run(setup, frames, out, "--overwrite")
    assert len(os.listdir(frames)) == NUM_FRAMES
    foreign = setup["tmp"] / "thesis"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("x")
    with pytest.raises(FileExistsError, match="did not write"):
        _run(setup, frames, foreign, "--overwrite")
    assert (foreign / "notes.txt").exists()
    out = _run(setup, frames, setup["tmp"] / "out_twice")
    assert _run(setup, frames, out, "--overwrite") == out  # an earlier output is replaced


def test_frame_folder_order_orientation_and_bit_depth(tmp_path):
    """Frames in natural name order (2 before 10), hidden files skipped, EXIF orientation applied, 16-bit PNGs
    by their top 8 bits (PIL's conversion made them all white)."""
    for t in (1, 2, 10):
        Image.fromarray(np.full((4, 6, 3), t, np.uint8)).save(tmp_path / f"{t}.png")
    (tmp_path / "._1.png").write_bytes(b"macOS resource fork")
    reader = predict.open_input(tmp_path)
    assert reader.frame_names == ["1", "2", "10"]
    assert [int(f[0, 0, 0]) for _, f in reader.iterate()] == [1, 2, 10]

    deep = np.array([[0, 256, 65535]], np.uint16)
    with Image.fromarray(deep) as im:
        im.save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as im:
        assert im.mode.startswith("I;16")
        np.testing.assert_array_equal(predict._rgb(im)[..., 0], [[0, 1, 255]])

    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: viewers show it 90 degrees clockwise
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(tmp_path / "phone.jpg", exif=exif)
    with Image.open(tmp_path / "phone.jpg") as im:
        assert predict._rgb(im).shape == (6, 4, 3)


def test_existing_output_needs_overwrite(setup):
    out = setup["tmp"] / "out_existing"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="--overwrite"):
        _run(setup, setup["frames_dir"], out)
    assert (out / "keep.txt").exists()

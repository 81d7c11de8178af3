"""Whole-video evaluation CLI and library (cffm_jax.evaluate) on a small synthetic dataset.

Two val videos of 20 frames at 48x80 (enough for mVC windows of 8 and 16), the official tiny fixture weights
saved as weights directories, and an experiment config file written here in the schema of configs/.
"""

import json
import logging
import math
import os
import shutil

import numpy as np
import pytest
from PIL import Image
from test_streaming import IMG_SCALE, tiny_model

from cffm_jax import evaluate
from cffm_jax.checkpoint import CheckpointError, save_variables
from cffm_jax.data.synthetic import generate
from cffm_jax.data.vspw import DatasetError, reduce_zero_label
from cffm_jax.prototype_store import PrototypeStore

METRICS = ("miou", "miou_gt_present", "aacc", "fwiou", "mvc8", "mvc16")

CONFIG = """
import ml_collections
from cffm_jax.models import model_config


def get_config(arg=None):
    config = ml_collections.ConfigDict()
    config.model = model_config(
        arg or "cffm_b0", embed_dims=(8, 16, 40, 64), depths=(2, 1, 1, 2), decoder_embed_dim=32,
        decoder_depth=2, num_classes=7)
    config.workdir = {workdir!r}
    config.seed = 0
    config.data = ml_collections.ConfigDict()
    config.data.root = "/nonexistent"  # the tests override it with --config.data.root=...
    config.data.synthetic = ml_collections.ConfigDict(dict(videos=0, val_videos=1, frames=4, size=(48, 80)))
    config.data.train_split = "train"
    config.data.val_split = "val"
    config.data.crop_size = (48, 48)
    config.data.img_scale = {img_scale!r}
    config.data.num_workers = 0
    config.data.prototypes_dir = ""
    return config
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Dataset, weights directories of both fixtures, and a config file."""
    tmp = tmp_path_factory.mktemp("eval")
    root = generate(str(tmp / "data"), videos=0, val_videos=2, test_videos=1, frames=20, size=(48, 80), seed=5)
    weights = {}
    for name in ("cffm", "cffmpp"):
        config, variables = tiny_model(f"{name}_tiny.npz")
        weights[name] = str(save_variables(tmp / f"{name}_weights", variables, config))
    config_file = tmp / "tiny_config.py"
    config_file.write_text(CONFIG.format(workdir=str(tmp / "workdir"), img_scale=IMG_SCALE))
    return {"tmp": tmp, "root": root, "weights": weights, "config": str(config_file)}


@pytest.fixture(scope="module")
def streamed(setup):
    """A streaming evaluation run through the CLI, with saved predictions."""
    out = setup["tmp"] / "streamed"
    argv = [
        "--config", setup["config"], f"--config.data.root={setup['root']}",
        "--checkpoint", setup["weights"]["cffm"],
        "--json", str(out / "metrics.json"), "--predictions-out", str(out / "pred"), "--batch-size", "4",
        "--no-progress", "--loader-threads", "3",
    ]  # fmt: skip
    scores = evaluate.main(argv)
    return {"scores": scores, "json": out / "metrics.json", "pred": out / "pred"}


def test_cli_writes_every_metric(setup, streamed, capsys):
    data = json.loads(streamed["json"].read_text())
    for key in METRICS:
        assert isinstance(data[key], float) and 0 <= data[key] <= 100, key
        assert data[key] == pytest.approx(streamed["scores"][key])
    assert data["num_videos"] == 2 and data["num_frames"] == 40
    assert len(data["per_class_iou"]) == 7
    assert data["run"]["streaming"] is True and data["run"]["split"] == "val"
    assert data["run"]["img_scale"] == list(IMG_SCALE)


def test_predictions_use_the_submission_layout(setup, streamed):
    pred = streamed["pred"]
    videos = sorted(os.listdir(pred))
    assert videos == sorted(os.listdir(os.path.join(setup["root"], "data")))[:2]  # the val videos
    assert not any(p.name.endswith(".partial") for p in pred.parent.iterdir())
    for video in videos:
        files = sorted(os.listdir(pred / video))
        assert files == [f"{t:08d}.png" for t in range(20)]
    with Image.open(pred / videos[0] / "00000005.png") as im:
        assert im.mode == "P" and im.size == (80, 48)
        raw = np.asarray(im)
    assert raw.min() >= 1 and raw.max() <= 7  # class id + 1
    np.testing.assert_array_equal(evaluate.read_prediction(pred / videos[0] / "00000005.png", 7), raw - 1)
    np.testing.assert_array_equal(reduce_zero_label(raw), raw - 1)


def test_scoring_saved_predictions_gives_the_same_metrics(setup, streamed):
    out = setup["tmp"] / "scored.json"
    scores = evaluate.main(
        ["--predictions", str(streamed["pred"]), "--data-root", setup["root"], "--num-classes", "7",
         "--json", str(out), "--no-progress"]
    )  # fmt: skip
    for key in METRICS + ("macc", "num_frames", "num_videos"):
        assert scores[key] == pytest.approx(streamed["scores"][key], abs=1e-9), key
    np.testing.assert_allclose(scores["per_class_iou"], streamed["scores"]["per_class_iou"])
    assert set(METRICS) <= set(json.loads(out.read_text()))


def test_scoring_names_what_it_does_not_score(setup, streamed, tmp_path, caplog):
    """A predictions folder may hold more than the split's predictions (another split's videos); scoring ignores
    them, and says so: entries that are no video of the split, files that are no frame of a scored video."""
    pred = shutil.copytree(streamed["pred"], tmp_path / "pred")
    kwargs = dict(num_classes=7, progress=False)
    with caplog.at_level(logging.WARNING, logger="cffm_jax.evaluate"):
        clean = evaluate.score_predictions(pred, setup["root"], **kwargs)
        assert not caplog.records
        video = sorted(os.listdir(pred))[0]
        shutil.copytree(pred / video, pred / "another_video")
        (pred / "notes.txt").write_text("x")
        shutil.copy(pred / video / "00000003.png", pred / video / "00000003 (copy).png")
        scores = evaluate.score_predictions(pred, setup["root"], **kwargs)
    assert scores["miou"] == clean["miou"] and scores["num_frames"] == clean["num_frames"]
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        f"{pred}: not scored, no video of split 'val' (2): another_video, notes.txt",
        f"{pred}: not scored, no frame of its video (1): {video}/00000003 (copy).png",
    ]


def test_clip_by_clip_gives_the_same_predictions(setup, streamed):
    """Also: frames loaded on one thread here, on three (in order) for the streamed run."""
    out = setup["tmp"] / "clip"
    scores = evaluate.main(
        ["--config", setup["config"], f"--config.data.root={setup['root']}", "--checkpoint",
         setup["weights"]["cffm"], "--no-streaming", "--predictions-out", str(out), "--batch-size", "4",
         "--no-progress", "--loader-threads", "1"]
    )  # fmt: skip
    for key in METRICS:
        assert scores[key] == pytest.approx(streamed["scores"][key], abs=1e-9), key
    for video in os.listdir(out):
        for name in os.listdir(out / video):
            a = np.asarray(Image.open(out / video / name))
            b = np.asarray(Image.open(streamed["pred"] / video / name))
            np.testing.assert_array_equal(a, b, err_msg=f"{video}/{name}")


def test_library_api_cffmpp_with_store_and_auto(setup):
    """evaluate_videos as the training loop calls it; CFFM++ with a store generated with seed 0 (the
    generator of ``python -m cffm_jax.prototypes``) equals 'auto'."""
    from cffm_jax.prototype_store import prototype_frame_indices
    from cffm_jax.prototypes import PrototypeGenerator
    from cffm_jax.streaming import VideoSegmenter, compute_prototypes

    config, variables = tiny_model("cffmpp_tiny.npz")
    kwargs = dict(split="val", img_scale=IMG_SCALE, max_videos=1, progress=False, batch_size=4)
    auto = evaluate.evaluate_videos(config, variables, setup["root"], prototypes="auto", **kwargs)
    assert auto["num_videos"] == 1 and auto["num_frames"] == 20
    assert {"miou", "miou_gt_present", "aacc", "fwiou", "mvc8", "mvc16", "per_class_iou"} <= set(auto)

    store = PrototypeStore(setup["tmp"] / "protos", embed_dim=32, num_prototypes=100, source="generated")
    from cffm_jax.data.pipeline import list_eval_videos

    video = list_eval_videos(setup["root"], "val")[0]
    images = [video.load(t, img_scale=IMG_SCALE).image for t in prototype_frame_indices(video.num_frames)]
    generated = PrototypeGenerator(config, variables, seed=0).prototypes(video.name, images)
    store.put(video.name, generated)
    # what 'auto' computes for this video: the generator's prototypes (same k-means initialisation)
    segmenter = VideoSegmenter(config, variables, batch_size=4)
    np.testing.assert_allclose(compute_prototypes(segmenter, images, video=video.name), generated, atol=1e-5)
    assert np.abs(compute_prototypes(segmenter, images) - generated).max() > 1e-2  # another initialisation
    stored = evaluate.evaluate_videos(config, variables, setup["root"], prototypes=store, **kwargs)
    for key in METRICS:
        assert stored[key] == pytest.approx(auto[key], abs=1e-9), key

    with pytest.raises(ValueError, match="needs per-video prototypes"):
        evaluate.evaluate_videos(config, variables, setup["root"], prototypes=None, **kwargs)


def test_a_split_without_masks_is_predicted_and_saved_not_scored(setup, tmp_path, caplog):
    """VSPW's test split has no masks: its frames are predicted and written, and the metrics are NaN (with a
    warning)."""
    config, variables = tiny_model("cffm_tiny.npz")
    kwargs = dict(img_scale=IMG_SCALE, progress=False, batch_size=4)
    with caplog.at_level(logging.WARNING, logger="cffm_jax.evaluate"):
        scores = evaluate.evaluate_videos(
            config, variables, setup["root"], split="test", predictions_dir=tmp_path / "p", **kwargs
        )
    assert scores["num_frames"] == 0 and scores["num_predicted_frames"] == 20 and math.isnan(scores["miou"])
    assert any("has no labelled frames" in r.getMessage() for r in caplog.records)
    (video,) = os.listdir(tmp_path / "p")
    assert len(os.listdir(tmp_path / "p" / video)) == 20


def test_no_eager_device_operations_per_frame(setup, monkeypatch):
    """The evaluation loop's thread feeds the device while the loading threads hold the GIL: each call it makes costs
    milliseconds there (GPU). Every device operation per chunk or frame is a jitted program or a transfer, none an
    eager jax operation (``jnp.asarray`` of host data, ``jnp.zeros``: one dispatch more each): the eager ones made
    by one evaluation are the same for one video as for two."""
    from jax._src import dispatch

    config, variables = tiny_model("cffm_tiny.npz")
    kwargs = dict(split="val", img_scale=IMG_SCALE, progress=False, batch_size=4)
    evaluate.evaluate_videos(config, variables, setup["root"], max_videos=2, **kwargs)  # compiles
    eager = []
    apply_primitive = dispatch.apply_primitive

    def counted(prim, *args, **params):
        eager.append(str(prim))
        return apply_primitive(prim, *args, **params)

    monkeypatch.setattr(dispatch, "apply_primitive", counted)
    counts = []
    for videos in (1, 2):
        eager.clear()
        scores = evaluate.evaluate_videos(config, variables, setup["root"], max_videos=videos, **kwargs)
        assert scores["num_frames"] == 20 * videos
        counts.append(list(eager))
    assert counts[0] == counts[1] and len(counts[0]) <= 2, counts


# ---------------------------------------------------------------------------------------------------------
# Bad input.


def test_checkpoint_for_another_class_count_is_rejected(setup):
    argv = ["--config", setup["config"], f"--config.data.root={setup['root']}",
            "--config.model.num_classes=5",
            "--checkpoint", setup["weights"]["cffm"], "--no-progress"]  # fmt: skip
    with pytest.raises(CheckpointError, match="num_classes: checkpoint has 7, expected 5"):
        evaluate.main(argv)
    argv = ["--config", f"{setup['config']}:cffmpp_b0", f"--config.data.root={setup['root']}",
            "--checkpoint", setup["weights"]["cffm"], "--no-progress"]  # fmt: skip
    with pytest.raises(CheckpointError, match="arch"):
        evaluate.main(argv)


def test_backbone_checkpoint_is_rejected(setup):
    """A MiT (ImageNet backbone) weights directory: a CheckpointError naming it, not an AttributeError."""
    from cffm_jax.models import init_variables, model_config

    config = model_config("mit_b0", embed_dims=(8, 16, 40, 64), depths=(1, 1, 1, 1))
    weights = save_variables(setup["tmp"] / "mit_weights", init_variables(config, 0), config)
    argv = ["--checkpoint", str(weights), "--data-root", setup["root"], "--no-progress"]
    with pytest.raises(CheckpointError, match="holds a mit_b0 model; video segmentation needs CFFM or CFFM"):
        evaluate.main(argv)


def test_prototypes_of_another_scale_are_named(setup, caplog):
    """CFFM++ with a store whose manifest says its prototypes came from frames at another scale: a warning with
    both scales (the store is still used: the user may mean it)."""
    store = PrototypeStore(setup["tmp"] / "protos_scaled", embed_dim=32, num_prototypes=100, source="generated",
                           info={"img_scale": [160, 96]})  # fmt: skip
    store.put("unused", np.zeros((100, 32), np.float32))
    argv = ["--config", f"{setup['config']}:cffmpp_b0", f"--config.data.root={setup['root']}",
            "--checkpoint", setup["weights"]["cffmpp"], "--prototypes", str(store.root), "--no-progress"]  # fmt: skip
    with caplog.at_level("WARNING"), pytest.raises(FileNotFoundError, match="no prototypes for video"):
        evaluate.main(argv)  # the store holds none of the val videos: the warning came before
    scale = "x".join(map(str, IMG_SCALE))
    assert any(f"fit 160x96, this evaluation rescales to {scale}" in r.getMessage() for r in caplog.records)


def test_videos_are_split_between_processes_by_frame_count():
    assert evaluate.split_videos([10, 50, 20, 30, 40], 1) == [0] * 5
    # longest first to the least loaded: 50 -> 0, 40 -> 1, 30 -> 1, 20 -> 0, 10 -> 0 (80 and 70 frames)
    assert evaluate.split_videos([10, 50, 20, 30, 40], 2) == [0, 0, 0, 1, 1]
    assert evaluate.split_videos([5], 3) == [0]  # processes without a video still take part


def test_incomplete_multi_host_flags_are_an_error(setup):
    argv = ["--config", setup["config"], f"--config.data.root={setup['root']}", "--num-processes", "2",
            "--checkpoint", setup["weights"]["cffm"], "--no-progress"]  # fmt: skip
    with pytest.raises(ValueError, match="coordinator address"):
        evaluate.main(argv)


def test_unknown_config_field_is_an_error(setup):
    with pytest.raises(ValueError, match="bogus"):
        evaluate.main(["--config", setup["config"], "--config.data.bogus=1", "--checkpoint", "x"])


def test_prediction_of_the_wrong_size_is_rejected(setup, streamed):
    bad = setup["tmp"] / "bad_size"
    shutil.copytree(streamed["pred"], bad)
    video = sorted(os.listdir(bad))[1]
    path = bad / video / "00000007.png"
    with Image.open(path) as im:
        im.resize((40, 24), Image.Resampling.NEAREST).save(path)
    with pytest.raises(
        DatasetError, match="00000007.png: prediction size 40x24 .* differs from the ground truth 80x48"
    ):
        evaluate.score_predictions(bad, setup["root"], num_classes=7, progress=False)
    path.unlink()
    with pytest.raises(DatasetError, match="prediction missing for frame 7"):
        evaluate.score_predictions(bad, setup["root"], num_classes=7, progress=False)


def test_existing_output_is_not_overwritten_and_failures_leave_nothing(setup, streamed):
    config, variables = tiny_model("cffm_tiny.npz")
    with pytest.raises(FileExistsError, match="not empty"):
        evaluate.evaluate_videos(config, variables, setup["root"], predictions_dir=streamed["pred"])

    broken = shutil.copytree(setup["root"], setup["tmp"] / "broken")
    second = sorted(os.listdir(broken / "data"))[1]
    (broken / "data" / second / "origin" / "00000012.jpg").write_bytes(b"not a jpeg")
    out = setup["tmp"] / "partial_pred"
    with pytest.raises(DatasetError, match="00000012.jpg: cannot decode image"):
        evaluate.evaluate_videos(
            config,
            variables,
            str(broken),
            img_scale=IMG_SCALE,
            predictions_dir=out,
            progress=False,
            batch_size=4,
        )
    assert not out.exists()
    assert not any(".partial" in p.name for p in out.parent.iterdir())


def test_overwrite_never_deletes_the_data_checkpoint_or_foreign_files(setup, tmp_path):
    """--predictions-out with --overwrite replaces an earlier predictions folder only: not one that holds the data
    root or the checkpoint (the audit's --predictions-out <training workdir> deleted its checkpoints), nor one
    with other files."""
    for out, match in ((setup["tmp"], "which --overwrite would delete"), (tmp_path, "did not write")):
        (tmp_path / "notes.txt").write_text("x")
        with pytest.raises(FileExistsError, match=match):
            evaluate.PredictionWriter(out, overwrite=True, keep=(setup["root"], setup["weights"]["cffm"]))
    assert (tmp_path / "notes.txt").exists() and os.path.isdir(setup["root"])
    earlier = tmp_path / "pred"
    (earlier / "video").mkdir(parents=True)
    (earlier / "video" / "00000000.png").write_bytes(b"")
    evaluate.PredictionWriter(earlier, overwrite=True, keep=(setup["root"],)).abort()  # an earlier output: fine


def test_json_has_null_for_undefined_metrics(tmp_path):
    path = tmp_path / "m.json"
    evaluate.write_json(path, {"miou": 1.5, "mvc16": math.nan, "per_class_iou": [math.nan, 2.0]})
    assert json.loads(path.read_text()) == {"miou": 1.5, "mvc16": None, "per_class_iou": [None, 2.0]}
    table = evaluate.format_table({"miou": 1.5, "mvc16": math.nan})
    assert "miou" in table and "no video has 17 frames or more" in table  # why mVC is nan
    assert "no video" not in evaluate.format_table({"miou": 1.5, "mvc8": 90.0, "mvc16": 80.0})


def test_empty_data_root_means_the_synthetic_dataset(setup):
    config = evaluate.load_config(setup["config"], ["--config.data.root="])
    root = evaluate.resolve_data_root(config)
    assert root == os.path.join(config.workdir, "data")
    with open(os.path.join(root, "val.txt")) as f:
        assert len(f.read().split()) == 1

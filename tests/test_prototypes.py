"""Per-video CFFM++ prototype generation (cffm_jax.prototypes, SPEC.md section 6).

A synthetic dataset of 3 videos (train, val, test; 12 frames of 48x64, the test video without masks), the
official tiny CFFM weights (E = 32), the test rescale bound (64, 48) (network input 64x64, 8x8 features per
frame, 640 points per video) and K = 8 prototypes. The feature extraction is checked against the official
generator's k-means input (``kmeans_tiny.npz``) and against the full forward pass's intermediates.
"""

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from conftest import load_fixture

from cffm_jax import prototypes
from cffm_jax.checkpoint import CheckpointError, save_variables
from cffm_jax.convert import convert_state_dict
from cffm_jax.data.pipeline import list_eval_videos
from cffm_jax.data.synthetic import generate
from cffm_jax.data.vspw import DatasetError
from cffm_jax.kmeans import kmeans
from cffm_jax.models import build_model, model_config
from cffm_jax.parity import config_from_meta, fixture_state_dict
from cffm_jax.prototype_store import PrototypeStore, prototype_frame_indices

IMG_SCALE = (64, 48)
K = 8
VIDEOS = ("000_syn_train", "001_syn_val", "002_syn_test")


def _tiny(fixture):
    arrays, meta = fixture
    cfg = config_from_meta(meta)
    sd = fixture_state_dict(arrays)
    return cfg, convert_state_dict(sd, cfg)


@pytest.fixture(scope="module")
def tiny(cffm_tiny):
    return _tiny(cffm_tiny)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("vspw")
    return generate(str(root), videos=1, val_videos=1, test_videos=1, frames=12, size=(48, 64), seed=0)


def _run(tiny, data_root, out, **kwargs):
    cfg, variables = tiny
    kwargs = {"img_scale": IMG_SCALE, "num_prototypes": K, "progress": False, **kwargs}
    return prototypes.generate_prototypes(cfg, variables, data_root, out, **kwargs)


def _contents(root) -> dict[str, np.ndarray]:
    store = PrototypeStore(root)
    return {v: store.get(v) for v in store.videos()}


@pytest.fixture(scope="module")
def one_shot(tiny, data_root, tmp_path_factory):
    """The reference: all splits in one run with seed 0."""
    out = tmp_path_factory.mktemp("one_shot") / "store"
    summary = _run(tiny, data_root, out)
    return summary, _contents(out)


def test_one_entry_per_video_with_provenance(one_shot):
    summary, contents = one_shot
    assert summary.generated == VIDEOS and summary.skipped == () and summary.skipped_splits == ()
    assert sorted(contents) == list(VIDEOS)
    for centers in contents.values():
        assert centers.shape == (K, 32) and centers.dtype == np.float32 and np.isfinite(centers).all()
        assert len(np.unique(centers, axis=0)) == K  # K distinct centres from distinct random rows
    assert not np.array_equal(contents[VIDEOS[0]], contents[VIDEOS[1]])
    store = summary.store
    assert (store.embed_dim, store.num_prototypes, store.source) == (32, K, "generated")
    info = store.info
    assert info["model"] == "cffm_b0" and info["seed"] == 0 and info["img_scale"] == list(IMG_SCALE)
    assert info["num_frames"] == 10 and info["kmeans"] == {"max_iter": 10, "tol": 1e-4, "init": "random"}


def test_same_seed_reproduces_and_another_seed_differs(tiny, data_root, one_shot, tmp_path):
    _, reference = one_shot
    again = _run(tiny, data_root, tmp_path / "again")
    for video, centers in _contents(again.store.root).items():
        np.testing.assert_array_equal(centers, reference[video])
    other = _contents(_run(tiny, data_root, tmp_path / "seed1", seed=1).store.root)
    assert all(not np.array_equal(other[v], reference[v]) for v in VIDEOS)


def test_features_match_the_full_forward_intermediates(tiny, data_root, one_shot):
    """X = the 1/8 features (decode_head/focal_in) of the 10 prototype frames, rows (frame, y, x); its k-means
    with the video's key gives the stored prototypes."""
    cfg, variables = tiny
    video = list_eval_videos(data_root, "val", num_classes=cfg.num_classes)[0]
    images = [video.load(t, img_scale=IMG_SCALE).image for t in prototype_frame_indices(video.num_frames)]
    generator = prototypes.PrototypeGenerator(cfg, variables, num_prototypes=K)
    x = np.asarray(generator.features(images))

    frames = np.stack(images + images[-1:] * 2)  # 12 frames -> 3 clips of 4
    clips = frames.reshape(3, 4, *frames.shape[1:])
    model = build_model(cfg)

    @jax.jit  # only focal_in is returned, so XLA prunes the CFFM layers and compiles quickly
    def intermediates(variables, clips):
        _, state = model.apply(variables, clips, mutable=["intermediates"])
        return state["intermediates"]["decode_head"]["focal_in"][0]

    focal_in = np.asarray(intermediates(variables, clips))  # (3, 4, h8, w8, E)
    assert focal_in.shape == (3, 4, 8, 8, 32)
    expected = focal_in.reshape(12, 8, 8, 32)[:10].reshape(-1, 32)
    np.testing.assert_allclose(x, expected, atol=2e-5, rtol=1e-5)
    centers, _ = kmeans(expected, k=K, key=prototypes.video_key(0, video.name))
    np.testing.assert_allclose(one_shot[1][video.name], centers, atol=2e-5)


@pytest.fixture(scope="module")
def kmeans_tiny_fixture():
    return load_fixture("kmeans_tiny.npz")


def test_features_match_the_official_generator(tiny, kmeans_tiny_fixture):
    """kmeans_tiny.npz holds the official gene-prototype head's k-means input for 10 frames of the tiny CFFM;
    its input frames are ``torch.manual_seed(2); torch.randn(10, 3, 64, 128)`` (not stored in the fixture)."""
    torch = pytest.importorskip("torch", reason="torch regenerates the fixture's input frames")
    arrays, _ = kmeans_tiny_fixture
    torch.manual_seed(2)
    frames = np.moveaxis(torch.randn(10, 3, 64, 128).numpy(), 1, -1)
    cfg, variables = tiny
    generator = prototypes.PrototypeGenerator(cfg, variables, num_prototypes=100, batch_frames=4)
    x = np.asarray(generator.features(list(frames)))  # 3 encode calls, the last one padded
    np.testing.assert_allclose(x, arrays["input/features"], atol=2e-5, rtol=1e-5)
    centers, _ = kmeans(x, k=100, init_centers=x[arrays["input/init_idx"]])
    np.testing.assert_allclose(centers, arrays["output/centers"], atol=2e-5, rtol=1e-5)


def test_resumes_after_a_failure_without_recomputing(tiny, data_root, one_shot, tmp_path, caplog):
    """A run that dies on the val video (corrupt frame) keeps the finished train video; the rerun skips it and
    the result equals the one-shot run. A missing split is skipped with a log line."""
    root = shutil.copytree(data_root, tmp_path / "vspw")
    frame = root / "data" / VIDEOS[1] / "origin" / "00000005.jpg"
    good = frame.read_bytes()
    frame.write_bytes(b"not a jpeg")
    out = tmp_path / "store"
    with pytest.raises(DatasetError, match="00000005.jpg"):
        _run(tiny, str(root), out)
    assert PrototypeStore(out).videos() == [VIDEOS[0]]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    first = out / f"{VIDEOS[0]}.npy"
    os.utime(first, ns=(1, 1))  # any rewrite would change this

    frame.write_bytes(good)
    with caplog.at_level(logging.INFO, logger="cffm_jax.prototypes"):
        summary = _run(tiny, str(root), out, splits=("train", "val", "nosuch", "test"))
    assert "'nosuch'" in caplog.text and summary.skipped_splits == ("nosuch",)
    assert summary.skipped == (VIDEOS[0],) and summary.generated == VIDEOS[1:]
    assert first.stat().st_mtime_ns == 1
    contents = _contents(out)
    assert sorted(contents) == list(VIDEOS)
    for video, centers in one_shot[1].items():
        np.testing.assert_array_equal(contents[video], centers)

    summary = _run(tiny, str(root), out, splits=("val",), overwrite=True)
    assert summary.generated == (VIDEOS[1],) and first.stat().st_mtime_ns == 1


def test_errors(tiny, data_root, tmp_path):
    cfg, variables = tiny
    with pytest.raises(ValueError, match="CFFM or CFFM\\+\\+"):
        prototypes.PrototypeGenerator(model_config("mit_b0"), {})
    PrototypeStore(tmp_path / "e16", embed_dim=16, num_prototypes=K, source="generated")
    with pytest.raises(ValueError, match="E=16.*E=32"):
        _run(tiny, data_root, tmp_path / "e16")
    PrototypeStore(tmp_path / "official", embed_dim=32, num_prototypes=K, source="official")
    with pytest.raises(ValueError, match="official"):
        _run(tiny, data_root, tmp_path / "official")
    _run(tiny, data_root, tmp_path / "seed0", splits=("test",))
    with pytest.raises(ValueError, match="seed: store has 0, requested 1"):
        _run(tiny, data_root, tmp_path / "seed0", seed=1)
    with pytest.raises(ValueError, match="000_syn_train.*640 feature vectors are too few for 641"):
        _run(tiny, data_root, tmp_path / "k641", num_prototypes=641)
    with pytest.raises(DatasetError, match="no videos"):
        _run(tiny, data_root, tmp_path / "none", splits=("nosuch",))


@pytest.fixture(scope="module")
def weights_dir(tiny, tmp_path_factory):
    cfg, variables = tiny
    return str(save_variables(tmp_path_factory.mktemp("weights") / "cffm_tiny", variables, cfg))


CONFIG = """
import ml_collections
from cffm_jax.models import model_config


def get_config(arg=None):
    config = ml_collections.ConfigDict()
    config.model = model_config(
        "cffm_b0", embed_dims=(8, 16, 40, 64), depths=(2, 1, 1, 2), decoder_embed_dim=32, decoder_depth=2,
        num_classes=7)
    config.init_from = {checkpoint!r}
    config.workdir = {workdir!r}
    config.seed = 0
    config.data = ml_collections.ConfigDict()
    config.data.root = {root!r}
    config.data.synthetic = ml_collections.ConfigDict(dict(videos=1))
    config.data.splits = ("train", "val", "test")
    config.data.img_scale = (853, 480)  # the test overrides it
    config.data.prototypes_dir = {prototypes_dir!r}
    config.prototypes = ml_collections.ConfigDict(
        dict(num_prototypes=8, num_frames=10, max_iter=10, tol=1e-4, init="random", overwrite=False))
    config.progress = False
    return config
"""


def test_cli_with_flags_and_with_a_config(weights_dir, data_root, one_shot, tmp_path, capsys):
    out = tmp_path / "flags"
    argv = ["--checkpoint", weights_dir, "--data-root", data_root, "--out", str(out)]
    argv += ["--img-scale", "64", "48", "--num-prototypes", "8", "--seed", "0", "--no-progress"]
    summary = prototypes.main(argv)
    assert summary.generated == VIDEOS and "generated prototypes for 3 videos" in capsys.readouterr().out
    assert summary.store.info["checkpoint"] == weights_dir
    for video, centers in one_shot[1].items():
        np.testing.assert_array_equal(_contents(out)[video], centers)
    assert prototypes.main(argv).skipped == VIDEOS  # resumed: nothing left to do

    config_file = tmp_path / "proto_config.py"
    text = CONFIG.format(
        checkpoint=weights_dir, workdir=str(tmp_path), root=data_root, prototypes_dir=str(tmp_path / "cfg")
    )
    config_file.write_text(text)
    summary = prototypes.main(
        [f"--config={config_file}", "--config.data.img_scale=(64, 48)", "--splits", "val", "--out", str(out)]
    )
    assert summary.skipped == (VIDEOS[1],) and not (tmp_path / "cfg").exists()
    summary = prototypes.main([f"--config={config_file}", "--config.data.img_scale=(64, 48)"])
    assert summary.store.root == tmp_path / "cfg" and summary.generated == VIDEOS
    for video, centers in one_shot[1].items():
        np.testing.assert_array_equal(_contents(tmp_path / "cfg")[video], centers)


def test_cli_and_loader_errors(weights_dir, data_root, tmp_path):
    with pytest.raises(SystemExit):
        prototypes.main(["--data-root", data_root, "--out", str(tmp_path / "x")])
    with pytest.raises(CheckpointError, match="embed_dims"):
        prototypes.load_model(weights_dir, "cffm_b1")
    _, found = prototypes.load_model(weights_dir, None)
    assert found.decoder_embed_dim == 32
    # A raw official CFFM checkpoint with a CFFM++ config is read as the CFFM the config is fine-tuned from.
    arrays, _ = load_fixture("cffm_tiny.npz")
    raw = tmp_path / "cffm_tiny_raw.npz"
    np.savez(raw, **{k: v for k, v in arrays.items() if k.startswith("state_dict/")})
    cffmpp = ml_collections.ConfigDict({"model": config_from_meta(load_fixture("cffmpp_tiny.npz")[1])})
    assert cffmpp.model.arch == "cffmpp"
    variables, found = prototypes.load_model(str(raw), None, cffmpp)
    assert (found.arch, found.decoder_depth) == ("cffm", 2)
    assert "decoder_swin" not in variables["params"]["decode_head"]


SUBPROCESS = """
import sys
import numpy as np
import jax
from cffm_jax import prototypes
from cffm_jax.checkpoint import load_for_inference
from cffm_jax.prototype_store import PrototypeStore

weights, root, out, reference = sys.argv[1:]
assert len(jax.local_devices()) == 2
variables, cfg = load_for_inference(weights)
summary = prototypes.generate_prototypes(
    cfg, variables, root, out, img_scale=(64, 48), num_prototypes=8, batch_frames=3, progress=False)
ref = PrototypeStore(reference)
for v in ref.videos():
    np.testing.assert_allclose(summary.store.get(v), ref.get(v), atol=1e-5)
print("ok", len(ref.videos()))
"""


def test_two_devices_give_the_same_prototypes(weights_dir, data_root, one_shot, tmp_path):
    """Encode sharded over 2 (fake CPU) devices in batches of 3 -> 4 frames (chunks of 4, 4, 2 + padding)."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0 --xla_force_host_platform_device_count=2"
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"
    root = Path(__file__).resolve().parents[1]
    args = [
        sys.executable,
        "-c",
        SUBPROCESS,
        weights_dir,
        data_root,
        str(tmp_path / "s"),
        str(one_shot[0].store.root),
    ]
    result = subprocess.run(args, env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == f"ok {len(VIDEOS)}"

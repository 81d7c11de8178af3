"""Streaming inference with the feature cache equals clip-by-clip inference (cffm_jax.streaming).

Tiny official-weight fixtures (tests/fixtures) on a synthetic video of 20 frames at 48x80 (network input
64x96), batch 4, so the frames 0-8 special cases, several chunks, a padded last chunk and wrap-around of the
13-slot feature ring are all exercised. The frame size, batch size and models are the same as in
test_evaluate.py and test_predict.py, so in one pytest process every jitted function compiles once.
"""

import collections
import dataclasses
import functools
import logging
import os
import textwrap
import threading
import time

import jax
import numpy as np
import pytest
from conftest import load_fixture, run_on_fake_devices

from cffm_jax import xla_options
from cffm_jax.convert import convert_state_dict
from cffm_jax.data.pipeline import EvalFrame, list_eval_videos
from cffm_jax.data.synthetic import generate
from cffm_jax.models import build_model
from cffm_jax.models.layers import argmax_classes
from cffm_jax.parity import config_from_meta, fixture_state_dict
from cffm_jax.prototype_store import prototype_frame_indices
from cffm_jax.streaming import (
    VideoSegmenter,
    _decode_step,
    _encode,
    _labels,
    _labels_step,
    _store_step,
    clip_forward,
    compute_prototypes,
    ordered_map,
    prefetch,
)

IMG_SCALE = (80, 48)  # frames of 48x80 (H x W) keep their size and enter the network at 64x96
FRAMES = 20
BATCH = 4


@functools.cache
def tiny_model(name: str):
    """(config, variables) of the tiny CFFM ('cffm_tiny.npz') or CFFM++ ('cffmpp_tiny.npz') fixture."""
    arrays, meta = load_fixture(name)
    config = config_from_meta(meta)
    state = fixture_state_dict(arrays)
    return config, convert_state_dict(state, config)


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("syn"))
    generate(root, videos=0, val_videos=1, test_videos=0, frames=FRAMES, size=(48, 80), seed=3)
    (video,) = list_eval_videos(root, "val")
    return video


def _frames(video):
    return [video.load(t, img_scale=IMG_SCALE) for t in range(video.num_frames)]


def _prototypes(segmenter, video):
    images = [video.load(t, img_scale=IMG_SCALE).image for t in prototype_frame_indices(video.num_frames)]
    return compute_prototypes(segmenter, images)


@pytest.mark.parametrize("fixture,batch", [("cffm_tiny.npz", BATCH), ("cffmpp_tiny.npz", BATCH), ("cffm_tiny.npz", 2)])
def test_streaming_matches_clip_by_clip(video, fixture, batch):
    """Also with 2 frames per chunk: chunk [0, 1] takes only per-frame logits (no decode), [2, 3] mixes both."""
    config, variables = tiny_model(fixture)
    segmenter = VideoSegmenter(config, variables, batch_size=batch, keep_logits=True)
    protos = _prototypes(segmenter, video) if segmenter.needs_prototypes else None
    frames = _frames(video)
    streamed = list(segmenter.segment(frames, protos))
    reference = list(segmenter.segment(frames, protos, streaming=False))

    assert [r.index for r in streamed] == list(range(FRAMES))
    assert [r.index for r in reference] == list(range(FRAMES))
    for s, r in zip(streamed, reference, strict=True):
        assert s.pred.shape == (48, 80) and s.logits.shape == (16, 24, config.num_classes)
        np.testing.assert_array_equal(s.pred, r.pred, err_msg=f"frame {s.index}")
        np.testing.assert_allclose(s.logits, r.logits, atol=1e-5, rtol=0, err_msg=f"frame {s.index}")
        assert s.frame.label is frames[s.index].label  # labels pass through for evaluation
    preds = np.stack([s.pred for s in streamed])
    assert len(np.unique(preds)) > 1, "degenerate predictions would make the comparison meaningless"

    # Frames 0-2 are the plain per-frame logits; later frames use the temporal head and differ from them.
    perframe, _ = segmenter.encode([f.image for f in frames])
    for t in range(3):
        np.testing.assert_allclose(streamed[t].logits, perframe[t], atol=1e-5, rtol=0)
    assert np.abs(streamed[5].logits - perframe[5]).max() > 1e-3


def test_compiles_once_per_size_and_ring_is_bounded(video, caplog):
    config, variables = tiny_model("cffm_tiny.npz")
    segmenter = VideoSegmenter(config, variables, batch_size=BATCH)
    frames = _frames(video)
    with caplog.at_level(logging.INFO, logger="cffm_jax.streaming"):
        first = [r.pred for r in segmenter.segment(frames)]
        cache_size = _encode._cache_size()
        # A second video of the same size (here: the frames reversed) reuses the compiled functions and the ring.
        second = [r.pred for r in segmenter.segment(frames[::-1])]
    assert _encode._cache_size() == cache_size
    # the first video of a size says that its programs compile; the second does not
    assert [r.getMessage() for r in caplog.records if "compiling" in r.getMessage()] == [
        "first video with frames of 48x80 (network input 64x96): compiling its programs, unless cached"
    ]
    assert len(second) == len(first) == FRAMES
    (ring,) = segmenter._rings.values()
    assert ring.shape[0] == BATCH + 9 < FRAMES  # the clip span plus one chunk, independent of the video length
    np.testing.assert_array_equal(first[0], [r.pred for r in segmenter.segment(frames[:1])][0])


def test_several_videos_in_one_stream_equal_one_by_one(video):
    """``segment_videos`` (evaluation's loop) gives what ``segment`` gives per video, for CFFM++ videos of two
    original sizes with their own prototypes and lengths that do not fill the last chunk, and draws each next video
    before the previous one's last results are yielded (its first chunk goes to the device first)."""
    config, variables = tiny_model("cffmpp_tiny.npz")
    segmenter = VideoSegmenter(config, variables, batch_size=BATCH, keep_logits=True, fuse_labels=False)
    frames = _frames(video)
    protos = _prototypes(segmenter, video)
    inputs = [
        ("a", frames, protos),
        ("b", [dataclasses.replace(f, original_size=(67, 109)) for f in frames[:7]], protos[::-1]),
        ("c", frames[::-1][:13], protos * 0.5),
    ]
    events = []

    def drawn():
        for key, video_frames, video_protos in inputs:
            events.append(("draw", key))
            yield key, video_frames, video_protos

    together = []
    for key, result in segmenter.segment_videos(drawn()):
        events.append(("result", key))
        together.append((key, result))
    alone = VideoSegmenter(config, variables, batch_size=BATCH, keep_logits=True, fuse_labels=False)
    expected = [(key, r) for key, f, p in inputs for r in alone.segment(f, p)]
    assert [(k, r.index) for k, r in together] == [(k, r.index) for k, r in expected]
    assert len(together) == 20 + 7 + 13
    for (_, r), (_, e) in zip(together, expected, strict=True):
        np.testing.assert_array_equal(r.pred, e.pred)
        np.testing.assert_array_equal(r.logits, e.logits)
    for previous, key in (("a", "b"), ("b", "c")):
        last_result = max(i for i, event in enumerate(events) if event == ("result", previous))
        assert events.index(("draw", key)) < last_result


def test_another_original_size_compiles_only_the_labels(video, caplog):
    """Frames that enter the network at a size seen before but come from another original size (720p and 1080p
    frames both enter at 480x864) reuse the encoder and decoder programs: with the labels outside the decode step
    (``fuse_labels=False``, the accelerators' default) only the resize to the original size and the argmax
    (``_labels_step``) compile again, and the predictions are the same logits resized to that size (equal to clip
    mode, whose labels are computed the same way, and to the default CPU streaming with the labels fused)."""
    config, variables = tiny_model("cffm_tiny.npz")
    segmenter = VideoSegmenter(config, variables, batch_size=BATCH, keep_logits=True, fuse_labels=False)
    assert VideoSegmenter(config, variables).fuse_labels  # the default on CPU (labels inside the decode step)
    frames = _frames(video)
    first = list(segmenter.segment(frames))
    programs = (_encode, _store_step, _decode_step, _labels_step)
    before = [p._cache_size() for p in programs]
    other = [dataclasses.replace(f, original_size=(71, 113)) for f in frames]
    with caplog.at_level(logging.INFO, logger="cffm_jax.streaming"):
        second = list(segmenter.segment(other))
    assert [p._cache_size() - n for p, n in zip(programs, before, strict=True)] == [0, 0, 0, 1]
    assert not [r for r in caplog.records if "compiling" in r.getMessage()]  # nothing large compiles

    labels = jax.jit(_labels, static_argnums=(1, 2))
    reference = list(segmenter.segment(other, streaming=False))
    for a, b, r in zip(first, second, reference, strict=True):
        np.testing.assert_array_equal(b.logits, a.logits)  # the same programs on the same frames
        assert b.pred.shape == r.pred.shape == (71, 113)
        np.testing.assert_array_equal(b.pred, labels(b.logits[None], (64, 96), (71, 113))[0])
        np.testing.assert_array_equal(b.pred, r.pred)  # clip mode at that size
    fused = VideoSegmenter(config, variables, batch_size=BATCH)
    for b, f in zip(second, fused.segment(other), strict=True):
        np.testing.assert_array_equal(f.pred, b.pred)


def test_frames_of_different_sizes_raise(video):
    config, variables = tiny_model("cffm_tiny.npz")
    segmenter = VideoSegmenter(config, variables, batch_size=BATCH)
    frames = _frames(video)[:5]
    odd = EvalFrame(np.zeros((32, 64, 3), np.float32), None, (30, 60))
    with pytest.raises(ValueError, match="frame 5 has size .* all frames of a video must have the same size"):
        list(segmenter.segment(frames + [odd]))


def test_cffmpp_needs_prototypes_of_the_right_shape(video):
    config, variables = tiny_model("cffmpp_tiny.npz")
    segmenter = VideoSegmenter(config, variables, batch_size=BATCH)
    frames = _frames(video)[:2]
    with pytest.raises(ValueError, match="CFFM\\+\\+ needs the video's prototypes"):
        list(segmenter.segment(frames))
    with pytest.raises(ValueError, match="prototypes must have shape"):
        list(segmenter.segment(frames, np.zeros((100, 16), np.float32)))


@pytest.mark.parametrize("fixture", ["cffm_tiny.npz", "cffmpp_tiny.npz"])
def test_clip_forward_equals_model_apply(fixture):
    """The two-program clip forward of clip mode gives model.apply's outputs: target logits and early frames."""
    config, variables = tiny_model(fixture)
    model = build_model(config)
    rng = np.random.default_rng(0)
    clips = rng.standard_normal((2, 4, 64, 96, 3)).astype(np.float32)
    protos = rng.standard_normal((7, config.decoder_embed_dim)).astype(np.float32)
    protos = protos if config.arch == "cffmpp" else None
    batch_protos = None if protos is None else np.broadcast_to(protos, (2, *protos.shape))
    for t in (4, 1):
        expected = jax.jit(lambda v, x, p: model.apply(v, x, prototypes=p))(variables, clips[:, -t:], batch_protos)
        got = clip_forward(model, variables, clips[:, -t:], protos)
        assert got.shape == expected.shape == (2, 16, 24, config.num_classes)
        np.testing.assert_allclose(got, expected, atol=1e-5)
    if protos is not None:
        with pytest.raises(ValueError, match="prototypes"):
            clip_forward(model, variables, clips)


@pytest.mark.parametrize("classes", [7, 124, 130])
def test_argmax_classes_equals_argmax_ties_included(classes):
    """The grouped argmax of the labels returns jnp.argmax's first index of the maximum, also for ties."""
    rng = np.random.default_rng(classes)
    x = rng.standard_normal((3, 5, 11, classes)).astype(np.float32)
    x[0, 0, :, :] = 1.0  # all classes tied
    x[1, 1, :, [3, classes - 2]] = 9.0  # a tie between the first and the last group
    x[2, 2, :, [classes - 1, 40 % classes]] = 9.0
    x[2, 3] = np.round(x[2, 3])  # many ties
    got = jax.jit(argmax_classes)(x)
    np.testing.assert_array_equal(got, np.argmax(x, axis=-1))
    assert got[0, 0, 0] == 0 and got[1, 1, 0] == 3


def test_batch_size_must_divide_over_devices():
    config, variables = tiny_model("cffm_tiny.npz")
    with pytest.raises(ValueError, match="multiple of"):
        VideoSegmenter(config, variables, batch_size=0)
    devices = jax.local_devices()
    per_device = 1 if devices[0].platform == "cpu" else 4  # CPU: one frame per chunk is fastest
    assert VideoSegmenter(config, variables).batch_size == per_device * len(devices)


def test_prefetch_keeps_order_and_forwards_errors():
    assert list(prefetch(iter(range(50)), size=3)) == list(range(50))

    def failing():
        yield 1
        raise RuntimeError("boom")

    it = prefetch(failing())
    assert next(it) == 1
    with pytest.raises(RuntimeError, match="boom"):
        next(it)


def test_ordered_map_keeps_order_bounds_work_ahead_and_forwards_errors():
    started: list[int] = []
    lock = threading.Lock()

    def slow_square(x: int) -> int:
        with lock:
            started.append(x)
        time.sleep(0.002 * (x % 3))  # later items often finish first
        return x * x

    assert list(ordered_map(slow_square, range(40), workers=4)) == [x * x for x in range(40)]

    started.clear()
    it = ordered_map(slow_square, iter(range(100)), workers=3, ahead=5)
    assert [next(it) for _ in range(10)] == [x * x for x in range(10)]
    time.sleep(0.05)
    assert len(started) <= 10 + 5  # items are drawn and started only when there is room ahead
    it.close()  # cancels what has not started
    time.sleep(0.05)
    assert len(started) <= 10 + 5

    def fail_at_7(x: int) -> int:
        if x == 7:
            raise ValueError("frame 7 is corrupt")
        return x

    it = ordered_map(fail_at_7, range(20), workers=4)
    assert [next(it) for _ in range(7)] == list(range(7))
    with pytest.raises(ValueError, match="frame 7 is corrupt"):
        next(it)


_MULTI_DEVICE = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    sys.path.insert(0, sys.argv[1])
    import test_streaming as ts
    from cffm_jax.streaming import VideoSegmenter
    assert len(jax.local_devices()) == 2, jax.local_devices()
    config, variables = ts.tiny_model("cffmpp_tiny.npz")
    from cffm_jax.data.synthetic import generate
    from cffm_jax.data.pipeline import list_eval_videos
    generate(sys.argv[2], videos=0, val_videos=1, test_videos=0, frames=14, size=(48, 80), seed=3)
    (video,) = list_eval_videos(sys.argv[2], "val")
    frames = ts._frames(video)
    one = VideoSegmenter(config, variables, batch_size=4, devices=jax.local_devices()[:1], keep_logits=True)
    two = VideoSegmenter(config, variables, batch_size=4, keep_logits=True)
    protos = ts._prototypes(one, video)
    a = list(one.segment(frames, protos))
    b = list(two.segment(frames, protos))
    c = list(two.segment(frames, protos, streaming=False))
    for x, y, z in zip(a, b, c, strict=True):
        np.testing.assert_array_equal(x.pred, y.pred)
        np.testing.assert_array_equal(x.pred, z.pred)
        np.testing.assert_allclose(x.logits, y.logits, atol=1e-5, rtol=0)
    print("OK", len(a))
    """
)


@pytest.mark.heavy
def test_two_devices_match_one(tmp_path):
    """Sharding over a 2-device ('data',) mesh (fake CPU devices, fresh process): same predictions."""
    stdout = run_on_fake_devices(_MULTI_DEVICE, 2, os.path.dirname(__file__), str(tmp_path / "syn"), timeout=900)
    assert "OK 14" in stdout


def test_gpu_programs_at_highest_precision_use_cublas_gemms(monkeypatch):
    """cffm_jax.xla_options on a GPU backend: programs whose float32 products run at 'highest' compile with cuBLAS
    GEMMs only (XLA's Triton GEMM autotuning took minutes per program there); others keep XLA's options. The option
    is one XLA knows (a misspelt one fails any compilation, on CPU too), and each model precision gets its own
    ``jax.jit``."""
    jax.jit(lambda x: x @ x, compiler_options=xla_options.GPU_HIGHEST_OPTIONS).lower(np.ones((2, 2))).compile()
    monkeypatch.setattr(xla_options.jax, "default_backend", lambda: "gpu")
    assert xla_options.compiler_options("encoder", "highest") == {"xla_gpu_enable_triton_gemm": False}
    assert xla_options.compiler_options("default", "highest") == {"xla_gpu_enable_triton_gemm": False}
    for precision in (None, "default", "high", "tensorfloat32"):
        assert xla_options.compiler_options("encoder", precision) is None
    monkeypatch.setattr(xla_options.jax, "default_backend", lambda: "tpu")
    assert xla_options.compiler_options("encoder", "highest") is None
    monkeypatch.undo()

    picked = []

    @xla_options.jit("default", model_argnum=0, static_argnums=0)
    def double(model, x):
        picked.append(model.matmul_precision)
        return 2 * x

    model_type = collections.namedtuple("Model", "matmul_precision")  # hashable, as static arguments must be
    highest, plain = model_type("highest"), model_type(None)
    for model in (highest, plain, highest):
        assert float(double(model, 1.0)) == 2.0
    assert picked == ["highest", None] and sorted(double._jitted, key=str) == [None, "highest"]


def test_frame_encoder_compiles_without_ynnpack_fusions():
    """cffm_jax.xla_options: on CPU the frame encoder is compiled without XLA's YNNPACK fusions (faster for the
    MiT's thin matrix products), which XLA's default options would use; results stay equal to float32 precision.
    (GPU: test_gpu_programs_at_highest_precision_use_cublas_gemms.)"""
    if jax.default_backend() != "cpu":
        return
    config, variables = tiny_model("cffm_tiny.npz")
    model = build_model(config)
    images = np.random.default_rng(0).standard_normal((BATCH, 64, 96, 3)).astype(np.float32)
    ours = _encode.lower(model, variables, images, False).compile()
    default = jax.jit(_encode.__wrapped__, static_argnums=(0, 3)).lower(model, variables, images, False).compile()
    assert "ynn_fusion" in default.as_text() and "ynn_fusion" not in ours.as_text()
    np.testing.assert_allclose(ours(variables, images)[1], default(variables, images)[1], atol=1e-5, rtol=0)

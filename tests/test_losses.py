"""Tests of the segmentation loss (SPEC.md section 8) against the official ``loss_tiny.npz`` fixture."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_on_fake_devices

from cffm_jax import losses
from cffm_jax.losses import cross_entropy_mean_all, segmentation_loss

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "loss_tiny.npz"


@pytest.fixture(scope="module")
def loss_tiny() -> dict[str, np.ndarray]:
    data = np.load(FIXTURE)
    return {
        # (B, T+1, K, h, w) -> (B, T+1, h, w, K); (B, T, 1, H, W) -> (B, T, H, W).
        "logits": np.transpose(data["input/seg_logit"], (0, 1, 3, 4, 2)),
        "labels": data["input/seg_label"][:, :, 0].astype(np.int32),
        **{k: data[f"output/{k}"] for k in ("loss_seg", "acc_seg", "ce_frames", "ce_target")},
    }


@pytest.mark.parametrize("frames_per_chunk", [None, 2, 1])
def test_matches_official_fixture(loss_tiny, frames_per_chunk):
    labels = loss_tiny["labels"]
    assert (labels == 255).any(), "fixture should exercise ignored pixels"
    fn = jax.jit(lambda lg, lb: segmentation_loss(lg, lb, frames_per_chunk=frames_per_chunk))
    loss, aux = fn(loss_tiny["logits"], labels)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, loss_tiny["loss_seg"], atol=2e-5, rtol=1e-5)
    for key in ("acc_seg", "ce_frames", "ce_target"):
        np.testing.assert_allclose(aux[key], loss_tiny[key], atol=2e-5, rtol=1e-5, err_msg=key)


def test_ignored_pixels_count_in_denominator():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
    labels = rng.integers(0, 5, size=(2, 3, 4)).astype(np.int32)
    labels[0, 0] = 255
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    valid = labels != 255
    nll = -np.take_along_axis(log_p, np.where(valid, labels, 0)[..., None], -1)[..., 0]
    expected = (nll * valid).sum() / labels.size  # the denominator includes the 4 ignored pixels
    got = jax.jit(cross_entropy_mean_all)(logits, labels)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert not np.isclose(expected, (nll * valid).sum() / valid.sum())


def test_bfloat16_logits_are_computed_in_float32(loss_tiny):
    logits_bf16 = jnp.asarray(loss_tiny["logits"], jnp.bfloat16)
    loss, aux = jax.jit(segmentation_loss)(logits_bf16, loss_tiny["labels"])
    ref, ref_aux = jax.jit(segmentation_loss)(logits_bf16.astype(jnp.float32), loss_tiny["labels"])
    assert loss.dtype == jnp.float32 and aux["ce_frames"].dtype == jnp.float32
    np.testing.assert_array_equal(loss, ref)
    np.testing.assert_array_equal(aux["acc_seg"], ref_aux["acc_seg"])


def test_gradients_finite_and_chunking_invariant(loss_tiny):
    def grad_fn(chunk):
        return jax.jit(jax.grad(lambda lg, lb: segmentation_loss(lg, lb, frames_per_chunk=chunk)[0]))

    g = grad_fn(None)(loss_tiny["logits"], loss_tiny["labels"])
    assert np.isfinite(g).all()
    assert np.abs(g).sum() > 0
    # The target entry (index T) and the per-frame entries all receive gradient.
    assert (np.abs(np.asarray(g)).sum(axis=(2, 3, 4)) > 0).all()
    np.testing.assert_allclose(grad_fn(1)(loss_tiny["logits"], loss_tiny["labels"]), g, atol=1e-8, rtol=1e-5)


def test_all_ignored_gives_zero_loss_and_gradient(loss_tiny):
    labels = np.full_like(loss_tiny["labels"], 255)
    (loss, aux), g = jax.jit(jax.value_and_grad(segmentation_loss, has_aux=True))(loss_tiny["logits"], labels)
    assert float(loss) == 0.0
    assert float(aux["ce_frames"]) == 0.0 and float(aux["ce_target"]) == 0.0
    assert float(aux["acc_seg"]) == 0.0  # ignored pixels count as wrong
    assert np.isfinite(g).all() and not np.asarray(g).any()


def test_perfect_prediction_accuracy_and_weights():
    # Logits strongly favour the label everywhere: acc 100, CE ~0; then the weights scale each term.
    labels = np.array([[[[0, 1], [2, 1]], [[1, 1], [0, 2]]]], np.int32)  # (B=1, T=2, 2, 2)
    logits = 50.0 * np.eye(3, dtype=np.float32)[np.concatenate([labels, labels[:, -1:]], axis=1)]
    loss, aux = segmentation_loss(logits, labels)
    assert float(aux["acc_seg"]) == 100.0
    assert float(loss) < 1e-6
    wrong = -logits
    loss, aux = segmentation_loss(wrong, labels, frame_weight=0.25, target_weight=2.0)
    np.testing.assert_allclose(loss, 0.25 * aux["ce_frames"] + 2.0 * aux["ce_target"], rtol=1e-6)
    assert float(aux["acc_seg"]) == 0.0


def test_shape_errors(loss_tiny):
    with pytest.raises(ValueError, match="T\\+1"):
        segmentation_loss(loss_tiny["logits"][:, :4], loss_tiny["labels"])
    with pytest.raises(ValueError, match="does not divide"):
        segmentation_loss(loss_tiny["logits"], loss_tiny["labels"], frames_per_chunk=3)


@pytest.mark.parametrize(
    "shape,size,block",
    [
        ((2, 6, 5, 9), (24, 20), (1, 5)),
        ((1, 6, 4, 9), (24, 16), (3, 4)),
        ((2, 4, 6, 5), (8, 24), (1, 2)),
        ((1, 6, 6, 5), (12, 24), (1, 3)),
    ],
)
def test_blocked_loss_equals_the_resized_one(monkeypatch, shape, size, block):
    """The default (blocked, written-out gradient) path against resize-then-cross-entropy with autodiff.

    Several blocks per frame (the block size forced through BLOCK_BYTES): blocks of whole rows and, as on CPU when
    a row does not fit, rows cut into blocks of columns, so that the borders shared by neighbouring blocks and the
    clamped edges are exercised; power-of-two upsampling, different per axis.
    """
    n, h, w, k = shape
    sh, sw = size[0] // h, size[1] // w
    monkeypatch.setattr(losses, "BLOCK_BYTES", n * sh * sw * k * 4 * block[0] * block[1])
    assert losses._block_shape(n, h, w, k, sh, sw) == block
    rng = np.random.default_rng(block[0] * 10 + block[1])
    logits = 3.0 * rng.standard_normal(shape).astype(np.float32)
    labels = rng.integers(0, k, (n, *size)).astype(np.int32)
    labels[:, : size[0] // 3, : size[1] // 2] = 255

    def run(frames_per_chunk):
        def total_and_correct(lg):
            return losses._resized_ce_and_correct(lg, labels, 255, frames_per_chunk)

        grad = jax.jit(jax.grad(lambda lg: total_and_correct(lg)[0]))(logits)
        return jax.jit(total_and_correct)(logits), grad

    (total, correct), grad = run(None)  # blocked
    (total_ref, correct_ref), grad_ref = run(n)  # one chunk of all frames: the plain resize and autodiff
    np.testing.assert_allclose(total, total_ref, rtol=1e-6)
    assert int(correct) == int(correct_ref)
    np.testing.assert_allclose(grad, grad_ref, atol=1e-6, rtol=1e-5)


_SHARDED = r"""
import jax, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from cffm_jax.losses import segmentation_loss
mesh = jax.make_mesh((4,), ("data",), axis_types=(AxisType.Auto,))
data = NamedSharding(mesh, P("data"))
rng = np.random.default_rng(0)
logits = jax.device_put(rng.standard_normal((4, 5, 12, 16, 7)).astype(np.float32), data)
labels = jax.device_put(rng.integers(0, 7, (4, 4, 48, 64)).astype(np.int32), data)
grad_fn = jax.jit(jax.value_and_grad(lambda lg, lb: segmentation_loss(lg, lb)[0]))
hlo = grad_fn.lower(logits, labels).compile().as_text()
loss, grad = grad_fn(logits, labels)
ref_loss, ref_grad = jax.jit(jax.value_and_grad(lambda lg, lb: segmentation_loss(lg, lb)[0]))(
    np.asarray(logits), np.asarray(labels))
np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
np.testing.assert_allclose(grad, ref_grad, atol=1e-9, rtol=1e-5)
print("ALL-GATHERS", hlo.count(" all-gather("), "GRAD-SHARDED", grad.sharding.spec == P("data"))
"""


def test_blocked_loss_keeps_a_sharded_batch_sharded():
    """On a batch sharded over devices (4 fake CPU devices, fresh process) the blocked loss loops over rows with
    every device's frames in each step: no all-gather of the logits (a loop over frames would replicate them on
    every device), the gradient stays sharded, and the values equal the single-device ones."""
    stdout = run_on_fake_devices(_SHARDED, 4)
    assert "ALL-GATHERS 0 GRAD-SHARDED True" in stdout, stdout

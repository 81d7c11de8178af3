"""The PyTorch transcription of CFFM (``cffm_jax.torch_reference``, the benchmark's stand-in for the official code)
loads the official state dict by its names and reproduces the official fixture's outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import load_fixture

from cffm_jax import torch_reference
from cffm_jax.models import model_config
from cffm_jax.parity import config_from_meta, fixture_state_dict


def _fixture_model(arrays: dict[str, np.ndarray], meta: dict) -> torch_reference.CFFM:
    config = config_from_meta(meta)
    model = torch_reference.from_config(config)
    # strict: every official name, nothing else
    torch_reference.load_official_state_dict(model, fixture_state_dict(arrays))
    return model


def test_transcription_reproduces_the_official_fixture(cffm_tiny):
    arrays, meta = cffm_tiny
    model = _fixture_model(arrays, meta)
    clip = torch.from_numpy(arrays["input/clip"])
    with torch.no_grad():
        logits = model(clip).numpy()
        stages = model.backbone(clip.flatten(0, 1))
    np.testing.assert_allclose(logits, arrays["output/head_logits"], atol=2e-5, rtol=1e-5)
    for s, stage in enumerate(stages, start=1):
        expected = arrays[f"output/backbone_stage{s}"]
        np.testing.assert_allclose(stage.reshape(expected.shape).numpy(), expected, atol=2e-5, rtol=1e-5)


def test_transcription_depends_on_every_reference_frame(cffm_tiny):
    """The temporal part is live: changing the oldest reference frame changes the target's logits."""
    arrays, meta = cffm_tiny
    model = _fixture_model(arrays, meta)
    clip = torch.from_numpy(arrays["input/clip"])
    other = clip.clone()
    other[:, 0] = torch.flip(other[:, 0], dims=(-1,))
    with torch.no_grad():
        assert float((model(clip) - model(other)).abs().max()) > 1e-3


def test_state_dict_errors_name_the_keys(cffm_tiny):
    arrays, meta = cffm_tiny
    model = _fixture_model(arrays, meta)
    state_dict = fixture_state_dict(arrays)
    del state_dict["decode_head.linear_pred2.bias"]
    with pytest.raises(RuntimeError, match="decode_head.linear_pred2.bias"):
        torch_reference.load_official_state_dict(model, state_dict)


def test_only_cffm_is_transcribed():
    with pytest.raises(ValueError, match="CFFM only"):
        torch_reference.from_config(model_config("cffmpp_b0"))


def test_loss_reproduces_the_official_fixture():
    data, _ = load_fixture("loss_tiny.npz")
    logits, labels = torch.from_numpy(data["input/seg_logit"]), torch.from_numpy(data["input/seg_label"])
    expected = float(data["output/loss_seg"])
    loss = torch_reference.seg_loss(logits, labels[:, :, 0])
    assert float(loss) == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_training_output_and_step(cffm_tiny):
    arrays, meta = cffm_tiny
    model = _fixture_model(arrays, meta)
    clip = torch.from_numpy(arrays["input/clip"])
    # Training mode with the random parts off and the stored BatchNorm statistics: the T + 1 maps are the
    # official per-frame logits and the target's logits.
    model.train()
    model.backbone.apply(lambda m: setattr(m, "drop_path_rate", 0.0) if hasattr(m, "drop_path_rate") else None)
    model.decode_head.dropout.p = 0.0
    model.decode_head.linear_fuse.bn.eval()
    with torch.no_grad():
        out = model(clip).numpy()
    assert out.shape == (2, 5, 7, 16, 32)
    np.testing.assert_allclose(out[:, :4], arrays["output/head_perframe_logits"], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(out[:, 4], arrays["output/head_logits"], atol=2e-5, rtol=1e-5)

    torch.manual_seed(0)  # dropout and drop-path
    model = _fixture_model(arrays, meta)
    step = torch_reference.make_train_step(model)
    labels = torch.from_numpy(np.random.default_rng(0).integers(0, 7, (2, 4, 64, 128)))
    labels[:, :, :8] = 255
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    losses = [float(step(clip, labels)) for _ in range(3)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    changed = [name for name, p in model.named_parameters() if not torch.equal(p, before[name])]
    assert "decode_head.linear_pred2.weight" in changed and "backbone.patch_embed1.proj.weight" in changed
    # gradients reach the cross-frame attention's bias tables too
    assert "decode_head.decoder_focal.blocks.0.attn.relative_position_bias_table_to_windows.0" in changed

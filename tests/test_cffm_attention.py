"""Tests of the CFFM coarse-to-fine cross-frame attention ``decoder_focal`` (SPEC.md section 4.3).

Parity with the official code on ``cffm_tiny.npz``; at other map sizes (padding, a single window, wrap-around)
against the PyTorch transcription of SPEC 4.3 in :mod:`cffm_jax.torch_reference` (``torch.roll``, ``F.unfold``
and ``F.interpolate`` for the key construction), in float64.
"""

from __future__ import annotations

import math
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cffm_jax import torch_reference
from cffm_jax.models.cffm_attention import CFFMTransformer, WindowPool, index_buffers, key_layout

PREFIX = "state_dict/decode_head.decoder_focal."


def params_from_state_dict(state_dict: dict[str, np.ndarray], prefix: str = PREFIX) -> tuple[dict, dict]:
    """Official ``decoder_focal`` state dict -> (Flax params, int64 buffers), by the project's naming rule.

    Digit components merge into the previous one with '_'; a 2-D 'weight' becomes a transposed Dense 'kernel',
    a 1-D 'weight' a LayerNorm 'scale'; everything else keeps its name and torch layout.
    """
    params: dict = {}
    buffers: dict = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        parts: list[str] = []
        for part in key[len(prefix) :].split("."):
            if part.isdigit():
                parts[-1] += "_" + part
            else:
                parts.append(part)
        if value.dtype == np.int64:
            buffers["/".join(parts)] = value
            continue
        if parts[-1] == "weight":
            parts[-1], value = ("kernel", value.T) if value.ndim == 2 else ("scale", value)
        node = params
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = jnp.asarray(value)
    return params, buffers


@pytest.fixture(scope="module")
def tiny(cffm_tiny):
    arrays, meta = cffm_tiny
    params, buffers = params_from_state_dict(arrays)
    head = meta["decode_head"]
    model = CFFMTransformer(dim=head["embed_dim"], depth=head["decoder_depth"], num_heads=head["decoder_num_heads"])
    x = np.transpose(arrays["output/head_focal_in"], (0, 1, 3, 4, 2))  # (B, T, E, h, w) -> (B, T, h, w, E)
    target = np.transpose(arrays["output/head_focal_out_target"], (0, 2, 3, 1))
    return model, params, buffers, x, target


def test_index_buffers_equal_official(tiny):
    _, _, buffers, _, _ = tiny
    ours = index_buffers()
    assert len(buffers) == 2 * 6
    for name, value in buffers.items():
        block, _, leaf = name.split("/")
        assert block in ("blocks_0", "blocks_1")
        np.testing.assert_array_equal(ours[leaf], value, err_msg=name)
        assert ours[leaf].dtype == np.int64


def test_param_tree_matches_official_names_and_shapes(tiny):
    model, params, _, x, _ = tiny
    init = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    flat_init = {"/".join(k.key for k in path): v.shape for path, v in jax.tree_util.tree_leaves_with_path(init)}
    flat_ours = {"/".join(k.key for k in path): v.shape for path, v in jax.tree_util.tree_leaves_with_path(params)}
    assert flat_init == flat_ours
    assert flat_init["blocks_1/attn/relative_position_bias_table_to_neighbors"] == (1, 8, 49, 132)
    assert flat_init["blocks_0/pool_layers_clips_2/kernel"] == (4, 1)


def test_matches_official_fixture(tiny):
    model, params, _, x, target = tiny
    assert x.shape == (2, 4, 8, 16, 32)  # h8 x w8 = 8 x 16 -> padded 14 x 21: padding and wrap-around
    out = jax.jit(model.apply)({"params": params}, x)
    assert out.shape == x.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(out[:, -1], target, atol=2e-5, rtol=1e-5)
    assert np.abs(np.asarray(out[:, -1]) - target).max() < 2e-5
    np.testing.assert_array_equal(out[:, :-1], x[:, :-1])  # the references pass through unchanged
    assert np.abs(target - x[:, -1]).max() > 0.1  # and the target really changed


def test_enhance_target_and_batch_independence(tiny):
    model, params, _, x, target = tiny
    enhance = jax.jit(lambda p, t, r: model.apply({"params": p}, t, r, method=CFFMTransformer.enhance_target))
    full = enhance(params, x[:, -1], x[:, :-1])
    np.testing.assert_allclose(full, target, atol=2e-5, rtol=1e-5)
    for b in range(x.shape[0]):
        single = enhance(params, x[b : b + 1, -1], x[b : b + 1, :-1])
        np.testing.assert_allclose(single[0], full[b], atol=1e-6, rtol=1e-6)
    swapped = enhance(params, x[::-1, -1], x[::-1, :-1])
    np.testing.assert_allclose(swapped[::-1], full, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("window_chunk", [1, 1000])
def test_window_chunking_does_not_change_the_result(tiny, window_chunk):
    # The default on CPU here is 2 chunks of 3 windows; 1 = one window per step, 1000 = all windows at once.
    model, params, _, x, target = tiny
    out = jax.jit(model.clone(window_chunk=window_chunk).apply)({"params": params}, x)
    np.testing.assert_allclose(out[:, -1], target, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [2, 3, 7])
def test_window_pool_is_a_linear_map_of_each_window(window):
    """WindowPool (strided slices) = PyTorch's ``nn.Linear(window**2, 1)`` applied to every window's positions in
    row-major order, and its gradients equal those of that linear map."""
    rng = np.random.default_rng(window)
    x = rng.standard_normal((2, 3 * window, 2 * window, 5)).astype(np.float32)
    kernel = rng.standard_normal((window * window, 1)).astype(np.float32)
    bias = rng.standard_normal((1,)).astype(np.float32)
    params = {"params": {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)}}
    pool = WindowPool(window)

    linear = torch.nn.Linear(window * window, 1)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(kernel.T))
        linear.bias.copy_(torch.from_numpy(bias))
    windows = torch.from_numpy(x).unflatten(1, (3, window)).unflatten(3, (2, window))  # n, i, p, j, q, c
    expected = linear(windows.permute(0, 1, 3, 5, 2, 4).flatten(-2))[..., 0]
    out = jax.jit(pool.apply)(params, x)
    assert out.shape == (2, 3, 2, 5)
    np.testing.assert_allclose(out, expected.detach().numpy(), atol=1e-5, rtol=1e-5)

    def reference(p, x):
        w = x.reshape(2, 3, window, 2, window, 5)
        weights = p["params"]["kernel"][:, 0].reshape(1, 1, window, 1, window, 1)
        return (w * weights).sum(axis=(2, 4)) + p["params"]["bias"][0]

    cot = rng.standard_normal(out.shape).astype(np.float32)
    grads = jax.grad(lambda p, x: jnp.sum(pool.apply(p, x) * cot), argnums=(0, 1))(params, x)
    expected_grads = jax.grad(lambda p, x: jnp.sum(reference(p, x) * cot), argnums=(0, 1))(params, x)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_frames", [3, 5])
def test_wrong_number_of_frames_raises(tiny, num_frames):
    model, params, _, x, _ = tiny
    clip = np.concatenate([x, x], axis=1)[:, :num_frames]
    with pytest.raises(ValueError, match="T=4"):
        model.apply({"params": params}, clip)


def test_init_follows_official_scheme():
    model = CFFMTransformer(dim=16, depth=1)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4, 3, 5, 16)))["params"]["blocks_0"]
    attn = params["attn"]
    np.testing.assert_array_equal(attn["relative_position_bias_table"], 0.0)
    for name in (
        "relative_position_bias_table_to_neighbors",
        "relative_position_bias_table_to_windows_clips_0",
    ):
        assert 0.01 < float(jnp.std(attn[name])) < 0.03, name
    for name, ws in (("pool_layers_0", 7), ("pool_layers_clips_0", 7), ("pool_layers_clips_1", 3)):
        np.testing.assert_allclose(params[name]["kernel"], 1.0 / ws**2)
        np.testing.assert_array_equal(params[name]["bias"], 0.0)
    bound = 1.0 / math.sqrt(16)
    assert float(jnp.abs(attn["qkv"]["kernel"]).max()) <= bound and float(jnp.std(attn["qkv"]["kernel"])) > 0.1
    np.testing.assert_array_equal(params["norm1"]["scale"], 1.0)


def test_key_layout_geometry():
    index, mask, grids = key_layout(14, 21)
    assert index.shape == mask.shape == (6, 289) and grids == ((2, 3), (2, 3), (4, 6), (6, 9))
    wp = 21
    rows, cols = np.divmod(index[4, :181], wp)  # window (1, 1): top-left (7, 7); its ring wraps to row/col 0-2
    dy, dx = (rows - 7) % 14, (cols - 7) % 21
    np.testing.assert_array_equal(dy[:49] * 7 + dx[:49], np.arange(49))  # own window, row-major
    offsets = set(zip(((rows - 4) % 14).tolist(), ((cols - 4) % 21).tolist(), strict=True))
    assert len(offsets) == 13 * 13  # own + ring = the 13x13 block around the window (120 + 49 distinct cells)
    np.testing.assert_array_equal(mask[:, :181], 0.0)
    assert set(np.unique(mask).tolist()) == {0.0, -100.0}
    zero_row = 14 * 21 + 6 + 6 + 24 + 54
    np.testing.assert_array_equal(index[mask < 0], zero_row)  # masked keys read the all-zero row


# ---------------------------------------------------------------------------------------------------------
# The PyTorch transcription of SPEC 4.3 (cffm_jax.torch_reference, itself checked against the official fixture in
# tests/test_torch_reference.py), in float64, for sizes the fixture does not cover.


def _reference_block(x: np.ndarray, p: dict, heads: int) -> np.ndarray:
    """x (B, T, h, w, E) -> enhanced target (B, h, w, E) by torch_reference.CFFMBlock with the Flax parameters ``p``
    (renamed back to the official names: ``_N`` -> ``.N``, Dense kernels transposed, LayerNorm scales)."""
    state = {}
    for path, value in flax.traverse_util.flatten_dict(p).items():
        names = [re.sub(r"_(\d+)$", r".\1", part) for part in path]
        value = np.asarray(value, np.float64)
        if names[-1] == "kernel":
            names[-1], value = "weight", value.T
        elif names[-1] == "scale":
            names[-1] = "weight"
        state[".".join(names)] = torch.from_numpy(np.ascontiguousarray(value))
    block = torch_reference.CFFMBlock(x.shape[-1], heads).double()
    missing, unexpected = block.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) == {f"attn.{name}" for name in index_buffers()}
    with torch.no_grad():
        return block(torch.from_numpy(x).double())[:, -1].numpy()


@pytest.fixture(scope="module")
def small_model():
    """A depth-1, E=16 model with random parameters (no zero tables or uniform pooling that could hide
    indexing errors). Parameter shapes do not depend on the map size."""
    model = CFFMTransformer(dim=16, depth=1, num_heads=8)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4, 1, 1, 16)))["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (0.3 * rng.normal(size=s.shape)).astype(np.float32), shapes)
    for name, ws in (
        ("pool_layers_0", 7),
        ("pool_layers_clips_0", 7),
        ("pool_layers_clips_1", 3),
        ("pool_layers_clips_2", 2),
    ):
        params["blocks_0"][name]["kernel"] += 1.0 / ws**2
    params["blocks_0"]["norm1"]["scale"] += 1.0
    params["blocks_0"]["norm2"]["scale"] += 1.0
    return model, params


@pytest.mark.parametrize("size", [(15, 9), (7, 7), (1, 1), (9, 22)])
def test_other_sizes_match_literal_reference(small_model, size):
    model, params = small_model
    x = np.random.default_rng(sum(size)).normal(size=(2, 4, *size, 16)).astype(np.float32)
    out = jax.jit(model.apply)({"params": params}, x)
    assert out.shape == x.shape and bool(jnp.isfinite(out).all())
    np.testing.assert_array_equal(out[:, :-1], x[:, :-1])
    expected = _reference_block(x, jax.tree.map(np.asarray, params["blocks_0"]), heads=8)
    np.testing.assert_allclose(out[:, -1], expected, atol=2e-5, rtol=1e-5)


def test_bfloat16_computation_stays_close(small_model):
    model, params = small_model
    x = np.random.default_rng(0).normal(size=(1, 4, 7, 7, 16)).astype(np.float32)
    ref = jax.jit(model.apply)({"params": params}, x)
    out = jax.jit(model.clone(dtype=jnp.bfloat16).apply)({"params": params}, x)
    assert out.dtype == jnp.float32 and bool(jnp.isfinite(out).all())
    err = float(jnp.abs(out[:, -1] - ref[:, -1]).max())
    assert 0 < err < 0.1 * float(jnp.abs(ref[:, -1]).max())

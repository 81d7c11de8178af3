"""MiT backbone: parameter counts, parity with the official outputs and with Hugging Face SegFormer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_on_fake_devices

from cffm_jax import xla_options
from cffm_jax.convert import convert_state_dict, load_state_dict
from cffm_jax.data import transforms
from cffm_jax.models import build_model, model_config
from cffm_jax.models.layers import attention, max_last, normalize_images, softmax_last
from cffm_jax.models.mit import (
    _param_grads_by_rows,
    _param_grads_by_taps,
    conv_with_row_weight_grad,
    depthwise_conv3x3,
)
from cffm_jax.parity import fixture_state_dict

TINY = dict(embed_dims=(8, 16, 40, 64), depths=(2, 1, 1, 2))


def test_uint8_frames_are_normalised_on_the_device_like_the_data_transforms():
    """Evaluation hands the networks uint8 frames: normalised in the program, equal to the bit to the numpy transform
    (every value in every channel), and the backbone's outputs are those of the normalised float32 frames."""
    values = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)[None]
    ours = np.asarray(jax.jit(normalize_images)(values))
    np.testing.assert_array_equal(ours.view(np.uint32), transforms.normalize(values).view(np.uint32))
    already = np.ones((2, 3), np.float32)
    np.testing.assert_array_equal(normalize_images(jnp.asarray(already)), already)

    model = build_model(model_config("mit_b0", **TINY))
    frames = np.random.default_rng(0).integers(0, 256, (2, 64, 96, 3), np.uint8)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 64, 96, 3)))
    apply = jax.jit(model.apply)
    for a, b in zip(apply(variables, frames), apply(variables, transforms.normalize(frames)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _count(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


@pytest.mark.parametrize("name,expected", [("mit_b0", 3_319_392), ("mit_b1", 13_151_424)])
def test_official_parameter_counts(name, expected):
    model = build_model(model_config(name))
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    assert _count(shapes["params"]) == expected


@pytest.mark.parametrize("size", range(6))
def test_all_variants_build_with_their_stage_shapes(size):
    cfg = model_config(f"mit_b{size}")
    model = build_model(cfg)
    out = jax.eval_shape(model.init_with_output, jax.random.key(0), jnp.zeros((2, 480, 480, 3)))[0]
    assert [o.shape for o in out] == [
        (2, 480 // s, 480 // s, c) for s, c in zip((4, 8, 16, 32), cfg.embed_dims, strict=True)
    ]


@pytest.mark.parametrize(
    "hw,expected",
    [((61, 97), [(16, 25), (8, 13), (4, 7), (2, 4)]), ((7, 5), [(2, 2), (1, 1), (1, 1), (1, 1)])],
)
def test_any_input_size_follows_the_conv_arithmetic(hw, expected):
    model = build_model(model_config("mit_b0", **TINY))
    out = jax.eval_shape(model.init_with_output, jax.random.key(0), jnp.zeros((1, *hw, 3)))[0]
    assert [o.shape[1:3] for o in out] == expected


def test_parity_with_official_stages(cffm_tiny):
    arrays, meta = cffm_tiny
    bb = meta["backbone"]
    cfg = model_config(
        "mit_b0",
        embed_dims=bb["embed_dims"],
        depths=bb["depths"],
        num_heads=bb["num_heads"],
        sr_ratios=bb["sr_ratios"],
        mlp_ratios=bb["mlp_ratios"],
    )
    sd = fixture_state_dict(arrays)
    variables = convert_state_dict(sd, cfg)  # backbone.* consumed, decode_head.* ignored
    clip = arrays["input/clip"]  # (B, T, 3, H, W)
    b, t = clip.shape[:2]
    frames = jnp.asarray(clip.reshape(b * t, *clip.shape[2:]).transpose(0, 2, 3, 1))
    stages = jax.jit(build_model(cfg).apply)(variables, frames)
    for s, out in enumerate(stages, start=1):
        ref = arrays[f"output/backbone_stage{s}"]  # (B, T, C, h, w)
        ref = ref.reshape(b * t, *ref.shape[2:]).transpose(0, 2, 3, 1)
        np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5, rtol=1e-5, err_msg=f"stage {s}")


def test_train_mode_drop_path_is_stochastic_and_eval_is_not():
    cfg = model_config("mit_b0", **TINY, drop_path_rate=0.5)
    model = build_model(cfg)
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    variables = jax.jit(model.init)(jax.random.key(0), x)
    train = jax.jit(lambda v, key: model.apply(v, x, train=True, rngs={"dropout": key})[-1])
    evaluate = jax.jit(lambda v: model.apply(v, x, train=False)[-1])
    a, b = train(variables, jax.random.key(2)), train(variables, jax.random.key(3))
    e1, e2 = evaluate(variables), evaluate(variables)
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(e1, e2)


def test_stage_outputs_are_sown_as_intermediates():
    model = build_model(model_config("mit_b0", **TINY))
    x = jnp.zeros((1, 32, 32, 3))
    variables = jax.jit(model.init)(jax.random.key(0), x)
    out, state = jax.jit(lambda v: model.apply(v, x, mutable=["intermediates"]))(variables)
    np.testing.assert_array_equal(state["intermediates"]["stage3"][0], out[2])


def test_npz_checkpoint_is_readable(tmp_path, cffm_tiny):
    arrays, _ = cffm_tiny
    path = tmp_path / "w.npz"
    backbone = {k: v for k, v in arrays.items() if k.startswith("state_dict/backbone.")}
    np.savez(path, **backbone)
    sd = load_state_dict(path)
    assert sorted(sd) == sorted(k[len("state_dict/") :] for k in backbone)
    np.testing.assert_array_equal(
        sd["backbone.block1.0.attn.kv.weight"], arrays["state_dict/backbone.block1.0.attn.kv.weight"]
    )


@pytest.mark.parametrize("shape", [(2, 12, 10, 8), (1, 7, 9, 5), (3, 16, 16, 4)])
def test_depthwise_conv_and_its_gradients_equal_the_grouped_convolution(shape):
    """The shifted-sum depthwise conv and its written-out gradients against XLA's grouped convolution."""
    keys = jax.random.split(jax.random.key(0), 4)
    x, g = jax.random.normal(keys[0], shape), jax.random.normal(keys[1], shape)
    kernel = jax.random.normal(keys[2], (3, 3, 1, shape[-1]))
    bias = jax.random.normal(keys[3], (shape[-1],))

    def reference(x, kernel, bias):
        dims = ("NHWC", "HWIO", "NHWC")
        out = jax.lax.conv_general_dilated(
            x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dims, feature_group_count=shape[-1]
        )
        return out + bias

    _assert_same_vjp(depthwise_conv3x3, reference, (x, kernel, bias), g, out_atol=1e-5, grad_atol=1e-4)
    # Both ways of summing the parameter gradients (by rows on CPU, by taps on accelerators).
    _, grad_kernel, grad_bias = jax.vjp(reference, x, kernel, bias)[1](g)
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    for param_grads in (_param_grads_by_rows, _param_grads_by_taps):
        got_kernel, got_bias = jax.jit(param_grads)(padded, g)
        np.testing.assert_allclose(got_kernel, grad_kernel, atol=1e-4, rtol=1e-5)
        np.testing.assert_allclose(got_bias, grad_bias, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("shape,k,s", [((2, 20, 17, 3), 7, 4), ((1, 12, 10, 5), 3, 2), ((2, 9, 8, 2), 3, 1)])
def test_conv_with_row_weight_grad_equals_the_convolution(shape, k, s):
    """The patch embedding's convolution (as nn.Conv calls it): same outputs as lax.conv_general_dilated, and its
    row-wise kernel gradient (blocks of 1 or 3 output rows here) and input gradient equal autodiff's."""
    keys = jax.random.split(jax.random.key(2), 3)
    x = jax.random.normal(keys[0], shape)
    kernel = jax.random.normal(keys[1], (k, k, shape[-1], 6))
    padding = ((k // 2, k // 2), (k // 2, k // 2))
    dims = jax.lax.conv_dimension_numbers(x.shape, kernel.shape, ("NHWC", "HWIO", "NHWC"))

    def reference(x, kernel):
        return jax.lax.conv_general_dilated(x, kernel, (s, s), padding, dimension_numbers=dims)

    def conv(x, kernel):
        return conv_with_row_weight_grad(x, kernel, (s, s), padding, None, None, dims, 1, None)

    g = jax.random.normal(keys[2], reference(x, kernel).shape)
    _assert_same_vjp(conv, reference, (x, kernel), g, out_atol=0.0, grad_atol=1e-4)


_DEPTHWISE_SHARDED = r"""
import re, jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from cffm_jax.models.mit import depthwise_conv3x3
mesh = jax.make_mesh((4,), ("data",), axis_types=(AxisType.Auto,))
data = NamedSharding(mesh, P("data"))
rng = np.random.default_rng(0)
x = jax.device_put(rng.standard_normal((4, 6, 5, 8)).astype(np.float32), data)
g = jax.device_put(rng.standard_normal((4, 6, 5, 8)).astype(np.float32), data)
kernel, bias = rng.standard_normal((3, 3, 1, 8)).astype(np.float32), rng.standard_normal(8).astype(np.float32)
vjp = jax.jit(lambda x, k, b, g: jax.vjp(depthwise_conv3x3, x, k, b)[1](g))
hlo = vjp.lower(x, kernel, bias, g).compile().as_text()
bodies = set(re.findall(r"body=%?([\w.\-]+)", hlo))
blocks = re.split(r"\n(?=\S)", hlo)
in_loops = sum(b.count("all-reduce") for b in blocks if b.split(" ")[0].lstrip("%") in bodies)
got = vjp(x, kernel, bias, g)
local = (np.asarray(a) for a in (x, kernel, bias, g))
ref = jax.jit(lambda x, k, b, g: jax.vjp(depthwise_conv3x3, x, k, b)[1](g))(*local)
for a, b in zip(got, ref):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
print("LOOPS", len(bodies), "ALL-REDUCES-IN-LOOPS", in_loops, "X-GRAD-SHARDED", got[0].sharding.spec == P("data"))
"""


def test_depthwise_gradient_of_a_sharded_batch_sums_frames_after_the_row_loop():
    """On a batch sharded over devices (4 fake CPU devices, fresh process) the row loop of the parameter
    gradients keeps per-frame sums: no all-reduce inside the loop (one per row if the frames were summed there),
    the input gradient stays sharded, and the values equal the single-device ones."""
    stdout = run_on_fake_devices(_DEPTHWISE_SHARDED, 4)
    assert "LOOPS 1 ALL-REDUCES-IN-LOOPS 0" in stdout and "X-GRAD-SHARDED True" in stdout, stdout


@pytest.mark.parametrize("n", [0, 1, 32, 33, 100, 225, 289])
def test_row_max_and_softmax_equal_jax_bit_for_bit(n):
    """max_last (slices of <= 32 values, so that XLA:CPU keeps one short reduction instead of a reduce-window)
    and softmax_last give exactly jnp.max / jax.nn.softmax, also with -inf entries (masked keys), in and out of jit
    (the jitted program has no reduce-window)."""
    x = np.array(jax.random.normal(jax.random.key(n), (3, 7, n)) * 10.0)
    if n:
        x[0, :, n // 2] = -np.inf
        x[1, 2] = 1e30
    for fn in (lambda a: a, jax.jit):
        np.testing.assert_array_equal(fn(max_last)(x), jnp.max(x, axis=-1, keepdims=True, initial=-np.inf))
        np.testing.assert_array_equal(fn(softmax_last)(x), jax.nn.softmax(x, axis=-1))
    assert "reduce-window" not in jax.jit(max_last).lower(x).compile().as_text()


def test_row_max_slices_stay_fused_with_ynnpack():
    """In a program with XLA:CPU's default YNNPACK fusions (the training step's) the slices of max_last stay
    inside one XLA fusion: with ``jnp.maximum`` YNNPACK took the maxima and XLA wrote out every slice of the
    scores (8 copies for 225 keys); without YNNPACK (the encoder's option) nothing is written out either."""
    scores = jnp.zeros((4, 64, 225), jnp.float32)
    for kind in ("default", "encoder"):
        program = jax.jit(lambda x: jnp.exp(x - max_last(x)), compiler_options=xla_options.compiler_options(kind))
        text = program.lower(scores).compile().as_text()
        assert "wrapped_slice" not in text and "reduce-window" not in text, kind


@pytest.mark.parametrize("shape", [(3, 37, 11, 8), (2, 64, 64, 4), (1, 5, 1, 3)])
def test_attention_and_its_written_out_gradient_equal_autodiff(shape):
    """The attention core's custom gradient against autodiff of the plain softmax(q k^T) v."""
    b, length, keys_len, d = shape
    keys = jax.random.split(jax.random.key(1), 4)
    q = 2.0 * jax.random.normal(keys[0], (b, length, d))
    k = jax.random.normal(keys[1], (b, keys_len, d))
    v = jax.random.normal(keys[2], (b, keys_len, d))
    g = jax.random.normal(keys[3], (b, length, d))

    def reference(q, k, v):
        return jnp.einsum("bqk,bkd->bqd", jax.nn.softmax(jnp.einsum("bqd,bkd->bqk", q, k), axis=-1), v)

    _assert_same_vjp(attention, reference, (q, k, v), g, out_atol=1e-6, grad_atol=1e-5)


def _assert_same_vjp(fn, reference, args, cotangent, out_atol, grad_atol):
    """``fn`` and ``reference`` give the same outputs and the same (jitted) vector-Jacobian products."""
    out, vjp = jax.vjp(fn, *args)
    out_ref, vjp_ref = jax.vjp(reference, *args)
    np.testing.assert_allclose(out, out_ref, atol=out_atol)
    for got, expected in zip(jax.jit(vjp)(cotangent), vjp_ref(cotangent), strict=True):
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, atol=grad_atol, rtol=1e-5)

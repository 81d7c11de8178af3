"""CFFM / CFFM++ models: parity with the official outputs, the parity checker, shapes, modes and parameter counts."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import FIXTURES

from cffm_jax.convert import convert_state_dict
from cffm_jax.models import build_model, effective_matmul_precision, model_config, trainable_mask
from cffm_jax.models.cffm import quarter_size
from cffm_jax.models.cffm_attention import index_buffers
from cffm_jax.models.layers import _bilinear_taps, resize_bilinear, resize_bilinear_flat
from cffm_jax.parity import FixtureError, check_arrays, config_from_meta, fixture_state_dict

# ---------------------------------------------------------------------------------------------------------
# Parity, output by output (a failure names the stage), and the checker's CLI on the shipped fixtures.

CFFM_OUTPUTS = [
    "backbone_stage1",
    "backbone_stage2",
    "backbone_stage3",
    "backbone_stage4",
    "head_perframe_logits",
    "head_focal_in",
    "head_focal_out_target",
    "head_logits",
    "logits_full",
]
CFFMPP_OUTPUTS = ["head_logits_cffm", "head_cluster_feats", "head_logits_cluster", "head_logits", "logits_full"]


@pytest.fixture(scope="module")
def parity_results(cffm_tiny, cffmpp_tiny):
    out = {}
    for name, (arrays, meta) in (("cffm", cffm_tiny), ("cffmpp", cffmpp_tiny)):
        out[name] = {r.output: r for r in check_arrays(arrays, meta, name)}
    return out


@pytest.mark.parametrize("output", CFFM_OUTPUTS)
def test_cffm_parity(parity_results, output):
    r = parity_results["cffm"][output]
    assert r.max_abs_err <= 2e-5, f"{output}: max abs error {r.max_abs_err:.2e}"


@pytest.mark.parametrize("output", CFFMPP_OUTPUTS)
def test_cffmpp_parity(parity_results, output):
    r = parity_results["cffmpp"][output]
    assert r.max_abs_err <= 2e-5, f"{output}: max abs error {r.max_abs_err:.2e}"


def test_parity_cli_on_the_shipped_fixtures():
    """The user's command, with default XLA flags, on both fixtures."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cmd = [sys.executable, "-m", "cffm_jax.parity", str(FIXTURES / "cffm_tiny.npz"), str(FIXTURES / "cffmpp_tiny.npz")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for output in CFFM_OUTPUTS + CFFMPP_OUTPUTS:
        assert any(line.split()[:1] == [output] and line.rstrip().endswith("ok") for line in proc.stdout.splitlines())
    assert "all outputs within tolerance" in proc.stdout


def test_parity_cli_fails_on_an_uninterpretable_fixture(tmp_path):
    path = tmp_path / "loss_only.npz"
    with np.load(FIXTURES / "loss_tiny.npz") as data:
        np.savez(path, **{k: data[k] for k in data.files})
    env = {**os.environ}
    proc = subprocess.run(
        [sys.executable, "-m", "cffm_jax.parity", str(path)], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 1 and "FAIL" in proc.stdout and "meta lacks 'backbone'" in proc.stdout


def _derived(arrays, meta, *, half=False, sample=False):
    """A fixture in the other formats the checker reads: float16 state dict and/or sampled outputs."""
    arrays = dict(arrays)
    meta = json.loads(json.dumps(meta))
    if half:
        for k in list(arrays):
            if k.startswith("state_dict/") and arrays[k].dtype == np.float32:
                arrays[k] = arrays[k].astype(np.float16)
        meta["state_dict_dtype"] = "float16"
    if sample:
        rng = np.random.default_rng(0)
        for k in [k for k in arrays if k.startswith("output/")]:
            ref = arrays.pop(k)
            ys = rng.integers(0, ref.shape[-2], 20)
            xs = rng.integers(0, ref.shape[-1], 20)
            arrays[f"{k}_sampled"] = ref[..., ys, xs]
            arrays[f"{k}_sampled_y"], arrays[f"{k}_sampled_x"] = ys, xs
    return arrays, meta


def test_checker_reads_sampled_outputs_and_catches_a_wrong_sample(cffm_tiny):
    arrays, meta = _derived(*cffm_tiny, sample=True)
    results = check_arrays(arrays, meta)
    assert {r.output for r in results} == {f"{o}_sampled" for o in CFFM_OUTPUTS}
    assert all(r.ok for r in results)
    arrays["output/head_logits_sampled"] = arrays["output/head_logits_sampled"].copy()
    arrays["output/head_logits_sampled"][1, 3, 7] += 1e-3
    bad = {r.output: r.ok for r in check_arrays(arrays, meta)}
    assert bad["head_logits_sampled"] is False and bad["backbone_stage1_sampled"] is True


def test_checker_reads_float16_state_dicts(cffm_tiny):
    arrays, meta = _derived(*cffm_tiny, half=True)
    # References for the float16-rounded weights: computed by the model from those weights cast to float32 (the
    # fixture format's promise); the official float32 outputs are then far outside the tolerance.
    cfg = config_from_meta(meta)
    sd = {
        k[len("state_dict/") :]: v.astype(np.float32) if v.dtype == np.float16 else v
        for k, v in arrays.items()
        if k.startswith("state_dict/")
    }
    clip = jnp.asarray(np.moveaxis(arrays["input/clip"], 2, -1))
    logits = jax.jit(build_model(cfg).apply)(convert_state_dict(sd, cfg), clip)
    official = arrays["output/head_logits"]
    arrays = {k: v for k, v in arrays.items() if not k.startswith("output/")}
    arrays["output/head_logits"] = np.moveaxis(np.asarray(logits), -1, 1)
    (r,) = check_arrays(arrays, meta)
    assert r.ok
    assert np.abs(arrays["output/head_logits"] - official).max() > 1e-4  # the rounding is visible


def test_checker_rejects_unknown_outputs_and_configs(cffm_tiny):
    arrays, meta = cffm_tiny
    with pytest.raises(FixtureError, match="unknown output 'output/something_else'"):
        check_arrays({**arrays, "output/something_else": np.zeros(3)}, meta)
    meta2 = json.loads(json.dumps(meta))
    meta2["decode_head"]["window_size"] = 8
    with pytest.raises(FixtureError, match="window_size"):
        check_arrays(arrays, meta2)


# ---------------------------------------------------------------------------------------------------------
# Parameter counts and variants.


def _numel(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


@pytest.mark.parametrize(
    "name,trainable,numel",
    [
        ("cffm_b0", 4_672_527, 4_680_865),
        ("cffm_b1", 15_482_538, 15_498_701),
        ("cffmpp_b0", 5_692_883, 5_703_622),
        ("cffmpp_b1", 16_502_894, 16_521_458),
    ],
)
def test_official_parameter_counts(name, trainable, numel):
    cfg = model_config(name)
    shapes = jax.eval_shape(
        build_model(cfg).init,
        jax.random.key(0),
        jnp.zeros((1, 4, 64, 64, 3)),
        prototypes=jnp.zeros((1, 4, 256)) if cfg.arch == "cffmpp" else None,
    )
    # the official head also owns the never-used `conv_seg` (1x1 conv 128 -> 124 channels), which we do not build
    conv_seg = 128 * 124 + 124
    assert _numel(shapes["params"]) + conv_seg == trainable
    # the official state dict also holds BN running stats, the BN step counter and the integer index buffers
    buffers = cfg.decoder_depth * sum(b.size for b in index_buffers().values())
    buffers += 49 * 49 if cfg.arch == "cffmpp" else 0
    assert trainable + _numel(shapes["batch_stats"]) + 1 + buffers == numel


@pytest.mark.parametrize("arch", ["cffm", "cffmpp"])
@pytest.mark.parametrize("size", range(6))
def test_all_variants_build(arch, size):
    cfg = model_config(f"{arch}_b{size}")
    kw = {"prototypes": jnp.zeros((1, 100, 256))} if arch == "cffmpp" else {}
    out = jax.eval_shape(
        lambda: build_model(cfg).init_with_output(jax.random.key(0), jnp.zeros((1, 4, 96, 128, 3)), **kw)
    )[0]
    assert out.shape == (1, 24, 32, 124)


def test_unknown_model_name_and_field():
    with pytest.raises(ValueError, match="valid names: .*cffm_b1"):
        model_config("cffm_b9")
    with pytest.raises(KeyError, match="num_class"):
        model_config("cffm_b0", num_class=3)


# ---------------------------------------------------------------------------------------------------------
# Behaviour on the tiny official weights.


@pytest.fixture(scope="module")
def tiny_model(cffm_tiny):
    arrays, meta = cffm_tiny
    cfg = config_from_meta(meta)
    sd = fixture_state_dict(arrays)
    return build_model(cfg), convert_state_dict(sd, cfg), cfg, jnp.asarray(np.moveaxis(arrays["input/clip"], 2, -1))


@pytest.mark.parametrize(
    "shape,size",
    [((2, 15, 15, 8), (120, 120)), ((1, 120, 216, 8), (60, 108)), ((1, 63, 63, 4), (54, 54)), ((2, 7, 9, 5), (29, 4))],
)
def test_flat_resize_equals_the_per_axis_resize(shape, size):
    """The decoder's resize (gathers of channel vectors) computes the per-axis resize's float32 operations."""
    x = jax.random.normal(jax.random.key(0), shape)
    expected = jax.jit(resize_bilinear, static_argnums=1)(x, size)
    got = jax.jit(resize_bilinear_flat, static_argnums=1)(x, size)
    assert got.shape == expected.shape == (shape[0], *size, shape[3])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def _interpolation_matrix(in_size, out_size):
    """PyTorch's bilinear resize along one axis as a dense (out, in) float64 matrix."""
    lo, hi, frac = _bilinear_taps(in_size, out_size)
    m = np.zeros((out_size, in_size))
    np.add.at(m, (np.arange(out_size), lo), 1.0 - frac)
    np.add.at(m, (np.arange(out_size), hi), frac)
    return m


@pytest.mark.parametrize("resize", [resize_bilinear, resize_bilinear_flat])
@pytest.mark.parametrize(
    "shape,size",
    [((2, 15, 15, 3), (120, 120)), ((1, 30, 54, 2), (120, 213)), ((1, 63, 63, 4), (54, 54)), ((2, 7, 9, 5), (29, 4))],
)
def test_resize_gradient_is_the_transposed_interpolation(resize, shape, size):
    """The written-out gradient (gathers instead of autodiff's scatter-adds) is the transpose of the linear map:
    the cotangent through the dense interpolation matrices, in float64."""
    x = jax.random.normal(jax.random.key(0), shape)
    g = jax.random.normal(jax.random.key(1), (shape[0], *size, shape[3]))
    y, vjp = jax.vjp(lambda a: resize(a, size), x)
    rows, cols = _interpolation_matrix(shape[1], size[0]), _interpolation_matrix(shape[2], size[1])
    np.testing.assert_allclose(y, np.einsum("Hh,Ww,nhwc->nHWc", rows, cols, np.float64(x)), atol=1e-5)
    expected = np.einsum("Hh,Ww,nHWc->nhwc", rows, cols, np.float64(g))
    np.testing.assert_allclose(jax.jit(vjp)(g)[0], expected, atol=2e-5)


def test_early_exit_returns_the_last_frames_own_logits(tiny_model):
    model, variables, _, clip = tiny_model
    clip = clip[:1, :, :32, :48]
    _, state = jax.jit(lambda v, c: model.apply(v, c, mutable=["intermediates"]))(variables, clip)
    perframe = state["intermediates"]["decode_head"]["perframe_logits"][0]  # (1, 4, h, w, K)
    for t in (1, 3):
        out = jax.jit(model.apply)(variables, clip[:, :t])
        assert out.shape == (1, 8, 12, 7)
        # the per-frame branch of frame t-1 does not depend on the other frames
        np.testing.assert_allclose(out, perframe[:, t - 1], atol=1e-5)


def test_odd_input_size_floors_the_eighth_resolution(tiny_model):
    model, variables, _, clip = tiny_model
    clip = jnp.pad(clip[:1], ((0, 0), (0, 0), (0, 4), (0, 0), (0, 0)))[:, :, :68, :100]  # h4 = 17, w4 = 25
    out, state = jax.jit(lambda v, c: model.apply(v, c, mutable=["intermediates"]))(variables, clip)
    assert out.shape == (1, 17, 25, 7) and quarter_size((68, 100)) == (17, 25)
    assert state["intermediates"]["decode_head"]["focal_in"][0].shape == (1, 4, 8, 12, 32)
    assert np.isfinite(np.asarray(out)).all()


def test_batch_elements_are_independent_and_ordered(tiny_model):
    model, variables, _, clip = tiny_model
    apply = jax.jit(model.apply)
    both = apply(variables, clip)
    np.testing.assert_allclose(both[1:], apply(variables, clip[1:]), atol=1e-5)
    np.testing.assert_allclose(both[:1], apply(variables, clip[:1]), atol=1e-5)
    assert not np.allclose(both[0], both[1])


def test_real_test_size_480x864_runs(tiny_model):
    model, variables, _, _ = tiny_model
    clip = jax.random.normal(jax.random.key(0), (1, 4, 480, 864, 3))
    out = jax.jit(model.apply)(variables, clip)
    assert out.shape == (1, 120, 216, 7) and np.isfinite(np.asarray(out)).all()


def test_training_mode_output_and_batch_statistics(tiny_model):
    model, variables, _, clip = tiny_model

    @jax.jit
    def train(v, c, key):
        return model.apply(v, c, train=True, rngs={"dropout": key}, mutable=["batch_stats"])

    out, updates = train(variables, clip, jax.random.key(0))
    assert out.shape == (2, 5, 16, 32, 7)
    old = variables["batch_stats"]["decode_head"]["linear_fuse"]["bn"]["mean"]
    new = updates["batch_stats"]["decode_head"]["linear_fuse"]["bn"]["mean"]
    assert not np.allclose(old, new)
    with pytest.raises(ValueError, match="num_clips=4"):
        model.apply(variables, clip[:, :3], train=True, rngs={"dropout": jax.random.key(0)}, mutable=["batch_stats"])


# ---------------------------------------------------------------------------------------------------------
# Float32 matmul precision: the model's 'highest' reaches every product it traces (on GPUs XLA's default would run
# them on the TF32 units, ~3e-3 off the official logits). Checked on the lowered programs, which name each
# product's precision on any backend; the global default is set to something else around them.


def _product_precisions(fn, *args) -> list[bool]:
    """For every matrix product / convolution in ``jit(fn)``'s lowering: whether it is at HIGHEST precision."""
    with jax.default_matmul_precision("bfloat16"):
        text = jax.jit(fn).lower(*args).as_text()
    products = [
        line for line in text.splitlines() if "stablehlo.dot_general" in line or "stablehlo.convolution" in line
    ]
    assert products
    return ["HIGHEST" in line for line in products]


def test_matmul_precision_reaches_every_product(tiny_model):
    model, variables, _, clip = tiny_model
    assert model.matmul_precision is None  # build_model on XLA:CPU (float32 products whatever the setting)
    highest = model.clone(matmul_precision="highest")
    frames = clip[0]
    feats = jax.eval_shape(lambda v, f: model.apply(v, f, method="encode_frames"), variables, frames)[1]
    feats = jnp.zeros((1, *feats.shape), feats.dtype)
    calls = {
        "clip": lambda m: (lambda v, c: m.apply(v, c), variables, clip),
        "encode_frames": lambda m: (lambda v, f: m.apply(v, f, method="encode_frames"), variables, frames),
        "decode_clip": lambda m: (lambda v, x: m.apply(v, x, size=(16, 32), method="decode_clip"), variables, feats),
    }
    for name, call in calls.items():
        assert all(_product_precisions(*call(highest))), name
        assert not any(_product_precisions(*call(model))), name  # without the scope: the surrounding default

    backbone = build_model(model_config("mit_b0", embed_dims=(8, 16, 40, 64), depths=(1, 1, 1, 1)))
    backbone_vars = jax.eval_shape(backbone.init, jax.random.key(0), frames)
    assert all(_product_precisions(backbone.clone(matmul_precision="highest").apply, backbone_vars, frames))


def test_matmul_precision_reaches_the_training_gradient(tiny_model):
    """The backward pass too, custom gradients included (they are traced after the forward's scope closed)."""
    from cffm_jax.train import compute_grads

    model, variables, cfg, clip = tiny_model
    batch = {"clips": clip, "labels": jnp.zeros((*clip.shape[:2], *clip.shape[2:4]), jnp.int32)}

    def grads(m):
        return lambda p, s, b: compute_grads(p, s, b, jax.random.key(0), model=m, loss_config={})[2]

    args = (variables["params"], variables["batch_stats"], batch)
    assert all(_product_precisions(grads(model.clone(matmul_precision="highest")), *args))
    assert not any(_product_precisions(grads(model), *args))


def test_effective_matmul_precision():
    f32, bf16 = model_config("cffm_b0"), model_config("cffm_b0", dtype="bfloat16")
    assert f32.matmul_precision == "highest"
    assert effective_matmul_precision(f32, "gpu") == "highest" and effective_matmul_precision(f32, "tpu") == "highest"
    assert effective_matmul_precision(f32, "cpu") is None  # float32 products at any setting there
    assert effective_matmul_precision(bf16, "gpu") is None  # bfloat16 operands
    assert effective_matmul_precision(model_config("cffm_b0", matmul_precision="default"), "gpu") is None
    assert (
        effective_matmul_precision(model_config("cffm_b0", matmul_precision="tensorfloat32"), "gpu") == "tensorfloat32"
    )
    with pytest.raises(ValueError, match="matmul_precision='fast'"):
        build_model(model_config("cffm_b0", matmul_precision="fast"))


@pytest.fixture(scope="module")
def tiny_cffmpp(cffmpp_tiny):
    arrays, meta = cffmpp_tiny
    cfg = config_from_meta(meta)
    sd = fixture_state_dict(arrays)
    clip = jnp.asarray(np.moveaxis(arrays["input/clip"], 2, -1))
    return build_model(cfg), convert_state_dict(sd, cfg), cfg, clip, jnp.asarray(arrays["input/prototypes"])


def test_cffmpp_needs_prototypes(tiny_cffmpp):
    model, variables, _, clip, _ = tiny_cffmpp
    with pytest.raises(ValueError, match="prototypes"):
        model.apply(variables, clip)


def test_cffmpp_fine_tuning_step_changes_only_the_prototype_branch(tiny_cffmpp):
    model, variables, cfg, clip, protos = tiny_cffmpp
    mask = trainable_mask(cfg, variables["params"])
    trained = {"/".join(p) for p, m in _paths(mask).items() if m}
    assert trained and all(p.startswith(("decode_head/decoder_swin/", "decode_head/linear_pred3/")) for p in trained)
    tx = optax.multi_transform({True: optax.adamw(1e-3, weight_decay=0.01), False: optax.set_to_zero()}, mask)
    labels = jax.random.randint(jax.random.key(1), (2, 5, 16, 32), 0, 7)

    @jax.jit
    def step(params, batch_stats):
        def loss_fn(p):
            out, upd = model.apply(
                {"params": p, "batch_stats": batch_stats},
                clip,
                train=True,
                prototypes=protos,
                rngs={"dropout": jax.random.key(2)},
                mutable=["batch_stats"],
            )
            logp = jax.nn.log_softmax(out)
            return -jnp.take_along_axis(logp, labels[..., None], -1).mean(), upd

        (loss, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, _ = tx.update(grads, tx.init(params), params)
        return optax.apply_updates(params, updates), grads, upd

    new, grads, upd = step(variables["params"], variables["batch_stats"])
    flat_old, flat_new, flat_grad = _paths(variables["params"]), _paths(new), _paths(grads)
    for path, old in flat_old.items():
        name = "/".join(path)
        if name in trained:
            assert not np.array_equal(old, flat_new[path]), name
        else:
            assert np.array_equal(old, flat_new[path]), name
            assert not np.any(flat_grad[path]), f"{name} receives a gradient"
    # linear_fuse's BatchNorm stays in inference mode during CFFM++ fine-tuning
    np.testing.assert_array_equal(
        upd["batch_stats"]["decode_head"]["linear_fuse"]["bn"]["mean"],
        variables["batch_stats"]["decode_head"]["linear_fuse"]["bn"]["mean"],
    )


def _paths(tree):
    return {
        tuple(str(getattr(k, "key", k)) for k in p): np.asarray(v)
        for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]
    }

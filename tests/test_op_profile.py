"""``cffm_jax.op_profile``: per-operation profiles of compiled programs, and the benchmark's ``--profile``.

The matrix-product FLOPs are checked against hand counts on programs whose products are known (a batched matmul,
a padded convolution, a grouped one, the input gradient of a strided one), the time attribution on intervals with
known overlaps, and the model parts on the ``op_name`` forms that jax writes.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cffm_jax import benchmark, op_profile


def _profile(fn, *args):
    compiled = jax.jit(fn).lower(*args).compile()
    jax.block_until_ready(compiled(*args))  # the first run initialises; the profile is of the next
    return op_profile.profile(lambda: compiled(*args), [compiled], top=100)


def _conv(x, w, stride=1, groups=1):
    return jax.lax.conv_general_dilated(
        x, w, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups
    )


def test_products_flops_match_hand_counts():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((3, 64, 48), np.float32), rng.standard_normal((3, 48, 40), np.float32)
    x = rng.standard_normal((2, 16, 16, 8), np.float32)
    w = rng.standard_normal((3, 3, 8, 12), np.float32)
    depthwise = rng.standard_normal((3, 3, 1, 8), np.float32)

    p = _profile(lambda a, b: jnp.tanh(jnp.einsum("bij,bjk->bik", a, b)), a, b)
    assert p["categories"]["products"]["gflop"] * 1e9 == pytest.approx(2 * 3 * 64 * 48 * 40)
    # A 3x3 'SAME' convolution: 9 taps x 8 input channels per output element (taps on the padding count).
    p = _profile(_conv, x, w)
    assert p["categories"]["products"]["gflop"] * 1e9 == pytest.approx(2 * 2 * 16 * 16 * 12 * 9 * 8)
    # Depthwise: one input channel per output channel.
    p = _profile(lambda x, w: _conv(x, w, groups=8), x, depthwise)
    assert p["categories"]["products"]["gflop"] * 1e9 == pytest.approx(2 * 2 * 16 * 16 * 8 * 9)


def test_the_input_gradient_of_a_strided_convolution_counts_no_dilation_zeros():
    """Patchify (kernel = stride = 4), as the MiT's spatial-reduction convolutions: forward, input gradient and
    kernel gradient each take the forward's FLOPs; XLA computes the input gradient as a convolution of the
    4x-dilated output gradient, and counting its zeros would make it 16x."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 32, 32, 8), np.float32)
    w = rng.standard_normal((4, 4, 8, 16), np.float32)
    forward = 2 * 2 * 8 * 8 * 16 * (4 * 4 * 8)
    p = _profile(jax.grad(lambda x, w: jnp.sum(_conv(x, w, stride=4) ** 2), argnums=(0, 1)), x, w)
    assert p["categories"]["products"]["gflop"] * 1e9 == pytest.approx(3 * forward)


def test_wall_time_is_shared_among_operations_in_flight():
    # a runs 0-10 and 20-30 ns, b 5-15 ns: 5-10 is shared, 15-20 idle.
    shares, busy = op_profile.attribute([("a", 0, 10), ("b", 5, 15), ("a", 20, 30)])
    assert shares["a"] == pytest.approx(17.5e-9) and shares["b"] == pytest.approx(7.5e-9)
    assert busy == pytest.approx(25e-9) == pytest.approx(sum(shares.values()))


@pytest.mark.parametrize(
    "op_name, expected",
    [
        ("jit(train_step)/transpose(jvp(CFFM))/backbone/block1_0/attn/dot_general", ("backbone/block1_0", True)),
        ("jit(run)/CFFM.encode_frames/backbone/block1_0/attn/dot_general", ("backbone/block1_0", False)),
        ("jit(f)/jvp(CFFM)/decode_head/decode_head.decode_clip/dropout/jit(_pad)/x", ("decode_head/dropout", False)),
        ("jit(train_step)/jvp(loss)/while/body/closed_call/add", ("loss", False)),
        ("jit(train_step)/transpose(jvp(loss))/add_any", ("loss", True)),
        ("jit(train_step)/optimizer/add", ("optimizer", False)),
        ("jit(train_step)/jit(_threefry_fold_in)/TrainState.step_key/while", ("(no module)", False)),
        ("", ("(no module)", False)),
    ],
)  # fmt: skip
def test_model_parts_from_op_names(op_name, expected):
    assert op_profile.scope_of(op_name) == expected


def test_instructions_parse_with_tuple_shapes_and_called_computations():
    loop = op_profile.parse_instruction(
        "  ROOT %while.4 = (s32[], /*index=1*/f32[4,8]{1,0}) while(%tuple.3), condition=%cond.1, body=%body.2, "
        'metadata={op_name="jit(f)/while"}'
    )
    assert (loop.name, loop.opcode, loop.dims, loop.operands) == ("while.4", "while", None, ("tuple.3",))
    assert set(loop.called) == {"body.2", "cond.1"}
    fusion = op_profile.parse_instruction(
        "  %ynn_fusion.3 = f32[360,64]{1,0} fusion(%dot.1, %constant.5), kind=kCustom, calls=%fused_computation.3"
    )
    assert (fusion.opcode, fusion.dims, fusion.operands, fusion.called) == (
        "fusion",
        (360, 64),
        ("dot.1", "constant.5"),
        ("fused_computation.3",),
    )
    assert op_profile.parse_instruction("ENTRY %main.5 (p: f32[2]) -> f32[2] {") is None


def test_benchmark_profile_of_a_training_step(tmp_path, capsys):
    """``--profile``: the breakdown is in the JSON and the report, its shares partition the profiled run, the
    products' FLOPs agree with XLA's count, and the loss, the optimizer and the backward pass are told apart."""
    path = tmp_path / "profile.json"
    benchmark.main(["--tiny", "--cases", "train", "--sizes", "64x64", "--repeats", "1", "--profile",
                    "--json", str(path)])  # fmt: skip
    with open(path) as f:
        (row,) = json.load(f)["results"]
    p = row["extra"]["profile"]
    assert 0 < p["busy_s"] <= p["wall_s"] * 1.01
    categories = p["categories"]
    assert set(categories) == set(op_profile.CATEGORIES)
    assert sum(c["s"] for c in categories.values()) == pytest.approx(p["busy_s"])
    assert sum(c["share"] for c in categories.values()) == pytest.approx(1.0)
    # XLA's cost analysis counts elementwise work as well, and a loop body once: same order, not equal.
    products = categories["products"]["gflop"] * 1e9
    assert 0.5 * row["flops"] < products < 1.5 * row["flops"]
    assert all(c["gflop"] == 0 for name, c in categories.items() if name != "products")
    assert p["products_peak_target_met"] == (p["products_peak_fraction"] >= 0.5)
    assert p["products_peak_fraction"] == pytest.approx(
        categories["products"]["gflops_per_s"] / json.loads(path.read_text())["matmul_peak"]["gflops_per_s"]
    )
    scopes = {s["scope"] for s in p["scopes"]}
    assert {"loss", "optimizer", "loss (backward)"} <= scopes
    assert any(s.startswith("backbone/") and s.endswith("(backward)") for s in scopes)
    assert p["top"] and p["top"][0]["s"] >= p["top"][-1]["s"]
    out = capsys.readouterr().out
    assert "where the time goes, CFFM-B0 train step 1x4 (tiny)" in out and "of the matmul peak (wall; >= 50%: " in out


HLO = """HloModule jit_f, is_scheduled=true

%fused.1 (param_0: f32[8,16], param_1: f32[16,4]) -> f32[8,4] {
  %param_0 = f32[8,16]{1,0} parameter(0)
  %param_1 = f32[16,4]{1,0} parameter(1)
  ROOT %dot.1 = f32[8,4]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main.9 (a: f32[8,16], b: f32[16,4]) -> f32[8,4] {
  %a = f32[8,16]{1,0} parameter(0)
  %b = f32[16,4]{1,0} parameter(1)
  %ynn_fusion.1 = f32[8,4]{1,0} fusion(%a, %b), kind=kCustom, calls=%fused.1, metadata={op_name="f/head/proj/dot"}
  %copy.2 = f32[4,8]{0,1} copy(%ynn_fusion.1), metadata={op_name="jit(f)/transpose(jvp(M))/head/transpose"}
  %tanh.3 = f32[8,4]{1,0} tanh(%ynn_fusion.1), metadata={op_name="jit(f)/loss/tanh"}
  ROOT %exponential.4 = f32[8,4]{1,0} exponential(%tanh.3)
}
"""  # fmt: skip


def test_breakdown_takes_each_operations_median_over_runs():
    """Kinds, model parts and FLOPs from the HLO; per operation the median of its per-run times, so one run's stall
    (tanh.3 in the third trace) does not count; an instruction without metadata takes its operand's model part."""
    program = op_profile.Program(HLO)

    def trace(*durations_ms, extra=()):  # the three operations one after the other
        ends = np.cumsum((0, *durations_ms)) * 1_000_000
        ops = ("ynn_fusion.1", "copy.2", "tanh.3", "exponential.4")
        return [("jit_f", op, ends[i], ends[i + 1]) for i, op in enumerate(ops)] + list(extra), ends[-1] * 1e-9

    traces = [trace(4, 1, 1, 1), trace(6, 1, 1, 1), trace(5, 1, 93, 1, extra=[("other_module", "x", 0, 50_000_000)])]
    p = op_profile.summarize([program], traces)
    assert p["runs"] == 3 and p["wall_s"] == pytest.approx(9e-3) and p["busy_s"] == pytest.approx(8e-3)
    assert p["categories"]["products"]["s"] == pytest.approx(5e-3)
    assert p["categories"]["products"]["gflop"] * 1e9 == 2 * 8 * 16 * 4
    assert p["categories"]["products"]["gflops_per_s"] == pytest.approx(2 * 8 * 16 * 4 / 5e-3 / 1e9)
    assert p["categories"]["data movement"]["s"] == pytest.approx(1e-3)
    assert p["categories"]["elementwise"]["s"] == pytest.approx(2e-3)
    assert {s["scope"]: s["s"] for s in p["scopes"]} == pytest.approx(
        {"head/proj": 5e-3, "head (backward)": 1e-3, "loss": 2e-3}  # exponential.4 has its operand's name
    )
    assert [r["op"] for r in p["top"]][:2] == ["ynn_fusion.1", "copy.2"]
    assert {r["op"]: r["op_name"] for r in p["top"]}["exponential.4"] == "jit(f)/loss/tanh"

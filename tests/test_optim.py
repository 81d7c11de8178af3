"""Optimiser of SPEC.md section 9: schedule formula, parameter-group rule on real models, AdamW vs PyTorch."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest

from cffm_jax import experiment_config
from cffm_jax.models import model_config, trainable_mask
from cffm_jax.optim import FROZEN, lr_schedule, make_optimizer, param_groups

RULES_CFFM = experiment_config.optim_config(lr=6e-5, head_lr_mult=10.0).rules
RULES_CFFMPP = experiment_config.optim_config(lr=2e-4, head_lr_mult=1.0).rules


def spec_lr(i: int, base: float, total: int, warmup: int = 1500, ratio: float = 1e-6) -> float:
    """SPEC 9 written out in float64."""
    lr = base * (1.0 - i / total) ** 1.0
    if i < warmup:
        lr *= 1.0 - (1.0 - i / warmup) * (1.0 - ratio)
    return lr


@pytest.mark.parametrize("i", [0, 1, 750, 1499, 1500, 1501, 80_000, 159_999, 160_000])
def test_schedule_matches_spec(i):
    schedule = lr_schedule(6e-5, 160_000, warmup_steps=1500, warmup_ratio=1e-6, power=1.0)
    got = float(jax.jit(schedule)(i))
    np.testing.assert_allclose(got, spec_lr(i, 6e-5, 160_000), rtol=2e-6, atol=1e-16)


def test_schedule_landmarks():
    schedule = lr_schedule(2e-4, 40_000)
    assert float(schedule(0)) == pytest.approx(2e-4 * 1e-6, rel=1e-6)  # warmup starts at ratio 1e-6
    # no warmup factor left at 1500
    assert float(schedule(1500)) == pytest.approx(2e-4 * (1 - 1500 / 40_000), rel=1e-6)
    assert float(schedule(40_000)) == 0.0
    # warmup is continuous with the poly decay at its end
    assert float(schedule(1499)) == pytest.approx(2e-4 * (1 - 1499 / 40_000) * (1 - 1 / 1500 * (1 - 1e-6)), rel=1e-6)


def _shapes(name: str) -> dict:
    from cffm_jax.convert import model_shapes

    flat = model_shapes(model_config(name))["params"]
    tree: dict = {}
    for path, shape in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = jax.ShapeDtypeStruct(shape, np.float32)
    return tree


def official_name(path: str) -> str:
    """Flax path -> official PyTorch name (undo the ``.N`` -> ``_N`` merge and the leaf renames)."""
    parts: list[str] = []
    for part in path.split("/"):
        m = re.fullmatch(r"(.*)_(\d+)", part)
        parts += [m.group(1), m.group(2)] if m else [part]
    if parts[-1] in ("kernel", "scale"):
        parts[-1] = "weight"
    return ".".join(parts)


def mmcv_rule(name: str, head_mult: float) -> tuple[float, float]:
    """mmcv 1.3.0 DefaultOptimizerConstructor custom_keys on the official name (SPEC 9), independently."""
    custom = {"pos_block": (1.0, 0.0), "norm": (1.0, 0.0), "head": (head_mult, 1.0)}
    keys = sorted(sorted(custom), key=len, reverse=True)
    assert keys == ["pos_block", "head", "norm"]
    for key in keys:
        if key in name:
            return custom[key]
    return 1.0, 1.0


def expected_backbone_no_decay(depths: tuple[int, ...]) -> set[str]:
    out = set()
    for s, depth in enumerate(depths, start=1):
        out |= {f"backbone/patch_embed{s}/norm/{leaf}" for leaf in ("scale", "bias")}
        out |= {f"backbone/norm{s}/{leaf}" for leaf in ("scale", "bias")}
        for i in range(depth):
            for norm in ("norm1", "norm2") + (("attn/norm",) if s < 4 else ()):  # sr_ratio 8, 4, 2, 1
                out |= {f"backbone/block{s}_{i}/{norm}/{leaf}" for leaf in ("scale", "bias")}
    return out


@pytest.mark.parametrize("name", ["cffm_b0", "cffm_b1"])
def test_param_groups_match_mmcv_rule_cffm(name):
    params = _shapes(name)
    groups = param_groups(params, RULES_CFFM)
    depths = model_config(name).depths
    no_decay = {p for p, g in groups.items() if g.decay_mult == 0.0}
    assert no_decay == expected_backbone_no_decay(depths)
    for path, group in groups.items():
        assert (group.lr_mult, group.decay_mult) == mmcv_rule(official_name(path), 10.0), path
        if path.startswith("decode_head/"):  # the whole head, its norms, BN and bias tables included
            assert (group.lr_mult, group.decay_mult) == (10.0, 1.0), path
        elif path not in no_decay:
            assert (group.lr_mult, group.decay_mult) == (1.0, 1.0), path
    # spot checks of the quirks of SPEC 12.11
    for path in (
        "decode_head/linear_fuse/bn/scale",
        "decode_head/decoder_focal/blocks_0/norm1/bias",
        "decode_head/decoder_focal/blocks_0/attn/relative_position_bias_table",
    ):
        assert groups[path].lr_mult == 10.0 and groups[path].decay_mult == 1.0
    assert groups["backbone/block1_0/attn/q/bias"].decay_mult == 1.0  # backbone biases are decayed
    assert groups["backbone/block4_0/mlp/dwconv/dwconv/kernel"].decay_mult == 1.0
    assert "backbone/block4_0/attn/norm/scale" not in groups  # stage 4 has no spatial reduction


def test_param_groups_cffmpp_freeze_everything_but_the_prototype_branch():
    cfg = model_config("cffmpp_b0")
    params = _shapes("cffmpp_b0")
    groups = param_groups(params, RULES_CFFMPP, trainable_mask(cfg, params))
    trained = {p for p, g in groups.items() if g.label != FROZEN}
    assert trained and all(p.split("/")[1] in ("decoder_swin", "linear_pred3") for p in trained)
    assert {p.split("/")[1] for p in trained} == {"decoder_swin", "linear_pred3"}
    for path in trained:
        assert (groups[path].lr_mult, groups[path].decay_mult) == mmcv_rule(official_name(path), 1.0) == (1.0, 1.0)
    assert groups["backbone/block1_0/attn/q/kernel"] == groups["decode_head/linear_pred2/kernel"]
    assert groups["backbone/block1_0/attn/q/kernel"].label == FROZEN


def _tiny_tree(rng: np.random.Generator) -> dict:
    return {
        "backbone": {
            "norm1": {"scale": rng.normal(size=(4,)), "bias": rng.normal(size=(4,))},
            "block1_0": {"attn": {"q": {"kernel": rng.normal(size=(3, 4)), "bias": rng.normal(size=(4,))}}},
        },
        "decode_head": {
            "linear_fuse": {"bn": {"scale": rng.normal(size=(4,))}},
            "linear_pred": {"kernel": rng.normal(size=(4, 2)), "bias": rng.normal(size=(2,))},
        },
    }


def test_adamw_groups_and_schedule_match_pytorch():
    torch = pytest.importorskip("torch", reason="PyTorch reference for AdamW")
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: x.astype(np.float32), _tiny_tree(rng))
    cfg = dict(experiment_config.optim_config(lr=3e-2, head_lr_mult=10.0))
    cfg.update(warmup_steps=2, warmup_ratio=0.1)
    total = 6
    tx, schedule = make_optimizer(cfg, params, total)
    groups = param_groups(params, cfg["rules"])

    flat = _flat(params)
    torch_params = {p: torch.nn.Parameter(torch.tensor(v)) for p, v in flat.items()}
    torch_groups = [
        {
            "params": [torch_params[p]],
            "lr": cfg["lr"] * groups[p].lr_mult,
            "weight_decay": 0.01 * groups[p].decay_mult,
        }
        for p in flat
    ]
    for g in torch_groups:
        g["initial_lr"] = g["lr"]
    opt = torch.optim.AdamW(torch_groups, betas=(0.9, 0.999), eps=1e-8)

    state = tx.init(params)
    p_jax = params
    for step in range(total):
        grads = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params)
        updates, state = tx.update(grads, state, p_jax)
        p_jax = jax.tree.map(lambda p, u: p + u, p_jax, updates)
        factor = spec_lr(step, 1.0, total, warmup=2, ratio=0.1)
        for g in opt.param_groups:
            g["lr"] = g["initial_lr"] * factor
        for path, grad in _flat(grads).items():
            torch_params[path].grad = torch.tensor(grad)
        opt.step()
        np.testing.assert_allclose(float(schedule(step)), cfg["lr"] * factor, rtol=1e-6)
    for path, value in _flat(p_jax).items():
        np.testing.assert_allclose(value, torch_params[path].detach().numpy(), rtol=2e-5, atol=1e-6, err_msg=path)


def _flat(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = np.asarray(v)
    return out


def test_frozen_parameters_get_no_update_no_decay_and_no_state():
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda x: x.astype(np.float32), _tiny_tree(rng))
    trainable = jax.tree.map(lambda _: False, params)
    trainable["decode_head"]["linear_pred"] = {"kernel": True, "bias": True}
    cfg = experiment_config.optim_config(lr=1e-1, head_lr_mult=1.0)
    cfg.warmup_steps = 0
    tx, _ = make_optimizer(cfg, params, 10, trainable)
    state = tx.init(params)
    grads = jax.tree.map(lambda x: np.ones_like(x), params)
    updates, state = tx.update(grads, state, params)
    new = _flat(jax.tree.map(lambda p, u: p + u, params, updates))
    old = _flat(params)
    for path in old:
        if path.startswith("decode_head/linear_pred/"):
            assert not np.allclose(new[path], old[path]), path
        else:
            np.testing.assert_array_equal(new[path], old[path], err_msg=path)
    # Adam moments (mu, nu) exist only for the 8 + 2 trained numbers, plus scalar counters.
    state_numbers = sum(int(np.size(x)) for x in jax.tree.leaves(state) if np.ndim(x) > 0)
    assert state_numbers == 2 * (8 + 2)

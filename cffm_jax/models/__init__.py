"""Model configs by name and the model builder.

``model_config(name, **overrides)`` returns a flat ``ml_collections.ConfigDict``; ``build_model(config)`` returns
the linen module. Names: ``mit_b0``..``mit_b5`` (backbone alone), ``cffm_b0``..``cffm_b5`` (CFFM) and
``cffmpp_b0``..``cffmpp_b5`` (CFFM++). Any field can be overridden, e.g. a tiny test model:

    model_config("cffm_b0", embed_dims=(8, 16, 40, 64), depths=(2, 1, 1, 2), decoder_embed_dim=32, num_classes=7)

Config fields (flat, so ``--config.model.num_classes=...`` works from the command line):
  name, arch ('mit' | 'cffm' | 'cffmpp'),
  backbone: embed_dims, depths, num_heads, sr_ratios, mlp_ratios, drop_path_rate,
  head (cffm/cffmpp only): decoder_embed_dim (E), decoder_depth, decoder_num_heads, num_classes, num_clips,
  dropout_ratio, prototype_num_heads (cffmpp only),
  dtype: computation dtype ('float32' or 'bfloat16'; parameters stay float32),
  matmul_precision: of the float32 matrix products and convolutions (``jax.default_matmul_precision`` names):
    'highest' (default: the official float32 numbers on every backend) or 'default' (XLA's own: TF32 on GPUs,
    bfloat16 passes on TPUs; faster, logits ~3e-3 off). Not applied to bfloat16 models (their operands are
    bfloat16 already) nor on XLA:CPU, whose products are float32 at any setting.
"""

from __future__ import annotations

import ml_collections

from cffm_jax.models.mit import COMMON, VARIANTS, MixVisionTransformer

# SPEC.md section 1: decoder depth (number of CFFM blocks) per backbone size; b3/b4 have no official config and
# follow b2 (the closest published setting).
DECODER_DEPTHS = {"b0": 1, "b1": 2, "b2": 2, "b3": 2, "b4": 2, "b5": 4}
ARCHS = ("mit", "cffm", "cffmpp")
MODEL_NAMES = tuple(f"{arch}_b{i}" for arch in ARCHS for i in range(6))


def model_config(name: str, **overrides) -> ml_collections.ConfigDict:
    """The configuration of a named model with optional field overrides.

    Args:
      name: one of ``MODEL_NAMES``.
      **overrides: any config field (see the module docstring); unknown fields raise ``KeyError``.
    Returns:
      a flat ConfigDict.
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"Unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    arch, size = name.split("_")
    variant = VARIANTS[f"mit_{size}"]
    cfg = ml_collections.ConfigDict()
    cfg.name = name
    cfg.arch = arch
    cfg.embed_dims = variant["embed_dims"]
    cfg.depths = variant["depths"]
    cfg.num_heads = COMMON["num_heads"]
    cfg.sr_ratios = COMMON["sr_ratios"]
    cfg.mlp_ratios = COMMON["mlp_ratios"]
    cfg.drop_path_rate = 0.1
    cfg.dtype = "float32"
    cfg.matmul_precision = "highest"
    if arch != "mit":
        cfg.decoder_embed_dim = 256
        cfg.decoder_depth = DECODER_DEPTHS[size]
        cfg.decoder_num_heads = 8
        cfg.num_classes = 124
        cfg.num_clips = 4
        cfg.dropout_ratio = 0.1
    if arch == "cffmpp":
        cfg.prototype_num_heads = 8
    for key, value in overrides.items():
        if key not in cfg:
            raise KeyError(f"Unknown model config field {key!r} for {name}; valid fields: {', '.join(cfg.keys())}")
        cfg[key] = tuple(value) if isinstance(value, list) else value
    return cfg


def effective_matmul_precision(config: ml_collections.ConfigDict, backend: str) -> str | None:
    """The ``matmul_precision`` the modules get on ``backend`` (None: XLA's default, no scope).

    The config's value for float32 models off CPU; None for bfloat16 models (their operands are bfloat16 already)
    and on XLA:CPU, whose float32 products are float32 at any setting (and whose YNNPACK fusions compile 'highest'
    products differently: leaving it off keeps CPU programs as they were measured).
    """
    from cffm_jax.models.layers import MATMUL_PRECISIONS

    precision = config.get("matmul_precision", "highest")
    if precision not in MATMUL_PRECISIONS:
        raise ValueError(f"model config matmul_precision={precision!r}; valid: {', '.join(MATMUL_PRECISIONS)}")
    if config.dtype != "float32" or backend == "cpu" or precision == "default":
        return None
    return precision


def build_model(config: ml_collections.ConfigDict):
    """The linen module for a config made by ``model_config``."""
    import jax
    import jax.numpy as jnp

    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[config.dtype]
    precision = effective_matmul_precision(config, jax.default_backend())
    backbone_kwargs = dict(
        embed_dims=tuple(config.embed_dims),
        depths=tuple(config.depths),
        num_heads=tuple(config.num_heads),
        sr_ratios=tuple(config.sr_ratios),
        mlp_ratios=tuple(config.mlp_ratios),
        drop_path_rate=config.drop_path_rate,
        dtype=dtype,
        matmul_precision=precision,
    )
    if config.arch == "mit":
        return MixVisionTransformer(**backbone_kwargs)
    if config.arch in ("cffm", "cffmpp"):
        from cffm_jax.models.cffm import CFFM, CFFMHead

        head = CFFMHead(
            embed_dim=config.decoder_embed_dim,
            decoder_depth=config.decoder_depth,
            decoder_num_heads=config.decoder_num_heads,
            num_classes=config.num_classes,
            num_clips=config.num_clips,
            dropout_ratio=config.dropout_ratio,
            use_prototypes=config.arch == "cffmpp",
            prototype_num_heads=config.get("prototype_num_heads", 8),
            dtype=dtype,
        )
        return CFFM(backbone=MixVisionTransformer(**backbone_kwargs), decode_head=head, matmul_precision=precision)
    raise ValueError(f"Unknown arch {config.arch!r}; valid: {', '.join(ARCHS)}")


# SPEC.md section 5: during CFFM++ fine-tuning only these parts of the head receive gradients.
CFFMPP_TRAINED = ("decoder_swin", "linear_pred3")


def trainable_mask(config, params):
    """A pytree of bools over ``params``: True for the parameters that training updates.

    Everything for MiT and CFFM; for CFFM++ only ``decode_head/decoder_swin`` and ``decode_head/linear_pred3``
    (the rest is frozen explicitly, not merely by zero gradients).
    """
    import flax.traverse_util as traverse_util

    flat = traverse_util.flatten_dict(params)
    if config.arch != "cffmpp":
        mask = {path: True for path in flat}
    else:
        mask = {path: len(path) > 1 and path[0] == "decode_head" and path[1] in CFFMPP_TRAINED for path in flat}
    return traverse_util.unflatten_dict(mask)


def example_inputs(config, batch: int = 1, size: tuple[int, int] = (64, 64)) -> tuple[tuple, dict]:
    """(args, kwargs) of a model call with zero inputs, for initialisation and shape inference."""
    import jax.numpy as jnp

    if config.arch == "mit":
        return (jnp.zeros((batch, *size, 3)),), {}
    kwargs = {"prototypes": jnp.zeros((batch, 4, config.decoder_embed_dim))} if config.arch == "cffmpp" else {}
    return (jnp.zeros((batch, config.num_clips, *size, 3)),), kwargs


# XLA options for compiling the init function on CPU: it runs once and trivially fast, while optimising its hundreds
# of random-number generators dominated start-up (a tiny CFFM++ on the 2-core CPU: 150 s -> 28 s).
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def init_variables(config, seed: int = 0) -> dict:
    """Freshly initialised variables ``{'params', 'batch_stats'}`` of a model, as numpy arrays.

    The key is a threefry key (``jax.random.key(seed, impl='threefry2x32')``), so the values do not depend on the
    backend, the sharding or a changed default PRNG implementation.
    """
    import jax
    import numpy as np

    from cffm_jax import xla_options

    model = build_model(config)
    args, kwargs = example_inputs(config)
    key = jax.random.key(seed, impl="threefry2x32")
    init = jax.jit(lambda key: model.init(key, *args, **kwargs))
    if jax.default_backend() == "cpu":
        options = _FAST_COMPILE
    else:
        options = xla_options.compiler_options("default", model.matmul_precision)
    variables = jax.tree.map(np.asarray, dict(init.lower(key).compile(compiler_options=options)(key)))
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}

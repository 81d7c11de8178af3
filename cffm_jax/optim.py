"""The optimiser of CFFM / CFFM++ training (SPEC.md section 9), compiled from the config in one place.

The official runs use PyTorch AdamW (betas 0.9/0.999, eps 1e-8, decoupled weight decay 0.01) with mmcv
parameter groups, a poly learning-rate decay (power 1, min_lr 0) by iteration and a 1500-iteration linear
warmup from ratio 1e-6; no gradient clipping.

Parameter groups. mmcv's ``custom_keys`` are tried in a fixed order and the **first** key that is a substring
of the full parameter name decides both multipliers of that parameter. The config holds this as an ordered
list of rules ``(regex, lr_mult, decay_mult)``, matched with ``re.search`` against the '/'-joined Flax path
(``backbone/block1_0/norm1/scale``, ``decode_head/linear_fuse/bn/bias``...). Our module names are the official
ones (only ``.0`` becomes ``_0`` and ``weight`` becomes ``kernel``/``scale``), so the official substrings
select exactly the same parameters on our paths::

    rules = (("pos_block", 1.0, 0.0), ("head", 10.0, 1.0), ("norm", 1.0, 0.0))   # CFFM; CFFM++: head x1

Parameters that no rule matches get (1, 1). Each group is a separate ``optax.adamw`` whose learning rate is
``base_lr * lr_mult * schedule`` and whose decoupled weight decay is ``weight_decay * decay_mult`` multiplied
by that learning rate, as PyTorch AdamW does (``p -= lr * wd * p``). Parameters outside ``trainable`` (CFFM++:
all but ``decode_head/decoder_swin`` and ``decode_head/linear_pred3``) get no update, no weight decay and no
optimiser state (``optax.set_to_zero``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.traverse_util as traverse_util
import jax.numpy as jnp
import optax

FROZEN = "frozen"
DEFAULT_GROUP = "default"

Rule = tuple[str, float, float]


@dataclasses.dataclass(frozen=True)
class ParamGroup:
    """What the rules decided for one parameter.

    Attributes:
      label: optimiser group (``rule<i>`` for the i-th rule, ``default`` when none matched, ``frozen``).
      lr_mult: learning-rate multiplier (0 when frozen).
      decay_mult: weight-decay multiplier (0 when frozen).
    """

    label: str
    lr_mult: float
    decay_mult: float


def lr_schedule(
    base_lr: float,
    total_steps: int,
    *,
    warmup_steps: int = 1500,
    warmup_ratio: float = 1e-6,
    power: float = 1.0,
    min_lr: float = 0.0,
) -> Callable[[Any], Any]:
    """The learning rate at iteration i (0-based), SPEC 9: mmcv poly decay with linear warmup.

    ``lr_i = (base - min_lr) * (1 - i / total_steps) ** power + min_lr``; for ``i < warmup_steps`` the applied
    rate is ``lr_i * (1 - (1 - i / warmup_steps) * (1 - warmup_ratio))``.

    Args:
      base_lr: base learning rate (group multipliers are applied on top).
      total_steps: ``max_iters`` of the poly decay.
      warmup_steps, warmup_ratio: linear warmup length and starting ratio (0 steps = no warmup).
      power, min_lr: poly decay parameters.
    Returns:
      a function of the step (int or int array) returning a float32 learning rate; jittable.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")

    def schedule(step):
        i = jnp.asarray(step, jnp.float32)
        remaining = jnp.clip((total_steps - i) / total_steps, 0.0, 1.0)  # 1 - i/max, exact for integer steps
        lr = (base_lr - min_lr) * remaining**power + min_lr
        if warmup_steps > 0:
            # 1 - (1 - i/w)(1 - ratio), written without the float32 cancellation of the literal form
            factor = warmup_ratio + (1.0 - warmup_ratio) * (i / warmup_steps)
            lr = jnp.where(i < warmup_steps, lr * factor, lr)
        return lr

    return schedule


def _path(key: tuple[str, ...]) -> str:
    return "/".join(str(k) for k in key)


def param_groups(
    params: Mapping[str, Any],
    rules: Sequence[Rule],
    trainable: Mapping[str, Any] | None = None,
) -> dict[str, ParamGroup]:
    """The group of every parameter: ``{'/'-joined path: ParamGroup}``.

    Args:
      params: parameter tree (arrays or ``jax.ShapeDtypeStruct``).
      rules: ordered ``(regex, lr_mult, decay_mult)``; the first ``re.search`` match wins.
      trainable: optional tree of bools over ``params`` (``cffm_jax.models.trainable_mask``); False = frozen.
    """
    compiled = [(re.compile(pattern), float(lr), float(wd)) for pattern, lr, wd in rules]
    flat_trainable = traverse_util.flatten_dict(trainable) if trainable is not None else None
    out = {}
    for key in traverse_util.flatten_dict(params):
        path = _path(key)
        if flat_trainable is not None and not flat_trainable[key]:
            out[path] = ParamGroup(FROZEN, 0.0, 0.0)
            continue
        for i, (pattern, lr, wd) in enumerate(compiled):
            if pattern.search(path):
                out[path] = ParamGroup(f"rule{i}", lr, wd)
                break
        else:
            out[path] = ParamGroup(DEFAULT_GROUP, 1.0, 1.0)
    return out


def make_optimizer(
    optim_config: Mapping[str, Any],
    params: Mapping[str, Any],
    total_steps: int,
    trainable: Mapping[str, Any] | None = None,
) -> tuple[optax.GradientTransformation, Callable[[Any], Any]]:
    """The AdamW optimiser with parameter groups and the schedule, from ``config.optim``.

    Args:
      optim_config: ``lr, weight_decay, b1, b2, eps, warmup_steps, warmup_ratio, power, min_lr, rules``.
      params: the parameter tree (shapes suffice).
      total_steps: iterations of the poly decay.
      trainable: optional tree of bools; False leaves are frozen.
    Returns:
      (transformation, schedule) where ``schedule(step)`` is the base learning rate at that step (for
      logging).
    """
    c = optim_config
    schedule = lr_schedule(
        c["lr"],
        total_steps,
        warmup_steps=c["warmup_steps"],
        warmup_ratio=c["warmup_ratio"],
        power=c["power"],
        min_lr=c["min_lr"],
    )
    groups = param_groups(params, c["rules"], trainable)
    transforms: dict[str, optax.GradientTransformation] = {}
    # A fixed order (not set order, which varies with the hash seed): the same program in every process.
    for group in sorted(set(groups.values()), key=lambda g: g.label):
        if group.label == FROZEN:
            transforms[FROZEN] = optax.set_to_zero()
            continue
        transforms[group.label] = optax.adamw(
            learning_rate=lambda step, m=group.lr_mult: m * schedule(step),
            b1=c["b1"],
            b2=c["b2"],
            eps=c["eps"],
            weight_decay=c["weight_decay"] * group.decay_mult,
        )
    labels = traverse_util.unflatten_dict({key: groups[_path(key)].label for key in traverse_util.flatten_dict(params)})
    return optax.multi_transform(transforms, labels), schedule

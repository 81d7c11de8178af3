r"""CFFM++ fine-tuning on VSPW (SPEC.md sections 5, 9): 40k iterations from a trained CFFM, with prototypes.

    python -m cffm_jax.train --config configs/cffm_vspw.py:b1                         # 1. CFFM
    python -m cffm_jax.prototypes --config configs/prototypes_vspw.py:b1              # 2. prototypes
    python -m cffm_jax.train --config configs/cffmpp_vspw.py:b1 \
        --config.init_from=runs/cffm_vspw_b1                                           # 3. CFFM++

Argument: the MiT size, b0 .. b5. Only ``decode_head/decoder_swin`` and ``decode_head/linear_pred3`` are
trained (``cffm_jax.models.trainable_mask``): the frozen parts get no update and no weight decay. lr 2e-4, the
head multiplier is 1; everything else as CFFM. ``init_from`` defaults to the CFFM run's workdir and
``data.prototypes_dir`` to where ``configs/prototypes_vspw.py`` writes.
"""

from cffm_jax import experiment_config


def get_config(arg: str | None = None):
    size = experiment_config.check_size(arg)
    config = experiment_config.base_config(f"cffmpp_{size}")
    config.workdir = f"runs/cffmpp_vspw_{size}"
    config.init_from = f"runs/cffm_vspw_{size}"
    config.data.prototypes_dir = f"prototypes/vspw_{size}"
    config.total_steps = 40_000
    config.optim = experiment_config.optim_config(lr=2e-4, head_lr_mult=1.0)
    return config

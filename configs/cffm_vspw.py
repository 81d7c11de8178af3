r"""CFFM on VSPW, the official setting (SPEC.md sections 1, 9, 10): 160k iterations, 480x480 crops, 8 clips.

    python -m cffm_jax.train --config configs/cffm_vspw.py:b1 \
        --config.init_from=pretrained/mit_b1.pth            # ImageNet MiT weights (the official start)

Argument: the MiT size, b0 | b1 | b2 | b5 (official; b3 | b4 also work, with b2's decoder depth). On fewer
than 8 accelerators keep the global batch with ``--config.grad_accum_steps`` (e.g. 4 on 2 GPUs; BatchNorm
statistics are then per micro-batch, see cffm_jax/train.py). The loss needs no memory option: at 480x480 crops
it works in blocks of pixels (cffm_jax/losses.py, ~0.6 GiB of temporaries for 8 clips on one device).
"""

from cffm_jax import experiment_config


def get_config(arg: str | None = None):
    size = experiment_config.check_size(arg)
    config = experiment_config.base_config(f"cffm_{size}")
    config.workdir = f"runs/cffm_vspw_{size}"
    return config

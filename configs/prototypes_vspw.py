r"""CFFM++ prototype generation on VSPW (SPEC.md section 6): k-means centres of a trained CFFM's features.

    python -m cffm_jax.prototypes --config configs/prototypes_vspw.py:b1 \
        [--config.init_from=runs/cffm_vspw_b1]

Argument: the MiT size, b0 .. b5. For every video of ``data.splits``: 10 frames
(``int((i + 0.5) * (n // 10))``), test transform at ``data.img_scale``, backbone + MLP decoder, features
bilinearly halved, k-means with ``prototypes.num_prototypes`` centres, ``prototypes.max_iter`` Lloyd
iterations, tolerance ``prototypes.tol``, random (seeded) initialisation; written to the store
``data.prototypes_dir`` that ``configs/cffmpp_vspw.py`` reads.
"""

import ml_collections

from cffm_jax import experiment_config
from cffm_jax.models import model_config


def get_config(arg: str | None = None):
    size = experiment_config.check_size(arg)
    config = ml_collections.ConfigDict()
    config.model = model_config(f"cffm_{size}")
    config.init_from = f"runs/cffm_vspw_{size}"
    config.workdir = f"runs/cffm_vspw_{size}"
    config.seed = 0
    config.data = ml_collections.ConfigDict()
    config.data.root = experiment_config.VSPW_ROOT
    config.data.synthetic = experiment_config.synthetic_config()
    config.data.splits = ("train", "val", "test")
    config.data.img_scale = (853, 480)
    config.data.prototypes_dir = f"prototypes/vspw_{size}"
    config.prototypes = ml_collections.ConfigDict(
        dict(num_prototypes=100, num_frames=10, max_iter=10, tol=1e-4, init="random")
    )
    config.progress = True
    return config

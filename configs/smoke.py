r"""Smoke test: a tiny CFFM, a few steps on a tiny synthetic dataset (used by the tests).

    python -m cffm_jax.train --config configs/smoke.py --workdir /tmp/smoke [--config.data.root=DIR]

Argument: 'cffm' (default) or 'cffmpp' (then set ``--config.init_from`` to a smoke CFFM run and
``--config.data.prototypes_dir``).
"""

from cffm_jax import experiment_config

TINY = dict(embed_dims=(8, 16, 40, 64), depths=(1, 1, 1, 1), decoder_embed_dim=32, num_classes=6)


def get_config(arg: str | None = None):
    arch = arg or "cffm"
    if arch not in ("cffm", "cffmpp"):
        raise ValueError(f"unknown smoke variant {arch!r}; valid: cffm, cffmpp")
    config = experiment_config.base_config(f"{arch}_b0", **TINY, drop_path_rate=0.0)
    config.workdir = f"runs/smoke_{arch}"
    config.data.root = ""
    config.data.synthetic = experiment_config.synthetic_config(
        videos=3, val_videos=1, test_videos=0, frames=12, size=(48, 64), num_classes=TINY["num_classes"]
    )
    config.data.crop_size = (32, 32)
    config.data.img_scale = (64, 48)
    config.data.num_workers = 0
    config.data.repeat = 1
    config.batch_size = 2
    config.total_steps = 6
    config.log_every = 1
    config.checkpoint_every = 2
    config.keep_checkpoints = 2
    config.eval_at_end = False
    config.progress = False
    config.optim = experiment_config.optim_config(lr=1e-3, head_lr_mult=10.0)
    config.optim.warmup_steps = 2
    if arch == "cffmpp":
        config.optim = experiment_config.optim_config(lr=1e-3, head_lr_mult=1.0)
        config.optim.warmup_steps = 2
    return config

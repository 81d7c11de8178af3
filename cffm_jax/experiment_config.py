"""Defaults shared by the experiment configs (the schema every config follows; SPEC.md sections 9 and 10).

``base_config(model_name, **model_overrides)`` returns the official CFFM-on-VSPW setting; the experiment files in
``configs/`` (``cffm_vspw.py``, ``cffmpp_vspw.py``, ``demo.py``, ``smoke.py``, ``prototypes_vspw.py``) override
what differs. It lives in the package, not next to them, so that a config file loads from any working directory,
and a copy of one (your own experiment, anywhere) too.
"""

from __future__ import annotations

import ml_collections

from cffm_jax.models import model_config

VSPW_ROOT = "data/vspw/VSPW_480p"
SIZES = ("b0", "b1", "b2", "b3", "b4", "b5")
OFFICIAL_SIZES = ("b0", "b1", "b2", "b5")  # sizes with an official config (b3/b4 follow b2's decoder depth)


class ConfigError(ValueError):
    """An experiment setting that cannot work; says which field to change (the command lines print it alone)."""


def config_error_message(error: BaseException) -> str:
    """What went wrong behind an error of absl / ml_collections loading a config file with its ``--config.<field>``
    overrides: the innermost exception's message (ml_collections wraps it in tracebacks), or for a mistyped field
    the field and ml_collections' suggestion."""
    messages = []
    while error is not None:
        messages.append(error.args[0] if error.args and isinstance(error.args[0], str) else str(error))
        error = error.__cause__ or error.__context__
    for message in messages:
        if "Did you mean" in message and "\n" in message:  # ml_collections' KeyError (the outer ones quote it)
            field, _, hint = message.partition("\n")
            return f"no config field {field} ({hint})"
    message = messages[-1].strip()
    if message.startswith("Failed loading config file"):  # ml_collections names the flag's module "config_config"
        message = "cannot load the --config file:\n" + message.partition("\n")[2]
    return message


def check_size(arg: str | None, default: str = "b1") -> str:
    """The MiT size of a config argument ('b0'..'b5'); raises :class:`ConfigError` listing the valid ones."""
    size = arg or default
    if size not in SIZES:
        raise ConfigError(
            f"unknown model size {size!r}; valid: {', '.join(SIZES)} (official: {', '.join(OFFICIAL_SIZES)})"
        )
    return size


def optim_config(lr: float, head_lr_mult: float) -> ml_collections.ConfigDict:
    """AdamW and schedule of SPEC 9; mmcv's parameter groups as ordered (regex, lr_mult, decay_mult).

    The rules are matched with ``re.search`` on the '/'-joined Flax path; the first match wins. The official
    substrings select the same parameters on our paths (module names are the official ones), so: ``pos_block``
    (matches nothing in MiT/CFFM) no decay; every ``decode_head`` parameter lr x ``head_lr_mult`` and full
    decay; backbone parameters with ``norm`` in the name no decay; everything else (1, 1).
    """
    return ml_collections.ConfigDict(
        dict(
            lr=lr,
            weight_decay=0.01,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            warmup_steps=1500,
            warmup_ratio=1e-6,
            power=1.0,
            min_lr=0.0,
            rules=(("pos_block", 1.0, 0.0), ("head", head_lr_mult, 1.0), ("norm", 1.0, 0.0)),
        )
    )


def synthetic_config(**overrides) -> ml_collections.ConfigDict:
    """Keyword arguments of ``cffm_jax.data.synthetic.generate`` (used when ``config.data.root`` is '')."""
    kwargs = dict(videos=8, val_videos=3, test_videos=2, frames=24, size=(120, 200), seed=0, num_classes=6)
    kwargs.update(overrides)
    return ml_collections.ConfigDict(kwargs)


def base_config(model_name: str, **model_overrides) -> ml_collections.ConfigDict:
    """The full experiment schema with the official CFFM VSPW values (SPEC 9, 10).

    Fields:
      model: ``cffm_jax.models.model_config`` (``dtype='bfloat16'`` for bfloat16 compute, float32 params;
        ``matmul_precision='default'`` lets XLA run float32 products on GPU TF32 units: faster, ~3e-3 off the
        official logits; the default 'highest' keeps them float32).
      workdir: run directory (checkpoints, metrics, config.json, model.json); ``--workdir`` overrides it.
      seed: initialisation, data order/augmentation and dropout seed.
      data.root: VSPW_480p folder or a prepared TFDS folder; '' = synthetic data generated into <workdir>/data
        with ``data.synthetic`` (then model.num_classes must equal data.synthetic.num_classes).
      data.train_split, data.val_split: split names.
      data.crop_size: (H, W) training crop; data.img_scale: (W, H) base scale of the train resize and the test
        rescale.
      data.num_workers: grain worker processes per host (0 = in-process).
      data.prototypes_dir: CFFM++ prototype store ('' for CFFM).
      data.repeat: copies of the video list per shuffle (the reference's RepeatDataset x50).
      data.skip_bad_videos: log and skip videos that fail to load instead of stopping.
      init_from: '' | raw .pth/.npz/.safetensors (official CFFM, ImageNet MiT, Hugging Face) | weights dir |
        training workdir | step dir. Used only when the workdir holds no checkpoint.
      batch_size: global clips per optimiser step (official: 4 GPUs x 2 = 8).
      grad_accum_steps: micro-batches per step (batch_size / grad_accum_steps must divide by the device
        count).
      total_steps, log_every, checkpoint_every, keep_checkpoints.
      eval_every: evaluate every N steps during training (0 = never during training), after saving a checkpoint.
      eval_at_end: evaluate the final model (and write sample predictions).
      eval_max_videos: 0 = all validation videos.
      optim: see ``optim_config``.
      loss: frame_weight, target_weight (SPEC 8: 0.5, 1.0); frames_per_chunk (0 = off: the blocked loss when the
        labels are the logits' size times powers of two; c > 0: resize, then cross entropy c frames at a time,
        see cffm_jax/losses.py).
      progress: show a progress bar.
    """
    config = ml_collections.ConfigDict()
    config.model = model_config(model_name, **model_overrides)
    config.workdir = ""
    config.seed = 0

    config.data = ml_collections.ConfigDict()
    config.data.root = VSPW_ROOT
    config.data.synthetic = synthetic_config()
    config.data.train_split = "train"
    config.data.val_split = "val"
    config.data.crop_size = (480, 480)
    config.data.img_scale = (853, 480)
    config.data.num_workers = 4
    config.data.prototypes_dir = ""
    config.data.repeat = 50
    config.data.skip_bad_videos = False

    config.init_from = ""
    config.batch_size = 8
    config.grad_accum_steps = 1
    config.total_steps = 160_000
    config.log_every = 50
    config.checkpoint_every = 4000
    config.keep_checkpoints = 3
    config.eval_every = 0
    config.eval_at_end = True
    config.eval_max_videos = 0

    config.optim = optim_config(lr=6e-5, head_lr_mult=10.0)
    config.loss = ml_collections.ConfigDict(dict(frame_weight=0.5, target_weight=1.0, frames_per_chunk=0))
    config.progress = True
    return config

"""Model variables on disk: converted weights, and loading any supported checkpoint for inference.

A *weights directory* (written by ``convert_torch_weights.py`` or ``save_variables``) holds

* ``model.json``: the model config (``cffm_jax.models.model_config`` fields) and free-form metadata;
* ``variables/``: an orbax checkpoint of ``{'params': ..., 'batch_stats': ...}``.

``load_for_inference(path)`` accepts a weights directory, a training workdir (its latest checkpoint; written by
``cffm_jax.train``), one step directory of a training run, or a raw PyTorch/npz/safetensors checkpoint (converted
on the fly; then ``model`` must name the architecture).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from cffm_jax.models import model_config

log = logging.getLogger(__name__)

MODEL_FILE = "model.json"
VARIABLES_DIR = "variables"


class CheckpointError(ValueError):
    """A checkpoint cannot be used: names the path and the problem."""


def config_to_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """A model config as plain JSON (tuples become lists)."""
    return json.loads(config.to_json())


def config_from_json(data: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """The inverse of ``config_to_json``: rebuilds the config through ``model_config`` (so unknown fields fail)."""
    data = dict(data)
    name = data.pop("name")
    data.pop("arch", None)
    return model_config(name, **{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def abstract_variables(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """``{'params', 'batch_stats'}`` as ``jax.ShapeDtypeStruct`` trees (restore targets), without allocating."""
    from cffm_jax.convert import model_shapes

    shapes = model_shapes(config)
    out: dict[str, Any] = {}
    for collection in ("params", "batch_stats"):
        tree: dict[str, Any] = {}
        for path, shape in shapes.get(collection, {}).items():
            node = tree
            for k in path[:-1]:
                node = node.setdefault(k, {})
            node[path[-1]] = jax.ShapeDtypeStruct(shape, np.float32)
        out[collection] = tree
    return out


def save_variables(
    path: str | os.PathLike,
    variables: Mapping[str, Any],
    config: ml_collections.ConfigDict,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Writes a weights directory. Written to ``<path>.tmp`` first and renamed, so a crash never leaves a
    directory that looks complete."""
    import orbax.checkpoint as ocp

    path = pathlib.Path(path).absolute()
    if path.exists():
        if not overwrite:
            raise FileExistsError(f"{path} already exists (pass overwrite=True / --overwrite to replace it)")
        shutil.rmtree(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    tree = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp / VARIABLES_DIR, tree)
    ckptr.wait_until_finished()
    (tmp / MODEL_FILE).write_text(
        json.dumps({"model": config_to_json(config), "metadata": dict(metadata or {})}, indent=2)
    )
    tmp.rename(path)
    return path


def read_model_file(path: str | os.PathLike) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
    """(model config, metadata) from a directory's ``model.json``."""
    file = pathlib.Path(path) / MODEL_FILE
    try:
        data = json.loads(file.read_text())
        return config_from_json(data["model"]), data.get("metadata", {})
    except FileNotFoundError as e:
        raise CheckpointError(f"{file} is missing: {path} is not a cffm-jax weights directory or workdir") from e
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{file} is not a valid model description: {e}") from e


def load_variables(path: str | os.PathLike) -> tuple[dict[str, Any], ml_collections.ConfigDict]:
    """(variables, model config) from a weights directory."""
    import orbax.checkpoint as ocp

    path = pathlib.Path(path).absolute()
    config, _ = read_model_file(path)
    target = abstract_variables(config)
    try:
        tree = ocp.StandardCheckpointer().restore(path / VARIABLES_DIR, target)
    except Exception as e:  # orbax raises a variety of errors for a tree that does not fit
        raise CheckpointError(f"{path / VARIABLES_DIR}: cannot restore variables for {config.name}: {e}") from e
    return dict(tree), config


def load_for_inference(
    path: str | os.PathLike, model: str | ml_collections.ConfigDict | None = None
) -> tuple[dict[str, Any], ml_collections.ConfigDict]:
    """(variables, model config) from any supported checkpoint (see the module docstring).

    Args:
      path: weights directory, training workdir or step directory, or a ``.pth``/``.pt``/``.npz``/
        ``.safetensors`` file.
      model: for raw files, the model name (e.g. ``'cffm_b1'``) or config; for directories, an optional
        expectation that is checked (name, number of classes).
    """
    path = pathlib.Path(path)
    expected = model_config(model) if isinstance(model, str) else model
    if path.is_file():
        if expected is None:
            raise CheckpointError(f"{path} is a raw checkpoint: say which model it holds (e.g. --model cffm_b1)")
        from cffm_jax.convert import convert_state_dict, load_state_dict

        return convert_state_dict(load_state_dict(path), expected), expected
    if not path.exists():
        raise CheckpointError(f"Checkpoint not found: {path}")
    if (path / VARIABLES_DIR).is_dir():
        variables, config = load_variables(path)
    else:
        from cffm_jax.train_state import load_training_checkpoint_for_inference

        variables, config = load_training_checkpoint_for_inference(path)
    if expected is not None:
        check_compatible(config, expected, path)
    return variables, config


def check_video_model(config: ml_collections.ConfigDict, path: str | os.PathLike) -> None:
    """Evaluation and prediction segment videos: the checkpoint at ``path`` must hold a CFFM or CFFM++ model, not
    e.g. an ImageNet MiT backbone (CheckpointError naming it)."""
    if config.arch not in ("cffm", "cffmpp"):
        raise CheckpointError(f"{path} holds a {config.name} model; video segmentation needs CFFM or CFFM++")


def trained_img_scale(path: str | os.PathLike) -> tuple[tuple[int, int], pathlib.Path] | None:
    """(``data.img_scale``, the file it is from) of the training run that wrote checkpoint ``path`` (see
    ``cffm_jax.train_state.run_data_setting``). None for other checkpoints.

    The scale a model was trained at is the one to test it at (its clips were cropped from frames rescaled to it):
    the evaluation, prediction and prototype commands take it as their default for such a checkpoint, instead of
    the official 853x480.
    """
    from cffm_jax.train_state import run_data_setting

    found = run_data_setting(path, "img_scale")
    try:
        return ((int(found[0][0]), int(found[0][1])), found[1]) if found else None
    except (TypeError, IndexError, ValueError):
        return None


def default_img_scale(
    given: Sequence[int] | None, config_scale: Sequence[int] | None, checkpoint: str | os.PathLike | None
) -> tuple[int, int]:
    """The test rescale bound (W, H) of the command-line tools, logged with where it comes from: the command
    line's, else the experiment config's, else the one the checkpoint's training run used
    (:func:`trained_img_scale`), else the official one."""
    from cffm_jax.data.transforms import IMG_SCALE

    trained = trained_img_scale(checkpoint) if checkpoint else None
    if given:
        scale, origin = tuple(given), "--img-scale"
    elif config_scale:
        scale, origin = tuple(config_scale), "config.data.img_scale"
    elif trained:
        scale, origin = trained[0], f"{trained[1]}: the scale the model was trained at"
    else:
        scale, origin = tuple(IMG_SCALE), "the official test scale"
    scale = (int(scale[0]), int(scale[1]))
    log.info("frames rescaled to fit %dx%d (%s)", *scale, origin)
    if trained and trained[0] != scale:
        log.warning(
            "the checkpoint was trained at img_scale %dx%d (%s), this run tests it at %dx%d",
            *trained[0],
            trained[1],
            *scale,
        )
    return scale


def warn_if_slow_dtype(config: ml_collections.ConfigDict) -> None:
    """A bfloat16 model on a CPU works but runs slower than float32 (1.5-1.7x on the development machine: XLA:CPU
    has no fast bfloat16 products there); say so once, where a user chose it (the command-line tools)."""
    if config.get("dtype") == "bfloat16" and jax.default_backend() == "cpu":
        log.warning(
            "model.dtype=bfloat16 on a CPU runs 1.5-1.7x slower than float32 (BENCHMARKS.md); it is meant for GPUs "
            "and TPUs"
        )


def check_compatible(found: ml_collections.ConfigDict, expected: ml_collections.ConfigDict, path) -> None:
    """Raises ``CheckpointError`` when a checkpoint's model differs from the expected one."""
    diffs = [
        f"{field}: checkpoint has {found.get(field)!r}, expected {expected.get(field)!r}"
        for field in sorted(set(found.keys()) | set(expected.keys()))
        if field not in ("drop_path_rate", "dtype", "dropout_ratio")
        and _norm(found.get(field)) != _norm(expected.get(field))
    ]
    if diffs:
        raise CheckpointError(f"{path} holds a different model than expected:\n  " + "\n  ".join(diffs))


def _norm(value):
    return tuple(value) if isinstance(value, list | tuple) else value

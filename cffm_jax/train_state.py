"""Training state, its checkpoints, and where the starting weights come from (SPEC.md sections 7 and 9).

A training workdir holds ``model.json`` (as a weights directory), ``config.json`` (the resolved experiment
config), ``metrics.jsonl`` and ``checkpoints/<step>/`` written by an orbax ``CheckpointManager`` with two
items:

* ``state``: the :class:`TrainState` pytree (step, params, batch_stats, optimiser state, RNG key data);
* ``data``: the grain iterator state, one ``process_<i>-of-<n>.json`` per process (grain's orbax handler).

Checkpoints are written asynchronously (the device-to-host copy happens before ``save`` returns, the file
writes in the background) and finalised atomically by orbax, so a run killed at any moment restarts from the
last complete checkpoint and, because the step RNG is ``fold_in(rng, step)`` and the data stream resumes at
the same item, continues exactly as the uninterrupted run would.

Starting weights (:func:`initial_variables`): fresh initialisation, then ``config.init_from`` on top (a raw
``.pth``/``.npz``/``.safetensors`` checkpoint converted with :mod:`cffm_jax.convert`, a weights directory, a
training workdir or a step directory); leaves that the source lacks (a fresh CFFM head on ImageNet MiT
weights, the CFFM++ prototype branch on a CFFM checkpoint) keep their fresh values and are logged.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import flax.struct
import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
STATE_ITEM = "state"
DATA_ITEM = "data"
CONFIG_FILE = "config.json"  # the run's resolved experiment config, written by cffm_jax.train

# Initialisation runs once, so an unoptimised compile is much cheaper overall: the threefry initialisation of
# even a tiny CFFM took 150 s to compile at the default level on a loaded 2-core CPU, 28 s with these options
# (the 'rbg' PRNG: 36 s / 19 s). Values are deterministic for a backend and these options.


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training.

    Attributes:
      step: () int32, number of optimiser updates done.
      params: parameter tree (float32).
      batch_stats: BatchNorm running statistics.
      opt_state: optax state.
      rng: uint32 key data of the run's root key (``jax.random.key_data``); step i uses ``fold_in(rng, i)``.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array

    @property
    def variables(self) -> dict[str, Any]:
        """``{'params', 'batch_stats'}`` for ``model.apply``."""
        return {"params": self.params, "batch_stats": self.batch_stats}

    def step_key(self) -> jax.Array:
        """The typed PRNG key of the current step (for dropout and stochastic depth)."""
        return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)


def create_train_state(variables: Mapping[str, Any], tx: optax.GradientTransformation, seed: int) -> TrainState:
    """A step-0 state from variables (call under ``jax.jit`` with ``out_shardings`` to place it)."""
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.key(seed, impl="threefry2x32")),
    )


# ----------------------------------------------------------------------------------------------------------
# init_from


def merge_variables(
    fresh: Mapping[str, Any], loaded: Mapping[str, Any], source: str = "init_from"
) -> tuple[dict[str, Any], list[str]]:
    """``fresh`` with every leaf that ``loaded`` has replaced by the loaded value.

    Returns (variables, paths kept fresh). Raises ``ValueError`` listing every shape mismatch and every loaded
    leaf that the model does not have (a checkpoint of another model).
    """
    flat_fresh = traverse_util.flatten_dict({c: fresh.get(c, {}) for c in ("params", "batch_stats")}, sep="/")
    flat_loaded = traverse_util.flatten_dict({c: loaded.get(c, {}) for c in ("params", "batch_stats")}, sep="/")
    problems = [
        f"{path}: {source} has shape {np.shape(flat_loaded[path])}, the model {np.shape(value)}"
        for path, value in flat_fresh.items()
        if path in flat_loaded and np.shape(flat_loaded[path]) != np.shape(value)
    ]
    problems += [f"{path}: not a variable of this model" for path in flat_loaded if path not in flat_fresh]
    if problems:
        from cffm_jax.checkpoint import CheckpointError

        raise CheckpointError(f"cannot initialise from {source}:\n  " + "\n  ".join(problems))
    kept = [path for path in flat_fresh if path not in flat_loaded]
    merged = {path: np.asarray(flat_loaded.get(path, value), np.float32) for path, value in flat_fresh.items()}
    out = traverse_util.unflatten_dict(merged, sep="/")
    return {"params": out.get("params", {}), "batch_stats": out.get("batch_stats", {})}, kept


def initial_variables(
    model_config: ml_collections.ConfigDict, init_from: str, fresh: Mapping[str, Any]
) -> dict[str, Any]:
    """The starting variables of a run: ``fresh``, overwritten by ``init_from`` when it is set.

    Args:
      model_config: the model being trained.
      init_from: '' | raw checkpoint file (``.pth``, ``.npz``, ``.safetensors``: official CFFM, ImageNet MiT,
        Hugging Face SegFormer) | weights directory | training workdir | step directory.
      fresh: freshly initialised variables of the model.
    """
    if not init_from:
        return dict(fresh)
    path = pathlib.Path(init_from)
    if not path.exists():
        raise FileNotFoundError(f"config.init_from={init_from!r} does not exist")
    if path.is_file():
        from cffm_jax.convert import convert_state_dict, load_state_dict

        variables = convert_state_dict(load_state_dict(path), model_config, init_variables=fresh)
        log.info("initialised from %s (converted)", path)
        return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    from cffm_jax.checkpoint import load_for_inference

    loaded, loaded_config = load_for_inference(path)
    variables, kept = merge_variables(fresh, loaded, source=str(path))
    log.info(
        "initialised from %s (%s); %d freshly initialised leaves%s",
        path,
        loaded_config.name,
        len(kept),
        f": {', '.join(kept[:8])}{' ...' if len(kept) > 8 else ''}" if kept else "",
    )
    return variables


# ----------------------------------------------------------------------------------------------------------
# Checkpoints


class _ReadOnlyNotice(logging.Filter):
    """Drops orbax's warning "Given directory is read only=...", which a read-only manager logs whatever the
    directory's permissions (reading a training workdir for evaluation or prediction is no cause for a warning)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Given directory is read only")


def checkpoint_manager(workdir: str | os.PathLike, keep: int, *, read_only: bool = False):
    """The orbax ``CheckpointManager`` of ``<workdir>/checkpoints`` (async saves, keeps the last ``keep``)."""
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep if keep > 0 and not read_only else None,
        save_interval_steps=0 if read_only else 1,
        enable_async_checkpointing=True,
        create=not read_only,
        read_only=read_only,
    )
    notice, absl_logger = _ReadOnlyNotice(), logging.getLogger("absl")
    absl_logger.addFilter(notice)
    try:
        return ocp.CheckpointManager(
            pathlib.Path(workdir).absolute() / CHECKPOINT_DIR, options=options, item_names=(STATE_ITEM, DATA_ITEM)
        )
    finally:
        absl_logger.removeFilter(notice)


def save_checkpoint(manager, state: TrainState, data_iterator) -> None:
    """Starts an asynchronous save of ``state`` and the iterator position at ``state.step``."""
    import grain
    import orbax.checkpoint as ocp

    step = int(jax.device_get(state.step))
    manager.save(
        step,
        args=ocp.args.Composite(
            **{
                STATE_ITEM: ocp.args.StandardSave(state),
                DATA_ITEM: grain.checkpoint.CheckpointSave(data_iterator),
            }
        ),
    )


def restore_state(manager, abstract_state: TrainState, step: int) -> TrainState:
    """The train state of checkpoint ``step`` alone, placed as ``abstract_state``'s shardings."""
    import orbax.checkpoint as ocp

    restored = manager.restore(step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(abstract_state)}))
    return restored[STATE_ITEM]


def variable_mismatches(step_dir: pathlib.Path, variables: Mapping[str, Any], limit: int = 5) -> list[str]:
    """How the parameters and BatchNorm statistics saved in ``step_dir`` differ from ``variables`` (shapes):
    ``[]`` when they fit. Read from the checkpoint's metadata, before any restore (orbax's failed restore of a
    tree that does not fit leaves its background tasks to print tracebacks at exit)."""
    import orbax.checkpoint as ocp

    metadata = ocp.PyTreeCheckpointHandler().metadata(step_dir / STATE_ITEM)
    tree = getattr(metadata, "tree", metadata)
    saved = {
        "/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_flatten_with_path({c: tree.get(c, {}) for c in ("params", "batch_stats")})[
            0
        ]
    }
    wanted = {
        name: tuple(leaf.shape)
        for name, leaf in traverse_util.flatten_dict(
            {c: variables.get(c, {}) for c in ("params", "batch_stats")}, sep="/"
        ).items()
    }
    missing = sorted(set(wanted) - set(saved))
    unexpected = sorted(set(saved) - set(wanted))
    shapes = [
        f"{n} {saved[n]} saved, {wanted[n]} now" for n in sorted(set(saved) & set(wanted)) if saved[n] != wanted[n]
    ]
    out = []
    for what, items in (("not in the checkpoint", missing), ("only in the checkpoint", unexpected), ("shape", shapes)):
        if items:
            more = f", ... ({len(items)} in all)" if len(items) > limit else ""
            out.append(f"{what}: " + ", ".join(items[:limit]) + more)
    return out


def restore_data_iterator(manager, data_iterator, step: int) -> None:
    """Sets ``data_iterator`` (freshly built) to the position saved with checkpoint ``step``.

    The saved state is grain's and holds one entry per data worker process: it fits only a pipeline with the
    ``data.num_workers`` it was saved with (grain raises otherwise).
    """
    import grain
    import orbax.checkpoint as ocp

    manager.restore(step, args=ocp.args.Composite(**{DATA_ITEM: grain.checkpoint.CheckpointRestore(data_iterator)}))


def training_workdir(path: str | os.PathLike) -> pathlib.Path | None:
    """The training workdir that ``path`` is (it has ``checkpoints/``) or holds as one of its step directories;
    None for any other path."""
    path = pathlib.Path(path)
    if (path / CHECKPOINT_DIR).is_dir():
        return path
    if (path / STATE_ITEM).is_dir() and path.parent.name == CHECKPOINT_DIR:
        return path.parent.parent
    return None


def run_data_setting(path: str | os.PathLike, key: str) -> tuple[Any, pathlib.Path] | None:
    """(``data.<key>`` of the run's ``config.json``, that file) for a training workdir or one of its step
    directories; None for other checkpoints, or when the file or the key is missing."""
    workdir = training_workdir(path)
    if workdir is None:
        return None
    file = workdir / CONFIG_FILE
    try:
        return json.loads(file.read_text())["data"][key], file
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _step_dir_of(path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """(workdir, step directory) for a training workdir (its latest checkpoint) or a step directory."""
    workdir = training_workdir(path)
    if workdir is None:
        raise FileNotFoundError(
            f"{path} is neither a training workdir (with {CHECKPOINT_DIR}/) nor one of its step directories"
        )
    if workdir != path:
        return workdir, path
    manager = checkpoint_manager(path, keep=0, read_only=True)
    step = manager.latest_step()
    manager.close()
    if step is None:
        raise FileNotFoundError(f"{path / CHECKPOINT_DIR} holds no finished checkpoint")
    return path, path / CHECKPOINT_DIR / str(step)


def load_training_checkpoint_for_inference(
    path: str | os.PathLike,
) -> tuple[dict[str, Any], ml_collections.ConfigDict]:
    """(variables ``{'params', 'batch_stats'}`` as numpy, model config) of a training workdir or step dir.

    Only the parameters and BatchNorm statistics are read (not the optimiser state).
    """
    import orbax.checkpoint as ocp

    from cffm_jax.checkpoint import CheckpointError, abstract_variables, read_model_file

    workdir, step_dir = _step_dir_of(pathlib.Path(path).absolute())
    config, _ = read_model_file(workdir)
    target = abstract_variables(config)
    target = {k: v for k, v in target.items() if k == "params" or v}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    try:
        tree = ocp.PyTreeCheckpointer().restore(
            step_dir / STATE_ITEM,
            args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True),
        )
    except Exception as e:  # orbax raises many kinds of errors for a tree that does not fit
        raise CheckpointError(f"{step_dir}: cannot restore the variables of {config.name}: {e}") from e
    return {"params": tree["params"], "batch_stats": tree.get("batch_stats", {})}, config

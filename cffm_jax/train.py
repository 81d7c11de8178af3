r"""Training of CFFM / CFFM++ (SPEC.md sections 5, 7, 8, 9 and 10).

    python -m cffm_jax.train --config configs/demo.py                 # synthetic data, CPU minutes
    python -m cffm_jax.train --config configs/cffm_vspw.py:b1 [--config.batch_size=8 ...] [--workdir runs/x]
    python -m cffm_jax.train --config configs/cffmpp_vspw.py:b1 --config.init_from=runs/cffm_vspw_b1

Multi-host: start one process per host with ``--coordinator_address=host0:port --num_processes=N
--process_id=i`` (or nothing where the platform tells JAX, e.g. SLURM, Cloud TPU pods).

:func:`train_and_evaluate` reads top to bottom: workdir and config files, mesh and batch sizes, data, model
and optimiser shapes, the update step, resume (workdir checkpoint > ``config.init_from`` > scratch), the loop
(progress, metrics, NaN/Inf stop, checkpoints, periodic evaluation, stop on SIGTERM / Ctrl-C), the final evaluation.

SIGTERM (a scheduler's preemption or time-limit notice) or Ctrl-C ends the run after the step in flight with a
checkpoint of that step, and the command exits with status 128 + the signal's number (143, 130); the same
command resumes it (:mod:`cffm_jax.preemption`; on several processes any one's SIGTERM stops them all at one step).

The update step (:func:`train_step`) is one ``jax.jit`` over a ``('data',)`` mesh of all devices: the batch is
sharded along its first axis, the state replicated and donated. BatchNorm statistics are therefore computed
over the global batch (the official SyncBN). With ``grad_accum_steps = n > 1`` the global batch is split into
n micro-batches that run one after the other (``lax.scan``); gradients and the loss are averaged, which equals
the large batch exactly except for BatchNorm: ``linear_fuse``'s batch statistics are then those of each
micro-batch (the official SyncBN saw all 8 clips at once) and its running statistics are updated n times per
step. CFFM++ is unaffected (its ``linear_fuse`` always uses running statistics).

Metrics (process 0): ``<workdir>/metrics.jsonl`` (one row per logged step: ``step`` = number of updates done,
``loss`` of that update, ``lr`` = base learning rate used by it (groups scale it), ``ce_frames``, ``ce_target``,
``acc_seg``, ``grad_norm``, ``steps_per_sec``, ``data_wait`` = the fraction of the wall time since the previous row
that the loop waited for its next batch, the input pipeline's share of the time: raise ``data.num_workers`` when it
is large; evaluation rows with ``miou``, ``mvc8``, ...), TensorBoard scalars in ``<workdir>/tensorboard``,
``config.json`` and ``model.json``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import pathlib
import shutil
import signal
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from cffm_jax import compilation_cache, host_memory, preemption, xla_options
from cffm_jax import sharding as shd
from cffm_jax import train_state as ts
from cffm_jax.checkpoint import MODEL_FILE, CheckpointError, warn_if_slow_dtype
from cffm_jax.convert import ConversionError
from cffm_jax.data.vspw import DatasetError
from cffm_jax.evaluate import evaluate_videos
from cffm_jax.experiment_config import ConfigError, config_error_message
from cffm_jax.logging_utils import InterruptUntilCaught
from cffm_jax.losses import segmentation_loss
from cffm_jax.models import build_model, init_variables, trainable_mask
from cffm_jax.models.layers import matmul_precision_scope
from cffm_jax.optim import make_optimizer

log = logging.getLogger(__name__)

CONFIG_FILE = ts.CONFIG_FILE
DATA_DIR = "data"
MODEL_INPUTS = ("clips", "labels", "prototypes")  # the batch entries the update step uses


@dataclasses.dataclass
class TrainResult:
    """What :func:`train_and_evaluate` returns.

    Attributes:
      state: the final train state (replicated global arrays).
      eval_metrics: the final evaluation's metrics, or None when it did not run.
      workdir: the run's directory.
      checkpoint: the directory of the last checkpoint.
      data_root: the dataset that was used.
      predictions_dir: where the final evaluation wrote sample predictions (or None).
      stopped_by: the signal that ended the run early with a checkpoint (``preemption``), or None.
    """

    state: ts.TrainState
    eval_metrics: dict[str, Any] | None
    workdir: pathlib.Path
    checkpoint: pathlib.Path | None
    data_root: str
    predictions_dir: pathlib.Path | None
    stopped_by: signal.Signals | None = None


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or Inf; names the step."""


# What the command line reports as ``error: <message>``: a setting, dataset or starting checkpoint to fix (their
# messages name the field, file or key at fault), a missing file, a diverged run.
USER_ERRORS = (ConfigError, DatasetError, CheckpointError, ConversionError, FileNotFoundError, NonFiniteLossError)


# ----------------------------------------------------------------------------------------------------------
# Loss and update step


def training_loss(
    logits: jax.Array, labels: jax.Array, loss_config: Mapping[str, Any]
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """SPEC 8 loss of the head's training output (B, T+1, h, w, K) against labels (B, T, H, W)."""
    chunk = loss_config.get("frames_per_chunk", 0)
    return segmentation_loss(
        logits,
        labels,
        frame_weight=loss_config.get("frame_weight", 0.5),
        target_weight=loss_config.get("target_weight", 1.0),
        frames_per_chunk=chunk or None,
    )


def loss_fn(
    params: Any,
    batch_stats: Any,
    batch: Mapping[str, jax.Array],
    key: jax.Array,
    *,
    model: Any,
    loss_config: Mapping[str, Any],
) -> tuple[jax.Array, tuple[dict[str, jax.Array], Any]]:
    """Loss of one (micro-)batch in training mode -> (loss, (aux metrics, updated batch_stats))."""
    logits, updates = model.apply(
        {"params": params, "batch_stats": batch_stats},
        batch["clips"],
        train=True,
        prototypes=batch.get("prototypes"),
        rngs={"dropout": key},
        mutable=["batch_stats"],
    )
    with jax.named_scope("loss"):  # names the loss's operations in profiles (cffm_jax.op_profile)
        loss, aux = training_loss(logits, batch["labels"], loss_config)
    return loss, (aux, updates.get("batch_stats", batch_stats))


def compute_grads(
    params: Any,
    batch_stats: Any,
    batch: Mapping[str, jax.Array],
    key: jax.Array,
    *,
    model: Any,
    loss_config: Mapping[str, Any],
    grad_accum_steps: int = 1,
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[jax.Array, dict[str, jax.Array], Any, Any]:
    """(loss, aux, grads, new batch_stats) of a global batch, averaged over the micro-batches.

    Micro-batch i holds the clips ``i, i + n, i + 2n, ...`` of the batch (n = ``grad_accum_steps``), so each
    device keeps its own rows (no communication) when the batch is sharded over ``mesh``; micro-batch i uses
    the key ``fold_in(key, i)``; BatchNorm running statistics are threaded through the micro-batches in order.
    The gradient is taken in the model's ``matmul_precision`` scope (``cffm_jax.models.layers``): the model sets it
    around its forward pass, and this extends it to the backward pass (custom gradients are traced after the
    forward's scope has closed).
    """
    value_and_grad = jax.value_and_grad(functools.partial(loss_fn, model=model, loss_config=loss_config), has_aux=True)

    def grad_fn(*args):  # the backward pass in the model's precision scope too
        with matmul_precision_scope(model.matmul_precision):
            return value_and_grad(*args)

    if grad_accum_steps == 1:
        (loss, (aux, new_stats)), grads = grad_fn(params, batch_stats, batch, key)
        return loss, aux, grads, new_stats
    n = grad_accum_steps

    def split(x):
        x = x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
        if mesh is not None:
            x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(None, shd.DATA_AXIS)))
        return x

    micro = jax.tree.map(split, dict(batch))

    def body(carry, inputs):
        stats, grad_sum, loss_sum, aux_sum = carry
        i, mb = inputs
        (loss, (aux, stats)), grads = grad_fn(params, stats, mb, jax.random.fold_in(key, i))
        grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
        aux_sum = jax.tree.map(jnp.add, aux_sum, aux)
        return (stats, grad_sum, loss_sum + loss, aux_sum), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    aux0 = {k: jnp.zeros((), jnp.float32) for k in ("ce_frames", "ce_target", "acc_seg")}
    init = (batch_stats, zeros, jnp.zeros((), jnp.float32), aux0)
    (stats, grad_sum, loss_sum, aux_sum), _ = jax.lax.scan(body, init, (jnp.arange(n), micro))
    scale = 1.0 / n
    return (
        loss_sum * scale,
        jax.tree.map(lambda a: a * scale, aux_sum),
        jax.tree.map(lambda g: g * scale, grad_sum),
        stats,
    )


def train_step(
    state: ts.TrainState,
    batch: Mapping[str, jax.Array],
    *,
    model: Any,
    tx: optax.GradientTransformation,
    schedule: Callable[[Any], Any],
    loss_config: Mapping[str, Any],
    grad_accum_steps: int = 1,
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[ts.TrainState, dict[str, jax.Array]]:
    """One optimiser update on a global batch -> (new state, scalar metrics of this update)."""
    loss, aux, grads, new_stats = compute_grads(
        state.params,
        state.batch_stats,
        batch,
        state.step_key(),
        model=model,
        loss_config=loss_config,
        grad_accum_steps=grad_accum_steps,
        mesh=mesh,
    )
    with jax.named_scope("optimizer"):
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "lr": schedule(state.step), "grad_norm": optax.global_norm(grads), **aux}
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=new_stats, opt_state=opt_state)
    return new_state, metrics


# ----------------------------------------------------------------------------------------------------------
# Helpers of the main function


def resolve_data_root(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> str:
    """``config.data.root``, or the synthetic dataset in ``<workdir>/data`` (generated once, by process 0).

    Generation writes to a temporary folder renamed at the end, so an interrupted run never leaves a partial
    dataset that looks complete.
    """
    if config.data.root:
        return config.data.root
    root = workdir / DATA_DIR
    if jax.process_index() == 0 and not (root / "train.txt").exists():
        from cffm_jax.data import synthetic

        tmp = workdir / (DATA_DIR + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        log.info("generating the synthetic dataset into %s", root)
        synthetic.generate(str(tmp), **config.data.synthetic.to_dict())
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
    _barrier("synthetic_data")
    return str(root)


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def check_config(config: ml_collections.ConfigDict) -> None:
    """Consistency checks that would otherwise fail late or silently."""
    if not config.data.root and config.model.num_classes != config.data.synthetic.num_classes:
        raise ConfigError(
            f"synthetic data has {config.data.synthetic.num_classes} classes but config.model.num_classes="
            f"{config.model.num_classes}"
        )
    if config.model.arch == "cffmpp" and not config.data.prototypes_dir:
        raise ConfigError("CFFM++ trains with per-video prototypes: set config.data.prototypes_dir")
    if config.total_steps <= 0:
        raise ConfigError(f"config.total_steps must be positive, got {config.total_steps}")
    for field, order in (("crop_size", "(H, W)"), ("img_scale", "(W, H)")):
        value = config.data[field]
        if len(value) != 2 or not all(isinstance(v, int) and v > 0 for v in value):
            raise ConfigError(f"config.data.{field} must be two positive integers {order}, got {tuple(value)}")
    if config.batch_size <= 0:
        raise ConfigError(f"config.batch_size must be positive, got {config.batch_size}")


def write_run_files(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    """``config.json`` (resolved experiment config) and ``model.json`` (as in a weights directory)."""
    from cffm_jax.checkpoint import config_to_json

    (workdir / CONFIG_FILE).write_text(config.to_json(indent=2) + "\n")
    meta = {"source": "cffm_jax.train", "workdir": str(workdir)}
    (workdir / MODEL_FILE).write_text(json.dumps({"model": config_to_json(config.model), "metadata": meta}, indent=2))


def run_evaluation(
    config: ml_collections.ConfigDict,
    variables: Mapping[str, Any],
    data_root: str,
    predictions_dir: pathlib.Path | None = None,
    saved: pathlib.Path | None = None,
) -> dict[str, Any] | None:
    """Evaluation on ``config.data.val_split`` (every process scores a share of the videos; pooled metrics).

    ``saved``: the checkpoint of the evaluated state, named in the message of a dataset error (a corrupt validation
    frame is found only here, possibly after the whole training run: nothing of it is lost).
    """
    prototypes = None
    if config.data.prototypes_dir:
        from cffm_jax.prototype_store import PrototypeStore

        prototypes = PrototypeStore(config.data.prototypes_dir)
    try:
        return evaluate_videos(
            config.model,
            shd.to_host(dict(variables)),
            data_root,
            split=config.data.val_split,
            img_scale=tuple(config.data.img_scale),
            prototypes=prototypes,
            max_videos=config.eval_max_videos,
            predictions_dir=None if predictions_dir is None else str(predictions_dir),
            progress=config.progress,
            overwrite=True,
        )
    except DatasetError as e:
        if saved is None:
            raise
        raise DatasetError(
            f"{e}\n(while evaluating; the training state is saved in {saved}: fix the data, `python -m "
            f"cffm_jax.data.validate {data_root} --split {config.data.val_split}` lists every problem, and run the "
            "same command again: it resumes from there)"
        ) from e


#: ``data_wait`` above which training on an accelerator says to add data workers (once per run).
DATA_WAIT_ADVICE = 0.2


def data_wait_advice(data_wait: float, backend: str, num_workers: int) -> str | None:
    """What to do when the loop waited ``data_wait`` of its time for batches; None when that is fine.

    Only on accelerators: on a CPU the data workers and XLA share the cores, and more workers take cores from
    the update step.
    """
    if backend == "cpu" or data_wait <= DATA_WAIT_ADVICE:
        return None
    return (
        f"the {backend.upper()}s waited for training data {100 * data_wait:.0f}% of the time: raise "
        f"--config.data.num_workers (now {num_workers}; each worker process prepares ~16 480x480 clips/s from "
        "VSPW frames on one core) up to the host's spare cores"
    )


def _eval_row(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The scalar entries of an evaluation result (for metrics.jsonl / TensorBoard; no per-class lists)."""
    return {k: v for k, v in metrics.items() if isinstance(v, int | float | np.floating | np.integer)}


# ----------------------------------------------------------------------------------------------------------
# Main


def _model_changes(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> list[str]:
    """The model fields that differ from the workdir's ``model.json`` (the run that made its checkpoints)."""
    from cffm_jax.checkpoint import config_to_json

    try:
        saved = json.loads((workdir / MODEL_FILE).read_text())["model"]
    except (OSError, ValueError, KeyError):
        return []
    now = config_to_json(config.model)
    return [
        f"model.{key}: {saved.get(key, '(unset)')!r} in the workdir, {now.get(key, '(unset)')!r} now"
        for key in sorted(set(saved) | set(now))
        if saved.get(key) != now.get(key)
    ]


def _resume(manager, abstract_state, data_iterator: Callable[[int], Any], config, workdir: pathlib.Path) -> tuple:
    """(train state, training data iterator) of the workdir's latest checkpoint.

    A state that does not fit the configured model is a :class:`ConfigError` naming the model fields that changed
    (before the run files are rewritten: the workdir keeps describing its checkpoints). The data stream does not
    depend on ``data.num_workers`` but grain's saved iterator state does; when it does not fit (the worker count
    changed), the stream restarts at the checkpoint's batch (one batch per step), which is the same position.
    """
    from cffm_jax.data.pipeline import close_train_iterator

    step = manager.latest_step()
    where = workdir / ts.CHECKPOINT_DIR / str(step)
    mismatches = ts.variable_mismatches(
        where, {"params": abstract_state.params, "batch_stats": abstract_state.batch_stats}
    )
    if mismatches:
        manager.close()
        raise ConfigError(
            f"cannot resume from {where}: its variables do not fit the configured model ("
            + "; ".join(_model_changes(config, workdir) or mismatches)
            + f"). Resume with the settings the run was started with (in {workdir / CONFIG_FILE}), or train in "
            "another --workdir."
        )
    state = ts.restore_state(manager, abstract_state, step)
    train_iter = data_iterator(0)
    try:
        ts.restore_data_iterator(manager, train_iter, step)
    except Exception as err:  # grain's own errors (IndexError, KeyError, ...) for a state of another layout
        close_train_iterator(train_iter)
        batches = int(jax.device_get(state.step))
        log.warning(
            "the data-iterator state saved in %s does not fit this pipeline (data.num_workers=%d; %s: %s); the data "
            "stream continues at batch %d, where the run left it (the batches do not depend on the worker count)",
            where,
            config.data.num_workers,
            type(err).__name__,
            err,
            batches,
        )
        train_iter = data_iterator(batches)
    log.info("resumed from %s at step %d", workdir / ts.CHECKPOINT_DIR, int(state.step))
    return state, train_iter


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> TrainResult:
    """Trains (resuming whatever ``workdir`` holds), evaluates, returns the final state and metrics."""
    from tqdm import tqdm

    from cffm_jax.data.pipeline import close_train_iterator, make_train_iterator
    from cffm_jax.logging_utils import MetricWriter

    # --- Workdir and run files ------------------------------------------------------------------------------
    check_config(config)
    warn_if_slow_dtype(config.model)
    workdir = pathlib.Path(workdir).absolute()
    is_main = jax.process_index() == 0
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)  # the run files are written once the state fits (below)
    _barrier("workdir")

    # --- Mesh and batch sizes -------------------------------------------------------------------------------
    mesh = shd.make_mesh()
    local_batch = shd.check_batch_size(config.batch_size, config.grad_accum_steps, mesh)
    log.info(
        "%d devices (%d processes), global batch %d clips = %d micro-batches of %d; %d clips per process",
        mesh.devices.size,
        jax.process_count(),
        config.batch_size,
        config.grad_accum_steps,
        config.batch_size // config.grad_accum_steps,
        local_batch,
    )

    # --- Data -----------------------------------------------------------------------------------------------
    data_root = resolve_data_root(config, workdir)
    prototype_lookup = None
    if config.data.prototypes_dir:
        from cffm_jax.prototype_store import PrototypeStore

        prototype_lookup = PrototypeStore(config.data.prototypes_dir)

    def data_iterator(start_batch: int = 0):
        return make_train_iterator(
            data_root,
            split=config.data.train_split,
            batch_size=local_batch,
            crop_size=tuple(config.data.crop_size),
            seed=config.seed,
            num_workers=config.data.num_workers,
            shard_index=jax.process_index(),
            shard_count=jax.process_count(),
            prototype_lookup=prototype_lookup,
            repeat=config.data.repeat,
            skip_bad_videos=config.data.skip_bad_videos,
            num_classes=config.model.num_classes,
            transform_kwargs={"img_scale": tuple(config.data.img_scale)},
            start_batch=start_batch,
        )

    # --- Model, optimiser and state shapes ------------------------------------------------------------------
    model = build_model(config.model)
    t0 = time.time()
    fresh = init_variables(config.model, config.seed)
    log.info("initialised %s in %.1f s", config.model.name, time.time() - t0)
    tx, schedule = make_optimizer(
        config.optim, fresh["params"], config.total_steps, trainable_mask(config.model, fresh["params"])
    )
    abstract_state = jax.eval_shape(functools.partial(ts.create_train_state, tx=tx, seed=config.seed), fresh)
    repl = shd.replicated(mesh)
    state_sharding = jax.tree.map(lambda _: repl, abstract_state)
    abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, state_sharding
    )

    # --- Update step ----------------------------------------------------------------------------------------
    step_fn = jax.jit(
        functools.partial(
            train_step,
            model=model,
            tx=tx,
            schedule=schedule,
            loss_config=config.loss.to_dict(),
            grad_accum_steps=config.grad_accum_steps,
            mesh=mesh,
        ),
        in_shardings=(state_sharding, shd.batch_sharding(mesh)),
        out_shardings=(state_sharding, repl),
        donate_argnums=0,
        compiler_options=xla_options.compiler_options("default", model.matmul_precision),
    )

    # --- Resume: workdir checkpoint > config.init_from > scratch --------------------------------------------
    manager = ts.checkpoint_manager(workdir, config.keep_checkpoints)
    if manager.latest_step() is not None:
        state, train_iter = _resume(manager, abstract_state, data_iterator, config, workdir)
    else:
        if config.model.arch == "cffmpp" and not config.init_from:
            raise ConfigError("CFFM++ fine-tunes a trained CFFM: set --config.init_from (e.g. runs/cffm_vspw_b1)")
        variables = ts.initial_variables(config.model, config.init_from, fresh)
        state = jax.jit(
            functools.partial(ts.create_train_state, tx=tx, seed=config.seed), out_shardings=state_sharding
        )(variables)
        train_iter = data_iterator()
    del fresh
    if is_main:
        write_run_files(config, workdir)
    start_step = int(state.step)
    log.info("train state ready at step %d (%.1f s after initialisation)", start_step, time.time() - t0)

    # --- Training loop --------------------------------------------------------------------------------------
    complete = start_step >= config.total_steps  # a rerun of a finished run: only its final evaluation runs again
    writer = MetricWriter(
        workdir, enabled=is_main, resume_step=start_step, redo_key="miou" if complete and config.eval_at_end else None
    )
    bar = tqdm(
        total=config.total_steps,
        initial=start_step,
        disable=not (is_main and config.progress),
        desc="train",
        dynamic_ncols=True,
    )
    pending = None  # (step, metrics) of the previous update, fetched after the next one is dispatched
    last_time, last_step = time.time(), start_step
    data_wait_s, advised = 0.0, False  # time blocked on the next batch since the last row; advice given
    if complete:
        log.info(
            "the run is complete (step %d of total_steps=%d)%s",
            start_step,
            config.total_steps,
            "; its final evaluation runs again" if config.eval_at_end else "",
        )
    else:
        cache = jax.config.jax_compilation_cache_dir
        log.info(
            "compiling the training step (this can take minutes, e.g. on a GPU at float32 'highest'; %s)",
            f"kept in the compilation cache {cache} for later runs" if cache else "compilation cache off",
        )

    def finish(step: int, metrics: Mapping[str, jax.Array]) -> None:
        nonlocal last_time, last_step, data_wait_s, advised
        values = {k: float(v) for k, v in jax.device_get(dict(metrics)).items()}
        if not np.isfinite(values["loss"]):
            raise NonFiniteLossError(
                f"loss is {values['loss']} at step {step} (lr {values['lr']:.3g}); stopping. The last "
                f"checkpoint is {manager.latest_step()} in {workdir / ts.CHECKPOINT_DIR}"
            )
        bar.update(step - bar.n)
        bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}", refresh=False)
        if step % config.log_every == 0 or step in (1, config.total_steps):
            now = time.time()
            values["steps_per_sec"] = (step - last_step) / max(now - last_time, 1e-9)
            values["data_wait"] = min(data_wait_s / max(now - last_time, 1e-9), 1.0)
            if not advised and last_step > start_step + 1:  # not over the compilation's interval
                advice = data_wait_advice(values["data_wait"], jax.default_backend(), config.data.num_workers)
                if advice:
                    log.warning(advice)
                    advised = True
            last_time, last_step, data_wait_s = now, step, 0.0
            writer.write(step, values)

    stop = preemption.StopSignals()
    with stop:
        try:
            for step in range(start_step + 1, config.total_steps + 1):
                waited = time.perf_counter()
                host_batch = next(train_iter)
                data_wait_s += time.perf_counter() - waited
                batch = shd.global_batch({k: v for k, v in host_batch.items() if k in MODEL_INPUTS}, mesh)
                state, metrics = step_fn(state, batch)
                if pending is not None:
                    finish(*pending)
                elif step == start_step + 1:
                    jax.block_until_ready(metrics)
                    log.info("first step (with compilation) done %.1f s after initialisation", time.time() - t0)
                pending = (step, metrics)
                stopping = stop.requested(step)  # every step, on every process (they agree on the step)
                evaluating = config.eval_every > 0 and step % config.eval_every == 0 and step != config.total_steps
                # a checkpoint before each evaluation too: a job killed while it runs loses no training
                if stopping or evaluating or step % config.checkpoint_every == 0 or step == config.total_steps:
                    finish(*pending)
                    pending = None
                    ts.save_checkpoint(manager, state, train_iter)
                if stopping:
                    log.warning(
                        "stopped by %s after step %d: checkpoint in %s; run the same command to resume",
                        stop.signal.name,
                        step,
                        workdir / ts.CHECKPOINT_DIR / str(step),
                    )
                    break
                if evaluating:
                    metrics_eval = run_evaluation(
                        config, state.variables, data_root, saved=workdir / ts.CHECKPOINT_DIR / str(step)
                    )
                    if metrics_eval is not None:
                        writer.write(step, _eval_row(metrics_eval))
                        log.info("step %d: mIoU %.2f", step, metrics_eval["miou"])
                    _barrier(f"eval_{step}")
            if pending is not None:
                finish(*pending)
        finally:
            bar.close()
            manager.wait_until_finished()
            batch = host_batch = None  # on CPU the last batch's arrays may alias the data workers' shared memory
            close_train_iterator(train_iter)

    # --- Final evaluation -----------------------------------------------------------------------------------
    eval_metrics, predictions_dir = None, None
    if config.eval_at_end and stop.signal is None:
        predictions_dir = workdir / "predictions"
        saved = workdir / ts.CHECKPOINT_DIR / str(int(state.step))
        eval_metrics = run_evaluation(config, state.variables, data_root, predictions_dir, saved=saved)
        if eval_metrics is not None:
            writer.write(int(state.step), _eval_row(eval_metrics))
        else:
            predictions_dir = None
        _barrier("final_eval")
    writer.close()
    latest = manager.latest_step()
    manager.close()
    return TrainResult(
        state=state,
        eval_metrics=eval_metrics,
        workdir=workdir,
        checkpoint=None if latest is None else workdir / ts.CHECKPOINT_DIR / str(latest),
        data_root=data_root,
        predictions_dir=predictions_dir,
        stopped_by=stop.signal,
    )


def _run(argv: list[str], flags_) -> TrainResult:
    """The CLI's run: checks, distributed start-up, :func:`train_and_evaluate`."""
    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments: {argv[1:]}")
    host_memory.retain_freed_memory()  # before jax starts its threads
    compilation_cache.enable()
    shd.initialize_distributed(flags_.coordinator_address, flags_.num_processes, flags_.process_id)
    config = flags_.config
    workdir = flags_.workdir or config.workdir
    if not workdir:
        raise ConfigError("no workdir: set --workdir or config.workdir")
    with config.unlocked():
        config.workdir = workdir
    return train_and_evaluate(config, workdir)


def main(argv: list[str]) -> None:
    """CLI: flags -> distributed start-up -> :func:`train_and_evaluate` -> summary. Errors in the settings, the data,
    the checkpoints to start from and a non-finite loss end it with ``error: <message>`` and exit status 1; a run
    stopped by SIGTERM or Ctrl-C (with its checkpoint) exits with 128 + the signal's number."""
    from absl import flags

    flags_ = flags.FLAGS
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax and grain log every file they write at INFO
    try:
        with InterruptUntilCaught():  # a Ctrl-C outside the training loop (which has its own) is never lost
            result = _run(argv, flags_)
    except USER_ERRORS as e:  # a setting, file or dataset to fix: the message says which, a traceback would not
        print(f"error: {e}", file=sys.stderr)  # noqa: T201
        sys.exit(1)
    except KeyboardInterrupt:  # outside the training loop (set-up, final evaluation), or a second Ctrl-C
        workdir = pathlib.Path(flags_.workdir or flags_.config.workdir)
        saved = any(p.name.isdigit() for p in (workdir / ts.CHECKPOINT_DIR).glob("*"))  # finished ones only
        kept = (
            f"the same command resumes from the latest checkpoint in {workdir}"
            if saved
            else f"no checkpoint in {workdir} yet: the same command starts the run again"
        )
        print(f"\ninterrupted: {kept}", file=sys.stderr)  # noqa: T201
        sys.exit(preemption.EXIT_BASE + signal.SIGINT)
    if jax.process_index() == 0:
        _print_summary(result, flags_.config)
    if result.stopped_by is not None:
        sys.exit(preemption.EXIT_BASE + int(result.stopped_by))


def _print_summary(result: TrainResult, config: ml_collections.ConfigDict) -> None:
    """The run's last lines on standard output: final scores, workdir, checkpoint, predictions, early stop."""
    lines = [f"workdir:     {result.workdir}", f"checkpoint:  {result.checkpoint}"]
    if result.eval_metrics is not None:
        m = result.eval_metrics
        lines.insert(
            0,
            f"{config.data.val_split}: mIoU {m['miou']:.2f}  mVC8 {m.get('mvc8', float('nan')):.2f}  "
            f"mVC16 {m.get('mvc16', float('nan')):.2f}  aAcc {m.get('aacc', float('nan')):.2f} (percent)",
        )
    if result.predictions_dir is not None:
        lines.append(f"predictions: {result.predictions_dir}")
    if result.stopped_by is not None:
        lines.append(
            f"stopped:     by {result.stopped_by.name} at step {int(result.state.step)} of {config.total_steps}; "
            "the same command resumes the run"
        )
    print("\n".join(lines))  # noqa: T201


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "experiment config: configs/<file>.py[:arg]", lock_config=True)
    flags.DEFINE_string("workdir", "", "run directory (overrides config.workdir)")
    flags.DEFINE_string(
        "coordinator_address",
        os.environ.get("JAX_COORDINATOR_ADDRESS", ""),
        "multi-host: host:port of process 0",
    )
    flags.DEFINE_integer(
        "num_processes", int(os.environ.get("JAX_NUM_PROCESSES", "0")), "multi-host: number of processes"
    )
    flags.DEFINE_integer("process_id", int(os.environ.get("JAX_PROCESS_ID", "-1")), "multi-host: this process")
    flags.mark_flags_as_required(["config"])


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a config file that does not load, a mistyped ``--config.<field>`` or a bad value
    reported as ``error: <message>`` (exit status 2) instead of a traceback of ml_collections' internals."""
    from absl import flags

    try:
        rest = flags.FLAGS(argv)
        flags.FLAGS.config.keys()  # a config file that failed to load raises only when the config is read
        return rest
    except (flags.Error, AttributeError, KeyError, OSError, TypeError, ValueError) as e:
        message = config_error_message(e)
    print(f"error: {message}\n(--helpshort lists the flags)", file=sys.stderr)  # noqa: T201
    sys.exit(2)


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main, flags_parser=_parse_flags)

"""End-to-end training runs in subprocesses (tiny model, 32x32 crops, a few steps).

* the gradient computation of a step on 8 fake CPU devices equals the same global batch on 1 device (loss,
  gradients, BatchNorm statistics); gradient accumulation with BatchNorm (CFFM) equals running the
  micro-batches one after the other (the whole update step on several devices is compared with 1 device by
  the two-process test, 12 steps);
* a run killed with SIGKILL (while a checkpoint may be in flight) and restarted logs the same losses, step for
  step, and ends with the same parameters as an uninterrupted run (its data workers exit on their own); the smoke
  run's loss decreases;
* SIGTERM and Ctrl-C to a run's process group save the step in flight, exit with 143 / 130 and leave no process; the
  same command resumes; with two processes, SIGTERM to one stops both at the same step;
* two processes (``jax.distributed`` on 127.0.0.1) train with identical parameters on both and match the
  single-process losses;
* CFFM++ fine-tuning from a CFFM training workdir changes only ``decoder_swin`` and ``linear_pred3``;
* a NaN/Inf loss stops the run with the step number.

All subprocesses share a persistent compilation cache (the one the entry points turn on, ``cffm_jax.compilation_cache``,
in its default place under a temporary ``XDG_CACHE_HOME``) and compile without XLA optimisations (the comparisons
are between runs with identical settings), which keeps the file at a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from cffm_jax.checkpoint import load_for_inference
from cffm_jax.compilation_cache import ENV_VAR
from cffm_jax.evaluate import evaluate_videos
from cffm_jax.logging_utils import read_metrics
from cffm_jax.train_state import load_training_checkpoint_for_inference
from configs import smoke

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 12
COMMON_ARGS = [f"--config.total_steps={STEPS}", "--config.checkpoint_every=3", "--config.log_every=1"]
COMPARED = ("loss", "lr", "ce_frames", "ce_target", "acc_seg", "grad_norm")


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (ENV_VAR, "JAX_COMPILATION_CACHE_DIR")}
    env.update(
        XLA_FLAGS=(
            env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
        ).strip(),
        XDG_CACHE_HOME=str(tmp_path_factory.mktemp("cache_home")),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")]),
    )
    return env


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> str:
    from cffm_jax.data.synthetic import generate

    return generate(str(tmp_path_factory.mktemp("synthetic")), **smoke.get_config().data.synthetic.to_dict())


def train_cmd(workdir, data_root, *extra, config="configs/smoke.py") -> list[str]:
    return [
        sys.executable,
        "-m",
        "cffm_jax.train",
        f"--config={config}",
        f"--workdir={workdir}",
        f"--config.data.root={data_root}",
        *COMMON_ARGS,
        *extra,
    ]


def run(cmd, env, timeout=300) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return out


def rows_by_step(workdir) -> dict[int, dict]:
    path = pathlib.Path(workdir) / "metrics.jsonl"
    return {r["step"]: r for r in read_metrics(path) if "loss" in r} if path.exists() else {}


def assert_same_run(workdir, reference) -> None:
    """The same logged values, step for step, and the same final parameters as the ``reference`` run."""
    rows, ref = rows_by_step(workdir), rows_by_step(reference)
    assert sorted(rows) == sorted(ref)
    for step in sorted(ref):
        for key in COMPARED:
            assert rows[step][key] == ref[step][key], (step, key, rows[step][key], ref[step][key])
    final, _ = load_training_checkpoint_for_inference(workdir)
    expected, _ = load_training_checkpoint_for_inference(reference)
    jax.tree.map(np.testing.assert_array_equal, final, expected)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, env, data_root) -> pathlib.Path:
    """An uninterrupted smoke CFFM run of STEPS steps."""
    workdir = tmp_path_factory.mktemp("reference")
    run(train_cmd(workdir, data_root), env)
    return workdir


def test_reference_run_files_checkpoints_and_learning(reference_run, env):
    rows = rows_by_step(reference_run)
    assert sorted(rows) == list(range(1, STEPS + 1))
    losses = [rows[s]["loss"] for s in sorted(rows)]
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.1, losses
    # in-process data loading (num_workers=0): the loop's wait for batches is a part of its time (none between
    # the rows of a checkpoint step and the step before it: both are written after the same batch)
    waits = [rows[s]["data_wait"] for s in sorted(rows)]
    assert all(0.0 <= w <= 1.0 for w in waits) and sum(w > 0 for w in waits) >= STEPS // 2, waits
    # checkpoints every 3 steps, the last 2 kept (config keep_checkpoints=2)
    steps = sorted(int(p.name) for p in (reference_run / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [9, 12]
    for name in ("config.json", "model.json"):
        assert (reference_run / name).is_file()
    assert json.loads((reference_run / "config.json").read_text())["total_steps"] == STEPS
    assert list((reference_run / "tensorboard").iterdir())
    # the workdir and a step directory load for inference
    variables, config = load_for_inference(reference_run)
    assert config.name == "cffm_b0" and config.embed_dims == smoke.TINY["embed_dims"]
    same, _ = load_training_checkpoint_for_inference(reference_run / "checkpoints" / "12")
    earlier, _ = load_training_checkpoint_for_inference(reference_run / "checkpoints" / "9")
    kernel = ("decode_head", "linear_pred", "kernel")
    leaf = lambda v: v["params"][kernel[0]][kernel[1]][kernel[2]]  # noqa: E731
    np.testing.assert_array_equal(leaf(variables), leaf(same))
    assert not np.array_equal(leaf(variables), leaf(earlier))
    assert variables["batch_stats"]["decode_head"]["linear_fuse"]["bn"]["var"].shape == (32,)
    # the run kept its compiled programs in the default cache directory (cffm_jax.compilation_cache)
    cached = [p.name for p in (pathlib.Path(env["XDG_CACHE_HOME"]) / "cffm_jax" / "xla").iterdir()]
    assert any(name.startswith("jit_train_step") for name in cached), cached


def test_loading_a_workdir_warns_of_nothing(reference_run, caplog):
    """Reading a training workdir for inference (read-only orbax manager) logs no warnings: orbax's "Given
    directory is read only" and "setting save_interval_steps=0" notices are not the user's problem."""
    with caplog.at_level(logging.INFO):
        load_for_inference(reference_run)
    assert any("checkpoint" in r.getMessage().lower() for r in caplog.records), "no log records captured at all"
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not warnings, warnings


@pytest.mark.parametrize(
    ("extra", "status", "message"),
    [
        (["--config.data.root={missing}"], 1, "train.txt: split file not found"),
        (["--config.init_from={missing}"], 1, "config.init_from="),
        (["--config.grad_accum_steps=3"], 1, "is not divisible by grad_accum_steps=3"),
        (["--config.data.img_scale=(1,2,3)"], 1, "config.data.img_scale must be two positive integers"),
        (["--config.batchsize=4"], 2, "no config field 'batchsize' (Did you mean \"batch_size\""),
        (["--config.total_steps=many"], 2, "invalid literal for int()"),
        (["--config={missing}.py"], 2, "cannot load the --config file"),
        (["--config=configs/smoke.py:b9"], 2, "unknown smoke variant"),
    ],
    ids=["data_root", "init_from", "batch_size", "img_scale", "field_typo", "field_value", "config_file", "arg"],
)
def test_cli_reports_setting_errors_without_a_traceback(tmp_path, env, data_root, extra, status, message):
    """A wrong data root, starting checkpoint, batch split, image size, config field, value or file: `error:
    <message naming it>`, exit status 1 (or 2 for the command line itself), no traceback, and nothing trained."""
    missing = tmp_path / "missing"
    cmd = train_cmd(tmp_path / "run", data_root, *[e.format(missing=missing) for e in extra])
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == status, out.stderr[-3000:]
    assert "error: " in out.stderr and message in out.stderr, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert not rows_by_step(tmp_path / "run")


def test_sigkill_and_resume_reproduce_the_uninterrupted_run(tmp_path, reference_run, env, data_root):
    workdir = tmp_path / "killed"
    cmd = train_cmd(workdir, data_root, "--config.data.num_workers=2")  # the data do not depend on the workers
    log_file = open(tmp_path / "killed.log", "w")  # noqa: SIM115 -- closed below
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log_file, start_new_session=True)
    deadline = time.time() + 300
    killed_while_saving = False
    try:
        while proc.poll() is None and time.time() < deadline:
            metrics = workdir / "metrics.jsonl"
            done = max(rows_by_step(workdir), default=0) if metrics.exists() else 0
            entries = (
                [p.name for p in (workdir / "checkpoints").iterdir()] if (workdir / "checkpoints").exists() else []
            )
            saving = any("tmp" in name for name in entries)
            # kill once a checkpoint is complete: preferably while the next one is being written
            if any(name.isdigit() for name in entries) and (saving or done >= 8):
                killed_while_saving = saving
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        log_file.close()
    log = (tmp_path / "killed.log").read_text()
    assert proc.returncode == -signal.SIGKILL, f"the run was not killed mid-way:\n{log[-3000:]}"
    _wait_until_group_is_gone(proc.pid)  # the orphaned data workers exit on their own
    rows_before = rows_by_step(workdir)
    assert max(rows_before) < STEPS

    out = run(cmd, env)
    assert "resumed from" in out.stderr, out.stderr[-3000:]
    assert_same_run(workdir, reference_run)
    print(f"killed after step {max(rows_before)} (checkpoint in flight: {killed_while_saving})")


def test_resume_checks_the_model_and_takes_another_worker_count(tmp_path, reference_run, env, data_root):
    """Resuming with another model is refused with the fields that changed, before the workdir's run files are
    rewritten (evaluate and predict keep reading the model its checkpoints hold); resuming with another
    ``data.num_workers`` (grain's saved state does not fit) continues the data stream at the checkpoint's batch
    and ends exactly as the uninterrupted run."""
    workdir = tmp_path / "run"
    shutil.copytree(reference_run, workdir)  # trained with num_workers=0
    shutil.rmtree(workdir / "checkpoints" / str(STEPS))  # as if stopped after the checkpoint of step 9
    run_files = {name: (workdir / name).read_bytes() for name in ("model.json", "config.json")}

    other_model = train_cmd(workdir, data_root, "--config.model.decoder_embed_dim=16")
    out = subprocess.run(other_model, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stderr[-3000:]
    assert "cannot resume from" in out.stderr and "model.decoder_embed_dim: 32 in the workdir, 16 now" in out.stderr
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert {name: (workdir / name).read_bytes() for name in run_files} == run_files
    (workdir / "model.json").rename(workdir / "model.json.bak")  # without it: the variables that do not fit
    out = subprocess.run(other_model, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "cannot resume from" in out.stderr, out.stderr[-3000:]
    assert "shape: batch_stats/decode_head/linear_fuse/bn/mean (32,) saved, (16,) now" in out.stderr, out.stderr[-3000:]
    (workdir / "model.json.bak").rename(workdir / "model.json")

    out = run(train_cmd(workdir, data_root, "--config.data.num_workers=2"), env)
    assert "the data stream continues at batch 9" in out.stderr, out.stderr[-3000:]
    assert_same_run(workdir, reference_run)


def test_evaluate_and_predict_test_a_training_workdir_at_its_scale(tmp_path, reference_run, data_root, caplog):
    """Without --config (or --img-scale) a training workdir is tested at the scale it was trained at (its
    config.json), not at the official 853x480, and the log says so."""
    from cffm_jax import evaluate, predict

    trained = list(smoke.get_config().data.img_scale)
    assert trained != [853, 480]
    argv = ["--checkpoint", str(reference_run), "--data-root", data_root, "--max-videos", "1", "--no-progress"]
    with caplog.at_level(logging.INFO):
        evaluate.main([*argv, "--json", str(tmp_path / "metrics.json")])
    assert json.loads((tmp_path / "metrics.json").read_text())["run"]["img_scale"] == trained
    assert any("the scale the model was trained at" in r.getMessage() for r in caplog.records)
    frames = pathlib.Path(data_root) / "data" / (pathlib.Path(data_root) / "val.txt").read_text().split()[0] / "origin"
    out = predict.main(["--checkpoint", str(reference_run / "checkpoints" / str(STEPS)), "--input", str(frames),
                        "--output", str(tmp_path / "pred"), "--no-progress"])  # fmt: skip
    assert json.loads((out / predict.MANIFEST).read_text())["img_scale"] == trained


def test_rerunning_a_complete_run_evaluates_again_without_a_duplicate_row(tmp_path, env, data_root, reference_run):
    """The same command after the end: it says the run is complete, evaluates the final checkpoint again and
    leaves one evaluation row for that step in metrics.jsonl (twice in a row)."""
    workdir = tmp_path / "run"
    shutil.copytree(reference_run, workdir)
    for _ in range(2):
        out = run(train_cmd(workdir, data_root, "--config.eval_at_end=True"), env)
        assert f"the run is complete (step {STEPS} of total_steps={STEPS})" in out.stderr, out.stderr[-3000:]
        rows = read_metrics(workdir / "metrics.jsonl")
        assert [r["step"] for r in rows if "miou" in r] == [STEPS]
        assert [r["step"] for r in rows if "loss" in r] == list(range(1, STEPS + 1))


def test_a_corrupt_validation_mask_names_the_saved_checkpoint(tmp_path, env, data_root):
    """A validation mask that cannot be decoded is found by the final evaluation, after training: the error (no
    traceback) names the file and says where the trained state is saved; the same command resumes there."""
    root = tmp_path / "data"
    shutil.copytree(data_root, root)
    video = (root / "val.txt").read_text().split()[0]
    mask = sorted((root / "data" / video / "mask").iterdir())[5]
    mask.write_bytes(b"not a png")
    workdir = tmp_path / "run"
    cmd = train_cmd(workdir, root, "--config.total_steps=1", "--config.eval_at_end=True")
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert f"{mask}: cannot decode mask" in out.stderr, out.stderr[-3000:]
    assert f"the training state is saved in {workdir / 'checkpoints' / '1'}" in out.stderr, out.stderr[-3000:]
    assert (workdir / "checkpoints" / "1").is_dir()


def _eight_devices_script() -> None:
    """Run in a subprocess with 8 fake CPU devices; prints the largest differences as JSON."""
    import functools

    from cffm_jax import sharding as shd
    from cffm_jax import train
    from cffm_jax import train_state as ts
    from cffm_jax.models import build_model, init_variables, trainable_mask
    from cffm_jax.optim import make_optimizer

    assert jax.device_count() == 8, jax.devices()
    config = smoke.get_config()
    model = build_model(config.model)
    loss_config = config.loss.to_dict()
    fresh = init_variables(config.model, 0)
    tx, _ = make_optimizer(config.optim, fresh["params"], 10, trainable_mask(config.model, fresh["params"]))
    rng = np.random.default_rng(0)

    def random_batch():
        return {
            "clips": rng.normal(size=(8, 4, 32, 32, 3)).astype(np.float32),
            "labels": rng.integers(0, 6, size=(8, 4, 32, 32)).astype(np.int32),
        }

    batch = random_batch()
    key = ts.create_train_state(fresh, tx, 0).step_key()  # the key of the first update step
    out, fns = {}, {}
    for n in (1, 8):
        mesh = shd.make_mesh(jax.devices()[:n])
        repl, data = shd.replicated(mesh), shd.batch_sharding(mesh)
        gbatch = shd.global_batch(batch, mesh)
        assert gbatch["clips"].addressable_shards[0].data.shape[0] == 8 // n
        fns[n] = jax.jit(
            functools.partial(train.compute_grads, model=model, loss_config=loss_config),
            in_shardings=(repl, repl, data, repl),
            out_shardings=repl,
        )
        loss, aux, grads, stats = fns[n](fresh["params"], fresh["batch_stats"], gbatch, key)
        out[n] = jax.device_get(dict(loss=loss, aux=aux, grads=grads, stats=stats))

    # Gradient accumulation with BatchNorm in training mode (CFFM), on 1 device: 2 micro-batches of 8 clips
    # (clips i, i + 2, ...) equal running them one after the other, running statistics threaded through.
    mesh = shd.make_mesh(jax.devices()[:1])
    repl, data = shd.replicated(mesh), shd.batch_sharding(mesh)
    other = random_batch()
    big = {k: np.stack([batch[k], other[k]], axis=1).reshape(16, *batch[k].shape[1:]) for k in batch}
    acc_fn = jax.jit(
        functools.partial(train.compute_grads, model=model, loss_config=loss_config, grad_accum_steps=2, mesh=mesh),
        in_shardings=(repl, repl, data, repl),
        out_shardings=repl,
    )
    acc = jax.device_get(acc_fn(fresh["params"], fresh["batch_stats"], shd.global_batch(big, mesh), key))
    stats, seq = fresh["batch_stats"], []
    for i, micro in enumerate((batch, other)):
        micro_key = jax.random.fold_in(key, i)
        seq.append(jax.device_get(fns[1](fresh["params"], stats, shd.global_batch(micro, mesh), micro_key)))
        stats = seq[-1][3]
    np.testing.assert_allclose(acc[0], (seq[0][0] + seq[1][0]) / 2, rtol=1e-5)
    jax.tree.map(
        lambda g, a, b: np.testing.assert_allclose(g, (a + b) / 2, rtol=1e-4, atol=2e-6),
        acc[2],
        seq[0][2],
        seq[1][2],
    )
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), acc[3], stats)

    diffs = {}
    for name in ("loss", "aux", "grads", "stats"):

        def check(a, b, name=name):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6, err_msg=name)
            return float(np.max(np.abs(np.asarray(a) - np.asarray(b)), initial=0.0))

        diffs[name] = max(jax.tree.leaves(jax.tree.map(check, out[8][name], out[1][name])))

    assert np.abs(out[1]["grads"]["backbone"]["patch_embed1"]["proj"]["kernel"]).max() > 1e-4
    assert not np.allclose(out[1]["stats"]["decode_head"]["linear_fuse"]["bn"]["mean"], 0.0)
    print(json.dumps(diffs))


def test_eight_devices_equal_one_device_and_accumulation_semantics(env):
    env = dict(env, XLA_FLAGS=env["XLA_FLAGS"] + " --xla_force_host_platform_device_count=8")
    out = run([sys.executable, "-c", "import test_train_e2e as t; t._eight_devices_script()"], env)
    diffs = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(diffs) == {"loss", "aux", "grads", "stats"}
    print(diffs)


def _two_processes_script() -> None:
    """Process ``argv[1]`` of 2: trains the smoke config for STEPS steps, saves its copy of the parameters."""
    import flax.traverse_util as tu

    from cffm_jax import sharding as shd
    from cffm_jax import train

    pid, port, workdir, data_root, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
    assert shd.initialize_distributed(f"127.0.0.1:{port}", 2, pid)
    config = smoke.get_config()
    config.data.root = data_root
    config.total_steps, config.checkpoint_every, config.log_every = STEPS, 6, 1
    # final evaluation on the 3 labelled training videos: split between the processes, metrics pooled
    config.eval_at_end, config.data.val_split = True, config.data.train_split
    result = train.train_and_evaluate(config, workdir)
    flat = tu.flatten_dict(shd.to_host(result.state.params), sep="/")
    np.savez(f"{out}/params_{pid}.npz", **flat)
    scores = {k: v for k, v in result.eval_metrics.items() if k not in ("seconds", "frames_per_second")}
    (pathlib.Path(out) / f"eval_{pid}.json").write_text(json.dumps(scores))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_two_processes(function: str, workdir, data_root, out_dir, env) -> list[subprocess.Popen]:
    """Processes 0 and 1 running ``test_train_e2e.<function>()`` with a coordinator on a free local port."""
    port, script = _free_port(), f"import test_train_e2e as t; t.{function}()"
    return [
        subprocess.Popen(
            [sys.executable, "-c", script, str(i), str(port), str(workdir), data_root, str(out_dir)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]


def _both_succeed(procs: list[subprocess.Popen], timeout: float, meanwhile=lambda: None) -> None:
    """Runs ``meanwhile()``, then waits for the processes: each must exit with status 0 (else its log is shown)."""
    try:
        meanwhile()
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-4000:]


def test_two_processes_train_identically(tmp_path, env, data_root, reference_run):
    workdir = tmp_path / "two"
    _both_succeed(_start_two_processes("_two_processes_script", workdir, data_root, tmp_path, env), timeout=300)
    p0, p1 = (np.load(tmp_path / f"params_{i}.npz") for i in range(2))
    assert sorted(p0.files) == sorted(p1.files) and len(p0.files) > 50
    for name in p0.files:
        np.testing.assert_array_equal(p0[name], p1[name], err_msg=name)
    # one clip per process, BatchNorm over both: the same run as one process with both clips
    rows, ref = rows_by_step(workdir), rows_by_step(reference_run)
    assert sorted(rows) == sorted(ref)
    for step in ref:
        np.testing.assert_allclose(rows[step]["loss"], ref[step]["loss"], rtol=1e-4, err_msg=str(step))
    saved, _ = load_training_checkpoint_for_inference(workdir)
    np.testing.assert_array_equal(
        saved["params"]["decode_head"]["linear_pred"]["kernel"], p0["decode_head/linear_pred/kernel"]
    )
    # the evaluation: both processes return the metrics of all 3 videos, equal to one process scoring them all
    e0, e1 = (json.loads((tmp_path / f"eval_{i}.json").read_text()) for i in range(2))
    assert e0 == e1
    config = smoke.get_config()
    single = evaluate_videos(
        config.model,
        saved,
        data_root,
        split=config.data.train_split,
        img_scale=tuple(config.data.img_scale),
        progress=False,
        predictions_dir=tmp_path / "single",
    )
    assert e0["num_videos"] == single["num_videos"] == 3 and e0["num_frames"] == single["num_frames"] == 36
    for key, value in e0.items():
        np.testing.assert_allclose(value, single[key], rtol=1e-12, err_msg=key)
    for path in sorted((tmp_path / "single").rglob("*.png")):
        shared = workdir / "predictions" / path.relative_to(tmp_path / "single")
        assert shared.read_bytes() == path.read_bytes(), shared
    assert len(list((workdir / "predictions").rglob("*.png"))) == 36


def test_cffmpp_finetuning_changes_only_the_prototype_branch(tmp_path, env, data_root, reference_run):
    from cffm_jax.data.pipeline import video_names
    from cffm_jax.prototype_store import PrototypeStore

    store = PrototypeStore(tmp_path / "prototypes", embed_dim=32, num_prototypes=5, source="generated")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for video in video_names(data_root, split):
            store.put(video, rng.normal(size=(5, 32)).astype(np.float32))
    workdir = tmp_path / "cffmpp"
    run(
        train_cmd(
            workdir,
            data_root,
            f"--config.init_from={reference_run}",
            f"--config.data.prototypes_dir={store.root}",
            "--config.total_steps=4",
            "--config.checkpoint_every=1",
            config="configs/smoke.py:cffmpp",
        ),
        env,
    )
    import flax.traverse_util as tu

    cffm, _ = load_training_checkpoint_for_inference(reference_run)
    step3, _ = load_training_checkpoint_for_inference(workdir / "checkpoints" / "3")
    final, config = load_training_checkpoint_for_inference(workdir)
    assert config.arch == "cffmpp"
    before, mid, after = (tu.flatten_dict(v, sep="/") for v in (cffm, step3, final))
    trained = {p for p in after if p.split("/")[2] in ("decoder_swin", "linear_pred3")}
    assert trained and trained == set(after) - set(before)
    for path in before:  # frozen: bit-identical to the CFFM checkpoint (BatchNorm statistics included)
        np.testing.assert_array_equal(after[path], before[path], err_msg=path)
    changed = [p for p in trained if not np.array_equal(after[p], mid[p])]
    assert len(changed) > len(trained) // 2, changed

    # evaluating the workdir without --config or --prototypes uses the store it was trained with (its config.json)
    from cffm_jax import evaluate

    argv = ["--checkpoint", str(workdir), "--data-root", data_root, "--no-progress", "--json", str(tmp_path / "m.json")]
    evaluate.main(argv)
    assert json.loads((tmp_path / "m.json").read_text())["run"]["prototypes"] == str(store.root)


def test_nonfinite_loss_stops_with_the_step(tmp_path, env, data_root, reference_run):
    from cffm_jax.checkpoint import save_variables

    variables, config = load_training_checkpoint_for_inference(reference_run)
    variables["params"]["backbone"]["patch_embed1"]["proj"]["kernel"][0, 0, 0, 0] = np.inf
    weights = save_variables(tmp_path / "broken", variables, config)
    cmd = train_cmd(tmp_path / "nan", data_root, f"--config.init_from={weights}")
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stderr[-3000:]
    assert "error: loss is nan at step 1 " in out.stderr, out.stderr[-3000:]
    assert not rows_by_step(tmp_path / "nan")
    assert not [p for p in (tmp_path / "nan" / "checkpoints").iterdir() if p.name.isdigit()]


def _start_in_own_group(cmd, env, log_path) -> subprocess.Popen:
    """A run in a new process group (it and its data workers), as a scheduler or a terminal signals them."""
    with open(log_path, "w") as log:
        return subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True
        )


def _signal_when(proc, ready, sig, log_path) -> str:
    """Sends ``sig`` to the run's whole process group once ``ready()``; returns its standard output."""
    deadline = time.time() + 300
    while not ready():
        assert proc.poll() is None, pathlib.Path(log_path).read_text()[-3000:]
        assert time.time() < deadline, "no progress in 300 s"
        time.sleep(0.05)
    os.killpg(proc.pid, sig)
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    _wait_until_group_is_gone(proc.pid)  # the data workers stop with the main process
    return out


def _wait_until_group_is_gone(pgid: int, timeout: float = 10.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise AssertionError(f"processes of the run outlived it by {timeout} s")


def _checkpoint_steps(workdir) -> list[int]:
    entries = [p.name for p in (pathlib.Path(workdir) / "checkpoints").iterdir()]
    assert all(name.isdigit() for name in entries), entries  # no half-written checkpoint
    return sorted(int(name) for name in entries)


def _eval_steps(workdir) -> list[int]:
    path = pathlib.Path(workdir) / "metrics.jsonl"
    return [r["step"] for r in read_metrics(path) if "miou" in r] if path.exists() else []


def test_sigterm_and_ctrl_c_save_the_step_and_the_same_command_resumes(tmp_path, env, data_root):
    """SIGTERM (a scheduler's notice) to the run's process group, data workers included: the run saves the step it
    was on, exits with 143 and leaves no process behind; the same command resumes there, and Ctrl-C (SIGINT) stops
    it the same way with 130. Periodic evaluations (every 5 steps) each save a checkpoint first."""
    workdir = tmp_path / "preempted"
    cmd = train_cmd(
        workdir,
        data_root,
        "--config.total_steps=1000000",  # runs until signalled
        "--config.checkpoint_every=1000000",  # no periodic checkpoint: only the evaluations and the stop save
        "--config.eval_every=5",
        "--config.keep_checkpoints=0",  # keep all
        "--config.data.num_workers=2",
    )
    log_path = tmp_path / "preempted.log"
    proc = _start_in_own_group(cmd, env, log_path)
    out = _signal_when(proc, lambda: _eval_steps(workdir), signal.SIGTERM, log_path)  # after the first evaluation
    log = log_path.read_text()
    assert proc.returncode == 128 + signal.SIGTERM, log[-3000:]
    stopped = max(rows_by_step(workdir))
    assert f"stopped:     by SIGTERM at step {stopped} of 1000000" in out, out
    evaluated = _eval_steps(workdir)
    assert evaluated and evaluated == list(range(5, stopped + 1, 5)), (evaluated, stopped)
    # a checkpoint at every evaluation, and the last logged step: nothing lost
    assert _checkpoint_steps(workdir) == sorted({*evaluated, stopped})
    assert "Traceback" not in log, log[-3000:]

    proc = _start_in_own_group(cmd, env, log_path)
    out = _signal_when(proc, lambda: max(rows_by_step(workdir)) > stopped + 2, signal.SIGINT, log_path)
    log = log_path.read_text()
    assert proc.returncode == 128 + signal.SIGINT, log[-3000:]
    assert f"resumed from {workdir / 'checkpoints'} at step {stopped}" in log, log[-3000:]
    rows = rows_by_step(workdir)
    again = max(rows)
    assert sorted(rows) == list(range(1, again + 1))  # the resumed run continued at stopped + 1
    assert f"stopped:     by SIGINT at step {again} of 1000000" in out, out
    assert _checkpoint_steps(workdir) == sorted({*_eval_steps(workdir), stopped, again})
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log[-3000:]


def _two_processes_until_stopped_script() -> None:
    """Process ``argv[1]`` of 2 trains until a SIGTERM stops the run; writes where it stopped as JSON."""
    from cffm_jax import sharding as shd
    from cffm_jax import train

    pid, port, workdir, data_root, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
    assert shd.initialize_distributed(f"127.0.0.1:{port}", 2, pid)
    config = smoke.get_config()
    config.data.root = data_root
    config.total_steps, config.checkpoint_every, config.log_every = 1_000_000, 1_000_000, 1
    result = train.train_and_evaluate(config, workdir)
    stopped = {"signal": result.stopped_by and result.stopped_by.name, "step": int(result.state.step)}
    (pathlib.Path(out) / f"stopped_{pid}.json").write_text(json.dumps(stopped))


def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(tmp_path, env, data_root):
    """With ``jax.distributed`` JAX's preemption service takes SIGTERM: all processes agree on the step to stop
    at (otherwise the others would wait forever in the next collective) and save one checkpoint together."""
    workdir = tmp_path / "two"
    procs = _start_two_processes("_two_processes_until_stopped_script", workdir, data_root, tmp_path, env)

    def sigterm_to_process_1_after_step_3():
        deadline = time.time() + 300
        while max(rows_by_step(workdir), default=0) <= 3:
            assert all(p.poll() is None for p in procs), [p.communicate()[1][-3000:] for p in procs]
            assert time.time() < deadline, "no progress in 300 s"
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGTERM)

    _both_succeed(procs, timeout=120, meanwhile=sigterm_to_process_1_after_step_3)
    s0, s1 = (json.loads((tmp_path / f"stopped_{i}.json").read_text()) for i in range(2))
    assert s0 == s1 and s0["signal"] == "SIGTERM", (s0, s1)
    assert _checkpoint_steps(workdir) == [s0["step"]]
    assert max(rows_by_step(workdir)) == s0["step"]

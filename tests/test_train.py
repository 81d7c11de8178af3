"""Training pieces in-process: configs, loss, gradient accumulation, metric files (SPEC.md sections 8, 9).

End-to-end runs (subprocesses: 8 devices, accumulation with BatchNorm, SIGKILL and resume, two processes,
CFFM++ fine-tuning, NaN stop) are in ``test_train_e2e.py``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import pathlib
import struct
import subprocess
import sys

import jax
import numpy as np
import pytest

from cffm_jax import experiment_config, train
from cffm_jax import train_state as ts
from cffm_jax.logging_utils import MetricWriter, crc32c, masked_crc32c, read_metrics, run_cli
from cffm_jax.models import build_model, init_variables
from cffm_jax.sharding import check_batch_size, make_mesh
from configs import smoke

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "loss_tiny.npz"
# Unoptimised XLA compilation: the tests compare functions with each other, not speed (3x faster compiles).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def load_config(spec: str, *overrides: str):
    """``configs/<spec>`` through ml_collections' command-line parser, as the CLI does."""
    from absl import flags
    from ml_collections import config_flags

    argv = ["train", f"--config={ROOT / 'configs' / spec}", *overrides]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=values, lock_config=True, sys_argv=argv)
    values(argv)
    return values.config


# ----------------------------------------------------------------------------------------------------------
# Configs


def test_config_copies_load_from_any_directory(tmp_path):
    """A user's copy of each config, outside the repository, loaded by a fresh interpreter whose working directory
    is elsewhere (no ``configs`` package on its path): the configs need only the installed package."""
    mine = tmp_path / "my_experiments"
    mine.mkdir()
    specs = []
    for path in sorted((ROOT / "configs").glob("*.py")):
        (mine / path.name).write_text(path.read_text())
        specs.append(str(mine / path.name) + (":b0" if "vspw" in path.name else ""))
    script = (
        "import sys\n"
        "from cffm_jax.evaluate import load_config\n"
        "for spec in sys.argv[1:]:\n"
        "    print(spec, load_config(spec, []).model.name)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-c", script, *specs], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == len(specs) >= 5


@pytest.mark.parametrize(
    "spec, name, steps",
    [
        ("cffm_vspw.py:b0", "cffm_b0", 160_000),
        ("cffm_vspw.py:b1", "cffm_b1", 160_000),
        ("cffm_vspw.py:b2", "cffm_b2", 160_000),
        ("cffm_vspw.py:b5", "cffm_b5", 160_000),
        ("cffmpp_vspw.py:b1", "cffmpp_b1", 40_000),
    ],
)
def test_vspw_configs_are_the_official_setting(spec, name, steps):
    config = load_config(spec)
    assert config.model.name == name and config.model.num_classes == 124
    assert config.total_steps == steps
    assert (config.batch_size, config.grad_accum_steps) == (8, 1)
    assert tuple(config.data.crop_size) == (480, 480) and tuple(config.data.img_scale) == (853, 480)
    o = config.optim
    assert (o.weight_decay, o.b1, o.b2, o.eps, o.warmup_steps, o.warmup_ratio, o.power) == (
        0.01,
        0.9,
        0.999,
        1e-8,
        1500,
        1e-6,
        1.0,
    )
    head_mult = 1.0 if name.startswith("cffmpp") else 10.0
    assert o.lr == (2e-4 if name.startswith("cffmpp") else 6e-5)
    assert [tuple(r) for r in o.rules] == [
        ("pos_block", 1.0, 0.0),
        ("head", head_mult, 1.0),
        ("norm", 1.0, 0.0),
    ]
    assert (config.loss.frame_weight, config.loss.target_weight) == (0.5, 1.0)
    if name.startswith("cffmpp"):
        assert config.init_from == "runs/cffm_vspw_b1" and config.data.prototypes_dir


def test_every_field_is_overridable_and_unknown_fields_fail():
    config = load_config(
        "cffm_vspw.py:b1",
        "--config.data.crop_size=(64,64)",
        "--config.optim.lr=1e-4",
        "--config.model.dtype=bfloat16",
        "--config.grad_accum_steps=4",
        "--config.data.root=",
    )
    assert tuple(config.data.crop_size) == (64, 64) and config.optim.lr == 1e-4
    assert config.model.dtype == "bfloat16" and config.grad_accum_steps == 4 and config.data.root == ""
    with pytest.raises(Exception, match="no_such_field"):
        load_config("cffm_vspw.py:b1", "--config.optim.no_such_field=1")
    with pytest.raises(Exception, match="unknown model size .b9"):
        load_config("cffm_vspw.py:b9")


def test_config_errors_say_what_is_wrong_in_one_message():
    """evaluate.load_config (the evaluation and prototype CLIs) raises ConfigError with the innermost message: a
    mistyped field with ml_collections' suggestion, a get_config argument error, a missing file."""
    from cffm_jax.evaluate import load_config as cli_load_config

    cases = [
        ("demo.py", ["--config.batchsize=4"], "no config field 'batchsize' \\(Did you mean \"batch_size\""),
        ("demo.py:foo", [], "demo.py:foo: unknown demo variant 'foo'; valid: cffm, cffmpp$"),
        ("no_such_config.py", [], "(?s)cannot load the --config file:.*No such file or directory"),
        ("demo.py", ["--config.total_steps=many"], "invalid literal for int\\(\\) with base 10: 'many'$"),
    ]
    for spec, overrides, message in cases:
        with pytest.raises(experiment_config.ConfigError, match=message) as info:
            cli_load_config(str(ROOT / "configs" / spec), overrides)
        assert "Traceback" not in str(info.value)


def test_other_configs_load():
    demo = load_config("demo.py")
    assert demo.data.root == "" and demo.model.num_classes == demo.data.synthetic.num_classes
    assert load_config("smoke.py:cffmpp").model.arch == "cffmpp"
    proto = load_config("prototypes_vspw.py:b2")
    assert proto.model.name == "cffm_b2" and proto.prototypes.num_prototypes == 100
    assert proto.prototypes.num_frames == 10 and proto.prototypes.max_iter == 10
    assert proto.data.prototypes_dir == load_config("cffmpp_vspw.py:b2").data.prototypes_dir


# ----------------------------------------------------------------------------------------------------------
# Loss through the training code path


def test_training_loss_matches_official_fixture():
    data = np.load(FIXTURE)
    logits = np.transpose(data["input/seg_logit"], (0, 1, 3, 4, 2))  # (B, T+1, h, w, K)
    labels = data["input/seg_label"][:, :, 0].astype(np.int32)
    loss_config = experiment_config.base_config("cffm_b0").loss.to_dict()
    loss, aux = jax.jit(lambda lg, lb: train.training_loss(lg, lb, loss_config))(logits, labels)
    np.testing.assert_allclose(loss, data["output/loss_seg"], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(aux["acc_seg"], data["output/acc_seg"], atol=2e-5, rtol=1e-5)
    # the memory option gives the same value
    chunked = dict(loss_config, frames_per_chunk=2)
    np.testing.assert_allclose(train.training_loss(logits, labels, chunked)[0], loss, rtol=1e-6)
    # averaging equal-size micro-batches (gradient accumulation) reproduces the batch loss
    halves = [train.training_loss(logits[i : i + 1], labels[i : i + 1], loss_config)[0] for i in range(2)]
    np.testing.assert_allclose(np.mean(halves), data["output/loss_seg"], atol=2e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Gradient accumulation


def _batch(rng, b, size=32, with_prototypes=False, kp=5, e=32):
    batch = {
        "clips": rng.normal(size=(b, 4, size, size, 3)).astype(np.float32),
        "labels": rng.integers(0, 6, size=(b, 4, size, size)).astype(np.int32),
    }
    batch["labels"][:, :, :3] = 255
    if with_prototypes:
        batch["prototypes"] = rng.normal(size=(b, kp, e)).astype(np.float32)
    return batch


def _grads_fn(config, accum, *example):
    model = build_model(config.model)
    fn = functools.partial(train.compute_grads, model=model, loss_config=config.loss.to_dict(), grad_accum_steps=accum)
    return jax.jit(fn).lower(*example).compile(compiler_options=FAST_COMPILE)


def test_grad_accumulation_equals_the_large_batch_cffmpp():
    """CFFM++ has no batch-statistics dependence (linear_fuse uses running statistics), so 2 micro-batches of
    2 clips must give the loss and gradients of the batch of 4 (dropout off: the keys differ by design)."""
    config = smoke.get_config("cffmpp")
    config.model.dropout_ratio = 0.0
    variables = init_variables(config.model, 0)
    batch = _batch(np.random.default_rng(0), 4, with_prototypes=True)
    key = jax.random.key(0)
    args = (variables["params"], variables["batch_stats"], batch, key)
    loss1, aux1, grads1, stats1 = _grads_fn(config, 1, *args)(*args)
    loss2, aux2, grads2, stats2 = _grads_fn(config, 2, *args)(*args)
    np.testing.assert_allclose(loss2, loss1, rtol=1e-6)
    for k in aux1:
        np.testing.assert_allclose(aux2[k], aux1[k], rtol=1e-5, err_msg=k)
    trained = grads1["decode_head"]["decoder_swin"]
    assert max(float(np.abs(g).max()) for g in jax.tree.leaves(trained)) > 1e-4
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7), grads2, grads1)
    jax.tree.map(np.testing.assert_array_equal, stats2, variables["batch_stats"])
    jax.tree.map(np.testing.assert_array_equal, stats1, variables["batch_stats"])


# ----------------------------------------------------------------------------------------------------------
# Checks and small pieces


def test_batch_size_checks_name_the_numbers():
    mesh = make_mesh(jax.devices()[:1])
    assert check_batch_size(8, 4, mesh) == 8
    with pytest.raises(ValueError, match="grad_accum_steps=3"):
        check_batch_size(8, 3, mesh)
    with pytest.raises(ValueError, match=">= 1"):
        check_batch_size(8, 0, mesh)


def test_merge_variables_keeps_fresh_leaves_and_rejects_mismatches():
    fresh = {"params": {"a": np.zeros(2), "b": np.zeros(3)}, "batch_stats": {}}
    merged, kept = ts.merge_variables(fresh, {"params": {"a": np.ones(2)}})
    np.testing.assert_array_equal(merged["params"]["a"], 1.0)
    assert kept == ["params/b"]
    with pytest.raises(ValueError, match="params/a: src has shape"):
        ts.merge_variables(fresh, {"params": {"a": np.ones(4)}}, source="src")
    with pytest.raises(ValueError, match="params/c: not a variable"):
        ts.merge_variables(fresh, {"params": {"c": np.ones(1)}})


def _read_records(path: pathlib.Path) -> list[bytes]:
    data, out, pos = path.read_bytes(), [], 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos : pos + 8])
        assert struct.unpack("<I", data[pos + 8 : pos + 12])[0] == masked_crc32c(data[pos : pos + 8])
        payload = data[pos + 12 : pos + 12 + length]
        assert struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])[0] == masked_crc32c(payload)
        out.append(payload)
        pos += 16 + length
    return out


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        shift += 7
        if not byte & 0x80:
            return value, pos


def _fields(buf: bytes) -> list[tuple[int, object]]:
    """(field number, value) of a protobuf message: varint ints, 8/4-byte raw, length-delimited bytes."""
    pos, out = 0, []
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = struct.unpack("<d", buf[pos : pos + 8])[0], pos + 8
        elif wire == 5:
            value, pos = struct.unpack("<f", buf[pos : pos + 4])[0], pos + 4
        else:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + length], pos + length
        out.append((number, value))
    return out


def test_crc32c_known_value():
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0


def test_metric_writer_jsonl_tensorboard_and_resume(tmp_path):
    writer = MetricWriter(tmp_path)
    writer.write(1, {"loss": 2.5, "lr": np.float32(1e-3)})
    writer.write(2, {"loss": float("nan"), "lr": 2e-3})
    writer.write(3, {"loss": 1.5, "miou": 70.0, "note": "x"})
    writer.close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[0]["loss"] == 2.5 and rows[1]["loss"] == "nan"
    (event_file,) = (tmp_path / "tensorboard").iterdir()
    events = [dict(_fields(r)) for r in _read_records(event_file)]
    assert events[0][3] == b"brain.Event:2"
    scalars = {}
    for event in events[1:]:
        for number, value in _fields(event[5]):
            assert number == 1
            fields = dict(_fields(value))
            scalars[(event[2], fields[1].decode())] = fields[2]
    assert scalars[(1, "loss")] == 2.5 and scalars[(1, "lr")] == pytest.approx(1e-3)
    assert (2, "loss") not in scalars and scalars[(2, "lr")] == pytest.approx(2e-3)  # NaN not plotted
    assert scalars[(3, "miou")] == 70.0 and (3, "note") not in scalars
    # resuming at step 2 drops the rows the interrupted run wrote after its checkpoint
    MetricWriter(tmp_path, resume_step=2).close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
    # a rerun of a complete run (at step 2) drops that step's evaluation row, which it computes again
    writer = MetricWriter(tmp_path, resume_step=2)
    writer.write(2, {"miou": 60.0})
    writer.close()
    MetricWriter(tmp_path, resume_step=2, redo_key="miou").close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and "miou" not in rows[1]
    # a torn last line (killed writer) is ignored
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 2


def test_data_wait_advice_only_on_accelerators_and_above_the_threshold():
    assert train.data_wait_advice(0.9, "cpu", 4) is None  # workers would take the update step's cores
    assert train.data_wait_advice(train.DATA_WAIT_ADVICE, "gpu", 4) is None
    advice = train.data_wait_advice(0.45, "gpu", 4)
    assert "GPUs waited for training data 45% of the time" in advice and "--config.data.num_workers (now 4" in advice


def test_run_cli_exit_statuses_and_messages(capsys):
    """The evaluation, prediction and prototype command lines: 0; ``error: ...`` and 1 for a user error; Ctrl-C
    says what was kept, 130; anything else propagates with its traceback."""

    def interrupted():
        raise KeyboardInterrupt

    def missing():
        raise FileNotFoundError("no such video: a.mp4")

    def bug():
        raise RuntimeError("a bug")

    assert run_cli(lambda: None, (FileNotFoundError,), "kept") == 0
    assert run_cli(missing, (FileNotFoundError, ValueError), "kept") == 1
    assert capsys.readouterr().err == "error: no such video: a.mp4\n"
    assert run_cli(interrupted, (FileNotFoundError,), "the store keeps 3 videos") == 130
    assert capsys.readouterr().err == "\ninterrupted: the store keeps 3 videos\n"
    with pytest.raises(RuntimeError, match="a bug"):
        run_cli(bug, (FileNotFoundError,), "kept")


def test_run_files_are_readable_by_checkpoint_module(tmp_path):
    from cffm_jax.checkpoint import read_model_file

    config = smoke.get_config()
    train.write_run_files(config, tmp_path)
    model, meta = read_model_file(tmp_path)
    assert model == config.model and meta["source"] == "cffm_jax.train"
    assert json.loads((tmp_path / "config.json").read_text())["total_steps"] == config.total_steps


def test_config_checks():
    config = smoke.get_config()
    config.model.num_classes = 7
    with pytest.raises(ValueError, match="num_classes"):
        train.check_config(config)
    config = smoke.get_config("cffmpp")
    with pytest.raises(ValueError, match="prototypes_dir"):
        train.check_config(config)
    config = smoke.get_config()
    config.data.img_scale = (1, 2, 3)
    with pytest.raises(experiment_config.ConfigError, match=r"img_scale must be two positive integers \(W, H\)"):
        train.check_config(config)
    config = smoke.get_config()
    config.data.crop_size = (0, 64)
    with pytest.raises(experiment_config.ConfigError, match="config.data.crop_size"):
        train.check_config(config)


def test_bfloat16_on_a_cpu_is_said_to_be_slow(caplog):
    """A user who picks model.dtype=bfloat16 on a CPU learns that it is slower there (the tools warn once)."""
    from cffm_jax.checkpoint import warn_if_slow_dtype
    from cffm_jax.models import model_config

    with caplog.at_level(logging.WARNING):
        warn_if_slow_dtype(model_config("cffm_b0"))
        assert not caplog.records
        warn_if_slow_dtype(model_config("cffm_b0", dtype="bfloat16"))
    assert any("slower than float32" in r.getMessage() for r in caplog.records)

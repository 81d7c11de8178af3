"""cffm_jax.compilation_cache: the entry points keep compiled programs on disk (jax's persistent cache).

The whole path (a training run writes its programs into the default directory) is checked by
tests/test_train_e2e.py, whose subprocesses use it.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.experimental.compilation_cache import compilation_cache as jax_cache

from cffm_jax import compilation_cache, evaluate, predict, prototypes
from cffm_jax.compilation_cache import ENV_VAR


@pytest.fixture
def jax_settings():
    """Restores jax's cache settings (process-wide) after the test, and forgets the cache it opened."""
    saved = {
        name: getattr(jax.config, name)
        for name in ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    }
    yield
    for name, value in saved.items():
        jax.config.update(name, value)
    jax_cache.reset_cache()


def test_default_directory_holds_compiled_programs(jax_settings, monkeypatch, tmp_path):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    expected = tmp_path / "cffm_jax" / "xla"
    assert compilation_cache.enable() == str(expected)
    assert jax.config.jax_compilation_cache_dir == str(expected)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.block_until_ready(jax.jit(lambda x: jnp.sin(x) * 3.0 + 0.25)(jnp.arange(7.0)))  # a program new to the process
    assert any(p.name.startswith("jit_") for p in expected.iterdir())


def test_environment_variable_names_the_directory_or_turns_it_off(jax_settings, monkeypatch, tmp_path):
    monkeypatch.setenv(ENV_VAR, "0")
    assert compilation_cache.enable() is None
    assert not jax.config.jax_compilation_cache_dir
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "mine"))
    assert compilation_cache.enable() == str(tmp_path / "mine")
    assert (tmp_path / "mine").is_dir()


def test_jax_own_setting_is_kept(jax_settings, monkeypatch, tmp_path):
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "users"))
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "ours"))
    assert compilation_cache.enable() == str(tmp_path / "users")
    assert not (tmp_path / "ours").exists()


def test_unusable_directory_leaves_the_cache_off_with_a_warning(jax_settings, monkeypatch, tmp_path, caplog):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv(ENV_VAR, str(blocker / "xla"))
    with caplog.at_level(logging.WARNING, logger="cffm_jax.compilation_cache"):
        assert compilation_cache.enable() is None
    assert not jax.config.jax_compilation_cache_dir
    assert str(blocker / "xla") in caplog.text and ENV_VAR in caplog.text


@pytest.mark.parametrize(
    "entry_point, argv",
    [
        (evaluate.main, ["--config", "no_such_config.py"]),
        (prototypes.main, ["--config", "no_such_config.py"]),
        (predict.main, ["--checkpoint", "none", "--input", "no_such_video", "--output", "none_out"]),
    ],
    ids=["evaluate", "prototypes", "predict"],
)
def test_entry_points_turn_it_on(jax_settings, monkeypatch, tmp_path, entry_point, argv):
    """Each command enables the cache before its work (here the work fails at once on a missing file)."""
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises((OSError, ValueError)):
        entry_point(argv)
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "cache")


def test_evaluate_command_says_where_the_cache_is(tmp_path):
    """The real command line (a fresh interpreter): the cache is on and its INFO line reaches the user (grain's
    root handler would swallow it without ``logging_utils.configure_cli_logging``); a missing config then fails."""
    env = {**os.environ, ENV_VAR: str(tmp_path / "cache")}
    out = subprocess.run(
        [sys.executable, "-m", "cffm_jax.evaluate", "--config", str(tmp_path / "no_such_config.py")],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 1, out.stderr
    assert f"INFO cffm_jax.compilation_cache: XLA compilation cache: {tmp_path / 'cache'}" in out.stderr
    assert "no_such_config.py" in out.stderr

"""Shared test set-up: XLA flags, float32 matmuls at full precision, and access to the parity fixtures."""

import json
import os
import pathlib
import subprocess
import sys

# Tiny models in tests are dominated by XLA compile time; backend optimisations off halves it. The parity CLI test
# runs the user's path (default flags) in a subprocess.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
# Tests call the entry points in this process, after jax has started: glibc's malloc settings stay as they are here
# (cffm_jax.host_memory is tested in fresh interpreters, tests/test_host_memory.py).
os.environ.setdefault("CFFM_JAX_RETAIN_FREED_MEMORY", "0")
# Nor do they write a compilation cache into the home directory (tests/test_compilation_cache.py tests it).
os.environ.setdefault("CFFM_JAX_COMPILATION_CACHE", "0")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


def run_on_fake_devices(script: str, devices: int, *args: str, timeout: int = 600) -> str:
    """Run ``python -c script *args`` in a fresh process with ``devices`` fake CPU devices; its stdout (it must
    exit 0)."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def load_fixture(name: str) -> tuple[dict[str, np.ndarray], dict]:
    """A fixture's arrays and its parsed ``meta``."""
    with np.load(FIXTURES / name) as data:
        arrays = {k: data[k] for k in data.files if k != "meta"}
        meta = json.loads(str(data["meta"]))
    return arrays, meta


@pytest.fixture(scope="session")
def cffm_tiny():
    return load_fixture("cffm_tiny.npz")


@pytest.fixture(scope="session")
def cffmpp_tiny():
    return load_fixture("cffmpp_tiny.npz")

"""Shared test set-up: float32 matmuls at full precision, and access to the parity fixtures."""

import json
import pathlib

import jax
import numpy as np
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


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

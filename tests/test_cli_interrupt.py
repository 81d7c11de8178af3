"""Ctrl-C of the command-line entry points (``cffm_jax.logging_utils.run_cli``) is never lost."""

import subprocess
import sys
import time

_SCRIPT = """
import signal, sys, time
from cffm_jax.logging_utils import run_cli


class DropsItsException:
    def __del__(self):
        signal.raise_signal(signal.SIGINT)  # the KeyboardInterrupt is raised inside __del__, where Python drops it


def main():
    DropsItsException()
    start = time.time()
    while time.time() - start < 20:
        time.sleep(0.05)
    print("RAN TO THE END")


sys.exit(run_cli(main, (), "what was kept"))
"""


def test_an_interrupt_dropped_by_python_is_delivered_again():
    """A Ctrl-C that arrives while Python runs a callback whose exceptions it drops (``__del__`` here, jax's
    garbage-collection callback in the audit) is delivered again: exit status 130 within seconds, not the whole
    command run to its end with status 0."""
    start = time.time()
    out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=60)
    assert "Exception ignored" in out.stderr and "KeyboardInterrupt" in out.stderr, out.stderr  # it was dropped
    assert out.returncode == 130, (out.returncode, out.stdout, out.stderr)
    assert "interrupted: what was kept" in out.stderr and "RAN TO THE END" not in out.stdout
    assert time.time() - start < 15

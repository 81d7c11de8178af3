"""A persistent XLA compilation cache for the command-line entry points, so a program compiles once per machine.

Compiling is a large part of a short run: on an H100 the CFFM-B1 encoder at 480 x 864 compiles in 63 s with float32
products at 'highest' (XLA autotunes every float32 matrix product; 15 s at TF32), its decoder in more than 20 s,
and streaming evaluation compiles six programs per frame-size bucket; on a 2-core CPU the demo's programs take
tens of seconds. jax can keep compiled executables on disk (``jax_compilation_cache_dir``), keyed by the program,
the compiler options, the device and the jax version, and load them instead of compiling when the same program
comes again: the second run of a training, evaluation or prediction command, a resumed run, another video of a
size seen before.

:func:`enable` turns it on in ``$XDG_CACHE_HOME/cffm_jax/xla`` (``~/.cache/cffm_jax/xla``). The environment
variable ``CFFM_JAX_COMPILATION_CACHE`` names another directory, or ``0`` to leave the cache off; a cache the user
set up for jax already (``JAX_COMPILATION_CACHE_DIR``) is kept. jax's own settings apply as usual: only programs
whose compilation took at least ``jax_persistent_cache_min_compile_time_secs`` (1 s) are written, and a directory
that cannot be created or written leaves the cache off, with a warning. Nothing is ever evicted: delete the
directory to reclaim its space.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import jax

log = logging.getLogger(__name__)

ENV_VAR = "CFFM_JAX_COMPILATION_CACHE"


def default_dir() -> Path:
    """``$XDG_CACHE_HOME/cffm_jax/xla``, ``~/.cache/cffm_jax/xla`` without it."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cffm_jax" / "xla"


def enable() -> str | None:
    """Turn on jax's persistent compilation cache (see the module doc); returns its directory, None when off."""
    current = jax.config.jax_compilation_cache_dir
    if current:
        log.info("XLA compilation cache: %s (jax's setting)", current)
        return current
    setting = os.environ.get(ENV_VAR)
    if setting == "0":
        return None
    path = Path(setting).expanduser() if setting else default_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
        writable = os.access(path, os.W_OK | os.X_OK)
    except OSError as e:
        writable, reason = False, str(e)
    else:
        reason = "not writable"
    if not writable:  # jax would warn at every compilation instead
        log.warning("XLA compilation cache off: %s: %s (set %s to a writable directory, or 0)", path, reason, ENV_VAR)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    log.info("XLA compilation cache: %s (%s=0 turns it off)", path, ENV_VAR)
    return str(path)

"""Where the time goes for float32 at a given matmul precision on an accelerator (one-off diagnostic).

    python scripts/gpu_diag_precision.py highest|high|default [--xla-defaults]

Prints, with timestamps: an 8192^3 matmul and a 7x7/4 convolution (compile, run), then CFFM-B1 clip mode at
480x864 (encoder and decoder: compile, first run, best of 3). Every program compiles with the project's options for
its precision (``cffm_jax.xla_options``: at 'highest' on a GPU, cuBLAS GEMMs only), or with ``--xla-defaults``
with XLA's own (Triton GEMMs, autotuned).
"""

import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from cffm_jax import streaming, xla_options
from cffm_jax.benchmark import aot_compile, random_variables, time_runs
from cffm_jax.models import build_model, model_config
from cffm_jax.models.cffm import quarter_size
from cffm_jax.models.layers import matmul_precision_scope

T0 = time.perf_counter()


def say(msg):
    print(f"[{time.perf_counter() - T0:7.2f} s] {msg}", flush=True)


def timed(name, compiled, *args, n=3):
    first, runs = time_runs(lambda: jax.block_until_ready(compiled(*args)), n, 1)
    say(f"{name}: first run {first * 1e3:.1f} ms, best of {n} {min(wall for wall, _ in runs) * 1e3:.2f} ms")


def compile_(name, fn, *args, options=None):
    compiled, seconds = aot_compile(fn, *args, compiler_options=options)
    say(f"{name}: compiled in {seconds:.1f} s")
    return compiled


precision = sys.argv[1]
if "--xla-defaults" in sys.argv[2:]:
    xla_options.use_xla_defaults()
OPTIONS = xla_options.compiler_options("default", precision)
say(f"precision {precision}, jax {jax.__version__}, {jax.devices()}, options {OPTIONS}")
a = jnp.asarray(np.random.default_rng(0).standard_normal((8192, 8192), np.float32))
with matmul_precision_scope(precision):
    mm = compile_("matmul 8192^3", lambda x, y: x @ y, a, a, options=OPTIONS)
timed("matmul 8192^3", mm, a, a)
x = jnp.ones((4, 480, 864, 3), jnp.float32)
w = jnp.ones((7, 7, 3, 64), jnp.float32)
conv_fn = functools.partial(
    jax.lax.conv_general_dilated,
    window_strides=(4, 4),
    padding=((3, 3), (3, 3)),
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
)
with matmul_precision_scope(precision):
    conv = compile_("conv 7x7/4", conv_fn, x, w, options=OPTIONS)
timed("conv 7x7/4", conv, x, w)

config = model_config("cffm_b1", dtype="float32", matmul_precision=precision)
model = build_model(config)
variables = jax.device_put(random_variables(config))
clip = jax.device_put(np.random.default_rng(2).standard_normal((1, 4, 480, 864, 3), np.float32))
say("model built")
encode = compile_(
    "encoder",
    functools.partial(streaming.encode_clips, model, None, False),
    variables,
    clip,
    options=xla_options.compiler_options("encoder", precision),
)
timed("encoder", encode, variables, clip)
feats = encode(variables, clip)[1]
decode = compile_(
    "decoder",
    functools.partial(streaming.decode_clips, model, quarter_size((480, 864)), None),
    variables,
    feats,
    None,
    options=xla_options.compiler_options("default", precision),
)
timed("decoder", decode, variables, feats, None)
say("done")

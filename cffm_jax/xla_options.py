"""XLA compiler options per kind of program, and a ``jax.jit`` that picks them when it is first called.

On XLA:CPU (jaxlib 0.10.2) the YNNPACK library fusions that are on by default make the MiT backbone slower: its
matrix products are long and thin (stage 1 of four 480x480 frames: 57,600 x 32 tokens times 32 x 128 weights),
and XLA's own (Eigen) path computes them 8-18% faster. The cross-frame attention and the heads at 1/8 resolution
(3,600 x 256 times 256 x 1,024) are ~10% faster *with* YNNPACK. So programs that encode frames (the backbone and
the per-frame decoder: clip-mode forward, streaming encode, prototype features) compile without the YNNPACK
fusions on CPU, and the temporal decode step keeps XLA's default. Measured in ``BENCHMARKS.md``.

On GPUs, programs whose float32 products run at 'highest' (the models' default ``matmul_precision``, full float32:
the official numbers; ``kmeans``) compile with cuBLAS alone for their matrix products
(``xla_gpu_enable_triton_gemm=False``). With XLA's Triton GEMMs, which it autotunes among many more candidate
kernels at that precision, the CFFM-B1 encoder at 480x864 compiled in 63.5 s on an H100 and the whole training step
did not compile within 100 s; with cuBLAS alone the encoder compiles in 2.5 s and the decoder in 2.8 s on an H200,
and run as fast (encoder 8.39 ms against Triton's 9.07 on the H100; ``BENCHMARKS.md``, section "GPU"). Full float32
has no tensor-core path, so Triton has nothing to add there. Programs at other precisions (XLA's default: TF32 on
GPUs; bfloat16 models at 'default') keep XLA's own choice.

The options change only which library computes a matrix product (float32 sums in another order: outputs move by
~1e-6, the parity tests keep their tolerance). On TPU no option is passed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax

# Program kind -> XLA:CPU debug options.
CPU_OPTIONS: dict[str, dict[str, str]] = {
    "encoder": {"xla_cpu_experimental_ynn_fusion_type": ""},  # '' = no YNNPACK fusion
    "default": {},
}
# XLA:GPU options of programs whose float32 products run at 'highest' (any kind): cuBLAS GEMMs only.
GPU_HIGHEST_OPTIONS: dict[str, Any] = {"xla_gpu_enable_triton_gemm": False}


_use_xla_defaults = False


def use_xla_defaults() -> None:
    """From now on every program compiles with XLA's defaults (for A/B measurements; call before first use)."""
    global _use_xla_defaults
    _use_xla_defaults = True


def _check_kind(kind: str) -> None:
    if kind not in CPU_OPTIONS:
        raise ValueError(f"unknown program kind {kind!r}; valid: {sorted(CPU_OPTIONS)}")


def compiler_options(kind: str, precision: str | None = None) -> dict[str, Any] | None:
    """Options for a program of ``kind`` ('encoder' or 'default') on the default backend (None: XLA's own).

    ``precision``: the float32 matmul precision the program's products run at (a model's ``matmul_precision``;
    None or 'default': XLA's).
    """
    _check_kind(kind)
    if _use_xla_defaults:
        return None
    backend = jax.default_backend()
    if backend == "cpu":
        return dict(CPU_OPTIONS[kind]) or None
    if backend == "gpu" and precision == "highest":
        return dict(GPU_HIGHEST_OPTIONS)
    return None


class _LazyJit:
    """``jax.jit(fun, compiler_options=compiler_options(kind, precision), **kwargs)``, built on first use.

    Deferring the choice keeps imports from initialising a backend (``jax.distributed.initialize`` must come
    first on multi-host runs). With ``model_argnum`` the precision is that of the (static) model argument: one
    ``jax.jit`` per precision seen.
    """

    def __init__(
        self, fun: Callable, kind: str, precision: str | None, model_argnum: int | None, jit_kwargs: dict[str, Any]
    ):
        functools.update_wrapper(self, fun)
        self._fun, self._kind, self._precision, self._model_argnum = fun, kind, precision, model_argnum
        self._jit_kwargs = jit_kwargs
        self._jitted: dict[str | None, Any] = {}

    def jitted(self, *args: Any) -> Any:
        """The ``jax.jit`` of ``fun`` for a call with ``args``."""
        precision = self._precision if self._model_argnum is None else args[self._model_argnum].matmul_precision
        if precision not in self._jitted:
            options = compiler_options(self._kind, precision)
            self._jitted[precision] = jax.jit(self._fun, compiler_options=options, **self._jit_kwargs)
        return self._jitted[precision]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.jitted(*args)(*args, **kwargs)

    def lower(self, *args: Any, **kwargs: Any) -> Any:
        return self.jitted(*args).lower(*args, **kwargs)

    def _cache_size(self) -> int:
        return sum(jitted._cache_size() for jitted in self._jitted.values())


def jit(
    kind: str, *, precision: str | None = None, model_argnum: int | None = None, **jit_kwargs: Any
) -> Callable[[Callable], _LazyJit]:
    """Decorator: ``@xla_options.jit('encoder', model_argnum=0, static_argnums=0)`` = ``jax.jit`` with the options
    of ``kind`` at the matmul ``precision`` of its products (fixed, or the model argument's at ``model_argnum``)."""
    _check_kind(kind)
    return lambda fun: _LazyJit(fun, kind, precision, model_argnum, jit_kwargs)

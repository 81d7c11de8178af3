"""XLA compiler options per kind of program, and a ``jax.jit`` that picks them when it is first called.

On XLA:CPU (jaxlib 0.10.2) the YNNPACK library fusions that are on by default make the MiT backbone slower: its
matrix products are long and thin (stage 1 of four 480x480 frames: 57,600 x 32 tokens times 32 x 128 weights),
and XLA's own (Eigen) path computes them 8-18% faster. The cross-frame attention and the heads at 1/8 resolution
(3,600 x 256 times 256 x 1,024) are ~10% faster *with* YNNPACK. So programs that encode frames (the backbone and
the per-frame decoder: clip-mode forward, streaming encode, prototype features) compile without the YNNPACK
fusions on CPU, and the temporal decode step keeps XLA's default. Measured in ``BENCHMARKS.md``.

The options change only which library computes a matrix product (float32 sums in another order: outputs move by
~1e-6, the parity tests keep their tolerance). On GPU and TPU no option is passed.
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


_use_xla_defaults = False


def use_xla_defaults() -> None:
    """From now on every program compiles with XLA's defaults (for A/B measurements; call before first use)."""
    global _use_xla_defaults
    _use_xla_defaults = True


def _check_kind(kind: str) -> None:
    if kind not in CPU_OPTIONS:
        raise ValueError(f"unknown program kind {kind!r}; valid: {sorted(CPU_OPTIONS)}")


def compiler_options(kind: str) -> dict[str, str] | None:
    """Options for a program of ``kind`` ('encoder' or 'default') on the default backend (None: XLA's own)."""
    _check_kind(kind)
    if _use_xla_defaults or jax.default_backend() != "cpu":
        return None
    return dict(CPU_OPTIONS[kind]) or None


class _LazyJit:
    """``jax.jit(fun, compiler_options=compiler_options(kind), **kwargs)``, built on first use.

    Deferring the choice keeps imports from initialising a backend (``jax.distributed.initialize`` must come
    first on multi-host runs).
    """

    def __init__(self, fun: Callable, kind: str, jit_kwargs: dict[str, Any]):
        functools.update_wrapper(self, fun)
        self._fun, self._kind, self._jit_kwargs = fun, kind, jit_kwargs
        self._jitted: Any = None

    @property
    def jitted(self) -> Any:
        if self._jitted is None:
            self._jitted = jax.jit(self._fun, compiler_options=compiler_options(self._kind), **self._jit_kwargs)
        return self._jitted

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.jitted(*args, **kwargs)

    def lower(self, *args: Any, **kwargs: Any) -> Any:
        return self.jitted.lower(*args, **kwargs)

    def _cache_size(self) -> int:
        return self.jitted._cache_size()


def jit(kind: str, **jit_kwargs: Any) -> Callable[[Callable], _LazyJit]:
    """Decorator: ``@xla_options.jit('encoder', static_argnums=0)`` = ``jax.jit`` with the options of ``kind``."""
    _check_kind(kind)
    return lambda fun: _LazyJit(fun, kind, jit_kwargs)

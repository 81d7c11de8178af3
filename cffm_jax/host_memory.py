"""Keep freed host memory in the process, on huge pages, so that XLA:CPU does not fault its buffers in every run.

XLA:CPU allocates a program's temporary and output buffers with ``malloc`` on every execution. glibc serves
large requests (above 32 MiB, and above a dynamic threshold below that) with fresh ``mmap`` regions, from a
per-thread arena whose own heaps are capped at 64 MiB, and gives the pages back to the kernel on ``free``. So every
run touches its buffers' pages for the first time again, and each first touch is a page fault that zeroes a 4 KiB
page: ~507,000 faults (~2 GB) per CFFM-B0 training step at 1 x 4 x 480 x 480, ~350,000 per MiT-B0 forward and
backward. :func:`retain_freed_memory` makes glibc keep freed memory for reuse (one malloc arena, no ``mmap``, no
trimming: what ``MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0`` and a huge ``MALLOC_TRIM_THRESHOLD_`` would set), and
marks the heap it grows into for transparent huge pages (2 MiB pages: fewer TLB misses on the large buffers):
zero faults per step, and a CPU training step ~8% faster (BENCHMARKS.md).

The huge-page part: the heap is grown once by half of the machine's memory, address space only (no page is
touched, RSS does not change), that range is ``madvise``-d ``MADV_HUGEPAGE`` and freed again; with trimming off it
stays the heap's free top, from which later buffers are carved. Skipped where the kernel has transparent huge
pages off or the reservation fails (strict overcommit).

The price: the process keeps the memory of its peak (RSS does not shrink after a large program has run;
:func:`release_free_memory` hands free pages back on demand). And after a much larger workload in the same
process, smaller programs run slower: MiT-B0 inference 0.19 -> 0.25 s after a CFFM-B0 training step had grown the
heap to 3.8 GB (still on huge pages; with glibc's defaults 0.21 s before and after; handing the free pages back
made it 0.28-0.38 s, off huge pages). Buffers carved from a large fragmented heap, presumably; not resolved. It
concerns evaluation inside a CPU training run (BENCHMARKS.md). The command-line entry points call it first thing;
``CFFM_JAX_RETAIN_FREED_MEMORY=0`` keeps glibc's defaults. Programs that import the library call it themselves if
they want it, before jax starts its threads (the first computation or ``jax.devices()``): a thread that has
allocated before keeps its own arena (a warning says so). Only glibc (Linux) has these settings; elsewhere the
functions do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import platform
import tempfile

log = logging.getLogger(__name__)

ENV_VAR = "CFFM_JAX_RETAIN_FREED_MEMORY"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"

# <malloc.h> parameter numbers, and madvise's MADV_HUGEPAGE.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_NEVER_TRIM = -1  # mallopt(3): -1 disables trimming
_MADV_HUGEPAGE = 14
_HUGE_PAGE = 2 * 2**20

_state = {"retained": False, "huge_pages": 0}


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.fdopen.argtypes = [ctypes.c_int, ctypes.c_char_p]
    libc.fdopen.restype = ctypes.c_void_p
    libc.fclose.argtypes = [ctypes.c_void_p]
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    return libc


def _arena_count(libc: ctypes.CDLL) -> int:
    """How many malloc arenas exist (``malloc_info``'s XML has one ``<heap>`` per arena)."""
    with tempfile.TemporaryFile() as f:
        stream = libc.fdopen(os.dup(f.fileno()), b"w")
        libc.malloc_info(0, stream)
        libc.fclose(stream)
        f.seek(0)
        return f.read().count(b"<heap nr=")


def retain_freed_memory() -> bool:
    """Make glibc keep and reuse freed memory, on huge pages where it can; True if it is now in effect.

    Does nothing (False) off glibc or when the environment variable ``CFFM_JAX_RETAIN_FREED_MEMORY`` is ``0``.
    Idempotent. Raises ``RuntimeError`` if glibc refuses a setting.
    """
    if _state["retained"]:
        return True
    if os.environ.get(ENV_VAR, "1").strip() == "0":
        log.info("%s=0: glibc's default malloc settings kept", ENV_VAR)
        return False
    libc = _glibc()
    if libc is None:
        return False
    for name, param, value in (
        ("M_ARENA_MAX", _M_ARENA_MAX, 1),
        ("M_MMAP_MAX", _M_MMAP_MAX, 0),
        ("M_TRIM_THRESHOLD", _M_TRIM_THRESHOLD, _NEVER_TRIM),
    ):
        if libc.mallopt(param, value) != 1:
            raise RuntimeError(f"glibc mallopt({name}, {value}) failed; set {ENV_VAR}=0 to skip these settings")
    _state["retained"] = True
    arenas = _arena_count(libc)
    if arenas > 1:
        log.warning(
            "retain_freed_memory() came after threads with their own malloc arenas (%d arenas): their large "
            "buffers are still mmapped and page-faulted in on every use; call it before the first jax computation",
            arenas,
        )
    _state["huge_pages"] = _reserve_huge_pages(libc)
    log.info(
        "host memory: freed memory kept for reuse (glibc: one arena, no mmap, no trim), %.1f GiB of heap on huge "
        "pages; %s=0: off",
        _state["huge_pages"] / 2**30,
        ENV_VAR,
    )
    return True


def huge_page_bytes() -> int:
    """Bytes of heap address space marked for transparent huge pages by :func:`retain_freed_memory` (0: none)."""
    return _state["huge_pages"]


def _reserve_huge_pages(libc: ctypes.CDLL) -> int:
    """Grows the heap by half the machine's memory (untouched), marks it ``MADV_HUGEPAGE``, frees it; its size."""
    try:
        with open(THP_MODE_FILE) as f:
            if "[never]" in f.read():
                return 0
        size = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (OSError, ValueError):
        return 0
    block = libc.malloc(size)
    if not block:
        return 0
    start = -(-block // _HUGE_PAGE) * _HUGE_PAGE
    end = (block + size) // _HUGE_PAGE * _HUGE_PAGE
    advised = libc.madvise(start, end - start, _MADV_HUGEPAGE) == 0
    libc.free(block)
    if not advised:
        log.info("madvise(MADV_HUGEPAGE) failed (errno %d): the heap stays on 4 KiB pages", ctypes.get_errno())
    return end - start if advised else 0


def release_free_memory() -> bool:
    """Hand free heap pages back to the kernel now (``malloc_trim(0)``); True if any were released.

    The huge-page reservation of :func:`retain_freed_memory` is part of what is released; it is made again.
    """
    libc = _glibc()
    if libc is None:
        return False
    released = bool(libc.malloc_trim(0))
    if _state["huge_pages"]:
        _state["huge_pages"] = _reserve_huge_pages(libc)
    return released

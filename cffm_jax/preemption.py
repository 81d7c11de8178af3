"""Stopping a training run cleanly: SIGTERM (a scheduler's notice) or Ctrl-C saves a checkpoint and ends the run.

Cluster schedulers send SIGTERM before they preempt a job or when its time is up (SLURM: ``--signal=TERM@120``,
Kubernetes: the pod's grace period). Without handling, the process dies at once and everything since the last
periodic checkpoint is lost (``checkpoint_every`` is 4000 steps in the VSPW configs). With :class:`StopSignals`
the training loop finishes the step in flight, saves a checkpoint and returns; running the same command again
resumes from it.

* One process: SIGTERM and the first SIGINT (Ctrl-C) ask for the stop. A second signal of the same kind acts as
  usual (Ctrl-C raises ``KeyboardInterrupt``, SIGTERM ends the process): the way out when the save itself hangs.
* Several processes (``jax.distributed``): every process must stop at the same step, or the others wait forever
  in the next collective. JAX's preemption service takes SIGTERM in each process and agrees on that step
  (``multihost_utils.reached_preemption_sync_point``): a SIGTERM to any one process stops all of them. Ctrl-C is
  left alone there (it interrupts at once, without a checkpoint).

The training data's worker processes ignore both signals (:func:`cffm_jax.data.pipeline.make_train_dataset`):
the main process stops them when it closes its iterator.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

import jax

log = logging.getLogger(__name__)

#: The exit status of a run stopped by a signal: the shell's 128 + signal number (SIGTERM 143, SIGINT 130).
EXIT_BASE = 128


class StopSignals:
    """Context manager: turns SIGTERM (and, in one process, Ctrl-C) into a stop request that the loop polls.

    Call :meth:`requested` once per step, with the step number, on every process. Handlers are installed only
    in the main thread (elsewhere signals cannot be handled; nothing changes) and restored on exit.
    """

    def __init__(self) -> None:
        self.signal: signal.Signals | None = None
        self._multi_process = jax.distributed.is_initialized()
        self._previous: dict[signal.Signals, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self
        wanted = () if self._multi_process else (signal.SIGTERM, signal.SIGINT)
        for sig in wanted:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        if self.signal is None:
            self.signal = sig
            log.warning(
                "%s received: saving a checkpoint after the current step, then stopping (another %s stops at once, "
                "without it)",
                sig.name,
                "Ctrl-C" if sig == signal.SIGINT else sig.name,
            )
        # the next signal of this kind acts as it would have without us
        signal.signal(sig, self._previous.get(sig, signal.SIG_DFL))

    def requested(self, step: int) -> bool:
        """Whether to save and stop after ``step`` (on all processes at the same step)."""
        if self._multi_process:
            from jax.experimental import multihost_utils

            try:
                reached = multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # the preemption service is off (jax_enable_preemption_service=False)
                return False
            if reached and self.signal is None:
                self.signal = signal.SIGTERM
                log.warning("SIGTERM received by a process of this run: saving a checkpoint after step %d", step)
            return reached
        return self.signal is not None

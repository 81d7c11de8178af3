"""Training metrics on disk: ``metrics.jsonl`` and TensorBoard event files without TensorFlow.

:class:`MetricWriter` appends one JSON object per logged step to ``<workdir>/metrics.jsonl`` and the same
scalars to a TensorBoard event file in ``<workdir>/tensorboard/`` (``tensorboard --logdir <workdir>`` reads
it).

The event file is written by :class:`EventFileWriter`, a few lines implementing the format TensorBoard reads
(no ``tensorflow``/``tensorboard``/``tensorboardX`` needed): a TFRecord stream (little-endian uint64 length,
masked CRC-32C of the length, payload, masked CRC-32C of the payload) of ``tensorflow.Event`` protobuf
messages, encoded by hand: ``Event{wall_time=1 (double), step=2 (int64), file_version=3 (string),
summary=5}``, ``Summary{value=1 (repeated)}``, ``Summary.Value{tag=1 (string), simple_value=2 (float)}``.

:func:`configure_cli_logging`, :func:`run_cli` (with :class:`InterruptUntilCaught`) and :func:`check_output_folder`:
logging, errors, Ctrl-C and output folders of the command-line entry points.
"""

from __future__ import annotations

import _thread
import json
import logging
import math
import os
import pathlib
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def configure_cli_logging() -> None:
    """INFO messages of this package, WARNING and above of the others (orbax and absl are chatty at INFO).

    ``force``: grain installs a root handler when it is imported, which would make a plain ``basicConfig`` a
    no-op (and this package's INFO messages invisible).
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger("cffm_jax").setLevel(logging.INFO)


class InterruptUntilCaught:
    """Ctrl-C as Python's default (``KeyboardInterrupt`` in the main thread), repeated every ``interval`` seconds
    until the ``with`` block is left.

    Python drops an exception raised while it runs certain callbacks (``__del__``, jax's garbage-collection
    callback: "Exception ignored in ..."): a Ctrl-C that arrived there was lost and the command ran on to its end,
    once in several tries during the set-up of a training run or an evaluation. The first SIGINT starts a thread
    that interrupts the main thread again while it is not handling a ``KeyboardInterrupt`` (cleanups in ``finally``
    blocks run undisturbed). In threads other than the main one (where signals cannot be handled) it does nothing.
    """

    def __init__(self, interval: float = 1.0):
        self.interval = interval
        self._left = threading.Event()
        self._repeater: threading.Thread | None = None
        self._previous: Any = None
        self._active = False

    def __enter__(self) -> InterruptUntilCaught:
        self._active = threading.current_thread() is threading.main_thread()
        if self._active:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        self._left.set()
        if self._active:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum: int, frame: Any) -> None:
        if self._repeater is None:
            self._repeater = threading.Thread(target=self._repeat, name="interrupt-until-caught", daemon=True)
            self._repeater.start()
        raise KeyboardInterrupt

    def _repeat(self) -> None:
        main = threading.main_thread().ident
        while not self._left.wait(self.interval):
            handling = sys._current_exceptions().get(main)
            if isinstance(handling, tuple):  # Python < 3.12: exc_info triples
                handling = handling[1]
            if not isinstance(handling, KeyboardInterrupt):
                _thread.interrupt_main(signal.SIGINT)


def check_output_folder(
    out: str | os.PathLike, overwrite: bool, own_output: Callable[[pathlib.Path], bool], *keep: Any
) -> None:
    """A command's output folder: absent or empty, or with ``overwrite`` an earlier output of the same command.

    ``overwrite`` replaces (deletes, then writes anew) only what ``own_output`` recognises as the command's own
    output, and never a folder that holds one of the ``keep`` paths (the command's input, checkpoint or data root:
    users have passed a parent folder). Raises FileExistsError naming the folder otherwise.
    """
    out = pathlib.Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass --overwrite to replace it)")
    target = out.resolve()
    for path in keep:
        if path is None or path == "":
            continue
        resolved = pathlib.Path(path).resolve()
        if resolved == target or target in resolved.parents:
            raise FileExistsError(f"{out} holds {path}, which --overwrite would delete: write to another folder")
    if not own_output(out):
        raise FileExistsError(
            f"{out} holds files this command did not write; --overwrite replaces only an earlier output of it: "
            "write to another folder (or empty this one)"
        )


def run_cli(main: Callable[[], object], user_errors: tuple[type[BaseException], ...], interrupted: str) -> int:
    """A command line's exit status: ``main()`` with logging set up; 0 when it returns.

    ``user_errors`` (a setting, file or dataset to fix: their messages say which) print ``error: <message>``
    without a traceback, status 1. Ctrl-C prints ``interrupted: <interrupted>`` (what was kept and how to go on),
    status 130 as the shell's; :class:`InterruptUntilCaught` makes sure that a Ctrl-C is not lost.
    """
    configure_cli_logging()
    try:
        with InterruptUntilCaught():
            main()
    except user_errors as e:
        print(f"error: {e}", file=sys.stderr)  # noqa: T201
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted: {interrupted}", file=sys.stderr)  # noqa: T201
        return 130
    return 0


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of ``data``, as TFRecord uses it."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC: rotate right by 15 and add a constant."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    key = _varint((number << 3) | wire_type)
    if wire_type == 2:  # length-delimited
        return key + _varint(len(payload)) + payload
    return key + payload


def encode_event(
    wall_time: float, step: int, scalars: Mapping[str, float] | None = None, file_version: str = ""
) -> bytes:
    """A serialised ``tensorflow.Event`` with scalar summaries (or only a file version)."""
    out = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
    if file_version:
        out += _field(3, 2, file_version.encode())
    if scalars:
        values = b"".join(
            _field(1, 2, _field(1, 2, tag.encode()) + _field(2, 5, struct.pack("<f", float(value))))
            for tag, value in scalars.items()
        )
        out += _field(5, 2, values)
    return out


def tfrecord(payload: bytes) -> bytes:
    """One TFRecord: length, masked CRC of the length, payload, masked CRC of the payload."""
    length = struct.pack("<Q", len(payload))
    return length + struct.pack("<I", masked_crc32c(length)) + payload + struct.pack("<I", masked_crc32c(payload))


class EventFileWriter:
    """Appends scalar summaries to a new TensorBoard event file in ``logdir``."""

    def __init__(self, logdir: str | os.PathLike):
        logdir = pathlib.Path(logdir)
        logdir.mkdir(parents=True, exist_ok=True)
        now = time.time()
        self.path = logdir / f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}"
        self._file = open(self.path, "ab")  # noqa: SIM115 -- closed in close()
        self._file.write(tfrecord(encode_event(now, 0, file_version="brain.Event:2")))
        self._file.flush()

    def scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Writes finite scalars of one step (NaN/Inf are skipped: TensorBoard plots them badly)."""
        finite = {k: float(v) for k, v in scalars.items() if math.isfinite(float(v))}
        if finite:
            self._file.write(tfrecord(encode_event(time.time(), step, finite)))
            self._file.flush()

    def close(self) -> None:
        self._file.close()


class MetricWriter:
    """JSONL + TensorBoard scalars of a run; a no-op when ``enabled`` is False (processes other than 0).

    Args:
      workdir: the run's directory.
      enabled: write anything at all.
      resume_step: when resuming from a checkpoint at this step, rows of later steps (written by the
        interrupted run after its last checkpoint, and about to be recomputed) are removed from
        ``metrics.jsonl``.
      redo_key: also removed: the rows of ``resume_step`` that have this key (the evaluation of a complete run,
        which a rerun of the same command computes again).
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        enabled: bool = True,
        resume_step: int | None = None,
        redo_key: str | None = None,
    ):
        self.enabled = enabled
        self.path = pathlib.Path(workdir) / METRICS_FILE
        self._events = None
        if not enabled:
            return
        if self.path.exists():
            rows = read_metrics(self.path)
            keep = [r for r in rows if resume_step is not None and r.get("step", 0) <= resume_step]
            keep = [r for r in keep if not (redo_key in r and r.get("step") == resume_step)]
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
            os.replace(tmp, self.path)
        self._events = EventFileWriter(pathlib.Path(workdir) / TENSORBOARD_DIR)

    def write(self, step: int, scalars: Mapping[str, float | int | str]) -> None:
        """Appends ``{'step': step, **scalars}`` (numbers go to TensorBoard too)."""
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _plain(v) for k, v in scalars.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        numbers = {k: v for k, v in row.items() if k != "step" and isinstance(v, int | float)}
        self._events.scalars(int(step), numbers)

    def close(self) -> None:
        if self._events is not None:
            self._events.close()


def _plain(value):
    """numpy/jax scalars -> Python numbers; NaN/Inf become strings (JSON has no NaN)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The rows of a ``metrics.jsonl`` (a torn last line from a killed writer is ignored)."""
    rows = []
    for line in pathlib.Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows

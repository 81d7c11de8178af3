"""Throughput of the CFFM training input pipeline (SPEC.md section 10.3) in clips per second.

    python scripts/benchmark_data.py [--root DIR] [--workers 0 1 2] [--batches 12] [--batch-size 2]

Without ``--root`` it first writes a synthetic dataset of 480x853 frames (480p-like) into a temporary
folder. Each configuration builds a fresh iterator, discards ``--warmup`` batches (worker start-up) and
times the next ``--batches``; crops are 480x480 with the full training transform (resize, crop, flip,
photometric, normalise).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cffm_jax.data import pipeline, synthetic  # noqa: E402


def measure(root: str, *, workers: int, batch_size: int, batches: int, warmup: int, crop: int) -> float:
    it = pipeline.make_train_iterator(
        root,
        batch_size=batch_size,
        crop_size=(crop, crop),
        seed=0,
        num_workers=workers,
        shard_index=0,
        shard_count=1,
    )
    try:
        for _ in range(warmup):
            next(it)
        start = time.perf_counter()
        for _ in range(batches):
            next(it)
        elapsed = time.perf_counter() - start
    finally:
        pipeline.close_train_iterator(it)
    return batches * batch_size / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", help="dataset folder (default: a fresh synthetic 480x853 dataset)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--crop", type=int, default=480)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root
        if root is None:
            start = time.perf_counter()
            root = synthetic.generate(
                os.path.join(tmp, "vspw"), videos=6, val_videos=0, test_videos=0, frames=20, size=(480, 853)
            )
            print(f"synthetic dataset: 6 videos x 20 frames, 480x853, {time.perf_counter() - start:.1f} s")
        print(f"cpu cores: {os.cpu_count()}, batch {args.batch_size}, crop {args.crop}x{args.crop}")
        print("| workers | clips/s | frames/s |")
        print("|---|---|---|")
        for workers in args.workers:
            rate = measure(
                root,
                workers=workers,
                batch_size=args.batch_size,
                batches=args.batches,
                warmup=args.warmup,
                crop=args.crop,
            )
            print(f"| {workers} | {rate:.2f} | {4 * rate:.1f} |", flush=True)


if __name__ == "__main__":
    main()

"""Throughput of the CFFM input pipelines (SPEC.md section 10.3): training clips and evaluation frames per second.

    python scripts/benchmark_data.py [--root DIR] [--workers 0 1 2] [--batches 12] [--batch-size 2]
        [--eval-threads 1 2]

Without ``--root`` it first writes a synthetic dataset of 480x853 frames (480p-like) into a temporary
folder. Training: each configuration builds a fresh iterator, discards ``--warmup`` batches (worker start-up) and
times the next ``--batches``; crops are 480x480 with the full training transform (resize, crop, flip,
photometric, normalise). Evaluation: every frame of the validation videos (decode, test transform to 864x480,
mask) loaded in order on ``--eval-threads`` threads, as ``python -m cffm_jax.evaluate`` loads them
(:func:`cffm_jax.streaming.ordered_map`), with the entry points' malloc setting (``cffm_jax.host_memory``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cffm_jax import host_memory  # noqa: E402
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


def measure_eval(root: str, *, threads: int) -> tuple[float, int]:
    """(frames per second, frames) of loading every validation frame in order on ``threads`` threads."""
    from cffm_jax.streaming import ordered_map

    videos = pipeline.list_eval_videos(root, "val")
    start = time.perf_counter()
    frames = 0
    for video in videos:
        for frame in ordered_map(video.load, range(video.num_frames), threads):
            frames += frame.label is not None
    return frames / (time.perf_counter() - start), frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", help="dataset folder (default: a fresh synthetic 480x853 dataset)")
    parser.add_argument("--workers", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--crop", type=int, default=480)
    parser.add_argument("--eval-threads", type=int, nargs="*", default=[1, 2])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    host_memory.retain_freed_memory()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root
        if root is None:
            start = time.perf_counter()
            root = synthetic.generate(
                os.path.join(tmp, "vspw"), videos=6, val_videos=2, test_videos=0, frames=20, size=(480, 853)
            )
            print(f"synthetic dataset: 6 + 2 videos x 20 frames, 480x853, {time.perf_counter() - start:.1f} s")
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
        if args.eval_threads:
            measure_eval(root, threads=1)  # warm-up: file cache, allocator
            print("\n| evaluation loader threads | frames/s |")
            print("|---|---|")
            for threads in args.eval_threads:
                rate, frames = measure_eval(root, threads=threads)
                print(f"| {threads} | {rate:.1f} ({frames} frames) |", flush=True)


if __name__ == "__main__":
    main()

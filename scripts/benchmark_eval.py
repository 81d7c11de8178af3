"""End-to-end evaluation throughput (``cffm_jax.evaluate.evaluate_videos``): frames per second with N loader threads.

    python scripts/benchmark_eval.py [--model cffm_b1] [--videos 2] [--frames 40] [--size 480x853]
        [--loader-threads 1 8] [--matmul-precision default] [--root DIR] [--sample-main] [--without-metrics]
        [--loader-processes 8 16] [--tiny] [--batch-size N] [--repeats 1]

Writes a synthetic VSPW-layout validation split of ``--videos`` videos (``--size`` frames, the model's class count)
into a temporary folder (or ``--root``, kept, and reused when it is there already) and evaluates a model with
random weights on it, as ``python -m cffm_jax.evaluate`` does (streaming, the official test transform, metrics), once
per ``--loader-threads`` value, after a warm-up run on the first video (compilation; the persistent compilation
cache is on, as in the entry points). The figures are the evaluation's own frames per second (loading, model,
metrics). On a GPU they show whether loading frames keeps up with the device (one thread loads ~110 480x853 frames/s
on a 2-core Zen 4, ~45 on the H200 machine's Xeon; the H200 segments ~238 frames/s with CFFM-B1 at float32
'highest').

``--without-metrics``: also the same frames through the same segmenter with nothing scored (loading and the model
alone): the difference is what the metrics cost.

``--loader-processes N ...``: loading + model, nothing scored, with the frames loaded by N processes instead of
threads (an experiment: on a 2-core machine a trivial device_put + jitted call on the main thread took 48 us alone and
1.4 ms next to 8 loading threads; processes take no share of the main process's GIL).

``--tiny``: a tiny CFFM (7 classes), and frames enter the network at their own size: little device work, so on a CPU
the figures show the host's costs (loading, the main thread's calls), e.g. ``--tiny --size 64x112 --videos 12 --frames
24 --batch-size 4 --loader-threads 2 --repeats 3``. ``--batch-size``: frames per chunk (default: the evaluation's).

``--sample-main``: where the main thread (the one that feeds the device and scores) spends the timed runs: its
innermost frame sampled every millisecond, the most frequent lines printed with their share.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import itertools
import logging
import multiprocessing
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cffm_jax import compilation_cache, host_memory  # noqa: E402


@contextlib.contextmanager
def sample_main_thread(enabled: bool, interval: float = 0.001, top: int = 15):
    """Counts the main thread's innermost (file, line, function) every ``interval`` seconds; prints the top ones."""
    if not enabled:
        yield
        return
    main = threading.main_thread().ident
    counts: collections.Counter = collections.Counter()
    done = threading.Event()

    def sample() -> None:
        while not done.wait(interval):
            frame = sys._current_frames().get(main)
            if frame is not None:
                code = frame.f_code
                counts[(os.path.relpath(code.co_filename), frame.f_lineno, code.co_name)] += 1

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield
    finally:
        done.set()
        sampler.join()
        total = sum(counts.values()) or 1
        print(f"main thread, {total} samples:")  # noqa: T201
        for (path, line, name), n in counts.most_common(top):
            print(f"  {100 * n / total:5.1f}%  {path}:{line} ({name})")  # noqa: T201


_worker_videos: list = []
_worker_img_scale: list = []


def _init_loader_process(root: str, num_classes: int, img_scale: tuple[int, int]) -> None:
    from cffm_jax.data.pipeline import list_eval_videos

    _worker_videos[:] = list_eval_videos(root, "val", num_classes=num_classes)
    _worker_img_scale[:] = img_scale


def _load_in_process(key: tuple[int, int]):
    video, t = key
    return _worker_videos[video].load(t, img_scale=tuple(_worker_img_scale))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="cffm_b1")
    parser.add_argument("--videos", type=int, default=2)
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--size", default="480x853", help="frame size HxW")
    parser.add_argument("--loader-threads", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--matmul-precision", help="the model's float32 matmul precision (default: the config's)")
    parser.add_argument("--root", help="the synthetic split's folder: kept, and reused when it exists")
    parser.add_argument("--sample-main", action="store_true", help="where the main thread's time goes")
    parser.add_argument("--without-metrics", action="store_true", help="also time loading + model, nothing scored")
    parser.add_argument("--loader-processes", type=int, nargs="*", default=[], help="loading + model on N processes")
    parser.add_argument("--tiny", action="store_true", help="a tiny CFFM, frames at their own size (host costs)")
    parser.add_argument("--batch-size", type=int, help="frames per chunk (default: the evaluation's)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per configuration")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    host_memory.retain_freed_memory()
    compilation_cache.enable()

    import jax

    from cffm_jax.benchmark import random_variables
    from cffm_jax.data import synthetic
    from cffm_jax.data.pipeline import list_eval_videos
    from cffm_jax.data.transforms import IMG_SCALE
    from cffm_jax.evaluate import evaluate_videos
    from cffm_jax.models import model_config
    from cffm_jax.streaming import VideoSegmenter, ordered_map

    def segment_only(load: Callable[[Iterable[tuple[int, int]]], Iterator[Any]]) -> tuple[float, float]:
        """(frames/s, s) of loading + segmenting every video, nothing scored, as the evaluation streams them (one
        stream of frames over all videos); ``load(keys)`` gives the frames of the (video, frame) ``keys`` in order."""
        segmenter = VideoSegmenter(config, variables, batch_size=args.batch_size)
        videos = list_eval_videos(root, "val", num_classes=config.num_classes)
        start, count = time.perf_counter(), 0
        frames = load((v, t) for v, video in enumerate(videos) for t in range(video.num_frames))
        inputs = ((v, itertools.islice(frames, video.num_frames), None) for v, video in enumerate(videos))
        for _ in segmenter.segment_videos(inputs):
            count += 1
        seconds = time.perf_counter() - start
        return count / seconds, seconds

    def segment_only_processes(processes: int) -> tuple[float, float]:
        """:func:`segment_only` with the frames loaded by ``processes`` spawned processes (started, untimed, first)."""
        context = multiprocessing.get_context("spawn")
        init = (root, config.num_classes, img_scale)
        with concurrent.futures.ProcessPoolExecutor(processes, context, _init_loader_process, init) as pool:
            list(pool.map(_load_in_process, [(0, 0)] * processes * 2))  # every process started
            return segment_only(lambda keys: pool.map(_load_in_process, keys, chunksize=2))

    overrides = {"matmul_precision": args.matmul_precision} if args.matmul_precision else {}
    if args.tiny:
        overrides.update(embed_dims=(8, 16, 40, 64), depths=(1, 1, 1, 1), decoder_embed_dim=32, num_classes=7)
    config = model_config("cffm_b0" if args.tiny else args.model, **overrides)
    height, width = (int(s) for s in args.size.split("x"))
    img_scale = (width, height) if args.tiny else IMG_SCALE
    eval_args = dict(img_scale=img_scale, progress=False, batch_size=args.batch_size)
    variables = random_variables(config)
    with contextlib.ExitStack() as stack:
        root = args.root or os.path.join(stack.enter_context(tempfile.TemporaryDirectory()), "vspw")
        start = time.perf_counter()
        if not os.path.isdir(root):
            synthetic.generate(
                root,
                videos=0,
                val_videos=args.videos,
                test_videos=0,
                frames=args.frames,
                size=(height, width),
                num_classes=config.num_classes,
            )
        print(  # noqa: T201
            f"{args.videos} videos x {args.frames} frames of {height}x{width} in {time.perf_counter() - start:.1f} s; "
            f"{config.name} ({config.matmul_precision}), devices {jax.devices()}, {os.cpu_count()} CPU cores"
        )
        start = time.perf_counter()
        evaluate_videos(config, variables, root, max_videos=1, **eval_args)
        print(f"warm-up on one video (compilation): {time.perf_counter() - start:.1f} s")  # noqa: T201
        eval_videos = list_eval_videos(root, "val", num_classes=config.num_classes)

        def load_frame(key: tuple[int, int]) -> Any:
            return eval_videos[key[0]].load(key[1], img_scale=img_scale)

        print("| loader threads | what | frames/s | s |")  # noqa: T201
        print("|---|---|---|---|")  # noqa: T201
        for threads in args.loader_threads:
            for _ in range(args.repeats):
                with sample_main_thread(args.sample_main):
                    scores = evaluate_videos(config, variables, root, num_loaders=threads, **eval_args)
                rate, seconds = scores["frames_per_second"], scores["seconds"]
                print(f"| {threads} | evaluation | {rate:.1f} | {seconds:.2f} |", flush=True)  # noqa: T201
            if args.without_metrics:
                for _ in range(args.repeats):
                    with sample_main_thread(args.sample_main):
                        rate, seconds = segment_only(lambda keys, n=threads: ordered_map(load_frame, keys, n))
                    print(f"| {threads} | loading + model, nothing scored | {rate:.1f} | {seconds:.2f} |", flush=True)  # noqa: T201
        for processes in args.loader_processes:
            for _ in range(args.repeats):
                with sample_main_thread(args.sample_main):
                    rate, seconds = segment_only_processes(processes)
                print(f"| {processes} processes | loading + model, nothing scored | {rate:.1f} | {seconds:.2f} |")  # noqa: T201


if __name__ == "__main__":
    main()

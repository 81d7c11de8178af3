"""How frame-loading threads slow the thread that feeds the device: a trivial ``jax.device_put`` + jitted call on the
main thread, timed alone and next to N threads that load evaluation frames in a loop (they share its GIL and cores).

    python scripts/benchmark_main_thread.py [--root DIR] [--threads 0 1 2 4 8] [--calls 2000] [--metrics-only]
        [--segment-only]

``--root``: a VSPW-layout folder with a 'val' split (default: a fresh synthetic one of 480x853 frames). Evaluation's
main thread makes a few dozen such calls per chunk of frames (``scripts/benchmark_eval.py --sample-main``).

Then the main thread's cost of scoring one frame (``cffm_jax.metrics.MetricsAccumulator.update``, 200 frames of one
video after 40 of warm-up) for 8x8 frames (the calls alone) and 480x853 frames (with the device work: on a CPU
backend that is this CPU's). ``--metrics-only``: only that.

Then the main thread's cost of streaming a frame (``cffm_jax.streaming.VideoSegmenter.segment`` in chunks of 4 frames,
a tiny CFFM at 32x32, 240 frames of one video after a warm-up video): the calls of a chunk (its transfers and
programs, the results' fetch) with little device work. ``--segment-only``: only that.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def segment_cost(frames: int = 240, size: int = 32) -> None:
    """Prints the main thread's time per frame of ``VideoSegmenter.segment`` (tiny CFFM, chunks of 4 frames)."""
    import numpy as np

    from cffm_jax.benchmark import random_variables
    from cffm_jax.data.pipeline import EvalFrame
    from cffm_jax.models import model_config
    from cffm_jax.streaming import VideoSegmenter

    config = model_config("cffm_b0", embed_dims=(8, 16, 40, 64), depths=(1, 1, 1, 1), decoder_embed_dim=32)
    segmenter = VideoSegmenter(config, random_variables(config), batch_size=4)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (size, size, 3), np.uint8)
    video = [EvalFrame(image=image, label=None, original_size=(size, size))] * frames
    for _ in segmenter.segment(video[:40]):  # compiles
        pass
    start, cpu = time.perf_counter(), time.thread_time()
    for _ in segmenter.segment(video):
        pass
    ms, cpu_ms = (time.perf_counter() - start) / frames * 1e3, (time.thread_time() - cpu) / frames * 1e3
    print(  # noqa: T201
        f"streaming {size}x{size} frames, tiny CFFM, 4 per chunk: {ms:.3f} ms per frame on the main thread, "
        f"{cpu_ms:.3f} ms of its CPU time"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", help="VSPW-layout folder (default: synthetic 480x853 frames)")
    parser.add_argument("--threads", type=int, nargs="+", default=[0, 1, 2, 4, 8])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--metrics-only", action="store_true", help="only the cost of scoring a frame")
    parser.add_argument("--segment-only", action="store_true", help="only the cost of streaming a frame")
    args = parser.parse_args()
    segment_cost()
    if args.segment_only:
        return

    import jax
    import numpy as np

    from cffm_jax.data import synthetic
    from cffm_jax.data.pipeline import list_eval_videos
    from cffm_jax.metrics import MetricsAccumulator

    rng = np.random.default_rng(0)
    for hw in ((8, 8), (480, 853)):
        accumulator = MetricsAccumulator(num_classes=124)
        pred = rng.integers(0, 124, hw).astype(np.uint8)
        label = rng.integers(0, 124, hw).astype(np.uint8)
        for t in range(40):
            accumulator.update("video", t, pred, label)
        accumulator.confusion_matrix()
        start = time.perf_counter()
        for t in range(40, 240):
            accumulator.update("video", t, pred, label)
        calls = time.perf_counter() - start
        accumulator.compute()
        done = time.perf_counter() - start
        print(  # noqa: T201
            f"scoring {hw[0]}x{hw[1]} frames: {calls / 200 * 1e3:.3f} ms per frame on the main thread, "
            f"{done / 200 * 1e3:.3f} ms with the device work finished"
        )
    if args.metrics_only:
        return

    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or synthetic.generate(
            os.path.join(tmp, "vspw"), videos=0, val_videos=1, test_videos=0, frames=20, size=(480, 853)
        )
        video = list_eval_videos(root, "val")[0]
        step = jax.jit(lambda x: x + 1)
        x = np.ones((4, 4), np.float32)
        jax.block_until_ready(step(jax.device_put(x)))
        print(f"{os.cpu_count()} CPU cores, {jax.devices()}")  # noqa: T201
        for n in args.threads:
            stop = threading.Event()

            def load(stop: threading.Event = stop) -> None:
                t = 0
                while not stop.is_set():
                    video.load(t % video.num_frames)
                    t += 1

            loaders = [threading.Thread(target=load, daemon=True) for _ in range(n)]
            for thread in loaders:
                thread.start()
            time.sleep(0.5)
            start = time.perf_counter()
            for _ in range(args.calls):
                y = step(jax.device_put(x))
            jax.block_until_ready(y)
            micros = (time.perf_counter() - start) / args.calls * 1e6
            stop.set()
            for thread in loaders:
                thread.join()
            print(f"{n} loading threads: device_put + jitted call on the main thread {micros:.0f} us")  # noqa: T201


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# The GPU run of project issue 8 (item 5) in one prepared script: parity on the GPU, then the benchmark suite's
# GPU cases, each step under its own time limit so that one slow or failing step leaves the others' results.
#
#     OUT=gpu_out bash scripts/gpu_benchmark.sh [inference|train|all|highest|diag|eval]      (default: all)
#
# Float32 programs run at 'highest' (the default) compile with cuBLAS GEMMs only (cffm_jax/xla_options.py): on an H200
# the CFFM-B1 encoder compiles in 2.5 s, the B1 training step in 63 s. Before (2026-11-27, H100), XLA's Triton GEMM
# autotuning at 'highest' took 63 s for the encoder alone, and no B1 step compiled within 90-100 s.
#
# inference: parity (the official fixtures at float32 'highest' and at XLA's default precision), CFFM-B1 streaming
#   and CFFM/CFFM++-B1 clip mode at 480x864 in float32 and bfloat16, the clip mode also at XLA's default float32
#   precision (TF32), MiT/clip/streaming of B0 at 480x480 (the CPU table's shapes), and B1 streaming in chunks of 16
#   frames instead of 4 (throughput; the 4-frame rows are latency-bound there). ~6 minutes on an H100 at TF32.
# train: the training step of B0 and B1 at 480x480 in float32 and bfloat16 (each compiled in ~50-65 s), then B1's on
#   a batch of 8 clips (--train-batch 8: clips/s; one clip per step leaves most of the GPU idle).
# highest: one call of <= 10 minutes, float32 at 'highest' (the default): parity, CFFM/CFFM++-B1 clip mode at
#   480x864 (10.0 ms on the H200), CFFM-B1 streaming as VSPW_480p evaluation runs it (480x853 frames
#   entering the network at 480x864: 238 frames/s on the H200), the B1 training step at 480x480 (35 ms there).
# eval: evaluation as users run it (scripts/benchmark_eval.py: loading, CFFM-B1 streaming, metrics) on 4 synthetic
#   480x853 videos of 60 frames, with 8 and 16 frame-loading threads, each run also without the metrics, then without
#   metrics with 8 and 16 loading processes instead of threads, the main thread sampled throughout; first
#   scripts/benchmark_main_thread.py (a trivial device_put + jitted call on the main thread next to 0-16 loading
#   threads). On the H200 (2026-11-28 21:50, commit 1e6b011): evaluation 172 frames/s with 8 threads, 197 without the
#   metrics, where the model alone streams 252; the main thread's call took 0.37 ms alone and 2.0 ms next to 8
#   loading threads. Commits ad53c03, 69ab6bd and 4c02c27 (no eager jax operations per chunk, one stream over all
#   videos, the metrics on the device's predictions) are not measured on a GPU yet: this part, again, is the next
#   lease's first call. ~2 minutes.
# diag: where compile and run time go at each float32 precision (scripts/gpu_diag_precision.py: a matmul, a
#   convolution, the CFFM-B1 encoder and decoder at 480x864), at 'highest' with the project's options (cuBLAS) and
#   with XLA's own (Triton GEMMs, autotuned for minutes); then 'high' (three bfloat16 passes per float32 product:
#   does it keep the fixtures within tolerance, and how fast is it?), ~8 minutes.
#
# Writes into $OUT: all.log (every step's output) and one JSON per benchmark step (gpu_*.json); a JSON is rewritten
# after every row, so a step stopped by its limit keeps the rows it finished. Wheels in .whl/ (packages missing on
# the machine: flax, optax, ml-collections, grain and its needs) are installed into /tmp/site first; on a machine
# with pip access, for a Python 3.12 target (the lent H100's, whose jax is 0.11.2 with its CUDA 13 plugin):
#
#     pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
#         --platform manylinux2014_x86_64 -d .whl flax==0.12.8 optax==0.2.8 ml-collections==1.1.0 grain==0.2.18 \
#         "array-record>=0.8.1" portpicker importlib_resources
set -u
PART=${1:-all}
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
LOG="$OUT/all.log"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}

step() {  # step NAME LIMIT_S COMMAND...: run, log, report the exit status (124 = stopped by its limit)
    local name=$1 limit=$2
    shift 2
    echo "== $name ($(date -u +%T), limit ${limit} s): $*" | tee -a "$LOG"
    local start=$SECONDS
    timeout "$limit" "$@" >>"$LOG" 2>&1
    echo "== $name: rc $? after $((SECONDS - start)) s" | tee -a "$LOG"
}

if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        >>"$LOG" 2>&1 && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
step env 30 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; \
    $PY -c 'import jax, flax, optax, cffm_jax.train, cffm_jax.streaming; print(jax.__version__, flax.__version__, \
    optax.__version__, jax.devices(), jax.config.jax_default_matmul_precision)'"

BENCH="$PY -m cffm_jax.benchmark --repeats 5 --warmup 2"
B1="--models b1 --sizes 480x864 --dtype float32,bfloat16"
if [ "$PART" = inference ] || [ "$PART" = all ]; then
    # Parity on this backend: the CLI (float32 products at full precision), then the fixtures at XLA's default
    # precision (the model config's matmul_precision='default'; the parity CLI forces 'highest').
    step parity 50 $PY -m cffm_jax.parity tests/fixtures/cffm_tiny.npz tests/fixtures/cffmpp_tiny.npz
    step parity_xla_default 40 $PY -m cffm_jax.parity --matmul-precision default tests/fixtures/cffm_tiny.npz \
        tests/fixtures/cffmpp_tiny.npz
    step b1_stream 300 $BENCH --cases stream $B1 --json "$OUT/gpu_b1_stream.json"
    step b1_clip 300 $BENCH --cases clip $B1 --json "$OUT/gpu_b1_clip.json"
    step b1_clip_xla_default 70 $BENCH --cases clip --models b1 --sizes 480x864 --matmul-precision default \
        --json "$OUT/gpu_b1_clip_xla_default.json"
    step b0 240 $BENCH --cases mit,clip,stream --models b0 --sizes 480x480 --json "$OUT/gpu_b0.json"
    step b1_stream_batch16 100 $BENCH --cases stream $B1 --stream-batch 16 --frames 64 \
        --json "$OUT/gpu_b1_stream_batch16.json"
fi
if [ "$PART" = train ] || [ "$PART" = all ]; then
    step train 300 $BENCH --cases train --models b0,b1 --sizes 480x480 --dtype float32,bfloat16 \
        --json "$OUT/gpu_train.json"
    step train_batch8 240 $BENCH --cases train --models b1 --sizes 480x480 --dtype float32,bfloat16 --train-batch 8 \
        --json "$OUT/gpu_train_batch8.json"
fi
if [ "$PART" = highest ]; then
    step parity 40 $PY -m cffm_jax.parity tests/fixtures/cffm_tiny.npz tests/fixtures/cffmpp_tiny.npz
    step b1_clip 120 $BENCH --cases clip --models b1 --sizes 480x864 --json "$OUT/gpu_b1_clip.json"
    step b1_stream_vspw 120 $BENCH --cases stream --models b1 --sizes 480x864 --original-sizes 480x853 \
        --json "$OUT/gpu_b1_stream_vspw.json"
    step train_b1 150 $BENCH --cases train --models b1 --sizes 480x480 --json "$OUT/gpu_train_b1.json"
fi
if [ "$PART" = eval ]; then
    step main_thread 60 $PY scripts/benchmark_main_thread.py --threads 0 2 8 16
    step eval_loading 240 $PY scripts/benchmark_eval.py --model cffm_b1 --videos 4 --frames 60 --loader-threads 8 16 \
        --without-metrics --loader-processes 8 16 --sample-main
fi
if [ "$PART" = diag ]; then
    step diag_highest 100 $PY scripts/gpu_diag_precision.py highest
    step diag_highest_triton 150 $PY scripts/gpu_diag_precision.py highest --xla-defaults
    step diag_default 60 $PY scripts/gpu_diag_precision.py default
    step parity_high 40 $PY -m cffm_jax.parity --matmul-precision high tests/fixtures/cffm_tiny.npz \
        tests/fixtures/cffmpp_tiny.npz
    step diag_high 150 $PY scripts/gpu_diag_precision.py high
fi
for f in "$OUT"/gpu_*.json; do
    [ -e "$f" ] || continue
    echo "== table of $f" | tee -a "$LOG"
    $PY -m cffm_jax.benchmark --report "$f" 2>&1 | tee -a "$LOG" | grep -v "^$"
done

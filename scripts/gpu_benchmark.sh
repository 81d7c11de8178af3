#!/usr/bin/env bash
# The GPU run of project issue 8 (item 5) in one prepared script: parity on the GPU, then the benchmark suite's
# GPU cases, each step under its own time limit so that one slow or failing step leaves the others' results.
#
#     OUT=gpu_out bash scripts/gpu_benchmark.sh
#
# Writes into $OUT: all.log (every step's output), gpu_b1_stream.json and gpu_b1_clip.json (CFFM-B1 streaming, and
# CFFM/CFFM++-B1 clip mode, at 480x864 in float32 and bfloat16), gpu_train.json (training step, B0 and B1 at
# 480x480, float32 and bfloat16), gpu_b0.json (MiT, clip mode and streaming of B0 at 480x480, float32: the CPU table's shapes), gpu_highest.json
# (CFFM-B1 clip mode at 480x864 with float32 matmuls at full precision). A JSON is rewritten after every row, so a
# step stopped by its limit keeps the rows it finished. Wheels in .whl/ (packages missing on the machine) are
# installed into /tmp/site first.
set -u
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

# Parity on this backend: the CLI (float32 matmuls at full precision), then the same fixtures at XLA's default
# matmul precision (what a user's float32 run gets unless they ask for 'highest').
step parity 50 $PY -m cffm_jax.parity tests/fixtures/cffm_tiny.npz tests/fixtures/cffmpp_tiny.npz
step parity_default_precision 40 $PY -c "
from cffm_jax import parity
for f in ('tests/fixtures/cffm_tiny.npz', 'tests/fixtures/cffmpp_tiny.npz'):
    for r in parity.check_fixture(f):
        print(f'{f} {r.output:<28} max abs err {r.max_abs_err:.3e} (tolerance {r.tolerance:.2e})')
"

BENCH="$PY -m cffm_jax.benchmark --repeats 5 --warmup 2"
B1="--models b1 --sizes 480x864 --dtype float32,bfloat16"
step b1_stream 130 $BENCH --cases stream $B1 --json "$OUT/gpu_b1_stream.json"
step b1_clip 120 $BENCH --cases clip $B1 --json "$OUT/gpu_b1_clip.json"
step train 120 $BENCH --cases train --models b0,b1 --sizes 480x480 --dtype float32,bfloat16 \
    --json "$OUT/gpu_train.json"
step b0 50 $BENCH --cases mit,clip,stream --models b0 --sizes 480x480 --json "$OUT/gpu_b0.json"
step b1_highest 35 env JAX_DEFAULT_MATMUL_PRECISION=highest $BENCH --cases clip --models b1 --sizes 480x864 \
    --json "$OUT/gpu_highest.json"
for f in "$OUT"/gpu_*.json; do
    echo "== table of $f" | tee -a "$LOG"
    $PY -m cffm_jax.benchmark --report "$f" 2>&1 | tee -a "$LOG" | grep -v "^$"
done

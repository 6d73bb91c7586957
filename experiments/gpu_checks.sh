#!/usr/bin/env bash
# GPU checks of the attention kernels, for a session that has a GPU (one H200: < 8 minutes).
#
#   bash experiments/gpu_checks.sh            # outputs in $OUT if set, else runs/gpu_checks
#
# 1. finds a Python whose jax sees the GPU: $PYTHON, else .venv/bin/python, else
#    python3 (the device image's own jax); if none does, tries
#    `pip install "jax[cuda12]==0.10.2"` into .venv (needs a network or a wheel cache);
# 2. runs the gpu-marked kernel tests (block attention, scan attention);
# 3. runs the GPU benchmark (experiments/benchmark_kernels.py --gpu): Pallas
#    block_attention vs cuDNN with the dense mask (and as a fraction of the
#    chip's bf16 matmul rate), Pallas scan vs associative scan and its memory floor;
# 4. runs the NBP decode benchmark (experiments/benchmark_generation.py, the
#    paper setting at batch 1 and 8), each step beside its floor.
# Each step has its own timeout; a failing step is reported and the next one still runs.
# Files written: env.txt, pip.log (if it installed), gpu_tests.log, gpu_bench.log,
# gpu_bench.json, decode.log, summary.txt.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-runs/gpu_checks}"
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# tests/conftest.py defaults JAX_PLATFORMS to cpu: name the GPU explicitly.
export JAX_PLATFORMS=cuda
export XLA_PYTHON_CLIENT_PREALLOCATE=false

has_gpu() { timeout 120 "$1" -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')" >/dev/null 2>&1; }

PY=""
for candidate in ${PYTHON:-} .venv/bin/python python3; do
  if [ -x "$(command -v "$candidate")" ] && has_gpu "$candidate"; then PY="$candidate"; break; fi
done
if [ -z "$PY" ] && [ -x .venv/bin/python ]; then
  echo "no jax with a GPU: installing jax[cuda12]==0.10.2 into .venv" | tee "$OUT_DIR/pip.log"
  timeout 240 .venv/bin/python -m pip install -q "jax[cuda12]==0.10.2" >>"$OUT_DIR/pip.log" 2>&1
  if has_gpu .venv/bin/python; then PY=.venv/bin/python; fi
fi
if [ -z "$PY" ]; then
  echo "FAILED: no Python with a GPU-enabled jax (see $OUT_DIR/pip.log)" | tee "$OUT_DIR/summary.txt"
  exit 1
fi

{
  echo "python: $PY"
  "$PY" -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
} 2>&1 | tee "$OUT_DIR/env.txt"

status=0
echo "== gpu tests" | tee "$OUT_DIR/summary.txt"
timeout 150 "$PY" -m pytest -m gpu tests/test_block_attention.py tests/test_scan_attention.py -q -rs \
  -p no:cacheprovider 2>&1 | tee "$OUT_DIR/gpu_tests.log"
rc=$?; echo "gpu tests exit $rc" | tee -a "$OUT_DIR/summary.txt"; [ $rc -eq 0 ] || status=1

echo "== gpu benchmark" | tee -a "$OUT_DIR/summary.txt"
timeout 270 "$PY" -m experiments.benchmark_kernels --gpu --budget_s 150 --repeats 5 \
  --json "$OUT_DIR/gpu_bench.json" 2>&1 | tee "$OUT_DIR/gpu_bench.log"
rc=$?; echo "gpu benchmark exit $rc" | tee -a "$OUT_DIR/summary.txt"; [ $rc -eq 0 ] || status=1

echo "== nbp decode benchmark" | tee -a "$OUT_DIR/summary.txt"
timeout 200 "$PY" -m experiments.benchmark_generation --settings paper --batches 1,8 --repeats 3 \
  2>&1 | tee "$OUT_DIR/decode.log"
rc=$?; echo "decode benchmark exit $rc" | tee -a "$OUT_DIR/summary.txt"; [ $rc -eq 0 ] || status=1
exit $status

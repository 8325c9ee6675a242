#!/usr/bin/env bash
# One-shot accelerator check, CUDA or ROCm: one script, every GPU measurement, results in $OUT (default gpu_check_out).
#   1. platform: nvidia-smi / rocm-smi, JAX_PLATFORMS=cuda|rocm (set it yourself to override), versions
#   2. parity on the device: model, cache, attention and MoE tests, and the Pallas kernels compiled (not interpreted)
#   3. kernels vs XLA at ZAYA1-8B geometry: zaya bench attention, zaya bench moe (GB/s, fraction of HBM bandwidth)
#   4. full 40-layer ZAYA1-8B, random bf16 weights, device loop: AR ms/step at batch {1,16,64} x context {4k,32k}
#      against the roofline; each block sampler's step cost and end-to-end speedup over AR at synthetic acceptance
#      beta {0.7,0.85,0.95} (batch 16, 32k context) beside the roofline bound (zaya bench system)
# Each stage has its own timeout so the script always finishes and keeps what it measured (the device budget is one
# short session). Usage, from the repo root on a GPU node with the package's dependencies installed:
#   ZAYA_FIXTURES=/path/to/zaya_tiny bash launch/gpu_check.sh
# CPU smoke test of the benchmark stages at the tiny preset (tests/test_launch.py runs it; the test stage is the suite
# itself there): SMOKE=1 bash launch/gpu_check.sh
set -uo pipefail
OUT=${OUT:-gpu_check_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export ZAYA_FIXTURES=${ZAYA_FIXTURES:-$PWD/../shared/fixtures/zaya_tiny}
SMOKE=${SMOKE:-0}
PY=${PYTHON:-python3}

if [ "$SMOKE" = 1 ]; then
  PLATFORM=cpu
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  PLATFORM=cuda; nvidia-smi -L | tee "$OUT/gpus.txt"
elif command -v rocm-smi >/dev/null 2>&1 && rocm-smi --showproductname >/dev/null 2>&1; then
  PLATFORM=rocm; rocm-smi --showproductname | tee "$OUT/gpus.txt"
else
  echo "gpu_check: no GPU found (nvidia-smi and rocm-smi both absent or failing); SMOKE=1 runs the CPU smoke test" >&2
  exit 2
fi
export JAX_PLATFORMS=${JAX_PLATFORMS:-$PLATFORM}
: > "$OUT/stages.txt"
echo "platform: $PLATFORM (JAX_PLATFORMS=$JAX_PLATFORMS)" | tee "$OUT/platform.txt"
$PY -c "import jax, sys; print(sys.version.split()[0], 'jax', jax.__version__, jax.devices())" 2>&1 \
  | tee -a "$OUT/platform.txt"

stage() {  # stage NAME SECONDS CMD...: run with a timeout, keep its output, say how it ended
  local name=$1 secs=$2; shift 2
  echo "== $name (limit ${secs}s)"
  local t0=$SECONDS
  timeout "$secs" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  grep -v -i "warning" "$OUT/$name.log" | tail -n 60
  echo "== $name: exit $rc after $((SECONDS - t0))s" | tee -a "$OUT/stages.txt"
}

export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$OUT/xla_cache}  # stages share compiled programs
SYS="from zaya.bench import system as s; s.run"
if [ "$SMOKE" = 1 ]; then
  stage attention 200 $PY -m zaya.cli bench attention --quick --out "$OUT/attention"
  stage moe 200 $PY -m zaya.cli bench moe --quick --out "$OUT/moe"
  stage system 300 $PY -c "$SYS('tiny', '$OUT/system', quick=True, batches=(1,), contexts=(32,), betas=(0.85,),
    max_new=8, samplers=s.SAMPLERS[:1])"
else  # stage limits sum to 570 s: one device command may run 600 s
  stage tests 150 $PY -m pytest -q -x -p no:cacheprovider -p no:xdist tests/test_kernels_attention.py \
    tests/test_kernels_moe.py tests/test_moe.py tests/test_model.py tests/test_cache.py tests/test_attention.py
  stage attention 100 $PY -m zaya.cli bench attention --out "$OUT/attention"
  stage moe 60 $PY -m zaya.bench.moe --impls ragged,pallas,auto --out "$OUT/moe"
  # the target first: single_forward sparse at beta 0.7 / 0.85 / 0.95, batch 16, 32k context, with the AR grid
  stage system 180 $PY -c "$SYS('zaya1-8b', '$OUT/system', samplers=s.SAMPLERS[1:2])"
  stage samplers 80 $PY -c "$SYS('zaya1-8b', '$OUT/samplers', betas=(0.85,), ar_grid=False)"
fi
echo "gpu_check: results in $OUT (stages.txt: how each stage ended)"
! grep -q "exit [^0]" "$OUT/stages.txt"

#!/usr/bin/env bash
# One-shot accelerator check: fixture parity and sampler exactness on the GPU, then the forward-cost-ratio and AR
# decode benchmarks of an 8B-width model (4 layers, bf16). Results go to $OUT (or ./gpu_check_out).
# Usage (from the repo root, on a GPU node with jax[cuda] + flax/optax/orbax/safetensors/tokenizers/scipy):
#   ZAYA_FIXTURES=/path/to/zaya_tiny bash launch/gpu_check.sh
set -uo pipefail
OUT=${OUT:-gpu_check_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export ZAYA_FIXTURES=${ZAYA_FIXTURES:-$PWD/shared/fixtures/zaya_tiny}
nvidia-smi -L; python3 -c "import jax, sys; print(sys.version.split()[0], 'jax', jax.__version__, jax.devices())"
JAX_PLATFORMS=cuda timeout 240 python3 -m pytest -q -x -p no:cacheprovider -p no:benchmark \
  tests/test_model.py tests/test_cache.py tests/test_attention.py tests/test_moe.py tests/test_samplers.py \
  -k "not lossless and not lossy" 2>&1 | tail -4 | tee "$OUT/tests.txt"
timeout 200 python3 -c "from zaya.bench import forward; forward.run(('zaya1-8b-4l',), '$OUT/fwd', cache_len=4096)" \
  2>&1 | grep -v Warning | tail -40
timeout 120 python3 -c "from zaya.bench import decode; decode.run(('zaya1-8b-4l',), '$OUT/dec')" 2>&1 | tail -20

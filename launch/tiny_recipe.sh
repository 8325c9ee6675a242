#!/usr/bin/env bash
# The whole recipe on CPU with the tiny variants: (a) AR pretraining -> (b) TiDAR conversion -> (c) context
# extension -> (d) diffusion SFT, then the evaluation of (b) and (d) against the AR base (a).
#   bash launch/tiny_recipe.sh [OUT_DIR] [extra --config.x=y overrides for every phase]
set -euo pipefail
OUT=${1:-runs/tiny_recipe}
shift || true
EXTRA=("$@")
zaya() { python -m zaya.cli "$@"; }

zaya train --config experiments/pretrain_ar.py:tiny   --workdir "$OUT/a_pretrain_ar" "${EXTRA[@]}"
zaya train --config experiments/tidar_convert.py:tiny --workdir "$OUT/b_tidar_convert" \
    --config.init_from="$OUT/a_pretrain_ar/model" "${EXTRA[@]}"
zaya train --config experiments/context_extend.py:tiny --workdir "$OUT/c_context_extend" \
    --config.init_from="$OUT/b_tidar_convert/model" "${EXTRA[@]}"
zaya train --config experiments/diffusion_sft.py:tiny --workdir "$OUT/d_diffusion_sft" \
    --config.init_from="$OUT/c_context_extend/model" "${EXTRA[@]}"

python -m zaya.train.evaluate --model "$OUT/b_tidar_convert/model" --base "$OUT/a_pretrain_ar/model" \
    --config experiments/tidar_convert.py:tiny --set init_from=unused --out "$OUT/eval_b_vs_a"
python -m zaya.train.evaluate --model "$OUT/d_diffusion_sft/model" --base "$OUT/a_pretrain_ar/model" \
    --config experiments/tidar_convert.py:tiny --set init_from=unused --out "$OUT/eval_d_vs_a"

#!/usr/bin/env bash
# The published ZAYA1-8B-Diffusion-Preview recipe on a 64-node x 8-GPU cluster (512 GPUs), one process per GPU:
#   ZAYA1-base -> (b) TiDAR conversion, 600B tokens at 32k -> (c) context extension, 500B tokens at 128k -> (d) SFT.
# The mesh (data 8 x fsdp 8 x expert 8), batch and steps are in experiments/*.py:full (see zaya/train/recipe.py).
# Each phase resumes from its latest checkpoint when resubmitted (same RUNS dir).
#
#   zaya convert Zyphra/ZAYA1-base /checkpoints/zaya1-base-zaya      # once, before phase (b)
#   PHASE=tidar_convert sbatch launch/slurm_full_recipe.sh
#
#SBATCH --job-name=zaya-tidar
#SBATCH --nodes=64
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --output=%x-%j.out
set -euo pipefail
PHASE=${PHASE:-tidar_convert}
RUNS=${RUNS:-/runs}
case "$PHASE" in
  tidar_convert)  INIT=/checkpoints/zaya1-base-zaya ;;
  context_extend) INIT=$RUNS/tidar_convert_full/model ;;
  diffusion_sft)  INIT=$RUNS/context_extend_full/model ;;
  *) echo "PHASE must be tidar_convert, context_extend or diffusion_sft" >&2; exit 2 ;;
esac
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
# one process per GPU: zaya.train.distributed joins the job from SLURM's variables (for one process per node use
# --ntasks-per-node=1: it then owns all 8 GPUs). Add --dry-run to print devices -> mesh coordinates -> rows first.
srun --kill-on-bad-exit=1 python -m zaya.cli train --config "experiments/$PHASE.py:full" \
    --workdir "$RUNS/${PHASE}_full" --config.init_from="$INIT" "$@"

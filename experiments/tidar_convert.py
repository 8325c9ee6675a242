"""(b) TiDAR diffusion conversion of the AR model: dual loss (AR on the clean half, one-step block diffusion on the
mask half), full masking, from (a)'s checkpoint.

  zaya train --config experiments/tidar_convert.py:tiny --config.init_from=runs/a/model --workdir runs/b
  full: ZAYA1-base -> 600B tokens at 32k context, block 16 (the published recipe)
  demo / demo_quick: step 2 of `zaya demo` (seq 128, block 16, alpha 3) and, with tidar.mode=ar, its equal-compute
  control; ablation: the demo's at alpha 1 (the base row of experiments/results/ablation_tiny.md)
"""
from zaya.train import recipe


def get_config(arg: str = "tiny"):
    if arg == "tiny":
        c = recipe.tiny_base(seq_len=64)
        c.num_steps = 400
        c.tidar.block_size = 4
        c.optim.update(lr=2e-3, warmup_steps=20)
    elif arg == "full":
        c = recipe.full_base(seq_len=32768)
        c.init_from = recipe.FULL_BASE
        c.num_steps = recipe.steps_for(600e9, c.seq_len, c.batch_size)
        c.tidar.block_size = 16
        c.notes = "ZAYA1-8B-Diffusion-Preview phase 1: 600B tokens of TiDAR conversion at 32k"
    elif arg in ("demo", "demo_quick", "ablation"):
        # `zaya demo` step 2 (and, with tidar.mode=ar, its equal-compute control); ablation: the same at alpha 1, the
        # base row of experiments/results/ablation_tiny.md
        c = recipe.demo_phase(700, 2e-3, "demo" if arg == "ablation" else arg)
        c.tidar.block_size = recipe.DEMO_BLOCK
        c.data.tasks_fraction = 0.5
    else:
        raise ValueError(f"tidar_convert: unknown variant {arg!r}; use tiny, full, demo, demo_quick or ablation")
    c.tidar.update(mode="tidar", alpha=1.0)
    if arg in ("demo", "demo_quick"):
        # AR weight 3 (loss = (3 CE_AR + CE_diff) / 4): the AR loss 1.6% above the equal-compute control instead of
        # 2.7%, at the same tokens per decode forward after SFT (experiments/results/ablation_tiny.md)
        c.tidar.alpha = 3.0
    c.require_init = True
    return c

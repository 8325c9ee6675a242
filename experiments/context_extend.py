"""(c) Native context extension of the converted model: longer sequences and a higher RoPE theta, same objective.

  zaya train --config experiments/context_extend.py:tiny --config.init_from=runs/b/model --workdir runs/c
  full: 500B tokens at 128k context, RoPE theta 1e6 -> 5e6 (ZAYA1-8B's theta)
"""
from zaya.train import recipe


def get_config(arg: str = "tiny"):
    if arg == "tiny":
        c = recipe.tiny_base(seq_len=256, rope_theta=1e5)   # 4x the context of (a)/(b), theta 1e4 -> 1e5
        c.batch_size = 4
        c.eval.batch_size = 4
        c.num_steps = 150
        c.tidar.block_size = 4
        c.optim.update(lr=1e-3, warmup_steps=10)
    elif arg == "full":
        c = recipe.full_base(seq_len=131072, rope_theta=5e6, max_pos=131072)
        c.num_steps = recipe.steps_for(500e9, c.seq_len, c.batch_size)
        c.tidar.block_size = 16
        c.init_from = "/runs/tidar_convert_full/model"
        c.notes = "ZAYA1-8B-Diffusion-Preview phase 2: 500B tokens of native context extension at 128k"
    else:
        raise ValueError(f"context_extend: unknown variant {arg!r}; use tiny or full")
    c.tidar.update(mode="tidar", alpha=1.0)
    c.require_init = True
    return c

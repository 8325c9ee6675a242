"""(a) AR pretraining of a ZAYA-architecture MoE (the CPU stand-in for the released ZAYA1-base).

  zaya train --config experiments/pretrain_ar.py:tiny --workdir runs/a
  variants: tiny (CPU, Shakespeare + 20% generated tasks, minutes), full (shape only: AR continuation of ZAYA1-base),
  demo / demo_quick (step 1 of `zaya demo`, seq 128)
"""
from zaya.train import recipe


def get_config(arg: str = "tiny"):
    if arg == "tiny":
        c = recipe.tiny_base(seq_len=64)
        c.num_steps = 400
    elif arg == "full":
        # ZAYA1-base is released pretrained; this is the shape of an AR continuation run on the same mesh.
        c = recipe.full_base(seq_len=32768)
        c.init_from = recipe.FULL_BASE
        c.num_steps = recipe.steps_for(50e9, c.seq_len, c.batch_size)
        c.notes = "AR continuation of ZAYA1-base (its 14T-token pretraining is not reproduced here)"
    elif arg in ("demo", "demo_quick"):   # `zaya demo` step 1 (seq 128, half generated tasks)
        c = recipe.demo_phase(900, 3e-3, arg)
        c.data.tasks_fraction = 0.5
    else:
        raise ValueError(f"pretrain_ar: unknown variant {arg!r}; use tiny, full, demo or demo_quick")
    c.tidar.mode = "ar"
    return c

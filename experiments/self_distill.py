"""(e) Self-distillation: the SFT model trained on its own greedy continuations of the SFT prompts.

Under greedy lossless verification a draft is accepted exactly when it equals the model's own greedy token, so the
drafts are trained on what the model itself writes (``data.distill_from='init'``: the continuations of the phase's
``init_from`` model, zaya.data.distill), the usual way drafters are trained (EAGLE, Medusa, DFlash). The AR half
trains on the same continuations, so the model's greedy outputs stay what they were. The ablation
(experiments/results/ablation_tiny.md) measured it as the largest gain in tokens per decode forward.

  zaya train --config experiments/self_distill.py:tiny --config.init_from=runs/d/model --workdir runs/e
  demo / demo_quick: step 4 of `zaya demo` (short and long task answers, seq 256)
  (full size: continuations of an 8B model over an SFT set are a serving job; generate them offline and train on
  the JSONL with experiments/diffusion_sft.py)
"""
from zaya.data.tasks import ALL_KINDS
from zaya.train import recipe


def get_config(arg: str = "tiny"):
    if arg == "tiny":
        c = recipe.tiny_base(seq_len=64, rope_theta=1e5)
        c.num_steps = 100
        c.tidar.block_size = 4
        c.data.update(num_tasks=2000)
        c.optim.update(lr=1e-3, warmup_steps=10)
    elif arg in ("demo", "demo_quick"):
        c = recipe.demo_phase(600, 2e-3, arg)
        c.tidar.block_size = recipe.DEMO_BLOCK
        c.update(seq_len=256, batch_size=4 if arg == "demo" else 2)  # a long task is up to 208 tokens
        c.data.update(num_tasks=6000 if arg == "demo" else 64, task_kinds=",".join(ALL_KINDS))
    else:
        raise ValueError(f"self_distill: unknown variant {arg!r}; use tiny, demo or demo_quick")
    c.data.update(source="tasks", sft=True, tasks_fraction=0.0, distill_from="init")
    c.tidar.update(mode="tidar", alpha=1.0, prompt_masking=True)
    c.require_init = True
    return c

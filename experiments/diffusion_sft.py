"""(d) Diffusion SFT on prompt/response data (the generated task set): prompts are masked out of both the AR and the
diffusion loss (the data's loss_mask and the objective's prompt masking).

  zaya train --config experiments/diffusion_sft.py:tiny --config.init_from=runs/c/model --workdir runs/d
  full: SFT on prompt/response JSONL at 128k after context extension (budget ours: 20B tokens)
  demo / demo_quick: step 3 of `zaya demo` (short and long task answers, seq 256, block 16)
  ablation: the second phase of the tiny ablation study (experiments/results/ablation_tiny.md): the demo's, 600 steps
"""
from zaya.data.tasks import ALL_KINDS
from zaya.train import recipe


def get_config(arg: str = "tiny"):
    if arg == "tiny":
        c = recipe.tiny_base(seq_len=64, rope_theta=1e5)    # theta as set by (c)
        c.num_steps = 200
        c.tidar.block_size = 4
        c.data.update(source="tasks", sft=True, tasks_fraction=0.0, num_tasks=20000)
        c.optim.update(lr=1e-3, warmup_steps=10)
    elif arg == "full":
        c = recipe.full_base(seq_len=131072, rope_theta=5e6, max_pos=131072)
        c.num_steps = recipe.steps_for(20e9, c.seq_len, c.batch_size)
        c.tidar.block_size = 16
        c.init_from = "/runs/context_extend_full/model"
        c.data.update(source="jsonl:/data/sft/*.jsonl", sft=True)
        with c.data.ignore_type():
            c.data.jsonl_fields = ("prompt", "response")
        c.optim.update(lr=2e-5, warmup_steps=100, schedule="cosine")
        c.notes = "ZAYA1-8B-Diffusion-Preview phase 3: diffusion SFT (budget not published; ours)"
    elif arg in ("demo", "demo_quick", "ablation"):
        # `zaya demo` step 3, and the second phase of experiments/results/ablation_tiny.md (600 steps): short and
        # long task answers at seq 256 (a long task, prompt + answer, is up to 208 tokens), the tokens of a step
        # as at seq 128 x 8 rows
        quick = arg == "demo_quick"
        c = recipe.demo_phase(600 if arg == "ablation" else 1000, 2e-3, "demo_quick" if quick else "demo")
        c.tidar.block_size = recipe.DEMO_BLOCK
        c.update(seq_len=256, batch_size=2 if quick else 4)
        c.data.update(source="tasks", sft=True, tasks_fraction=0.0, num_tasks=20000, task_kinds=",".join(ALL_KINDS))
    else:
        raise ValueError(f"diffusion_sft: unknown variant {arg!r}; use tiny, full, demo, demo_quick or ablation")
    c.tidar.update(mode="tidar", alpha=1.0, prompt_masking=True)
    c.require_init = True
    return c

"""Shared pieces of the experiment configs (``experiments/*.py``): the tiny CPU stand-ins and the full-size recipe.

The published ZAYA1-8B-Diffusion-Preview recipe (Zyphra's ZAYA1 diffusion report): ZAYA1-base -> TiDAR diffusion
conversion, 600B tokens at 32k context -> native context extension, 500B tokens at 128k -> diffusion SFT; block
size 16. Token budgets, context lengths and block size are published; the cluster shape, batch, learning rates and
SFT budget below are our choices [I], sized for 64 nodes x 8 GPUs (Zyphra's run name says "64node").

Tiny variants: a 2-layer, 4-expert ZAYA-architecture MoE on bytes (vocab 264 >= the byte tokenizer's 261), fp32,
sized so each phase runs in minutes on 2 CPU cores.
"""
from __future__ import annotations

import math
import os

from zaya.config import ConfigError
from zaya.train import configs

# The experiments/ folder of the checkout (`pip install -e .`): `zaya demo` runs its configs.
EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                           "experiments")


def experiment(name: str, variant: str) -> str:
    """``'tidar_convert', 'demo'`` -> ``'<checkout>/experiments/tidar_convert.py:demo'`` (a ``configs.load`` spec)."""
    path = os.path.join(EXPERIMENTS, name + ".py")
    if not os.path.isfile(path):
        raise ConfigError(f"experiment config {path} not found: zaya's experiments/ folder sits next to the zaya "
                          "package in a source checkout; install with `pip install -e .` from the checkout")
    return f"{path}:{variant}"

# ---- full size ------------------------------------------------------------------------------------------------
FULL_DEVICES = 512                                   # 64 nodes x 8 GPUs
FULL_MESH = dict(data=8, fsdp=8, tensor=1, expert=8, num_devices=FULL_DEVICES)
FULL_TOKENS_PER_STEP = 16 * 2**20                    # ~16.8M clean tokens per optimizer step in every phase
FULL_TOKENIZER = "/checkpoints/zaya1-base/tokenizer.json"   # Gemma-3 vocabulary (262k), mask id 4
FULL_BASE = "/checkpoints/zaya1-base-zaya"           # `zaya convert Zyphra/ZAYA1-base /checkpoints/zaya1-base-zaya`


def steps_for(tokens: float, seq_len: int, batch: int) -> int:
    return int(math.ceil(tokens / (seq_len * batch)))


def full_base(seq_len: int, rope_theta: float = 1e6, max_pos: int = 32768):
    """The ZAYA1-base architecture in bf16 on the 512-GPU mesh; batch = FULL_TOKENS_PER_STEP / seq_len rows."""
    c = configs.base()
    c.model = configs.model_config("zaya1-base", dtype="bfloat16", rope_theta=rope_theta,
                                   max_position_embeddings=max_pos, mask_token_id=4)
    c.tokenizer = FULL_TOKENIZER
    c.seq_len = seq_len
    c.batch_size = FULL_TOKENS_PER_STEP // seq_len   # 512 rows at 32k, 128 rows at 128k
    from zaya.sharding import DEFAULT_RULES, batch_split
    # rows over (data, fsdp, expert): expert-parallel MoE, one row per device. Fewer rows than devices (128 at 128k
    # context) split over (data, fsdp) only: each expert group then shares its rows and XLA splits the experts.
    sizes = {k: v for k, v in FULL_MESH.items() if k != "num_devices"}
    c.sharding_rules = DEFAULT_RULES
    if c.batch_size % batch_split(sizes, DEFAULT_RULES)[1]:
        c.sharding_rules = (("batch", ("data", "fsdp")),) + tuple(r for r in DEFAULT_RULES if r[0] != "batch")
    _, shards = batch_split(sizes, c.sharding_rules)
    c.grad_accum = max(1, c.batch_size // shards)    # one row per batch shard per microbatch (TiDAR doubles it)
    c.mesh.update(FULL_MESH)
    # remat in groups of 2 layers: the fp32 residual stream kept at every other layer (-10 GiB per device at 32k
    # TiDAR) for one more forward of each group (experiments/results/multihost_cpu.md)
    c.impl.update(attention="chunked", moe="ragged", remat=True, remat_group=2)
    # logits and CE over 4096-token chunks: the [tokens, 262k] fp32 logits (and their grads) never exist at once
    # (-95 GiB per device at 32k context, TiDAR, one row per device: experiments/results/multihost_cpu.md)
    c.tidar.ce_chunk = 4096
    c.optim.update(lr=1e-4, warmup_steps=500, schedule="wsd", decay_fraction=0.1, decay_shape="sqrt",
                   min_lr_ratio=0.1, weight_decay=0.1, clip_norm=1.0)
    c.data.update(source="jsonl:/data/midtrain/*.jsonl", val_fraction=0.001, num_threads=16, prefetch=64)
    c.checkpoint.update(every_steps=250, keep=3)
    c.log.update(every_steps=10, progress=True)
    c.eval.update(every_steps=1000, num_batches=16, batch_size=shards)
    return c


# ---- tiny (CPU) -------------------------------------------------------------------------------------------------
TINY_MODEL = dict(vocab_size=264, hidden_size=64, num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=16,
                  num_experts=4, moe_intermediate_size=64, router_hidden_size=16, max_position_embeddings=1024,
                  rope_theta=1e4, eos_token_id=1, bos_token_id=2, pad_token_id=0, mask_token_id=4, dtype="float32")


def tiny_base(seq_len: int = 64, rope_theta: float = 1e4):
    c = configs.base()
    c.model = configs.model_config("tiny", **{**TINY_MODEL, "rope_theta": rope_theta})
    c.tokenizer = "bytes"
    c.seq_len = seq_len
    c.batch_size = 8
    c.grad_accum = 1
    c.mesh.update(data=1, num_devices=1)
    c.optim.update(lr=3e-3, warmup_steps=20, schedule="cosine", min_lr_ratio=0.1, weight_decay=0.1, clip_norm=1.0)
    c.data.update(source="shakespeare", tasks_fraction=0.2, val_fraction=0.05, num_threads=1, prefetch=4)
    c.checkpoint.update(every_steps=50, keep=2)
    c.eval.update(every_steps=100, num_batches=4, batch_size=8)
    return c


# ---- the demo (`zaya demo`): three tiny phases at seq 128 -------------------------------------------------------
DEMO_BLOCK = 16        # training block = decode block (anchor mask + K = 15 drafts)
QUICK_STEPS = 30       # every phase of `zaya demo --quick` (tests)


def demo_phase(steps: int, lr: float, variant: str):
    """One phase of ``zaya demo`` (variant ``demo``) or of its test-sized run (``demo_quick``: QUICK_STEPS steps,
    batch 4): seq 128, warmup min(30, steps/4), evaluation only at the end, three checkpoints, the latest kept."""
    if variant not in ("demo", "demo_quick"):
        raise ValueError(f"unknown demo variant {variant!r}; use demo or demo_quick")
    quick = variant == "demo_quick"
    steps = QUICK_STEPS if quick else steps
    c = tiny_base(seq_len=128)
    c.num_steps = steps
    c.optim.update(lr=lr, warmup_steps=min(30, steps // 4))
    c.eval.update(every_steps=0, num_batches=4)
    c.checkpoint.update(every_steps=max(steps // 3, 10), keep=1)
    if quick:
        c.batch_size = 4
    return c

"""Decode-time figures of a trained model, for sweeps: tokens per decode forward and same-tokens-as-AR on held-out
tasks, greedy and lossless, with the block sampler that matches the layout the model was trained on.

  decode_tasks(model_dir, tidar, num_prompts=32) -> {'tpf_short', 'tpf_long', 'same_as_ar_short', ...}

tokens per forward: generated tokens per decode forward per active row (the first token of every row comes from the
prefill logits for every sampler, so AR = 1.00; a row is charged only the forwards that ran while it was still
generating, as ``zaya bench samplers`` and the demo count). Rows stop at EOS (the end of a task's answer).

The sampler for a TiDAR layout (``tidar.anchor``, block size b; ``tidar.block_causal`` carries over):

  anchor none    single-forward, K = b - 1 drafts: the window [anchor mask at the bonus position, K masks] is b
                 slots, the trained block
  anchor mask    single-forward, K = b: the trained [anchor mask, b masks]
  anchor token   two-forward with a token anchor, K = b: the trained [x_{kb-1}, b masks]
"""
from __future__ import annotations

import numpy as np

MAX_NEW = {"short": 24, "long": 128}   # answers: 1-8 tokens (short), 20-100 (long), plus the terminator


def sampler_for(tidar: dict) -> dict:
    """``zaya.generate`` keyword arguments (sampler and options) decoding the way ``tidar`` trained."""
    b, anchor = int(tidar.get("block_size", 16)), tidar.get("anchor", "none")
    common = dict(acceptance="greedy", block_causal=bool(tidar.get("block_causal", False)))
    if anchor == "token":
        return dict(sampler="two_forward", block_size=b, anchor="token", **common)
    if anchor not in ("none", "mask"):
        raise ValueError(f"tidar.anchor={anchor!r}: expected none, token or mask")
    return dict(sampler="single_forward", block_size=b - 1 if anchor == "none" else b, levels=(0,), **common)


def task_prompts(task_set: str, n: int, seed: int = 0) -> list[list[int]]:
    """``n`` held-out task prompts of ``task_set`` ('short' or 'long'), byte ids with BOS first: the prompts
    ``zaya bench samplers`` and the demo decode."""
    from zaya.bench.samplers import make_prompts
    return make_prompts(None, n, "tasks", seed, task_set=task_set)[0]


def decode_tasks(model, tidar: dict, num_prompts: int = 32, task_sets=("short", "long"), batch: int = 8,
                 seed: int = 0) -> dict:
    """Per task set: ``tpf_<set>`` (the sampler's tokens per decode forward per active row), ``same_as_ar_<set>``
    (fraction of rows whose tokens equal greedy AR's: 1.0 for a lossless rule), ``acc_<set>`` (acceptance by draft
    position, the fraction of drafts accepted among those reached). ``model``: a folder or a loaded model."""
    import zaya
    from zaya.bench.samplers import pooled, set_pad
    if isinstance(model, str):
        model = zaya.load(model)
    if model.config.vocab_size < 261:
        raise ValueError(f"decode_tasks needs a byte-tokenizer model (vocab >= 261), got vocab "
                         f"{model.config.vocab_size}")
    opts = sampler_for(tidar)
    out = {}
    for ts in task_sets:
        prompts = task_prompts(ts, num_prompts, seed)
        batches = [prompts[i:i + batch] for i in range(0, len(prompts), batch)]
        pad_to = set_pad(prompts)  # one compiled program for every batch of the set

        def gen(**o):
            return [zaya.generate(model, p, max_new_tokens=MAX_NEW[ts], eos_id=model.config.eos_token_id,
                                  loop="device", pad_to=pad_to, **o) for p in batches]
        ar, blk = gen(sampler="ar"), gen(**opts)
        st = pooled(blk)
        same = [a == b for x, y in zip(ar, blk) for a, b in zip(x.tokens, y.tokens)]
        out[f"tpf_{ts}"] = st["tokens_per_forward"]
        out[f"same_as_ar_{ts}"] = float(np.mean(same))
        out[f"acc_{ts}"] = st.get("acceptance_per_position")
    return out

"""``zaya generate``: decode prompts from a checkpoint (or random weights of a preset) and report speed."""
from __future__ import annotations

import jax

import zaya
from zaya.api import Model
from zaya.model.params import init


def load_model(spec: str, dtype: str = "float32") -> Model:
    """A checkpoint folder, or ``preset:NAME`` for random weights of a preset (smoke tests, benchmarks)."""
    if spec.startswith("preset:"):
        c = zaya.preset(spec.split(":", 1)[1], dtype=dtype)
        return Model(c, init(c, jax.random.PRNGKey(0), std=0.3))
    return zaya.load(spec, dtype=dtype)


def parse_prompt(text: str, model: Model) -> list[int]:
    t = text.strip()
    if t and all(p.strip().isdigit() for p in t.split(",")):
        return [int(p) for p in t.split(",")]
    if model.tokenizer is None:
        raise SystemExit("zaya generate: text prompts need a tokenizer.json in the checkpoint; pass ids like 2,17,301")
    from tokenizers import Tokenizer
    ids = Tokenizer.from_file(model.tokenizer).encode(text).ids
    return ids if ids and ids[0] == model.config.bos_token_id else [model.config.bos_token_id] + ids


def main(a):
    model = load_model(a.model, a.dtype)
    prompts = [parse_prompt(p, model) for p in (a.prompt or [str(model.config.bos_token_id)])]
    opts = {}
    if a.sampler != "ar":
        opts = dict(acceptance=a.acceptance, block_size=a.block_size)
        if a.levels:
            opts["levels"] = tuple(int(x) for x in a.levels.split(","))
    res = zaya.generate(model, prompts, sampler=a.sampler, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                        top_k=a.top_k, top_p=a.top_p, seed=a.seed, eos_id=a.eos_id, progress=True,
                        loop=getattr(a, "loop", "host"), **opts)
    dec = None
    if model.tokenizer:
        from tokenizers import Tokenizer
        dec = Tokenizer.from_file(model.tokenizer)
    for p, out in zip(prompts, res.tokens):
        print(f"prompt {p} ->", dec.decode(out) if dec else out)
    s = res.stats
    print(f"[{s['sampler']}] {s['tokens']} tokens in {s['seconds']:.3f}s = {s['tokens_per_s']:.1f} tok/s, "
          f"{s['forwards']} forwards, {s['tokens_per_forward']:.2f} tokens/forward/row")
    return res

"""Self-distillation targets: a model's own greedy continuations of the prompts replace the reference answers.

This is how drafters are usually trained (EAGLE, Medusa, DFlash: on the target model's outputs): under greedy
lossless verification a draft is accepted exactly when it equals the target model's greedy token, so the
continuation the model would write itself is the diffusion target that acceptance rewards, right or wrong.

  continuations(docs, model_dir, tokenizer) -> the same prompts with response = the model's greedy continuation

A continuation ends at the model's EOS (dropped: tokenization appends EOS again) or at the budget: the longest
reference answer of its batch plus 8 tokens, rounded up to a multiple of 32 (prompts are batched by length), so a
continuation is never cut shorter than the answer it replaces. One without EOS keeps its budget's tokens. Documents
without a prompt are kept unchanged.
"""
from __future__ import annotations

import dataclasses

from zaya.data.sources import DataError, Document


def continuations(docs: list[Document], model_dir: str, tokenizer, batch: int = 512,
                  progress: bool = False) -> list[Document]:
    import os

    import zaya
    if not os.path.isdir(model_dir):
        raise DataError(f"data.distill_from={model_dir!r}: not a model folder (use a `zaya convert` output, a run's "
                        "WORKDIR/model, or 'init' for the run's init_from)")
    model = zaya.load(model_dir)
    eos = tokenizer.eos_id
    idx = [i for i, d in enumerate(docs) if d.prompt]
    if not idx:
        return list(docs)
    prompts = [[tokenizer.bos_id] + list(tokenizer.encode(docs[i].prompt)) for i in idx]
    ref = [len(tokenizer.encode(docs[i].text)) for i in idx]
    order = sorted(range(len(idx)), key=lambda j: len(prompts[j]))  # similar lengths share a compiled prefill
    out = list(docs)
    from zaya.progress import tqdm
    with tqdm(total=len(order), desc="distill", unit="prompt", disable=not progress) as pb:
        for s in range(0, len(order), batch):
            js = order[s:s + batch]
            budget = -(-(max(ref[j] for j in js) + 8) // 32) * 32   # few distinct budgets: few compiles
            res = zaya.generate(model, [prompts[j] for j in js], sampler="ar", max_new_tokens=budget, eos_id=eos,
                                loop="device", pad_to=32)
            for j, toks in zip(js, res.tokens):
                toks = list(toks)
                if toks and toks[-1] == eos:
                    toks = toks[:-1]
                out[idx[j]] = dataclasses.replace(docs[idx[j]], text=tokenizer.decode(toks))
            pb.update(len(js))
    return out

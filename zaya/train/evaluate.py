"""Evaluation: in-training eval on held-out batches, and the standalone comparison of a converted model to its base.

  evaluate(model_dir, base_dir=None, ...) -> dict     (also ``python -m zaya.train.evaluate``)
    ar_loss        AR-mode validation loss (pure causal forward) of the model, and of the base next to it: the
                   "no degradation" check of the conversion
    diff_loss / diff_acc_per_pos   TiDAR diffusion loss and accuracy per block position (one-step drafting)
    task_em        exact-match accuracy on the generated task set (held-out split) with greedy AR decoding

  python -m zaya.train.evaluate --model RUN_B/model --base RUN_A/model [--config experiments/X.py:tiny] --out DIR
"""
from __future__ import annotations

import argparse
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from zaya.model.params import cast
from zaya.model.transformer import Impl

EVAL_SEED = 1234


# --------------------------------------------------------------------------------------------------------------
# In-training evaluation.

def eval_batches(cfg, tok, shard_options=None) -> list[dict]:
    """Held-out batches for the run's data config (empty list when the split is empty or eval is off); with
    ``shard_options`` (the run's ``batch_shard``) this process's rows of each."""
    if cfg.eval.num_batches <= 0:
        return []
    from zaya.data import pipeline
    from zaya.data.sources import EmptyCorpusError
    try:
        return pipeline.make_eval_batches(cfg.data, tok, cfg.seq_len, cfg.eval.batch_size,
                                          max_batches=cfg.eval.num_batches, shard_options=shard_options)
    except EmptyCorpusError:
        return []


@functools.lru_cache(maxsize=32)
def make_eval_fn(model_cfg, opts, impl: Impl = Impl(), loss_fn=None, fast_compile: bool = False):
    """jitted (params fp32, batch) -> metrics dict (loss included), fixed rng; one per (config, options)."""
    if loss_fn is None:
        from zaya.tidar.objective import loss_fn

    from zaya.train.step import jit_options

    @functools.partial(jax.jit, **jit_options(fast_compile))
    def f(params, batch):
        loss, metrics = loss_fn(cast(params, model_cfg), model_cfg, batch, opts, jax.random.PRNGKey(EVAL_SEED), impl)
        return dict(metrics, loss=loss)
    return f


def run_eval(eval_fn, params, batches, mesh=None, dp=None) -> dict:
    """Metrics averaged over batches, weighted by each batch's loss-mask tokens (padding batches count 0).

    With a mesh, each process passes its local rows and the batch is assembled as one global array (multi-host)."""
    from zaya.train.step import put_batch
    tot, wsum = None, 0.0
    for b in batches:
        g = put_batch(b, mesh, dp) if mesh is not None else {k: jnp.asarray(v) for k, v in b.items()}
        w = float(jnp.sum(g["loss_mask"]))
        if w <= 0:
            continue
        m = jax.device_get(eval_fn(params, g))
        m = {k: np.asarray(v, np.float64) * w for k, v in m.items()}
        tot = m if tot is None else {k: tot[k] + m[k] for k in tot}
        wsum += w
    if tot is None:
        return {}
    return {k: (v / wsum).item() if v.ndim == 0 else (v / wsum).tolist() for k, v in tot.items()}


# --------------------------------------------------------------------------------------------------------------
# Standalone evaluation of model folders.

def ar_loss(params, model_cfg, batches, fast_compile: bool = False) -> float:
    """AR validation loss (pure causal forward, ``zaya.tidar.objective`` in mode "ar", as ``ar_eval``) over
    ``batches``, weighted by label count."""
    from zaya.tidar.objective import TidarOptions
    f = make_eval_fn(model_cfg, TidarOptions(mode="ar"), Impl(), None, fast_compile)
    tot = n = 0.0
    for b in batches:
        m = f(params, {k: jnp.asarray(v) for k, v in b.items()})
        w = float(m["n_ar_tokens"])
        tot += float(m["loss"]) * w
        n += w
    return tot / max(n, 1e-9)


def task_accuracy(model, tok, num_tasks: int = 64, max_new_tokens: int = 16, seed: int = 0,
                  val_fraction: float = 0.05, kinds=None, max_len: int = 8) -> dict:
    """Greedy AR exact match on held-out generated tasks, overall and per kind."""
    import zaya
    from zaya.data import tasks
    ex = tasks.generate(num_tasks, seed, kinds or tasks.KINDS, split="val", val_fraction=val_fraction,
                        max_len=max_len)
    prompts = [[tok.bos_id] + tok.encode(t["prompt"]) for t in ex]
    out, _ = zaya.generate(model, prompts, sampler="ar", max_new_tokens=max_new_tokens, eos_id=tok.eos_id)
    texts = [tok.decode(o) for o in out]
    ok = [tasks.score(t, g) for t, g in zip(ex, texts)]
    per = {}
    for t, o in zip(ex, ok):
        per.setdefault(t["kind"], []).append(o)
    return {"task_em": float(np.mean(ok)), "task_em_per_kind": {k: float(np.mean(v)) for k, v in sorted(per.items())},
            "examples": [{"prompt": t["prompt"], "answer": t["answer"], "output": g} for t, g in zip(ex[:8], texts)]}


def evaluate(model_dir: str, base_dir: str | None = None, data_cfg=None, tokenizer: str = "bytes", seq_len: int = 64,
             batch_size: int = 8, max_batches: int = 8, tidar: dict | None = None, num_tasks: int = 64,
             max_new_tokens: int = 16, task_seed: int = 0, fast_compile: bool = False) -> dict:
    """Evaluate a model folder (and its AR base next to it). Returns {'model': {...}, 'base': {...}, 'delta': ...}."""
    import zaya
    from zaya.data import pipeline
    from zaya.data.tokenizer import check_vocab, load_tokenizer
    from zaya.tidar.objective import TidarOptions
    tok = load_tokenizer(tokenizer)
    data_cfg = data_cfg if data_cfg is not None else pipeline.default_config()
    batches = pipeline.make_eval_batches(data_cfg, tok, seq_len, batch_size, max_batches=max_batches)
    vf = float(dict(data_cfg).get("val_fraction", 0.05))
    opts = TidarOptions(**{**(tidar or {}), "mode": "tidar"})
    out = {}
    for name, path in (("model", model_dir), ("base", base_dir)):
        if not path:
            continue
        m = zaya.load(path, dtype="float32")
        check_vocab(tok, m.config.vocab_size)
        r = {"path": os.path.abspath(path), "ar_loss": ar_loss(m.params, m.config, batches, fast_compile)}
        dm = run_eval(make_eval_fn(m.config, opts, Impl(), None, fast_compile), m.params, batches)
        keep = ("diff_loss", "diff_acc_per_pos", "diff_acc", "first_slot_agree", "ar_acc", "diff_acc_first_ctx",
                "ar_acc_first_ctx")
        r.update({k: dm[k] for k in keep if k in dm})
        r.update(task_accuracy(m, tok, num_tasks, max_new_tokens, task_seed, vf,
                               max_len=int(dict(data_cfg).get("task_max_len", 8))))
        out[name] = r
    if "base" in out:
        out["delta"] = {"ar_loss": out["model"]["ar_loss"] - out["base"]["ar_loss"],
                        "task_em": out["model"]["task_em"] - out["base"]["task_em"]}
    return out


def to_markdown(res: dict) -> str:
    rows = [("AR val loss", "ar_loss"), ("diffusion loss", "diff_loss"), ("task exact match (greedy AR)", "task_em")]
    names = [n for n in ("model", "base") if n in res]
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, k in rows:
        cells = [f"{res[n][k]:.4f}" if isinstance(res[n].get(k), float) else "-" for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if "diff_acc_per_pos" in res["model"]:
        acc = res["model"]["diff_acc_per_pos"]
        lines.append("\nDiffusion accuracy per block position (model): " + ", ".join(f"{a:.3f}" for a in acc))
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m zaya.train.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="model folder (e.g. WORKDIR/model of the TiDAR run)")
    p.add_argument("--base", default=None, help="the AR base model folder to compare against")
    p.add_argument("--config", default=None, help="experiments/X.py:variant for data, tokenizer, seq_len, tidar")
    p.add_argument("--set", action="append", default=[], help="config override key=value (repeatable)")
    p.add_argument("--out", default=None, help="write eval.json and eval.md here")
    p.add_argument("--num-tasks", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--max-batches", type=int, default=8)
    a = p.parse_args(argv)
    kw = {}
    if a.config:
        from zaya.train import configs
        cfg = configs.load(a.config, a.set)
        kw = dict(data_cfg=cfg.data, tokenizer=cfg.tokenizer, seq_len=cfg.seq_len, batch_size=cfg.eval.batch_size,
                  tidar=dict(cfg.tidar))
    res = evaluate(a.model, a.base, max_batches=a.max_batches, num_tasks=a.num_tasks,
                   max_new_tokens=a.max_new_tokens, **kw)
    md = to_markdown(res)
    print(md)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "eval.json"), "w") as f:
            json.dump(res, f, indent=2)
        with open(os.path.join(a.out, "eval.md"), "w") as f:
            f.write(md)
    return res


if __name__ == "__main__":
    main()

"""zaya against the reference PyTorch implementation (transformers' ``zaya`` model), same weights, same run.

  forward  one fp32 forward of B x T tokens (default 1 x 512): transformers' ``model(ids)`` vs zaya's jitted
           ``apply`` (both produce the full logits); ratio = zaya time / transformers time (< 1: zaya is faster)
  decode   greedy AR decoding (batch 1, 32-token prompt, 64 new tokens, no EOS stop): ``model.generate`` (KV cache,
           ``do_sample=False``) vs ``zaya.generate(sampler="ar")``; asserts both produce the same tokens

The checkpoint is a random ~40M-parameter ZAYA1 built in transformers (every weight drawn so the router picks
different experts per token), written with ``save_pretrained`` and read by ``zaya convert``: one set of weights.
Both sides are timed after a warm-up (zaya's compile excluded), medians of repeats, on the same CPU threads.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time

import numpy as np

from zaya.bench import common

# ~40M parameters: 16.8M embedding + 8 layers of 8 experts (512 -> 2x256 -> 512), CCA 8q/2kv heads of 64
GEOMETRY = dict(vocab_size=32768, hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                head_dim=64, moe_intermediate_size=256, num_experts=8, router_hidden_size=64,
                max_position_embeddings=2048)
QUICK = dict(GEOMETRY, vocab_size=512, hidden_size=64, num_hidden_layers=2, head_dim=16, moe_intermediate_size=32,
             num_experts=4, router_hidden_size=16, max_position_embeddings=256)


def _need_reference():
    try:
        import torch
        import transformers
        from transformers import ZayaForCausalLM  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"zaya bench --vs-transformers needs torch and transformers >= 5.24 with the ZAYA model "
                         f"({e}); install them: pip install torch==2.13.0 'transformers>=5.24'") from None
    return torch, transformers


def reference_model(geometry: dict, seed: int = 0):
    """A transformers ZayaForCausalLM (fp32, eval) with random weights of unit-variance activations."""
    torch, _ = _need_reference()
    from transformers import ZayaConfig, ZayaForCausalLM
    g = dict(geometry)
    cfg = ZayaConfig(**g, rope_parameters={"hybrid": {"rope_type": "default", "rope_theta": 5e6,
                                                      "partial_rotary_factor": 0.5}})
    torch.manual_seed(seed)
    model = ZayaForCausalLM(cfg).eval().float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("embed_tokens.weight"):
                p.normal_(0.0, 1.0)
            elif name.endswith("out_proj.weight"):  # router logits spread out: experts change per token
                p.normal_(0.0, 4.0 / p.shape[1] ** 0.5)
            elif p.ndim >= 2 and "conv_qk" not in name:
                p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5)
    return model


def _same_checkpoint(geometry: dict, workdir: str):
    """(transformers model, zaya.Model) holding the same fp32 weights."""
    import zaya
    from zaya.convert.cli import convert
    ref = reference_model(geometry)
    hf_dir, zaya_dir = os.path.join(workdir, "hf"), os.path.join(workdir, "zaya")
    ref.save_pretrained(hf_dir)
    convert(hf_dir, zaya_dir, dtype="float32")
    return ref, zaya.load(zaya_dir, dtype="float32")


def _median_time(fn, repeats: int) -> tuple[float, list[float], object]:
    """(median seconds, all seconds, the last call's output) after one warm-up call (zaya: compile)."""
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), ts, out


def forward(ref, model, batch: int = 1, seq: int = 512, repeats: int = 5) -> dict:
    torch, _ = _need_reference()
    import jax
    from zaya import layouts
    from zaya.model.transformer import apply
    ids = np.random.default_rng(0).integers(5, model.config.vocab_size, (batch, seq)).astype(np.int32)
    ids_t = torch.as_tensor(ids, dtype=torch.long)
    f = jax.jit(lambda p, x: apply(p, model.config, x, layouts.causal(batch, seq), None, model.impl)[0])
    ids_j = jax.numpy.asarray(ids)

    def run_ref():
        with torch.inference_mode():
            return ref(ids_t).logits

    t_ref, all_ref, want = _median_time(run_ref, repeats)
    t_z, all_z, got = _median_time(lambda: f(model.params, ids_j).block_until_ready(), repeats)
    err = float(np.abs(np.asarray(got) - want.float().numpy()).max())
    return {"what": "forward", "batch": batch, "tokens": seq, "transformers_ms": 1e3 * t_ref, "zaya_ms": 1e3 * t_z,
            "ratio": t_z / t_ref, "max_abs_logit_diff": err, "transformers_all_s": all_ref, "zaya_all_s": all_z}


def decode(ref, model, batch: int = 1, prompt_len: int = 32, new_tokens: int = 64, repeats: int = 3,
           loop: str = "host") -> dict:
    torch, _ = _need_reference()
    import zaya
    cfg = model.config
    rng = np.random.default_rng(1)
    prompts = [[cfg.bos_token_id] + rng.integers(5, cfg.vocab_size, prompt_len - 1).tolist() for _ in range(batch)]
    ids_t = torch.as_tensor(prompts, dtype=torch.long)

    def run_ref():
        with torch.inference_mode():
            return ref.generate(ids_t, attention_mask=torch.ones_like(ids_t), max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)

    def run_z():
        return zaya.generate(model, prompts, sampler="ar", max_new_tokens=new_tokens, loop=loop)

    t_ref, all_ref, out_ref = _median_time(run_ref, repeats)
    t_z, all_z, out_z = _median_time(run_z, repeats)  # wall time of generate (prefill + loop), compile excluded
    want, got = out_ref[:, prompt_len:].tolist(), out_z.tokens
    return {"what": f"decode (AR greedy, {loop} loop)", "batch": batch, "tokens": new_tokens,
            "transformers_ms": 1e3 * t_ref, "zaya_ms": 1e3 * t_z, "ratio": t_z / t_ref, "same_tokens": got == want,
            "transformers_all_s": all_ref, "zaya_all_s": all_z}


def run(what=("forward", "decode"), out: str | None = None, quick: bool = False) -> list[dict]:
    """Both comparisons on one checkpoint; prints a table of times and ratios (zaya / transformers)."""
    torch, transformers = _need_reference()
    geometry = QUICK if quick else GEOMETRY
    m = common.machine()
    with tempfile.TemporaryDirectory(prefix="zaya_vs_hf_") as tmp:
        ref, model = _same_checkpoint(geometry, tmp)
        n_params = sum(p.numel() for p in ref.parameters())
        print(f"[bench vs transformers] {n_params / 1e6:.1f}M parameters, fp32, torch {torch.__version__} "
              f"({torch.get_num_threads()} threads), transformers {transformers.__version__}", flush=True)
        rows = []
        if "forward" in what:
            rows.append(forward(ref, model, seq=64 if quick else 512, repeats=2 if quick else 5))
        if "decode" in what:
            for loop in ("host", "device"):
                rows.append(decode(ref, model, prompt_len=8 if quick else 32, new_tokens=8 if quick else 64,
                                   repeats=1 if quick else 3, loop=loop))
    for r in rows:
        r["params_m"] = n_params / 1e6
    md = "\n".join(["## zaya vs transformers (same weights, fp32, CPU threads as configured)", "",
                    common.machine_markdown(m),
                    common.md_table(rows, ["what", "batch", "tokens", ("transformers_ms", "transformers ms", ".1f"),
                                           ("zaya_ms", "zaya ms", ".1f"), ("ratio", "zaya / transformers", ".2f"),
                                           "same_tokens", ("max_abs_logit_diff", "max |dlogit|", ".1e")]),
                    "", "ratio < 1: zaya is faster. Medians; zaya's compile excluded (one warm-up call each)."])
    print(md, flush=True)
    if out:
        common.write_outputs(out, "vs_transformers", md, {"machine": m, "rows": rows}, {"": rows})
    bad = [r["what"] for r in rows if r.get("same_tokens") is False]
    if bad:
        raise SystemExit(f"zaya bench --vs-transformers: {bad} produced different tokens than transformers")
    return rows

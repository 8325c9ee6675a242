"""A memory-traffic (roofline) model of one decode step of a ZAYA1-style MoE under each block sampler.

For a config (ZayaConfig), hardware (HBM bandwidth W, peak FLOP/s F, a fixed per-forward overhead), batch B,
context L, block size K and proposal levels, every forward of T new tokens per row costs

  bytes  = weights touched + per-row KV/conv state read + new states written + activations and logits written
  FLOPs  = B*T*(2*active matmul params + 2*V*D lm_head) + B*T*n_layers*4*H*d*(L + T)      (attention: QK^T and PV)
  t      = max(bytes / W, FLOPs / F) + overhead

with the weights read once per forward: the attention, router, norm and embedding weights always, and for the MoE
only the experts hit by the forward's B*T tokens, E*(1-(1-1/E)^(B*T)) per layer in expectation under uniform
top-1 routing (moe="distinct"; moe="dense" is every expert on every token, which is how jax lowers
``ragged_dot`` on CPU). A decode step is one or more forwards:

  ar              1 forward,  T = 1                       tokens/step 1
  two_forward     2 forwards, T = K+1 each                tokens/step (1-b^(K+1))/(1-b)
  single_forward  1 forward,  T = (K+1)(1+P)              dense levels: as TF; sparse levels: a Markov chain (below)
  tidar           1 forward,  T = b + b^2                 tokens/step (1-b^b)/(1-b)      (b = K, no bonus token)

with i.i.d. per-position acceptance beta. With sparse levels the proposal chosen after n accepted drafts is the
one at the largest level l <= n, shifted by n - l, so the next step has only K - (n - l) valid drafts (the rest are
mask ids that are never accepted); the expected tokens/step is the stationary mean of that chain.
The speedup bound over AR is E[tokens/step] * t_AR_step / t_step (AR's bound is 1 by construction).

Formulas, hardware sources and the ZAYA1-8B tables: experiments/results/roofline.md.
CLI: python -m zaya.bench.roofline [--out DIR] [--forward-json forward.json] [--quick]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time

import numpy as np

from zaya.config import ZayaConfig


# --------------------------------------------------------------------------------------------------------------
# Hardware.

@dataclasses.dataclass(frozen=True)
class Hardware:
    name: str
    bandwidth: float        # HBM (or DRAM) bytes/s
    peak_flops: float       # dense FLOP/s at the model's dtype (bf16 on accelerators)
    memory: float | None = None   # bytes of device memory (None: unknown/ignored)
    overhead: float = 0.0   # fixed seconds per forward (kernel launches, host sync, sampling)
    source: str = ""

    @property
    def ridge(self) -> float:
        """FLOP per byte at which compute and memory time are equal."""
        return self.peak_flops / self.bandwidth


GPU_OVERHEAD = 200e-6  # assumed fixed cost per forward on accelerators (see roofline.md: sensitivity table)

# Vendor numbers: dense (no 2:4 sparsity) BF16 tensor/matrix peak, HBM bandwidth, capacity. Sources in roofline.md.
HARDWARE = {
    "H100": Hardware("H100 SXM", 3.35e12, 989.4e12, 80e9, GPU_OVERHEAD,
                     "NVIDIA H100 datasheet: BF16 1,979 TFLOPS with sparsity (989 dense), 3.35 TB/s HBM3, 80 GB"),
    "H200": Hardware("H200 SXM", 4.8e12, 989.4e12, 141e9, GPU_OVERHEAD,
                     "NVIDIA H200 datasheet: BF16 1,979 TFLOPS with sparsity (989 dense), 4.8 TB/s HBM3e, 141 GB"),
    "MI300X": Hardware("MI300X", 5.3e12, 1307.4e12, 192e9, GPU_OVERHEAD,
                       "AMD Instinct MI300X datasheet: BF16 1,307.4 TFLOPS dense (2,614.9 sparse), 5.3 TB/s, 192 GB"),
    "MI355X": Hardware("MI355X", 8.0e12, 2516.6e12, 288e9, GPU_OVERHEAD,
                       "AMD Instinct MI355X datasheet: BF16 2.5 PFLOPS dense (5.0 sparse), 8 TB/s HBM3E, 288 GB"),
}


def measure_cpu(size_mb: int = 256, matmul: int = 1024, repeats: int = 5) -> Hardware:
    """This machine as a Hardware: DRAM bandwidth from a numpy copy (read + write bytes), fp32 FLOP/s from a jitted
    matmul (best of sizes matmul and 2*matmul), overhead from an empty jitted call. Medians of repeats."""
    import jax
    import jax.numpy as jnp

    n = size_mb * 2**20 // 8
    src = np.ones(n, np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        ts.append(time.perf_counter() - t0)
    bw = 2 * src.nbytes / float(np.median(ts))
    best = 0.0
    for m in (matmul, 2 * matmul):
        a = jnp.ones((m, m), jnp.float32)
        f = jax.jit(lambda x, y: x @ y)
        f(a, a).block_until_ready()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            f(a, a).block_until_ready()
            ts.append(time.perf_counter() - t0)
        best = max(best, 2 * m**3 / float(np.median(ts)))
    g = jax.jit(lambda x: x + 1)
    x = jnp.ones((8,), jnp.float32)
    g(x).block_until_ready()
    ts = []
    for _ in range(50):
        t0 = time.perf_counter()
        g(x).block_until_ready()
        ts.append(time.perf_counter() - t0)
    from zaya.bench.common import _cpu_model
    return Hardware(f"CPU {_cpu_model()} (measured)", bw, best, None, float(np.median(ts)),
                    f"measured: numpy copy {size_mb} MiB (2x bytes / time), jitted fp32 matmul {matmul}/{2 * matmul}")


# --------------------------------------------------------------------------------------------------------------
# Model sizes from the parameter tree.

def _itemsize(dtype: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]


@dataclasses.dataclass(frozen=True)
class Sizes:
    nonexpert_bytes: float     # every weight except the experts (embedding/lm_head, attention, router, norms)
    expert_bytes: float        # one expert of one layer
    matmul_params_per_token: float  # non-expert matmul params one token multiplies through (lm_head included)
    expert_params: float       # one expert of one layer (3*D*F)
    state_read_per_row: float  # conv state + delayed value read per row per forward (all layers), bytes
    kv_per_token: float        # K and V bytes per cached token (all layers)
    new_state_per_token: float  # k, v, conv input and delayed value written per new token (all layers), bytes
    act_per_token: float       # activations + fp32 logits written per new token, bytes


def sizes(c: ZayaConfig, kv_dtype: str | None = None) -> Sizes:
    from zaya.model.params import param_shapes
    s = _itemsize(c.dtype)
    skv = _itemsize(kv_dtype or c.dtype)
    shapes = param_shapes(c)
    import jax
    leaves = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))[0]
    total = exp = 0
    for path, shp in leaves:
        names = [p.key for p in path]
        n = int(np.prod(shp))
        if "experts" in names:
            exp += n
        else:
            total += n * (4 if names[-1] == "bias" and "router" in names else s)
    Lyr, D, H, Kh, d = c.num_layers, c.hidden_size, c.num_q_heads, c.num_kv_heads, c.head_dim
    E, F, R, V, C = c.num_experts, c.moe_intermediate_size, c.router_hidden_size, c.vocab_size, c.conv_channels
    per_layer_mm = (D * (H * d + Kh * d + Kh * d)   # q, k, v_cur + v_del
                    + H * d * D                     # o
                    + 2 * (H + Kh) * d * d          # grouped conv2, 2 taps
                    + D * R + 2 * R * R + R * (E + 1))  # router MLP
    return Sizes(
        nonexpert_bytes=float(total),
        expert_bytes=float(exp * s / (Lyr * E)),
        matmul_params_per_token=float(Lyr * per_layer_mm + V * D),
        expert_params=float(3 * D * F),
        state_read_per_row=float(Lyr * (2 * C + Kh * d // 2) * skv),
        kv_per_token=float(Lyr * 2 * Kh * d * skv),
        new_state_per_token=float(Lyr * (2 * Kh * d + C + Kh * d // 2) * skv),
        act_per_token=float(Lyr * (8 * D * 4 + (2 * H * d + 2 * Kh * d) * s + 3 * F * s) + V * 4),
    )


def expected_distinct_experts(E: int, n_tokens: float) -> float:
    """Expected number of distinct experts hit by n tokens under uniform top-1 routing: E*(1-(1-1/E)^n)."""
    if n_tokens <= 0:
        return 0.0
    return E * (1.0 - (1.0 - 1.0 / E) ** n_tokens)


# --------------------------------------------------------------------------------------------------------------
# One forward.

def forward_cost(c: ZayaConfig, hw: Hardware, batch: int, T: int, context: int, moe: str = "distinct",
                 chunk_keys: str = "dense", kv_dtype: str | None = None, logits: bool = True,
                 materialized_scores: bool = False) -> dict:
    """Bytes, FLOPs and time of one forward of ``T`` new tokens per row for ``batch`` rows after ``context`` cached
    tokens. moe: 'distinct' (only the experts hit) or 'dense' (every expert on every token). chunk_keys: 'dense'
    (each new token scores all T chunk keys, as a masked dense chunk) or 'causal' (T/2 on average).
    materialized_scores: the fp32 score and probability matrices go through memory (the reference attention;
    16 bytes per score: two writes and two reads), instead of staying on chip (flash-style kernels)."""
    z = sizes(c, kv_dtype)
    N = batch * T
    E = c.num_experts
    if moe == "distinct":
        hit, experts_per_token = expected_distinct_experts(E, N), 1
    elif moe == "dense":
        hit, experts_per_token = (float(E) if N > 0 else 0.0), E
    else:
        raise ValueError(f"moe={moe!r}; use 'distinct' or 'dense'")
    weights = z.nonexpert_bytes + c.num_layers * hit * z.expert_bytes
    kv = batch * (context * z.kv_per_token + z.state_read_per_row)
    act_tok = z.act_per_token - (0 if logits else c.vocab_size * 4)
    if moe == "dense":  # the dense lowering materialises [E, N, D] inputs and [E, N, 3F] hidden states
        act_tok += c.num_layers * (E - 1) * (c.hidden_size + 3 * c.moe_intermediate_size) * _itemsize(c.dtype)
    keys = context + (T if chunk_keys == "dense" else (T + 1) / 2)
    if materialized_scores:
        act_tok += c.num_layers * c.num_q_heads * keys * 16
    written = N * (z.new_state_per_token + act_tok)
    flops_mm = 2.0 * N * (z.matmul_params_per_token + experts_per_token * z.expert_params)
    flops_attn = 4.0 * N * c.num_layers * c.num_q_heads * c.head_dim * keys
    nbytes = weights + kv + written
    flops = flops_mm + flops_attn
    t_mem, t_cmp = nbytes / hw.bandwidth, flops / hw.peak_flops
    return {"T": T, "batch": batch, "context": context, "tokens": N, "experts_hit": hit,
            "bytes": nbytes, "weight_bytes": weights, "kv_bytes": kv, "written_bytes": written,
            "flops": flops, "t_mem": t_mem, "t_compute": t_cmp, "seconds": max(t_mem, t_cmp) + hw.overhead,
            "bound": "memory" if t_mem >= t_cmp else "compute", "intensity": flops / nbytes}


# --------------------------------------------------------------------------------------------------------------
# Tokens per step.

def tokens_per_step_iid(beta: float, drafts: int) -> float:
    """E[1 + accepted] with `drafts` drafts and i.i.d. acceptance beta: (1 - beta^(drafts+1)) / (1 - beta)."""
    if beta >= 1.0:
        return float(drafts + 1)
    return (1.0 - beta ** (drafts + 1)) / (1.0 - beta)


def tokens_per_step_levels(beta: float, K: int, levels) -> float:
    """Stationary E[tokens/step] of the single-forward sampler with proposal ``levels`` (see module doc)."""
    lv = sorted(set(int(x) for x in levels))
    if lv[0] != 0:
        raise ValueError("levels must include 0")
    lvl_of = [max(l for l in lv if l <= n) for n in range(K + 1)]
    P = np.zeros((K + 1, K + 1))  # state m = number of valid drafts this step
    for m in range(K + 1):
        for n in range(m + 1):
            p = beta ** n * ((1 - beta) if n < m else 1.0)
            P[m, K - (n - lvl_of[n])] += p
    pi = np.zeros(K + 1)
    pi[K] = 1.0
    for _ in range(10000):
        nxt = pi @ P
        if np.abs(nxt - pi).max() < 1e-14:
            pi = nxt
            break
        pi = nxt
    return float(sum(pi[m] * tokens_per_step_iid(beta, m) for m in range(K + 1)))


def sampler_forwards(sampler: str, K: int, levels=None) -> list[int]:
    """Query tokens per row of each forward of one step."""
    if sampler == "ar":
        return [1]
    if sampler == "two_forward":
        return [K + 1, K + 1]
    if sampler == "single_forward":
        P = K + 1 if levels is None else len(levels)
        return [(K + 1) * (1 + P)]
    if sampler == "tidar":
        return [K + K * K]
    raise ValueError(f"unknown sampler {sampler!r}")


def tokens_per_step(sampler: str, beta: float, K: int, levels=None) -> float:
    if sampler == "ar":
        return 1.0
    if sampler == "two_forward" or (sampler == "single_forward" and levels is None):
        return tokens_per_step_iid(beta, K)
    if sampler == "single_forward":
        return tokens_per_step_levels(beta, K, levels)
    if sampler == "tidar":
        return tokens_per_step_iid(beta, K - 1)
    raise ValueError(f"unknown sampler {sampler!r}")


def step_cost(c: ZayaConfig, hw: Hardware, sampler: str, batch: int, context: int, K: int = 16, levels=None,
              beta: float = 0.85, **kw) -> dict:
    """Cost of one decode step of ``sampler`` and its speedup bound over AR at the same batch and context."""
    fw = [forward_cost(c, hw, batch, T, context, **kw) for T in sampler_forwards(sampler, K, levels)]
    ar = forward_cost(c, hw, batch, 1, context, **kw)
    t = sum(f["seconds"] for f in fw)
    e = tokens_per_step(sampler, beta, K, levels)
    return {"sampler": sampler, "K": K, "levels": levels, "beta": beta, "batch": batch, "context": context,
            "forwards": len(fw), "query_tokens": sum(sampler_forwards(sampler, K, levels)),
            "bytes": sum(f["bytes"] for f in fw), "flops": sum(f["flops"] for f in fw), "seconds": t,
            "ar_seconds": ar["seconds"], "cost_ratio": t / ar["seconds"], "tokens_per_step": e,
            "speedup": e * ar["seconds"] / t, "bound": "+".join(dict.fromkeys(f["bound"] for f in fw)),
            "tokens_per_s": batch * e / t, "ar_tokens_per_s": batch / ar["seconds"]}


def fits(c: ZayaConfig, hw: Hardware, batch: int, context: int, slack_tokens: int = 300) -> bool:
    """Weights + KV/conv cache of ``batch`` rows at ``context`` (+ slack) fit in one device's memory."""
    if hw.memory is None:
        return True
    z = sizes(c)
    weights = z.nonexpert_bytes + c.num_layers * c.num_experts * z.expert_bytes
    return weights + batch * (context + slack_tokens) * z.kv_per_token <= hw.memory


def knee_tokens(c: ZayaConfig, hw: Hardware, context: int = 0, moe: str = "distinct", batch: int = 1) -> int:
    """Smallest number of new tokens per row (``batch`` rows) at which one forward becomes compute-bound."""
    bound = lambda T: forward_cost(c, hw, batch, T, context, moe=moe)["bound"]
    lo, hi = 1, 1 << 22
    if bound(hi) == "memory":
        return hi
    while lo < hi:
        mid = (lo + hi) // 2
        if bound(mid) == "compute":
            hi = mid
        else:
            lo = mid + 1
    return lo


def knee_table(hardware=("H100", "H200", "MI300X", "MI355X"), batches=(1, 16, 64), contexts=(4096, 32768, 131072)):
    """ZAYA1-8B bf16: query tokens per row at which one forward turns compute-bound."""
    from zaya.config import preset
    c = preset("zaya1-8b", dtype="bfloat16")
    rows = []
    for hn in hardware:
        hw = HARDWARE[hn]
        r = {"hw": hn, "ridge": hw.ridge}
        for L in contexts:
            for B in batches:
                r[f"{L // 1024}k B={B}"] = knee_tokens(c, hw, L, batch=B)
        rows.append(r)
    return rows


# --------------------------------------------------------------------------------------------------------------
# Tables.

LAYOUTS_8B = [("TF K=16", "two_forward", None), ("SF 0,4,7,11", "single_forward", (0, 4, 7, 11)),
              ("SF dense", "single_forward", None), ("TiDAR b=16", "tidar", None)]


def zaya8b_table(hardware=("H100", "H200", "MI300X", "MI355X"), batches=(1, 4, 16, 64, 256),
                 contexts=(4096, 32768, 131072), beta: float = 0.85, K: int = 16, overhead: float | None = None,
                 layouts=LAYOUTS_8B) -> list[dict]:
    from zaya.config import preset
    c = preset("zaya1-8b", dtype="bfloat16")
    rows = []
    for hn in hardware:
        hw = HARDWARE[hn] if overhead is None else dataclasses.replace(HARDWARE[hn], overhead=overhead)
        for L in contexts:
            for B in batches:
                ar = forward_cost(c, hw, B, 1, L)
                r = {"hw": hn, "context": L, "batch": B, "fits": fits(c, hw, B, L),
                     "ar_ms": 1e3 * ar["seconds"], "ar_bound": ar["bound"], "ar_tok_s": B / ar["seconds"]}
                for name, s, lv in layouts:
                    st = step_cost(c, hw, s, B, L, K, lv, beta)
                    r[name] = st["speedup"]
                    r[name + " ratio"] = st["cost_ratio"]
                    r[name + " bound"] = st["bound"]
                rows.append(r)
    return rows


def zaya8b_markdown(rows, layouts=LAYOUTS_8B) -> str:
    head = ["accel", "context", "B", "AR ms/step", "AR bound"] + [f"{n} (ratio)" for n, _, _ in layouts]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        mark = "" if r["fits"] else " †"
        cells = [r["hw"], f"{r['context'] // 1024}k", f"{r['batch']}{mark}", f"{r['ar_ms']:.2f}", r["ar_bound"]]
        for n, _, _ in layouts:
            b = "c" if "compute" in r[n + " bound"] else "m"
            cells.append(f"**{r[n]:.2f}**× ({r[n + ' ratio']:.1f}, {b})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sensitivity(hw_name: str = "MI355X", batch: int = 16, context: int = 131072, betas=(0.7, 0.8, 0.85, 0.9, 0.95),
                overheads=(0.0, GPU_OVERHEAD, 1e-3), layouts=LAYOUTS_8B) -> list[dict]:
    """ZAYA1-8B speedup bounds at one point for several acceptance rates and fixed overheads."""
    from zaya.config import preset
    c = preset("zaya1-8b", dtype="bfloat16")
    rows = []
    for ovh in overheads:
        hw = dataclasses.replace(HARDWARE[hw_name], overhead=ovh)
        for beta in betas:
            r = {"hw": hw_name, "context": context, "batch": batch, "overhead_ms": 1e3 * ovh, "beta": beta}
            for name, smp, lv in layouts:
                st = step_cost(c, hw, smp, batch, context, 16, lv, beta)
                r[name] = st["speedup"]
                r[name + " tok/step"] = st["tokens_per_step"]
            rows.append(r)
    return rows


def fit_efficiency(bytes_, flops, seconds, max_bandwidth: float = np.inf, max_flops: float = np.inf
                   ) -> tuple[float, float, float, float]:
    """Least-squares fit (on log time) of t = o + max(bytes / W, flops / F) to measurements, with W and F at most
    the machine's peaks and 0 < o <= the smallest time. Returns (W, F, o, max relative error of the fit)."""
    from scipy.optimize import least_squares
    b, f, t = (np.asarray(x, float) for x in (bytes_, flops, seconds))
    model = lambda x: np.exp(x[2]) + np.maximum(b * np.exp(-x[0]), f * np.exp(-x[1]))
    hi = np.array([np.log(max_bandwidth), np.log(max_flops), np.log(t.min())])
    lo = np.array([-np.inf, -np.inf, np.log(t.min()) - 30])
    x0 = np.minimum(np.log([b[0] / t[0], f[-1] / t[-1], 0.3 * t.min()]), hi - 1e-9)
    r = least_squares(lambda x: np.log(model(x)) - np.log(t), x0, bounds=(lo, hi))
    W, F, o = np.exp(r.x)
    return float(W), float(F), float(o), float(np.abs(model(r.x) / t - 1).max())


def cpu_comparison(forward_rows: list[dict], hw: Hardware, moe: str = "dense",
                   materialized_scores: bool = True) -> list[dict]:
    """Predicted vs measured forward-cost ratios (rows from zaya.bench.forward.cost_ratio, with a 'preset' key).

    Bytes and FLOPs 'as implemented' (defaults: CPU): every expert on every token (moe='dense': jax lowers
    ragged_dot densely on CPU; use moe='distinct' for accelerators), the reference attention over every allocated
    cache slot with its scores in memory. Three predictions:
      pure_ratio    the roofline at this machine's measured peaks (copy bandwidth, large-matmul FLOP/s, empty-call
                    overhead);
      fit_ratio     the same max() roofline with bandwidth, FLOP/s and overhead fitted to the preset's measured
                    times (fit_* columns: the efficiencies XLA:CPU reaches on these shapes);
      ideal_ratio   ideal kernels at the measured peaks (only the experts hit, context = cache length, scores on
                    chip, no overhead)."""
    from zaya.config import preset
    out = []
    for name in dict.fromkeys(r["preset"] for r in forward_rows):
        rr = sorted((r for r in forward_rows if r["preset"] == name), key=lambda r: r["T"])
        c = preset(name, dtype=rr[0].get("dtype", "float32"))
        ctx, B = rr[0]["cache_slots"], rr[0]["batch"]
        pure = [forward_cost(c, hw, B, r["T"], ctx, moe=moe, materialized_scores=materialized_scores) for r in rr]
        nohw = dataclasses.replace(hw, overhead=0.0)
        ideal = [forward_cost(c, nohw, B, r["T"], rr[0]["cache_len"]) for r in rr]
        meas = [r["ms"] / 1e3 for r in rr]
        fit = None
        if len(rr) >= 3:
            W, F, o, err = fit_efficiency([p["bytes"] for p in pure], [p["flops"] for p in pure], meas,
                                          hw.bandwidth, hw.peak_flops)
            fhw = Hardware("fit", W, F, overhead=o)
            fit = [forward_cost(c, fhw, B, r["T"], ctx, moe=moe, materialized_scores=materialized_scores)
                   for r in rr]
        for i, r in enumerate(rr):
            p = pure[i]
            row = {"preset": name, "T": r["T"], "measured_ms": r["ms"], "measured_ratio": r["ratio"],
                   "measured_ratio_min": r.get("ratio_min"), "mbytes": p["bytes"] / 1e6, "gflops": p["flops"] / 1e9,
                   "pure_ms": 1e3 * p["seconds"], "pure_ratio": p["seconds"] / pure[0]["seconds"],
                   "pure_bound": p["bound"], "ideal_ratio": ideal[i]["seconds"] / ideal[0]["seconds"],
                   "achieved_gb_s": p["bytes"] / meas[i] / 1e9, "achieved_gflop_s": p["flops"] / meas[i] / 1e9}
            if fit is not None:
                row.update(fit_ms=1e3 * fit[i]["seconds"], fit_ratio=fit[i]["seconds"] / fit[0]["seconds"],
                           fit_bound=fit[i]["bound"], fit_gb_s=W / 1e9, fit_gflop_s=F / 1e9, fit_overhead_ms=1e3 * o,
                           fit_max_rel_err=err)
            out.append(row)
    return out


def plot_speedup_vs_batch(out: str, beta: float = 0.85, contexts=(4096, 32768, 131072),
                          batches=(1, 2, 4, 8, 16, 32, 64, 128, 256)) -> str | None:
    """Speedup bound vs batch: one panel per (context, accelerator), one line per layout; hollow markers where
    the weights and KV cache do not fit in one device's memory."""
    from zaya.bench.common import pyplot
    plt = pyplot()
    if plt is None:
        return None
    from zaya.config import preset
    c = preset("zaya1-8b", dtype="bfloat16")
    accs = ("H100", "H200", "MI300X", "MI355X")
    fig, axes = plt.subplots(len(contexts), len(accs), figsize=(4 * len(accs), 3.2 * len(contexts)), sharex=True,
                             sharey=True, squeeze=False)
    for i, L in enumerate(contexts):
        for j, hn in enumerate(accs):
            ax, hw = axes[i, j], HARDWARE[hn]
            for k, (name, s, lv) in enumerate(LAYOUTS_8B):
                ys = [step_cost(c, hw, s, b, L, 16, lv, beta)["speedup"] for b in batches]
                ok = [fits(c, hw, b, L) for b in batches]
                ax.plot(batches, ys, "-", color=f"C{k}", label=name if (i, j) == (0, 0) else None)
                ax.scatter([b for b, o in zip(batches, ok) if o], [y for y, o in zip(ys, ok) if o], s=12,
                           color=f"C{k}")
                ax.scatter([b for b, o in zip(batches, ok) if not o], [y for y, o in zip(ys, ok) if not o], s=12,
                           facecolors="none", edgecolors=f"C{k}")
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            ax.grid(alpha=0.3)
            ax.set_title(f"{hn}, context {L // 1024}k", fontsize=9)
            if i == len(contexts) - 1:
                ax.set_xlabel("batch")
            if j == 0:
                ax.set_ylabel("speedup bound over AR")
    fig.suptitle(f"ZAYA1-8B bf16, K=16, i.i.d. acceptance beta={beta} (hollow: does not fit in device memory)",
                 fontsize=10)
    fig.legend(loc="lower center", ncol=len(LAYOUTS_8B), fontsize=8)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    p = os.path.join(out, "roofline_speedup_vs_batch.png")
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--forward-json", default=None, help="forward.json from `zaya bench forward --out` (else measure)")
    ap.add_argument("--beta", type=float, default=0.85)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    run(a.out, a.forward_json, a.beta, a.quick)


def run(out: str | None = None, forward_json: str | None = None, beta: float = 0.85, quick: bool = False) -> dict:
    """CPU measurement + predicted-vs-measured forward-cost ratios + the ZAYA1-8B table and plot."""
    from zaya.bench import common
    m = common.machine()
    cpu = measure_cpu(64 if quick else 256, 256 if quick else 1024, 3 if quick else 7)
    if forward_json and os.path.exists(forward_json):
        with open(forward_json) as f:
            fwd = json.load(f)["ratio"]
    else:
        from zaya.bench import forward
        fwd = forward.run(("tiny",) if quick else ("tiny", "small-100m"), None, quick)["ratio"]
    cmp_rows = cpu_comparison(fwd, cpu)
    rows = zaya8b_table(batches=(1, 4) if quick else (1, 4, 16, 64, 256),
                        contexts=(4096,) if quick else (4096, 32768, 131072), beta=beta)
    parts = ["## Roofline model", "", common.machine_markdown(m),
             f"- measured CPU: {cpu.bandwidth / 1e9:.1f} GB/s copy bandwidth, {cpu.peak_flops / 1e9:.1f} GFLOP/s "
             f"fp32 matmul, {1e6 * cpu.overhead:.0f} µs empty jitted call; ridge {cpu.ridge:.1f} FLOP/byte", "",
             common.md_table(cmp_rows, ["preset", "T", ("measured_ms", "measured ms", ".2f"),
                                        ("measured_ratio", "measured t(T)/t(1)", ".2f"),
                                        ("measured_ratio_min", "ratio of min times", ".2f"),
                                        ("pure_ratio", "roofline at peaks", ".2f"), ("pure_bound", "bound"),
                                        ("fit_ratio", "roofline, fitted efficiencies", ".2f"),
                                        ("fit_ms", "fitted ms", ".2f"), ("ideal_ratio", "ideal kernels", ".2f"),
                                        ("mbytes", "MB moved", ".1f"), ("gflops", "GFLOP", ".3f"),
                                        ("achieved_gb_s", "achieved GB/s", ".1f"),
                                        ("achieved_gflop_s", "achieved GFLOP/s", ".1f")],
                             "forward-cost ratio on this CPU: predicted vs measured"), "",
             "", "fitted efficiencies (t = overhead + max(bytes / W, FLOPs / F), least squares on log time): " +
             "; ".join(f"{r['preset']}: W = {r['fit_gb_s']:.1f} GB/s, F = {r['fit_gflop_s']:.1f} GFLOP/s, "
                       f"overhead = {r['fit_overhead_ms']:.2f} ms (largest error {100 * r['fit_max_rel_err']:.0f}%)"
                       for r in cmp_rows
                       if "fit_gb_s" in r and r["T"] == min(x["T"] for x in cmp_rows if x["preset"] == r["preset"])),
             "", f"### ZAYA1-8B bf16, speedup bound over AR (beta={beta}, K=16)", "", zaya8b_markdown(rows), ""]
    knees = knee_table()
    parts += [common.md_table(knees, [("hw", "accel"), ("ridge", "ridge FLOP/B", ".0f")] + list(knees[0])[2:],
                              "ZAYA1-8B: query tokens per row at which one forward turns compute-bound"), ""]
    sens = []
    for hn, B, L in (("H100", 1, 4096), ("H100", 16, 32768), ("MI355X", 16, 131072)):
        sens += sensitivity(hn, B, L, betas=(0.85,) if quick else (0.7, 0.85, 0.95))
    cols = ["hw", "context", "batch", ("overhead_ms", "overhead ms", ".1f"), "beta"] + \
        [(n, n, ".2f") for n, _, _ in LAYOUTS_8B]
    parts += [common.md_table(sens, cols, "sensitivity: acceptance beta and fixed per-forward overhead"), ""]
    md = "\n".join(parts)
    print(md)
    res = {"machine": m, "cpu": dataclasses.asdict(cpu), "comparison": cmp_rows, "zaya8b": rows, "knees": knees,
           "sensitivity": sens}
    if out:
        common.write_outputs(out, "roofline", md, res, {"cpu": cmp_rows, "zaya8b": rows, "knees": knees,
                                                        "sensitivity": sens})
        plot_speedup_vs_batch(out, beta)
    return res


if __name__ == "__main__":
    main()

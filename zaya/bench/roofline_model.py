"""The roofline model: a memory-traffic model of one decode step of a ZAYA1-style MoE under each block sampler.

Pure functions of a config, a ``Hardware`` and the sampler registry (``zaya.decode.samplers``); the tables, plots
and the CLI that use them are in ``zaya.bench.roofline``.

For a config (ZayaConfig), hardware (HBM bandwidth W, peak FLOP/s F, a fixed per-forward overhead), batch B,
context L, block size K and proposal levels, every forward of T new tokens per row costs

  bytes  = weights touched + per-row KV/conv state read + new states written + activations and logits written
  FLOPs  = B*T*(2*active matmul params + 2*V*D lm_head) + B*T*n_layers*4*H*d*(L + T)      (attention: QK^T and PV)
  t      = max(bytes / W, FLOPs / F) + overhead

with the weights read once per forward: the attention, router, norm and embedding weights always, and for the MoE
only the experts hit by the forward's B*T tokens, E*(1-(1-1/E)^(B*T)) per layer in expectation under uniform
top-1 routing (moe="distinct"; moe="dense" is every expert on every token, which is how jax lowers
``ragged_dot`` on CPU). A decode step is one or more forwards, as the sampler's registered ``query_tokens`` says;
its tokens per step at i.i.d. per-position acceptance beta come from the sampler's ``expected_tokens_per_step``:

  ar              1 forward,  T = 1                       tokens/step 1
  two_forward     2 forwards, T = K+1 each                tokens/step (1-b^(K+1))/(1-b)
  single_forward  1 forward,  T = (K+1)(1+P)              dense levels: as TF; sparse levels: a Markov chain
                                                          (zaya.decode.single_forward.tokens_per_step_levels)
  tidar           1 forward,  T = b + b^2                 tokens/step (1-b^b)/(1-b)      (b = K, no bonus token)

The speedup bound over AR is E[tokens/step] * t_AR_step / t_step (AR's bound is 1 by construction).
Formulas, hardware sources and the ZAYA1-8B tables: experiments/results/roofline.md.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from zaya.config import ZayaConfig
from zaya.decode import samplers
from zaya.decode.options import DecodeOptions
from zaya.decode.block import tokens_per_step_iid  # noqa: F401  (part of the model's API)
from zaya.decode.single_forward import tokens_per_step_levels  # noqa: F401


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
    "MI250X": Hardware("MI250X", 3.2e12, 383e12, 128e9, GPU_OVERHEAD,
                       "AMD Instinct MI250X datasheet: BF16 383 TFLOPS dense, 3.2 TB/s HBM2e, 128 GB"),
    "MI355X": Hardware("MI355X", 8.0e12, 2516.6e12, 288e9, GPU_OVERHEAD,
                       "AMD Instinct MI355X datasheet: BF16 2.5 PFLOPS dense (5.0 sparse), 8 TB/s HBM3E, 288 GB"),
}


def hardware_of(device_kind: str) -> Hardware | None:
    """The entry for a jax ``device_kind`` ("NVIDIA H200", "AMD Instinct MI300X" ...), None when not listed (CPU)."""
    kind = device_kind.lower()
    return next((hw for key, hw in HARDWARE.items() if key.lower() in kind), None)


def hbm_bandwidth(device_kind: str) -> float | None:
    """Nominal HBM bytes/s of a jax ``device_kind`` (None when not listed: "of HBM" columns stay empty)."""
    hw = hardware_of(device_kind)
    return None if hw is None else hw.bandwidth


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
    from zaya.model.params import num_params
    s = _itemsize(c.dtype)
    skv = _itemsize(kv_dtype or c.dtype)
    n = num_params(c, by="group")
    total = n["dense"] * s + n["buffers"] * 4  # the balancing biases stay fp32
    exp = n["experts"]
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
# Tokens per step and one decode step.

def _options(K: int, levels=None) -> DecodeOptions:
    return DecodeOptions(block_size=K, levels=levels)


def sampler_forwards(sampler: str, K: int, levels=None) -> list[int]:
    """Query tokens per row of each forward of one step (the registered sampler's ``query_tokens``)."""
    return list(samplers.get(sampler).query_tokens(_options(K, levels)))


def tokens_per_step(sampler: str, beta: float, K: int, levels=None) -> float:
    """E[tokens per step] at i.i.d. acceptance beta (the registered sampler's ``expected_tokens_per_step``)."""
    return float(samplers.get(sampler).expected_tokens_per_step(beta, _options(K, levels)))


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

"""The roofline model (zaya.bench.roofline_model): scaling laws, limits, a hand-computed case, the speedup knee,
tokens per step from the sampler registry."""
import dataclasses

import numpy as np
import pytest

import zaya
from zaya.bench import roofline_model as R
from zaya.config import ZayaConfig

H100 = R.HARDWARE["H100"]
Z8 = zaya.preset("zaya1-8b", dtype="bfloat16")


def test_bytes_affine_in_context_and_kv_linear():
    b = [R.forward_cost(Z8, H100, 4, 17, L)["bytes"] for L in (0, 1000, 2000, 4000)]
    assert b[2] - b[1] == pytest.approx(b[1] - b[0], rel=1e-12)
    assert b[3] - b[0] == pytest.approx(4 * (b[1] - b[0]), rel=1e-12)
    kv = [R.forward_cost(Z8, H100, 4, 17, L)["kv_bytes"] - R.forward_cost(Z8, H100, 4, 17, 0)["kv_bytes"]
          for L in (1000, 2000)]
    assert kv[1] == pytest.approx(2 * kv[0])
    # ... and linear in batch for the per-row part: KV of 8 rows = 2 x KV of 4 rows
    assert R.forward_cost(Z8, H100, 8, 1, 4096)["kv_bytes"] == pytest.approx(
        2 * R.forward_cost(Z8, H100, 4, 1, 4096)["kv_bytes"])


def test_distinct_experts_formula_limits():
    E = 16
    assert R.expected_distinct_experts(E, 0) == 0
    assert R.expected_distinct_experts(E, 1) == pytest.approx(1.0)
    assert R.expected_distinct_experts(E, 2) == pytest.approx(2 - 1 / E)
    assert R.expected_distinct_experts(E, 10**6) == pytest.approx(E)
    assert R.expected_distinct_experts(1, 50) == pytest.approx(1.0)
    v = [R.expected_distinct_experts(E, n) for n in range(1, 200)]
    assert all(a < b for a, b in zip(v, v[1:])) and v[-1] < E
    # weights grow with the tokens of a forward only through the experts, and saturate at all experts
    w = [R.forward_cost(Z8, H100, 1, T, 0)["weight_bytes"] for T in (1, 17, 10**5)]
    z = R.sizes(Z8)
    assert w[0] == pytest.approx(z.nonexpert_bytes + Z8.num_layers * z.expert_bytes)
    assert w[2] == pytest.approx(z.nonexpert_bytes + Z8.num_layers * Z8.num_experts * z.expert_bytes)
    assert w[0] < w[1] < w[2]


def test_weight_bytes_match_the_param_tree():
    z = R.sizes(Z8)
    total = z.nonexpert_bytes + Z8.num_layers * Z8.num_experts * z.expert_bytes
    # num_params excludes the fp32 balancing biases (buffers): they are the only difference besides dtype
    biases = Z8.num_layers * (Z8.num_experts + 1)
    assert total == pytest.approx(2 * Z8.num_params() + 4 * biases + 2 * Z8.router_hidden_size, rel=1e-9)


@pytest.mark.parametrize("hw", list(R.HARDWARE))
@pytest.mark.parametrize("B,L", [(1, 4096), (64, 131072), (256, 1024)])
def test_ar_speedup_bound_is_one(hw, B, L):
    st = R.step_cost(Z8, R.HARDWARE[hw], "ar", B, L, beta=0.9)
    assert st["speedup"] == pytest.approx(1.0) and st["tokens_per_step"] == 1.0 and st["cost_ratio"] == 1.0


def test_tokens_per_step_formulas():
    assert R.tokens_per_step_iid(0.0, 16) == 1.0
    assert R.tokens_per_step_iid(1.0, 16) == 17.0
    # the doc's TiDAR table: b=16, alpha=0.9 -> 8.15 (b - 1 verified drafts + the always-kept first)
    assert R.tokens_per_step("tidar", 0.9, 16) == pytest.approx(8.147, abs=1e-3)
    assert R.tokens_per_step("two_forward", 0.85, 16) == pytest.approx((1 - 0.85**17) / 0.15)
    # sparse levels: dense levels reproduce the closed form; fewer levels can only lose tokens; beta=1 -> K+1
    for beta in (0.3, 0.8, 0.95):
        assert R.tokens_per_step_levels(beta, 16, range(17)) == pytest.approx(R.tokens_per_step_iid(beta, 16))
        sparse = R.tokens_per_step_levels(beta, 16, (0, 4, 7, 11))
        only0 = R.tokens_per_step_levels(beta, 16, (0,))
        assert only0 < sparse < R.tokens_per_step_iid(beta, 16)
    assert R.tokens_per_step_levels(1.0, 16, (0, 4, 7, 11)) == pytest.approx(17.0, rel=1e-6)


def test_tokens_per_step_levels_small_chain_by_hand():
    # K=2, levels (0,): after n accepted the next step has 2 - n valid drafts.
    # states m in {0,1,2}; from m=2: n=0 (1-b) -> 2, n=1 b(1-b) -> 1, n=2 b^2 -> 0; m=1: n=0 -> 2, n=1 -> 1;
    # m=0: n=0 -> 2. Solve the stationary distribution directly.
    b = 0.6
    P = np.array([[0, 0, 1], [0, b, 1 - b], [b * b, b * (1 - b), 1 - b]])
    w, v = np.linalg.eig(P.T)
    pi = np.real(v[:, np.argmin(np.abs(w - 1))])
    pi /= pi.sum()
    want = pi[0] * 1 + pi[1] * (1 + b) + pi[2] * (1 + b + b * b)
    assert R.tokens_per_step_levels(b, 2, (0,)) == pytest.approx(want, rel=1e-9)


def test_hand_computed_small_case():
    c = ZayaConfig(vocab_size=100, hidden_size=8, num_layers=1, num_q_heads=2, num_kv_heads=1, head_dim=4,
                   num_experts=2, moe_intermediate_size=4, router_hidden_size=2, dtype="float32")
    hw = R.Hardware("toy", bandwidth=1e9, peak_flops=1e9, overhead=1e-6)
    B, T, L = 2, 3, 10
    r = R.forward_cost(c, hw, B, T, L)
    D, H, K, d, E, F, Rh, V = 8, 2, 1, 4, 2, 4, 2, 100
    C = (H + K) * d                                             # 12 conv channels
    expert = 3 * D * F * 4                                      # 384 bytes per expert
    hit = E * (1 - (1 - 1 / E) ** (B * T))                      # 1.96875 experts
    total_params = c.num_params() + (E + 1) + Rh                # + balancing biases + layer-0 states_scale
    nonexpert = (total_params - E * 3 * D * F) * 4
    assert r["experts_hit"] == pytest.approx(hit)
    assert r["weight_bytes"] == pytest.approx(nonexpert + hit * expert)
    kv = B * (L * 2 * K * d * 4 + (2 * C + K * d // 2) * 4)     # 2 rows x (10 x 32 B + 26 x 4 B)
    assert r["kv_bytes"] == pytest.approx(kv) and kv == 2 * (320 + 104)
    act = 8 * D * 4 + (2 * H * d + 2 * K * d) * 4 + 3 * F * 4 + V * 4
    new = (2 * K * d + C + K * d // 2) * 4
    assert r["written_bytes"] == pytest.approx(B * T * (act + new))
    mm = D * (H * d + 2 * K * d) + H * d * D + 2 * (H + K) * d * d + D * Rh + 2 * Rh * Rh + Rh * (E + 1) + V * D
    flops = 2 * B * T * (mm + 3 * D * F) + 4 * B * T * H * d * (L + T)
    assert r["flops"] == pytest.approx(flops)
    assert r["seconds"] == pytest.approx(max(r["bytes"], flops) / 1e9 + 1e-6)
    assert r["bound"] == ("memory" if r["bytes"] >= flops else "compute")


def test_speedup_falls_past_the_compute_knee():
    hw = dataclasses.replace(H100, overhead=0.0)
    for sampler, levels in (("single_forward", None), ("tidar", None), ("single_forward", (0, 4, 7, 11))):
        batches = [2**i for i in range(0, 11)]
        sp = [R.step_cost(Z8, hw, sampler, b, 4096, 16, levels, 0.85)["speedup"] for b in batches]
        bounds = [R.step_cost(Z8, hw, sampler, b, 4096, 16, levels, 0.85)["bound"] for b in batches]
        knee = next(i for i, b in enumerate(bounds) if "compute" in b)
        peak = int(np.argmax(sp))
        assert peak <= knee + 1
        after = sp[max(peak, knee):]
        assert all(x > y for x, y in zip(after, after[1:])), (sampler, sp)
        assert sp[-1] < sp[peak]
    # dense TiDAR at batch 1024 is slower than AR (its 272 query slots per row are all paid for in FLOPs)
    assert R.step_cost(Z8, hw, "tidar", 1024, 4096, 16, None, 0.85)["speedup"] < 1


def test_memory_bound_regime_pays_and_kv_dominated_pays_most():
    # Long context (KV-read dominated): block decoding approaches E[tokens/step] / forwards-cost.
    hw = H100
    short = R.step_cost(Z8, hw, "single_forward", 4, 4096, 16, (0, 4, 7, 11), 0.85)["speedup"]
    long = R.step_cost(Z8, hw, "single_forward", 4, 131072, 16, (0, 4, 7, 11), 0.85)["speedup"]
    assert 1 < short < long < R.tokens_per_step("single_forward", 0.85, 16, (0, 4, 7, 11))
    # the knee: compute-bound forwards need many more tokens than the dense-model ridge (MoE: all experts, 1 active)
    assert R.knee_tokens(Z8, hw) > hw.ridge


def test_fits_flags_oversized_configs():
    assert R.fits(Z8, H100, 1, 4096)
    assert not R.fits(Z8, H100, 256, 131072)
    assert R.fits(Z8, R.HARDWARE["MI355X"], 16, 131072) and not R.fits(Z8, H100, 16, 131072)


def test_fit_efficiency_recovers_a_roofline():
    W, F, o = 5e9, 2e10, 3e-4
    b = np.array([4e8, 4.1e8, 4.3e8, 5e8, 7e8])
    f = np.array([2e8, 8e8, 3.2e9, 1.3e10, 5e10])
    t = o + np.maximum(b / W, f / F)
    got = R.fit_efficiency(b, f, t)
    assert got[:3] == pytest.approx((W, F, o), rel=1e-3) and got[3] < 1e-6
    W2, F2, o2, err = R.fit_efficiency(b, f, t, max_bandwidth=1e9)  # bounded below the truth: worse fit
    assert W2 <= 1e9 * (1 + 1e-9) and err > 1e-3


def test_a_registered_sampler_reaches_the_roofline():
    """The roofline reads query tokens and tokens per step from the sampler registry: a sampler registered from a
    notebook (here: TF with a third, 1-token forward per step) is costed with no edit to the model."""
    import dataclasses

    from zaya.decode import samplers
    tf = samplers.get("two_forward")
    samplers.register(dataclasses.replace(tf, name="tf3", query_tokens=lambda o: tf.query_tokens(o) + (1,)))
    try:
        st, base = (R.step_cost(Z8, H100, s, 4, 4096, 8, beta=0.8) for s in ("tf3", "two_forward"))
    finally:
        del samplers.SAMPLERS["tf3"]
    assert R.sampler_forwards("two_forward", 8) == [9, 9] and st["forwards"] == 3 and st["query_tokens"] == 19
    assert st["tokens_per_step"] == base["tokens_per_step"] == pytest.approx(R.tokens_per_step_iid(0.8, 8))
    assert st["seconds"] == pytest.approx(base["seconds"] + R.forward_cost(Z8, H100, 4, 1, 4096)["seconds"])
    with pytest.raises(ValueError, match="unknown sampler 'tf3'"):
        R.step_cost(Z8, H100, "tf3", 4, 4096)


@pytest.mark.parametrize("kind,want", [("NVIDIA H200", 4.8e12), ("NVIDIA H100 80GB HBM3", 3.35e12),
                                       ("AMD Instinct MI300X", 5.3e12), ("AMD Instinct MI250X", 3.2e12),
                                       ("cpu", None)])
def test_hbm_bandwidth_by_device_kind(kind, want):
    assert R.hbm_bandwidth(kind) == want

"""The Pallas verify-attention kernel (attention impl ``pallas``, interpret mode on CPU) equals the XLA reference.

Every decode layout (AR, verify, draft_anchored, single_forward sparse and dense, tidar_published), GQA ratios
1/3/4/8, head dims 64/128 and non-powers of two, ragged cache lengths with 0 and a full cache, fp32 and bf16, batch
1 and 5; exact split combination; the limits; no copy of the cache; lowering to Triton for CUDA and ROCm (no GPU
needed); auto's choice; end to end through ``zaya.generate``; the benchmark's smoke run. Sizes are tiny: interpret
mode runs every program of the grid one after another, and these tests are compile-bound (one jit per case).
On a GPU (launch/gpu_check.sh) the same tests run the compiled kernel.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zaya
from zaya import layouts
from zaya.kernels import decode_attention as kernel
from zaya.kernels import platform
from zaya.model import attention


def _inputs(B, T, S, H, K, d, dtype=jnp.float32, lens=None, seed=0):
    """New q/k/v [B, T, ...] and a cache [B, S, K, d] whose slots at or past cache_len hold large garbage (a kernel
    that read them unmasked would be far off). cache_len: ragged, with an empty row and a full row when B > 1.
    numpy-made: no eager jax op to compile per shape (interpret-mode tests are compile-bound)."""
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((B, T, n, d), np.float32) for n in (H, K, K))
    if lens is None:
        lens = [S - 5] if B == 1 else [0, S, *np.linspace(1, S - 1, B - 2).astype(int)]
    lens = np.asarray(lens[:B], np.int32)
    valid = (np.arange(S)[None, :] < lens[:, None])[:, :, None, None]
    ck = np.where(valid, rng.standard_normal((B, S, K, d), np.float32), 300.0)
    cv = np.where(valid, rng.standard_normal((B, S, K, d), np.float32), -500.0)
    cast = lambda x: jnp.asarray(x, dtype)
    return cast(q), cast(k), cast(v), cast(ck), cast(cv), jnp.asarray(lens)


def _masked(lens, N):
    """verify [a, d_1..d_N] where every third token sees only the first half of its row's cache (ctx < cache_len:
    the ``slot <= ctx`` rule, which the decode layouts never make bite) and every fourth token is padding."""
    lay = layouts.verify(lens, N)
    t = jnp.arange(N + 1)[None, :]
    return lay.replace(ctx=jnp.where(t % 3 == 1, lens[:, None] // 2 - 1, lay.ctx),
                       seg=jnp.where(t % 4 == 3, -1, lay.seg))


def _layout(name, lens, N):
    return {"ar": lambda: layouts.causal(lens.shape[0], 1, start=lens),
            "masked": lambda: _masked(lens, N),
            "verify": lambda: layouts.verify(lens, N),
            "draft_anchored": lambda: layouts.draft_anchored(lens, N),
            "single_sparse": lambda: layouts.single_forward(lens, N, (0, 4, 7, 11)),
            "single_dense": lambda: layouts.single_forward(lens, N, tuple(range(N + 1))),
            "tidar": lambda: layouts.tidar_published(lens, N)}[name]()


@functools.partial(jax.jit, static_argnames=("name", "N", "impls"))
def _attend(q, k, v, ck, cv, lens, name, N, impls=("pallas", "reference")):
    """The layout ``name`` for these cache lengths, then attend with each impl (one compile for all)."""
    lay = _layout(name, lens, N)
    assert lay.shape == q.shape[:2]
    return [attention.attend(q, k, v, lay, ck, cv, lens, impl=i) for i in impls]


def _compare(B, T, S, H, K, d, name, N, dtype=jnp.float32, atol=None):
    atol = atol or (2e-5 if platform.interpret() else 1e-4)  # compiled on a GPU (launch/gpu_check.sh): other sums
    q, k, v, ck, cv, lens = _inputs(B, T, S, H, K, d, dtype)
    got, want = _attend(q, k, v, ck, cv, lens, name, N)
    assert got.shape == want.shape == (B, T, H, d) and got.dtype == want.dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=atol, rtol=atol)
    return got


@pytest.mark.parametrize("name,N,T", [("ar", 0, 1), ("draft_anchored", 4, 5),
                                      ("verify", 16, 17),  # two_forward at N = 16
                                      ("single_sparse", 16, 85), ("single_dense", 16, 306), ("tidar", 16, 272)])
def test_decode_layouts_match_reference(name, N, T):
    """Every decode layout at its real width for N = 16 (tiny heads): 5 rows, cache lengths 0, full and ragged."""
    _compare(5, T, 24 if T > 100 else 40, 4, 2, 8, name, N)


@pytest.mark.parametrize("H,K,d,B", [(1, 1, 64, 1), (3, 1, 80, 5), (4, 1, 128, 5), (16, 2, 96, 1)])
def test_gqa_ratios_and_head_dims(H, K, d, B):
    """G = H/K in 1, 3, 4, 8; head dims 64, 128 and non-powers of two (80, 96: masked loads pad to 128); a verify
    block of 5 with per-token ctx below the cache length and padding tokens (the layout tests cover the widths)."""
    _compare(B, 5, 37, H, K, d, "masked", 4)


def test_bf16_matches_reference_in_bf16_and_fp32():
    """bf16 (ZAYA1 geometry G=4, d=128): close to the bf16 XLA path (same operand roundings, other summation order)
    and, loosely, to the fp32 math."""
    B, T, S, H, K, d = 5, 17, 48, 8, 2, 128
    got = _compare(B, T, S, H, K, d, "verify", 16, jnp.bfloat16, atol=2e-2)
    q, k, v, ck, cv, lens = (x.astype(jnp.float32) for x in _inputs(B, T, S, H, K, d, jnp.bfloat16))
    [want] = _attend(q, k, v, ck, cv, lens.astype(jnp.int32), "verify", 16, impls=("reference",))
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=5e-2)


@functools.partial(jax.jit, static_argnames=("splits",))
def _cache_states(q, k, v, ck, cv, lens, splits):
    """``attention._partial`` over the cache (XLA) and the kernel's state for each split count."""
    K, S = k.shape[2], ck.shape[1]
    lay = layouts.verify(lens, q.shape[1] - 1)
    qs = attention._queries(q, K)
    [(_, _, mask), _] = attention._sources(k, v, lay, ck, cv, lens)
    want = attention._partial(qs, ck, cv, mask(0, S))
    return want, [kernel.cache_attention(qs, ck, cv, lens, lay.ctx, lay.seg, block_k=16, splits=n) for n in splits]


def test_split_combine_is_exact_for_any_split_count():
    """The same (m, l, acc) as ``attention._partial`` over the cache, for 1, 3 and 7 splits (more splits than key
    tiles for short rows: empty splits merge as nothing) and 16-key tiles (S = 53: a masked tail)."""
    want, got = _cache_states(*_inputs(5, 3, 53, 4, 2, 8), splits=(1, 3, 7))
    tol = 1e-6 if platform.interpret() else 1e-5
    for states in got:
        for g, w in zip(states, want):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=tol, rtol=tol)
    m, l, acc = got[-1]
    assert float(l[0].max()) == 0.0 and float(m[0].max()) == np.float32(attention._NEG)  # cache_len 0: empty


def _trace(B, T, S, H, K, d, cache=True, **blocks):
    """Trace (never compile or run) the pallas impl, or with ``blocks`` the kernel itself, on abstract inputs."""
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)

    def fn(q, k, v, ck, cv, lens):
        lay = layouts.causal(B, T, start=lens)
        if blocks:
            return kernel.cache_attention(attention._queries(q, K), ck, cv, lens, lay.ctx, lay.seg, **blocks)
        if not cache:
            return attention.attend(q, k, v, lay, impl="pallas")
        return attention.attend(q, k, v, lay, ck, cv, lens, impl="pallas")
    return jax.eval_shape(fn, f32(B, T, H, d), f32(B, T, K, d), f32(B, T, K, d), f32(B, S, K, d), f32(B, S, K, d),
                          jax.ShapeDtypeStruct((B,), jnp.int32))


def test_limits_raise_naming_them():
    assert _trace(1, 2, 16, 2, 1, 256).shape == (1, 2, 2, 256)  # at the limits: fine
    assert _trace(1, kernel.MAX_ROWS // 2, 16, 2, 1, 8).shape == (1, kernel.MAX_ROWS // 2, 2, 8)
    with pytest.raises(ValueError, match="MAX_HEAD_DIM=256"):
        _trace(1, 2, 16, 2, 1, 264)
    with pytest.raises(ValueError, match="MAX_ROWS=4096"):
        _trace(1, kernel.MAX_ROWS // 2 + 1, 16, 2, 1, 8)
    with pytest.raises(ValueError, match="block_k=24 is not a power of two"):
        _trace(1, 2, 16, 2, 1, 8, block_k=24)
    with pytest.raises(ValueError, match="block_q=8 is not a power of two >= 16"):
        _trace(1, 2, 16, 2, 1, 8, block_q=8)
    with pytest.raises(ValueError, match="decode/verify kernel over a KV cache"):
        _trace(1, 2, 16, 2, 1, 8, cache=False)


def _eqns(jaxpr):
    """All equations, nested jaxprs included, except the kernel bodies (inside pallas_call)."""
    for e in jaxpr.eqns:
        yield e
        if e.primitive.name == "pallas_call":
            continue
        for p in e.params.values():
            for sub in (p if isinstance(p, (list, tuple)) else [p]):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _eqns(inner)


def test_cache_feeds_only_the_kernel():
    """No transpose, pad or copy of the cache: every cache-shaped array of the traced pallas impl enters pallas_call
    directly (the kernel indexes row b and kv head k in its BlockSpec)."""
    B, T, S, H, K, d = 2, 5, 37, 4, 2, 16

    def fn(q, k, v, ck, cv, lens):
        return attention.attend(q, k, v, layouts.verify(lens, T - 1), ck, cv, lens, impl="pallas")
    jaxpr = jax.make_jaxpr(fn)(*_inputs(B, T, S, H, K, d)).jaxpr
    cache_shape = (B, S, K, d)
    users = [e.primitive.name for e in _eqns(jaxpr) if any(getattr(x.aval, "shape", None) == cache_shape
                                                           for x in e.invars if hasattr(x, "aval"))]
    assert "pallas_call" in users
    assert set(users) <= {"pallas_call", "pjit", "jit"}, users


@pytest.mark.parametrize("target,B,T,S,d,dtype", [("cuda", 2, 17, 4096, 128, jnp.bfloat16),
                                                   ("rocm", 1, 272, 1000, 96, jnp.float32)])
def test_lowers_to_triton(monkeypatch, target, B, T, S, d, dtype):
    """Without a GPU: the pallas impl lowers through jax's Triton backend for CUDA and ROCm (power-of-two tensors,
    dot tiles, supported primitives, explicit compiler params) at ZAYA1 geometry (H=8, K=2), bf16 d=128 and fp32 with
    a padded head dim. Compiling the Triton IR needs the device (launch/gpu_check.sh runs this file there). The
    shapes are used by no other test: split_states' trace, cached per shape, is made with the GPU backend here."""
    monkeypatch.setattr(platform, "backend", lambda: target)
    H, K = 8, 2
    sd = lambda *shape: jax.ShapeDtypeStruct(shape, dtype)

    def fn(q, k, v, ck, cv, lens):
        return attention.attend(q, k, v, layouts.verify(lens, T - 1), ck, cv, lens, impl="pallas")
    args = (sd(B, T, H, d), sd(B, T, K, d), sd(B, T, K, d), sd(B, S, K, d), sd(B, S, K, d),
            jax.ShapeDtypeStruct((B,), jnp.int32))
    # jax >= 0.12 asks the target device for its GPU info while lowering: an abstract device stands in for it
    dev = jax.sharding.AbstractDevice(device_kind={"cuda": "NVIDIA H200", "rocm": "gfx942"}[target],
                                      num_cores=132 if target == "cuda" else 304, platform=target)
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=dev)):
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=(target,)).as_text()
    assert text.count("xla.gpu.triton") == 1
    assert f"num_stages = {1 if target == 'rocm' else 3}" in text


def test_auto_picks_pallas_on_gpu_for_decode_only(monkeypatch):
    """auto: pallas on cuda/rocm when a cache is present and the shape fits the kernel; CPU unchanged."""
    monkeypatch.setattr(platform, "backend", lambda: "cpu")
    assert attention.auto_choice(17, 4096 + 17, cached=True, G=4, d=128) == "reference"  # CPU: never pallas
    for backend in ("cuda", "rocm"):
        monkeypatch.setattr(platform, "backend", lambda backend=backend: backend)
        assert attention.auto_choice(17, 4096 + 17, cached=True, G=4, d=128) == "pallas"
        assert attention.auto_choice(272, 131072 + 272, cached=True, G=4, d=128) == "pallas"
        assert attention.auto_choice(17, 4096 + 17, cached=False, G=4, d=128) == "reference"  # no cache
        assert attention.auto_choice(2048, 2048 + 4096, cached=True, G=4, d=128) == "chunked"  # long prefill
        assert attention.auto_choice(17, 4096 + 17, cached=True, G=4, d=512) == "reference"  # head dim too big


def test_generate_with_pallas_equals_xla_greedy():
    """A tiny random model: AR and two_forward greedy tokens with the pallas impl equal AR with the XLA reference
    impl (what the default ``auto`` runs on CPU; on a GPU auto itself picks pallas, hence the explicit name)."""
    from conftest import randomize
    from zaya.api import Model
    from zaya.model.params import init
    from zaya.model.transformer import Impl

    c = zaya.preset("tiny")
    params = randomize(init(c, jax.random.PRNGKey(0), std=0.3), jax.random.PRNGKey(1))
    rows = [[2, 17, 301, 45], [2, 9, 511, 128, 3, 77, 260]]
    want = zaya.generate(Model(c, params, impl=Impl(attention="reference")), rows, max_new_tokens=4, pad_to=8).tokens
    model = Model(c, params, impl=Impl(attention="pallas"))
    assert zaya.generate(model, rows, max_new_tokens=4, pad_to=8).tokens == want
    assert zaya.generate(model, rows, sampler="two_forward", block_size=3, max_new_tokens=4, pad_to=8).tokens == want


def test_bench_smoke(tmp_path):
    from zaya.bench import attention as bench
    rows = bench.run(str(tmp_path), quick=True, widths=(17,), batches=(2,))
    assert rows and all(r["ms_kernel"] > 0 and r["ms_xla"] > 0 and r["gb_s"] > 0 for r in rows)
    assert all(r["max_err"] < 5e-2 for r in rows)  # bf16 outputs: the kernel agrees with the XLA path
    md = (tmp_path / "attention.md").read_text()
    assert "| T |" in md and ("interpret mode" in md) == platform.interpret()

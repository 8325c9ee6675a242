"""Block samplers: exactness against AR, the cache keeps exactly the accepted tokens, edge cases, statistics."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as sps

import zaya
from conftest import randomize
from zaya.api import Model
from zaya.decode import single_forward, tidar, two_forward
from zaya.decode.generate import generate
from zaya.decode.state import prefill
from zaya.model import layout as layout_lib
from zaya.model.cache import init_cache
from zaya.model.params import init
from zaya.model.transformer import Impl, apply

ROWS = [[2, 17, 301, 45], [2, 9, 511, 128, 3, 77, 260], [2, 5]]


@pytest.fixture(scope="module")
def model():
    c = zaya.preset("tiny")
    return Model(c, randomize(init(c, jax.random.PRNGKey(0), std=0.3), jax.random.PRNGKey(1)))


@pytest.fixture(scope="module")
def ar_ref(model):
    return generate(model, ROWS, max_new_tokens=24).tokens


@pytest.mark.parametrize("sampler,K,levels", [
    ("two_forward", 1, None), ("two_forward", 2, None), ("two_forward", 5, None), ("two_forward", 16, None),
    ("single_forward", 1, None), ("single_forward", 3, None), ("single_forward", 16, None),
    ("single_forward", 16, (0, 4, 7, 11)), ("single_forward", 6, (0, 2)),
])
def test_greedy_is_exactly_ar(model, ar_ref, sampler, K, levels):
    res = generate(model, ROWS, sampler=sampler, block_size=K, levels=levels, max_new_tokens=24)
    assert res.tokens == ar_ref
    assert res.stats["forwards"] >= 1 and 0 < res.stats["useful_slot_fraction"] <= 1


def test_mask_anchor_and_block_causal_are_exact_too(model, ar_ref):
    for kw in (dict(anchor="mask"), dict(block_causal=True)):
        assert generate(model, ROWS, sampler="two_forward", block_size=4, max_new_tokens=24, **kw).tokens == ar_ref


def _drive(model, sampler, rows, steps, **opts):
    """Run prefill/init/steps by hand (each jitted: eager dispatch compiles every op shape, minutes on 2 cores);
    return the final state."""
    c, p, impl = model.config, model.params, Impl()
    B, Tp = len(rows), max(map(len, rows))
    prompt = np.zeros((B, Tp), np.int32)
    for b, r in enumerate(rows):
        prompt[b, :len(r)] = r
    o = dict(temperature=0.0, top_k=None, top_p=None, eos_id=None, max_new=64, stop=None, **opts)
    st = jax.jit(lambda p, prompt, lengths, cache, key: prefill(p, c, impl, prompt, lengths, cache, 64, key))(
        p, jnp.asarray(prompt), jnp.array([len(r) for r in rows]), init_cache(c, B, 160), jax.random.PRNGKey(0))
    st = jax.jit(lambda p, st: sampler.init(p, c, impl, o, st))(p, st)
    step = jax.jit(lambda p, st: sampler.step(p, c, impl, o, st)[0])
    for _ in range(steps):
        st = step(p, st)
    return st


def test_drafts_in_prefill_equal_a_separate_drafting_forward(model):
    """[prompt | mask x (K+1)] in one forward (right-padded rows of different lengths) gives the same first token,
    drafts and cache as prefill + a drafting forward [mask x (K+1)] after the cached prompt."""
    from zaya.decode import block
    c, p, impl = model.config, model.params, Impl()
    B, Tp = len(ROWS), 16
    prompt = np.zeros((B, Tp), np.int32)
    for b, r in enumerate(ROWS):
        prompt[b, :len(r)] = r
    lengths = jnp.array([len(r) for r in ROWS])
    o = dict(temperature=0.0, top_k=None, top_p=None, eos_id=None, max_new=64, stop=None, block_size=5,
             anchor="mask", acceptance="greedy")
    args = (jnp.asarray(prompt), lengths, init_cache(c, B, 96), 64, jax.random.PRNGKey(0))
    fused = block.prefill_and_start(p, c, impl, o, *args)
    sep = block.start(p, c, impl, block.options(o), prefill(p, c, impl, *args))
    np.testing.assert_array_equal(np.asarray(fused.pending), np.asarray(sep.pending))
    np.testing.assert_array_equal(np.asarray(fused.drafts), np.asarray(sep.drafts))
    np.testing.assert_array_equal(np.asarray(fused.cache.length), np.asarray(lengths))
    np.testing.assert_allclose(np.asarray(fused.cache.k), np.asarray(sep.cache.k), atol=2e-5)
    assert int(fused.forwards) == 0 and int(sep.forwards) == 1  # the drafting forward is saved


@pytest.mark.parametrize("sampler,pending", [(two_forward, True), (single_forward, True), (tidar, False)])
def test_cache_equals_fresh_prefill_of_committed_tokens(model, sampler, pending):
    st = _drive(model, sampler, ROWS, 5, block_size=3, acceptance="greedy")
    c = model.config
    for b, r in enumerate(ROWS):
        n = int(st.n[b]) - (1 if pending else 0)  # the pending token is in `out` but not yet in the cache
        seq = jnp.asarray([r + np.asarray(st.out[b, :n]).tolist()])
        L = seq.shape[1]
        assert int(st.cache.length[b]) == L
        fresh = init_cache(c, 1, 160)
        _, chunk, _ = jax.jit(lambda p, s, f: apply(p, c, s, layout_lib.causal(1, s.shape[1]), f))(model.params, seq,
                                                                                                   fresh)
        for name in ("k", "v", "xqk", "vd"):
            got = np.asarray(getattr(st.cache, name)[:, b, :L])
            np.testing.assert_allclose(got, np.asarray(getattr(chunk, name)[:, 0]), atol=5e-5)


def test_eos_inside_a_block_drops_what_follows(model, ar_ref):
    eos = ar_ref[1][5]
    for s in ("two_forward", "single_forward"):
        res = generate(model, ROWS, sampler=s, block_size=8, max_new_tokens=24, eos_id=eos)
        for got, want in zip(res.tokens, ar_ref):
            cut = want.index(eos) + 1 if eos in want else len(want)
            assert got == want[:cut]


def test_max_new_tokens_inside_a_block_and_stop_sequences(model, ar_ref):
    res = generate(model, ROWS, sampler="single_forward", block_size=16, max_new_tokens=5)
    assert res.tokens == [r[:5] for r in ar_ref]
    stop = [ar_ref[0][3:5]]
    res = generate(model, ROWS[:1], sampler="two_forward", block_size=8, max_new_tokens=24, stop=stop)
    assert res.tokens[0] == ar_ref[0][:5]


def test_block_size_one_degenerates_to_ar(model, ar_ref):
    res = generate(model, ROWS, sampler="two_forward", block_size=1, max_new_tokens=24)
    assert res.tokens == ar_ref and res.stats["tokens_per_step"] <= 2.0


@pytest.mark.parametrize("sampler,kw", [
    ("ar", {}), ("two_forward", dict(block_size=5)), ("single_forward", dict(block_size=6, levels=(0, 2))),
    ("tidar", dict(block_size=3)),
])
def test_device_loop_equals_host_loop(model, ar_ref, sampler, kw):
    """One lax.while_loop executable runs the same steps: tokens, per-step trace and statistics agree exactly
    (for the lossless samplers row 0 stops on EOS, the others on the budget; TiDAR's tokens differ from AR's)."""
    eos = ar_ref[0][3]
    a = generate(model, ROWS, sampler=sampler, max_new_tokens=9, trace=True, eos_id=eos, **kw)
    b = generate(model, ROWS, sampler=sampler, max_new_tokens=9, trace=True, eos_id=eos, loop="device", **kw)
    assert b.tokens == a.tokens and b.trace == a.trace
    if sampler != "tidar":
        assert len(a.tokens[0]) < 9 and any(len(t) == 9 for t in a.tokens[1:])
    timing = ("seconds", "tokens_per_s", "prefill_seconds")
    assert {k: v for k, v in b.stats.items() if k not in timing} == \
        {k: v for k, v in a.stats.items() if k not in timing}
    with pytest.raises(ValueError, match="loop="):
        generate(model, ROWS, sampler=sampler, max_new_tokens=2, loop="gpu", **kw)


def test_device_loop_runs_one_step_when_the_prefill_already_finished(model):
    """Like the host loop (a do-while): the mask-anchored samplers commit their first token in the prefill, so with
    max_new_tokens=1 every row is done before the first step, which still runs once."""
    for loop in ("host", "device"):
        r = generate(model, ROWS, sampler="single_forward", block_size=4, max_new_tokens=1, loop=loop)
        assert r.stats["steps"] == 1 and all(len(t) == 1 for t in r.tokens)


def test_levels_must_include_zero(model):
    with pytest.raises(ValueError, match="include 0"):
        generate(model, ROWS, sampler="single_forward", block_size=8, levels=(4, 7), max_new_tokens=4)


def test_tidar_published_layout_runs_and_keeps_first_draft(model):
    res = generate(model, ROWS, sampler="tidar", block_size=4, max_new_tokens=12)
    assert all(len(t) == 12 for t in res.tokens)
    assert res.stats["tokens_per_step"] >= 1.0  # D_0 always kept


# --------------------------------------------------------------------------------------------------------------
# Rejection sampling reproduces AR's sampling distribution (chi-square goodness of fit against the exact joint of
# the first two tokens, computed by enumeration); lossy criteria are detected as different.

ALPHA = 1e-3  # significance level of each goodness-of-fit test


@pytest.fixture(scope="module")
def small_vocab():
    c = zaya.preset("tiny", vocab_size=12, mask_token_id=4)
    p = randomize(init(c, jax.random.PRNGKey(5), std=0.6), jax.random.PRNGKey(6), scale=0.5)
    m = Model(c, p)
    prompt = [2, 7, 3]
    first = jax.nn.softmax(m.logits([prompt])[0, -1])
    seconds = jax.nn.softmax(m.logits([prompt + [t] for t in range(12)])[:, -1], -1)
    joint = np.asarray(first)[:, None] * np.asarray(seconds)  # exact P(x1, x2)
    return m, prompt, joint


def _pvalue(m, prompt, joint, **kw):
    N = 6000
    res = generate(m, [prompt] * N, max_new_tokens=2, temperature=1.0, seed=11, **kw)
    pairs = np.array([t[:2] for t in res.tokens])
    counts = np.zeros_like(joint)
    np.add.at(counts, (pairs[:, 0], pairs[:, 1]), 1)
    exp = joint.ravel() * N
    big = exp >= 5  # pool rare cells so the chi-square approximation holds
    obs = np.append(counts.ravel()[big], counts.ravel()[~big].sum())
    exp = np.append(exp[big], exp[~big].sum())
    return sps.chisquare(obs, exp).pvalue


@pytest.mark.parametrize("kw", [
    dict(sampler="ar"),
    dict(sampler="two_forward", block_size=2, acceptance="rejection"),
    dict(sampler="two_forward", block_size=2, acceptance="rejection", draft_temperature=1.0),
    dict(sampler="single_forward", block_size=2, acceptance="rejection", draft_temperature=0.7),
    dict(sampler="two_forward", block_size=2, acceptance="strict"),
])
def test_lossless_samplers_match_ar_distribution(small_vocab, kw):
    assert _pvalue(*small_vocab, **kw) > ALPHA


@pytest.mark.parametrize("kw", [
    dict(sampler="two_forward", block_size=2, acceptance="typical", epsilon=0.5, delta=0.9),
    dict(sampler="two_forward", block_size=2, acceptance="rejection", mix_weight=0.2, draft_temperature=1.0),
    dict(sampler="tidar", block_size=2, acceptance="tidar_ratio"),
])
def test_lossy_criteria_differ(small_vocab, kw):
    assert _pvalue(*small_vocab, **kw) < ALPHA


def test_summary_counts_only_committed_tokens():
    """Stats follow what was appended: drafts 'accepted' after an EOS cut don't count; an accepted EOS does."""
    from zaya.decode import block
    o = dict(block_size=4, _query_tokens=10)
    cut = [{"accepted": np.array([4]), "kept": np.array([2]), "active": np.array([True])}]  # d1, d2 = EOS kept
    s = block.summarize(cut, o)
    assert s["tokens_per_step"] == 2 and s["counts"]["reached"][:3] == [1, 1, 0]
    assert s["acceptance_per_position"][:2] == [1.0, 1.0]
    plain = [{"accepted": np.array([1]), "kept": np.array([2]), "active": np.array([True])}]  # d1, then bonus
    s = block.summarize(plain, o)
    assert s["tokens_per_step"] == 2 and s["counts"]["reached"][:3] == [1, 1, 0]
    assert s["acceptance_per_position"][:2] == [1.0, 0.0]
    s = block.summarize([dict(plain[0], kept=np.array([1]))], dict(o, _kept_first=1))  # TiDAR: D_0 first
    assert s["counts"]["accepted"][0] == 0 and s["tokens_per_step"] == 1

"""Block samplers: exactness against AR, the cache keeps exactly the accepted tokens, edge cases, statistics."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as sps

import zaya
from conftest import randomize
from zaya import layouts
from zaya.api import Model
from zaya.decode import acceptance, samplers
from zaya.decode.generate import generate
from zaya.decode.options import DecodeOptions
from zaya.decode.state import prefill
from zaya.model.cache import init_cache
from zaya.model.params import init
from zaya.model.transformer import Impl, apply

ROWS = [[2, 17, 301, 45], [2, 9, 511, 128, 3, 77, 260], [2, 5]]
two_forward, single_forward, tidar = (samplers.get(n) for n in ("two_forward", "single_forward", "tidar"))


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
    assert 0 < res.stats["useful_slot_fraction"] <= 1
    # TF (token anchor): the first drafting forward after the prefill, then verify + draft per step but no drafting
    # forward after the last step; SF: one forward per step
    assert res.stats["forwards"] == (2 * res.stats["steps"] if sampler == "two_forward" else res.stats["steps"])


def test_mask_anchor_and_block_causal_are_exact_too(model, ar_ref):
    for kw in (dict(anchor="mask"), dict(block_causal=True)):
        res = generate(model, ROWS, sampler="two_forward", block_size=4, max_new_tokens=24, **kw)
        assert res.tokens == ar_ref
        if kw.get("anchor") == "mask":  # the first drafts ride on the prefill: one forward fewer than the token anchor
            assert res.stats["forwards"] == 2 * res.stats["steps"] - 1


_PREFILL = {}


def _prefilled(model, rows, max_new=64):
    """The prefill state of right-padded rows (one jitted executable per budget, shared by the tests)."""
    c = model.config
    B, Tp = len(rows), max(map(len, rows))
    prompt = np.zeros((B, Tp), np.int32)
    for b, r in enumerate(rows):
        prompt[b, :len(r)] = r
    if (id(model), max_new) not in _PREFILL:
        _PREFILL[id(model), max_new] = jax.jit(lambda p, prompt, lengths, cache, key: prefill(
            p, c, Impl(), prompt, lengths, cache, max_new, key))
    return _PREFILL[id(model), max_new](model.params, jnp.asarray(prompt), jnp.array([len(r) for r in rows]),
                                        init_cache(c, B, 160), jax.random.PRNGKey(0))


def _drive(model, sampler, rows, steps, force=None, wrong=True, max_new=64, **opts):
    """Run prefill/init/steps by hand (each jitted: eager dispatch compiles every op shape, minutes on 2 cores);
    return the final state and the per-step infos. ``force`` [B, R]: before each step the drafts are replaced by
    ``_forced_drafts`` of it (a random-weight model accepts no drafts of its own); ``max_new`` is the budget."""
    c, p, impl = model.config, model.params, Impl()
    o = sampler.options(max_new_tokens=max_new, **opts)
    st = _prefilled(model, rows, max_new)
    st = jax.jit(lambda p, st: sampler.init(p, c, impl, o, st))(p, st)
    step = jax.jit(lambda p, st: sampler.step(p, c, impl, o, st))
    infos = []
    for s in range(steps):
        if force is not None:
            d = _forced_drafts(force, np.asarray(st.n), st.drafts.shape[1], s, wrong, sampler is tidar)
            st = st.replace(drafts=jnp.asarray(d))
        st, info = step(p, st)
        infos.append(jax.device_get(info))
    return st, infos


def _forced_drafts(ref_BR, n_B, K, s, wrong=True, tidar_layout=False):
    """The AR greedy continuation: the K tokens from out[n] on (TF/SF: after the pending token out[n-1]; TiDAR: D
    itself). With ``wrong``, one wrong draft at position (b + 2s) mod (K+1), none when that is K (or 0 in TiDAR's
    layout, whose D_0 is kept unverified): rows accept different numbers of drafts, most of them > 0."""
    d = np.stack([ref_BR[b, n:n + K] for b, n in enumerate(n_B)])
    for b in range(len(n_B) if wrong else 0):
        w = (b + 2 * s) % (K + 1)
        if w < K and not (tidar_layout and w == 0):
            d[b, w] = 501 if d[b, w] != 501 else 502  # not the AR token
    return d


def _ar_table(ar_ref, R=96):
    """ar_ref rows padded to R (past the reference, drafts are just guesses that greedy verification rejects)."""
    return np.array([r + [0] * (R - len(r)) for r in ar_ref], np.int32)


_FRESH = {}


def _assert_cache_is_fresh_prefill(model, st, rows, pending):
    """Each row's cache (length, K/V, CCA conv state, delayed value) equals a fresh prefill of prompt + committed
    tokens (one padded shape: the causal prefix does not see the padding)."""
    c = model.config
    if id(model) not in _FRESH:
        _FRESH[id(model)] = jax.jit(lambda p, s: apply(p, c, s, layouts.causal(1, s.shape[1]),
                                                       init_cache(c, 1, 128))[1])
    for b, r in enumerate(rows):
        n = int(st.n[b]) - (1 if pending else 0)  # the pending token is in `out` but not yet in the cache
        seq = r + np.asarray(st.out[b, :n]).tolist()
        L = len(seq)
        assert int(st.cache.length[b]) == L, (b, int(st.cache.length[b]), L)
        chunk = _FRESH[id(model)](model.params, jnp.asarray([seq + [0] * (128 - L)]))
        for name in ("k", "v", "xqk", "vd"):
            got = np.asarray(getattr(st.cache, name)[:, b, :L])
            np.testing.assert_allclose(got, np.asarray(getattr(chunk, name)[:, 0, :L]), atol=5e-5)


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
    o = DecodeOptions(max_new_tokens=64, block_size=5, anchor="mask")
    args = (jnp.asarray(prompt), lengths, init_cache(c, B, 96), 64, jax.random.PRNGKey(0))
    fused = block.prefill_and_start(p, c, impl, o, *args[:3], args[4])
    sep = block.start(p, c, impl, o, prefill(p, c, impl, *args))
    np.testing.assert_array_equal(np.asarray(fused.pending), np.asarray(sep.pending))
    np.testing.assert_array_equal(np.asarray(fused.drafts), np.asarray(sep.drafts))
    np.testing.assert_array_equal(np.asarray(fused.cache.length), np.asarray(lengths))
    np.testing.assert_allclose(np.asarray(fused.cache.k), np.asarray(sep.cache.k), atol=2e-5)
    assert int(fused.forwards) == 0 and int(sep.forwards) == 1  # the drafting forward is saved


@pytest.mark.parametrize("sampler,K,levels", [(two_forward, 4, None), (single_forward, 4, None),
                                             (single_forward, 6, (0, 2, 5)), (tidar, 4, None)])
def test_cache_equals_fresh_prefill_after_multi_token_steps(model, ar_ref, sampler, K, levels):
    """Forced drafts (AR continuation, one wrong per row and step) make rows accept 0..K drafts per step; greedy
    verification keeps the tokens AR's (TiDAR's too: its unverified D_0 is always right here)."""
    st, infos = _drive(model, sampler, ROWS, 4, force=_ar_table(ar_ref), block_size=K, levels=levels,
                       acceptance="greedy")
    acc = np.stack([f["accepted"] for f in infos])
    assert (acc >= 2).sum() >= 4 and len(set(acc.ravel().tolist())) >= 3, acc  # multi-token steps, varied per row
    for b in range(len(ROWS)):
        n = min(int(st.n[b]), 24)
        assert np.asarray(st.out[b, :n]).tolist() == ar_ref[b][:n]
    _assert_cache_is_fresh_prefill(model, st, ROWS, pending=sampler is not tidar)


def _cut(row, eos, stop, budget):
    """A reference row cut at the budget, after the first EOS, or after the first completed stop sequence."""
    for i in range(min(budget, len(row))):
        if row[i] == eos or row[max(i - len(stop) + 1, 0):i + 1] == list(stop):
            return row[:i + 1]
    return row[:budget]


@pytest.mark.parametrize("sampler,K", [(two_forward, 4), (single_forward, 4), (tidar, 6)])
def test_rows_cut_inside_a_block_keep_only_their_committed_tokens(model, ar_ref, sampler, K):
    """All drafts accepted: step 0 would append out[1..5] (TF/SF, after the pending out[0]) or out[0..5] (TiDAR). Row
    0 is cut by an EOS at out[1], row 1 by a stop sequence ending at out[3], row 2 by the budget (5): out stops at
    the cut and the cache holds no token past it (it used to keep every accepted one)."""
    pending = sampler is not tidar
    eos, stop = ar_ref[0][1], (ar_ref[1][2], ar_ref[1][3])
    want = [_cut(r, eos, stop, 5) for r in ar_ref]
    assert [len(w) for w in want] == [2, 4, 5]  # each row is cut where (and how) it should be
    st, infos = _drive(model, sampler, ROWS, 2, force=_ar_table(ar_ref), wrong=False, max_new=5, block_size=K,
                       acceptance="greedy", eos_id=eos, stop=(stop,))
    f = infos[0]
    assert f["accepted"].tolist() == [K - (not pending)] * 3  # every draft accepted, yet fewer tokens kept:
    assert f["kept"].tolist() == [len(w) - pending for w in want]  # 1, 3, 4 (TiDAR 2, 4, 5) of 5 (TiDAR 6)
    assert st.done.all() and [np.asarray(st.out[b, :int(st.n[b])]).tolist() for b in range(3)] == want
    _assert_cache_is_fresh_prefill(model, st, ROWS, pending)


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


def test_single_forward_and_tidar_proposals_equal_separate_drafting_forwards(model):
    """In the one combined forward, proposal j (level l_j) gives the logits of a drafting forward [mask x (K+1)]
    after committing verify[:l_j + 1]; TiDAR's set k those of [mask x b] after committing D[:k]; the verify / D part
    gives the plain causal logits. Random verify tokens (any drafts), rows of different cache lengths."""
    from zaya.model.cache import commit
    c, impl, K = model.config, Impl(), 4
    st = _prefilled(model, ROWS)
    v = jax.random.randint(jax.random.PRNGKey(3), (len(ROWS), K + 1), 5, c.vocab_size)
    mask = lambda n: jnp.full((len(ROWS), n), c.mask_token_id, jnp.int32)

    @jax.jit
    def run(p, cache):
        L, W = cache.length, K + 1
        z_v, chunk, _ = apply(p, c, v, layouts.verify(L, K), cache, impl)

        def drafting(n, width, layout):  # commit v[:n], then a block of ``width`` masks after it
            after = commit(cache, chunk, n)
            return apply(p, c, mask(width), layout(after.length), after, impl)[0]
        z_sf = apply(p, c, jnp.concatenate([v, mask(W * W)], 1), layouts.single_forward(L, K, tuple(range(W))), cache,
                     impl)[0]
        sf = [drafting(lvl + 1, W, lambda L: layouts.draft_anchored(L, K)) for lvl in range(W)]
        z_td = apply(p, c, jnp.concatenate([v[:, :K], mask(K * K)], 1), layouts.tidar_published(L, K), cache, impl)[0]
        td = [drafting(k, K, lambda L: layouts.draft_block(L, K)) for k in range(1, K + 1)]
        return z_v, z_sf, sf, z_td, td

    z_v, z_sf, sf, z_td, td = run(model.params, st.cache)
    W = K + 1
    close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    close(z_sf[:, :W], z_v)
    for j in range(W):
        close(z_sf[:, W * (j + 1):W * (j + 2)], sf[j])
    close(z_td[:, :K], z_v[:, :K])
    for k in range(1, K + 1):
        close(z_td[:, K * k:K * (k + 1)], td[k - 1])


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


@pytest.mark.numerics
@pytest.mark.parametrize("kw", [
    dict(sampler="ar"),
    dict(sampler="two_forward", block_size=2, acceptance="rejection"),
    dict(sampler="two_forward", block_size=2, acceptance="rejection", draft_temperature=1.0),
    dict(sampler="single_forward", block_size=2, acceptance="rejection", draft_temperature=0.7),
    dict(sampler="two_forward", block_size=2, acceptance="strict"),
])
def test_lossless_samplers_match_ar_distribution(small_vocab, kw):
    assert _pvalue(*small_vocab, **kw) > ALPHA


@pytest.mark.numerics
@pytest.mark.parametrize("kw", [
    dict(sampler="two_forward", block_size=2, acceptance="typical", epsilon=0.5, delta=0.9),
    dict(sampler="two_forward", block_size=2, acceptance="rejection", mix_weight=0.2, draft_temperature=1.0),
    # hot drafts: this random model's drafter is peaked where AR puts little mass, so its argmax (or T=1) drafts
    # are rarely accepted by these rules and the bias is too small to see
    dict(sampler="two_forward", block_size=2, acceptance="topk", draft_temperature=5.0),
    # on the lossless layout: TiDAR's own layout differs from AR even with greedy acceptance (no bonus token)
    dict(sampler="two_forward", block_size=2, acceptance="tidar_ratio", draft_temperature=5.0),
])
def test_lossy_criteria_differ(small_vocab, kw):
    assert _pvalue(*small_vocab, **kw) < ALPHA


def test_summary_counts_only_committed_tokens():
    """Stats follow what was appended: drafts 'accepted' after an EOS cut don't count; an accepted EOS does."""
    from zaya.decode import block
    o = dict(N=4, query_tokens=10)
    cut = [{"accepted": np.array([4]), "kept": np.array([2]), "active": np.array([True])}]  # d1, d2 = EOS kept
    s = block.summarize(cut, **o)
    assert s["tokens_per_step"] == 2 and s["counts"]["reached"][:3] == [1, 1, 0]
    assert s["acceptance_per_position"][:2] == [1.0, 1.0]
    plain = [{"accepted": np.array([1]), "kept": np.array([2]), "active": np.array([True])}]  # d1, then bonus
    s = block.summarize(plain, **o)
    assert s["tokens_per_step"] == 2 and s["counts"]["reached"][:3] == [1, 1, 0]
    assert s["acceptance_per_position"][:2] == [1.0, 0.0]
    s = block.summarize([dict(plain[0], kept=np.array([1]))], **o, kept_first=1)  # TiDAR: D_0 first
    assert s["counts"]["accepted"][0] == 0 and s["tokens_per_step"] == 1


# --------------------------------------------------------------------------------------------------------------
# Plug-ins: a rule or a sampler registered from a notebook cell, and the same cell run again with a change.

def test_reregistered_rule_takes_effect(model, ar_ref):
    """Rule 'x' accepts every draft, then (the cell re-run) none: the second generate decodes with the new rule
    (compiled functions are keyed on the registered rule, not its name)."""
    def bonus(z, n):  # the verifier's argmax after n accepted drafts
        return jnp.argmax(z[:, n], -1).astype(jnp.int32)
    kw = dict(sampler="two_forward", block_size=3, acceptance="x", max_new_tokens=24)
    try:
        acceptance.register("x")(lambda z, d, q, rng, o: (jnp.full(d.shape[:1], d.shape[1]), bonus(z, d.shape[1])))
        everything = generate(model, ROWS, **kw)
        acceptance.register("x")(lambda z, d, q, rng, o: (jnp.zeros(d.shape[:1], jnp.int32), bonus(z, 0)))
        nothing = generate(model, ROWS, **kw)
    finally:
        del acceptance.ACCEPTANCE["x"]
    assert everything.stats["acceptance_per_position"] == [1.0] * 3 and everything.tokens != ar_ref
    assert nothing.stats["acceptance_per_position"] == [0.0] * 3 and nothing.tokens == ar_ref  # greedy bonus = AR
    assert nothing.stats["tokens_per_step"] == 1.0 and everything.stats["tokens_per_step"] > 3


def test_reregistered_sampler_takes_effect(model, ar_ref):
    """A sampler is one registered record: 'x' first reuses AR's step, then (the cell re-run) emits token 7."""
    import dataclasses

    from zaya.decode.state import append

    def sevens(params, c, impl, o, state):
        tok = jnp.full_like(state.n, 7)
        state, kept = append(state, tok[:, None], jnp.ones_like(state.n), o.eos_id, o.stop)
        return state.replace(forwards=state.forwards + 1), {"kept": kept, "next": tok}
    try:
        samplers.register(dataclasses.replace(samplers.get("ar"), name="x"))
        first = generate(model, ROWS, sampler="x", max_new_tokens=24)
        samplers.register(samplers.Sampler("x", sevens, query_tokens=lambda o: (1,),
                                           expected_tokens_per_step=lambda beta, o: 1.0))
        second = generate(model, ROWS, sampler="x", max_new_tokens=24)
    finally:
        del samplers.SAMPLERS["x"]
    assert first.tokens == ar_ref and second.tokens == [[7] * 24] * 3
    with pytest.raises(ValueError, match="unknown sampler 'x'"):
        generate(model, ROWS, sampler="x", max_new_tokens=2)


def test_options_are_validated_once_with_clear_errors(model):
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        generate(model, ROWS, sampler="two_forward", block_size=0, max_new_tokens=2)
    with pytest.raises(ValueError, match="'epsilon' is not an option of acceptance 'greedy'"):
        generate(model, ROWS, sampler="two_forward", epsilon=0.1, max_new_tokens=2)
    with pytest.raises(ValueError, match="unknown acceptance 'nope'"):
        generate(model, ROWS, sampler="two_forward", acceptance="nope", max_new_tokens=2)
    o = DecodeOptions.make(acceptance="typical", epsilon=0.2, levels=[0, 2], block_size=None)
    assert (o.rule_options, o.levels, o.block_size, o.rule) == \
        ((("epsilon", 0.2),), (0, 2), 16, acceptance.ACCEPTANCE["typical"])
    assert hash(o) == hash(DecodeOptions.make(acceptance="typical", epsilon=0.2, levels=(0, 2)))

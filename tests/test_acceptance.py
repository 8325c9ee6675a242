"""Acceptance rules: unit checks and exact distributions on small vocabularies (no model)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as sps

from zaya.decode import acceptance as A
from zaya.decode.sampling import probs, sample


def _setup(B=1, K=3, V=5, seed=0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    z = jax.random.normal(k1, (B, K + 1, V)) * 2
    d = jax.random.randint(k2, (B, K), 0, V)
    return z, d


def test_greedy_counts_leading_matches():
    z = jnp.log(jnp.array([[[.1, .9, 0, 0], [.8, .2, 0, 0], [0, 0, 1., 0], [0, 0, 0, 1.]]]) + 1e-9)
    n, nxt = A.get("greedy")(z, jnp.array([[1, 0, 3]]), None, jax.random.PRNGKey(0), {})
    assert int(n[0]) == 2 and int(nxt[0]) == 2  # third draft wrong: emit argmax at position 2
    n, nxt = A.get("greedy")(z, jnp.array([[1, 0, 2]]), None, jax.random.PRNGKey(0), {})
    assert int(n[0]) == 3 and int(nxt[0]) == 3  # all accepted: bonus = argmax of the last position


@pytest.mark.numerics
@pytest.mark.parametrize("q_kind", ["dirac", "sampled"])
def test_rejection_first_token_is_exactly_p(q_kind):
    """One draft position: the emitted first token (draft if accepted else the residual draw) ~ p exactly."""
    V, N = 6, 200_000
    z = jnp.log(jnp.array([[[.05, .4, .1, .2, .15, .1], [1 / 6] * 6]]))
    q = jnp.array([[[.3, .1, .3, .1, .1, .1]]])
    keys = jax.random.split(jax.random.PRNGKey(1), N)

    def one(k):
        kd, ka = jax.random.split(k)
        d = jax.random.categorical(kd, jnp.log(q[0]), -1)[None] if q_kind == "sampled" else jnp.array([[2]])
        n, nxt = A.get("rejection")(z, d, q if q_kind == "sampled" else None, ka, {"temperature": 1.0})
        return jnp.where(n[0] >= 1, d[0, 0], nxt[0])
    first = np.asarray(jax.vmap(one)(keys))
    freq = np.bincount(first, minlength=V) / N
    np.testing.assert_allclose(freq, [.05, .4, .1, .2, .15, .1], atol=4e-3)


@pytest.mark.numerics
def test_dirac_acceptance_rate_is_p_of_draft():
    z = jnp.log(jnp.array([[[.25, .75], [.5, .5]]]))
    keys = jax.random.split(jax.random.PRNGKey(2), 50_000)
    n = jax.vmap(lambda k: A.get("rejection")(z, jnp.array([[1]]), None, k, {"temperature": 1.0})[0][0])(keys)
    assert abs(float(n.mean()) - 0.75) < 0.01


def test_strict_and_typical_and_topk_shapes():
    z, d = _setup(B=4)
    for name in ("strict", "typical", "topk", "tidar_ratio", "rejection", "greedy"):
        n, nxt = A.get(name)(z, d, None, jax.random.PRNGKey(3), {"temperature": 1.0},
                             A.RuleInputs(draft_logits=z[:, :-1]))
        assert n.shape == (4,) and nxt.shape == (4,) and int(n.max()) <= 3 and int(n.min()) >= 0


def test_mix_weight_one_is_identity_and_zero_trusts_the_drafter():
    z, _ = _setup(B=2, K=3)
    zd = jax.random.normal(jax.random.PRNGKey(4), z[:, :-1].shape) * 3
    d = jnp.argmax(zd, -1)  # drafts = drafter argmax
    n0, _ = A.get("greedy", mix_weight=0.0)(z, d, None, jax.random.PRNGKey(0), {}, A.RuleInputs(diff_logits=zd))
    assert (np.asarray(n0) == 3).all()  # w=0: the verifier is the drafter itself, everything is accepted
    assert A.get("greedy", mix_weight=1.0) is A.ACCEPTANCE["greedy"]


def test_register_a_new_criterion():
    @A.register("always_one")
    def always_one(z, d, q, rng, o):
        return jnp.minimum(jnp.ones(d.shape[0], jnp.int32), d.shape[1]), jnp.argmax(z[:, 1], -1)
    z, d = _setup(B=2)
    n, _ = A.get("always_one")(z, d, None, jax.random.PRNGKey(0), {})
    assert (np.asarray(n) == 1).all()
    del A.ACCEPTANCE["always_one"]
    with pytest.raises(ValueError, match="unknown acceptance"):
        A.get("always_one")


def test_a_rule_asks_for_the_drafting_logits_at_registration():
    """needs_inputs=True: the rule gets RuleInputs as a sixth argument (any name, not only tidar_ratio); the mix
    wrapper needs them too; the lossless flag marks the rules exact w.r.t. AR."""
    @A.register("trust_drafter", needs_inputs=True)
    def trust_drafter(z, d, q, rng, o, inputs):  # accept while the draft is the drafter's own argmax
        n = jnp.cumprod((d == jnp.argmax(inputs.draft_logits, -1)).astype(jnp.int32), 1).sum(1)
        return n, jnp.argmax(z[:, 0], -1).astype(jnp.int32)
    try:
        z, d = _setup(B=2, K=3)
        ql = jax.nn.one_hot(d.at[1, 1].set((d[1, 1] + 1) % z.shape[-1]), z.shape[-1])  # row 1: d_2 is not q's top
        n, _ = A.get("trust_drafter")(z, d, None, jax.random.PRNGKey(0), {}, A.RuleInputs(draft_logits=ql))
        assert np.asarray(n).tolist() == [3, 1]
        assert A.ACCEPTANCE["trust_drafter"].needs_inputs and not A.ACCEPTANCE["greedy"].needs_inputs
        assert A.get("greedy", mix_weight=0.5).needs_inputs  # mixing reads the diffusion logits
    finally:
        del A.ACCEPTANCE["trust_drafter"]
    assert {n for n, r in A.ACCEPTANCE.items() if r.lossless} == {"greedy", "rejection", "strict"}


# --- Chained positions and the bonus token: the joint of the committed tokens is the AR joint ---------------------
# A synthetic Markov "model": the token at position i+1 depends only on the token at i, so the verifier logits for
# draft position i+1 (computed from the drafted prefix) are also the AR logits for the committed prefix up to the
# first rejection. The drafter is a different Markov chain. After one step, the rows that committed fewer than K+1
# tokens are completed by exact AR sampling, so a lossless rule gives the AR joint of K+1 tokens exactly.
_P0 = np.array([.15, .35, .3, .2])  # first token
_PT = np.array([[.5, .2, .2, .1], [.1, .6, .1, .2], [.25, .25, .3, .2], [.3, .1, .1, .5]])  # next | previous
_Q0 = np.array([.4, .1, .3, .2])
_QT = np.array([[.2, .4, .2, .2], [.3, .3, .2, .2], [.1, .1, .7, .1], [.25, .25, .25, .25]])
_L0, _LT = np.log(_P0) + 0.7, np.log(_PT) - 1.3  # logits, shifted: only softmax(z / T) may matter


def _ar_joint(opts, K):
    """Exact AR joint of K+1 tokens [V]*(K+1) under the filtered sampling distribution."""
    p0 = np.asarray(probs(jnp.asarray(_L0), opts["temperature"], opts.get("top_k")), np.float64)
    pt = np.asarray(probs(jnp.asarray(_LT), opts["temperature"], opts.get("top_k")), np.float64)
    joint = p0
    for _ in range(K):
        joint = joint[..., None] * pt  # [..., x, y] = joint[..., x] * p(y | x)
    return joint / joint.sum()  # fp32 probs sum to 1 only within rounding; chisquare checks the totals


def _committed_joint_counts(name, dirac, opts, K=2, N=40_000, seed=0):
    """Counts [V**(K+1)] of the first K+1 tokens: one jitted step over N rows, then AR continuation."""
    rule = A.get(name)

    @jax.jit
    def run(key, L0, LT, Q0, QT):  # arrays as arguments, not constants: XLA would constant-fold the whole program
        kd, ka, kf = jax.random.split(key, 3)
        d, q = [], []
        for i, k in enumerate(jax.random.split(kd, K)):
            qi = jnp.broadcast_to(Q0, (N, Q0.shape[0])) if i == 0 else QT[d[-1]]
            d.append(jnp.argmax(qi, -1) if dirac else jax.random.categorical(k, jnp.log(qi), -1))
            q.append(qi)
        d_NK, q_NKV = jnp.stack(d, 1).astype(jnp.int32), jnp.stack(q, 1)
        z = jnp.concatenate([jnp.broadcast_to(L0, (N, 1, L0.shape[0])), LT[d_NK]], 1)  # [N, K+1, V]
        n, nxt = rule(z, d_NK, None if dirac else q_NKV, ka, opts, A.RuleInputs(draft_logits=jnp.log(q_NKV)))
        toks = []
        for j, k in enumerate(jax.random.split(kf, K + 1)):
            fill = sample(LT[toks[-1]], k, opts["temperature"], opts.get("top_k")) if j else nxt
            dj = d_NK[:, j] if j < K else nxt
            toks.append(jnp.where(j < n, dj, jnp.where(j == n, nxt, fill)))  # AR continuation after the step
        return jnp.stack(toks, 1)

    toks = np.asarray(run(jax.random.PRNGKey(seed), *(jnp.asarray(a, jnp.float32) for a in (_L0, _LT, _Q0, _QT))))
    V = _P0.shape[0]
    return np.bincount(np.ravel_multi_index(toks.T, (V,) * (K + 1)), minlength=V ** (K + 1))


def _chi2_pvalue(counts, joint):
    exp = joint.ravel() * counts.sum()
    assert counts[exp == 0].sum() == 0  # a token the AR sampler can never emit is never committed
    big = exp >= 5  # pool rare cells so the chi-square approximation holds
    obs = np.append(counts[big], counts[~big & (exp > 0)].sum())
    exp = np.append(exp[big], exp[~big & (exp > 0)].sum())
    keep = exp > 0
    return sps.chisquare(obs[keep], exp[keep]).pvalue


ALPHA = 1e-3  # significance level of the exactness tests (seeds are fixed, so the outcome is deterministic)


@pytest.mark.numerics
@pytest.mark.parametrize("name,dirac,opts", [
    ("rejection", True, {"temperature": 1.0}),
    ("rejection", False, {"temperature": 1.0}),
    ("rejection", False, {"temperature": 0.8, "top_k": 3}),
    ("strict", True, {"temperature": 1.0}),
    ("strict", False, {"temperature": 1.0}),
])
def test_lossless_joint_over_chained_positions_and_bonus(name, dirac, opts):
    """K=2 drafts, V=4: the joint of the 3 committed tokens (2 drafts + residual/bonus) matches AR (chi-square)."""
    counts = _committed_joint_counts(name, dirac, opts)
    assert _chi2_pvalue(counts, _ar_joint(opts, 2)) > ALPHA


@pytest.mark.numerics
@pytest.mark.parametrize("name", ["tidar_ratio", "typical"])
def test_lossy_joint_differs_from_ar(name):
    """The same chi-square test has the power to reject: the lossy rules do not give the AR joint."""
    opts = {"temperature": 1.0}
    assert _chi2_pvalue(_committed_joint_counts(name, False, opts), _ar_joint(opts, 2)) < 1e-9


# --- Unit checks of each rule's formula on hand-made logits ---------------------------------------------------------
def _np_softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_greedy_contract_per_row():
    """Rows with their first mismatch at 0..K (K: none): n = leading matches, next = argmax at position n."""
    B, K, V = 5, 4, 7
    z = np.random.default_rng(5).normal(size=(B, K + 1, V)).astype(np.float32)  # numpy: no eager op compiles
    top = z.argmax(-1)
    d = top[:, :K].copy()
    for b in range(K):
        d[b, b] = (d[b, b] + 1) % V  # row b: first mismatch at b; row K: fully accepted
        d[b, K - 1] = (d[b, K - 1] + 1) % V  # a later mismatch must not matter
    n, nxt = jax.jit(lambda z, d: A.get("greedy")(z, d, None, jax.random.PRNGKey(0), {}))(z, jnp.asarray(d))
    np.testing.assert_array_equal(n, np.arange(B))
    np.testing.assert_array_equal(nxt, top[np.arange(B), np.arange(B)])  # row K: the bonus = argmax at position K


def test_typical_threshold_formula_at_boundaries():
    """Accept iff p(d) > min(eps, delta * exp(-H(p))), p = softmax(z) at temperature 0; recovered/bonus = argmax."""
    p = np.array([[.9, .05, .03, .02], [.4, .3, .2, .1], [.1, .2, .3, .4]])  # positions 0, 1 and the bonus
    z = jnp.asarray(np.log(p)[None], jnp.float32)
    H1 = -(p[1] * np.log(p[1])).sum()
    rule = jax.jit(lambda z, d, e, dl: A.get("typical")(z, d, None, jax.random.PRNGKey(0), {"epsilon": e, "delta": dl}))
    d = jnp.array([[0, 2]])  # p(d_0) = .9 passes every threshold below; p(d_1) = .2 sits at the boundary
    for e, dl, n_want in [
        (1.0, .2 * np.exp(H1) * (1 - 1e-3), 2),  # delta binds, just below p(d_1): accept both, bonus = argmax
        (1.0, .2 * np.exp(H1) * (1 + 1e-3), 1),  # delta binds, just above: reject d_1, emit argmax of position 1
        (.2 * (1 - 1e-3), 10.0, 2),  # epsilon binds
        (.2 * (1 + 1e-3), 10.0, 1),
    ]:
        n, nxt = rule(z, d, e, dl)
        assert int(n[0]) == n_want and int(nxt[0]) == (3 if n_want == 2 else 0), (e, dl)
    n, nxt = rule(z, jnp.array([[3, 0]]), 0.09, 0.3)  # p(d_0) = .02 < threshold: the chain stops at 0
    assert int(n[0]) == 0 and int(nxt[0]) == 0


def test_typical_with_top_k_uses_the_filtered_entropy():
    """At T > 0 with top-k, H is over the filtered p (0 log 0 = 0); this rejected everything (NaN) before the fix."""
    z = jnp.log(jnp.array([[[.5, .3, .15, .05], [.4, .3, .2, .1]]]))
    pf = np.array([.5, .3]) / .8
    thr = min(.09, .3 * np.exp((pf * np.log(pf)).sum()))  # .09 here
    n, _ = jax.jit(lambda z, d: A.get("typical")(z, d, None, jax.random.PRNGKey(0), {"temperature": 1.0, "top_k": 2}))(
        z, jnp.array([[1]]))
    assert pf[1] > thr and int(n[0]) == 1


def test_tidar_ratio_at_temperature_zero_is_greedy():
    B, K, V = 32, 4, 6
    g = np.random.default_rng(6)
    z = g.normal(size=(B, K + 1, V)).astype(np.float32) * 2
    top = z.argmax(-1)
    d = np.where(g.uniform(size=(B, K)) < 0.7, top[:, :K], (top[:, :K] + 1) % V).astype(np.int32)
    x = A.RuleInputs(draft_logits=g.normal(size=(B, K, V)).astype(np.float32))
    run = jax.jit(lambda z, d, x: [A.get(r)(z, d, None, jax.random.PRNGKey(1), {}, x)
                                   for r in ("tidar_ratio", "greedy")])
    (n, nxt), (ng, nxtg) = run(z, d, x)
    assert len(set(np.asarray(ng).tolist())) >= 3  # rows stop at different positions
    np.testing.assert_array_equal(n, ng)
    np.testing.assert_array_equal(nxt, nxtg)


def test_tidar_ratio_accepts_with_min_1_ratio_and_has_no_residual():
    """Accept d_i with probability min(1, p_T(d_i) / q(d_i)), q = softmax(draft_logits) at T=1, p at the verify T;
    at a failure the next token is drawn from p itself (the rejected draft included), not from a residual."""
    N, T = 40_000, 0.5
    zv = np.log(np.array([[.2, .3, .1, .4], [.1, .2, .3, .4], [.25, .25, .25, .25]]))  # verifier logits
    zq = np.log(np.array([[.1, .1, .1, .7], [.05, .05, .45, .45]]))  # drafting logits
    d = np.array([3, 2])
    p = _np_softmax(zv / T)
    r = np.minimum(1.0, p[np.arange(2), d] / _np_softmax(zq)[np.arange(2), d])  # [.76, .67]
    z = jnp.broadcast_to(jnp.asarray(zv, jnp.float32), (N, 3, 4))
    ql = jnp.broadcast_to(jnp.asarray(zq, jnp.float32), (N, 2, 4))
    run = jax.jit(lambda z, d, ql: A.get("tidar_ratio")(z, d, None, jax.random.PRNGKey(7), {"temperature": T},
                                                       A.RuleInputs(draft_logits=ql)))
    n, nxt = run(z, jnp.broadcast_to(jnp.asarray(d, jnp.int32), (N, 2)), ql)
    n, nxt = np.asarray(n), np.asarray(nxt)
    tol = 4 * np.sqrt(.25 / N)
    assert abs((n >= 1).mean() - r[0]) < tol and abs((n == 2).mean() - r[0] * r[1]) < tol
    for i in range(3):  # the emitted token at a failure (or the bonus) ~ p_i
        sel = nxt[n == i]
        np.testing.assert_allclose(np.bincount(sel, minlength=4) / len(sel), p[i], atol=4 * np.sqrt(.25 / len(sel)))


def test_topk_membership_ratio_and_chain_stop():
    """Accept iff d in top-k(p) and p(d) >= r * max p; stop at the first failure; at T=0 next = argmax at n."""
    p = np.array([[.5, .3, .1, .05, .03, .02], [.1, .2, .4, .25, .03, .02], [.05, .1, .15, .2, .22, .28],
                  [.1, .5, .1, .1, .1, .1]])  # top-2: {0, 1}, {2, 3}, {5, 4}; bonus argmax 1
    z = jnp.broadcast_to(jnp.asarray(np.log(p), jnp.float32), (4, 4, 6))
    d = jnp.array([[1, 3, 4],  # all in the top-2: fully accepted, bonus
                   [0, 1, 5],  # d_1 is 4th: stop at 1 although d_2 is in the top-2
                   [2, 2, 5],  # d_0 outside: n = 0
                   [0, 2, 4]])  # argmax, argmax, 2nd with p = .22 vs max .28 (ratio .79)
    run = jax.jit(lambda z, d, r: A.get("topk")(z, d, None, jax.random.PRNGKey(0), {"k": 2, "r": r}))
    for r, n_want, next_want in [(0.0, [3, 1, 0, 3], [1, 2, 0, 1]),
                                 (.75, [0, 1, 0, 3], [0, 2, 0, 1]),  # row 0: .3 < .75 * .5 now fails
                                 (.8, [0, 1, 0, 2], [0, 2, 0, 5])]:  # row 3: .22 < .8 * .28
        n, nxt = run(z, d, r)
        np.testing.assert_array_equal(n, n_want, err_msg=f"r={r}")
        np.testing.assert_array_equal(nxt, next_want, err_msg=f"r={r}")


@pytest.mark.parametrize("q_kind", ["dirac", "sampled"])
def test_rejection_never_accepts_a_zero_probability_draft(q_kind, monkeypatch):
    """jax.random.uniform can return exactly 0: with u <= p(d) a draft that top-k removed (p = 0) was accepted."""
    monkeypatch.setattr(jax.random, "uniform", lambda key, shape, *a, **k: jnp.zeros(shape))
    z = jnp.log(jnp.array([[[.5, .3, .15, .05], [.4, .3, .2, .1]]]))
    q = jnp.array([[[.1, .1, .7, .1]]]) if q_kind == "sampled" else None
    n, nxt = jax.jit(lambda z, q: A.get("rejection")(z, jnp.array([[2]]), q, jax.random.PRNGKey(0),
                                                     {"temperature": 1.0, "top_k": 2}))(z, q)
    assert int(n[0]) == 0 and int(nxt[0]) in (0, 1)


def test_sampling_never_picks_a_zero_probability_token_under_jit():
    """Residuals and filtered distributions have exact zeros. Under jit on jax 0.12 (CPU), log(max(0, 1e-38)) was
    NaN and categorical's argmax picked exactly those tokens (rejection then emitted the rejected draft)."""
    p = np.tile(np.array([[0.3, 0.0, 0.7, 0.0]], np.float32), (512, 1))
    s = np.asarray(jax.jit(A._sample_rows)(jax.random.PRNGKey(0), jnp.asarray(p)))
    assert set(s.tolist()) == {0, 2}
    z = jnp.asarray(np.random.default_rng(0).standard_normal((512, 3, 12)).astype(np.float32))
    d = jnp.full((512, 2), 5, jnp.int32)
    n, nxt = jax.jit(lambda z, d, k: A.rejection(z, d, None, k, {"temperature": 1.0}))(
        z, d, jax.random.PRNGKey(1))
    n, nxt = np.asarray(n), np.asarray(nxt)
    assert (n < 2).any() and not (nxt[n < 2] == 5).any()  # after a rejection the residual excludes the draft

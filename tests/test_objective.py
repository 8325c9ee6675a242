"""The TiDAR objective: loss == a dense-mask reference with a naive per-token loop; every option; jit; gradients."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

from layout_reference import dense_mask, reference_layout
from test_layouts import np_params
from zaya import layouts
from zaya.config import preset
from zaya.model import attention as attn_lib
from zaya.model.transformer import Impl, apply
from zaya.tidar.objective import (TidarOptions, ar_eval, build, diffusion_metrics, loss_fn, position_weights,
                                  token_ce)

S = 16
CASES = {  # one compiled loss per case, shared by the tests below
    "A": TidarOptions(block_size=4, alpha=0.5, position_gamma=0.7, prompt_masking=True),
    "B": TidarOptions(block_size=4, anchor="token", alpha=2.0, block_start="document"),
    "C": TidarOptions(block_size=2, anchor="token", block_causal=True, masking="random", mask_ratio=0.6,
                      doc_masking=False),
    "D": TidarOptions(block_size=4, block_start="document", prompt_masking=True),
    "E": TidarOptions(block_size=2, anchor="mask", anchor_loss=True, prompt_masking=True, position_gamma=0.5),
}
RNG = jax.random.PRNGKey(11)
_loss = jax.jit(loss_fn, static_argnums=(1, 3, 5))
_build = jax.jit(build, static_argnums=(3, 4))


@pytest.fixture(scope="module")
def model():
    c = preset("tiny")
    return c, np_params(c, seed=1)


def make_batch(c, docs, prompt=()):
    """tokens, doc_ids and a data-style loss_mask (0 on padding, each document's first token and ``prompt``)."""
    doc = np.asarray(docs, np.int32)
    x = np.asarray(jax.random.randint(jax.random.PRNGKey(5), doc.shape, 5, c.vocab_size), np.int32)
    lm = (doc >= 0).astype(np.float32)
    lm[:, 0] = 0
    lm[:, 1:][doc[:, 1:] != doc[:, :-1]] = 0
    for r, i in prompt:
        lm[r, i] = 0
    return {"tokens": x, "doc_ids": doc, "loss_mask": lm}


def batch_main(c):
    return make_batch(c, [[0] * 5 + [1] * 9 + [2] * 2, [0] * 11 + [-1] * 5], prompt=[(0, 6), (0, 7), (1, 1), (1, 2)])


# ---------------------------------------------------------------------------------------------------------------
# The dense reference: an explicit [T, T] mask from the paper's rule, its own attention, a per-token loss loop.

@struct.dataclass
class _DenseLayout(layouts.Layout):
    """pos/prev for RoPE and the convolutions, plus the explicit [B, T, T] mask the reference attention uses."""
    dense: jnp.ndarray = None


def _dense_attention(q, k, v, layout, cache_k, cache_v, cache_len):
    m = layout.dense[:, None]
    G = q.shape[2] // k.shape[2]
    kk, vv = jnp.repeat(k, G, 2).astype(jnp.float32), jnp.repeat(v, G, 2).astype(jnp.float32)
    s = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), kk) * q.shape[-1] ** -0.5
    p = jnp.where(m, jax.nn.softmax(jnp.where(m, s, -1e30), -1), 0.0)
    return jnp.einsum("bhts,bshd->bthd", p, vv).astype(v.dtype)


def _prev_from_dense(mask, pos):
    B, T = pos.shape
    prev = np.full((B, T, 2), layouts.PREV_ZERO, np.int32)
    for r in range(B):
        for t in range(T):
            for d in (1, 2):
                cand = [j for j in range(T) if mask[r, t, j] and pos[r, j] == pos[r, t] - d]
                assert len(cand) <= 1
                if cand:
                    prev[r, t, d - 1] = cand[0]
    return prev


def _dense_case(c, name):
    """Tokens, positions, dense mask and slots of case ``name`` built by loops (reference_layout)."""
    opts = CASES[name]
    batch = batch_main(c)
    x = batch["tokens"]
    doc = batch["doc_ids"] if opts.doc_masking else np.where(batch["doc_ids"] >= 0, 0, -1)
    B = x.shape[0]
    masked = (np.asarray(jax.random.bernoulli(RNG, opts.mask_ratio, (B, S))) if opts.masking == "random"
              else np.ones((B, S), bool))
    anchored = opts.anchor != "none"
    slots, pos, mask = reference_layout(doc, opts.block_size, anchor=anchored, block_causal=opts.block_causal,
                                        doc_aligned=opts.block_start == "document")
    tok = np.array([[x[r, i] if k == "clean" or (k == "mask" and not masked[r, i]) else
                     x[r, i - 1] if k == "anchor" and opts.anchor == "token" else c.mask_token_id
                     for k, i in slots[r]] for r in range(B)])
    return dict(batch=batch, doc=doc, masked=masked, slots=slots, pos=pos, mask=mask, tok=tok)


@functools.lru_cache(maxsize=None)
def references():
    """Loss and metrics of every case computed without any of the objective's code: one dense-mask forward over
    all cases (rows padded to a common length with tokens that see nothing), then a per-token loop."""
    c = preset("tiny")
    p = np_params(c, seed=1)
    cases = {n: _dense_case(c, n) for n in sorted(CASES)}
    T = max(d["tok"].shape[1] for d in cases.values())
    padT = lambda a, v: np.pad(a, [(0, 0), (0, T - a.shape[1])] + [(0, 0)] * (a.ndim - 2), constant_values=v)
    tok = np.concatenate([padT(d["tok"], 0) for d in cases.values()])
    pos = np.concatenate([padT(d["pos"], 0) for d in cases.values()])
    mask = np.concatenate([np.pad(d["mask"], [(0, 0), (0, T - d["tok"].shape[1]), (0, T - d["tok"].shape[1])])
                           for d in cases.values()])
    z = jnp.zeros(pos.shape, jnp.int32)
    lay = _DenseLayout(pos=jnp.asarray(pos), seg=z, blk=z, ctx=z, prev=jnp.asarray(_prev_from_dense(mask, pos)),
                       dense=jnp.asarray(mask))
    attn_lib.IMPLS["test_dense_mask"] = _dense_attention
    try:
        impl = Impl(attention="test_dense_mask", moe="dense")
        logits_all = np.asarray(jax.jit(lambda p, t, l: apply(p, c, t, l, impl=impl)[0])(p, tok, lay), np.float64)
    finally:
        del attn_lib.IMPLS["test_dense_mask"]
    out = {}
    for n, (name, d) in enumerate(cases.items()):
        out[name] = _naive_loss(CASES[name], d, logits_all[2 * n:2 * n + 2])
    return out


def _naive_loss(opts, d, logits):
    x, lm, doc, pos, masked, slots = (d["batch"]["tokens"], d["batch"]["loss_mask"], d["doc"], d["pos"], d["masked"],
                                      d["slots"])
    B, b = x.shape[0], opts.block_size
    mx = logits.max(-1, keepdims=True)
    logp = logits - mx - np.log(np.exp(logits - mx).sum(-1, keepdims=True))
    pred = logits.argmax(-1)
    w = position_weights(opts)
    resp = lm > 0 if opts.prompt_masking else np.ones((B, S), bool)
    ar = [0.0, 0]
    df = [0.0, 0]
    hits, cnt, first, anchor = np.zeros(b), np.zeros(b), np.zeros(4), [0, 0]
    row = opts.block_start == "row"
    for r in range(B):
        slot_of = {i: t for t, (k, i) in enumerate(slots[r]) if k == "mask"}
        for t, (k, i) in enumerate(slots[r]):  # the anchor mask of the block at i predicts x_{i-1}
            if opts.anchor_loss and k == "anchor" and resp[r, i - 1]:
                df[0] += -logp[r, t, x[r, i - 1]]  # weight 1, in the same mean as the masks
                anchor[0] += pred[r, t] == x[r, i - 1]
                anchor[1] += 1
        for i in range(S):
            if doc[r, i] < 0:
                continue
            if i + 1 < S and doc[r, i + 1] == doc[r, i] and resp[r, i + 1]:
                ar[0] += -logp[r, i, x[r, i + 1]]
                ar[1] += 1
            kb = i - i % b  # row blocks: a mask in a block owned by another document carries no loss
            foreign = row and doc[r, i] != doc[r, kb] and (doc[r, kb] >= 0 or opts.anchor != "none")
            if resp[r, i] and masked[r, i] and not foreign:
                t = slot_of[i]
                k = i % b if row else pos[r, i] % b
                df[0] += w[k] * -logp[r, t, x[r, i]]
                df[1] += 1
                hits[k] += pred[r, t] == x[r, i]
                cnt[k] += 1
                if k == 0 and pos[r, i] > 0:  # agree, diffusion hit, AR hit (logit at i-1), count
                    first += [pred[r, t] == pred[r, i - 1], pred[r, t] == x[r, i], pred[r, i - 1] == x[r, i], 1]
    ar_loss, diff_loss = ar[0] / ar[1], df[0] / (df[1] + anchor[1])
    return dict(loss=(opts.alpha * ar_loss + diff_loss) / (1 + opts.alpha), ar_loss=ar_loss, diff_loss=diff_loss,
                n_ar_tokens=ar[1], n_diff_tokens=df[1], diff_acc_per_pos=hits / np.maximum(cnt, 1),
                diff_count_per_pos=cnt, first_slot_agree=first[0] / first[3], diff_acc_first_ctx=first[1] / first[3],
                ar_acc_first_ctx=first[2] / first[3], anchor_acc=anchor[0] / max(anchor[1], 1),
                n_anchor_tokens=anchor[1], mask=d["mask"])


def _check_against_reference(c, name, loss, m):
    opts, ref = CASES[name], references()[name]
    batch = batch_main(c)
    bt = _build(batch["tokens"], batch["doc_ids"], batch["loss_mask"], opts, c.mask_token_id, RNG)
    np.testing.assert_array_equal(dense_mask(bt["layout"]), ref["mask"])  # never built by the objective
    np.testing.assert_allclose(float(loss), ref["loss"], rtol=2e-5)
    np.testing.assert_allclose(float(m["loss"]), ref["loss"], rtol=2e-5)
    keys = ["ar_loss", "diff_loss", "n_ar_tokens", "n_diff_tokens", "diff_acc_per_pos", "diff_count_per_pos",
            "first_slot_agree", "diff_acc_first_ctx", "ar_acc_first_ctx"]
    assert ("n_anchor_tokens" in m) == opts.anchor_loss
    for k in keys + ["anchor_acc", "n_anchor_tokens"] * opts.anchor_loss:
        np.testing.assert_allclose(np.asarray(m[k]), ref[k], rtol=2e-5, atol=1e-6, err_msg=k)
    L, E1 = c.num_layers, c.num_experts + 1
    assert m["expert_counts"].shape == (L, E1)
    np.testing.assert_array_equal(np.asarray(m["expert_counts"]).sum(-1), [bt["inputs"].size] * L)
    assert m["diff_acc_per_pos"].shape == (opts.block_size,)


@pytest.mark.parametrize("name", ["A", "B", "D", "E"])
def test_loss_matches_dense_reference(model, name):
    """Layout (vs the loop-built [T, T] mask), loss, its two terms and the metrics. Cases A, B and C (in
    test_jit_eager_and_gradient), D and E together cover block size, alpha, token and mask anchors (with the
    anchor loss), random masking, position weights, documents on/off, prompt masking, block-causal attention and
    row- or document-started blocks."""
    c, p = model
    loss, m = _loss(p, c, batch_main(c), CASES[name], RNG, Impl())
    _check_against_reference(c, name, loss, m)


def test_jit_eager_and_gradient(model):
    """Case C: eager == jit(value_and_grad) == the dense reference; gradients finite and non-zero."""
    c, p = model
    batch = batch_main(c)
    eager, me = loss_fn(p, c, batch, CASES["C"], RNG)
    (jitted, mj), g = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), static_argnums=(1, 3))(
        p, c, batch, CASES["C"], RNG)
    _check_against_reference(c, "C", jitted, mj)
    np.testing.assert_allclose(float(eager), float(jitted), rtol=1e-5)
    for k in me:
        np.testing.assert_allclose(np.asarray(me[k]), np.asarray(mj[k]), rtol=1e-5, atol=1e-6, err_msg=k)
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(g))
    assert float(jnp.abs(g["embed"]).sum()) > 0 and float(jnp.abs(g["layers"]["conv2_w"]).sum()) > 0


def test_alpha_weights_the_two_terms(model):
    c, p = model
    for name in ("A", "B"):
        a = CASES[name].alpha
        _, m = _loss(p, c, batch_main(c), CASES[name], RNG, Impl())
        want = (a * float(m["ar_loss"]) + float(m["diff_loss"])) / (1 + a)
        np.testing.assert_allclose(float(m["loss"]), want, rtol=1e-6)
        assert abs(float(m["loss"]) - (float(m["ar_loss"]) + float(m["diff_loss"])) / 2) > 1e-4  # alpha != 1 matters


def test_random_masking_fraction_and_no_loss_on_clean_copies():
    opts = TidarOptions(block_size=4, masking="random", mask_ratio=0.3)
    x = jnp.arange(4 * 512, dtype=jnp.int32).reshape(4, 512) % 500 + 5
    bt = _build(x, jnp.zeros_like(x), None, opts, 4, jax.random.PRNGKey(0))
    masked = np.asarray(bt["masked"])
    assert abs(masked.mean() - 0.3) < 0.03
    half = np.asarray(bt["inputs"])[:, 512:]
    np.testing.assert_array_equal(half[masked], 4)
    np.testing.assert_array_equal(half[~masked], np.asarray(x)[~masked])  # the clean tokens themselves
    np.testing.assert_array_equal(np.asarray(bt["diff_valid"]), masked.astype(np.float32))
    other = _build(x, jnp.zeros_like(x), None, opts, 4, jax.random.PRNGKey(1))["masked"]
    assert (np.asarray(other) != masked).any()
    with pytest.raises(ValueError, match="rng"):
        build(x, jnp.zeros_like(x), None, opts, 4, None)
    full = _build(x, jnp.zeros_like(x), None, TidarOptions(block_size=4), 4, None)
    assert np.asarray(full["masked"]).all() and (np.asarray(full["inputs"])[:, 512:] == 4).all()


def test_position_weights():
    opts = TidarOptions(block_size=4, position_gamma=0.5, block_start="document")
    w = position_weights(opts)
    np.testing.assert_allclose(w, np.array([1, .5, .25, .125]) / np.mean([1, .5, .25, .125]), rtol=1e-6)
    np.testing.assert_allclose(position_weights(TidarOptions(block_size=4)), 1.0)
    doc = jnp.array([[0] * 6 + [1] * 10])
    bt = _build(jnp.full((1, 16), 9), doc, None, opts, 4, None)
    k = np.array([0, 1, 2, 3, 0, 1, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1])  # in-block positions restart per document
    np.testing.assert_array_equal(np.asarray(bt["diff_block_pos"])[0], k)
    np.testing.assert_allclose(np.asarray(bt["diff_weights"])[0], w[k], rtol=1e-6)
    bt = _build(jnp.full((1, 16), 9), doc, None, dataclasses.replace(opts, block_start="row"), 4, None)
    k = np.arange(16) % 4  # row blocks: in-block position = row index mod b, whatever the document
    np.testing.assert_array_equal(np.asarray(bt["diff_block_pos"])[0], k)
    owned = np.ones(16)
    owned[6:8] = 0  # document 1's first two tokens sit in the block owned by document 0: no loss there
    np.testing.assert_allclose(np.asarray(bt["diff_weights"])[0], w[k] * owned, rtol=1e-6)


@pytest.mark.parametrize("name", ["D", "B"])
def test_packed_documents_equal_separate_sequences(model, name):
    """With blocks started at documents (D; anchored B), [doc a | doc b] packed (b starts mid-row-block) trains
    exactly like a and b in rows of their own."""
    c, p = model
    a, b = 6, 10
    packed = make_batch(c, [[0] * a + [1] * b] * 2)
    x = packed["tokens"][0]
    packed["tokens"] = np.stack([x, x])
    alone = make_batch(c, [[0] * a + [-1] * b, [0] * b + [-1] * a])
    alone["tokens"] = np.stack([np.r_[x[:a], x[:b]], np.r_[x[a:], x[:a]]]).astype(np.int32)
    _, mp = _loss(p, c, packed, CASES[name], RNG, Impl())
    _, ms = _loss(p, c, alone, CASES[name], RNG, Impl())
    for k in ("loss", "ar_loss", "diff_loss", "diff_acc_per_pos", "first_slot_agree"):
        np.testing.assert_allclose(np.asarray(mp[k]), np.asarray(ms[k]), rtol=2e-5, atol=1e-6, err_msg=k)
    np.testing.assert_allclose(float(mp["n_diff_tokens"]), 2 * float(ms["n_diff_tokens"]))


def test_prompt_masking(model):
    """Prompt tokens (loss_mask 0) are no label of either loss: the weights, and a loss invariance: changing a
    document's last token, when it is a prompt token, changes no loss term (nothing else sees it)."""
    c, p = model
    batch = batch_main(c)
    bt = _build(batch["tokens"], batch["doc_ids"], batch["loss_mask"], CASES["A"], c.mask_token_id, None)
    lm, doc = batch["loss_mask"], batch["doc_ids"]
    same_next = np.c_[doc[:, 1:] == doc[:, :-1], np.zeros(2, bool)] & (doc >= 0)
    np.testing.assert_array_equal(np.asarray(bt["ar_weights"]), same_next * np.c_[lm[:, 1:], np.zeros(2)])
    kb = np.arange(S) - np.arange(S) % 4  # row blocks: no diffusion label where another document owns the block
    np.testing.assert_array_equal(np.asarray(bt["diff_valid"]), lm * ((doc == doc[:, kb]) | (doc[:, kb] < 0)))
    bt = _build(batch["tokens"], batch["doc_ids"], batch["loss_mask"], CASES["D"], c.mask_token_id, None)
    np.testing.assert_array_equal(np.asarray(bt["diff_valid"]), lm)
    last = [(0, 4), (0, 13), (1, 10)]  # last tokens of documents
    lm2 = lm.copy()
    for r, i in last:
        lm2[r, i] = 0
    changed = dict(batch, loss_mask=lm2, tokens=batch["tokens"].copy())
    for r, i in last:
        changed["tokens"][r, i] = 3
    base = _loss(p, c, dict(batch, loss_mask=lm2), CASES["A"], RNG, Impl())[0]
    np.testing.assert_allclose(float(_loss(p, c, changed, CASES["A"], RNG, Impl())[0]), float(base), rtol=1e-6)
    # without prompt masking (case B ignores loss_mask) the same change does change the loss
    b0 = float(_loss(p, c, dict(batch, loss_mask=lm2), CASES["B"], RNG, Impl())[0])
    assert abs(float(_loss(p, c, changed, CASES["B"], RNG, Impl())[0]) - b0) > 1e-4
    with pytest.raises(ValueError, match="loss_mask"):
        build(batch["tokens"], batch["doc_ids"], None, CASES["A"], c.mask_token_id)


def test_ar_eval_is_the_clean_half_loss(model):
    """The AR half of the TiDAR forward is exactly an AR LM: its loss == ar_eval's clean-only forward (T = S) ==
    the dense reference's AR term."""
    c, p = model
    batch = batch_main(c)
    loss, m = jax.jit(ar_eval, static_argnums=1)(p, c, batch)
    np.testing.assert_allclose(float(loss), references()["B"]["ar_loss"], rtol=2e-5)
    np.testing.assert_allclose(float(loss), float(_loss(p, c, batch, CASES["B"], RNG, Impl())[1]["ar_loss"]), rtol=2e-5)
    assert set(m) >= {"loss", "ar_acc", "n_ar_tokens"} and "diff_loss" not in m
    assert build(batch["tokens"], batch["doc_ids"], None, TidarOptions(mode="ar"), 4)["inputs"].shape == (2, S)


def test_diffusion_metrics_on_synthetic_predictions():
    """Accuracy per in-block position and first-slot agreement (diffusion first slot at kb vs AR argmax at kb-1)."""
    opts = TidarOptions(block_size=4, block_start="document")
    doc = jnp.array([[0] * 6 + [1] * 10])
    x = jnp.arange(16, dtype=jnp.int32)[None] + 100
    bt = _build(x, doc, None, opts, 4, None)
    ar_pred = jax.random.randint(jax.random.PRNGKey(0), (1, 16), 0, 50).at[0, 3].set(104)  # the AR hits x_4
    k = np.asarray(bt["diff_block_pos"])[0]  # 0 1 2 3 0 1 | 0 1 2 3 0 1 2 3 0 1
    pred = np.where(k == 1, np.asarray(x)[0], -1)  # only in-block position 1 is right
    first = np.array([4, 10, 14])  # block-first slots with a previous token in their document (not 0, not 6)
    pred[first] = np.asarray(ar_pred)[0, first - 1]
    m = diffusion_metrics(bt, opts, jnp.zeros((1, 16)), jnp.asarray(pred)[None], ar_pred)
    np.testing.assert_allclose(np.asarray(m["diff_acc_per_pos"]), [1 / 5, 1, 0, 0])
    np.testing.assert_allclose(np.asarray(m["diff_count_per_pos"]), [5, 5, 3, 3])
    np.testing.assert_allclose(float(m["first_slot_agree"]), 1.0)
    # same positions (the blocks at 0 and 6, without context, are left out): both hit x_4 only
    np.testing.assert_allclose([float(m["diff_acc_first_ctx"]), float(m["ar_acc_first_ctx"])], [1 / 3, 1 / 3])
    np.testing.assert_allclose(float(m["diff_acc_per_pos"][0]), 1 / 5)
    pred[first[0]] = -1
    m = diffusion_metrics(bt, opts, jnp.zeros((1, 16)), jnp.asarray(pred)[None], ar_pred)
    np.testing.assert_allclose(float(m["first_slot_agree"]), 2 / 3, rtol=1e-6)
    np.testing.assert_allclose([float(m["diff_acc_first_ctx"]), float(m["ar_acc_first_ctx"])], [0, 1 / 3])


_metrics = jax.jit(diffusion_metrics, static_argnums=1)


def test_first_position_metrics_match_a_loop():
    """diff_acc_first_ctx / ar_acc_first_ctx == a loop over the blocks' first tokens with context (a clean token
    of their document before them) that are labels (not prompt), on the packed prompt-masked batch with row
    blocks (A), document blocks (D) and mask-anchored row blocks (E), from synthetic predictions that hit some of them."""
    c = preset("tiny")
    batch = batch_main(c)
    x, doc, lm = batch["tokens"], batch["doc_ids"], batch["loss_mask"]
    r_, i_ = np.indices(x.shape)
    pred = np.where((3 * i_ + r_) % 5 < 3, x, 0)
    ar_pred = np.where((i_ + r_) % 3 < 2, np.roll(x, -1, 1), 1)  # ar_pred[i - 1] is x_i where (i - 1 + r) % 3 < 2
    for name in ("A", "D", "E"):
        opts = CASES[name]
        b = opts.block_size
        bt = _build(x, doc, lm, opts, c.mask_token_id, RNG)
        m = _metrics(bt, opts, jnp.zeros(x.shape), jnp.asarray(pred), jnp.asarray(ar_pred))
        hits = []
        for r in range(2):
            pos = 0
            for i in range(1, S):
                pos = pos + 1 if doc[r, i] == doc[r, i - 1] else 0
                starts = i % b == 0 if opts.block_start == "row" else pos % b == 0
                if doc[r, i] >= 0 and pos > 0 and starts and lm[r, i] > 0:
                    hits.append((pred[r, i] == x[r, i], ar_pred[r, i - 1] == x[r, i]))
        want = np.mean(hits, 0)
        assert len(hits) >= 5 and 0 < want.min() and want.max() < 1, (name, hits)  # a comparison that can fail
        np.testing.assert_allclose([float(m["diff_acc_first_ctx"]), float(m["ar_acc_first_ctx"])], want, rtol=1e-6,
                                   err_msg=name)


def test_chunked_ce_equals_full(model):
    c, p = model
    h = jax.random.normal(jax.random.PRNGKey(0), (2, 13, c.hidden_size))
    y = jax.random.randint(jax.random.PRNGKey(1), (2, 13), 0, c.vocab_size)
    full, chunked = token_ce(p, h, y), jax.jit(token_ce, static_argnums=3)(p, h, y, 5)
    np.testing.assert_allclose(np.asarray(chunked[0]), np.asarray(full[0]), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(chunked[1]), np.asarray(full[1]))
    grad = lambda chunk: jax.grad(lambda h: token_ce(p, h, y, chunk)[0].sum())(h)
    np.testing.assert_allclose(np.asarray(jax.jit(grad, static_argnums=0)(5)), np.asarray(grad(0)), atol=1e-6)


@pytest.mark.parametrize("kw,field", [(dict(block_size=0), "block_size"), (dict(alpha=-1.0), "alpha"),
                                      (dict(masking="half"), "masking"), (dict(mask_ratio=0.0), "mask_ratio"),
                                      (dict(position_gamma=0.0), "position_gamma"), (dict(mode="mlm"), "mode"),
                                      (dict(anchor=1), "anchor"), (dict(block_size=2.0), "block_size"),
                                      (dict(ce_chunk=-1), "ce_chunk"), (dict(anchor="both"), "anchor"),
                                      (dict(anchor_loss=True), "anchor_loss"),
                                      (dict(anchor="token", anchor_loss=True), "anchor_loss")])
def test_options_are_validated(kw, field):
    with pytest.raises(ValueError, match=f"TidarOptions.{field}="):
        TidarOptions(**kw)


def test_anchor_option_is_one_of_the_named_layouts():
    assert TidarOptions().anchor == "none"
    for bad in (True, False, "true"):  # the old bool field is gone: name the layout
        with pytest.raises(ValueError, match="TidarOptions.anchor=.*'none', 'token', 'mask'"):
            TidarOptions(anchor=bad)

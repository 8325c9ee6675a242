"""TiDAR layouts: id-built layouts == a loop-built dense reference of the paper's rule; train/decode consistency."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zaya.config import preset
from zaya.decode import layouts as decode_layouts
from zaya.model import layout as layout_lib
from zaya.model.cache import init_cache
from zaya.model.params import _is_spec, param_dtype, param_specs
from zaya.model.transformer import Impl, apply, forward
from zaya.tidar import layout as tl
from zaya.tidar.objective import TidarOptions, build


def np_params(c, seed=0, scale=0.3):
    """Training init then conftest.randomize's perturbation, in numpy (no per-op XLA compiles: fast on CPU)."""
    rng = np.random.default_rng(seed)

    def leaf(path, spec):
        shape, _, kind = spec
        x = np.zeros(shape)
        if kind == "normal":
            x = 0.02 * rng.standard_normal(shape)
        elif kind == "conv":
            x = 0.1 * rng.standard_normal(shape)
            x[:, 1] += 1.0 if len(shape) == 3 else np.eye(shape[-1])
        elif kind == "bias":
            x[..., -1] = -1.0
        elif kind == "ones":
            x = np.ones(shape)
        x = x + rng.standard_normal(shape) * scale * (np.abs(x).mean() + 0.05)
        return jnp.asarray(x, param_dtype(tuple(k.key for k in path), c))
    return jax.tree_util.tree_map_with_path(leaf, param_specs(c), is_leaf=_is_spec)


def reference_layout(doc, b, anchor=False, block_causal=False, doc_aligned=True):
    """The paper's rule (docs §1.2) by loops, generalised to packed documents and anchored blocks.

    Returns (slots, pos [B, T], mask [B, T, T]); slots[r][t] = (kind, i) with kind clean/mask/anchor/pad and i the
    clean index it stands for (anchor: the block start it anchors).
    """
    doc = np.asarray(doc)
    B, S = doc.shape
    out_slots, out_pos, out_mask = [], [], []
    for r in range(B):
        d = doc[r]
        p = np.zeros(S, int)
        for i in range(1, S):
            p[i] = p[i - 1] + 1 if d[i] == d[i - 1] else 0
        slots = [("clean", i) for i in range(S)]
        if not anchor:
            slots += [("mask", i) for i in range(S)]
        else:
            for g in range(S // b):
                s = [j for j in range(g * b, g * b + b) if d[j] >= 0 and p[j] > 0 and (p[j] % b == 0 if doc_aligned
                                                                                     else j == g * b)]
                slots += [("anchor", s[0]) if s else ("pad", -1)] + [("mask", j) for j in range(g * b, g * b + b)]
        row = not doc_aligned
        kb = lambda i: i - i % b
        # row blocks: every mask of a block belongs to the document of the block's first index, at its positions
        # (anchored: a block owned by padding is padding)
        owned = lambda kind, i: row and kind == "mask" and (anchor or d[kb(i)] >= 0)
        doc_of = lambda kind, i: d[kb(i)] if owned(kind, i) else d[i]
        pos = np.array([p[kb(i)] + i % b if owned(k, i) else p[i] - (k == "anchor") if k != "pad" else 0
                        for k, i in slots])
        block = lambda i: p[i] // b if doc_aligned else i // b
        first = lambda i: p[i] - p[i] % b if doc_aligned else p[kb(i)]  # block start position
        T = len(slots)
        m = np.zeros((T, T), bool)
        for q, (qk, qi) in enumerate(slots):
            for k, (kk, ki) in enumerate(slots):
                if "pad" in (qk, kk) or doc_of(qk, qi) < 0 or doc_of(kk, ki) != doc_of(qk, qi):
                    continue
                if qk == "clean":
                    m[q, k] = kk == "clean" and p[ki] <= p[qi]
                elif kk == "clean":
                    m[q, k] = p[ki] < first(qi) - (1 if anchor else 0)
                else:
                    m[q, k] = block(ki) == block(qi) and (not block_causal or pos[k] <= pos[q])
        out_slots.append(slots)
        out_pos.append(pos)
        out_mask.append(m)
    return out_slots, np.stack(out_pos), np.stack(out_mask)


DOCS = [np.array([[0] * 5 + [1] * 9 + [2] * 2, [0] * 16]),
        np.array([[3] * 11 + [-1] * 5, [0] * 2 + [1] * 12 + [2] * 2]),
        np.array([[0] * 4 + [1] * 8 + [2] * 4, [0] * 9 + [-1] * 7])]


def _valid(lay):
    return np.asarray(lay.seg) >= 0


@pytest.mark.parametrize("block_causal", [False, True])
@pytest.mark.parametrize("b", [1, 3, 4])
def test_training_layout_matches_reference(b, block_causal):
    """training(): global blocks (default) and document-aligned blocks; mask, positions, conv predecessors."""
    for doc in DOCS:
        for aligned in (False, True):
            lay = tl.training(doc, b, block_causal, doc_aligned=aligned)
            _, pos, m = reference_layout(doc, b, block_causal=block_causal, doc_aligned=aligned)
            np.testing.assert_array_equal(layout_lib.dense_mask(lay), m)
            v = _valid(lay)
            np.testing.assert_array_equal(np.asarray(lay.pos)[v], pos[v])
            np.testing.assert_array_equal(np.asarray(lay.prev)[v], layout_lib.prev_from_mask(lay, False)[v])


@pytest.mark.parametrize("block_causal", [False, True])
@pytest.mark.parametrize("b", [1, 2, 4])
@pytest.mark.parametrize("aligned", [False, True])
def test_anchored_layout_matches_reference(b, block_causal, aligned):
    """Anchored K+1 blocks (row blocks with the owner rule, or document-aligned): the anchor slot stands at kb-1;
    the block sees clean <= kb-2 plus itself."""
    for doc in DOCS + [np.array([[0] * 3 + [-1] * 5 + [1] * 8, [0] * 6 + [1] * 10])]:  # padding owns a block
        lay = tl.training_anchored(doc, b, block_causal, doc_aligned=aligned)
        slots, pos, m = reference_layout(doc, b, anchor=True, block_causal=block_causal, doc_aligned=aligned)
        np.testing.assert_array_equal(layout_lib.dense_mask(lay), m)
        v = _valid(lay)
        np.testing.assert_array_equal(np.asarray(lay.pos)[v], pos[v])
        # conv predecessors are 'the visible token at pos-1 / pos-2' (prev_from_mask also asserts it is unique)
        np.testing.assert_array_equal(np.asarray(lay.prev)[v], layout_lib.prev_from_mask(lay, False)[v])
        src = np.asarray(tl.anchor_sources(doc, b, doc_aligned=aligned))
        for r in range(doc.shape[0]):
            want = [i - 1 if k == "anchor" else -1 for k, i in slots[r][doc.shape[1]::b + 1]]
            np.testing.assert_array_equal(src[r], want)
            idx = tl.anchored_mask_index(doc.shape[1], b)
            assert [slots[r][j] for j in idx] == [("mask", i) for i in range(doc.shape[1])]


def test_builders_trace_under_jit():
    doc = jnp.asarray(DOCS[0])
    for f in (lambda d: tl.training(d, 4), lambda d: tl.training(d, 4, doc_aligned=True),
              lambda d: tl.training_anchored(d, 4), lambda d: tl.training_anchored(d, 4, doc_aligned=True), tl.clean):
        a, b = f(doc), jax.jit(f)(doc)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    np.testing.assert_array_equal(layout_lib.dense_mask(tl.clean(DOCS[1])),
                                  layout_lib.dense_mask(layout_lib.packed(DOCS[1])))


def test_anchored_needs_whole_blocks_and_draft_anchored_is_one_block():
    with pytest.raises(ValueError, match="multiple of block"):
        tl.training_anchored(np.zeros((1, 10), int), 4)
    lay = tl.draft_anchored(jnp.array([5, 9]), 4)
    assert lay.shape == (2, 5)
    np.testing.assert_array_equal(np.asarray(lay.pos), [[5, 6, 7, 8, 9], [9, 10, 11, 12, 13]])
    np.testing.assert_array_equal(np.asarray(lay.ctx), [[4] * 5, [8] * 5])
    cache = layout_lib.PREV_CACHE
    np.testing.assert_array_equal(np.asarray(lay.prev[0, :2]), [[cache, cache], [0, cache]])


# ---------------------------------------------------------------------------------------------------------------
# Train/decode consistency with the model (the training block == drafting after a cached prefix).

@pytest.fixture(scope="module")
def model():
    c = preset("tiny")
    return c, np_params(c)


IMPL = Impl(moe="dense")  # same math as ragged, compiles faster on CPU


@functools.partial(jax.jit, static_argnums=1)
def _apply(p, c, x, lay):
    return apply(p, c, x, lay, impl=IMPL)[0]


@functools.partial(jax.jit, static_argnums=1)
def _prefill(p, c, x, n):
    """zaya.model.forward over the whole rows, committing the first n[r] tokens (rows padded after n[r])."""
    B, T = x.shape
    return forward(p, c, x, layout_lib.causal(B, T, valid=n), init_cache(c, B, T + 8), n_commit=n, impl=IMPL)


@functools.partial(jax.jit, static_argnums=1)
def _draft(p, c, x, lay, cache):
    return forward(p, c, x, lay, cache, impl=IMPL)[0]


S, B_ = 16, 4


def _tokens(c):
    return jax.random.randint(jax.random.PRNGKey(7), (2, S), 5, c.vocab_size)


def test_training_blocks_equal_decode_drafting(model):
    """Non-anchored: rows 0/1 draft blocks k0/k1 (several positions, incl. block 0) after their clean prefixes."""
    c, p = model
    x = _tokens(c)
    bt = build(x, jnp.zeros((2, S), jnp.int32), None, TidarOptions(block_size=B_), c.mask_token_id)
    train = np.asarray(_apply(p, c, bt["inputs"], bt["layout"]))
    # the clean half is exactly an AR LM (a plain causal forward)
    np.testing.assert_allclose(train[:, :S], np.asarray(_prefill(p, c, x, jnp.array([S, S]))[0]), atol=2e-5)
    masks = jnp.full((2, B_), c.mask_token_id, jnp.int32)
    for k0, k1 in [(1, 3), (2, 0), (3, 2)]:
        L = np.array([k0 * B_, k1 * B_])
        cache = _prefill(p, c, x, jnp.asarray(L))[1]
        draft = np.asarray(_draft(p, c, masks, tl.draft_block(jnp.asarray(L), B_), cache))
        for r in range(2):
            np.testing.assert_allclose(draft[r], train[r, S + L[r]:S + L[r] + B_], atol=2e-5)


def test_row_blocks_start_mid_document_like_decode_drafting(model):
    """Row blocks (the default): in a packed row, document 1 starts at index 5, so the row block at index 8 starts
    at its in-document position 3 and equals a drafting block after a cache of that document's first 3 tokens;
    decoding drafts from wherever the committed text ends, and training sees blocks at every such offset. A block
    over a document end is b masks of that document, as a drafting block near the end of an answer is."""
    c, p = model
    x = _tokens(c)
    doc = jnp.asarray([[0] * 5 + [1] * 11] * 2)
    bt = build(x, doc, None, TidarOptions(block_size=B_), c.mask_token_id)
    assert bt["layout"].pos[0, S + 8] == 3
    train = np.asarray(_apply(p, c, bt["inputs"], bt["layout"]))
    alone = jnp.concatenate([x[:, 5:], x[:, :5]], 1)  # document 1 in a row of its own
    cache = _prefill(p, c, alone, jnp.array([3, 3]))[1]
    masks = jnp.full((2, B_), c.mask_token_id, jnp.int32)
    draft = np.asarray(_draft(p, c, masks, tl.draft_block(jnp.array([3, 3]), B_), cache))
    np.testing.assert_allclose(draft, train[:, S + 8:S + 8 + B_], atol=2e-5)
    # the block at index 4 holds document 0's last token and document 1's first three: all four masks belong to
    # document 0 (positions 4..7), exactly the b-mask drafting block after its first 4 tokens
    assert bt["diff_valid"][0, 4] == 1 and not bt["diff_valid"][0, 5:8].any()
    cache = _prefill(p, c, x, jnp.array([4, 4]))[1]
    draft = np.asarray(_draft(p, c, masks, tl.draft_block(jnp.array([4, 4]), B_), cache))
    np.testing.assert_allclose(draft, train[:, S + 4:S + 4 + B_], atol=2e-5)


@pytest.mark.parametrize("anchor", ["token", "mask"])
def test_anchored_blocks_equal_decode_drafting(model, anchor):
    """Anchored: the training block (anchor slot included) == the drafting forward after a cache of positions
    0..kb-2: [x_{kb-1}, mask x b] (token anchor, ``draft_anchored``) or [mask x (b+1)] at the bonus position kb-1
    (mask anchor: the decode samplers' ``layouts.draft`` with K = b, the geometry of single_forward's proposals)."""
    c, p = model
    x = _tokens(c)
    bt = build(x, jnp.zeros((2, S), jnp.int32), None, TidarOptions(block_size=B_, anchor=anchor), c.mask_token_id)
    train = np.asarray(_apply(p, c, bt["inputs"], bt["layout"]))
    idx = np.asarray(bt["diff_index"])
    for k0, k1 in [(1, 3), (2, 1), (3, 2)]:
        kb = np.array([k0 * B_, k1 * B_])
        first = x[jnp.arange(2), kb - 1] if anchor == "token" else jnp.full((2,), c.mask_token_id)
        toks = jnp.concatenate([first[:, None], jnp.full((2, B_), c.mask_token_id)], 1)
        cache = _prefill(p, c, x, jnp.asarray(kb - 1))[1]
        L = jnp.asarray(kb - 1)
        lay = tl.draft_anchored(L, B_) if anchor == "token" else decode_layouts.draft(L, B_)
        draft = np.asarray(_draft(p, c, toks, lay, cache))
        for r in range(2):
            np.testing.assert_allclose(draft[r, 1:], train[r, idx[kb[r]:kb[r] + B_]], atol=2e-5)
            np.testing.assert_allclose(draft[r, 0], train[r, idx[kb[r]] - 1], atol=2e-5)  # the anchor slot


def test_anchored_row_blocks_start_mid_document_like_decode_drafting(model):
    """Mask-anchored row blocks (the default) in a packed row where document 1 starts at index 5: the chunk of
    index 8 ([mask at position 2, masks at 3..6] of document 1) equals drafting [mask x 5] after a cache of
    document 1's first 2 tokens; the chunk of index 4 belongs to document 0 (positions 3..7, past its end: b masks
    whatever the length, as decoding near an answer's end) and equals drafting after document 0's first 3."""
    c, p = model
    x = _tokens(c)
    doc = jnp.asarray([[0] * 5 + [1] * 11] * 2)
    bt = build(x, doc, None, TidarOptions(block_size=B_, anchor="mask"), c.mask_token_id)
    train = np.asarray(_apply(p, c, bt["inputs"], bt["layout"]))
    masks = jnp.full((2, B_ + 1), c.mask_token_id, jnp.int32)
    alone = jnp.concatenate([x[:, 5:], x[:, :5]], 1)  # document 1 in a row of its own
    for g, L, row in [(2, 2, alone), (1, 3, x)]:
        cache = _prefill(p, c, row, jnp.array([L, L]))[1]
        draft = np.asarray(_draft(p, c, masks, decode_layouts.draft(jnp.array([L, L]), B_), cache))
        chunk = S + g * (B_ + 1)
        np.testing.assert_allclose(draft, train[:, chunk:chunk + B_ + 1], atol=2e-5)
    assert not np.asarray(bt["diff_valid"])[0, 5:8].any() and np.asarray(bt["diff_valid"])[0, 4] == 1

"""The TiDAR conversion objective (TiDAR's training layout and loss, as Zyphra applied it) as pure functions.

One backbone, one forward over ``[clean x_0..x_{S-1} | diffusion half]``:

  AR half         clean tokens, causal; token i predicts x_{i+1} (shifted; none at a document's last token)
  diffusion half  (non-anchored) S masks at the clean positions, blocks of b; mask i predicts x_i (un-shifted)
                  from the clean prefix before its block and its own block (bidirectional)
                  (anchored) per block [anchor at kb-1, b masks]: the block sees the clean prefix up to kb-2 and
                  itself, like the two-forward drafting forward; the anchor is a copy of x_{kb-1} (anchor="token",
                  decode ``[a', mask x K]``) or a mask (anchor="mask", decode ``[mask x (K+1)]``, Zyphra's serving
                  layout). Token anchors carry no loss; a mask anchor's label is x_{kb-1}, counted only with
                  ``anchor_loss`` (Zyphra's serving discards slot 0)

  loss = (alpha * CE_AR + CE_diff) / (1 + alpha), each CE a mean over its valid tokens.

Blocks sit at fixed row indices, owned by the document of their first index, or restart at each document
(``block_start``, ``zaya.layouts``). The mask comes from the ``Layout`` ids (O(T) per row), never a dense
[T, T] array. ``mode="ar"`` forwards only the clean sequence with the AR loss (pretraining / the AR baseline);
``ar_eval`` is that loss for any model.

Batches: {'tokens' int32 [B, S], 'doc_ids' int32 [B, S] (-1 = padding; each document one contiguous run with its
own id, as ``zaya.data.packing`` makes them), 'loss_mask' float32 [B, S] (optional)}. Valid labels come from
doc_ids; with ``prompt_masking`` a token with loss_mask 0 is also no label of either loss (AR: as x_{i+1}, the
target of clean token i; diffusion: as x_i). Without it loss_mask is ignored.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from zaya import layouts
from zaya.model.transformer import Impl, hidden, logits_from_hidden

MASKINGS = ("full", "random")
BLOCK_STARTS = ("row", "document")
MODES = ("tidar", "ar")
ANCHORS = ("none", "token", "mask")


@dataclasses.dataclass(frozen=True)
class TidarOptions:
    """Static objective options (hashable: pass as a static argument under jit).

    block_size      b, tokens per diffusion block
    alpha           AR weight: loss = (alpha * CE_AR + CE_diff) / (1 + alpha)
    anchor          "none": blocks [mask x b]; "token": K+1 blocks [x_{kb-1}, mask x b] (Zyphra's two-forward
                    drafting); "mask": K+1 blocks [mask at kb-1, mask x b] (the serving layout's anchor mask at the
                    bonus position)
    anchor_loss     (anchor "mask") the anchor mask also predicts x_{kb-1}: its CE joins the diffusion mean with
                    weight 1 (off by default: Zyphra's serving discards slot 0)
    masking         "full": every diffusion token is a mask (TiDAR); "random": each is a mask with probability
                    ``mask_ratio``, otherwise the clean token itself, which carries no loss (ablation)
    position_gamma  diffusion weight gamma**k for in-block position k, normalised to average 1 over a block
    doc_masking     packed documents never see each other; positions and blocks restart per document
    prompt_masking  tokens with loss_mask == 0 (prompts) are excluded as labels of both losses (SFT)
    block_causal    causal attention inside diffusion blocks
    block_start     "row": blocks sit at fixed row indices (kb .. kb+b-1), so a packed document's blocks start at
                    every in-document offset, as the decode-time drafting block does (it starts wherever the
                    committed text ends); "document": blocks restart at each document start (block k covers
                    in-document positions kb .. kb+b-1: a packed document trains exactly as it would alone, but
                    short documents only ever see blocks at positions 0, b, 2b, ...; a document's last block is
                    cut at its end, so the mask count tells its length). Both hold for the anchored layouts.
    mode            "tidar" (dual loss) or "ar" (AR loss on the clean sequence only, T = S)
    ce_chunk        > 0: compute logits and CE in chunks of this many tokens (rematerialised in the backward),
                    so the [B, T, V] fp32 logits never exist at once
    """
    block_size: int = 16
    alpha: float = 1.0
    anchor: str = "none"
    anchor_loss: bool = False
    masking: str = "full"
    mask_ratio: float = 0.5
    position_gamma: float | None = None
    doc_masking: bool = True
    prompt_masking: bool = False
    block_causal: bool = False
    block_start: str = "row"
    mode: str = "tidar"
    ce_chunk: int = 0

    def __post_init__(self):
        def bad(field, want):
            raise ValueError(f"TidarOptions.{field}={getattr(self, field)!r}: expected {want}")
        is_int = lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, bool)
        is_num = lambda v: isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
        if not is_int(self.block_size) or self.block_size < 1:
            bad("block_size", "a positive int")
        if not is_num(self.alpha) or not np.isfinite(self.alpha) or self.alpha < 0:
            bad("alpha", "a finite number >= 0")
        if not isinstance(self.anchor, str) or self.anchor not in ANCHORS:
            bad("anchor", f"one of {ANCHORS}")
        for f in ("anchor_loss", "doc_masking", "prompt_masking", "block_causal"):
            if not isinstance(getattr(self, f), (bool, np.bool_)):
                bad(f, "a bool")
        if self.masking not in MASKINGS:
            bad("masking", f"one of {MASKINGS}")
        if not is_num(self.mask_ratio) or not 0 < self.mask_ratio <= 1:
            bad("mask_ratio", "a number in (0, 1]")
        if self.position_gamma is not None and (not is_num(self.position_gamma) or not
                                                np.isfinite(self.position_gamma) or self.position_gamma <= 0):
            bad("position_gamma", "None or a finite number > 0")
        if self.mode not in MODES:
            bad("mode", f"one of {MODES}")
        if self.block_start not in BLOCK_STARTS:
            bad("block_start", f"one of {BLOCK_STARTS}")
        if self.anchor_loss and self.anchor != "mask":
            bad("anchor_loss", "False unless anchor='mask' (a token anchor's label would be its own input)")
        if not is_int(self.ce_chunk) or self.ce_chunk < 0:
            bad("ce_chunk", "an int >= 0 (0 = no chunking)")


def position_weights(opts: TidarOptions) -> np.ndarray:
    """[b] diffusion loss weight per in-block position: gamma**k normalised to mean 1 (ones without gamma)."""
    k = np.arange(opts.block_size)
    if opts.position_gamma is None:
        return np.ones(opts.block_size, np.float32)
    w = float(opts.position_gamma) ** k
    return (w / w.mean()).astype(np.float32)


def build(tokens_BS, doc_ids_BS, loss_mask_BS, opts: TidarOptions, mask_id: int, rng=None) -> dict:
    """The model inputs, layout, labels and weights of one batch (traceable).

    Returns:
      inputs [B, T] int32, layout (Layout over the T tokens): T = S (mode "ar"), 2S, or S + (S/b)(b+1) (anchor)
      ar_labels, ar_weights [B, S]      label x_{i+1} of clean token i; weight 1 where it exists (same document,
                                        not padding, and a response token with prompt_masking), else 0
      (mode "tidar" only)
      diff_index [S] int32              index in ``inputs`` of the diffusion token that reconstructs x_i
      diff_labels, diff_valid [B, S]    label x_i; 1 where it carries loss (masked, not padding, not prompt)
      diff_weights [B, S]               diff_valid * position weight (the loss is sum(w * ce) / sum(valid))
      diff_block_pos [B, S] int32       in-block position k of token i (0 .. b-1)
      masked [B, S] bool                the diffusion token of i is a mask (all True for masking="full")
      (anchored only)
      anchor_index [S/b] int32          index in ``inputs`` of chunk g's anchor slot
      anchor_labels, anchor_valid [B, S/b]  label x_{kb-1} of the anchor; 1 where the slot holds an anchor whose
                                        label is a response token (it carries loss only with ``anchor_loss``)
    """
    x = jnp.asarray(tokens_BS, jnp.int32)
    B, S = x.shape
    doc = jnp.asarray(doc_ids_BS, jnp.int32)
    if not opts.doc_masking:
        doc = jnp.where(doc >= 0, 0, -1)
    valid = doc >= 0
    resp = valid
    if opts.prompt_masking:
        if loss_mask_BS is None:
            raise ValueError("prompt_masking needs the batch's 'loss_mask'")
        resp = valid & (jnp.asarray(loss_mask_BS) > 0)
    nxt = lambda a, fill: jnp.concatenate([a[:, 1:], jnp.full((B, 1), fill, a.dtype)], 1)
    ar_w = valid & (nxt(doc, -1) == doc) & nxt(resp, False)
    out = dict(ar_labels=nxt(x, 0), ar_weights=ar_w.astype(jnp.float32))
    if opts.mode == "ar":
        return dict(out, inputs=x, layout=layouts.packed(doc))

    b = opts.block_size
    masked = jnp.ones((B, S), bool)
    if opts.masking == "random":
        if rng is None:
            raise ValueError("masking='random' needs an rng key")
        masked = jax.random.bernoulli(rng, opts.mask_ratio, (B, S))
    half = jnp.where(masked, jnp.int32(mask_id), x)
    anchored, aligned = opts.anchor != "none", opts.block_start == "document"
    if anchored:
        layout = layouts.training_anchored(doc, b, opts.block_causal, doc_aligned=aligned)
        src = layouts.anchor_sources(doc, b, doc_aligned=aligned)
        take = lambda a: jnp.take_along_axis(a, jnp.maximum(src, 0), 1)
        has = src >= 0
        a_labels = jnp.where(has, take(x), 0)
        anchors = jnp.where(has & (opts.anchor == "token"), a_labels, jnp.int32(mask_id))
        half = jnp.concatenate([anchors[:, :, None], half.reshape(B, S // b, b)], 2).reshape(B, -1)
        index = layouts.anchored_mask_index(S, b)
        out.update(anchor_index=jnp.asarray(S + np.arange(S // b) * (b + 1), jnp.int32), anchor_labels=a_labels,
                   anchor_valid=(has & take(resp)).astype(jnp.float32))
    else:
        layout = layouts.training(doc, b, opts.block_causal, doc_aligned=aligned)
        index = S + np.arange(S)
    if aligned:
        block_pos = layout.pos[:, :S] % b  # blocks restart at document starts
    else:
        block_pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32) % b, (B, S))
    diff_valid = resp & masked
    if not aligned:  # masks standing in for another document's tokens
        owner, foreign = layouts.row_block_owner(doc, b)
        diff_valid = diff_valid & ~foreign
        if anchored:  # an anchored chunk owned by padding is padding
            diff_valid = diff_valid & (owner >= 0)
    diff_valid = diff_valid.astype(jnp.float32)
    diff_weights = diff_valid * jnp.asarray(position_weights(opts))[block_pos]
    return dict(out, inputs=jnp.concatenate([x, half], 1), layout=layout, diff_index=jnp.asarray(index, jnp.int32),
                diff_labels=x, diff_valid=diff_valid, diff_weights=diff_weights, diff_block_pos=block_pos,
                masked=masked)


def token_ce(params, h_BTD, labels_BT, chunk: int = 0):
    """(CE [B, T] fp32 via log_softmax, argmax [B, T]) of the tied-head logits; chunked over T when chunk > 0."""
    def f(h, y):
        logits = logits_from_hidden(params, h)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        return -jnp.take_along_axis(logp, y[..., None], -1)[..., 0], jnp.argmax(logits, -1).astype(jnp.int32)
    B, T, D = h_BTD.shape
    if chunk <= 0 or T <= chunk:
        return f(h_BTD, labels_BT)
    n = -(-T // chunk)
    pad = n * chunk - T
    hs = jnp.pad(h_BTD, ((0, 0), (0, pad), (0, 0))).reshape(B, n, chunk, D).swapaxes(0, 1)
    ys = jnp.pad(labels_BT, ((0, 0), (0, pad))).reshape(B, n, chunk).swapaxes(0, 1)
    ce, pred = jax.lax.map(lambda a: jax.checkpoint(f)(*a), (hs, ys))
    back = lambda a: a.swapaxes(0, 1).reshape(B, n * chunk)[:, :T]
    return back(ce), back(pred)


def _mean(x, w):
    return (x * w).sum() / jnp.maximum(w.sum(), 1.0)


def diffusion_metrics(bt: dict, opts: TidarOptions, ce_BS, pred_BS, ar_pred_BS, anchor=None) -> dict:
    """Diffusion loss and metrics from the per-token CE / argmax of the diffusion tokens ([B, S], clean index
    order) and the AR argmax at the clean tokens ([B, S]); ``bt`` is ``build``'s output. ``anchor`` (with
    ``anchor_loss``): (CE, argmax) [B, S/b] of the anchor masks, whose CE joins the diffusion mean."""
    v, w, y = bt["diff_valid"], bt["diff_weights"], bt["diff_labels"]
    B, S = y.shape
    hit = (pred_BS == y).astype(jnp.float32)
    onehot = jax.nn.one_hot(bt["diff_block_pos"], opts.block_size, dtype=jnp.float32) * v[..., None]  # [B, S, b]
    per_pos_n = onehot.sum((0, 1))
    # the first slot of a block at position kb > 0 and the AR logit at kb - 1 both predict x_kb from x_<kb
    # (blocks at a document's position 0 see no context: they are left out of the same-position comparison)
    first = v * (bt["diff_block_pos"] == 0) * (bt["layout"].pos[:, :S] > 0)
    ar_prev = jnp.concatenate([jnp.full((B, 1), -1, jnp.int32), ar_pred_BS[:, :-1]], 1)
    valid_clean = (bt["layout"].seg[:, :S] >= 0).astype(jnp.float32)
    ce_sum, n = (ce_BS * w).sum(), v.sum()
    m = dict(diff_acc=_mean(hit, v), n_diff_tokens=n, diff_count_per_pos=per_pos_n,
             diff_acc_per_pos=(onehot * hit[..., None]).sum((0, 1)) / jnp.maximum(per_pos_n, 1.0),
             first_slot_agree=_mean((pred_BS == ar_prev).astype(jnp.float32), first),
             diff_acc_first_ctx=_mean(hit, first), ar_acc_first_ctx=_mean((ar_prev == y).astype(jnp.float32), first),
             mask_fraction=_mean(bt["masked"].astype(jnp.float32), valid_clean))
    if anchor is not None:
        ce_a, pred_a = anchor
        av = bt["anchor_valid"]
        ce_sum, n = ce_sum + (ce_a * av).sum(), n + av.sum()
        m.update(anchor_acc=_mean((pred_a == bt["anchor_labels"]).astype(jnp.float32), av), n_anchor_tokens=av.sum())
    return dict(m, diff_loss=ce_sum / jnp.maximum(n, 1.0))


def loss_fn(params, config, batch: dict, opts: TidarOptions = TidarOptions(), rng=None, impl: Impl = Impl()):
    """(scalar loss, metrics) of one batch (see module doc). config and opts are static under jit.

    Metrics (all arrays, fixed structure for a given opts, so they average across microbatches):
      loss, ar_loss, ar_acc, n_tokens (valid clean tokens), n_ar_tokens, expert_counts [L, E+1] (all forwarded
      tokens, padding and masks included; class E = MoD skip), skip_rate [L]; under expert parallelism
      moe_drop_rate (routed tokens past the capacity / routed tokens, all layers; 0 when dropless);
      mode "tidar" also: diff_loss, diff_acc, diff_acc_per_pos [b] (accuracy per in-block position: the
      acceptance proxy), diff_count_per_pos [b], n_diff_tokens, mask_fraction (masked / valid clean tokens),
      first_slot_agree (block-first-slot argmax == AR argmax for the same target position, over blocks with a
      previous token); on those same blocks (first token x_kb with a clean token of its document before it, a
      label of both losses), diff_acc_first_ctx (the block's first mask predicts x_kb) and ar_acc_first_ctx (the
      AR argmax at kb-1 is x_kb): the first-slot draft against the verifier on the same targets and contexts
      (diff_acc_per_pos[0] also counts the context-free blocks at position 0; ar_acc is over all tokens);
      with anchor_loss also anchor_acc and n_anchor_tokens (anchor masks predicting x_{kb-1}; diff_loss is the
      mean CE over masks and anchors, n_diff_tokens counts the masks only).
    """
    tokens = jnp.asarray(batch["tokens"], jnp.int32)
    B, S = tokens.shape
    bt = build(tokens, batch["doc_ids"], batch.get("loss_mask"), opts, config.mask_token_id, rng)
    h, _, stats = hidden(params, config, bt["inputs"], bt["layout"], impl=impl)
    ce_ar, pred_ar = token_ce(params, h[:, :S], bt["ar_labels"], opts.ce_chunk)
    w_ar = bt["ar_weights"]
    ar_loss = _mean(ce_ar, w_ar)
    counts = stats["counts"]
    m = dict(ar_loss=ar_loss, ar_acc=_mean((pred_ar == bt["ar_labels"]).astype(jnp.float32), w_ar),
             n_ar_tokens=w_ar.sum(), n_tokens=(bt["layout"].seg[:, :S] >= 0).sum().astype(jnp.float32),
             expert_counts=counts.astype(jnp.float32),
             skip_rate=counts[:, -1] / jnp.maximum(counts.sum(-1), 1))
    if "dropped" in stats:  # expert parallelism with a capacity factor: fraction of routed tokens dropped
        m["moe_drop_rate"] = stats["dropped"].sum() / jnp.maximum(counts[:, :-1].sum(), 1)
    if opts.mode == "ar":
        return ar_loss, dict(m, loss=ar_loss)

    h_diff = h[:, S:] if opts.anchor == "none" else jnp.take(h, bt["diff_index"], axis=1)
    ce_d, pred_d = token_ce(params, h_diff, bt["diff_labels"], opts.ce_chunk)
    anchor = None
    if opts.anchor_loss:
        anchor = token_ce(params, jnp.take(h, bt["anchor_index"], axis=1), bt["anchor_labels"], opts.ce_chunk)
    dm = diffusion_metrics(bt, opts, ce_d, pred_d, pred_ar, anchor)
    loss = (opts.alpha * ar_loss + dm["diff_loss"]) / (1.0 + opts.alpha)
    m.update(dm, loss=loss)
    return loss, m


def ar_eval(params, config, batch: dict, doc_masking: bool = True, prompt_masking: bool = False,
            impl: Impl = Impl()):
    """(AR validation loss, metrics) of any model on the clean sequence: mean next-token CE over valid labels."""
    opts = TidarOptions(mode="ar", doc_masking=doc_masking, prompt_masking=prompt_masking)
    return loss_fn(params, config, batch, opts, None, impl)

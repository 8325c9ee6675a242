"""Optimizer pieces: schedule values (warmup, cosine, WSD), weight-decay and frozen masks, router balancing."""
import math

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from zaya.model.params import param_shapes
from zaya.config import preset
from zaya.train import optim
from zaya.train.step import balance_router_bias, split_microbatches


def _o(**kw):
    d = dict(lr=1.0, warmup_steps=2, schedule="cosine", min_lr_ratio=0.1, decay_fraction=0.2, decay_shape="linear",
             b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0, decay_embeddings=False)
    d.update(kw)
    return mlc.ConfigDict(d)


def _lrs(o, total):
    s = optim.lr_schedule(o, total)
    return np.array([float(s(i)) for i in range(total)])


def test_cosine_schedule_values():
    lr = _lrs(_o(schedule="cosine"), 10)
    np.testing.assert_allclose(lr[:2], [0.5, 1.0], rtol=1e-6)            # linear warmup, first update not wasted
    t = (np.arange(2, 10) - 2 + 1) / 8
    np.testing.assert_allclose(lr[2:], 0.1 + 0.9 * 0.5 * (1 + np.cos(math.pi * t)), rtol=1e-5)
    assert lr[-1] == pytest.approx(0.1)                                   # reaches the floor at the last step
    assert np.all(np.diff(lr[1:]) < 0)


@pytest.mark.parametrize("shape,expect8", [("linear", 0.55), ("sqrt", 0.1 + 0.9 * (1 - math.sqrt(0.5)))])
def test_wsd_schedule_values(shape, expect8):
    lr = _lrs(_o(schedule="wsd", decay_fraction=0.2, decay_shape=shape), 10)
    np.testing.assert_allclose(lr[:2], [0.5, 1.0], rtol=1e-6)
    np.testing.assert_allclose(lr[2:8], 1.0, rtol=1e-6)                    # stable phase
    assert lr[8] == pytest.approx(expect8, rel=1e-5)                      # decay over the last 20% (2 steps)
    assert lr[9] == pytest.approx(0.1, rel=1e-5)


def test_constant_schedule_and_bad_name():
    np.testing.assert_allclose(_lrs(_o(schedule="constant", warmup_steps=0), 5), 1.0)
    with pytest.raises(ValueError, match="schedule"):
        optim.lr_schedule(_o(schedule="linear"), 10)


def _names(mask):
    flat = jax.tree_util.tree_flatten_with_path(mask)[0]
    return {"/".join(str(k.key) for k in p) for p, v in flat if v}


def test_weight_decay_mask_excludes_norms_biases_scales():
    shapes = jax.tree.map(lambda s: np.zeros(()), param_shapes(preset("tiny")), is_leaf=lambda x: isinstance(x, tuple))
    decayed = _names(optim.decay_mask(shapes))
    assert decayed == {"layers/" + n for n in ("q", "k", "v_cur", "v_del", "o", "conv1_w", "conv2_w")} | {
        "layers/router/" + n for n in ("down_w", "fc1_w", "fc2_w", "out_w")} | {"layers/experts/gate_up",
                                                                                 "layers/experts/down"}
    for n in ("final_norm", "in_scale", "in_bias", "layers/attn_norm", "layers/mlp_norm", "layers/router/norm",
              "layers/attn_res/hs", "layers/mlp_res/rb", "layers/router/bias", "layers/temp", "embed"):
        assert n not in decayed
    assert "embed" in _names(optim.decay_mask(shapes, decay_embeddings=True))
    assert _names(optim.frozen_mask(shapes)) == {"layers/router/bias"}


def test_optimizer_decays_only_matrices_and_freezes_router_bias():
    params = {"embed": jnp.ones((4, 2)), "final_norm": jnp.ones(2), "layers": {
        "q": jnp.ones((1, 2, 2)), "attn_norm": jnp.ones((1, 2)), "conv1_b": jnp.ones((1, 3)),
        "router": {"bias": jnp.full((1, 3), -1.0), "down_w": jnp.ones((1, 2, 2))}}}
    tx, _ = optim.make_optimizer(_o(schedule="constant", warmup_steps=0, lr=0.5), 10, params)
    state = tx.init(params)
    zero = jax.tree.map(jnp.zeros_like, params)
    upd, _ = tx.update(zero, state, params)  # zero grads: the whole update is the decoupled weight decay
    new = jax.tree.map(lambda p, u: p + u, params, upd)
    np.testing.assert_allclose(new["layers"]["q"], 1 - 0.5 * 0.1, rtol=1e-6)
    np.testing.assert_allclose(new["layers"]["router"]["down_w"], 1 - 0.5 * 0.1, rtol=1e-6)
    for leaf in (new["embed"], new["final_norm"], new["layers"]["attn_norm"], new["layers"]["conv1_b"]):
        np.testing.assert_array_equal(leaf, 1.0)
    grads = jax.tree.map(jnp.ones_like, params)
    upd, _ = tx.update(grads, state, params)
    np.testing.assert_array_equal(upd["layers"]["router"]["bias"], 0.0)   # frozen even with a gradient
    assert float(jnp.abs(upd["final_norm"]).min()) > 0                     # norms still train


def test_router_balancing_moves_bias_towards_mean_load():
    params = {"layers": {"router": {"bias": jnp.zeros((2, 4))}}}
    counts = jnp.array([[10.0, 0.0, 2.0, 7.0], [3.0, 3.0, 3.0, 0.0]])  # last column: MoD skip
    b = np.asarray(balance_router_bias(params, counts, 0.1)["layers"]["router"]["bias"])
    assert b[0, 0] < 0 < b[0, 1]          # over-loaded expert down, under-loaded up
    np.testing.assert_array_equal(b[:, 3], 0.0)                      # skip class untouched
    np.testing.assert_allclose(b[:, :3].sum(-1), 0.0, atol=1e-7)     # centred
    assert balance_router_bias(params, counts, 0.0) is params


def test_split_microbatches_is_strided():
    x = {"tokens": np.arange(8)[:, None] * np.ones((1, 3), int)}
    mb = split_microbatches(x, 2)["tokens"]
    assert mb.shape == (2, 4, 3)
    np.testing.assert_array_equal(mb[0, :, 0], [0, 2, 4, 6])
    with pytest.raises(ValueError, match="microbatches"):
        split_microbatches(x, 3)

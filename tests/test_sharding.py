"""zaya.sharding on 8 simulated CPU devices: specs from the rules, and sharded logits / decoding equal single-device."""
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from zaya import config as config_lib
from zaya import layouts
from zaya import sharding
from zaya.model import Impl, apply, init, init_cache

CFG = config_lib.preset("tiny", num_experts=8)  # E=8 splits over expert=4; H*d=64, K*d=32, D=64, F=32, V=512
B, T = 8, 8
FAST = {"xla_backend_optimization_level": 0}  # halves XLA:CPU compile time; SPMD partitioning is unaffected
MESHES = {"dp2_fsdp2_tp2": dict(data=2, fsdp=2, tensor=2), "fsdp8": dict(fsdp=8), "tp2_ep4": dict(tensor=2, expert=4)}


def _compiled(fn, *args):
    """``fn`` (a jax.jit) compiled for ``args`` with FAST options; call the result with the same (non-static) args."""
    return fn.lower(*args).compile(FAST)


def _randomize_np(params, seed, scale=0.3):
    """conftest.randomize with a numpy generator: the same perturbation of every leaf, but no per-shape RNG
    compiles (those dominate this file's runtime on CPU)."""
    rng = np.random.default_rng(seed)
    def one(x):
        x = np.asarray(x, np.float32)
        return jnp.asarray(x + rng.standard_normal(x.shape, np.float32) * scale * (np.abs(x).mean() + 0.05))
    return jax.tree.map(one, params)


@pytest.fixture(scope="module")
def params():
    key = jax.random.key(0, impl="rbg")
    return _randomize_np(_compiled(jax.jit(init, static_argnums=0), CFG, key)(key), 1)


@pytest.fixture(scope="module")
def tokens():
    return jax.random.randint(jax.random.key(2), (B, T), 0, CFG.vocab_size, jnp.int32)


@pytest.fixture(scope="module")
def reference(params, tokens):
    """Single-device logits per MoE impl (plain jit, no sharding code involved)."""
    f = lambda impl: jax.jit(lambda p, t: apply(p, CFG, t, layouts.causal(B, T), None, Impl(moe=impl))[0])
    return {impl: np.asarray(_compiled(f(impl), params, tokens)(params, tokens)) for impl in ("ragged", "dense")}


def test_make_mesh():
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    assert mesh.axis_names == ("data", "fsdp", "tensor", "expert")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2, "expert": 1}
    assert sharding.make_mesh(devices=jax.devices()[:1]).size == 1
    with pytest.raises(ValueError, match="must equal the device count"):
        sharding.make_mesh(data=2, tensor=2)


def test_logical_to_spec():
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    spec = lambda axes, shape=None, rules=None: sharding.logical_to_spec(axes, rules, mesh, shape)
    assert spec(("layers", "embed", "heads"), (3, 64, 64)) == P(None, "fsdp", "tensor")
    assert spec(("batch", None), (8, 5)) == P(("data", "fsdp"))
    assert spec(("batch",), (2,)) == P("data")  # fsdp would not divide 2 more ways: dropped
    assert spec(("batch",), (3,)) == P()
    assert spec(("vocab", "embed"), (7, 64)) == P(None, "fsdp")  # 7 rows do not split over tensor=2
    assert spec(("heads", "mlp"), (4, 4)) == P("tensor")  # a mesh axis is used once per spec
    assert spec(("experts", "unknown_axis")) == P()  # expert has size 1 here; unknown names replicate
    assert spec(("embed",), (64,), [("embed", ["data", "fsdp"])]) == P(("data", "fsdp"))  # lists (from configs)
    assert spec(("embed",), (64,), {"embed": None}) == P()  # a mapping works too
    with pytest.raises(ValueError, match="names mesh axis 'model'"):
        spec(("embed",), (64,), (("embed", "model"),))


def test_params_are_sharded(params):
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    sp = sharding.shard_params(params, CFG, mesh)
    lay = sp["layers"]
    assert sp["embed"].sharding.spec == P("tensor", "fsdp")
    assert lay["q"].sharding.spec == P(None, "fsdp", "tensor")
    assert lay["o"].sharding.spec == P(None, "tensor", "fsdp")
    assert lay["experts"]["gate_up"].sharding.spec == P(None, None, "fsdp", "tensor")
    assert lay["router"]["fc1_w"].sharding.spec == P()
    # each device holds a quarter of q (fsdp x tensor), the values are untouched
    assert lay["q"].addressable_shards[0].data.shape == (CFG.num_layers, 32, 32)
    np.testing.assert_array_equal(np.asarray(lay["q"]), np.asarray(params["layers"]["q"]))
    ep = sharding.shard_params(params, CFG, sharding.make_mesh(tensor=2, expert=4))["layers"]["experts"]
    assert ep["gate_up"].sharding.spec == P(None, "expert", None, "tensor")
    assert ep["down"].addressable_shards[0].data.shape == (CFG.num_layers, 2, 16, CFG.hidden_size)
    tree = jax.tree.structure(sharding.param_shardings(CFG, mesh))
    assert tree == jax.tree.structure(params)


@pytest.mark.parametrize("moe", ["ragged", "dense"])
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_sharded_logits_match(params, tokens, reference, mesh_name, moe):
    mesh = sharding.make_mesh(**MESHES[mesh_name])
    fn = sharding.sharded_logits_fn(CFG, mesh, impl=Impl(moe=moe), batch=B)
    sp = sharding.shard_params(params, CFG, mesh)
    compiled = _compiled(fn, sp, tokens)
    out = compiled(sp, tokens)
    if mesh_name == "fsdp8":  # the batch is split: each device computes the logits of its own B*T/8 tokens only
        dots = re.findall(r"= f32\[([\d,]+)\]\S* dot\(", compiled.as_text())
        head = [math.prod(map(int, d.split(","))) for d in dots if d.endswith(f",{CFG.vocab_size}")]
        assert head and all(n == B * T // 8 * CFG.vocab_size for n in head), dots
    assert out.sharding.spec[0] == sharding.batch_sharding(mesh, batch=B).spec[0]
    np.testing.assert_allclose(np.asarray(out), reference[moe], atol=1e-5, rtol=1e-5)


def test_cache_shardings_and_decoding_on_a_mesh(params, tokens, reference):
    """The decode cache lies rows over data x fsdp, kv heads over tensor; zaya.generate on Model.mesh (which places
    its cache so) prefills 6 tokens and emits the reference's greedy next token (tests/test_decode.py checks whole
    decodes against one device)."""
    import zaya
    from zaya.api import Model
    Bc, S, prompt = 4, 16, T - 2
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    cache0 = init_cache(CFG, Bc, S)
    cs = sharding.cache_shardings(mesh, cache0)
    assert cs.k.spec == P(None, ("data", "fsdp"), None, "tensor")  # rows over data x fsdp, K=2 kv heads over tensor
    assert cs.xqk.spec == P(None, ("data", "fsdp")) and cs.length.spec == P(("data", "fsdp"))
    assert sharding.shard_cache(cache0, mesh).k.sharding.spec == cs.k.spec
    model = Model(CFG, sharding.shard_params(params, CFG, mesh), Impl(moe="ragged"), mesh=mesh)
    res = zaya.generate(model, np.asarray(tokens[:Bc, :prompt]), max_new_tokens=1)
    assert [t[0] for t in res.tokens] == np.asarray(reference["ragged"][:Bc, prompt - 1]).argmax(-1).tolist()


def test_generate_on_a_mesh_never_picks_the_unpartitioned_kernel(params, tokens, monkeypatch):
    """On a GPU, "auto" picks the Pallas kernels for decode shapes; XLA cannot partition their custom calls (it would
    gather the sharded cache or expert weights), so on a multi-device mesh zaya.generate and Model.logits run the
    XLA paths (sharding.mesh_impl: attention "xla", MoE "ragged")."""
    import zaya
    from zaya.api import Model
    from zaya.model import attention, moe

    def refuse(*a):
        raise AssertionError("a Pallas kernel was traced on a multi-device mesh")
    monkeypatch.setattr(attention.platform, "backend", lambda: "cuda")
    monkeypatch.setitem(attention.IMPLS, "pallas", refuse)
    monkeypatch.setitem(moe.EXPERT_IMPLS, "pallas", refuse)
    assert attention.auto_choice(1, 64, cached=True, G=2, d=16) == "pallas"  # what a GPU would run off the mesh
    assert moe.auto_impl(4, CFG.num_experts) == "pallas"
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    model = Model(CFG, sharding.shard_params(params, CFG, mesh), Impl(), mesh=mesh)
    res = zaya.generate(model, np.asarray(tokens[:4, :6]), max_new_tokens=3)
    assert all(len(t) == 3 for t in res.tokens)
    assert model.logits(np.asarray(tokens[:4, :6])).shape[:2] == (4, 6)
    assert sharding.mesh_impl(Impl(attention="pallas"), mesh).attention == "pallas"  # explicit choices are kept


def test_load_with_mesh_gives_same_logits(fixtures_dir):
    """The public API: zaya.load(path, mesh=...) places params on the mesh and Model.logits runs sharded."""
    import os

    import zaya
    from zaya.sharding import make_mesh
    d = os.path.join(fixtures_dir, "native")
    ids = np.load(os.path.join(d, "input_ids.npy"))
    ids = np.concatenate([ids, ids[:, ::-1]], 0)
    ref = zaya.load(d).logits(ids)
    m = zaya.load(d, mesh=make_mesh(data=2, tensor=2, expert=2))
    assert len(m.params["layers"]["q"].sharding.device_set) == 8
    np.testing.assert_allclose(m.logits(ids), ref, atol=1e-5)

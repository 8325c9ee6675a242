"""The Pallas grouped-matmul kernel (MoE impl ``pallas``): interpret mode on CPU against its jnp reference, the
shape limits, and its Triton lowering for CUDA and ROCm (lowered here without a GPU; compiling and running it needs
one). The MoE impl built on it is compared with the dense reference in tests/test_moe.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zaya.config import preset
from zaya.kernels import grouped_matmul as gmm
from zaya.kernels import platform
from zaya.model import moe


def _operands(dtype, U=16, D=64, O=64, E=3, tile_expert=(0, 0, 2, -1)):
    key = jax.random.PRNGKey(0)
    te = jnp.asarray(tile_expert, jnp.int32)
    x = jax.random.normal(key, (len(tile_expert) * U, D)).astype(dtype)
    w = jax.random.normal(jax.random.fold_in(key, 1), (E, D, O)).astype(dtype)
    return x, w, te


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 1e-2)])
def test_grouped_matmul_equals_reference(dtype, tol):
    """Two steps over D (block_k 32 < D) and two column tiles (block_n 32 < O); tile 3 is unused (-1): zeros."""
    x, w, te = _operands(dtype)
    y = jax.jit(lambda x, w, te: gmm.grouped_matmul(x, w, te, block_n=32, block_k=32))(x, w, te)
    want = gmm.reference(x, w, te)
    assert y.dtype == jnp.float32 and y.shape == (64, 64)
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=tol, atol=tol * float(jnp.abs(want).max()))
    assert float(jnp.abs(y[48:]).max()) == 0.0


@pytest.mark.parametrize("kwargs,match", [
    (dict(U=8), "8 rows per tile.*power of two >= 16"),
    (dict(D=24), "D=24, O=64 not multiples of 16"),
    (dict(O=40), "D=64, O=40 not multiples of 16")])
def test_unsupported_shapes_raise(kwargs, match):
    x, w, te = _operands("float32", **kwargs)
    with pytest.raises(ValueError, match=f"grouped_matmul: {match}"):
        gmm.grouped_matmul(x, w, te)


def test_dtype_mismatch_raises():
    x, w, te = _operands("float32")
    with pytest.raises(ValueError, match="differ"):
        gmm.grouped_matmul(x, w.astype(jnp.bfloat16), te)


@pytest.mark.parametrize("n_tokens,E,want", [(1, 16, 16), (272, 16, 32), (4352, 16, 64), (33, 6, 16)])
def test_tile_rows(n_tokens, E, want):
    assert gmm.tile_rows(n_tokens, E) == want


@pytest.mark.parametrize("target,B,T,dtype", [("cuda", 16, 17, jnp.bfloat16), ("rocm", 1, 85, jnp.float32)])
def test_lowers_to_triton(monkeypatch, target, B, T, dtype):
    """Without a GPU: the MoE impl ``pallas`` at ZAYA1-8B geometry (D=2048, F=2048, E=16) lowers through Pallas'
    Triton backend for CUDA and ROCm (power-of-two blocks, dot tiles, explicit compiler params): two Triton calls,
    the up and the down matmul. Compiling the Triton IR and running it needs the device."""
    monkeypatch.setattr(platform, "backend", lambda: target)
    c = preset("tiny", hidden_size=2048, moe_intermediate_size=2048, num_experts=16, dtype=jnp.dtype(dtype).name)
    sd = lambda shape, dt=dtype: jax.ShapeDtypeStruct(shape, dt)
    p = {"gate_up": sd((16, 2048, 4096)), "down": sd((16, 2048, 2048))}
    args = (p, sd((B, T, 2048), jnp.float32), sd((B, T), jnp.int32), sd((B, T), jnp.float32))
    fn = lambda p, m, choice, gate: moe.get_impl("pallas")(p, c, m, choice, gate)
    # jax >= 0.12 asks the target device for its GPU info while lowering: an abstract device stands in for it
    dev = jax.sharding.AbstractDevice(device_kind={"cuda": "NVIDIA H200", "rocm": "gfx942"}[target],
                                      num_cores=132 if target == "cuda" else 304, platform=target)
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=dev)):
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=(target,)).as_text()
    assert text.count("xla.gpu.triton") == 2 and text.count('name = "grouped_matmul"') == 2
    assert f"num_stages = {1 if target == 'rocm' else 3}" in text

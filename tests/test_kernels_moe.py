"""The Pallas grouped-matmul kernel (MoE impl ``pallas``): interpret mode on CPU against its jnp reference, the
shape limits, and its Triton lowering for CUDA and ROCm (lowered here without a GPU; compiling and running it needs
one). The MoE impl built on it is compared with the dense reference in tests/test_moe.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zaya.kernels import grouped_matmul as gmm


def _operands(dtype, M=16, D=64, K=64, E=3, tile_expert=(0, 0, 2, -1)):
    key = jax.random.PRNGKey(0)
    te = jnp.asarray(tile_expert, jnp.int32)
    x = jax.random.normal(key, (len(tile_expert) * M, D)).astype(dtype)
    w = jax.random.normal(jax.random.fold_in(key, 1), (E, D, K)).astype(dtype)
    return x, w, te


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 1e-2)])
def test_grouped_matmul_equals_reference(dtype, tol):
    """Two K-steps (block_k 32 < D) and two column tiles (block_n 32 < K); tile 3 is unused (-1): zeros."""
    x, w, te = _operands(dtype)
    y = jax.jit(lambda x, w, te: gmm.grouped_matmul(x, w, te, block_n=32, block_k=32))(x, w, te)
    want = gmm.reference(x, w, te)
    assert y.dtype == jnp.float32 and y.shape == (64, 64)
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=tol, atol=tol * float(jnp.abs(want).max()))
    assert float(jnp.abs(y[48:]).max()) == 0.0


@pytest.mark.parametrize("kwargs,match", [
    (dict(M=8), "8 rows per tile.*power of two >= 16"),
    (dict(D=24), "D=24, K=64 not multiples of 16"),
    (dict(K=40), "D=64, K=40 not multiples of 16")])
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


@pytest.mark.parametrize("platform", ["cuda", "rocm"])
def test_lowers_to_triton(platform):
    """ZAYA1-8B decode shapes (D=2048, 2F=4096, E=16; 17 tokens: 16-row tiles) lower through Pallas' Triton path
    (power-of-two blocks, explicit compiler params) to one Triton custom call, without a GPU (jax.export)."""
    f = jax.jit(lambda x, w, te: gmm.grouped_matmul(x, w, te, interpret=False))
    n_tiles = 2 + 16 - 1
    args = (jax.ShapeDtypeStruct((n_tiles * 16, 2048), jnp.bfloat16),
            jax.ShapeDtypeStruct((16, 2048, 4096), jnp.bfloat16), jax.ShapeDtypeStruct((n_tiles,), jnp.int32))
    exp = jax.export.export(f, platforms=[platform], disabled_checks=[
        jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
    text = exp.mlir_module()
    assert text.count("__gpu$xla.gpu.triton") == 1 and 'name = "grouped_matmul"' in text
    assert f"grid_x = {n_tiles}" in text and "grid_y = 64" in text  # tiles x (4096 / 64) column tiles

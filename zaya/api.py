"""The public Python API: ``zaya.load`` and ``zaya.generate`` (notebooks and outside checks use exactly this)."""
from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from zaya import layouts
from zaya.config import ZayaConfig
from zaya.convert import checkpoint as ckpt
from zaya.convert.hf import load_hf
from zaya.model.params import cast
from zaya.model.transformer import INFERENCE, Impl, apply


@dataclasses.dataclass
class Model:
    config: ZayaConfig
    params: dict
    impl: Impl = INFERENCE
    tokenizer: str | None = None  # path of tokenizer.json, if the checkpoint has one
    mesh: object = None           # a jax Mesh: logits run sharded (batch over data/fsdp/expert, heads inside)
    rules: object = None          # logical-axis rules for the mesh (None: zaya.sharding.DEFAULT_RULES)

    def __post_init__(self):
        # Host (numpy) weights would be copied to the device again on every jitted call: once per decode step.
        self.params = jax.tree.map(lambda x: jax.device_put(x) if isinstance(x, np.ndarray) else x, self.params)

    def logits(self, tokens) -> np.ndarray:
        """tokens int [B, T] -> float32 logits [B, T, V] (a full causal forward, no cache)."""
        tokens = jnp.asarray(np.asarray(tokens), jnp.int32)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, length], got shape {tokens.shape}")
        if int(tokens.max()) >= self.config.vocab_size or int(tokens.min()) < 0:
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size})")
        if self.mesh is not None:
            fn = _sharded_logits_fn(self.config, self.mesh, self.rules, self.impl, tokens.shape[0])
            return np.asarray(fn(self.params, tokens))
        return np.asarray(_logits_fn(self.config, self.impl)(self.params, tokens))


@functools.lru_cache(maxsize=16)
def _sharded_logits_fn(cfg, mesh, rules, impl, batch):
    from zaya import sharding
    return sharding.sharded_logits_fn(cfg, mesh, rules, impl, batch=batch)


@functools.lru_cache(maxsize=16)
def _logits_fn(cfg: ZayaConfig, impl: Impl):
    @jax.jit
    def f(params, tokens):
        B, T = tokens.shape
        return apply(params, cfg, tokens, layouts.causal(B, T), None, impl)[0]
    return f


def load(path: str, dtype: str | None = "float32", mesh=None, rules=None, impl: Impl | None = None,
         progress: bool = False) -> Model:
    """Load a model from an HF checkpoint folder (native or legacy, single or sharded) or a ``zaya convert`` folder.

    dtype: the weight/matmul dtype ("float32", "bfloat16", "float16"; None keeps the stored dtype).
    mesh: optional jax Mesh; params are placed with the logical-axis rules (``zaya.sharding``).
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a folder (expected an HF checkpoint or a `zaya convert` output)")
    if ckpt.is_zaya_dir(path):
        shardings = None
        if mesh is not None:
            from zaya import sharding
            shardings = sharding.param_shardings(ckpt.read_config(path), mesh, rules)
        cfg, params = ckpt.load(path, shardings, dtype)
        tok = ckpt.tokenizer_path(path)
    else:
        cfg, params = load_hf(path, dtype or "auto", progress=progress)
        params = cast(params, cfg)
        if mesh is not None:
            from zaya import sharding
            params = jax.device_put(params, sharding.param_shardings(cfg, mesh, rules))
        tok = os.path.join(path, "tokenizer.json")
        tok = tok if os.path.exists(tok) else None
    return Model(cfg, params, impl or INFERENCE, tok, mesh, rules)

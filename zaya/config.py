"""The ZAYA1 model config: one frozen dataclass and presets. Reading and writing HF ``config.json`` files:
``zaya.convert.hf_config``."""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


class ConfigError(ValueError):
    """A config we refuse to load; the message names the field and says how to fix it."""


@dataclasses.dataclass(frozen=True)
class ZayaConfig:
    vocab_size: int = 262272
    hidden_size: int = 2048
    num_layers: int = 40
    num_q_heads: int = 8
    num_kv_heads: int = 2
    head_dim: int = 128
    num_experts: int = 16
    moe_intermediate_size: int = 2048
    router_hidden_size: int = 256
    rope_theta: float = 5e6
    partial_rotary_factor: float = 0.5
    rms_norm_eps: float = 1e-5
    router_norm_eps: float = 1e-5  # legacy `zaya` branch checkpoints use 1e-6
    max_position_embeddings: int = 131072
    bos_token_id: int = 2
    eos_token_id: int = 106
    pad_token_id: int = 0
    mask_token_id: int = 4  # TiDAR <mask> in the Gemma-3 vocabulary (Zyphra's DEFAULT_TIDAR_MASK_TOKEN_ID)
    dtype: str = "bfloat16"  # weights and matmuls; residual stream, norms, router softmax, logits are fp32

    def __post_init__(self):
        for f in ("vocab_size", "hidden_size", "num_layers", "num_q_heads", "num_kv_heads", "head_dim", "num_experts",
                  "moe_intermediate_size", "router_hidden_size", "max_position_embeddings"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise ConfigError(f"{f}={v!r} must be a positive integer")
        for f in ("rope_theta", "rms_norm_eps", "router_norm_eps"):
            if not getattr(self, f) > 0:
                raise ConfigError(f"{f}={getattr(self, f)!r} must be positive")
        if not 0 < self.partial_rotary_factor <= 1:
            raise ConfigError(f"partial_rotary_factor={self.partial_rotary_factor!r} must be in (0, 1]")
        if self.num_q_heads % self.num_kv_heads:
            raise ConfigError(f"num_q_heads={self.num_q_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if (self.num_kv_heads * self.head_dim) % 2:
            raise ConfigError("num_kv_heads * head_dim must be even (values are half current, half delayed)")
        rot = self.rotary_dim
        if rot % 2 or rot > self.head_dim:
            raise ConfigError(f"partial_rotary_factor={self.partial_rotary_factor} gives an odd rotary dim {rot}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype={self.dtype!r}; use float32, bfloat16 or float16")

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def conv_channels(self) -> int:
        return (self.num_q_heads + self.num_kv_heads) * self.head_dim

    @property
    def q_per_kv(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    def replace(self, **kw) -> "ZayaConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ZayaConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown ZayaConfig field(s) {unknown}; known: {sorted(names)}")
        return cls(**d)

    def num_params(self) -> int:
        """Parameters as a Hugging Face checkpoint counts them (``zaya.model.params.num_params``)."""
        from zaya.model.params import num_params  # params imports this module
        return num_params(self)


# --------------------------------------------------------------------------------------------------------------
# Presets.

PRESETS: dict[str, ZayaConfig] = {
    "zaya1-8b": ZayaConfig(),
    # ZAYA1-8B's width with 4 of its 40 layers: GPU benchmarks of per-layer costs without 17 GB of random weights.
    "zaya1-8b-4l": ZayaConfig(num_layers=4),
    "zaya1-base": ZayaConfig(rope_theta=1e6, max_position_embeddings=32768, eos_token_id=1, router_norm_eps=1e-6),
    # Test sizes: every term of the forward pass present, small enough for CPU tests.
    "tiny": ZayaConfig(vocab_size=512, hidden_size=64, num_layers=3, num_q_heads=4, num_kv_heads=2, head_dim=16,
                       num_experts=4, moe_intermediate_size=32, router_hidden_size=16, max_position_embeddings=512,
                       dtype="float32"),
    # ~100M parameters, for CPU benchmarks.
    "small-100m": ZayaConfig(vocab_size=32768, hidden_size=512, num_layers=12, num_q_heads=8, num_kv_heads=2,
                             head_dim=64, num_experts=8, moe_intermediate_size=512, router_hidden_size=64,
                             max_position_embeddings=4096, dtype="float32"),
}


def preset(name: str, **overrides: Any) -> ZayaConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)

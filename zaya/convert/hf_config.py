"""Readers and writer of Hugging Face ZAYA1 ``config.json`` files (native transformers layout and the legacy
``zaya`` branch layout) into / from ``ZayaConfig``.

``from_hf_config`` is strict (penzai-style): a key that would change the math and is not handled is an error that
names it, so a checkpoint we do not understand is refused instead of silently mis-loaded.
"""
from __future__ import annotations

import json

from zaya.config import ConfigError, ZayaConfig

# Keys that do not change the forward math (bookkeeping, generation defaults, training-only settings).
_HARMLESS = {
    "architectures", "auto_map", "dtype", "torch_dtype", "transformers_version", "initializer_range", "use_cache",
    "output_router_logits", "attention_dropout", "model_type", "_name_or_path", "name_or_path", "bos_token_id",
    "eos_token_id", "pad_token_id", "max_position_embeddings", "router_aux_loss_coef", "output_attentions",
    "output_hidden_states", "return_dict", "id2label", "label2id", "tokenizer_class", "problem_type",
    "chunk_size_feed_forward", "is_encoder_decoder", "tie_encoder_decoder", "finetuning_task", "_attn_implementation",
    "activation_func_fp8_input_store", "bias_activation_fusion", "residual_in_fp32",  # numerics only (we keep fp32)
    "num_hidden_layers",  # legacy: ignored (ZAYA1-base says 120); native: checked against layer_types
    "kv_channels", "mask_token_id",
}


def _require(cfg: dict, key: str, ok, expected: str):
    if key in cfg and not ok(cfg[key]):
        raise ConfigError(f"config field {key}={cfg[key]!r} is not supported (expected {expected}); "
                          "zaya refuses configs whose math it does not implement")


def _int(cfg: dict, key: str, value=None, positive: bool = True) -> int:
    """cfg[key] (or ``value``, an element of it) as an int; a missing, non-integer or (``positive``) non-positive
    value is a ConfigError naming the field."""
    if value is None:
        if key not in cfg or cfg[key] is None:
            raise ConfigError(f"config field {key!r} is missing; zaya needs it to know the model's shape")
        value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise ConfigError(f"config field {key}={value!r} must be an integer")
    if positive and value <= 0:
        raise ConfigError(f"config field {key}={value!r} must be positive")
    return int(value)


def _float(cfg: dict, key: str, default: float) -> float:
    v = cfg.get(key, default)
    if v is None:
        v = default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"config field {key}={v!r} must be a number")
    return float(v)


def _first_id(x, default):
    if x is None:
        return default
    return int(x[0] if isinstance(x, (list, tuple)) else x)


# Keys only the legacy (Zyphra fork) schemas have, and keys only the native (transformers 5.x) schema has.
_LEGACY_ONLY = {"zaya_layers", "ffn_hidden_size", "ffn_hidden_size_list", "zaya_mlp_expansion", "cca_num_q_heads",
                "num_query_groups", "num_query_groups_list", "moe_router_topk", "norm_epsilon", "zaya_use_eda",
                "zaya_use_mod", "activation_func", "gated_linear_unit", "add_bias_linear", "scale_residual_merge"}
_NATIVE_ONLY = {"layer_types", "rope_parameters", "moe_intermediate_size", "router_hidden_size",
                "num_experts_per_tok", "cca_time0", "cca_time1", "rms_norm_eps", "hidden_act"}


def is_legacy_config(cfg: dict) -> bool:
    """True for Zyphra-fork configs (per-layer-list or scalar schema); a config mixing both schemas is refused."""
    legacy, native = sorted(_LEGACY_ONLY & set(cfg)), sorted(_NATIVE_ONLY & set(cfg))
    if legacy and native:
        raise ConfigError(f"config.json mixes legacy field(s) {legacy} with native field(s) {native}; "
                          "use one schema (the native transformers-5.x `zaya` config or the Zyphra-fork one)")
    return bool(legacy)


def from_hf_config(cfg: dict | str, dtype: str | None = None) -> ZayaConfig:
    """Read a native (transformers >= 5.13) or legacy (Zyphra fork) ZAYA1 ``config.json`` (dict or path)."""
    if isinstance(cfg, str):
        with open(cfg) as f:
            try:
                cfg = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{f.name}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"config.json must be a JSON object, got {type(cfg).__name__}")
    mt = cfg.get("model_type")
    if mt != "zaya":
        raise ConfigError(f"model_type={mt!r}; zaya reads only model_type 'zaya' checkpoints (ZAYA1 family)")
    common = dict(
        vocab_size=_int(cfg, "vocab_size"), hidden_size=_int(cfg, "hidden_size"),
        max_position_embeddings=_int(cfg, "max_position_embeddings", cfg.get("max_position_embeddings") or 131072),
        bos_token_id=_first_id(cfg.get("bos_token_id"), 2), eos_token_id=_first_id(cfg.get("eos_token_id"), 106),
        pad_token_id=_first_id(cfg.get("pad_token_id"), 0), mask_token_id=_int(cfg, "mask_token_id", cfg.get("mask_token_id", 4), positive=False),
    )
    if dtype is not None:
        common["dtype"] = dtype
    _require(cfg, "attention_bias", lambda v: v is False, "false")
    _require(cfg, "lm_head_bias", lambda v: v is False, "false")
    _require(cfg, "tie_word_embeddings", lambda v: v is True, "true (tied lm_head)")
    _require(cfg, "sliding_window", lambda v: v is None, "null (no sliding-window layers)")
    _require(cfg, "attention_dropout", lambda v: v == 0, "0")
    return (_from_legacy if is_legacy_config(cfg) else _from_native)(cfg, common)


_NATIVE_KEYS = {"vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                "moe_intermediate_size", "num_experts", "num_experts_per_tok", "router_hidden_size", "cca_time0",
                "cca_time1", "hidden_act", "rms_norm_eps", "layer_types", "rope_parameters", "rope_theta",
                "partial_rotary_factor", "rope_scaling", "tie_word_embeddings", "lm_head_bias", "attention_bias",
                "sliding_window"}


def _check_unknown(cfg: dict, known: set):
    unknown = sorted(set(cfg) - known - _HARMLESS)
    if unknown:
        raise ConfigError(f"config field(s) {unknown} are not understood by zaya; they may change the model's math. "
                          "Remove them if they are bookkeeping, or add support before loading this checkpoint")


def _from_native(cfg: dict, common: dict) -> ZayaConfig:
    _check_unknown(cfg, _NATIVE_KEYS)
    _require(cfg, "num_experts_per_tok", lambda v: v == 1, "1 (top-1 routing)")
    _require(cfg, "hidden_act", lambda v: v == "silu", "'silu' (SwiGLU experts)")
    _require(cfg, "cca_time0", lambda v: v == 2, "2")
    _require(cfg, "cca_time1", lambda v: v == 2, "2")
    _require(cfg, "rope_scaling", lambda v: not v, "null (no RoPE scaling)")
    layer_types = cfg.get("layer_types")
    if layer_types is None:
        layer_types = ["hybrid"] * _int(cfg, "num_hidden_layers")
    if not isinstance(layer_types, list) or not layer_types:
        raise ConfigError(f"layer_types={layer_types!r} must be a non-empty list of 'hybrid'")
    bad = sorted({str(t) for t in layer_types} - {"hybrid"})
    if bad:
        raise ConfigError(f"layer_types contains {bad}; only 'hybrid' (full CCA attention) layers are supported "
                          "(no sliding-window layers)")
    if "num_hidden_layers" in cfg and _int(cfg, "num_hidden_layers") != len(layer_types):
        raise ConfigError(f"num_hidden_layers={cfg['num_hidden_layers']} disagrees with len(layer_types)={len(layer_types)}")
    rp = cfg.get("rope_parameters") or {}
    if not isinstance(rp, dict):
        raise ConfigError(f"rope_parameters={rp!r} must be a JSON object")
    rp = rp.get("hybrid", rp)
    if not isinstance(rp, dict):
        raise ConfigError(f"rope_parameters.hybrid={rp!r} must be a JSON object")
    if rp.get("rope_type", "default") != "default":
        raise ConfigError(f"rope_parameters.hybrid.rope_type={rp.get('rope_type')!r} (RoPE scaling) is not "
                          "supported; only 'default' is")
    scaling = sorted(set(rp) - {"rope_type", "rope_theta", "partial_rotary_factor"})
    if scaling:
        raise ConfigError(f"rope_parameters.hybrid has RoPE-scaling field(s) {scaling}; zaya implements plain RoPE only")
    theta = float(rp["rope_theta"]) if "rope_theta" in rp else _float(cfg, "rope_theta", 5e6)
    partial = (float(rp["partial_rotary_factor"]) if "partial_rotary_factor" in rp
               else _float(cfg, "partial_rotary_factor", 0.5))
    eps = _float(cfg, "rms_norm_eps", 1e-5)
    return ZayaConfig(
        num_layers=len(layer_types), num_q_heads=_int(cfg, "num_attention_heads"),
        num_kv_heads=_int(cfg, "num_key_value_heads"), head_dim=_int(cfg, "head_dim"),
        num_experts=_int(cfg, "num_experts"), moe_intermediate_size=_int(cfg, "moe_intermediate_size"),
        router_hidden_size=_int(cfg, "router_hidden_size"), rope_theta=theta, partial_rotary_factor=partial,
        rms_norm_eps=eps, router_norm_eps=eps, **common)


_LEGACY_KEYS = {"vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "zaya_layers",
                "cca_num_q_heads", "num_query_groups_list", "num_query_groups", "ffn_hidden_size_list",
                "ffn_hidden_size", "zaya_mlp_expansion", "num_experts", "head_dim", "moe_router_topk",
                "norm_epsilon", "rope_theta", "partial_rotary_factor", "rope_scaling", "activation_func",
                "gated_linear_unit", "add_bias_linear", "cca", "scale_residual_merge", "zaya_use_eda",
                "zaya_use_mod", "tie_word_embeddings", "lm_head_bias", "attention_bias", "sliding_window",
                "layernorm_epsilon", "normalization"}


def _from_legacy(cfg: dict, common: dict) -> ZayaConfig:
    _check_unknown(cfg, _LEGACY_KEYS)
    for key, want in [("activation_func", "swiglu"), ("gated_linear_unit", True), ("add_bias_linear", False),
                      ("cca", True), ("scale_residual_merge", True), ("zaya_use_eda", True), ("zaya_use_mod", True),
                      ("moe_router_topk", 1), ("normalization", "RMSNorm")]:
        _require(cfg, key, lambda v, w=want: v == w, repr(want))
    _require(cfg, "rope_scaling", lambda v: not v, "null/false (no RoPE scaling)")
    D = _int(cfg, "hidden_size")
    if "zaya_layers" in cfg:  # per-layer-list schema (`zaya` branch, ZAYA1-base)
        layers = cfg["zaya_layers"]
        if (not isinstance(layers, list) or not layers or len(layers) % 2
                or any(layers[i] != "a" or isinstance(layers[i + 1], bool) or not isinstance(layers[i + 1], int)
                       for i in range(0, len(layers), 2))):
            raise ConfigError(f"zaya_layers={layers!r}: expected alternating ['a', num_experts, ...] "
                              "(attention layer, then MoE layer)")
        experts = set(layers[1::2])
        if len(experts) != 1:
            raise ConfigError(f"zaya_layers has different expert counts {sorted(experts)}; zaya needs one count")

        def per_layer(key, idx):
            vals = cfg.get(key)
            if not isinstance(vals, list) or len(vals) != len(layers):
                raise ConfigError(f"config field {key}={vals!r} must be a list with one entry per zaya_layers "
                                  f"entry ({len(layers)})")
            vals = {_int(cfg, key, v) for v in vals[idx::2]}
            if len(vals) != 1:
                raise ConfigError(f"{key} varies across layers ({sorted(vals)}); zaya needs one value")
            return vals.pop()
        n_layers, E = len(layers) // 2, experts.pop()
        Hq = per_layer("cca_num_q_heads", 0)
        K = per_layer("num_query_groups_list", 0) if "num_query_groups_list" in cfg else _int(cfg, "num_key_value_heads")
        ffn, R = per_layer("ffn_hidden_size_list", 1), per_layer("zaya_mlp_expansion", 1)
        # Legacy meaning: num_attention_heads only sets the head size (ZAYA1-base: 16 -> 2048/16 = 128).
        nah = _int(cfg, "num_attention_heads")
        if nah <= 0 or D % nah:
            raise ConfigError(f"num_attention_heads={nah} must divide hidden_size={D} (legacy head_dim = "
                              "hidden_size / num_attention_heads)")
        d = D // nah
        if cfg.get("head_dim") is not None and _int(cfg, "head_dim") != d:
            raise ConfigError(f"head_dim={cfg['head_dim']} disagrees with hidden_size/num_attention_heads={d}")
        # The fork reads a `layernorm_epsilon` key that the released config lacks, so its router norm uses 1e-6.
        router_eps = _float(cfg, "layernorm_epsilon", 1e-6)
    else:  # scalar schema (ZAYA1-8B-legacy)
        if _int(cfg, "num_hidden_layers") % 2:
            raise ConfigError(f"num_hidden_layers={cfg['num_hidden_layers']}: a scalar legacy config needs an even "
                              "num_hidden_layers (attention + MoE pairs)")
        n_layers, E = _int(cfg, "num_hidden_layers") // 2, _int(cfg, "num_experts")
        Hq = _int(cfg, "num_attention_heads")
        K = _int(cfg, "num_query_groups") if "num_query_groups" in cfg else _int(cfg, "num_key_value_heads")
        if "num_query_groups" in cfg and "num_key_value_heads" in cfg and K != _int(cfg, "num_key_value_heads"):
            raise ConfigError(f"num_query_groups={K} disagrees with num_key_value_heads={cfg['num_key_value_heads']}")
        ffn, R = _int(cfg, "ffn_hidden_size"), _int(cfg, "zaya_mlp_expansion")
        if cfg.get("head_dim") is not None:
            d = _int(cfg, "head_dim")
        elif cfg.get("kv_channels") is not None:
            d = _int(cfg, "kv_channels")
        else:
            d = D // Hq
        router_eps = _float(cfg, "norm_epsilon", 1e-5)
    if cfg.get("kv_channels") is not None and _int(cfg, "kv_channels") != d:
        raise ConfigError(f"kv_channels={cfg['kv_channels']} disagrees with head_dim={d}")
    if ffn % 2:
        raise ConfigError(f"ffn_hidden_size={ffn} must be even (gate and up halves)")
    return ZayaConfig(
        num_layers=n_layers, num_q_heads=Hq, num_kv_heads=K, head_dim=d, num_experts=E, moe_intermediate_size=ffn // 2,
        router_hidden_size=R, rope_theta=_float(cfg, "rope_theta", 1e6),
        partial_rotary_factor=_float(cfg, "partial_rotary_factor", 0.5),
        rms_norm_eps=_float(cfg, "norm_epsilon", 1e-5), router_norm_eps=router_eps, **common)


def to_hf_config(c: ZayaConfig) -> dict:
    """The native (transformers >= 5.24) ``config.json`` for a zaya config."""
    return {
        "architectures": ["ZayaForCausalLM"], "model_type": "zaya", "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size, "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_q_heads,
        "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim, "moe_intermediate_size": c.moe_intermediate_size,
        "num_experts": c.num_experts, "num_experts_per_tok": 1, "router_hidden_size": c.router_hidden_size,
        "cca_time0": 2, "cca_time1": 2, "hidden_act": "silu", "rms_norm_eps": c.rms_norm_eps,
        "max_position_embeddings": c.max_position_embeddings, "layer_types": ["hybrid"] * c.num_layers,
        "sliding_window": None, "tie_word_embeddings": True, "lm_head_bias": False, "attention_bias": False,
        "rope_parameters": {"hybrid": {"rope_type": "default", "rope_theta": c.rope_theta,
                                       "partial_rotary_factor": c.partial_rotary_factor}},
        "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id,
        "dtype": c.dtype,
    }

"""HF config.json readers: both fixture layouts, the released ZAYA1 configs, the native writer, and every refusal."""
import copy
import json
import os

import pytest

from zaya.config import ConfigError, preset
from zaya.convert.hf_config import from_hf_config, is_legacy_config, to_hf_config

# ZAYA1-8B native config.json (@67d34da, quoted verbatim in SGLang's test_zaya_config.py).
ZAYA1_8B_NATIVE = {
    "architectures": ["ZayaForCausalLM"], "model_type": "zaya", "vocab_size": 262272, "hidden_size": 2048,
    "num_hidden_layers": 40, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 128,
    "moe_intermediate_size": 2048, "num_experts": 16, "num_experts_per_tok": 1, "router_hidden_size": 256,
    "cca_time0": 2, "cca_time1": 2, "hidden_act": "silu", "rms_norm_eps": 1e-05, "max_position_embeddings": 131072,
    "layer_types": ["hybrid"] * 40, "sliding_window": None, "tie_word_embeddings": True, "lm_head_bias": False,
    "attention_bias": False, "partial_rotary_factor": 0.5,
    "rope_parameters": {
        "hybrid": {"rope_type": "default", "rope_theta": 5000000, "partial_rotary_factor": 0.5},
        "hybrid_sliding": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        "rope_type": "default",  # the stray top-level key of the Hub config
    },
    "bos_token_id": 2, "eos_token_id": 106, "pad_token_id": 0, "dtype": "bfloat16",
}

# ZAYA1-8B-legacy config.json (@1bef1fb, scalar schema, also quoted verbatim there).
ZAYA1_8B_LEGACY = {
    "model_type": "zaya", "num_hidden_layers": 80, "hidden_size": 2048, "num_attention_heads": 8, "head_dim": 128,
    "kv_channels": 128, "num_key_value_heads": 2, "num_query_groups": 2, "num_experts": 16, "moe_router_topk": 1,
    "ffn_hidden_size": 4096, "zaya_mlp_expansion": 256, "norm_epsilon": 1e-5, "rope_theta": 5000000,
    "partial_rotary_factor": 0.5, "max_position_embeddings": 131072, "vocab_size": 262272, "residual_in_fp32": True,
    "scale_residual_merge": True, "zaya_use_eda": True, "zaya_use_mod": True, "activation_func": "swiglu",
    "gated_linear_unit": True, "add_bias_linear": False, "bias_activation_fusion": True, "normalization": "RMSNorm",
    "rope_scaling": False, "eos_token_id": 106, "bos_token_id": 2, "pad_token_id": 0,
}

# ZAYA1-base config.json (per-layer-list schema of the `zaya` branch), reconstructed from secondary sources: the
# Hub file itself was not read.
ZAYA1_BASE = {
    "model_type": "zaya", "zaya_layers": ["a", 16] * 40, "num_hidden_layers": 120, "hidden_size": 2048,
    "num_attention_heads": 16, "num_key_value_heads": 2, "num_query_groups_list": [2, 0] * 40,
    "ffn_hidden_size_list": [0, 4096] * 40, "zaya_mlp_expansion": [0, 256] * 40, "cca_num_q_heads": [8, 0] * 40,
    "kv_channels": 128, "vocab_size": 262272, "max_position_embeddings": 32768, "rope_theta": 1000000,
    "partial_rotary_factor": 0.5, "norm_epsilon": 1e-5, "residual_in_fp32": False, "tie_word_embeddings": True,
    "eos_token_id": 1, "bos_token_id": 2, "pad_token_id": 0, "moe_router_topk": 1, "zaya_use_mod": True,
    "zaya_use_eda": True, "scale_residual_merge": True, "rope_scaling": False,
}


def _fixture_cfg(fixtures_dir, layout):
    with open(os.path.join(fixtures_dir, layout, "config.json")) as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------------------------------
# Accepted configs.

def test_native_fixture(fixtures_dir):
    c = from_hf_config(_fixture_cfg(fixtures_dir, "native"))
    assert (c.vocab_size, c.hidden_size, c.num_layers) == (512, 64, 3)
    assert (c.num_q_heads, c.num_kv_heads, c.head_dim) == (4, 2, 16)
    assert (c.num_experts, c.moe_intermediate_size, c.router_hidden_size) == (4, 32, 16)
    assert c.rope_theta == 5e6 and c.partial_rotary_factor == 0.5 and c.rotary_dim == 8
    assert c.rms_norm_eps == 1e-5 and c.router_norm_eps == 1e-5
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (2, 106, 0)
    assert c.max_position_embeddings == 256


def test_native_fixture_from_path(fixtures_dir):
    path = os.path.join(fixtures_dir, "native", "config.json")
    assert from_hf_config(path) == from_hf_config(_fixture_cfg(fixtures_dir, "native"))
    assert from_hf_config(path, dtype="float32").dtype == "float32"


def test_legacy_fixture(fixtures_dir):
    raw = _fixture_cfg(fixtures_dir, "legacy")
    assert raw["num_hidden_layers"] == 120 and raw["num_attention_heads"] == 8  # the traps
    assert is_legacy_config(raw)
    c = from_hf_config(raw)
    assert c.num_layers == 3                              # len(zaya_layers) / 2, not num_hidden_layers
    assert c.num_q_heads == 4                             # cca_num_q_heads[0], not num_attention_heads
    assert c.num_kv_heads == 2                            # num_query_groups_list[0]
    assert c.head_dim == 8                                # hidden / num_attention_heads = 64 / 8
    assert c.moe_intermediate_size == 32                  # ffn_hidden_size_list[1] / 2
    assert c.router_hidden_size == 16                     # zaya_mlp_expansion[1]
    assert c.num_experts == 4
    assert c.router_norm_eps == 1e-6                      # the fork reads an absent layernorm_epsilon
    assert c.rms_norm_eps == 1e-5
    assert c.rope_theta == 1e6 and c.partial_rotary_factor == 0.5
    assert (c.vocab_size, c.hidden_size, c.eos_token_id) == (512, 64, 1)


def test_legacy_layernorm_epsilon_sets_router_eps(fixtures_dir):
    raw = _fixture_cfg(fixtures_dir, "legacy")
    raw["layernorm_epsilon"] = 1e-5
    assert from_hf_config(raw).router_norm_eps == 1e-5


def test_zaya1_8b_native():
    c = from_hf_config(ZAYA1_8B_NATIVE)
    assert c == preset("zaya1-8b")
    assert (c.num_layers, c.num_q_heads, c.num_kv_heads, c.head_dim) == (40, 8, 2, 128)
    assert (c.num_experts, c.moe_intermediate_size, c.router_hidden_size) == (16, 2048, 256)
    assert c.rope_theta == 5e6  # from rope_parameters.hybrid, not hybrid_sliding's 1e4
    assert c.rotary_dim == 64 and c.conv_channels == 1280 and c.q_per_kv == 4
    assert (c.vocab_size, c.eos_token_id, c.max_position_embeddings) == (262272, 106, 131072)


def test_zaya1_8b_legacy_scalar():
    c = from_hf_config(ZAYA1_8B_LEGACY)
    assert c == preset("zaya1-8b")  # same model, other layout
    assert (c.num_layers, c.num_q_heads, c.num_kv_heads, c.head_dim) == (40, 8, 2, 128)
    assert (c.moe_intermediate_size, c.router_hidden_size, c.num_experts) == (2048, 256, 16)
    assert c.router_norm_eps == 1e-5  # the scalar branch uses norm_epsilon for the router


def test_zaya1_base_reconstructed():
    c = from_hf_config(ZAYA1_BASE)
    assert c == preset("zaya1-base")
    assert (c.num_layers, c.num_q_heads, c.num_kv_heads, c.head_dim) == (40, 8, 2, 128)
    assert (c.moe_intermediate_size, c.router_hidden_size, c.num_experts) == (2048, 256, 16)
    assert c.rope_theta == 1e6 and c.max_position_embeddings == 32768 and c.eos_token_id == 1
    assert c.router_norm_eps == 1e-6


def test_to_hf_config_round_trip():
    for name in ("tiny", "zaya1-8b", "small-100m"):
        c = preset(name)
        assert from_hf_config(to_hf_config(c), dtype=c.dtype) == c
    # the legacy base loses only its router eps (native configs have one eps) when written natively
    base = preset("zaya1-base")
    assert from_hf_config(to_hf_config(base)) == base.replace(router_norm_eps=1e-5)


def test_eos_list_takes_first():
    c = from_hf_config({**ZAYA1_8B_NATIVE, "eos_token_id": [106, 1]})
    assert c.eos_token_id == 106


def test_harmless_bookkeeping_keys_accepted():
    extra = {"transformers_version": "5.24.0", "use_cache": False, "initializer_range": 0.01, "_name_or_path": "x",
             "output_router_logits": False, "attention_dropout": 0.0, "rope_scaling": None, "torch_dtype": "float32"}
    assert from_hf_config({**ZAYA1_8B_NATIVE, **extra}) == preset("zaya1-8b")


def test_native_without_layer_types_uses_num_hidden_layers():
    cfg = {k: v for k, v in ZAYA1_8B_NATIVE.items() if k != "layer_types"}
    assert from_hf_config(cfg).num_layers == 40


# ----------------------------------------------------------------------------------------------------------------
# Refusals: each raises ConfigError and the message names the offending field.

def _edit(base, **changes):
    cfg = copy.deepcopy(base)
    for k, v in changes.items():
        if v is _DEL:
            cfg.pop(k)
        else:
            cfg[k] = v
    return cfg


_DEL = object()

NATIVE_REFUSALS = [
    # (id, edits, text the message must contain)
    ("unknown_key", dict(qk_layernorm=True), "qk_layernorm"),
    ("top_k_2", dict(num_experts_per_tok=2), "num_experts_per_tok"),
    ("sliding_layer_type", dict(layer_types=["hybrid"] * 39 + ["hybrid_sliding"], sliding_window=4096),
     "sliding_window"),
    ("sliding_layer_type_only", dict(layer_types=["hybrid"] * 39 + ["hybrid_sliding"]), "hybrid_sliding"),
    ("sliding_window", dict(sliding_window=4096), "sliding_window"),
    ("rope_scaling", dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling"),
    ("rope_type_yarn", dict(rope_parameters={"hybrid": {"rope_type": "yarn", "rope_theta": 5e6, "factor": 4.0}}),
     "rope_type"),
    ("rope_factor", dict(rope_parameters={"hybrid": {"rope_type": "default", "rope_theta": 5e6, "factor": 4.0}}),
     "factor"),
    ("untied", dict(tie_word_embeddings=False), "tie_word_embeddings"),
    ("model_type", dict(model_type="llama"), "model_type"),
    ("no_model_type", dict(model_type=_DEL), "model_type"),
    ("hidden_act", dict(hidden_act="gelu"), "hidden_act"),
    ("cca_time0", dict(cca_time0=3), "cca_time0"),
    ("cca_time1", dict(cca_time1=1), "cca_time1"),
    ("attention_bias", dict(attention_bias=True), "attention_bias"),
    ("lm_head_bias", dict(lm_head_bias=True), "lm_head_bias"),
    ("attention_dropout", dict(attention_dropout=0.1), "attention_dropout"),
    ("layers_mismatch", dict(num_hidden_layers=39), "num_hidden_layers"),
    ("missing_head_dim", dict(head_dim=_DEL), "head_dim"),
    ("missing_vocab", dict(vocab_size=_DEL), "vocab_size"),
    ("missing_experts", dict(num_experts=_DEL), "num_experts"),
    ("non_int_hidden", dict(hidden_size="2048x"), "hidden_size"),
    ("zero_kv_heads", dict(num_key_value_heads=0), "num_key_value_heads"),
    ("heads_not_multiple", dict(num_key_value_heads=3), "num_kv_heads"),
    ("bad_partial_rotary", dict(rope_parameters={"hybrid": {"rope_type": "default", "rope_theta": 5e6,
                                                            "partial_rotary_factor": 1.5}}), "partial_rotary_factor"),
    ("mixed_schema", dict(ffn_hidden_size=4096), "ffn_hidden_size"),
]


@pytest.mark.parametrize("edits,needle", [(e, n) for _, e, n in NATIVE_REFUSALS],
                         ids=[i for i, _, _ in NATIVE_REFUSALS])
def test_native_refusals(edits, needle):
    with pytest.raises(ConfigError) as ei:
        from_hf_config(_edit(ZAYA1_8B_NATIVE, **edits))
    assert needle in str(ei.value), str(ei.value)


LEGACY_REFUSALS = [
    ("unknown_key", dict(moe_shared_expert_intermediate_size=1024), "moe_shared_expert_intermediate_size"),
    ("top_k_2", dict(moe_router_topk=2), "moe_router_topk"),
    ("rope_scaling", dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
    ("untied", dict(tie_word_embeddings=False), "tie_word_embeddings"),
    ("model_type", dict(model_type="zaya_moe"), "model_type"),
    ("activation", dict(activation_func="gelu"), "activation_func"),
    ("no_glu", dict(gated_linear_unit=False), "gated_linear_unit"),
    ("bias_linear", dict(add_bias_linear=True), "add_bias_linear"),
    ("no_eda", dict(zaya_use_eda=False), "zaya_use_eda"),
    ("no_mod", dict(zaya_use_mod=False), "zaya_use_mod"),
    ("no_residual_merge", dict(scale_residual_merge=False), "scale_residual_merge"),
    ("layernorm", dict(normalization="LayerNorm"), "normalization"),
    ("sliding_window", dict(sliding_window=4096), "sliding_window"),
    ("mixed_experts", dict(zaya_layers=["a", 16] * 39 + ["a", 8]), "zaya_layers"),
    ("bad_zaya_layers", dict(zaya_layers=["a", "a"] * 40), "zaya_layers"),
    ("varying_q_heads", dict(cca_num_q_heads=[8, 0] * 39 + [4, 0]), "cca_num_q_heads"),
    ("varying_ffn", dict(ffn_hidden_size_list=[0, 4096] * 39 + [0, 2048]), "ffn_hidden_size_list"),
    ("short_list", dict(zaya_mlp_expansion=[0, 256]), "zaya_mlp_expansion"),
    ("missing_q_heads", dict(cca_num_q_heads=_DEL), "cca_num_q_heads"),
    ("kv_channels", dict(kv_channels=64), "kv_channels"),
    ("odd_ffn", dict(ffn_hidden_size_list=[0, 4095] * 40), "ffn_hidden_size"),
    ("heads_not_dividing", dict(num_attention_heads=15), "num_attention_heads"),
    ("missing_hidden", dict(hidden_size=_DEL), "hidden_size"),
]


@pytest.mark.parametrize("edits,needle", [(e, n) for _, e, n in LEGACY_REFUSALS],
                         ids=[i for i, _, _ in LEGACY_REFUSALS])
def test_legacy_list_refusals(edits, needle):
    with pytest.raises(ConfigError) as ei:
        from_hf_config(_edit(ZAYA1_BASE, **edits))
    assert needle in str(ei.value), str(ei.value)


SCALAR_REFUSALS = [
    ("odd_layers", dict(num_hidden_layers=81), "num_hidden_layers"),
    ("missing_layers", dict(num_hidden_layers=_DEL), "num_hidden_layers"),
    ("missing_ffn", dict(ffn_hidden_size=_DEL), "ffn_hidden_size"),
    ("groups_vs_kv", dict(num_query_groups=4), "num_query_groups"),
    ("kv_channels", dict(kv_channels=64), "kv_channels"),
    ("top_k_2", dict(moe_router_topk=2), "moe_router_topk"),
]


@pytest.mark.parametrize("edits,needle", [(e, n) for _, e, n in SCALAR_REFUSALS],
                         ids=[i for i, _, _ in SCALAR_REFUSALS])
def test_legacy_scalar_refusals(edits, needle):
    with pytest.raises(ConfigError) as ei:
        from_hf_config(_edit(ZAYA1_8B_LEGACY, **edits))
    assert needle in str(ei.value), str(ei.value)


def test_refuses_fixture_edits(fixtures_dir):
    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        from_hf_config({**_fixture_cfg(fixtures_dir, "native"), "num_experts_per_tok": 2})
    with pytest.raises(ConfigError, match="moe_router_topk"):
        from_hf_config({**_fixture_cfg(fixtures_dir, "legacy"), "moe_router_topk": 2})


def test_refuses_bad_dtype_and_non_object():
    with pytest.raises(ConfigError, match="dtype"):
        from_hf_config(ZAYA1_8B_NATIVE, dtype="int8")
    with pytest.raises(ConfigError, match="JSON object"):
        from_hf_config([1, 2, 3])


def test_refuses_invalid_json_file(tmp_path):
    p = tmp_path / "config.json"
    p.write_text('{"model_type": "zaya",')
    with pytest.raises(ConfigError, match="JSON"):
        from_hf_config(str(p))

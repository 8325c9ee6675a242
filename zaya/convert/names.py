"""HF tensor names <-> zaya param leaves, for the native layout and the legacy per-layer-list layout.

Native names (transformers >= 5.13 ``zaya``) map one-to-one onto a slice of a stacked zaya leaf. Legacy names
(Zyphra's fork) are first renamed to native ones: attention layer 2i and MoE layer
2i+1 become native layer i, per-expert tensors become one slot of the stacked expert tensor, and each layer's
``res_scale`` moves to the residual scaling it really applies to.
"""
from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np

from zaya.config import ZayaConfig


class Target(NamedTuple):
    leaf: tuple[str, ...]  # path in the zaya param tree
    layer: int | None      # index on the stacked L axis (None for global tensors)
    expert: int | None     # index on the E axis (legacy per-expert tensors)
    kind: str              # transform: 'id', 'T' (linear), 'conv1', 'conv2', 'eT' (stacked experts), 'xT' (one expert)


_RES = {"hidden_states_bias": "hb", "hidden_states_scale": "hs", "residual_bias": "rb", "residual_scale": "rs"}
_GLOBAL = {"model.embed_tokens.weight": ("embed",), "model.input_hidden_states_bias": ("in_bias",),
           "model.input_hidden_states_scale": ("in_scale",), "model.norm.weight": ("final_norm",)}
_LAYER = {
    "input_layernorm.weight": (("attn_norm",), "id"),
    "self_attn.qkv_proj.q_proj.weight": (("q",), "T"),
    "self_attn.qkv_proj.k_proj.weight": (("k",), "T"),
    "self_attn.qkv_proj.v_proj_current.weight": (("v_cur",), "T"),
    "self_attn.qkv_proj.v_proj_delayed.weight": (("v_del",), "T"),
    "self_attn.qkv_proj.conv_qk_depthwise.weight": (("conv1_w",), "conv1"),
    "self_attn.qkv_proj.conv_qk_depthwise.bias": (("conv1_b",), "id"),
    "self_attn.qkv_proj.conv_qk_grouped.weight": (("conv2_w",), "conv2"),
    "self_attn.qkv_proj.conv_qk_grouped.bias": (("conv2_b",), "id"),
    "self_attn.qk_norm.temp": (("temp",), "id"),
    "self_attn.o_proj.weight": (("o",), "T"),
    "post_attention_layernorm.weight": (("mlp_norm",), "id"),
    "mlp.gate.down_proj.weight": (("router", "down_w"), "T"),
    "mlp.gate.down_proj.bias": (("router", "down_b"), "id"),
    "mlp.gate.router_states_scale": (("router", "states_scale"), "id"),
    "mlp.gate.router_mlp.norm.weight": (("router", "norm"), "id"),
    "mlp.gate.router_mlp.fc1.weight": (("router", "fc1_w"), "T"),
    "mlp.gate.router_mlp.fc1.bias": (("router", "fc1_b"), "id"),
    "mlp.gate.router_mlp.fc2.weight": (("router", "fc2_w"), "T"),
    "mlp.gate.router_mlp.fc2.bias": (("router", "fc2_b"), "id"),
    "mlp.gate.router_mlp.out_proj.weight": (("router", "out_w"), "T"),
    "mlp.gate.balancing_biases": (("router", "bias"), "id"),
    "mlp.experts.gate_up_proj": (("experts", "gate_up"), "eT"),
    "mlp.experts.down_proj": (("experts", "down"), "eT"),
}
for _hf, _z in _RES.items():
    _LAYER[f"post_attention_residual_scale.{_hf}"] = (("attn_res", _z), "id")
    _LAYER[f"post_mlp_residual_scale.{_hf}"] = (("mlp_res", _z), "id")
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")


def _layer_target(leaf, layer, expert, kind) -> Target:
    return Target(("layers",) + tuple(leaf), layer, expert, kind)


def native_target(name: str) -> Target | None:
    if name in _GLOBAL:
        return Target(_GLOBAL[name], None, None, "id")
    m = _LAYER_RE.fullmatch(name)
    if m and m.group(2) in _LAYER:
        leaf, kind = _LAYER[m.group(2)]
        return _layer_target(leaf, int(m.group(1)), None, kind)
    return None


_LEGACY_ATTN = {"input_norm.weight": "input_layernorm.weight", "self_attn.o_proj.weight": "self_attn.o_proj.weight",
                "self_attn.qkv.temp": "self_attn.qk_norm.temp"}
for _old, _new in [("linear_q", "q_proj"), ("linear_k", "k_proj"), ("val_proj1", "v_proj_current"),
                   ("val_proj2", "v_proj_delayed"), ("conv_qk.0", "conv_qk_depthwise"), ("conv_qk.1", "conv_qk_grouped")]:
    for _s in ("weight", "bias"):
        _LEGACY_ATTN[f"self_attn.qkv.{_old}.{_s}"] = f"self_attn.qkv_proj.{_new}.{_s}"
_LEGACY_MOE = {"input_norm.weight": "post_attention_layernorm.weight",
               "zaya_block.router.rmsnorm_eda.weight": "mlp.gate.router_mlp.norm.weight",
               "zaya_block.router.router_states_scale": "mlp.gate.router_states_scale",
               "zaya_block.router.balancing_biases": "mlp.gate.balancing_biases",
               "zaya_block.router.router_mlp.4.weight": "mlp.gate.router_mlp.out_proj.weight"}
for _s in ("weight", "bias"):
    _LEGACY_MOE[f"zaya_block.router.down_proj.{_s}"] = f"mlp.gate.down_proj.{_s}"
    _LEGACY_MOE[f"zaya_block.router.router_mlp.0.{_s}"] = f"mlp.gate.router_mlp.fc1.{_s}"
    _LEGACY_MOE[f"zaya_block.router.router_mlp.2.{_s}"] = f"mlp.gate.router_mlp.fc2.{_s}"
_EXPERT_RE = re.compile(r"zaya_block\.experts\.local_experts\.(\d+)\.linear_fc([12])\.weight")


def legacy_target(name: str, num_layers: int) -> Target | None:
    """Target of a legacy tensor name (num_layers = native layer count = len(zaya_layers) / 2)."""
    if name == "model.final_norm.weight":
        return native_target("model.norm.weight")
    if name == "model.embed_tokens.weight":
        return native_target(name)
    m = re.fullmatch(r"model\.res_scale\.(\w+)", name)
    if m and m.group(1) in _RES:
        return _layer_target(("mlp_res", _RES[m.group(1)]), num_layers - 1, None, "id")
    m = _LAYER_RE.fullmatch(name)
    if not m:
        return None
    n, rest = int(m.group(1)), m.group(2)
    i = n // 2
    rm = re.fullmatch(r"res_scale\.(\w+)", rest)
    if rm and rm.group(1) in _RES:
        z = _RES[rm.group(1)]
        if n % 2:  # MoE layer: its res_scale merges the attention output of the same native layer
            return _layer_target(("attn_res", z), i, None, "id")
        if n == 0:  # first layer: applied to the embedding = the model's input affine
            return Target(("in_" + {"hb": "bias", "hs": "scale"}[z],), None, None, "id") if z in ("hb", "hs") else None
        return _layer_target(("mlp_res", z), i - 1, None, "id")
    table = _LEGACY_MOE if n % 2 else _LEGACY_ATTN
    if rest in table:
        return native_target(f"model.layers.{i}.{table[rest]}")
    em = _EXPERT_RE.fullmatch(rest)
    if n % 2 and em:
        leaf = ("experts", "gate_up") if em.group(2) == "1" else ("experts", "down")
        return _layer_target(leaf, i, int(em.group(1)), "xT")
    return None


# ---------------------------------------------------------------------------------------------------------------
# Transforms between HF tensors (torch layout) and zaya slices.

def to_zaya(x: np.ndarray, kind: str, c: ZayaConfig) -> np.ndarray:
    if kind == "id":
        return x
    if kind in ("T", "xT"):
        return x.T
    if kind == "eT":
        return x.transpose(0, 2, 1)
    if kind == "conv1":  # [C, 1, 2] -> [2, C]
        return x[:, 0, :].T
    if kind == "conv2":  # [C_out = G*d, d_in, 2] -> [2, G, d_in, d_out]
        d = c.head_dim
        return x.reshape(-1, d, d, 2).transpose(3, 0, 2, 1)
    raise ValueError(kind)


def to_hf(x: np.ndarray, kind: str, c: ZayaConfig) -> np.ndarray:
    if kind in ("id",):
        return x
    if kind in ("T", "xT"):
        return x.T
    if kind == "eT":
        return x.transpose(0, 2, 1)
    if kind == "conv1":
        return x.T[:, None, :]
    if kind == "conv2":
        return x.transpose(1, 3, 2, 0).reshape(-1, c.head_dim, 2)
    raise ValueError(kind)


def hf_shape(zaya_shape: tuple, kind: str, c: ZayaConfig) -> tuple:
    """Expected HF shape for one zaya slice shape (without the L / E axes the target indexes)."""
    return to_hf(np.empty(zaya_shape, np.int8), kind, c).shape


def native_names(c: ZayaConfig) -> list[str]:
    """Every tensor name of a native checkpoint for config c (lm_head excluded: tied)."""
    names = list(_GLOBAL)
    for i in range(c.num_layers):
        names += [f"model.layers.{i}.{k}" for k in _LAYER if not (i == 0 and k.endswith("router_states_scale"))]
    return names


def legacy_names(c: ZayaConfig) -> list[str]:
    """Every tensor name of a legacy (Zyphra fork, per-expert) checkpoint for config c (lm_head excluded: tied)."""
    names = ["model.embed_tokens.weight", "model.final_norm.weight"] + [f"model.res_scale.{k}" for k in _RES]
    for i in range(c.num_layers):
        a, m = f"model.layers.{2 * i}.", f"model.layers.{2 * i + 1}."
        names += [a + k for k, v in _LEGACY_ATTN.items() if native_target(f"model.layers.0.{v}") is not None]
        # layer 0 applies its res_scale to the embedding: only the hidden_states_* pair exists there
        names += [f"{a}res_scale.{k}" for k in _RES if i > 0 or k.startswith("hidden_states")]
        names += [m + k for k in _LEGACY_MOE if not (i == 0 and k.endswith("router_states_scale"))]
        names += [f"{m}res_scale.{k}" for k in _RES]
        names += [f"{m}zaya_block.experts.local_experts.{e}.linear_fc{j}.weight"
                  for e in range(c.num_experts) for j in (1, 2)]
    return names

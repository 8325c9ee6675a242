"""Parameter tree: names, shapes, logical axes and initialisation.

``params`` is a plain nested dict of arrays. Per-layer tensors are stacked on a leading L axis (the forward pass
scans over layers). Matrices are stored (in, out). The tree (shapes for config ``c``)::

  embed [V, D]   in_bias, in_scale [D]   final_norm [D]
  layers/
    attn_norm [L, D]       q [L, D, H*d]   k [L, D, K*d]   v_cur, v_del [L, D, K*d/2]
    conv1_w [L, 2, C]      conv1_b [L, C]                    (depthwise causal conv, tap 1 = newer token)
    conv2_w [L, 2, H+K, d, d]  conv2_b [L, C]                (grouped conv: [tap, group, in, out])
    temp [L, K]            o [L, H*d, D]
    attn_res/{hb, hs, rb, rs} [L, D]                         ((out + hb) * hs + (resid + rb) * rs)
    mlp_norm [L, D]
    router/{down_w [L, D, R], down_b [L, R], states_scale [L, R], norm [L, R], fc1_w, fc2_w [L, R, R],
            fc1_b, fc2_b [L, R], out_w [L, R, E+1], bias [L, E+1] (fp32 balancing biases)}
    experts/{gate_up [L, E, D, 2F] (gate = first F columns), down [L, E, F, D]}
    mlp_res/{hb, hs, rb, rs} [L, D]

``states_scale`` of layer 0 is unused (layer 0 has no depth mixing; its incoming router state is zero).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from zaya.config import ZayaConfig

_RES = ("hb", "hs", "rb", "rs")


def param_specs(c: ZayaConfig) -> dict:
    """name -> (shape, logical axes, init) for every parameter. init is 'normal', 'ones', 'zeros', 'bias', 'temp'."""
    D, L, H, K, d, C = c.hidden_size, c.num_layers, c.num_q_heads, c.num_kv_heads, c.head_dim, c.conv_channels
    E, F, R, V = c.num_experts, c.moe_intermediate_size, c.router_hidden_size, c.vocab_size
    lay = "layers"
    res = {n: ((L, D), (lay, "embed"), "ones" if n.endswith("s") else "zeros") for n in _RES}
    return {
        "embed": ((V, D), ("vocab", "embed"), "normal"),
        "in_bias": ((D,), ("embed",), "zeros"),
        "in_scale": ((D,), ("embed",), "ones"),
        "final_norm": ((D,), ("embed",), "ones"),
        "layers": {
            "attn_norm": ((L, D), (lay, "embed"), "ones"),
            "q": ((L, D, H * d), (lay, "embed", "heads"), "normal"),
            "k": ((L, D, K * d), (lay, "embed", "kv"), "normal"),
            "v_cur": ((L, D, K * d // 2), (lay, "embed", "kv"), "normal"),
            "v_del": ((L, D, K * d // 2), (lay, "embed", "kv"), "normal"),
            "conv1_w": ((L, 2, C), (lay, None, None), "conv"),
            "conv1_b": ((L, C), (lay, None), "zeros"),
            "conv2_w": ((L, 2, H + K, d, d), (lay, None, None, None, None), "conv"),
            "conv2_b": ((L, C), (lay, None), "zeros"),
            "temp": ((L, K), (lay, None), "ones"),
            "o": ((L, H * d, D), (lay, "heads", "embed"), "normal"),
            "attn_res": dict(res),
            "mlp_norm": ((L, D), (lay, "embed"), "ones"),
            "router": {
                "down_w": ((L, D, R), (lay, "embed", None), "normal"),
                "down_b": ((L, R), (lay, None), "zeros"),
                "states_scale": ((L, R), (lay, None), "ones"),
                "norm": ((L, R), (lay, None), "ones"),
                "fc1_w": ((L, R, R), (lay, None, None), "normal"),
                "fc1_b": ((L, R), (lay, None), "zeros"),
                "fc2_w": ((L, R, R), (lay, None, None), "normal"),
                "fc2_b": ((L, R), (lay, None), "zeros"),
                "out_w": ((L, R, E + 1), (lay, None, None), "normal"),
                "bias": ((L, E + 1), (lay, None), "bias"),
            },
            "experts": {
                "gate_up": ((L, E, D, 2 * F), (lay, "experts", "embed", "mlp"), "normal"),
                "down": ((L, E, F, D), (lay, "experts", "mlp", "embed"), "normal"),
            },
            "mlp_res": dict(res),
        },
    }


def _is_spec(x) -> bool:
    return isinstance(x, tuple) and len(x) == 3 and isinstance(x[0], tuple)


def map_specs(fn, specs):
    return jax.tree.map(fn, specs, is_leaf=_is_spec)


def param_shapes(c: ZayaConfig) -> dict:
    return map_specs(lambda s: s[0], param_specs(c))


def logical_axes(c: ZayaConfig) -> dict:
    return map_specs(lambda s: s[1], param_specs(c))


def param_dtype(path: tuple[str, ...], c: ZayaConfig):
    """Balancing biases stay fp32 (a buffer in the reference); everything else uses the config dtype."""
    return jnp.float32 if path[-1] == "bias" and "router" in path else jnp.dtype(c.dtype)


def abstract_params(c: ZayaConfig) -> dict:
    return jax.tree_util.tree_map_with_path(
        lambda p, s: jax.ShapeDtypeStruct(s[0], param_dtype(tuple(k.key for k in p), c)),
        param_specs(c), is_leaf=_is_spec)


def init(c: ZayaConfig, key: jax.Array, std: float = 0.02) -> dict:
    """Training init: normal(std) matrices, unit norms/scales, zero biases, qk temperature 1, skip bias -1."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(param_specs(c), is_leaf=_is_spec)
    keys = jax.random.split(key, len(flat))
    out = []
    for (path, (shape, _, kind)), k in zip(flat, keys):
        names = tuple(p.key for p in path)
        dt = param_dtype(names, c)
        if kind == "normal":
            x = std * jax.random.normal(k, shape, jnp.float32)
        elif kind == "conv":  # near-identity on the newest tap keeps q/k informative at init
            x = 0.1 * jax.random.normal(k, shape, jnp.float32)
            if names[-1] == "conv1_w":
                x = x.at[:, 1].add(1.0)
            else:
                x = x.at[:, 1].add(jnp.eye(shape[-1]))
        elif kind == "bias":
            x = jnp.zeros(shape, jnp.float32).at[..., -1].set(-1.0)
        elif kind == "ones":
            x = jnp.ones(shape, jnp.float32)
        else:
            x = jnp.zeros(shape, jnp.float32)
        out.append(x.astype(dt))
    return jax.tree_util.tree_unflatten(treedef, out)


def count(params) -> int:
    """Number of elements in a param tree (arrays or ``ShapeDtypeStruct`` leaves)."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def _group(names: tuple[str, ...]) -> str:
    if names[0] == "layers" and names[1] == "experts":
        return "experts"
    return "buffers" if names[-1] == "bias" and "router" in names else "dense"


def num_params(c: ZayaConfig, by: str | None = None):
    """Parameter counts derived from ``param_specs`` (the one table of shapes).

    ``by=None``: the model's parameter count as a Hugging Face checkpoint holds it (model cards' number): every
    element of the tree except the fp32 balancing biases (a buffer in the reference) and layer 0's unused
    ``states_scale`` row. ``by="group"``: element counts of the whole tree (what ``init`` allocates) by group,
    ``{"dense": ..., "experts": ..., "buffers": ...}`` (experts = every expert of every layer; buffers = the
    fp32 balancing biases).
    """
    if by not in (None, "group"):
        raise ValueError(f"num_params(by={by!r}): use by=None (total) or by='group'")
    flat = jax.tree_util.tree_flatten_with_path(param_specs(c), is_leaf=_is_spec)[0]
    groups = {"dense": 0, "experts": 0, "buffers": 0}
    for path, (shape, _, _) in flat:
        groups[_group(tuple(p.key for p in path))] += int(np.prod(shape))
    if by == "group":
        return groups
    return groups["dense"] + groups["experts"] - c.router_hidden_size  # layer 0's states_scale row is unused


def cast(params, c: ZayaConfig):
    """Cast a param tree to the config's dtype policy."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.asarray(x, param_dtype(tuple(k.key for k in p), c)), params)

"""ZAYA1 MoE block: MLP router with depth mixing (EDA), top-1 over E experts + 1 MoD skip class, SwiGLU experts.

Expert dispatch implementations, all dropless with identical math (forward and gradients), in a registry
(``EXPERT_IMPLS``; add one with ``@register("name")``, nothing else to edit):
  dense   every expert on every token, select with a one-hot (the reference; tests compare every impl to it)
  ragged  sort tokens by expert, two ``jax.lax.ragged_dot`` calls, inverse permutation (grouped on GPU; XLA:CPU
          lowers ragged_dot to a dense all-experts dot)
  gather  per-token matvecs on gathered expert weights (few tokens)            } zaya.model.moe_dispatch:
  sorted  expert-sorted row tiles, a scan of tile matmuls (any backend)          } routed work only
  pallas  the same tiles through a Pallas grouped-matmul kernel (GPU decode)     }
  auto    one of the above by backend and static token count (``moe_dispatch.auto_choice``): ``moe()``'s and
          zaya.Model's default (``transformer.INFERENCE``); ``Impl()``, hence training, keeps ``ragged``
Expert parallelism (``moe(..., expert_axis="expert")``, set by zaya.train.step when the batch is split over the
``expert`` mesh axis): tokens travel to the devices owning their experts by all-to-all (``zaya.model.moe_ep``);
dropless too, unless a capacity factor is set (then tokens past it are dropped and counted).
The skip class (e* == E) outputs 0 as in mainline transformers and vLLM; how often it wins is returned so callers
can count it.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from zaya.config import ZayaConfig
from zaya.model import moe_dispatch, moe_ep
from zaya.model.layers import rms_norm
from zaya.model.moe_dispatch import swiglu as _swiglu

# name -> fn(p_experts, config, m_BTD, choice_BT, gate_BT) -> y_BTD fp32
EXPERT_IMPLS: dict[str, Callable] = {}


def register(name: str):
    """Decorator: ``@register("mine") def experts_mine(p, c, m_BTD, choice_BT, gate_BT)`` makes ``moe(..., "mine")``
    and ``Impl(moe="mine")`` run it (a later registration under the same name replaces the earlier one)."""
    def deco(fn):
        EXPERT_IMPLS[name] = fn
        return fn
    return deco


def get_impl(name: str) -> Callable:
    if name not in EXPERT_IMPLS:
        raise ValueError(f"unknown MoE impl {name!r}; registered: {sorted(EXPERT_IMPLS)}")
    return EXPERT_IMPLS[name]


def router(p: dict, c: ZayaConfig, m_BTD, prev_r_BTR):
    """Returns (expert index [B, T] in 0..E, gate weight [B, T] fp32, router state r for the next layer, probs).

    Dtypes: the four matmuls take operands in the weight dtype with fp32 accumulation (the reference runs the whole
    router MLP in the model dtype); biases, GELU, the norm, the router state r, the logits and the softmax stay fp32
    (the reference's softmax is in the model dtype; fp32 here, as the issue's policy, since it sets the gate).
    """
    f32 = lambda n: p[n].astype(jnp.float32)
    mm = lambda x, n: jnp.einsum("btd,dr->btr", x.astype(p[n].dtype), p[n], preferred_element_type=jnp.float32)
    r = mm(m_BTD, "down_w") + f32("down_b")
    r = r + prev_r_BTR * f32("states_scale")  # prev_r is zero for layer 0, which has no depth mixing
    z = rms_norm(r, f32("norm"), c.router_norm_eps)
    z = jax.nn.gelu(mm(z, "fc1_w") + f32("fc1_b"), approximate=False)
    z = jax.nn.gelu(mm(z, "fc2_w") + f32("fc2_b"), approximate=False)
    probs = jax.nn.softmax(mm(z, "out_w"), axis=-1)  # [B, T, E+1]
    choice = jnp.argmax(probs + p["bias"].astype(jnp.float32), axis=-1)  # balancing biases only steer the choice
    gate = jnp.take_along_axis(probs, choice[..., None], -1)[..., 0]  # not renormalised
    return choice, gate, r, probs


@register("dense")
def experts_dense(p: dict, c: ZayaConfig, m_BTD, choice_BT, gate_BT):
    w_up, w_down = p["gate_up"], p["down"]
    x = m_BTD.astype(w_up.dtype)
    # experts axis first in operands and outputs: XLA:CPU's batched bf16 x bf16 -> fp32 dot is UNIMPLEMENTED otherwise
    h = jnp.einsum("btd,edf->ebtf", x, w_up, preferred_element_type=jnp.float32).astype(w_up.dtype)
    y = jnp.einsum("ebtf,efd->ebtd", _swiglu(h, c.moe_intermediate_size), w_down, preferred_element_type=jnp.float32)
    onehot = jax.nn.one_hot(choice_BT, c.num_experts + 1, dtype=jnp.float32)[..., : c.num_experts]
    return jnp.einsum("ebtd,bte->btd", y, onehot * gate_BT[..., None])


@register("ragged")
def experts_ragged(p: dict, c: ZayaConfig, m_BTD, choice_BT, gate_BT):
    B, T, D = m_BTD.shape
    E = c.num_experts
    w_up, w_down = p["gate_up"], p["down"]
    x, e, w = moe_dispatch.routed_tokens(m_BTD, choice_BT, gate_BT, E, w_up.dtype)  # skip tokens: gate 0
    e = jnp.where(e == E, E - 1, e)  # skip tokens ride along with the last expert, weight 0
    order = jnp.argsort(e, stable=True)
    sizes = jnp.bincount(e, length=E).astype(jnp.int32)
    h = jax.lax.ragged_dot(x[order], w_up, sizes, preferred_element_type=jnp.float32).astype(w_up.dtype)
    y = jax.lax.ragged_dot(_swiglu(h, c.moe_intermediate_size), w_down, sizes, preferred_element_type=jnp.float32)
    y = y * w[order][:, None]
    out = jnp.zeros_like(y).at[order].set(y)
    return out.reshape(B, T, D)


register("gather")(moe_dispatch.experts_gather)
register("sorted")(moe_dispatch.experts_sorted)
register("pallas")(moe_dispatch.experts_pallas)


def auto_impl(n_tokens: int, num_experts: int) -> str:
    """The impl ``auto`` runs here (this process's backend) for a static token count B*T."""
    from zaya.kernels.platform import backend
    return moe_dispatch.auto_choice(backend(), n_tokens, num_experts)


@register("auto")
def experts_auto(p: dict, c: ZayaConfig, m_BTD, choice_BT, gate_BT):
    B, T, _ = m_BTD.shape
    return get_impl(auto_impl(B * T, c.num_experts))(p, c, m_BTD, choice_BT, gate_BT)


def moe(p_router: dict, p_experts: dict, c: ZayaConfig, m_BTD, prev_r, impl: str = "auto",
        expert_axis: str | None = None, capacity_factor: float = 0.0, ep_transport: str = "all_to_all"):
    """Returns (output [B, T, D] fp32, router state for the next layer, stats).

    With ``expert_axis`` (inside a shard_map manual over it; ``p_experts`` holds this device's experts) the tokens
    go to their experts' devices by all-to-all (``zaya.model.moe_ep``; ``impl`` other than ragged / auto runs the
    local experts) and stats gain ``dropped`` (0 unless ``capacity_factor`` > 0)."""
    choice, gate, r, probs = router(p_router, c, m_BTD, prev_r)
    stats = {"counts": jnp.bincount(choice.reshape(-1), length=c.num_experts + 1), "probs_mean": probs.mean((0, 1))}
    if expert_axis is not None:
        local = None if impl in ("ragged", "auto") else get_impl(impl)
        if ep_transport == "ragged":
            if capacity_factor > 0:
                raise ValueError("ep_transport='ragged' is dropless: leave capacity_factor at 0")
            y, stats["dropped"] = moe_ep.experts_ep_ragged(p_experts, c, m_BTD, choice, gate, expert_axis, local)
        elif ep_transport == "all_to_all":
            y, stats["dropped"] = moe_ep.experts_ep(p_experts, c, m_BTD, choice, gate, expert_axis,
                                                    capacity_factor, local)
        else:
            raise ValueError(f"ep_transport={ep_transport!r}; use 'all_to_all' or 'ragged'")
    else:
        y = get_impl(impl)(p_experts, c, m_BTD, choice, gate)
    return y, r, stats

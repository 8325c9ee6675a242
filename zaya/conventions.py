"""Conventions shared by every module (read this first).

Dimension letters used as shape suffixes in names (``x_BTD`` is [batch, tokens, hidden]):

  B  batch (rows / requests)           T  new tokens in this forward (query length)
  S  cache slots (max sequence length)  D  hidden size (``hidden_size``)
  H  query heads                        K  key/value heads (GQA groups)
  G  query heads per kv head (H // K)   d  head dim
  C  CCA conv channels ((H + K) * d)    R  router width
  E  real experts (the router has E + 1 classes; class E is the MoD "skip")
  F  expert intermediate size           V  vocabulary
  L  layers (params of all layers are stacked on a leading L axis and scanned)
  W  window slots (the CCA conv ring; a single_forward proposal's tokens)
  X  any channel width (helpers generic over the last axis)

Decoding (``zaya.decode``):

  N  drafts per block (``block_size``)  M  generated-token budget (``max_new_tokens``)
  P  proposals of single_forward (one per acceptance level)

Expert dispatch and kernels (``zaya.model.moe_dispatch``, ``zaya.kernels``):

  A  routed tokens, flattened (B * T)   Z  expert-sorted rows (tiles x U, padding included)
  U  rows of one tile                   O  output columns of an expert matmul (2F up, D down)
  Q  query rows of one kv head in the verify kernel (G * T)   s  splits of the cached keys (split-K)

A row's cache length is a value, not a dimension: ``length_B``. "accepted" always counts accepted drafts; the
tokens a step really appends are "kept".

Mesh axes (``zaya.sharding``): ``data`` (pure data parallel), ``fsdp`` (data parallel with sharded weights),
``tensor`` (Megatron-style heads / hidden-of-MLP split), ``expert`` (expert parallel). Params carry *logical*
axis names (``embed``, ``vocab``, ``heads``, ``kv``, ``mlp``, ``experts`` ...) and a rule table in the config maps
them to mesh axes, so changing the parallelism never touches model code.

Weights are stored (in, out) as JAX expects (``y = x @ W``); the HF checkpoints store (out, in) and the converter
transposes. Dtypes: weights and matmuls in the param dtype (bf16 in production), residual stream, norms, router
softmax and logits in fp32.
"""

DIM_LETTERS = "BTSDHKGdCREFVLNMPWXAZUOQs"
MESH_AXES = ("data", "fsdp", "tensor", "expert")

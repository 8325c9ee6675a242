"""Pallas kernels (Triton lowering: one source for CUDA and ROCm), each behind a registry with a pure-jnp reference.

  decode_attention  split-K flash-decoding over the KV cache for the verify step (attention impl ``pallas``)
  grouped_matmul    expert matmul that reads each routed expert's weights once (MoE impl ``pallas``)

On a CPU backend the kernels run with ``interpret=True`` (tests); on GPU they always compile with explicit Triton
compiler params (``platform.compiler_params``): without them jax 0.10-0.11 lowers to Mosaic GPU, which refuses ROCm.
"""

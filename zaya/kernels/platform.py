"""What every kernel needs to know about where it runs: interpret mode on CPU, Triton params on CUDA and ROCm."""
from __future__ import annotations

import warnings

import jax

# jax >= 0.11 marks the Triton lowering deprecated (it is the only Pallas path on ROCm); the warning says nothing
# a user can act on, so kernels silence it where they call pallas_call.
warnings.filterwarnings("ignore", message=".*[Tt]riton.*", category=DeprecationWarning)


def backend() -> str:
    """'cpu', 'cuda' or 'rocm' (the default backend jax runs on)."""
    b = jax.default_backend()
    if b == "gpu":
        plat = jax.devices()[0].client.platform_version.lower()
        return "rocm" if "rocm" in plat or "hip" in plat else "cuda"
    return b


def interpret() -> bool:
    """Kernels run interpreted where Pallas cannot compile them (CPU: tests and the CI stand-in)."""
    return backend() not in ("cuda", "rocm")


def compiler_params(num_warps: int = 4, num_stages: int | None = None):
    """Explicit Triton params (jax 0.10-0.11 default to Mosaic GPU without them, which fails on ROCm).

    ``num_stages`` defaults to 3 on CUDA and 1 on ROCm (AMD's Triton pipelines through registers, not shared memory).
    """
    from jax.experimental.pallas import triton as pltriton
    if num_stages is None:
        num_stages = 1 if backend() == "rocm" else 3
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def next_pow2(n: int) -> int:
    """Triton loads and stores power-of-two blocks: the block size that covers n."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def check_limit(ok: bool, kernel: str, what: str, fix: str) -> None:
    """A kernel asked for a shape it does not support raises, naming the limit and what to do instead."""
    if not ok:
        raise ValueError(f"{kernel}: {what}. {fix}")

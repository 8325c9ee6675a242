"""zaya: ZAYA1 MoE in JAX, converted to a TiDAR block-diffusion model and decoded with block samplers."""
from zaya import sharding  # zaya.sharding.make_mesh(...) after `import zaya` (README)
from zaya.api import Model, load
from zaya.config import ZayaConfig, preset
from zaya.convert.hf_config import from_hf_config
from zaya.model.transformer import Impl  # zaya.load(path, impl=zaya.Impl(attention="pallas", moe="pallas"))

__all__ = ["Impl", "Model", "ZayaConfig", "from_hf_config", "generate", "load", "preset", "sharding"]


def generate(*args, **kwargs):
    """See ``zaya.decode.generate.generate``."""
    from zaya.decode.generate import generate as _generate
    return _generate(*args, **kwargs)

"""Decoding: options, the sampler registry and the built-in samplers, acceptance rules, ``zaya.generate``."""
from zaya.decode import ar, single_forward, tidar, two_forward  # noqa: F401  (the built-in samplers register)

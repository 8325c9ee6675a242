"""The ZAYA1 model as pure functions over plain pytrees."""
from zaya.model.cache import Cache, Chunk, commit, init_cache, rollback
from zaya.layouts import Layout
from zaya.model.params import abstract_params, init, logical_axes, param_shapes
from zaya.model.transformer import Impl, apply, forward, hidden

__all__ = ["Cache", "Chunk", "Impl", "Layout", "abstract_params", "apply", "commit", "forward", "hidden", "init",
           "init_cache", "logical_axes", "param_shapes", "rollback"]

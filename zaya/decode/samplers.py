"""The sampler registry: one ``Sampler`` record per decoding method, read by ``zaya.generate``, ``zaya bench
samplers`` and the roofline model (``zaya.bench.roofline_model``).

Adding a sampler is one file (or one notebook cell): write ``step`` (and what else it needs) and call
``register(Sampler(...))``; nothing else changes. Compiled functions are keyed on the record itself, so registering
a new record under an old name takes effect in the next ``zaya.generate`` call. The built-in samplers (``ar``,
``two_forward``, ``single_forward``, ``tidar``) register themselves when ``zaya.decode`` is imported.

Protocol (``o`` is a validated ``DecodeOptions``; ``c`` the ZayaConfig; ``impl`` the attention Impl):

  step(params, c, impl, o, state) -> (state, info)   one decode step; info: per-row arrays for the trace
                                                      (block samplers: accepted, active, drafts, next, kept)
  prefill(params, c, impl, o, prompt_BT, length_B, cache, key) -> State
                                                      optional: replaces zaya.generate's plain prefill (and init)
                                                      when fuses_prefill(o), e.g. first drafts in the same forward
  init(params, c, impl, o, state) -> State            optional: after the plain prefill (e.g. a drafting forward)
  cache_slack(o) -> int                               cache slots beyond prompt + max_new_tokens
  query_tokens(o) -> tuple[int, ...]                  query tokens per row of each forward of one step
  expected_tokens_per_step(beta, o) -> float          E[tokens/step] at i.i.d. acceptance beta (the roofline)
  summarize(infos, o) -> dict                         optional: extra statistics from the step infos
  check(o)                                            optional: ValueError for options this sampler refuses
  label(o), layout(o) -> str                          names in benchmark tables ("TF K=16", "TF")
  perfect_tokens_per_step(o) -> int | None            tokens per step when every draft is accepted (the bench's
                                                      bound; None: no bound reported)
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from zaya.decode.options import DecodeOptions


def _one(o) -> int:
    return 1


@dataclasses.dataclass(frozen=True)
class Sampler:
    name: str
    step: Callable
    query_tokens: Callable
    expected_tokens_per_step: Callable
    prefill: Callable | None = None
    fuses_prefill: Callable | None = None  # None: use `prefill` whenever it is given
    init: Callable | None = None
    cache_slack: Callable = _one
    summarize: Callable | None = None
    check: Callable | None = None
    label: Callable | None = None          # None: the name
    layout: Callable | None = None         # None: the name
    perfect_tokens_per_step: Callable | None = None

    def uses_prefill(self, o: DecodeOptions) -> bool:
        return self.prefill is not None and (self.fuses_prefill is None or self.fuses_prefill(o))

    def options(self, **kw) -> DecodeOptions:
        """``DecodeOptions.make(**kw)`` plus this sampler's own check: the one validation of a generate call."""
        o = DecodeOptions.make(**kw)
        if self.check is not None:
            self.check(o)
        return o

    def describe(self, o: DecodeOptions) -> tuple[str, str]:
        """(label, layout) for benchmark tables."""
        return (self.label(o) if self.label else self.name), (self.layout(o) if self.layout else self.name)


SAMPLERS: dict[str, Sampler] = {}


def register(sampler: Sampler) -> Sampler:
    """Add (or replace) ``sampler`` under ``sampler.name``."""
    if not isinstance(sampler, Sampler):
        raise TypeError(f"register takes a zaya.decode.samplers.Sampler record, got {type(sampler).__name__}")
    SAMPLERS[sampler.name] = sampler
    return sampler


def get(name: str) -> Sampler:
    import zaya.decode  # noqa: F401  (the built-in samplers register on import)
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)} "
                         "(add one with zaya.decode.samplers.register)")
    return SAMPLERS[name]

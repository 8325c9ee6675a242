"""``DecodeOptions``: every knob of one ``zaya.generate`` call, validated once when it is built.

The object is frozen and hashable: it is part of the key of the compiled decode functions, and the step functions
read its fields without checking them again. It holds no arrays: what the rules read at run time (drafting and
diffusion logits) travels in ``zaya.decode.acceptance.RuleInputs``.
"""
from __future__ import annotations

import dataclasses

from zaya.decode import acceptance


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    max_new_tokens: int = 64          # M: generated tokens per row at most
    temperature: float = 0.0          # verifier / AR sampling temperature (0: greedy)
    top_k: int | None = None
    top_p: float | None = None
    eos_id: int | None = None         # rows stop right after this id (None: never)
    stop: tuple | None = None         # stop sequences (tuples of ids); a row stops right after one
    # block samplers
    block_size: int = 16              # N: drafts per block
    acceptance: str = "greedy"        # a rule registered in zaya.decode.acceptance
    draft_temperature: float = 0.0    # 0: argmax ("Dirac") drafts; > 0: drafts sampled at this temperature
    mix_weight: float | None = None   # verify against w*z_AR + (1-w)*z_diff (lossy below 1)
    anchor: str = "token"             # two_forward draft block: "token" [a', mask x N] or "mask" [mask x (N+1)]
    block_causal: bool = False        # causal attention inside the drafting blocks
    levels: tuple | None = None       # single_forward proposal levels (None: dense 0..N)
    rule_options: tuple = ()          # (key, value) pairs: the acceptance rule's own knobs (e.g. epsilon)
    # the registered rule named by `acceptance`, looked up when the options are built (part of the hash: a rule
    # re-registered under the same name gives different options, so new compiled functions)
    rule: acceptance.Rule | None = dataclasses.field(default=None, init=False, repr=False)

    def __post_init__(self):
        put = lambda k, v: object.__setattr__(self, k, v)
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.anchor not in ("token", "mask"):
            raise ValueError(f"anchor must be 'token' (draft [a', mask x N]) or 'mask' ([mask x (N+1)]), "
                             f"got {self.anchor!r}")
        if self.mix_weight is not None and not 0 <= self.mix_weight <= 1:
            raise ValueError(f"mix_weight must be in [0, 1] (or None: no mixing), got {self.mix_weight}")
        if self.draft_temperature < 0 or self.temperature < 0:
            raise ValueError(f"temperature and draft_temperature must be >= 0, got {self.temperature}, "
                             f"{self.draft_temperature}")
        put("temperature", float(self.temperature))
        put("draft_temperature", float(self.draft_temperature))
        put("stop", tuple(tuple(int(t) for t in s) for s in self.stop) if self.stop else None)
        put("levels", None if self.levels is None else tuple(int(x) for x in self.levels))
        rule = acceptance.get(self.acceptance)  # ValueError for an unknown name
        known = dict(rule.options)
        opts = dict(self.rule_options)
        for k in opts:
            if k not in known:
                have = f"its options are {', '.join(known)}" if known else "it has no options"
                raise ValueError(f"option {k!r} is not an option of acceptance {self.acceptance!r}; {have} "
                                 "(a rule declares its options in acceptance.register(..., options=...))")
        put("rule_options", tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in opts.items())))
        put("rule", rule)

    @classmethod
    def make(cls, **kw) -> "DecodeOptions":
        """From ``zaya.generate``'s keywords: the fields above, anything else is an option of the acceptance rule.
        None leaves a block-sampler field at its default."""
        names = {f.name for f in dataclasses.fields(cls)} - {"rule", "rule_options"}
        fields = {k: v for k, v in kw.items() if k in names and (v is not None or cls._nullable(k))}
        return cls(**fields, rule_options=tuple((k, v) for k, v in kw.items() if k not in names))

    @staticmethod
    def _nullable(name: str) -> bool:
        return name in ("top_k", "top_p", "eos_id", "stop", "mix_weight", "levels")

    def rule_kwargs(self) -> dict:
        """The options dict an acceptance rule receives."""
        return dict(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, **dict(self.rule_options))

    def accept(self) -> acceptance.Rule:
        """The acceptance rule, wrapped in logit mixing when ``mix_weight`` asks for it."""
        return acceptance.with_mix(self.rule, self.mix_weight)

    def keeps_draft_logits(self) -> bool:
        """The samplers keep the drafting logits (RuleInputs) only for rules that read them."""
        return self.accept().needs_inputs

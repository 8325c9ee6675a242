"""Generated tasks with exact answers, for measuring quality and speculative/TiDAR acceptance.

Each example is ``{'kind', 'prompt', 'answer'}``; the trained-on response is ``answer + TERMINATOR``
(e.g. prompt ``'12+35='``, response ``'47\\n'``). Prompts are short ASCII so a byte-level model learns them quickly.
Generation is deterministic in the seed; ``split='val'``/``'train'`` keeps only examples that the pipeline's
document split (a hash of prompt and response, see :func:`zaya.data.sources.heldout`) puts in that split, so an
eval set drawn with ``split='val'`` never overlaps a model trained on ``source='tasks'`` with the same
``val_fraction``.
"""
from __future__ import annotations

import random

from zaya.data.sources import DataError, Document, heldout

TERMINATOR = "\n"
KINDS = ("add", "mul", "copy", "sort", "brackets", "reverse")  # short answers (1-8 tokens with bytes)
# long answers, LONG_MIN..LONG_MAX characters (one byte token each): where block decoding can commit many tokens
# per step. copy/reverse/sort of long strings, multi-step addition written out step by step ("12+35=47;47+9=56;...")
# and closing an open bracket sequence ("close:([[(" -> ")]])")
LONG_KINDS = ("copy_long", "reverse_long", "sort_long", "add_chain", "brackets_close")
ALL_KINDS = KINDS + LONG_KINDS
TASK_SETS = {"short": KINDS, "long": LONG_KINDS}  # the decode tables' task sets (reported separately)
LONG_MIN, LONG_MAX = 20, 120
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_BRACKETS = ("()", "[]")


def _word(rng, lo, hi, alphabet=_LETTERS) -> str:
    return "".join(rng.choices(alphabet, k=rng.randint(lo, hi)))


def _balanced(rng, pairs: int) -> str:
    """A random balanced bracket string with ``pairs`` pairs (random walk that never goes below zero)."""
    out, stack, opened = [], [], 0
    while opened < pairs or stack:
        if opened < pairs and (not stack or rng.random() < 0.5):
            o, c = rng.choice(_BRACKETS)
            out.append(o)
            stack.append(c)
            opened += 1
        else:
            out.append(stack.pop())
    return "".join(out)


def is_balanced(s: str) -> bool:
    close_to_open = {c: o for o, c in _BRACKETS}
    stack = []
    for ch in s:
        if ch in close_to_open:
            if not stack or stack.pop() != close_to_open[ch]:
                return False
        else:
            stack.append(ch)
    return not stack


def _make(kind: str, rng, max_operand: int, max_len: int) -> dict:
    if kind == "add":
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        prompt, answer = f"{a}+{b}=", str(a + b)
    elif kind == "mul":
        m = min(max_operand, 12)
        a, b = rng.randint(0, m), rng.randint(0, m)
        prompt, answer = f"{a}*{b}=", str(a * b)
    elif kind == "copy":
        w = _word(rng, 1, max_len)
        prompt, answer = f"copy:{w}=", w
    elif kind == "reverse":
        w = _word(rng, 1, max_len)
        prompt, answer = f"reverse:{w}=", w[::-1]
    elif kind == "sort":
        w = _word(rng, 2, max_len, "0123456789" if rng.random() < 0.5 else _LETTERS)
        prompt, answer = f"sort:{w}=", "".join(sorted(w))
    elif kind == "brackets":
        s = _balanced(rng, rng.randint(1, max(1, max_len // 2)))
        if rng.random() < 0.5:  # corrupt: swap a symbol for a random bracket
            i = rng.randrange(len(s))
            s = s[:i] + rng.choice("()[]") + s[i + 1:]
        prompt, answer = f"brackets:{s}=", "yes" if is_balanced(s) else "no"
    elif kind in LONG_KINDS:
        return _make_long(kind, rng)
    else:
        raise DataError(f"unknown task kind {kind!r}; choose from {ALL_KINDS}")
    return {"kind": kind, "prompt": prompt, "answer": answer}


def _make_long(kind: str, rng) -> dict:
    """A task whose answer has LONG_MIN..LONG_MAX characters."""
    n = rng.randint(LONG_MIN, LONG_MAX - 20)
    if kind in ("copy_long", "reverse_long"):
        w = _word(rng, n, n)
        prompt, answer = f"{kind.split('_')[0]}:{w}=", (w if kind == "copy_long" else w[::-1])
    elif kind == "sort_long":
        w = _word(rng, n, n, "0123456789" if rng.random() < 0.5 else _LETTERS)
        prompt, answer = f"sort:{w}=", "".join(sorted(w))
    elif kind == "add_chain":  # 5-10 two-digit terms; each step "s+x=s'" (at most 11 chars), ';'-separated
        xs = [rng.randint(0, 99) for _ in range(rng.randint(5, 10))]
        steps, s = [], xs[0]
        for x in xs[1:]:
            steps.append(f"{s}+{x}={s + x}")
            s += x
        prompt, answer = "+".join(map(str, xs)) + "=", ";".join(steps)
    elif kind == "brackets_close":  # an open prefix with n unclosed brackets (and some closed pairs inside)
        out, stack = [], []
        while len(stack) < n:
            if stack and rng.random() < 0.25:
                out.append(stack.pop())
            else:
                o, c = rng.choice(_BRACKETS)
                out.append(o)
                stack.append(c)
        prompt, answer = f"close:{''.join(out)}=", "".join(reversed(stack))
    else:
        raise DataError(f"unknown long task kind {kind!r}; choose from {LONG_KINDS}")
    return {"kind": kind, "prompt": prompt, "answer": answer}


def generate(n: int, seed: int = 0, kinds=KINDS, *, split: str | None = None, val_fraction: float = 0.05,
             max_operand: int = 99, max_len: int = 8) -> list[dict]:
    """``n`` examples, kinds drawn uniformly from ``kinds``; the same arguments give the same list.

    ``split``: None keeps every example; 'train'/'val' keep only examples in that side of the hash split for
    ``val_fraction`` (drawing more until ``n`` are found). ``max_operand`` bounds a, b of ``add`` (``mul`` uses
    at most 12); ``max_len`` bounds the short kinds' string lengths (``LONG_KINDS`` have their own).
    """
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in ALL_KINDS]
    if bad or not kinds:
        raise DataError(f"task kinds {bad or kinds!r} not known; choose from {ALL_KINDS}")
    if split not in (None, "train", "val"):
        raise DataError(f"split={split!r}; use None, 'train' or 'val'")
    if split == "val" and val_fraction <= 0:
        raise DataError("split='val' with val_fraction <= 0 can never produce an example")
    rng = random.Random(f"zaya.tasks:{int(seed)}")  # str seeds hash with sha512: stable across Python versions
    out, tries = [], 0
    while len(out) < n:
        ex = _make(rng.choice(kinds), rng, max_operand, max_len)
        tries += 1
        if split is None or heldout(as_document(ex).key, val_fraction) == (split == "val"):
            out.append(ex)
        elif tries > 1000 * (n + 10):
            raise DataError(f"could not draw {n} {split} examples (task space too small for val_fraction)")
    return out


def kinds_of(task_set: str) -> tuple[str, ...]:
    """``'short'`` / ``'long'`` -> that set's kinds."""
    if task_set not in TASK_SETS:
        raise DataError(f"task set {task_set!r} not known; choose from {tuple(TASK_SETS)}")
    return TASK_SETS[task_set]


def response(task: dict) -> str:
    """What the model is trained to emit after the prompt."""
    return task["answer"] + TERMINATOR


def as_document(task: dict) -> Document:
    return Document(text=response(task), prompt=task["prompt"])


def score(task: dict, generated_text: str) -> bool:
    """Exact match: the continuation (text generated after the prompt, prompt not included) must start with the
    answer immediately followed by :data:`TERMINATOR`. ``'47\\n...'`` passes for answer 47; ``'47'``,
    ``'470\\n'`` and ``' 47\\n'`` fail."""
    return generated_text.startswith(response(task))


def accuracy(tasks: list[dict], generated: list[str]) -> float:
    if len(tasks) != len(generated):
        raise ValueError(f"{len(tasks)} tasks but {len(generated)} generations")
    return sum(score(t, g) for t, g in zip(tasks, generated)) / max(1, len(tasks))

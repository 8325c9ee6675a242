"""Every shape suffix in the package uses the letters zaya.conventions defines (one set of letters everywhere)."""
import pathlib
import re

import zaya
from zaya import conventions

# a lowercase name, then "_" and a suffix that starts upper-case: x_BTD, acc_BKsQd, row_token_Z
SUFFIX = re.compile(r"\b[a-z][a-z0-9]*(?:_[a-z0-9]+)*_([A-Z][A-Za-z]*)\b")


def suffixes(text: str):
    return [(m.group(0), m.group(1)) for m in SUFFIX.finditer(text)]


def test_suffix_parser():
    assert suffixes("x_BTD = f(acc_BKsQd, row_token_Z); GATHER_MAX = 1; w_up") == [
        ("x_BTD", "BTD"), ("acc_BKsQd", "BKsQd"), ("row_token_Z", "Z")]


def test_every_letter_is_defined_once_in_the_docstring():
    assert len(set(conventions.DIM_LETTERS)) == len(conventions.DIM_LETTERS)
    for ch in conventions.DIM_LETTERS:
        assert re.search(rf"^\s+{ch}  \S|\s{ch}  \S", conventions.__doc__, re.M), f"letter {ch} is not documented"


def test_package_uses_only_convention_letters():
    root = pathlib.Path(zaya.__file__).parent
    bad = [(str(p.relative_to(root)), name) for p in sorted(root.rglob("*.py"))
           for name, suf in suffixes(p.read_text()) if set(suf) - set(conventions.DIM_LETTERS)]
    assert not bad, f"shape suffixes with letters zaya.conventions does not define: {bad}"

"""README.md's code runs: every fenced block is extracted from the file and either executed here or listed in
NOT_RUN with who runs it, so the README and the code cannot drift apart.

Heavy inputs are replaced by tiny stand-ins through one explicit table, SUBSTITUTIONS (README text -> what runs
here): the ZAYA1 checkpoints become the tiny HF fixture (plus the byte tokenizer.json), Gemma-3 token ids become ids of
its 512-token vocab, training runs take a few steps of a 1-layer model, decode budgets shrink. Each table key must
occur in the README, so the table cannot go stale either.

Shell blocks are parsed by bash itself (quoting, ``\\`` continuations, ``$'\\n'``, comments): ``zaya`` and ``python``
are bash functions there that record their argv; the commands then run in this process through the console script's
entry point (``zaya.cli.main``) and ``python -m zaya.train.ablate``'s (``ablate.main``), in README order, in one
scratch folder (``runs/a`` feeds ``runs/b`` as in the README). Python blocks run with ``exec``.
"""
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
README = os.path.join(ROOT, "README.md")

# Blocks not run here, by their first line: who runs them.
NOT_RUN = {
    'pip install -e ".[dev]" && zaya demo --out /tmp/zaya_demo': "CI's install and main job (.ci/run: ci:install)",
    "python -m pytest -x -q -n 2 --reruns 1 --rerun-except . tests":
        "CI's test job (.ci/run: ci:test), of which this test is a part",
    "zaya/            the package": "not code: the package layout",
}

# Training: a few steps of a 1-layer model, no plots or TensorBoard (every `--workdir runs/...` gets these).
QUICK_TRAIN = ("--config.num_steps=3 --config.model.num_layers=1 --config.impl.fast_compile=true "
               "--config.log.progress=false --config.log.plots=false --config.log.tensorboard=false "
               "--config.data.tasks_fraction=0.0 --config.data.num_threads=1 --config.eval.num_batches=0 ")

# README text -> stand-in ({hf}: the tiny HF fixture folder with a tokenizer.json, made by the test).
SUBSTITUTIONS = {
    "path/to/ZAYA1-8B": "{hf}",
    "ZAYA1-base/": "{hf}/",
    "9259": "259",                       # Gemma-3 ids -> ids of the stand-in's 512-token vocab
    "236888": "388",
    "max_new_tokens=64": "max_new_tokens=8",
    "max_new_tokens=32": "max_new_tokens=6",
    "--max-new-tokens 64": "--max-new-tokens 8",
    "--workdir runs/": QUICK_TRAIN + "--workdir runs/",
    "--size-gb 0.5 --out runs/bench": "--quick --size-gb 0.02 --out runs/bench",
    "'tidar.alpha=0.5,1,2'": "'tidar.alpha=0.5,2'",   # two runs of the sweep
    "--decode 8": "--decode 1",                         # one short and one long task prompt per run
    "--control 'tidar.mode=ar'": "--control 'tidar.mode=ar' --config.eval.num_batches=1",  # the control's AR loss
}

_RECORD = r"""
zaya() { printf '%s\0' zaya "$#" "$@" >> "$ZAYA_README_RECORD"; }
python() { printf '%s\0' python "$#" "$@" >> "$ZAYA_README_RECORD"; }
"""  # each command: its name, its argument count, its arguments, NUL-separated


def blocks() -> list[tuple[str, str, int]]:
    """(language, code, line number) of every fenced block in README.md."""
    out, lang, code, start = [], None, [], 0
    with open(README) as f:
        for i, line in enumerate(f, 1):
            fence = re.match(r"^```(\w*)\s*$", line)
            if fence and lang is None:
                lang, code, start = fence.group(1), [], i
            elif fence:
                out.append((lang, "".join(code), start))
                lang = None
            elif lang is not None:
                code.append(line)
    assert lang is None, f"README.md: the block opened at line {start} is never closed"
    return out


def _first_line(code: str) -> str:
    return code.strip().splitlines()[0].strip()


def _runnable():
    return [(lang, code, n) for lang, code, n in blocks() if _first_line(code) not in NOT_RUN]


def test_every_block_is_run_or_listed_and_every_substitution_applies():
    text = open(README).read()
    bs = blocks()
    assert len(bs) >= 6
    firsts = {_first_line(c) for _, c, _ in bs}
    assert set(NOT_RUN) <= firsts, f"NOT_RUN lists blocks the README no longer has: {set(NOT_RUN) - firsts}"
    for lang, code, n in _runnable():
        assert lang in ("python", "bash"), (f"README.md line {n}: a ```{lang} block that this test neither runs nor "
                                            "lists; make it python or bash, or add it to NOT_RUN with who runs it")
    for key in SUBSTITUTIONS:
        assert key in text, f"SUBSTITUTIONS key {key!r} no longer occurs in README.md; update the table"


def test_import_zaya_exposes_what_the_readme_uses():
    code = "import zaya; print(callable(zaya.load), callable(zaya.generate), callable(zaya.sharding.make_mesh))"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"))
    assert r.returncode == 0 and r.stdout.split() == ["True"] * 3, r.stderr[-2000:]


def _substitute(code: str, hf: str) -> str:
    for key, value in SUBSTITUTIONS.items():
        code = code.replace(key, value.format(hf=hf))
    return code


def _shell_commands(code: str, workdir: str) -> list[list[str]]:
    """The commands of a bash block, each as the argv bash hands to ``zaya`` / ``python``."""
    record = os.path.join(workdir, ".commands")
    open(record, "w").close()
    r = subprocess.run(["bash", "-e", "-c", _RECORD + code], cwd=workdir, capture_output=True, text=True,
                       env=dict(os.environ, ZAYA_README_RECORD=record), timeout=60)
    assert r.returncode == 0, r.stderr
    with open(record) as f:
        items = f.read().split("\0")[:-1]
    cmds = []
    while items:
        name, count, items = items[0], int(items[1]), items[2:]
        cmds.append([name, *items[:count]])
        items = items[count:]
    return cmds


def _run_command(argv: list[str]):
    if argv[0] == "zaya":
        from zaya.cli import main
        return main(argv[1:])
    if argv[:3] == ["python", "-m", "zaya.train.ablate"]:
        from zaya.train.ablate import main
        return main(argv[3:])
    raise AssertionError(f"README command {' '.join(argv)!r}: this test does not know how to run it")


def test_readme_blocks_run(tmp_path, fixtures_dir, monkeypatch, capsys):
    from zaya.data.tokenizer import ByteTokenizer
    hf = tmp_path / "ZAYA1-base-standin"
    shutil.copytree(os.path.join(fixtures_dir, "native"), hf)
    ByteTokenizer().save(str(hf / "tokenizer.json"))   # the stand-in checkpoint has a tokenizer, as ZAYA1 does
    os.symlink(os.path.join(ROOT, "experiments"), tmp_path / "experiments")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ZAYA_BENCH_CACHE", str(tmp_path / "xla_cache"))
    ran = []
    for lang, code, n in _runnable():
        code = _substitute(code, str(hf))
        if lang == "python":
            exec(compile(code, f"README.md:{n}", "exec"), {"__name__": "__readme__"})
            ran.append(n)
            continue
        for argv in _shell_commands(code, str(tmp_path)):
            try:
                _run_command(argv)
            except SystemExit as e:
                if e.code:
                    raise AssertionError(f"README.md:{n}: {' '.join(argv)} exited {e.code}:\n"
                                         f"{capsys.readouterr().err[-3000:]}") from None
            ran.append((n, argv[1] if argv[0] == "zaya" else argv[2]))
    out = capsys.readouterr().out
    assert [r for r in ran if not isinstance(r, int)], "no shell command ran"
    # what the commands left behind: the README's own paths
    for path in ("zaya1-base/tokenizer.json", "hf-out/config.json", "runs/a/model/tokenizer.json",
                 "runs/b/model/tokenizer.json", "runs/abl/ablation.md"):
        assert (tmp_path / path).exists(), path
    assert "prompt [2, " in out and "tokens/forward" in out
    md = (tmp_path / "runs" / "abl" / "ablation.md").read_text()
    assert md.count("\n") == 2 + 2 and "ar_vs_control" in md and "tpf_long" in md  # one row per alpha
    assert (tmp_path / "runs" / "bench" / "convert.md").exists()

"""Test setup: 8 simulated CPU devices (sharding tests), fp32 matmuls, shared fixtures, required-test guards."""
import importlib.util
import os

DEVICES = 8
# Added to the user's own XLA_FLAGS (e.g. an ISA cap), never replaced by them: the multi-device tests need it.
_flags = os.environ.get("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count={DEVICES}".strip()
# Tests compile hundreds of tiny programs and run each for milliseconds: LLVM's -O0 code generation cuts the
# suite's wall time by about a fifth. A user's own optimization level (XLA_FLAGS) is kept.
if "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
_CANDIDATES = [os.environ.get("ZAYA_FIXTURES", ""),
               os.path.join(_HERE, "..", "..", "shared", "fixtures", "zaya_tiny"),  # ../shared beside the checkout
               os.path.join(_HERE, "fixtures", "zaya_tiny")]  # a copy of the shared fixtures, for any checkout
FIXTURES = next((os.path.abspath(p) for p in _CANDIDATES if p and os.path.isdir(p)), _CANDIDATES[-1])


@pytest.fixture(scope="session")
def fixtures_dir():
    if not os.path.isdir(FIXTURES):
        pytest.fail(f"fixtures not found at {FIXTURES}; set ZAYA_FIXTURES to ../shared/fixtures/zaya_tiny")
    return FIXTURES


def need_devices(n: int):
    """Fail (never skip) when fewer than n devices exist: a required multi-device test must not vanish."""
    if jax.device_count() < n:
        pytest.fail(f"this test needs {n} devices, jax sees {jax.device_count()}: XLA_FLAGS="
                    f"{os.environ.get('XLA_FLAGS')!r} sets another --xla_force_host_platform_device_count, or jax "
                    f"started before tests/conftest.py (remove the flag or set it to {DEVICES})")


DEV_EXTRAS = ("xdist", "nbclient", "nbformat", "ipykernel")  # `pip install -e ".[dev]"` installs these with torch


def require(module: str, minversion: str | None = None, why: str = ""):
    """Import a test dependency. Where the dev extras are installed (as in CI) a missing or too old one FAILS the
    test; only a bare runtime install (no dev extras) skips, with the reason."""
    dev = all(importlib.util.find_spec(m) is not None for m in DEV_EXTRAS)
    try:
        return pytest.importorskip(module, minversion=minversion, reason=why)
    except pytest.skip.Exception as e:
        if dev:
            pytest.fail(f"{why}: the dev extras are installed, so this required test may not skip ({e}); "
                        f"run `pip install -e \".[dev]\"`", pytrace=False)
        raise


def randomize(params, key, scale=0.3):
    """Perturb every leaf (norms, scales, biases, temperatures included) so no term of the forward is trivial."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    out = []
    for x, k in zip(leaves, keys):
        noise = jax.random.normal(k, x.shape, np.float32) * scale * (np.abs(np.asarray(x, np.float32)).mean() + 0.05)
        out.append((x.astype(np.float32) + noise).astype(x.dtype))
    return jax.tree.unflatten(tree, out)


@pytest.fixture(autouse=True)
def _no_persistent_compile_cache():
    """No test may switch the worker onto jax's on-disk compilation cache: both xdist workers would then share
    /tmp/zaya_bench_xla_cache, and later compiles in that process load executables another process wrote."""
    yield
    assert not jax.config.jax_compilation_cache_dir, "a test enabled jax's persistent compilation cache"


def bpe_tokenizer(path, texts):
    """A small byte-level BPE ``tokenizer.json`` at ``path`` (vocab 300; specials <pad> <eos> <bos> <unk> <mask> =
    ids 0..4, so BOS = 2 as the tiny configs), trained on ``texts``. Returns the ``tokenizers.Tokenizer``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.save(str(path))
    return tok


# ---------------------------------------------------------------------------------------------------------------
# Worker crashes. A few full-suite runs (CI included) lost an xdist worker to a fatal signal inside XLA:CPU, each
# time in a different test that passes alone. CI reruns such a test once in a fresh worker (pytest-rerunfailures:
# `--reruns 1 --rerun-except .`, so an ordinary failure is never rerun), and the crashed worker's stack is printed
# at the end of the run, where a truncated CI log still shows it. The first stack caught this way (2026-12-05, a local
# full run): SIGSEGV inside XLA:CPU's compile (jax compiler.backend_compile_and_load) of a program jitted with
# zaya.train.step.FAST_COMPILE's options (tests/test_train_step.py _state); the second (a clean-clone CI run) in the
# compile of tests/test_sharding.py's programs with {"xla_backend_optimization_level": 0} alone. The earlier crashes
# were in tests whose programs use that option too: suspect XLA:CPU at optimization level 0 first. The third (a
# clean-clone CI run, 2026-12-05 stop 18) weakens that: SIGSEGV in the compile of zaya.generate's AOT executable
# (tests/test_samplers_trained.py), default options. The fourth (a local full run, 2026-12-05 stop 19, no other load)
# too: zaya.generate's AOT compile (tests/test_samplers.py test_lossless_samplers_match_ar_distribution), default
# options, under the persistent compilation cache's _compile_and_write_cache. The fifth (a clean-clone CI run, stop
# 19): zaya.generate's AOT compile once more (tests/test_sharding.py). That run used `--dist loadgroup`, under which
# the controller hung with no workers after the crash instead of rerunning the test: keep the default scheduling.
# What the five share: an XLA:CPU compile, while the other worker compiles too. The sixth and seventh (stop 20, the
# first two full runs with the suite-wide -O0 below): zaya.generate's AOT compile (tests/test_samplers.py, SIGSEGV,
# local) and a jit compile in tests/test_samplers_trained.py's fixture (SIGABRT from a thread without a Python frame,
# clean-clone CI run); the eighth, SIGABRT again, in zaya.generate's AOT compile (test_samplers.py, clean-clone CI
# run); all reran and passed. -O0 may make them more frequent (3 in 3 runs, against about 1 in 3 before): a crash costs the rerun, about 30 s. The multi-process and launch tests' children, whose crash could not
# be rerun, compile at the default level (tests/multihost.py and tests/test_launch.py drop XLA_FLAGS).

@pytest.hookimpl(trylast=True)  # after pytest's faulthandler plugin, which points it at stderr
def pytest_configure(config):
    if not hasattr(config, "workerinput"):  # the controller: a folder the workers write their crash stacks to
        import tempfile
        os.environ["ZAYA_CRASH_DIR"] = config._zaya_crash_dir = tempfile.mkdtemp(prefix="zaya-crash-")
    elif os.environ.get("ZAYA_CRASH_DIR"):
        import faulthandler
        path = os.path.join(os.environ["ZAYA_CRASH_DIR"], f"{config.workerinput['workerid']}-{os.getpid()}.txt")
        config._zaya_crash_file = open(path, "w")  # kept open: faulthandler writes to its fd on a fatal signal
        faulthandler.enable(config._zaya_crash_file, all_threads=True)


def crash_report(text: str, max_lines: int = 60) -> str:
    """The useful part of a faulthandler dump: the error line and the crashing thread's stack (the last frames of
    the other threads and the extension-module list are left out). A signal raised on a thread without Python
    frames (e.g. SIGABRT from an XLA compile thread) marks no "Current thread": then the deepest Python stack, the
    test's own thread, stands for it."""
    lines = text.splitlines()
    head = [ln for ln in lines[:3] if ln.startswith("Fatal Python error")]
    stacks, body = [], None
    for ln in lines:
        if ln.startswith(("Current thread", "Thread ")):
            body = [ln]
            stacks.append(body)
        elif body is not None and ln.startswith(" "):
            body.append(ln)
        else:
            body = None
    if not stacks:
        return "\n".join(lines[:max_lines])
    current = [b for b in stacks if b[0].startswith("Current thread")]
    return "\n".join(head + (current or [max(stacks, key=len)])[0][:max_lines])


def pytest_terminal_summary(terminalreporter, config):
    d = getattr(config, "_zaya_crash_dir", None)
    if not d or not os.path.isdir(d):
        return
    import shutil
    for name in sorted(os.listdir(d)):
        with open(os.path.join(d, name)) as f:
            text = f.read()
        if text.strip():
            terminalreporter.section(f"xdist worker {name.split('-')[0]} died (its stack, from faulthandler)")
            terminalreporter.write_line(crash_report(text))
    shutil.rmtree(d, ignore_errors=True)

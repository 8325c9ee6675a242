"""The test harness itself: the device-count flag survives a user's XLA_FLAGS, required tests fail rather than skip."""
import os
import subprocess
import sys

import jax
import pytest

from conftest import DEVICES, need_devices, require

HERE = os.path.dirname(os.path.abspath(__file__))


def test_device_flag_is_added_to_a_users_xla_flags():
    """A user's own XLA_FLAGS (here an ISA cap) keep the simulated devices: conftest appends, never setdefaults."""
    env = dict(os.environ, XLA_FLAGS="--xla_cpu_max_isa=SSE4_2", JAX_PLATFORMS="cpu")
    code = ("import sys, os; sys.path.insert(0, sys.argv[1]); import conftest, jax; "
            "print(jax.device_count(), os.environ['XLA_FLAGS'])")
    out = subprocess.run([sys.executable, "-c", code, HERE], env=env, capture_output=True, text=True, check=True)
    count, flags = out.stdout.split(" ", 1)
    assert int(count) == DEVICES
    assert "--xla_cpu_max_isa=SSE4_2" in flags and f"device_count={DEVICES}" in flags


def test_this_session_sees_the_simulated_devices():
    assert jax.device_count() >= DEVICES, os.environ.get("XLA_FLAGS")


def test_need_devices_fails_instead_of_skipping():
    with pytest.raises(pytest.fail.Exception, match="needs 9999 devices"):
        need_devices(9999)


def test_require_fails_when_dev_extras_are_installed(monkeypatch):
    import conftest
    monkeypatch.setattr(conftest, "DEV_EXTRAS", ("pytest",))  # "dev extras installed"
    with pytest.raises(pytest.fail.Exception, match="may not skip"):
        require("zaya_no_such_module", why="needs it")
    monkeypatch.setattr(conftest, "DEV_EXTRAS", ("zaya_no_such_extra",))  # a bare runtime install: skip
    with pytest.raises(pytest.skip.Exception):
        require("zaya_no_such_module", why="needs it")
    assert require("numpy").__name__ == "numpy"


def test_a_crashed_worker_reruns_once_and_an_ordinary_failure_never(tmp_path):
    """CI's flags (README ci:test): a test whose xdist worker dies of SIGSEGV runs again in a fresh worker and
    passes; an assertion failure is not rerun; the dead worker's stack is printed at the end of the run."""
    import shutil
    shutil.copy(os.path.join(HERE, "conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_x.py").write_text(
        "import ctypes, os\n"
        "def test_crash_once():\n"
        f"    flag = {str(tmp_path / 'flag')!r}\n"
        "    if not os.path.exists(flag):\n"
        "        open(flag, 'w').close()\n"
        "        ctypes.string_at(0)\n"
        "def test_fails():\n"
        "    assert 1 == 2\n")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", "--reruns", "1", "--rerun-except", ".",
                        "-p", "no:cacheprovider", "test_x.py"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    last = r.stdout.strip().splitlines()[-1]
    assert "1 failed, 1 passed, 1 rerun" in last, r.stdout[-3000:]
    assert "FAILED test_x.py::test_fails" in r.stdout
    assert "died (its stack, from faulthandler)" in r.stdout and "in test_crash_once" in r.stdout


def test_crash_report_without_a_current_thread_keeps_the_deepest_stack():
    """SIGABRT raised on a thread with no Python frames: no "Current thread" line; the test's thread (deepest) is kept."""
    from conftest import crash_report
    dump = ("Fatal Python error: Aborted\n\nThread 0x1 (most recent call first):\n  File \"t.py\", line 1 in wait\n\n"
            "Thread 0x2 (most recent call first):\n  File \"jax.py\", line 9 in compile\n  File \"test_a.py\", line 3 in "
            "fixture\n\nExtension modules: numpy (total: 1)\n")
    assert crash_report(dump).splitlines() == ["Fatal Python error: Aborted", "Thread 0x2 (most recent call first):",
                                               '  File "jax.py", line 9 in compile',
                                               '  File "test_a.py", line 3 in fixture']


def test_crash_report_keeps_the_error_and_the_crashing_thread():
    from conftest import crash_report
    dump = ("Fatal Python error: Segmentation fault\n\nThread 0x1 (most recent call first):\n  File \"a.py\", line 1 "
            "in idle\n\nCurrent thread 0x2 (most recent call first):\n  File \"b.py\", line 2 in crash\n  File "
            "\"c.py\", line 3 in test_x\n\nExtension modules: numpy (total: 1)\n")
    out = crash_report(dump)
    assert out.splitlines() == ["Fatal Python error: Segmentation fault", "Current thread 0x2 (most recent call first):",
                                '  File "b.py", line 2 in crash', '  File "c.py", line 3 in test_x']

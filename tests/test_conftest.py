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

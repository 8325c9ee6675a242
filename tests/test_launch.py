"""launch/gpu_check.sh: its CPU smoke run (SMOKE=1) goes through every benchmark stage at the tiny preset and says
how each ended; without a GPU and without SMOKE it refuses with a clear message instead of measuring the CPU."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "launch", "gpu_check.sh")


def _run(tmp_path, **env):
    e = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=sys.executable, **env)
    e.pop("XLA_FLAGS", None)  # one CPU device, as a user's shell has
    return subprocess.run(["bash", SCRIPT], cwd=ROOT, env=e, capture_output=True, text=True, timeout=900)


def test_smoke_runs_every_stage(tmp_path):
    r = _run(tmp_path, SMOKE="1")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = tmp_path / "out"
    stages = (out / "stages.txt").read_text().splitlines()
    assert [s.split()[1].rstrip(":") for s in stages] == ["attention", "moe", "system"]
    assert all("exit 0" in s for s in stages)
    assert "platform: cpu" in (out / "platform.txt").read_text()
    for f in ("attention/attention.md", "moe/moe.md", "system/system.md"):
        assert (out / f).is_file(), f


def test_refuses_without_a_gpu(tmp_path):
    if shutil.which("nvidia-smi") or shutil.which("rocm-smi"):
        pytest.skip("this machine has a GPU tool: the refusal is for machines without one")
    r = _run(tmp_path)
    assert r.returncode == 2 and "no GPU found" in r.stderr and "SMOKE=1" in r.stderr

"""``zaya bench memory``: the run's train step compiled on abstract inputs over a simulated mesh; per-device bytes
from the compiled program, which shrink as fsdp shards the state."""
import json
import os
import subprocess
import sys

import pytest

from zaya.bench import memory

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
TINY = ["--config.seq_len=32", "--config.model.num_layers=1", "--config.impl.fast_compile=true"]


def test_parse_mesh():
    assert memory.parse_mesh("data=2,fsdp=4") == {"data": 2, "fsdp": 4}
    assert memory.parse_mesh(None) == {}
    with pytest.raises(SystemExit, match="axis=size"):
        memory.parse_mesh("pipeline=2")


def _run(tmp_path, mesh):
    out = tmp_path / mesh.replace(",", "_").replace("=", "")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the command sets its own device count
    r = subprocess.run([sys.executable, "-m", "zaya.cli", "bench", "memory", "--config",
                        f"{ROOT}/experiments/pretrain_ar.py:tiny", "--mesh", mesh, "--out", str(out), *TINY],
                       cwd=ROOT, env=dict(env, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "memory.json").read_text())
    assert "Train-step memory per device" in r.stdout and (out / "memory.md").exists()
    return res


def test_fsdp_shards_the_state(tmp_path):
    """On 4 simulated devices (the command re-runs itself with the device count): fsdp=4 holds about a quarter of
    the fp32 params + Adam state per device that data=4 (replicated) holds."""
    rep, shd = _run(tmp_path, "data=4"), _run(tmp_path, "fsdp=4")
    assert rep["devices"] == shd["devices"] == 4 and shd["mesh"]["fsdp"] == 4
    a, b = rep["bytes_per_device"], shd["bytes_per_device"]
    assert all(v >= 0 for v in a.values()) and a["peak"] > 0
    state_bytes = 3 * 4 * rep["num_params"]  # params + two Adam moments, fp32
    assert a["argument"] >= state_bytes  # replicated: the whole state on every device
    assert b["argument"] < 0.4 * a["argument"]  # sharded at rest over fsdp=4


def test_bad_config_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        memory.load_config(f"{ROOT}/experiments/pretrain_ar.py:tiny", {"data": 3}, ["--config.batch_size=8"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("zaya bench memory: ConfigError:") and "batch_size=8" in err and err.count("\n") == 1

"""Multi-process training (``jax.distributed`` on 127.0.0.1, simulated CPU devices): the per-step losses of 2
processes x 2 devices equal 1 process x 4 devices on the same mesh shape; every process loads exactly the rows its
devices hold (``batch_shard``)."""
import json
import os
import signal
import time

import jax
import multihost
import numpy as np
import pytest

from zaya.train.logs import read_jsonl

EXP = os.path.join(multihost.ROOT, "experiments", "pretrain_ar.py:tiny")
STEPS = 2
# tiny and quick to compile; eval and a checkpoint at the end exercise the collectives every process must call
TINY = [f"--config.num_steps={STEPS}", "--config.seq_len=32", "--config.batch_size=8", "--config.optim.warmup_steps=1",
        "--config.model.num_layers=1", "--config.impl.fast_compile=true", "--config.log.progress=false",
        "--config.log.plots=false", "--config.data.tasks_fraction=0.0", "--config.eval.num_batches=1",
        f"--config.checkpoint.every_steps={STEPS}"]


def _mesh_args(mesh: dict) -> list[str]:
    sizes = {**dict(data=1, fsdp=1, tensor=1, expert=1), **mesh}
    return [f"--config.mesh.{k}={v}" for k, v in sizes.items()] + ["--config.mesh.num_devices=4"]


# (pure data parallelism, data=4, is the mesh of the dead-peer test below: each mesh runs once, for CI's time)
@pytest.mark.parametrize("mesh", [dict(data=2, expert=2), dict(fsdp=2, tensor=2)], ids=["data2xexpert2", "fsdp2xtensor2"])
def test_two_processes_equal_one(tmp_path, mesh):
    runs = {}
    for n in (1, 2):
        wd = tmp_path / f"p{n}"
        wd.mkdir()
        multihost.run(["train", "--config", EXP, "--workdir", str(wd), *TINY, *_mesh_args(mesh)],
                      num_processes=n, devices=4 // n, logdir=str(wd))
        runs[n] = read_jsonl(str(wd / "metrics.jsonl"))
    assert [r["step"] for r in runs[2]] == list(range(1, STEPS + 1))
    one, two = (np.array([r["loss"] for r in runs[n]]) for n in (1, 2))
    np.testing.assert_allclose(two, one, rtol=1e-5, atol=1e-6)
    assert sorted(os.listdir(tmp_path / "p2" / "checkpoints")) == [str(STEPS)]
    # the model folder process 0 wrote after gathering the sharded params equals the single-process one
    import zaya
    p1, p2 = (zaya.load(str(tmp_path / f"p{n}" / "model")).params for n in (1, 2))
    # Adam's first steps move a weight by about +-lr whatever its grad's size, so a near-zero grad whose rounding
    # differs between the layouts (gloo vs in-process reductions) moves its weight the other way: a few elements
    # per million may differ by up to 2 lr; all others agree to 1e-5
    assert jax.tree.structure(p1) == jax.tree.structure(p2)
    a, b = (np.concatenate([np.asarray(x, np.float32).ravel() for x in jax.tree.leaves(p)]) for p in (p1, p2))
    off = np.abs(a - b) > 1e-5 + 1e-4 * np.abs(a)
    assert off.mean() < 5e-3 and np.abs(a - b).max() < 2.5 * 3e-3, (off.sum(), a.size, np.abs(a - b).max())


def test_dead_peer_stops_the_job_and_a_rerun_resumes(tmp_path):
    """kill -9 of process 1 mid-run: process 0 exits with an error within 60 s (no hang in a collective); the same
    command again resumes both processes from the last complete checkpoint, and the losses equal an
    uninterrupted single-process run (mesh data=4: the multi-node data-parallel case)."""
    steps, mesh = 5, _mesh_args(dict(data=4))
    args = lambda wd: ["train", "--config", EXP, "--workdir", str(wd), *TINY, f"--config.num_steps={steps}",
                       "--config.checkpoint.every_steps=2", "--config.export_model=false", *mesh]
    ref = tmp_path / "ref"
    ref.mkdir()
    multihost.run(args(ref), num_processes=1, devices=4, logdir=str(ref))
    wd = tmp_path / "job"
    wd.mkdir()
    procs = multihost.start(args(wd), num_processes=2, devices=2, logdir=str(wd), heartbeat_s=10)
    metrics = wd / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and len(read_jsonl(str(metrics))) >= 3):  # past the first checkpoint (step 2)
        assert time.monotonic() < deadline and procs[0].poll() is None, multihost.logs(procs)
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    code = multihost.wait(procs[:1], timeout=60)[0]
    assert time.monotonic() - t0 < 60 and code != 0, f"process 0 did not stop on its dead peer\n{multihost.logs(procs)}"
    procs[1].wait()
    done = read_jsonl(str(metrics))
    assert len(done) < steps, "premise: the job was killed before it finished"
    multihost.run(args(wd), num_processes=2, devices=2, logdir=str(wd))
    got, want = read_jsonl(str(metrics)), read_jsonl(str(ref / "metrics.jsonl"))
    assert [r["step"] for r in got] == list(range(1, steps + 1))
    np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in want], rtol=1e-5, atol=1e-6)


def test_generate_on_two_processes_equals_one(tmp_path):
    """zaya.generate (AR in the host loop, single_forward in the device loop) on a data=2 x tensor=2 mesh spread over
    2 processes gives the tokens of the same mesh in one process (which tests/test_sharding.py checks against one
    device)."""
    script = os.path.join(multihost.ROOT, "tests", "multihost_generate.py")
    out = {}
    for n in (1, 2):
        multihost.run([script, str(tmp_path / f"p{n}.json")], num_processes=n, devices=4 // n, logdir=str(tmp_path),
                      timeout=300)
        out[n] = json.loads((tmp_path / f"p{n}.json").read_text())
    assert out[2] == out[1]
    assert all(len(r) == 8 for rows in out[1].values() for r in rows)

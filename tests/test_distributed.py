"""Joining a multi-process job: which GPUs a process owns under SLURM (one per GPU, one per node, k per process),
and ``zaya train --dry-run`` under simulated SLURM variables (2 local processes on CPU)."""
import multihost
import pytest

from zaya.train import distributed as dist


def _slurm(local, tasks, gpus, **extra):
    return dict(SLURM_LOCALID=str(local), SLURM_NTASKS_PER_NODE=str(tasks), SLURM_GPUS_ON_NODE=str(gpus), **extra)


@pytest.mark.parametrize("env,want", [
    (_slurm(3, 8, 8), [3]),                                       # one process per GPU
    (_slurm(0, 1, 8), list(range(8))),                            # one per node: every GPU (jax alone: [0])
    (_slurm(1, 2, 8), [4, 5, 6, 7]),                              # 4 GPUs per process
    (dict(SLURM_LOCALID="0", SLURM_TASKS_PER_NODE="1(x64)", SLURM_GPUS_PER_NODE="h100:8"), list(range(8))),
    (dict(SLURM_LOCALID="2", SLURM_TASKS_PER_NODE="4", CUDA_VISIBLE_DEVICES="0,1,2,3"), [2]),
    (_slurm(0, 1, 8, JAX_LOCAL_DEVICE_IDS="0,1"), None),          # the user's explicit choice: left to jax
    (dict(SLURM_LOCALID="0", SLURM_NTASKS_PER_NODE="1"), None),   # GPU count unknown (CPU nodes)
    ({}, None)])                                                  # not SLURM
def test_local_device_ids(env, want):
    assert dist.local_device_ids(env) == want


def test_tasks_that_do_not_divide_the_gpus_raise():
    with pytest.raises(ValueError, match="3 tasks per node and 8 GPUs"):
        dist.local_device_ids(_slurm(0, 3, 8))


@pytest.mark.parametrize("env,want", [({}, False), (dict(SLURM_NTASKS="1"), False), (dict(SLURM_NTASKS="16"), True),
                                      (dict(JAX_COORDINATOR_ADDRESS="h:1"), True),
                                      (dict(OMPI_COMM_WORLD_SIZE="2"), True)])
def test_wanted(env, want):
    assert dist.wanted(env) is want


def test_dry_run_under_simulated_slurm(tmp_path):
    """Two processes find each other from SLURM variables alone and print their devices, mesh coordinates and rows:
    on data=2 x tensor=2 each process owns one data shard (its two devices differ only along tensor, which does not
    split rows)."""
    exp = f"{multihost.ROOT}/experiments/pretrain_ar.py:tiny"
    logs = multihost.run(["train", "--config", exp, "--workdir", str(tmp_path / "w"), "--dry-run",
                          "--config.mesh.data=2", "--config.mesh.tensor=2", "--config.mesh.num_devices=4"],
                         num_processes=2, devices=2, logdir=str(tmp_path), timeout=120, slurm=True)
    for i, log in enumerate(logs):
        assert f"process {i}/2: 2 local devices" in log, log
        assert f"loads rows [{4 * i}, {4 * i + 4}) of each global batch of 8 (data shard {i} of 2)" in log, log
        for t in (0, 1):
            assert f"-> mesh {{'data': {i}, 'fsdp': 0, 'tensor': {t}, 'expert': 0}} -> rows [{4 * i}, {4 * i + 4})" \
                in log, log
    assert not (tmp_path / "w").exists()  # a dry run writes nothing

"""Distributed set-up decisions: ranks from the launcher's environment, the GPU of a process."""

import pytest
import torch

from ssv2prep.errors import ConfigError
from ssv2prep.train.dist import DistInfo, all_ok, device_index, world_from_env


def test_torchrun_variables_win_over_slurm() -> None:
    env = {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2"}
    assert world_from_env(env) == (5, 1, 8)


def test_an_srun_launch_reads_slurm_variables() -> None:
    env = {
        "SLURM_PROCID": "6",
        "SLURM_LOCALID": "2",
        "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_NTASKS": "8",
        "MASTER_ADDR": "node1",
        "MASTER_PORT": "29500",
    }
    assert world_from_env(env) == (6, 2, 8)


def test_a_batch_script_in_a_multi_task_allocation_is_one_process() -> None:
    # sbatch --ntasks 8 runs the script itself as one task: SLURM_NTASKS is the allocation's, not the step's
    assert world_from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "1"}) == (0, 0, 1)
    assert world_from_env({}) == (0, 0, 1)


def test_srun_tasks_without_a_meeting_point_are_refused() -> None:
    with pytest.raises(ConfigError, match="MASTER_ADDR and MASTER_PORT"):
        world_from_env({"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "4"})


@pytest.mark.parametrize(
    ("local_rank", "device_count", "expected"),
    [
        (3, 8, 3),  # every GPU of the node visible: cuda:LOCAL_RANK
        (3, 1, 0),  # one GPU per process (--gpus-per-task, Kubernetes): cuda:0, whatever the rank
        (5, 4, 1),  # 8 ranks on 4 visible GPUs (resumed on a smaller node): two per GPU
        (0, 1, 0),
    ],
)
def test_device_index_is_the_local_rank_among_visible_gpus(local_rank: int, device_count: int, expected: int) -> None:
    assert device_index(local_rank, device_count) == expected


def test_no_visible_gpu_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="no CUDA device"):
        device_index(0, 0)


def test_all_ok_in_one_process_is_the_local_answer() -> None:
    info = DistInfo(device=torch.device("cpu"))
    assert all_ok(True, info) and not all_ok(False, info)

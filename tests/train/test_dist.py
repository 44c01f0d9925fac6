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


# Two gloo ranks; rank 0's write raises a ValueError (not an OSError or one of ours), as a plot of a torn metrics
# line would. Each rank prints what it raised (a rank left waiting at the collective would time out after 20 s).
ON_MAIN_RANKS = """
import sys
from ssv2prep.train.dist import init_distributed, on_main, teardown

info = init_distributed("cpu", timeout_s=20)
def write():
    raise ValueError("bad plot data")
try:
    on_main(info, "write the plots", write)
except Exception as exc:
    print(f"{type(exc).__name__}: {exc}", flush=True)
teardown(info)
"""


def test_any_error_of_rank_0_in_on_main_stops_the_other_ranks_at_once() -> None:
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for rank in range(2):
        env = os.environ | {
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "RANK": str(rank),
            "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
        }  # fmt: skip
        cmd = [sys.executable, "-c", ON_MAIN_RANKS]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=120) for p in procs]
    assert [out.strip() for out, _ in results] == [
        "ValueError: bad plot data",
        "Ssv2PrepError: rank 0 failed to write the plots (its error is in its log); stopping",
    ], [err[-1500:] for _, err in results]

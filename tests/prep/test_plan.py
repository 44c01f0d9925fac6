"""`--part K/N` and `--part auto`: which part of the shard plan this machine writes."""

from __future__ import annotations

import pytest

from ssv2prep.errors import ConfigError
from ssv2prep.prep.plan import parse_part


@pytest.mark.parametrize(
    ("env", "want"),
    [
        ({"AWS_BATCH_JOB_ARRAY_INDEX": "0", "AWS_BATCH_JOB_ARRAY_SIZE": "4"}, (1, 4)),
        ({"AWS_BATCH_JOB_ARRAY_INDEX": "3", "AWS_BATCH_JOB_ARRAY_SIZE": "4"}, (4, 4)),
        ({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "8"}, (3, 8)),
        # sbatch --array=1-8: ids 1..8, shifted by the array's minimum
        ({"SLURM_ARRAY_TASK_ID": "8", "SLURM_ARRAY_TASK_COUNT": "8", "SLURM_ARRAY_TASK_MIN": "1"}, (8, 8)),
        ({"JOB_COMPLETION_INDEX": "5", "SSV2PREP_PARTS": "6"}, (6, 6)),
    ],
)
def test_part_auto_reads_the_array_job(env: dict[str, str], want: tuple[int, int]) -> None:
    assert parse_part("auto", env) == want


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "not inside an array job"),
        ({"JOB_COMPLETION_INDEX": "1"}, "SSV2PREP_PARTS is not set"),
        ({"AWS_BATCH_JOB_ARRAY_INDEX": "4", "AWS_BATCH_JOB_ARRAY_SIZE": "4"}, "outside an array of 4"),
        ({"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "2"}, "not integers"),
    ],
)
def test_part_auto_outside_or_inconsistent_is_a_flag_error(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse_part("auto", env)
    assert str(info.value).startswith("--part auto:")


def test_part_k_of_n() -> None:
    assert parse_part("2/4") == (2, 4)
    assert parse_part(None) is None
    for bad in ("0/4", "5/4", "2-4", "auto/2"):
        with pytest.raises(ConfigError, match="--part"):
            parse_part(bad)

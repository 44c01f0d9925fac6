"""Checkpoints: atomic save, weights-only load, RNG round trip, clear errors."""

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import small_tmpfs

from ssv2prep.errors import CheckpointError
from ssv2prep.train.checkpoint import check_compatible, load_checkpoint, rng_state, save_checkpoint, set_rng_state


def test_round_trip_restores_rngs_exactly(tmp_path) -> None:
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    state = rng_state()
    expected = (torch.rand(3), random.random(), np.random.rand(2))
    save_checkpoint(tmp_path / "c.pt", {"model": {"w": torch.ones(2)}, "rng": state, "epoch": 3})
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    loaded = load_checkpoint(tmp_path / "c.pt")
    set_rng_state(loaded["rng"])
    again = (torch.rand(3), random.random(), np.random.rand(2))
    assert torch.equal(expected[0], again[0]) and expected[1] == again[1]
    np.testing.assert_array_equal(expected[2], again[2])
    assert loaded["epoch"] == 3 and torch.equal(loaded["model"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temp file left


def test_foreign_and_broken_files_are_clear_errors(tmp_path) -> None:
    torch.save({"state_dict": {}}, tmp_path / "official.pth")
    with pytest.raises(CheckpointError, match="not an ssv2prep checkpoint"):
        load_checkpoint(tmp_path / "official.pth")
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match=r"junk\.pt"):
        load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_code_in_a_checkpoint_is_never_run(tmp_path) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"format": "ssv2prep-checkpoint-v1", "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "evil.pt")


def test_incompatible_resume_names_the_difference() -> None:
    with pytest.raises(CheckpointError, match="num_segments: checkpoint 8, asked 16"):
        check_compatible(
            {"num_segments": 8, "backbone": "resnet50"},
            {"num_segments": 16, "backbone": "resnet50"},
            ("backbone", "num_segments"),
        )


def test_a_full_disk_is_one_clear_error_and_keeps_the_old_file(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "disk", "256k") as disk:
        save_checkpoint(disk / "last.pt", {"epoch": 1})
        with pytest.raises(CheckpointError) as err:
            save_checkpoint(disk / "last.pt", {"epoch": 2, "model": {"w": torch.zeros(256, 1024)}})  # 1 MiB
        message = str(err.value)
        assert message.startswith(f"{disk / 'last.pt'}: cannot write the checkpoint") and "full" in message
        assert "\n" not in message and "inline_container" not in message
        assert [p.name for p in disk.iterdir()] == ["last.pt"]  # no partial temp file left behind
        assert load_checkpoint(disk / "last.pt")["epoch"] == 1


def test_a_read_only_folder_is_one_clear_error(tmp_path: Path) -> None:
    with (
        small_tmpfs(tmp_path / "ro", "64k", read_only=True) as ro,
        pytest.raises(CheckpointError, match=r"ro/run/last\.pt: cannot write the checkpoint \(Read-only"),
    ):
        save_checkpoint(ro / "run" / "last.pt", {"epoch": 1})


def test_rng_state_of_a_process_round_trips_without_cuda_and_reads_old_files() -> None:
    torch.manual_seed(5)
    state = rng_state(torch.device("cpu"))
    assert state["cuda_device"] is None  # only the device this process trains on would be saved
    expected = torch.rand(2)
    set_rng_state(state, torch.device("cpu"))
    assert torch.equal(torch.rand(2), expected)
    old = {**state, "cuda": []}  # an older file: the list of every GPU's state, which is not restored
    del old["cuda_device"]
    set_rng_state(old, torch.device("cpu"))
    assert torch.equal(torch.rand(2), expected)

"""Training and evaluation end to end on tiny synthetic shards (CPU, resnet18, 4 frames of 32 px)."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from fixtures import small_tmpfs

from ssv2prep.cli import main
from ssv2prep.data.loader import DataConfig
from ssv2prep.errors import ConfigError
from ssv2prep.models.tsm import ModelConfig
from ssv2prep.train.config import OptimConfig, RuntimeConfig, TrainConfig, run_record
from ssv2prep.train.evaluation import EvalConfig, evaluate_checkpoint
from ssv2prep.train.loop import NonFiniteLossError
from ssv2prep.train.report import read_metrics
from ssv2prep.train.run import fit


def train_args(*, batch_size: int = 4, lr: float = 0.01) -> list[str]:
    return [
        "--backbone",
        "resnet18",
        "--segments",
        "4",
        "--crop-size",
        "32",
        "--scale-size",
        "40",
        "--batch-size",
        str(batch_size),
        "--workers",
        "1",
        "--lr",
        str(lr),
        "--no-lr-scaling",
        "--log-every",
        "1",
        "--dropout",
        "0.0",
        "--device",
        "cpu",
    ]


def tiny_config(shards: Path, out: Path, *, epochs: int = 2, lr: float = 0.01, shift_div: int = 8) -> TrainConfig:
    return TrainConfig(
        train=str(shards / "ssv2-train.json"),
        val=str(shards / "ssv2-validation.json"),
        out=out,
        model=ModelConfig(backbone="resnet18", num_segments=4, shift_div=shift_div, dropout=0.0),
        data=DataConfig(num_segments=4, crop_size=32, scale_size=40, batch_size=4, num_workers=1),
        optim=OptimConfig(epochs=epochs, lr=lr, scale_lr=False, lr_steps=()),
        runtime=RuntimeConfig(device="cpu", log_every=1),
    )


def train_losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]


@pytest.fixture(scope="module")
def trained(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TSM trained 6 epochs on the tiny shards (3 steps per epoch)."""
    out = tmp_path_factory.mktemp("run") / "tsm"
    fit(tiny_config(tiny_shards, out, epochs=6, lr=0.003))
    return out


def test_loss_falls_and_every_output_is_written(trained: Path) -> None:
    losses = [loss for _, loss in train_losses(trained)]
    assert len(losses) == 18  # 6 epochs x (12 videos // batch 4)
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert last < 0.9 * first and last < np.log(4)  # below the loss of a uniform guess over the 4 classes
    for name in ("last.pt", "best.pt", "config.json", "metrics.jsonl", "loss.png", "accuracy.png"):
        assert (trained / name).is_file(), name
    records = read_metrics(trained / "metrics.jsonl")
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["epoch"] for r in evals] == [1, 2, 3, 4, 5, 6] and all(r["videos"] == 4 for r in evals)
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1, 2, 3, 4, 5, 6]
    config = json.loads((trained / "config.json").read_text())
    assert config["model"]["backbone"] == "resnet18" and len(config["classes"]) == 4


def test_resume_after_kill_matches_an_uninterrupted_run(tiny_shards: Path, tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    fit(tiny_config(tiny_shards, reference, epochs=3))
    killed = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "ssv2prep",
        "-q",
        "train",
        "--data",
        str(tiny_shards),
        "--out",
        str(killed),
        "--epochs",
        "3",
        "--lr-steps",
        "",
        *train_args(),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (killed / "last.pt").exists():
        time.sleep(0.01)
    time.sleep(0.3)  # into epoch 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (killed / "last.pt").exists()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ref, got = train_losses(reference), train_losses(killed)
    assert [s for s, _ in got] == [s for s, _ in ref] == list(range(9))
    np.testing.assert_allclose([v for _, v in got], [v for _, v in ref], rtol=1e-5)


class _Crash(Exception):
    pass


def test_resume_mid_epoch_continues_exactly_with_dropout(tiny_shards: Path, tmp_path: Path) -> None:
    """A run stopped inside an epoch resumes from its mid-epoch checkpoint: the same batches, dropout masks and
    weights as a run that was never stopped, and the epoch's means cover the whole epoch."""

    def config(out: Path) -> TrainConfig:
        cfg = tiny_config(tiny_shards, out, epochs=2)
        model = ModelConfig(**{**cfg.model.to_dict(), "dropout": 0.5})
        runtime = RuntimeConfig(device="cpu", log_every=1, checkpoint_every=1)
        return TrainConfig(
            **{**{f: getattr(cfg, f) for f in ("train", "val", "out", "data", "optim")}}, model=model, runtime=runtime
        )

    reference = tmp_path / "reference"
    fit(config(reference))

    def crash_at_step_4(kind: str, data: dict) -> None:
        if kind == "step" and data["step"] == 4:  # epoch 1 (3 steps per epoch), after its first step
            raise _Crash

    stopped = tmp_path / "stopped"
    with pytest.raises(_Crash):
        fit(config(stopped), on_event=crash_at_step_4)
    ckpt = torch.load(stopped / "last.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["epoch_step"], ckpt["global_step"]) == (1, 1, 4)
    fit(config(stopped))

    ref, got = train_losses(reference), train_losses(stopped)
    assert [s for s, _ in got] == [s for s, _ in ref] == list(range(6))  # no step lost, none repeated
    np.testing.assert_allclose([v for _, v in got], [v for _, v in ref], rtol=1e-5)
    epochs = {r["epoch"]: r for r in read_metrics(stopped / "metrics.jsonl") if r["kind"] == "epoch"}
    ref_epochs = {r["epoch"]: r for r in read_metrics(reference / "metrics.jsonl") if r["kind"] == "epoch"}
    assert sorted(epochs) == [1, 2] and epochs[2]["steps"] == 3
    assert epochs[2]["loss"] == pytest.approx(ref_epochs[2]["loss"], rel=1e-5)
    final = torch.load(stopped / "last.pt", weights_only=True)
    ref_final = torch.load(reference / "last.pt", weights_only=True)
    assert final["epoch_step"] == 0 and final["global_step"] == 6
    for name, value in ref_final["model"].items():
        torch.testing.assert_close(final["model"][name], value, rtol=1e-4, atol=1e-6)


def test_resume_with_another_batch_size_restarts_the_interrupted_epoch(
    tiny_shards: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "run"
    cfg = tiny_config(tiny_shards, out, epochs=2)
    cfg = TrainConfig(
        **{**{f: getattr(cfg, f) for f in ("train", "val", "out", "model", "data", "optim")}},
        runtime=RuntimeConfig(device="cpu", log_every=1, checkpoint_every=1),
    )

    def crash_at_step_4(kind: str, data: dict) -> None:
        if kind == "step" and data["step"] == 4:
            raise _Crash

    with pytest.raises(_Crash):
        fit(cfg, on_event=crash_at_step_4)  # 3 steps per epoch: stopped after step 1 of epoch 1
    smaller = TrainConfig(
        **{**{f: getattr(cfg, f) for f in ("train", "val", "out", "model", "optim", "runtime")}},
        data=DataConfig(**{**dataclasses.asdict(cfg.data), "batch_size": 2}),
        allow_changes=True,
    )
    saved = (out / "last.pt").read_bytes()
    with pytest.raises(ConfigError, match=r"other options \(data\.batch_size: 4 -> 2\).*--allow-changes"):
        fit(dataclasses.replace(smaller, allow_changes=False))  # a changed option is refused before any step
    assert (out / "last.pt").read_bytes() == saved and "history" not in json.loads((out / "config.json").read_text())
    with caplog.at_level(logging.WARNING, logger="ssv2prep.train.run"):
        fit(smaller)  # 6 steps per epoch now
    assert "changed options: data.batch_size: 4 -> 2" in caplog.text
    assert "with 3 steps per epoch, this run has 1 with 6" in caplog.text
    config = json.loads((out / "config.json").read_text())
    assert config["data"]["batch_size"] == 2
    assert config["history"] == [{"epoch": 1, "global_step": 4, "changes": {"data.batch_size": [4, 2]}}]
    last = torch.load(out / "last.pt", weights_only=True)
    assert (last["epoch"], last["epoch_step"], last["global_step"], last["steps_per_epoch"]) == (2, 0, 12, 6)
    records = read_metrics(out / "metrics.jsonl")
    # epoch 0 in the old steps (0-2, its epoch record at 3), epoch 1 again from its start in the new ones (6-11)
    assert [r["step"] for r in records if r["kind"] == "train"] == [0, 1, 2, *range(6, 12)]
    assert [(r["epoch"], r["step"], r["steps"]) for r in records if r["kind"] == "epoch"] == [(1, 3, 3), (2, 12, 6)]


def test_resume_with_another_worker_count_restarts_the_interrupted_epoch(
    tiny_shards: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The epoch's clips are dealt to rank x worker slots, so the rest of an epoch cut for 1 worker is not the rest
    of one cut for 2: the interrupted epoch starts again (same steps per epoch, so the schedule is unchanged)."""
    out = tmp_path / "run"
    cfg = tiny_config(tiny_shards, out, epochs=2)
    cfg = TrainConfig(
        **{**{f: getattr(cfg, f) for f in ("train", "val", "out", "model", "optim")}},
        data=DataConfig(**{**dataclasses.asdict(cfg.data), "num_workers": 0}),
        runtime=RuntimeConfig(device="cpu", log_every=1, checkpoint_every=1),
    )

    def crash_at_step_4(kind: str, data: dict) -> None:
        if kind == "step" and data["step"] == 4:
            raise _Crash

    with pytest.raises(_Crash):
        fit(cfg, on_event=crash_at_step_4)
    more = dataclasses.replace(cfg, data=DataConfig(**{**dataclasses.asdict(cfg.data), "num_workers": 2}))
    with caplog.at_level(logging.WARNING, logger="ssv2prep.train.run"):
        fit(more)
    assert "saved with 0 loader workers per rank, this run has 2: restarting epoch 2" in caplog.text
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(6))  # steps 3-5 run once, anew
    last = torch.load(out / "last.pt", weights_only=True)
    assert (last["epoch"], last["epoch_step"], last["global_step"]) == (2, 0, 6)


def test_metrics_use_1_based_epochs_and_a_resumed_run_logs_no_step_twice(tiny_shards: Path, tmp_path: Path) -> None:
    """metrics.jsonl: epochs 1-based in every record; TensorBoard: train/, epoch/train_*, val/ tags, and the steps
    logged after the checkpoint by the stopped run are purged, so each step has one point."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    base = tiny_config(tiny_shards, out, epochs=2)
    cfg = dataclasses.replace(base, runtime=RuntimeConfig(device="cpu", log_every=1))

    def crash_at_step_5(kind: str, data: dict) -> None:
        if kind == "step" and data["step"] == 5:  # steps 3 and 4 are logged, the checkpoint is at the end of epoch 1
            raise _Crash

    with pytest.raises(_Crash):
        fit(cfg, on_event=crash_at_step_5)
    fit(cfg)
    records = read_metrics(out / "metrics.jsonl")
    train = [(r["epoch"], r["step"]) for r in records if r["kind"] == "train"]
    assert train == [(1, 0), (1, 1), (1, 2), (2, 3), (2, 4), (2, 5)]
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1, 2]
    assert [r["epoch"] for r in records if r["kind"] == "eval"] == [1, 2]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "epoch/train_loss", "val/top1"} <= tags
    assert not any(t.startswith("eval/") for t in tags)
    steps = [e.step for e in events.Scalars("train/loss")]
    assert steps == list(range(6))  # the stopped run's steps 3-4 were purged, not kept beside the resumed ones
    losses = {r["step"]: r["loss"] for r in records if r["kind"] == "train"}
    np.testing.assert_allclose([e.value for e in events.Scalars("train/loss")], [losses[s] for s in steps], rtol=1e-6)


def test_nan_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tiny_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "nan"
    fit(tiny_config(tiny_shards, out, epochs=1))
    good = (out / "last.pt").read_bytes()
    with pytest.raises(NonFiniteLossError, match="epoch 1"):
        fit(dataclasses.replace(tiny_config(tiny_shards, out, epochs=2, lr=1e30), allow_changes=True))
    assert (out / "last.pt").read_bytes() == good
    args = ["train", "--data", str(tiny_shards), "--out", str(out), "--epochs", "2", "--lr-steps", ""]
    result = CliRunner().invoke(main, [*args, "--allow-changes", *train_args(lr=1e30)])
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: the loss became")


def test_corrupt_samples_are_skipped_and_counted(tiny_shards: Path, tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    victim = shards / "ssv2-train-000000.tar"
    with tarfile.open(victim) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    first_key = members[0][0].name.split(".")[0]
    with tarfile.open(victim, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in members:
            if info.name.startswith(first_key + ".") and info.name.endswith(".jpg"):
                data = b"\xff\xd8 this is not a jpeg"
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "run"
    fit(tiny_config(shards, out, epochs=1))
    epochs = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "epoch"]
    assert epochs[0]["skipped"] == 1


def test_eval_metrics_and_reports(trained: Path, tiny_shards: Path, tmp_path: Path) -> None:
    cfg = EvalConfig(
        checkpoint=trained / "last.pt",
        data=str(tiny_shards / "ssv2-validation.json"),
        out=tmp_path / "eval",
        settings=((1, 1), (3, 2)),
        predictions=tmp_path / "pred.csv",
        workers=1,
    )
    rows = evaluate_checkpoint(cfg)
    assert [(r["crops"], r["clips"], r["videos"]) for r in rows] == [(1, 1, 4), (3, 2, 4)]
    cm = np.load(tmp_path / "eval" / "confusion.npy")
    assert cm.shape == (4, 4) and cm.sum() == 4
    assert rows[0]["top1"] == pytest.approx(100 * np.trace(cm) / cm.sum())
    per_class = (tmp_path / "eval" / "per_class.csv").read_text().splitlines()
    assert len(per_class) == 5 and per_class[0] == "index,class,videos,correct,accuracy"
    lines = (tmp_path / "pred.csv").read_text().splitlines()
    assert len(lines) == 4 and all(len(line.split(";")) == 1 + 4 for line in lines)  # id + top-min(5, K)
    grid = (tmp_path / "eval" / "grid.md").read_text()
    assert "| 3 | 2 | 6 | 4 |" in grid


def test_official_export_evaluates_to_the_same_numbers(trained: Path, tiny_shards: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["export", str(trained / "last.pt"), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    exported = next(tmp_path.glob("TSM_somethingv2_RGB_resnet18_shift8_blockres_avg_segment4_e6*.pth"))
    ours = evaluate_checkpoint(
        EvalConfig(
            checkpoint=trained / "last.pt",
            data=str(tiny_shards / "ssv2-validation.json"),
            out=tmp_path / "a",
            crop_size=32,
            scale_size=40,
            workers=1,
        )
    )
    theirs = evaluate_checkpoint(
        EvalConfig(
            checkpoint=exported,
            data=str(tiny_shards / "ssv2-validation.json"),
            out=tmp_path / "b",
            crop_size=32,
            scale_size=40,
            workers=1,
        )
    )
    assert ours[0]["top1"] == theirs[0]["top1"] and ours[0]["top5"] == theirs[0]["top5"]
    np.testing.assert_array_equal(np.load(tmp_path / "a/confusion.npy"), np.load(tmp_path / "b/confusion.npy"))


def test_predict_agrees_with_eval_on_a_video(
    trained: Path, synth_tiny, tiny_video_shards: Path, tmp_path: Path
) -> None:
    """`predict` on a webm sees the pixels `eval` sees in video-format shards of it, so the rankings agree."""
    shards = tiny_video_shards
    evaluate_checkpoint(
        EvalConfig(
            checkpoint=trained / "last.pt",
            data=str(shards / "ssv2-validation.json"),
            out=tmp_path / "e",
            predictions=tmp_path / "pred.csv",
            workers=1,
        )
    )
    classes = json.loads((shards / "classes.json").read_text())
    for row in (tmp_path / "pred.csv").read_text().splitlines()[:3]:
        video_id, *top5 = row.split(";")
        result = CliRunner().invoke(
            main, ["predict", str(trained / "last.pt"), str(synth_tiny.videos_dir / f"{video_id}.webm")]
        )
        assert result.exit_code == 0, result.output
        lines = [line.strip() for line in result.stdout.splitlines() if line.strip()[:2] in ("1.", "2.", "3.", "4.")]
        assert len(lines) == 4  # 4 classes
        for rank, (line, label) in enumerate(zip(lines, top5, strict=False), start=1):
            assert line.startswith(f"{rank}. {classes[int(label)]} ")
        probs = [float(line.rsplit(" ", 1)[1].rstrip("%")) for line in lines]
        assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 100) < 0.5


def torchrun_command(*args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free port on this machine ("--master-port 0" would hang the rendezvous)
        "--nproc-per-node",
        "2",
        "-m",
        "ssv2prep",
        *args,
    ]


def ranks_output(stderr: str, keep: int = 4000) -> str:
    """What the ranks printed before the torchrun agent's failure summary (which only says which rank died)."""
    cut = min((i for i in (stderr.find(" closing signal "), stderr.find("ChildFailedError")) if i >= 0), default=-1)
    return stderr[max(0, cut - keep) : cut] if cut >= 0 else stderr[-keep:]


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(torchrun_command(*args), capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.mark.slow
def test_torchrun_two_processes_train_and_eval_like_one(trained: Path, tiny_shards: Path, tmp_path: Path) -> None:
    # eval: 2 ranks on gloo see every video once and give exactly the single-process numbers
    single = evaluate_checkpoint(
        EvalConfig(
            checkpoint=trained / "last.pt",
            data=str(tiny_shards / "ssv2-test.json"),
            out=tmp_path / "one",
            settings=((1, 1), (1, 2), (3, 1), (3, 2)),
            workers=1,
        )
    )
    proc = torchrun(
        "eval",
        "--checkpoint",
        str(trained / "last.pt"),
        "--data",
        str(tiny_shards / "ssv2-test.json"),
        "--grid",
        "crops=1,3;clips=1,2",
        "--workers",
        "1",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "two"),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, ranks_output(proc.stderr)
    double = json.loads((tmp_path / "two/report.json").read_text())["settings"]
    for a, b in zip(single, double, strict=True):
        assert (a["videos"], a["top1"], a["top5"]) == (b["videos"], b["top1"], b["top5"])
    np.testing.assert_array_equal(np.load(tmp_path / "one/confusion.npy"), np.load(tmp_path / "two/confusion.npy"))
    # train: both ranks step equally (12 videos / (2 x 2) = 3 steps per epoch), rank 0 alone writes, also the
    # mid-epoch checkpoints (the other rank must not wait for them)
    out = tmp_path / "ddp"
    args = ("--epochs", "2", "--checkpoint-every", "1", *train_args(batch_size=2))
    proc = torchrun("train", "--data", str(tiny_shards), "--out", str(out), *args, cwd=tmp_path)
    assert proc.returncode == 0, ranks_output(proc.stderr)
    last = torch.load(out / "last.pt", weights_only=True)
    assert (last["epoch"], last["epoch_step"], last["global_step"]) == (2, 0, 6)
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(6))
    assert [r["steps"] for r in records if r["kind"] == "epoch"] == [3, 3]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["videos"] for r in evals] == [4, 4]
    config = json.loads((out / "config.json").read_text())
    assert config["base_lr"] == pytest.approx(0.01)  # --no-lr-scaling
    # the same run killed inside an epoch and resumed, both times under torchrun, continues exactly
    killed = tmp_path / "ddp-killed"
    cmd = torchrun_command("train", "--data", str(tiny_shards), "--out", str(killed), *args)
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and _saved_epoch_step(killed / "last.pt") < 1:
        time.sleep(0.01)
    # SIGTERM, as a spot instance gets: the torchrun agent stops its workers (SIGKILL would leave them running)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert 0 < torch.load(killed / "last.pt", weights_only=True)["global_step"] < 6
    proc = torchrun("train", "--data", str(tiny_shards), "--out", str(killed), *args, cwd=tmp_path)
    assert proc.returncode == 0, ranks_output(proc.stderr)
    ref, got = train_losses(out), train_losses(killed)
    assert [s for s, _ in got] == [s for s, _ in ref] == list(range(6))
    np.testing.assert_allclose([v for _, v in got], [v for _, v in ref], rtol=1e-5)
    ref_epochs = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "epoch"]
    got_epochs = [r["loss"] for r in read_metrics(killed / "metrics.jsonl") if r["kind"] == "epoch"]
    np.testing.assert_allclose(got_epochs, ref_epochs, rtol=1e-5)  # both ranks' losses, counted once


def _saved_epoch_step(path: Path) -> int:
    """The `epoch_step` of a checkpoint, or -1 while there is none (it appears by an atomic rename)."""
    try:
        return int(torch.load(path, weights_only=True)["epoch_step"])
    except FileNotFoundError:
        return -1


def test_trained_sizes_come_from_the_checkpoint_unless_given(trained: Path, tmp_path: Path) -> None:
    from ssv2prep.train.checkpoint import is_ours
    from ssv2prep.train.evaluation import trained_sizes

    assert is_ours(trained / "last.pt")
    assert trained_sizes(trained / "last.pt") == (32, 40)
    assert trained_sizes(trained / "last.pt", 48, None) == (48, 40)
    assert trained_sizes(tmp_path / "absent.pt", 64, 72) == (64, 72)  # both given: the file is not read
    (tmp_path / "other.pt").write_bytes(b"not a checkpoint")
    assert not is_ours(tmp_path / "other.pt") and trained_sizes(tmp_path / "other.pt") == (224, 256)


@pytest.mark.slow
def test_torchrun_evaluates_when_a_rank_has_no_validation_shard(tiny_shards: Path, tmp_path: Path) -> None:
    """One validation shard for two ranks: rank 1 has nothing to score and must not hang the other one (it did
    through the DDP wrapper, whose first forward after training broadcasts BN buffers)."""
    out = tmp_path / "run"
    one_shard = str(tiny_shards / "ssv2-validation-000000.tar")
    args = ("--val-index", str(tiny_shards / "ssv2-validation.json"), "--epochs", "1", *train_args(batch_size=2))
    cmd = torchrun_command(
        "train", "--train", str(tiny_shards / "ssv2-train.json"), "--val", one_shard, "--out", str(out), *args
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=90)
    assert proc.returncode == 0, ranks_output(proc.stderr)
    evals = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "eval"]
    assert [r["videos"] for r in evals] == [3]  # the one shard's 3 videos, scored by rank 0 alone
    last = torch.load(out / "last.pt", weights_only=True)
    # each rank's own RNG state is saved (they were seeded apart: their dropout masks differ)
    assert last["world_size"] == 2 and len(last["rng"]) == 2
    assert not torch.equal(last["rng"][0]["torch"], last["rng"][1]["torch"])


def launch_ranks(per_rank_args: list[list[str]], *, cwd: Path, timeout_s: float = 120) -> list[tuple[int, str]]:
    """Start one `ssv2prep` process per rank with the environment torchrun would give, but no torchrun agent:
    like ranks on separate nodes, nothing stops the others when one fails. Returns (exit code, stderr) per rank;
    fails the test (after killing them) when a rank is still running after `timeout_s`."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for rank, args in enumerate(per_rank_args):
        env = os.environ | {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "WORLD_SIZE": str(len(per_rank_args)),
            "RANK": str(rank),
            "LOCAL_RANK": "0",
            "LOCAL_WORLD_SIZE": "1",
        }
        cmd = [sys.executable, "-m", "ssv2prep", *args]
        procs.append(
            subprocess.Popen(
                cmd,
                env=env,
                cwd=cwd,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
        )
    deadline = time.monotonic() + timeout_s
    results = []
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((proc.returncode, err))
    except subprocess.TimeoutExpired:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        pytest.fail(f"a rank was still running after {timeout_s} s (it waits for one that failed or diverged)")
    return results


def _train_only_args(tiny_shards: Path, out: Path, epochs: int) -> list[str]:
    return [
        "train",
        "--train",
        str(tiny_shards / "ssv2-train.json"),
        "--out",
        str(out),
        "--epochs",
        str(epochs),
        "--lr-steps",
        "",
        *train_args(batch_size=2),
    ]


@pytest.mark.slow
def test_a_checkpoint_that_rank_0_cannot_write_stops_every_rank_with_one_line(
    tiny_shards: Path, tmp_path: Path
) -> None:
    with small_tmpfs(tmp_path / "disk", "2m") as disk:  # room for config.json and metrics, not a checkpoint
        out = disk / "run"
        results = launch_ranks([_train_only_args(tiny_shards, out, 1)] * 2, cwd=tmp_path)
        left = sorted(p.name for p in out.iterdir())
    (rc0, err0), (rc1, err1) = results
    assert rc0 == 1 and "Traceback" not in err0
    assert err0.strip().splitlines()[-1].startswith(f"error: {out / 'last.pt'}: cannot write the checkpoint (")
    assert rc1 == 1 and "Traceback" not in err1
    assert (
        err1.strip().splitlines()[-1]
        == "error: rank 0 failed to save the checkpoint (its error is in its log); stopping"
    )
    assert "last.pt" not in left and not [n for n in left if n.endswith(".tmp")]  # no partial checkpoint


@pytest.mark.slow
def test_ranks_resume_what_rank_0_has_even_when_their_own_disk_differs(tiny_shards: Path, tmp_path: Path) -> None:
    """Per-node disks: rank 1's run folder has no checkpoint, rank 0's has epoch 1. Both resume rank 0's."""
    shared = tmp_path / "node0"
    results = launch_ranks([_train_only_args(tiny_shards, shared, 1)] * 2, cwd=tmp_path)
    assert [rc for rc, _ in results] == [0, 0], results[0][1][-2000:]
    own = tmp_path / "node1"
    own.mkdir()
    results = launch_ranks(
        [_train_only_args(tiny_shards, shared, 2), _train_only_args(tiny_shards, own, 2)], cwd=tmp_path
    )
    assert [rc for rc, _ in results] == [0, 0], results[0][1][-2000:] + results[1][1][-2000:]
    last = torch.load(shared / "last.pt", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (2, 6)
    assert [r["step"] for r in read_metrics(shared / "metrics.jsonl") if r["kind"] == "train"] == list(range(6))
    assert f"rank 1 sees no checkpoint at {own / 'last.pt'}" in results[1][1]
    assert " INFO " not in results[1][1] and " INFO " in results[0][1]  # only rank 0 logs below WARNING
    assert list(own.iterdir()) == []  # rank 1 writes nothing


# ---------------------------------------------------------------------------------- decisions behind fit (no GPU)


@pytest.mark.parametrize(
    ("mode", "device_type", "bf16_native", "expected"),
    [
        ("auto", "cuda", True, torch.bfloat16),  # A100, H100: native bf16
        ("auto", "cuda", False, torch.float16),  # V100, T4: bf16 only emulated (slow), so fp16 + loss scaler
        ("bf16", "cuda", False, torch.bfloat16),  # asked for explicitly: given
        ("fp16", "cuda", True, torch.float16),
        ("off", "cuda", True, None),
        ("auto", "cpu", True, None),
    ],
)
def test_amp_auto_picks_bf16_only_where_the_gpu_has_it(mode, device_type, bf16_native, expected) -> None:
    from ssv2prep.train.runtime import choose_amp_dtype

    assert choose_amp_dtype(mode, device_type, bf16_native=bf16_native) == expected


def test_each_rank_draws_its_own_dropout_masks_from_a_seed_apart_from_the_init_one() -> None:
    from ssv2prep.train.runtime import rank_seed

    seeds = [rank_seed(0, rank) for rank in range(64)]
    assert len(set(seeds)) == 64 and 0 not in seeds and seeds == [rank_seed(0, r) for r in range(64)]
    masks = []
    for seed in seeds[:2]:
        torch.manual_seed(seed)
        masks.append(torch.nn.functional.dropout(torch.ones(1000), 0.5))
    assert not torch.equal(masks[0], masks[1])


def test_a_resume_under_another_amp_gets_a_fresh_loss_scaler(caplog: pytest.LogCaptureFixture) -> None:
    from ssv2prep.train.run import _load_scaler

    saved_off = torch.amp.GradScaler("cpu", enabled=False).state_dict()  # --amp off / bf16: an empty state
    fp16 = torch.amp.GradScaler("cpu", enabled=True, init_scale=2.0**16)
    with caplog.at_level(logging.WARNING, logger="ssv2prep.train.run"):
        _load_scaler(fp16, saved_off)  # GradScaler.load_state_dict raises a RuntimeError on this
    assert "another --amp" in caplog.text and fp16.get_scale() == 2.0**16
    saved_fp16 = torch.amp.GradScaler("cpu", enabled=True, init_scale=8.0).state_dict()
    _load_scaler(fp16, saved_fp16)
    assert fp16.get_scale() == 8.0
    off = torch.amp.GradScaler("cpu", enabled=False)
    _load_scaler(off, saved_fp16)  # fp16 -> off: the saved scale is simply unused
    assert not off.is_enabled()


def test_the_run_record_adds_exactly_the_keys_a_config_file_read_leaves_out(tiny_shards: Path, tmp_path: Path) -> None:
    from ssv2prep.train.config import RECORD_KEYS, load_train_config

    cfg = tiny_config(tiny_shards, tmp_path / "run")
    record = run_record(cfg, classes=["a", "b"], base_lr=0.02, history=[{"epoch": 1}])
    assert set(record) - set(cfg.to_dict()) == RECORD_KEYS
    assert "history" not in run_record(cfg, classes=["a"], base_lr=0.02, history=[])
    (tmp_path / "config.json").write_text(json.dumps(record))
    assert load_train_config(tmp_path / "config.json") == json.loads(json.dumps(cfg.to_dict()))


def test_config_changes_lists_every_changed_option_by_dotted_name(tiny_shards: Path, tmp_path: Path) -> None:
    from ssv2prep.train.run import config_changes

    a = tiny_config(tiny_shards, tmp_path / "a")
    b = dataclasses.replace(
        a,
        optim=dataclasses.replace(a.optim, lr=0.02),
        model=dataclasses.replace(a.model, dropout=0.3),
    )
    assert config_changes(a.to_dict(), b.to_dict()) == {"model.dropout": [0.0, 0.3], "optim.lr": [0.01, 0.02]}
    assert config_changes(a.to_dict(), a.to_dict()) == {}


def _reordered_val(tiny_shards: Path, tmp_path: Path, classes: list[str]) -> Path:
    """A copy of the shard folder whose validation index names another class list (`val-classes.json`)."""
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    (shards / "val-classes.json").write_text(json.dumps(classes))
    index = json.loads((shards / "ssv2-validation.json").read_text())
    index = {**index, "classes": "val-classes.json", "num_classes": len(classes)}  # an index true to its class file
    (shards / "ssv2-validation.json").write_text(json.dumps({k: v for k, v in index.items() if k != "class_names"}))
    return shards


@pytest.mark.parametrize("how", ["reordered", "more"])
def test_val_with_other_classes_stops_before_the_first_step(tiny_shards: Path, tmp_path: Path, how: str) -> None:
    classes = json.loads((tiny_shards / "classes.json").read_text())
    other = classes[::-1] if how == "reordered" else [*classes, "Pretending to be a fifth class"]
    shards = _reordered_val(tiny_shards, tmp_path, other)
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--data", str(shards), "--out", str(out), *train_args()])
    assert result.exit_code == 2 and "Traceback" not in result.output
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: --val and --train label different classes")
    # each side named where its names came from: the val index's class file, the train index's own class_names
    assert str(shards / "val-classes.json") in line and f"{shards / 'ssv2-train.json'} (its class_names)" in line
    assert ("another order (label 0" in line) if how == "reordered" else ("4 vs 5 classes" in line)
    assert not out.exists()  # nothing trained, nothing written


def test_a_read_only_out_is_one_line_naming_it(tiny_shards: Path, tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "ro", "64k", read_only=True) as ro:
        args = ["train", "--data", str(tiny_shards), "--out", str(ro / "run"), "--epochs", "1", *train_args()]
        result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {ro / 'run'}: cannot write the run folder (Read-only file system)"
    )


def test_off_a_terminal_progress_is_plain_lines_and_the_log_file_json(tiny_shards: Path, tmp_path: Path) -> None:
    log_file = tmp_path / "logs" / "train.jsonl"
    out = tmp_path / "run"
    args = [*train_args(), "--log-every", "2"]  # the later --log-every wins
    cmd = [sys.executable, "-m", "ssv2prep", "train", "--data", str(tiny_shards), "--out", str(out), "--epochs", "1"]
    proc = subprocess.run([*cmd, *args, "--log-file", str(log_file)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, ranks_output(proc.stderr)
    lines = proc.stderr.splitlines()
    # a line every 2 steps and at the end of the epoch (3 steps), each a whole record on one line
    steps = [line for line in lines if " INFO epoch 1/1 step " in line]
    assert [line.split(" step ")[1].split()[0] for line in steps] == ["2/3", "3/3"], lines
    for field in ("loss ", "lr ", "clips/s", "data ", "eta "):
        assert all(field in line for line in steps), field
    start = [line for line in lines if "training on cpu x 1" in line]
    assert len(start) == 1 and start[0].rstrip().endswith("epochs 1..1") and len(start[0]) > 80  # not wrapped
    records = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert {"time", "level", "logger", "message"} <= set(records[0])
    by_event = {}
    for r in records:
        by_event.setdefault(r.get("event"), []).append(r)
    assert [r["epoch_step"] for r in by_event["step"]] == [2, 3]
    assert by_event["step"][0]["loss"] == pytest.approx(dict(train_losses(out))[1])  # step index 1
    assert [r["epoch"] for r in by_event["epoch"]] == [1] and by_event["eval"][0]["videos"] == 4
    assert by_event["start"][0]["steps_per_epoch"] == 3

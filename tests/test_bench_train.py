"""`bench train` (the GPU check) on CPU: tiny real runs through `fit`, rows checked against the runs' own
metrics.jsonl; and the clean skip of `--device cuda` without CUDA."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from ssv2prep.bench.train import (
    LOG_EVERY,
    SYNC_MESSAGE,
    VARIANTS,
    WARMUP_STEPS,
    SyncRecorder,
    log_every_for,
    summarize_metrics,
    variant_skip_reason,
)
from ssv2prep.train.report import read_metrics


def _bench(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "ssv2prep", "bench", "train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd, check=False)


@pytest.fixture(scope="module")
def cpu_check(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], dict, Path]:
    tmp = tmp_path_factory.mktemp("bench-train")
    proc = _bench("--device", "cpu", "--steps", "20", "--work-dir", str(tmp / "work"), "--json", "r.json", cwd=tmp)
    assert proc.returncode in (0, 1), proc.stderr[-2000:]  # 1: a row failed (a 20-step loss may not fall)
    (run_root,) = (tmp / "work").glob("bench-train-*")
    return proc, json.loads((tmp / "r.json").read_text()), run_root


def test_cpu_rows_agree_with_the_runs_metrics(cpu_check: tuple) -> None:
    proc, result, root = cpu_check
    rows = {r["variant"]: r for r in result["rows"]}
    fp32 = rows["fp32"]
    records = read_metrics(root / "run-0" / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    # one epoch of 20 steps, logged every 5: four records, each the means of its 5 steps
    assert LOG_EVERY == 5 and [r["step"] for r in train] == [4, 9, 14, 19]
    assert [r["steps"] for r in records if r["kind"] == "epoch"] == [20]
    assert result["steps"] == 20 and fp32["steps"] == 20
    assert (fp32["first_loss"], fp32["last_loss"]) == (train[0]["loss"], train[-1]["loss"])
    assert fp32["finite"] is all(math.isfinite(r["loss"]) for r in train) is True
    assert fp32["decreasing"] is (train[-1]["loss"] < train[0]["loss"])
    assert fp32["status"] == ("PASS" if fp32["decreasing"] else "FAIL")
    assert (proc.returncode == 0) == (result["status"] == "PASS") == (fp32["status"] == "PASS")
    # clips/s and data wait over the three windows after the 5 warm-up steps, each 5 steps x 4 clips, by time
    assert WARMUP_STEPS == 5
    seconds = [20 / r["clips_per_s"] for r in train[1:]]
    assert fp32["clips_per_s"] == pytest.approx(60 / sum(seconds))
    assert fp32["data_wait"] == pytest.approx(
        sum(r["data_wait"] * t for r, t in zip(train[1:], seconds, strict=True)) / sum(seconds)
    )
    assert fp32["eval_videos"] == result["data"]["val_videos"] == 4
    # on CPU only fp32 eager runs; every other row says why it did not
    assert all(r["status"] == "SKIP" and r["reason"] for name, r in rows.items() if name != "fp32")
    assert result["ddp"] is None
    assert f"| fp32 | 20 | {fp32['first_loss']:.3f} | {fp32['last_loss']:.3f} | yes |" in proc.stdout


def test_cpu_eval_parity_is_exact_against_itself(cpu_check: tuple) -> None:
    _, result, _ = cpu_check
    parity = result["parity"]
    assert parity["device"] == "cpu" and parity["videos"] == 4
    assert parity["max_abs_diff"] == 0.0 and parity["max_abs_logit"] > 0 and parity["status"] == "PASS"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_cuda_without_cuda_prints_one_skip_line(tmp_path: Path) -> None:
    proc = _bench("--device", "cuda", "--json", "r.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "skipped: no CUDA"
    assert json.loads((tmp_path / "r.json").read_text()) == {"skipped": "no CUDA", "device": "cuda"}


def test_bad_steps_is_a_one_line_error(tmp_path: Path) -> None:
    proc = _bench("--device", "cpu", "--steps", "1", cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "--steps must be >= 2" in proc.stderr


def test_sync_recorder_allows_the_loops_syncs_only_at_its_sync_points() -> None:
    rec = SyncRecorder()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rec.caught = caught
        rec.on_event("start", {})
        for step in range(4):
            synced = step in (0, 3)
            warnings.warn_explicit(f"called a {SYNC_MESSAGE}", UserWarning, "/z/torch/amp/grad_scaler.py", 9)
            warnings.warn_explicit("something else", UserWarning, "/x/ssv2prep/models/shift.py", 10)
            if synced or step == 2:  # step 2: the loop reads the device outside a sync point
                warnings.warn_explicit(f"called a {SYNC_MESSAGE}", UserWarning, "/x/ssv2prep/train/loop.py", 60)
            if step == 3:
                warnings.warn_explicit(f"called a {SYNC_MESSAGE}", UserWarning, "/y/ssv2prep/data/transforms.py", 228)
            rec.on_event("step", {"step": step, "synced": synced})
    amp, loop, data = "torch/amp/grad_scaler.py:9", "ssv2prep/train/loop.py:60", "ssv2prep/data/transforms.py:228"
    assert rec.per_step == [(True, [amp, loop]), (False, [amp]), (False, [amp, loop]), (True, [amp, loop, data])]
    s = rec.summary(warmup=1)
    assert (s["steps_counted"], s["steps_between_syncs"]) == (3, 2)
    assert s["places"] == {amp: 3, loop: 2, data: 1} and s["syncs_per_step"] == 2.0
    assert s["unexpected"] == {loop: 1, data: 1} and s["unexpected_per_step"] == pytest.approx(2 / 3)


def test_summary_windows_are_the_steps_since_the_last_record_of_the_epoch() -> None:
    """Two epochs of 6 steps logged every 4 global steps: windows 0-3 (epoch 1; steps 4-5 have no record), 6-7 and
    8-11 (epoch 2). After the 5 warm-up steps only the last two count for clips/s and data wait."""

    def train(step: int, epoch: int, loss: float, clips_per_s: float, data_wait: float) -> dict:
        return {"kind": "train", "step": step, "epoch": epoch, "loss": loss, "clips_per_s": clips_per_s,
                "data_wait": data_wait}  # fmt: skip

    records = [
        train(3, 1, 2.0, 100.0, 0.9),
        {"kind": "epoch", "epoch": 1, "steps": 6},
        train(7, 2, 1.5, 4.0, 0.5),  # 2 steps x 4 clips at 4 clips/s: 2 s, 1 s of it waiting
        train(11, 2, 1.0, 8.0, 0.25),  # 4 steps x 4 clips at 8 clips/s: 2 s, 0.5 s waiting
        {"kind": "epoch", "epoch": 2, "steps": 6},
        {"kind": "eval", "epoch": 2, "videos": 4},
    ]
    s = summarize_metrics(records, batch_size=4)
    assert s["steps"] == 12 and (s["first_loss"], s["last_loss"]) == (2.0, 1.0) and s["decreasing"] is True
    assert s["clips_per_s"] == pytest.approx(24 / 4) and s["data_wait"] == pytest.approx(1.5 / 4)
    assert s["eval_videos"] == 4
    records[2] = train(7, 2, float("nan"), 4.0, 0.5)
    s = summarize_metrics(records, batch_size=4)
    assert s["finite"] is False and s["decreasing"] is False


def test_a_short_run_logs_often_enough_for_two_windows() -> None:
    assert [log_every_for(n) for n in (2, 3, 6, 9, 10, 20, 1000)] == [1, 1, 3, 4, 5, 5, 5]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_bf16_rows_need_native_bf16_not_emulation() -> None:
    bf16 = next(v for v in VARIANTS if v.name == "bf16")
    fp16 = next(v for v in VARIANTS if v.name == "fp16+scaler")
    reason = variant_skip_reason(bf16, "cuda", compile_rows=True)
    assert reason == "this GPU has no native bf16 (it would only emulate it)"
    assert variant_skip_reason(fp16, "cuda", compile_rows=True) is None

"""`bench train` (the GPU check) on CPU: tiny real runs through `fit`, rows checked against the runs' own
metrics.jsonl; and the clean skip of `--device cuda` without CUDA."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from ssv2prep.bench.train import SYNC_MESSAGE, WARMUP_STEPS, SyncRecorder, summarize_metrics
from ssv2prep.train.report import read_metrics


def _bench(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "ssv2prep", "bench", "train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd, check=False)


@pytest.fixture(scope="module")
def cpu_check(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], dict, Path]:
    tmp = tmp_path_factory.mktemp("bench-train")
    proc = _bench("--device", "cpu", "--steps", "6", "--work-dir", str(tmp / "work"), "--json", "r.json", cwd=tmp)
    assert proc.returncode in (0, 1), proc.stderr[-2000:]  # 1: a row failed (a 6-step loss may not fall)
    (run_root,) = (tmp / "work").glob("bench-train-*")
    return proc, json.loads((tmp / "r.json").read_text()), run_root


def test_cpu_rows_agree_with_the_runs_metrics(cpu_check: tuple) -> None:
    proc, result, root = cpu_check
    rows = {r["variant"]: r for r in result["rows"]}
    fp32 = rows["fp32"]
    records = read_metrics(root / "run-0" / "metrics.jsonl")
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert result["steps"] == 6 and fp32["steps"] == len(losses) == 6
    assert fp32["first_loss"] == pytest.approx(np.mean(losses[:3])) and fp32["last_loss"] == pytest.approx(
        np.mean(losses[-3:])
    )
    assert fp32["finite"] is all(math.isfinite(x) for x in losses) is True
    assert fp32["decreasing"] is bool(np.mean(losses[-3:]) < np.mean(losses[:3]))
    assert fp32["status"] == ("PASS" if fp32["decreasing"] else "FAIL")
    assert (proc.returncode == 0) == (result["status"] == "PASS") == (fp32["status"] == "PASS")
    train = [r for r in records if r["kind"] == "train"][WARMUP_STEPS:]
    assert fp32["clips_per_s"] == pytest.approx(train[0]["clips_per_s"]) and len(train) == 1
    assert fp32["data_wait"] == pytest.approx(train[0]["data_wait"])
    assert fp32["eval_videos"] == result["data"]["val_videos"] == 4
    # on CPU only fp32 eager runs; every other row says why it did not
    assert all(r["status"] == "SKIP" and r["reason"] for name, r in rows.items() if name != "fp32")
    assert result["ddp"] is None
    assert f"| fp32 | 6 | {fp32['first_loss']:.3f} | {fp32['last_loss']:.3f} | yes |" in proc.stdout


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


def test_sync_recorder_splits_syncs_per_step_and_flags_unexpected_places() -> None:
    rec = SyncRecorder()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rec.caught = caught
        rec.on_event("start", {})
        for step in range(3):
            warnings.warn_explicit(f"called a {SYNC_MESSAGE}", UserWarning, "/x/ssv2prep/train/loop.py", 60)
            warnings.warn_explicit("something else", UserWarning, "/x/ssv2prep/models/shift.py", 10)
            if step == 2:
                warnings.warn_explicit(f"called a {SYNC_MESSAGE}", UserWarning, "/y/ssv2prep/data/transforms.py", 228)
                warnings.warn_explicit(f"called a {SYNC_MESSAGE}", UserWarning, "/z/torch/amp/grad_scaler.py", 9)
            rec.on_event("step", {})
    assert rec.per_step == [
        ["ssv2prep/train/loop.py:60"],
        ["ssv2prep/train/loop.py:60"],
        ["ssv2prep/train/loop.py:60", "ssv2prep/data/transforms.py:228", "torch/amp/grad_scaler.py:9"],
    ]
    s = rec.summary(warmup=1)
    assert s["steps_counted"] == 2 and s["syncs_per_step"] == 2.0 and s["unexpected_per_step"] == 0.5
    assert s["unexpected"] == {"ssv2prep/data/transforms.py:228": 1}


def test_summarize_weights_data_wait_by_step_time() -> None:
    steps = [
        {"kind": "train", "step": i, "loss": 2.0 - 0.1 * i, "clips_per_s": 8.0, "data_wait": 0.0} for i in range(5)
    ]
    steps += [
        {"kind": "train", "step": 5, "loss": 1.0, "clips_per_s": 4.0, "data_wait": 0.5},  # 1 s, 0.5 s waiting
        {"kind": "train", "step": 6, "loss": float("nan"), "clips_per_s": 1.0, "data_wait": 0.25},  # 4 s, 1 s
    ]
    s = summarize_metrics(steps, batch_size=4)
    assert s["steps"] == 7 and s["finite"] is False and s["decreasing"] is False
    assert s["clips_per_s"] == pytest.approx(8 / 5) and s["data_wait"] == pytest.approx(1.5 / 5)

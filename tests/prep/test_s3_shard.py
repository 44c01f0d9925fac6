"""`shard --out s3://...` and `verify s3://...` against a real S3 API server (moto on 127.0.0.1).

Nothing here mocks the S3 client: the commands run as subprocesses that reach the server through the AWS
environment, exactly as they would reach AWS or MinIO.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from fixtures import copy_dataset, folder_bytes, shard_config

from ssv2prep.cli import main
from ssv2prep.prep.prepare import WORK_DIR, shard_dataset
from ssv2prep.prep.shard import WriterSettings
from ssv2prep.prep.synth import SynthConfig, synthesize
from ssv2prep.prep.verify import verify_folder

# One-video shards (31), slow enough to decode (ffmpeg binary, 16-20 frames) that a run can be stopped part-way.
BUSY = SynthConfig(
    num_pairs=2, train_per_class=7, validation_per_class=1, test_per_class=0, height=48, min_frames=16, max_frames=20
)
BUSY_SHARDS = 4 * 7 + 4


def ssv2prep(*args: object, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "ssv2prep", *map(str, args)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=cwd)


def bucket_files(s3, bucket: str, prefix: str) -> dict[str, bytes]:
    """{name relative to the prefix: bytes} of every object listed under `prefix/`."""
    return {k.removeprefix(f"{prefix}/"): v for k, v in s3.keys(bucket, f"{prefix}/").items()}


def contract_files(files: dict[str, bytes]) -> dict[str, bytes]:
    """The contract files (shards, indexes, manifests, classes) without the stats and work records (timings)."""
    return {k: v for k, v in files.items() if "/" not in k and not k.endswith(".stats.json")}


def local_contract_files(folder: Path) -> dict[str, bytes]:
    return {**folder_bytes(folder), "classes.json": (folder / "classes.json").read_bytes()}


def report_fields(report) -> tuple:
    return report.problems, report.splits, report.shards, report.samples, report.frames


# ---------------------------------------------------------------------------------------------------------------------
# --part runs that share nothing but the bucket, then the assembling run without the videos.


def test_parts_share_only_the_bucket_and_an_assembling_run_without_videos_writes_the_indexes(
    s3, synth_tiny, tiny_shards: Path, tmp_path: Path
) -> None:
    bucket = s3.new_bucket()
    prefix = "datasets/ssv2"
    out = f"s3://{bucket}/{prefix}"
    labels_only = tmp_path / "assembler"
    copy_dataset(synth_tiny, labels_only)
    (labels_only / "videos").rename(labels_only / "no-videos-here")  # this machine has no videos

    def part(k: int) -> subprocess.CompletedProcess[str]:
        machine = tmp_path / f"machine{k}"
        videos, labels = copy_dataset(synth_tiny, machine)
        done = ssv2prep(
            "shard", "--videos", videos, "--labels", labels, "--out", out, "--part", f"{k}/2",
            "--staging-dir", machine / "staging", "--videos-per-shard", 3, "--workers", 1, cwd=machine,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert sorted(p.name for p in (machine / "staging").iterdir()) == []  # staged shards went up and away
        return done

    part(1)
    after_one = bucket_files(s3, bucket, prefix)
    assert not [k for k in after_one if k.startswith("ssv2-") and k.endswith(".json")], "an index before part 2"

    assemble = ["shard", "--labels", labels_only / "labels", "--out", out, "--videos-per-shard", 3]
    early = ssv2prep(*assemble, cwd=labels_only)
    assert early.returncode == 2, early.stderr
    assert early.stderr.strip().splitlines()[-1].startswith("error: --videos is needed: ")
    assert "Traceback" not in early.stderr and "testing-secret-key" not in early.stderr

    part(2)
    final = ssv2prep(*assemble, cwd=labels_only)
    assert final.returncode == 0, final.stderr
    assert "shard: 0 shards written, 8 already complete" in final.stdout

    files = bucket_files(s3, bucket, prefix)
    local_names = {p.name for p in tiny_shards.iterdir() if p.is_file() and not p.name.startswith(".")}
    tars = {n for n in local_names if n.endswith(".tar")}
    work = {f"{WORK_DIR}/settings.json"} | {f"{WORK_DIR}/{t}.json" for t in tars}
    assert set(files) == local_names | work
    assert contract_files(files) == local_contract_files(tiny_shards)  # byte-identical to a local --out
    assert s3.multipart_uploads(bucket) == []

    remote = verify_folder(out, decode=True, workers=2)
    assert remote.ok, remote.problems
    assert report_fields(remote) == report_fields(verify_folder(tiny_shards, decode=True))
    line = ssv2prep("verify", out, "--workers", 2)
    assert line.returncode == 0, line.stderr
    assert line.stdout == ssv2prep("verify", tiny_shards, "--workers", 1).stdout

    # A corrupted object is found when read from the bucket, in either mode, naming the shard.
    name = "ssv2-train-000001.tar"
    data = bytearray(files[name])
    data[len(data) // 2] ^= 0xFF
    s3.client.put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=bytes(data))
    for workers in (1, 2):
        bad = ssv2prep("verify", out, "--workers", workers)
        assert bad.returncode == 1
        assert f"  {name}: md5 differs from the index" in bad.stderr.splitlines(), bad.stderr


# ---------------------------------------------------------------------------------------------------------------------
# Killed mid-way, re-run: the same objects as an uninterrupted run.


@pytest.fixture(scope="module")
def busy(tmp_path_factory: pytest.TempPathFactory):
    return synthesize(tmp_path_factory.mktemp("busy-s3"), BUSY)


@pytest.fixture(scope="module")
def busy_reference(busy, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted local run with the settings of `busy_argv`."""
    out = tmp_path_factory.mktemp("busy-ref") / "out"
    cfg = shard_config(
        busy.videos_dir, busy.labels_dir, out, splits=("train", "validation"), videos_per_shard=1,
        writer=WriterSettings(decoder="ffmpeg"), workers=2,
    )  # fmt: skip
    shard_dataset(cfg)
    return out


def busy_argv(busy, out: str, staging: Path) -> list[str]:
    return [
        sys.executable, "-m", "ssv2prep", "-q", "shard", "--videos", str(busy.videos_dir),
        "--labels", str(busy.labels_dir), "--out", out, "--splits", "train,validation", "--videos-per-shard", "1",
        "--workers", "2", "--decoder", "ffmpeg", "--staging-dir", str(staging),
    ]  # fmt: skip


def listed(s3, bucket: str, prefix: str) -> set[str]:
    names = set()
    for page in s3.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/"):
        names |= {o["Key"].removeprefix(f"{prefix}/") for o in page.get("Contents", [])}
    return names


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_killed_remote_run_resumes_to_the_same_objects(s3, busy, busy_reference: Path, tmp_path: Path, sig) -> None:
    bucket, prefix = s3.new_bucket(), "out"
    out = f"s3://{bucket}/{prefix}"
    staging = tmp_path / "staging"
    proc = subprocess.Popen(
        busy_argv(busy, out, staging), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if len([n for n in listed(s3, bucket, prefix) if n.endswith(".tar.json")]) >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be stopped"
        os.killpg(proc.pid, sig)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 130), stderr
    names = listed(s3, bucket, prefix)
    tars = {n for n in names if n.endswith(".tar")}
    records = {n.removeprefix(f"{WORK_DIR}/").removesuffix(".json") for n in names if n.endswith(".tar.json")}
    assert records <= tars and 3 <= len(records) < BUSY_SHARDS  # a record is only ever there beside its tar
    if sig == signal.SIGINT:
        assert records == tars and sorted(p.name for p in staging.iterdir()) == []

    again = subprocess.run(busy_argv(busy, out, staging), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    files = bucket_files(s3, bucket, prefix)
    assert contract_files(files) == local_contract_files(busy_reference)
    assert {n for n in files if n.endswith(".tar")} == {
        n.removeprefix(f"{WORK_DIR}/").removesuffix(".json") for n in files if n.endswith(".tar.json")
    }
    assert not [n for n in files if n.endswith(".tmp") or ("/." in f"/{n}" and not n.startswith(WORK_DIR))]
    assert s3.multipart_uploads(bucket) == []
    assert sorted(p.name for p in staging.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------------
# Bad options.


def cli(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result.exit_code, result.stderr


def test_bad_out_and_staging_options_are_one_line_errors(synth_tiny, tmp_path: Path) -> None:
    base = ["shard", "--videos", synth_tiny.videos_dir, "--labels", synth_tiny.labels_dir]
    code, err = cli(*base, "--out", tmp_path / "o", "--staging-dir", tmp_path / "s")
    assert code == 2 and "error: --staging-dir is for an object-store --out" in err
    code, err = cli(*base, "--out", "https://example.invalid/shards")
    assert code == 2 and "error: --out https://example.invalid/shards: https:// is read-only" in err
    code, err = cli(*base, "--out", "ftp://h/x")
    assert code == 2 and "ftp://h/x: unknown scheme ftp://" in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "s").exists()


def test_local_assembling_run_needs_no_videos(synth_tiny, tiny_shards: Path, tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "out"
    shutil.copytree(tiny_shards, out)
    for index in out.glob("ssv2-*.json"):
        if not index.name.endswith(".stats.json"):
            index.unlink()
    result = shard_dataset(shard_config(None, synth_tiny.labels_dir, out))
    assert (result.written, result.skipped_shards, result.incomplete_splits) == ([], 8, [])
    assert folder_bytes(out) == folder_bytes(tiny_shards)

"""Data-stage robustness: prompt, clean stops on Ctrl-C/SIGTERM, one lock per output folder, and one-line errors
for a full disk, a read-only output and absurd input. Real signals, real processes, real (tmpfs) file systems."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from fixtures import copy_dataset, read_json, shard_config

from ssv2prep.cli import main
from ssv2prep.prep.decode import count_video_frames, ffmpeg_binary
from ssv2prep.prep.prepare import WORK_DIR, ShardConfig, shard_dataset
from ssv2prep.prep.shard import WriterSettings
from ssv2prep.prep.synth import SynthConfig, synthesize

# Enough one-video shards (31), slow enough to decode (ffmpeg binary, 16-20 frames), that a 2-worker run lasts
# a few seconds on a loaded machine.
BUSY = SynthConfig(
    num_pairs=2, train_per_class=7, validation_per_class=1, test_per_class=0, height=48, min_frames=16, max_frames=20
)


@pytest.fixture(scope="module")
def busy(tmp_path_factory: pytest.TempPathFactory):
    return synthesize(tmp_path_factory.mktemp("busy"), BUSY)


def shard_argv(data, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "ssv2prep",
        "-q",
        "shard",
        "--videos",
        str(data.videos_dir),
        "--labels",
        str(data.labels_dir),
        "--out",
        str(out),
        "--splits",
        "train,validation",
        "--videos-per-shard",
        "1",
        "--workers",
        "2",
        "--decoder",
        "ffmpeg",
        *extra,
    ]


def busy_config(data, out: Path) -> ShardConfig:
    """The in-process twin of `shard_argv` (same settings, so it resumes that run's folder)."""
    writer = WriterSettings(decoder="ffmpeg")
    return shard_config(
        data.videos_dir, data.labels_dir, out, splits=("train", "validation"), videos_per_shard=1, writer=writer
    )


def _processes() -> dict[int, tuple[int, int]]:
    """{pid: (ppid, process group)} of every live (not zombie) process."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        state, ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        if state not in ("Z", "X"):
            found[int(entry)] = (int(ppid), int(pgrp))
    return found


def descendants(pid: int) -> set[int]:
    procs, out, todo = _processes(), set(), [pid]
    while todo:
        parent = todo.pop()
        kids = {p for p, (ppid, _) in procs.items() if ppid == parent}
        todo += list(kids - out)
        out |= kids
    return out


def group_members(pgid: int) -> set[int]:
    return {p for p, (_, pg) in _processes().items() if pg == pgid}


def wait_gone(pids: set[int], timeout: float = 10.0) -> set[int]:
    """The pids of `pids` still alive after up to `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = pids & set(_processes())
        if not alive:
            return set()
        time.sleep(0.05)
    return pids & set(_processes())


def wait_for_records(out: Path, n: int, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list((out / WORK_DIR).glob("ssv2-*.tar.json"))) >= n:
            return
        time.sleep(0.01)
    raise AssertionError(f"the run did not record {n} shards in time (exit {proc.poll()})")


def assert_every_tar_is_recorded(out: Path) -> set[str]:
    tars = {p.name for p in out.glob("ssv2-*.tar")}
    recorded = {p.name.removesuffix(".json") for p in (out / WORK_DIR).glob("ssv2-*.tar.json")}
    assert tars == recorded, f"tars without a record: {sorted(tars - recorded)}; records without a tar: " + str(
        sorted(recorded - tars)
    )
    assert not list(out.glob(".*.tmp")), "temp files were left behind"
    return tars


def total_shards(data) -> int:
    return sum(len(read_json(data.labels_dir / f"{s}.json")) for s in ("train", "validation"))


@contextlib.contextmanager
def killed_at_exit(proc: subprocess.Popen) -> Iterator[subprocess.Popen]:
    try:
        yield proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# ---------------------------------------------------------------------------------------------------------------------
# Ctrl-C, SIGTERM and the lock.


def test_ctrl_c_stops_shard_within_seconds_recording_every_finished_shard(busy, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.Popen(
        shard_argv(busy, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    with killed_at_exit(proc):
        wait_for_records(out, 3, proc)
        members = group_members(proc.pid)
        assert len(members) >= 3  # the command, the forkserver and its workers
        members |= descendants(proc.pid)  # and the ffmpeg binaries they run (each in a process group of its own)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
        stopped = time.monotonic()
        _, stderr = proc.communicate(timeout=30)
        took = time.monotonic() - stopped
    assert proc.returncode == 130, stderr
    assert took < 5.0, f"took {took:.1f} s to stop"
    assert "Traceback" not in stderr.decode() and "error: interrupted" in stderr.decode()
    assert wait_gone(members) == set(), "workers outlived the command"
    done = assert_every_tar_is_recorded(out)
    total = total_shards(busy)
    assert 3 <= len(done) < total, "the run should have stopped part-way"
    result = shard_dataset(busy_config(busy, out))
    assert (result.skipped_shards, len(result.written)) == (len(done), total - len(done))


# A pool worker (SIGINT ignored) decodes with the ffmpeg binary; after the first frame, the terminal's Ctrl-C
# reaches its whole process group; it reads on to the end and prints how many frames it got.
CTRL_C_MID_DECODE = """
import os, signal, sys
from pathlib import Path
from ssv2prep.prep.decode import FRAME_READERS
signal.signal(signal.SIGINT, signal.SIG_IGN)
_, frames = FRAME_READERS["ffmpeg"](Path(sys.argv[1]))
count = 0
for _ in frames:
    if count == 0:
        os.killpg(0, signal.SIGINT)
    count += 1
print(count)
"""


def test_ctrl_c_does_not_reach_the_ffmpeg_binary_a_worker_decodes_with(tmp_path: Path) -> None:
    """Ctrl-C goes to every process of the terminal's foreground group. Were the worker's ffmpeg among them, it
    would stop mid-video and the worker would record a good video as a decode error, which a resumed run trusts."""
    video = tmp_path / "clip.webm"
    make = ["-f", "lavfi", "-i", "testsrc=size=320x240:rate=25", "-t", "2", "-c:v", "libvpx-vp9", "-b:v", "300k"]
    subprocess.run([ffmpeg_binary(), "-nostdin", "-loglevel", "error", *make, str(video)], check=True, timeout=120)
    _, frames = count_video_frames(video)  # PyAV's count; 50 raw frames of 115 KB are far more than a pipe holds
    cmd = [sys.executable, "-c", CTRL_C_MID_DECODE, str(video)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, start_new_session=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout) == frames == 50


def test_sigterm_stops_shard_and_its_workers_and_a_second_run_is_refused(busy, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.Popen(
        shard_argv(busy, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    with killed_at_exit(proc):
        wait_for_records(out, 2, proc)
        from ssv2prep.fsutil import OutputLockedError  # here, so the other tests run on code without it

        with pytest.raises(OutputLockedError, match=rf"--out is in use by process {proc.pid} ") as err:
            shard_dataset(busy_config(busy, out))
        assert err.value.pid == proc.pid
        members = descendants(proc.pid)
        assert len(members) >= 2
        proc.send_signal(signal.SIGTERM)  # the command alone, as a batch scheduler or `kill PID` does
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 143, stderr
    assert "error: terminated (SIGTERM)" in stderr.decode() and "Traceback" not in stderr.decode()
    assert wait_gone(members) == set(), "pool workers outlived the command"
    assert_every_tar_is_recorded(out)
    assert not (out / ".ssv2prep.lock").exists()


def test_second_shard_run_on_the_same_out_fails_at_once_via_the_cli(busy, tmp_path: Path) -> None:
    out = tmp_path / "out"
    # The first run, as far as the lock goes: another process holding it for as long as this test needs.
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True
    )
    with killed_at_exit(holder):
        assert holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        second = subprocess.run(shard_argv(busy, out), capture_output=True, text=True, timeout=60)
        took = time.monotonic() - started
        holder.stdin.close()
        holder.wait(timeout=30)
    assert second.returncode == 1 and took < 20
    assert second.stderr.strip().splitlines()[-1] == (
        f"error: {out}: --out is in use by process {holder.pid} (lock {out / '.ssv2prep.lock'}); wait for it to "
        "finish or use another folder"
    )
    assert "Traceback" not in second.stderr
    assert sorted(p.name for p in out.iterdir()) == []  # nothing written, and the holder's lock file went with it


HOLD_LOCK = """
import sys
from ssv2prep.fsutil import output_lock
with output_lock(sys.argv[1], option="--out"):
    print("locked", flush=True)
    sys.stdin.read()
"""


# ---------------------------------------------------------------------------------------------------------------------
# Full disk, read-only outputs, absurd input.


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A fresh 640 KiB tmpfs (unmounted afterwards); skipped where this process may not mount one."""
    where = tmp_path / "tmpfs"
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=640k", "tmpfs", str(where)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def make_read_only(folder: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result.exit_code, result.stderr


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    return errors[0]


def test_full_disk_while_sharding_is_one_line_and_leaves_no_partial_output(busy, tmpfs: Path) -> None:
    out = tmpfs / "out"
    code, stderr = cli(
        "shard",
        "--videos",
        str(busy.videos_dir),
        "--labels",
        str(busy.labels_dir),
        "--out",
        str(out),
        "--splits",
        "train,validation",
        "--videos-per-shard",
        "1",
        "--workers",
        "1",
    )
    assert code == 1
    assert one_error_line(stderr) == f"error: {out}: cannot write shards: no space left on the device"
    done = assert_every_tar_is_recorded(out)
    assert 0 < len(done) < total_shards(busy)  # it got part-way, and what it kept is whole
    assert not list(out.glob("ssv2-*.json"))  # no index of a split that is not complete


@pytest.mark.parametrize("command", ["shard", "extract", "synth", "report"])
def test_read_only_output_is_one_line_naming_the_folder(
    command: str, synth_tiny, tiny_shards: Path, tmpfs: Path
) -> None:
    make_read_only(tmpfs)
    target = tmpfs / "out"
    args = {
        "shard": [
            "shard",
            "--videos",
            str(synth_tiny.videos_dir),
            "--labels",
            str(synth_tiny.labels_dir),
            "--out",
            str(target),
        ],
        "extract": ["extract", "--src", str(synth_tiny.videos_dir), "--dest", str(target)],
        "synth": ["synth", str(target), "--pairs", "1", "--train-per-class", "1", "--height", "32"],
        "report": ["report", str(tiny_shards), "--out", str(target)],
    }[command]
    code, stderr = cli(*args)
    line = one_error_line(stderr)
    assert code != 0
    assert str(target) in line and "read-only file system" in line, line
    assert not target.exists()


def test_labels_nested_200000_deep_are_a_one_line_error(synth_tiny, tmp_path: Path) -> None:
    videos, labels = copy_dataset(synth_tiny, tmp_path / "data")
    (labels / "labels.json").write_text("[" * 200_000 + "]" * 200_000)
    code, stderr = cli("shard", "--videos", str(videos), "--labels", str(labels), "--out", str(tmp_path / "out"))
    assert code != 0
    line = one_error_line(stderr)
    assert str(labels / "labels.json") in line and "nested too deeply" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "flag"),
    [(["--pairs", "0"], "--pairs"), (["--parts", "0", "--package"], "--parts"), (["--height", "4"], "--height")],
)
def test_synth_errors_name_the_flag(tmp_path: Path, args: list[str], flag: str) -> None:
    code, stderr = cli("synth", str(tmp_path / "s"), *args)
    line = one_error_line(stderr)
    assert code == 2 and f"{flag} " in line and "num_" not in line and "_" not in line.split(":")[1], line


def test_report_errors_name_the_flag(tiny_shards: Path) -> None:
    code, stderr = cli("report", str(tiny_shards), "--segments", "0")
    line = one_error_line(stderr)
    assert code == 2 and "--segments" in line and "num_segments" not in line, line
    assert json.loads((tiny_shards / "classes.json").read_text())  # nothing touched


def test_part_runs_share_out_but_not_a_part_and_not_with_a_whole_run(synth_tiny, tmp_path: Path) -> None:
    from ssv2prep.fsutil import OutputLockedError, output_lock

    out = tmp_path / "out"

    def cfg(part: tuple[int, int] | None) -> ShardConfig:
        return shard_config(synth_tiny.videos_dir, synth_tiny.labels_dir, out, part=part)

    # This process stands for another part run of the same plan, writing its part 2.
    part_2 = output_lock(out, option="--part 2/2 of --out", name=".ssv2prep-part-2-of-2.lock")
    with output_lock(out, option="--out", shared=True), part_2:
        assert shard_dataset(cfg((1, 2))).incomplete_splits  # part 1 runs beside it
        with pytest.raises(OutputLockedError, match=r"--part 2/2 of --out is in use by process"):
            shard_dataset(cfg((2, 2)))
        with pytest.raises(OutputLockedError, match=r"--out is in use by process"):
            shard_dataset(cfg(None))  # a whole run waits for every part
    result = shard_dataset(cfg((2, 2)))
    assert not result.incomplete_splits
    assert sorted(p.name for p in out.glob(".ssv2prep*.lock")) == []


def test_a_second_download_into_the_same_dest_fails_at_once(tmp_path: Path) -> None:
    from ssv2prep.fsutil import output_lock

    dest = tmp_path / "dl"
    with output_lock(dest, option="--dest"):  # this process stands for the first download
        # Port 9 (discard) is never contacted: the lock is refused first.
        manifest = Path(__file__).resolve().parents[2] / "manifests" / "ssv2.json"
        code, stderr = cli(
            "download", "--dest", str(dest), "--manifest", str(manifest), "--base-url", "http://127.0.0.1:9"
        )
    assert code == 1
    assert one_error_line(stderr).startswith(f"error: {dest}: --dest is in use by process {os.getpid()} (lock ")
    assert sorted(p.name for p in dest.iterdir()) == []

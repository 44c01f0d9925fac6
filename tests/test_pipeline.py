"""`ssv2prep run`: stage skipping, --only/--from, overrides, dry-run, and resume after a killed stage."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from fixtures import folder_bytes

from ssv2prep.cli import main
from ssv2prep.errors import ConfigError
from ssv2prep.pipeline import load_pipeline, options_to_args, run_pipeline, stage_status

TINY_PIPELINE = """
[pipeline]
name = "tiny"
work_dir = "{work}"

[stages.synth]
args = ["{{work}}/synth"]
pairs = 2
train_per_class = 3
validation_per_class = 1
test_per_class = 1
height = 48
min_frames = 10
max_frames = 14

[stages.shard]
videos = "{{work}}/synth/20bn-something-something-v2"
labels = "{{work}}/synth/labels"
out = "{{work}}/shards"
videos_per_shard = 1
workers = 1

[stages.verify]
args = ["{{work}}/shards"]
"""


def write_pipeline(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_PIPELINE.format(work=tmp_path / "work"))
    return path


def records(tmp_path: Path) -> dict[str, float]:
    folder = tmp_path / "work" / ".pipeline" / "tiny"
    return {p.stem: p.stat().st_mtime_ns for p in folder.glob("*.json")}


def processes() -> dict[int, tuple[int, int]]:
    """{pid: (ppid, process group)} of every live (not zombie) process."""
    found = {}
    for entry in (e for e in os.listdir("/proc") if e.isdigit()):
        try:
            state, ppid, pgrp = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if state not in ("Z", "X"):
            found[int(entry)] = (int(ppid), int(pgrp))
    return found


def test_options_become_cli_flags() -> None:
    argv = options_to_args({"videos_per_shard": 4, "flip": True, "partial_bn": False, "lr_steps": [20, 40]})
    assert argv == ["--videos-per-shard", "4", "--flip", "--lr-steps", "20,40"]


def test_runs_every_stage_then_skips_them(tmp_path: Path) -> None:
    pipeline = load_pipeline(write_pipeline(tmp_path))
    first = run_pipeline(pipeline)
    assert [(s.name, what) for s, what in first] == [("synth", "ran"), ("shard", "ran"), ("verify", "ran")]
    index = json.loads((tmp_path / "work/shards/ssv2-train.json").read_text())
    assert index["num_samples"] == 12 and len(index["shardlist"]) == 12
    before = records(tmp_path)
    second = run_pipeline(pipeline)
    assert [what for _, what in second] == ["skipped"] * 3 and records(tmp_path) == before
    # --only forces one stage; the others stay untouched
    only = run_pipeline(pipeline, only="verify")
    assert [(s.name, what) for s, what in only] == [("verify", "ran")]
    after = records(tmp_path)
    assert after["synth"] == before["synth"] and after["verify"] != before["verify"]


def test_changed_options_rerun_the_stage(tmp_path: Path) -> None:
    path = write_pipeline(tmp_path)
    run_pipeline(load_pipeline(path))
    changed = load_pipeline(path, ["verify.no_decode=true"])
    assert [stage_status(changed, s) for s in changed.stages] == ["done", "done", "changed"]
    assert [what for _, what in run_pipeline(changed)] == ["skipped", "skipped", "ran"]


def test_bad_overrides_and_stages_are_config_errors(tmp_path: Path) -> None:
    path = write_pipeline(tmp_path)
    with pytest.raises(ConfigError, match="no stage 'train'"):
        load_pipeline(path, ["train.epochs=2"])
    with pytest.raises(ConfigError, match="no stage 'nope'"):
        run_pipeline(load_pipeline(path), only="nope")
    bad = tmp_path / "bad.toml"
    bad.write_text('[stages.fly]\ncommand = "fly"\n')
    with pytest.raises(ConfigError, match="unknown command 'fly'"):
        load_pipeline(bad)


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path: Path) -> None:
    path = write_pipeline(tmp_path)
    result = CliRunner().invoke(main, ["run", str(path), "--dry-run"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line.startswith("  [")]
    assert [line.split("]")[0].strip("[ ") for line in lines] == ["pending"] * 3
    assert "--videos-per-shard 1" in lines[1] and not (tmp_path / "work" / "shards").exists()


@pytest.mark.slow
def test_a_killed_stage_resumes_and_ends_byte_identical(tmp_path: Path) -> None:
    path = write_pipeline(tmp_path)
    pipeline = load_pipeline(path)
    run_pipeline(pipeline, only="synth")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ssv2prep", "-q", "run", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    work_records = tmp_path / "work/shards/.ssv2prep-work"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list(work_records.glob("*.json"))) < 3:
        time.sleep(0.005)
    stage_groups = {pgid for pid, (ppid, pgid) in processes().items() if ppid == proc.pid}  # its own group
    for pgid in {proc.pid, *stage_groups}:
        os.killpg(pgid, signal.SIGKILL)  # the run and its shard stage, as a lost machine would
    proc.wait()
    done = len(list(work_records.glob("*.json")))
    assert 3 <= done < 20, "the shard stage should have been killed part-way"
    assert stage_status(pipeline, pipeline.stages[1]) == "pending"
    results = run_pipeline(pipeline)
    assert [what for _, what in results] == ["skipped", "ran", "ran"]
    reference = tmp_path / "ref"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "ssv2prep",
            "-q",
            "shard",
            "--videos",
            str(tmp_path / "work/synth/20bn-something-something-v2"),
            "--labels",
            str(tmp_path / "work/synth/labels"),
            "--out",
            str(reference),
            "--videos-per-shard",
            "1",
        ],
        check=True,
    )
    assert folder_bytes(tmp_path / "work/shards") == folder_bytes(reference)


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).parent.parent / "pipelines").glob("*.toml")), ids=lambda p: p.name
)
def test_shipped_pipelines_parse_with_the_real_commands(path: Path, tmp_path: Path, monkeypatch) -> None:
    """Every option of every stage of every shipped pipeline is a real flag of its command, with a value click
    accepts (run from an empty folder where the paths the stages name are created first)."""
    pipeline = load_pipeline(path.resolve())
    monkeypatch.chdir(tmp_path)
    assert pipeline.stages
    for stage in pipeline.stages:
        args = [*stage.args, *options_to_args(stage.options)]
        for value in args:
            if "/" in value and not value.startswith(("http", "-")):
                target = tmp_path / value
                if target.suffix in (".json", ".pt", ".pth"):
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.touch()
                else:
                    target.mkdir(parents=True, exist_ok=True)
        ctx = main.commands[stage.command].make_context(stage.command, args)
        assert ctx.params
    if pipeline.variants:
        trains = [s for s in pipeline.stages if s.command == "train"]
        assert sorted(s.variant for s in trains) == sorted(pipeline.variants)


def test_parallel_sweep_runs_variant_chains_side_by_side(tmp_path: Path) -> None:
    path = write_pipeline(tmp_path)
    text = path.read_text().replace(
        "[stages.verify]",
        '[stages.verify-again]\ncommand = "verify"\nargs = ["{work}/shards"]\n\n[stages.verify]'.format(
            work=tmp_path / "work"
        ),
    )
    text += '\n[sweep]\nstages = ["verify", "verify-again"]\nparallel = 2\nvariants = [{name = "a"}, {name = "b"}]\n'
    path.write_text(text)
    pipeline = load_pipeline(path)
    assert pipeline.parallel == 2
    results = run_pipeline(pipeline)
    keys = [s.key for s, what in results if what == "ran"]
    assert keys == ["synth", "shard", "verify-again@a", "verify@a", "verify-again@b", "verify@b"]
    folder = tmp_path / "work" / ".pipeline" / "tiny"
    rec = {k: json.loads((folder / f"{k}.json").read_text()) for k in keys}
    # each chain in order, the two chains at the same time
    for v in ("a", "b"):
        assert rec[f"verify-again@{v}"]["end_unix"] <= rec[f"verify@{v}"]["start_unix"]
    a, b = rec["verify-again@a"], rec["verify-again@b"]
    assert a["start_unix"] < b["end_unix"] and b["start_unix"] < a["end_unix"]
    # the output of parallel stages goes to their log files, the others' to the terminal
    for k in keys[2:]:
        assert "verify: OK: 20 shards, 20 samples" in (folder / f"{k}.log").read_text()
    assert not (folder / "shard.log").exists()
    assert [what for _, what in run_pipeline(pipeline)] == ["skipped"] * 6


def test_parallel_must_be_a_positive_integer(tmp_path: Path) -> None:
    path = write_pipeline(tmp_path)
    path.write_text(path.read_text() + '\n[sweep]\nstages = ["verify"]\nparallel = 0\nvariants = [{name = "a"}]\n')
    with pytest.raises(ConfigError, match="parallel"):
        load_pipeline(path)


def test_run_takes_a_shipped_pipeline_by_name_from_any_folder(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # no pipelines/ folder here
    result = CliRunner().invoke(main, ["run", "ssv2-shift-study", "--dry-run", "--only", "download"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "pipeline ssv2-shift-study: work folder runs/ssv2"
    assert len(lines) == 2 and lines[1].startswith("  [pending] download: ")
    assert lines[1].endswith(" -m ssv2prep download --dest runs/ssv2/download --manifest ssv2")
    assert load_pipeline("demo").source == Path(__file__).resolve().parent.parent / "pipelines" / "demo.toml"


def test_run_unknown_pipeline_name_is_a_one_line_error_listing_the_shipped_ones(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    shipped = sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "pipelines").glob("*.toml"))
    for given, problem in (("ssv2-tsm", "no such file, nor a shipped pipeline"), ("a/b.toml", "file not found")):
        result = CliRunner().invoke(main, ["run", given, "--dry-run"])
        assert result.exit_code == 2
        assert result.stderr.splitlines() == [f"error: {given}: {problem}; shipped pipelines: {', '.join(shipped)}"]


@pytest.mark.parametrize(
    ("sig", "to_group", "code"), [(signal.SIGTERM, False, 143), (signal.SIGINT, True, 130)], ids=["sigterm", "ctrl-c"]
)
def test_a_stopped_run_stops_its_running_stage(tmp_path: Path, sig: int, to_group: bool, code: int) -> None:
    path = tmp_path / "slower.toml"  # 48 one-video shards through the ffmpeg binary: a few seconds of work
    slower = TINY_PIPELINE.replace("train_per_class = 3", "train_per_class = 10").replace(
        "workers = 1", 'workers = 1\ndecoder = "ffmpeg"'
    )
    path.write_text(slower.format(work=tmp_path / "work"))
    pipeline = load_pipeline(path)
    run_pipeline(pipeline, only="synth")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ssv2prep", "-q", "run", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    work_records = tmp_path / "work/shards/.ssv2prep-work"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(list(work_records.glob("ssv2-*.json"))) < 2:
            time.sleep(0.005)
        stages = {pid: pgid for pid, (ppid, pgid) in processes().items() if ppid == proc.pid}
        assert len(stages) == 1 and proc.poll() is None, "the shard stage should be running"
        ((stage_pid, stage_group),) = stages.items()
        assert stage_group == stage_pid != proc.pid  # a group of its own, as torchrun gives its workers
        if to_group:
            os.killpg(proc.pid, sig)  # a terminal's Ctrl-C: the foreground group, which the stage is not in
        else:
            proc.send_signal(sig)  # `kill PID` of the run alone
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr.decode()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(pg == stage_group for _, pg in processes().values()):
        time.sleep(0.05)
    assert not [pid for pid, (_, pg) in processes().items() if pg == stage_group], "the stage outlived the run"
    assert stage_status(pipeline, pipeline.stages[1]) == "pending"  # not recorded as done
    done = {p.name.removesuffix(".json") for p in work_records.glob("ssv2-*.tar.json")}
    assert 2 <= len(done) < 48 and done == {p.name for p in (tmp_path / "work/shards").glob("ssv2-*.tar")}


def test_a_parallel_sweep_says_what_each_variant_does_and_where_its_log_is(tmp_path: Path) -> None:
    path = write_pipeline(tmp_path)
    text = path.read_text().replace(
        "[stages.verify]", '[stages.verify-again]\ncommand = "verify"\nargs = ["{run}"]\n\n[stages.verify]'
    )
    # {run} of variant a is the shard folder; b's does not exist: its first stage fails, its second never runs
    (tmp_path / "work" / "tiny").mkdir(parents=True)
    (tmp_path / "work" / "tiny" / "a").symlink_to(tmp_path / "work" / "shards")
    text += '\n[sweep]\nstages = ["verify", "verify-again"]\nparallel = 2\nvariants = [{name = "a"}, {name = "b"}]\n'
    path.write_text(text)
    result = CliRunner().invoke(main, ["run", str(path)])
    assert result.exit_code == 1
    logs = tmp_path / "work" / ".pipeline" / "tiny"
    lines = [line.split(" INFO ", 1)[1] for line in result.stderr.splitlines() if " INFO stage " in line]
    assert "stage synth: running" in lines and "pending" not in result.stderr
    for key in ("verify-again@a", "verify@a", "verify-again@b", "verify@b"):
        assert f"stage {key}: queued (log: {logs / key}.log)" in lines, lines
    for key in ("verify-again@a", "verify@a"):
        assert f"stage {key}: running (log: {logs / key}.log)" in lines
        assert any(
            re.fullmatch(rf"stage {key}: done after 0:\d\d \(log: {re.escape(str(logs / key))}\.log\)", x)
            for x in lines
        )
    assert any(x.startswith("stage verify-again@b: failed after ") for x in lines)
    assert not any(x.startswith("stage verify@b: running") for x in lines)
    assert "stage verify@b: not run (an earlier stage of its chain failed, or the run stopped)" in lines
    assert "not a folder" in (logs / "verify-again@b.log").read_text()
    again = CliRunner().invoke(main, ["run", str(path), "--only", "synth"])
    assert "stage synth: running again (--from/--only)" in again.stderr

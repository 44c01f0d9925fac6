"""The command line: exit codes, one-line errors (never a traceback), and the data side end to end."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from fixtures import copy_dataset, read_json
from httpserver import FaultyServer

from ssv2prep.cli import main

COMMANDS = ["synth", "download", "extract", "shard", "verify", "demo", "bench"]


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def assert_one_line_error(code: int, stderr: str, *needles: str) -> None:
    assert code != 0
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_examples(command: str) -> None:
    code, out, _ = run(command, "--help")
    assert code == 0 and "Usage:" in out
    assert "Example" in out or command == "bench"


def test_help_does_not_import_torch_or_av() -> None:
    code = (
        "import sys; from ssv2prep.cli import main; sys.argv=['ssv2prep','--help']\n"
        "try:\n main()\nexcept SystemExit: pass\nprint(sorted(m for m in ('torch','av') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_python_dash_m_and_cli_py_work() -> None:
    root = Path(__file__).resolve().parent.parent
    a = subprocess.run([sys.executable, "-m", "ssv2prep", "--version"], capture_output=True, text=True, check=True)
    b = subprocess.run([sys.executable, str(root / "cli.py"), "--version"], capture_output=True, text=True, check=True)
    assert a.stdout == b.stdout and "ssv2prep" in a.stdout


def test_shard_then_verify(synth_tiny, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    code, stdout, stderr = run(
        "shard",
        "--videos",
        str(synth_tiny.videos_dir),
        "--labels",
        str(synth_tiny.labels_dir),
        "--out",
        str(out),
        "--videos-per-shard",
        "4",
        "--workers",
        "1",
    )
    assert code == 0, stderr
    assert read_json(out / "ssv2-train.json")["num_samples"] == 12
    code, stdout, stderr = run("verify", str(out))
    frames = sum(read_json(out / f"ssv2-{s}.json")["num_frames"] for s in ("train", "validation", "test"))
    assert code == 0 and f"verify: OK: 5 shards, 20 samples (test 4, train 12, validation 4), {frames} frames" in stdout


def test_verify_finds_a_corrupt_and_a_missing_shard(tiny_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "copy"
    shutil.copytree(tiny_shards, out)
    data = bytearray((out / "ssv2-train-000000.tar").read_bytes())
    data[3000] ^= 0xFF
    (out / "ssv2-train-000000.tar").write_bytes(bytes(data))
    (out / "ssv2-validation-000001.tar").unlink()
    code, _, stderr = run("verify", str(out), "--no-decode")
    assert_one_line_error(code, stderr, "problems found")
    assert "ssv2-train-000000.tar: md5 differs from the index" in stderr
    assert "ssv2-validation-000001.tar: missing" in stderr


def test_bad_template_is_one_line_naming_the_file(synth_tiny, tmp_path: Path) -> None:
    videos, labels = copy_dataset(synth_tiny, tmp_path / "d")
    train = read_json(labels / "train.json")
    train[0]["template"] = "Juggling [something]"
    (labels / "train.json").write_text(json.dumps(train))
    code, _, stderr = run("shard", "--videos", str(videos), "--labels", str(labels), "--out", str(tmp_path / "o"))
    assert_one_line_error(code, stderr, "train.json", "Juggling something")
    assert code == 1


def test_bad_option_value_exits_2(synth_tiny, tmp_path: Path) -> None:
    code, _, stderr = run(
        "shard",
        "--videos",
        str(synth_tiny.videos_dir),
        "--labels",
        str(synth_tiny.labels_dir),
        "--out",
        str(tmp_path / "o"),
        "--part",
        "3/2",
    )
    assert_one_line_error(code, stderr, "--part")
    assert code == 2


def test_extract_refuses_tar_slip(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    with tarfile.open(src / "20bn-something-something-v2.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("20bn-something-something-v2/../../evil.webm")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    labels = src / "labels"
    labels.mkdir()
    for name in ("labels.json", "train.json", "validation.json", "test.json"):
        (labels / name).write_text("{}" if name == "labels.json" else "[]")
    code, _, stderr = run("extract", "--src", str(src), "--dest", str(tmp_path / "dest"))
    assert_one_line_error(code, stderr, "evil.webm")
    assert not (tmp_path / "evil.webm").exists() and not list(tmp_path.rglob("evil.webm"))


def test_download_403_explains_the_licence_and_hides_secrets(tmp_path: Path) -> None:
    served = tmp_path / "www"
    served.mkdir()
    (served / "a.bin").write_bytes(b"x" * 1000)
    manifest = {
        "kind": "ssv2prep-download-manifest-v1",
        "name": "t",
        "files": [{"name": "a.bin", "role": "labels", "size_bytes": 1000}],
    }
    (tmp_path / "m.json").write_text(json.dumps(manifest))
    with FaultyServer(served) as srv:
        srv.status("/a.bin", 403, times=None)
        code, _, stderr = run(
            "download",
            "--dest",
            str(tmp_path / "dl"),
            "--manifest",
            str(tmp_path / "m.json"),
            "--base-url",
            srv.url,
            "--header",
            "Authorization: Bearer s3cr3t-t0ken",
        )
    assert_one_line_error(code, stderr, "a.bin", "licen")
    assert "s3cr3t" not in stderr


def test_synth_zero_videos_for_a_split_means_zero(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main,
        [
            "synth",
            str(tmp_path / "s"),
            "--pairs",
            "1",
            "--train-per-class",
            "1",
            "--validation-per-class",
            "0",
            "--test-per-class",
            "0",
            "--height",
            "32",
            "--min-frames",
            "4",
            "--max-frames",
            "4",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "train 2, validation 0, test 0" in result.output
    assert json.loads((tmp_path / "s/labels/validation.json").read_text()) == []
    assert len(list((tmp_path / "s/20bn-something-something-v2").glob("*.webm"))) == 2


def test_a_bad_number_list_is_a_usage_error_naming_the_option(tiny_shards: Path, tmp_path: Path) -> None:
    code, _, stderr = run("train", "--data", str(tiny_shards), "--out", str(tmp_path / "r"), "--lr-steps", "20,forty")
    assert code == 2 and "Traceback" not in stderr
    assert "--lr-steps" in stderr and "'20,forty'" in stderr
    assert not (tmp_path / "r").exists()  # nothing started


def test_top_level_help_lists_every_command() -> None:
    code, out, _ = run("--help")
    summary = out.split("Options:", 1)[0]
    assert code == 0
    for name in main.commands:
        assert f"\n    {name} " in summary, name


def test_synth_help_shows_the_config_defaults() -> None:
    from ssv2prep.prep.synth import SynthConfig

    code, out, _ = run("synth", "--help")
    assert code == 0
    text = " ".join(out.split())
    cfg = SynthConfig()
    for flag, value in (("--pairs", cfg.num_pairs), ("--height", cfg.height), ("--parts", cfg.num_parts)):
        shown = re.search(rf"{flag} INTEGER [^\[]*\[default: (\d+)\]", text)
        assert shown is not None and int(shown.group(1)) == value, flag


@pytest.mark.parametrize("flag", [["--zip-parts"], ["--parts", "3"]])
def test_synth_package_options_need_package(flag: list[str], tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["synth", str(tmp_path / "s"), *flag])
    assert result.exit_code == 2 and "needs --package" in result.stderr
    assert not (tmp_path / "s").exists()

"""The shipped files (manifests/, pipelines/) are found from a checkout and from an installed wheel, from any folder.

The slow test builds a wheel of this tree, installs it into a fresh virtualenv whose only other entries are the
dependencies of the main venv, and runs the README's commands from an empty folder outside the checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from httpserver import FaultyServer

from ssv2prep.cli import main
from ssv2prep.prep.manifest import load_manifest
from ssv2prep.resources import find_manifest, find_pipeline, shipped_dir, shipped_file, shipped_names

REPO = Path(__file__).resolve().parent.parent
SHIPPED_MANIFEST = REPO / "manifests" / "ssv2.json"
# what a wheel is built from (tests/, docs/ and the Makefile are not part of the package)
Cli = Callable[[list[str]], tuple[int, str, str]]  # arguments -> (exit code, stdout, stderr)
BUILD_INPUTS = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "ssv2prep", "manifests", "pipelines")


def manifest_names() -> list[str]:
    """File names of manifests/ssv2.json, read straight from the JSON."""
    return [f["name"] for f in json.loads(SHIPPED_MANIFEST.read_text())["files"]]


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    return errors[0]


def check_download_with_default_manifest(download: Cli, www: Path, dest: Path) -> None:
    """`download(args)` without --manifest asks for the files of manifests/ssv2.json (404s first), then refuses
    small stand-ins by that manifest's sizes and magic bytes."""
    names = manifest_names()
    www.mkdir()
    with FaultyServer(www) as srv:
        code, _, stderr = download(["--dest", str(dest), "--base-url", srv.url, "--retries", "0"])
        assert code == 1, stderr
        assert sorted({r.path for r in srv.requests}) == sorted(f"/{n}" for n in names)
        line = one_error_line(stderr)
        for name in names:
            assert f"{name}: not found (HTTP 404)" in line
        for i, name in enumerate(names):  # small stand-ins: the shipped manifest's sizes and magic bytes refuse them
            (www / name).write_bytes(bytes([i]) * (1000 + i))
        code, _, stderr = download(["--dest", str(dest), "--base-url", srv.url, "--retries", "0"])
        assert code == 1, stderr
        line = one_error_line(stderr)
    for name in names:
        assert f"{name}: " in line and not (dest / name).exists()
    assert line.count("manifest expects about") == 2 and "not zip (50 4b 03 04)" in line  # two parts, the labels zip


# ------------------------------------------------------------------------------------------------- from a checkout


def test_shipped_files_resolve_to_the_checkout_folders() -> None:
    assert shipped_dir("manifests") == REPO / "manifests"
    assert shipped_dir("pipelines") == REPO / "pipelines"
    assert shipped_names("pipelines") == sorted(p.stem for p in (REPO / "pipelines").glob("*.toml"))
    assert shipped_file("manifests", "ssv2") == SHIPPED_MANIFEST == shipped_file("manifests", "ssv2.json")
    man = load_manifest(shipped_file("manifests", "ssv2"))
    assert [f.name for f in man.files] == manifest_names()


def test_names_resolve_from_any_folder_and_a_file_there_wins(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert find_pipeline("demo") == find_pipeline("demo.toml") == REPO / "pipelines" / "demo.toml"
    assert find_manifest("ssv2-20parts") == REPO / "manifests" / "ssv2-20parts.json"
    (tmp_path / "demo.toml").write_text("[stages]\n")
    assert find_pipeline("demo.toml") == Path("demo.toml")


def test_download_default_manifest_from_another_folder(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # not the repository root: the default must not depend on the current folder

    def download(args: list[str]) -> tuple[int, str, str]:
        result = CliRunner().invoke(main, ["download", *args], catch_exceptions=False)
        return result.exit_code, result.stdout, result.stderr

    check_download_with_default_manifest(download, tmp_path / "www", tmp_path / "dl")


def test_download_unknown_manifest_name_lists_the_shipped_ones(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["download", "--dest", str(tmp_path), "--manifest", "ssv3"])
    assert result.exit_code == 1
    assert one_error_line(result.stderr) == (
        "error: ssv3: no such file, nor a shipped manifest; shipped manifests: ssv2, ssv2-20parts"
    )


# -------------------------------------------------------------------------------------------- from an installed wheel


def _install_wheel(tmp: Path) -> tuple[Path, Path]:
    """Build a wheel of this tree and install it into a fresh venv; returns (venv bin folder, its site-packages)."""
    src = tmp / "src"
    src.mkdir()
    for name in BUILD_INPUTS:  # a copy, so building leaves no build/ or *.egg-info in the checkout
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(tmp / "wheel"), str(src)],
        check=True,
    )
    (wheel,) = (tmp / "wheel").glob("ssv2prep-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(
        subprocess.run(
            [venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    # the dependencies (torch, click, ...) come from this venv's site-packages; a path line in a .pth file adds the
    # folder without running its .pth files, so this venv's editable install of the checkout stays out
    (site / "_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = ["install", "--no-deps", "--no-index", "--ignore-installed", "-q", str(wheel)]
    subprocess.run([*pip, "--python", str(venv / "bin" / "python"), *install], check=True)
    return venv / "bin", site


@pytest.mark.slow
def test_installed_wheel_runs_the_readme_commands_from_an_empty_folder(tmp_path: Path) -> None:
    bin_dir, site = _install_wheel(tmp_path)
    work = tmp_path / "empty"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the tests put the checkout there
    env["OMP_NUM_THREADS"] = "1"

    def cli(args: list[str]) -> tuple[int, str, str]:
        proc = subprocess.run([bin_dir / "ssv2prep", *args], cwd=work, env=env, capture_output=True, text=True)
        return proc.returncode, proc.stdout, proc.stderr

    # the package is the installed one, with the shipped files inside it, and the checkout is not importable
    probe = (
        "import importlib.util, json, sys, ssv2prep\nfrom ssv2prep.resources import shipped_dir\n"
        "print(json.dumps([ssv2prep.__file__, str(shipped_dir('manifests')), str(shipped_dir('pipelines')), "
        "sys.path, importlib.util.find_spec('fixtures') is not None]))"
    )
    proc = subprocess.run([bin_dir / "python", "-c", probe], cwd=work, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    module, manifests, pipelines, path, tests_importable = json.loads(proc.stdout)
    assert Path(module) == site / "ssv2prep" / "__init__.py"
    assert Path(manifests) == site / "ssv2prep" / "shipped" / "manifests"
    assert Path(pipelines) == site / "ssv2prep" / "shipped" / "pipelines"
    # nothing of the checkout is importable; the test venv (whose site-packages the new venv borrows for torch) may
    # itself live inside the checkout, as .venv does
    own_venv = Path(sys.prefix).resolve()
    checkout = [p for p in path if p and Path(p).resolve().is_relative_to(REPO)]
    assert all(Path(p).resolve().is_relative_to(own_venv) for p in checkout) and not tests_importable
    # ... and it ships every file of the repository's folders, byte for byte
    for kind, folder, pattern in (("manifests", manifests, "*.json"), ("pipelines", pipelines, "*.toml")):
        shipped = {p.name: p.read_bytes() for p in Path(folder).iterdir()}
        assert shipped == {p.name: p.read_bytes() for p in (REPO / kind).glob(pattern)}

    # the README's first command: download with the default manifest
    check_download_with_default_manifest(lambda args: cli(["download", *args]), tmp_path / "www", work / "dl")

    # a shipped pipeline by name; its download stage names the shipped manifest, which download then finds
    code, stdout, stderr = cli(["run", "--dry-run", "ssv2-tsm-r50-8f"])
    assert code == 0, stderr
    stages = list(tomllib.loads((REPO / "pipelines" / "ssv2-tsm-r50-8f.toml").read_text())["stages"])
    lines = stdout.splitlines()
    assert lines[0] == "pipeline ssv2-tsm-r50-8f: work folder runs/ssv2"
    assert [line.split("] ", 1)[1].split(":", 1)[0] for line in lines[1:]] == stages
    assert all(line.startswith("  [pending] ") for line in lines[1:])
    assert "download --dest runs/ssv2/download --manifest ssv2 " in lines[1]
    code, _, stderr = cli(["run", "--dry-run", "ssv2-tsm-r50-9f"])
    assert code == 2 and "shipped pipelines: demo, ssv2-shift-study, ssv2-tsm-r50-8f" in one_error_line(stderr)

    # the demo, at its smallest, with every stage a process of the installed package (the one end-to-end run of
    # the demo in the suite: tests/test_demo.py checks its report's parts)
    code, stdout, stderr = cli(["demo", "--small", "--out", "demo"])
    assert code == 0, stderr
    out = work / "demo"
    for part in sorted((out / "synth/package").glob("20bn-*")):  # the parts came over HTTP byte for byte
        assert (out / "download" / part.name).read_bytes() == part.read_bytes()
    index = json.loads((out / "shards/ssv2-validation.json").read_text())
    assert index["num_samples"] == 8 and index["num_classes"] == 4
    records = {p.stem: json.loads(p.read_text()) for p in (out / ".pipeline/demo").glob("*.json")}
    assert sorted(records) == sorted(
        ["synth", "download", "extract", "shard", "verify"]
        + [f"{stage}@{v}" for stage in ("train", "eval", "eval-test") for v in ("tsm", "tsn")]
    )
    assert {r["argv"][0] for r in records.values()} == {str(bin_dir / "python")}
    assert f"report: {out.relative_to(work)}/report.md" in stdout
    report = (out / "report.md").read_text()  # it states what the eval reports say
    for variant in ("tsm", "tsn"):
        val = json.loads((out / f"demo/{variant}/eval/report.json").read_text())["settings"][0]
        test = json.loads((out / f"demo/{variant}/eval-test/report.json").read_text())["settings"][0]
        assert val["videos"] == 8 and test["videos"] == 8
        assert f"| {variant} |" in report and f"| {val['top1']:.1f} | {test['top1']:.1f} |" in report
        assert (out / f"demo/{variant}/loss.png").is_file()
    assert (out / "demo/comparison.png").is_file() and (out / "demo/comparison.csv").is_file()
    code, _, stderr = cli(["demo", "--small", "--out", "demo"])  # a second run skips every finished stage
    assert code == 0 and stderr.count("(done)") >= 10, stderr

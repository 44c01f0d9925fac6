"""`bench verify` on the tiny shards: every method covers the same shards and frames, and the ratios are the rows'."""

from __future__ import annotations

import json
import math
import os
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from ssv2prep.bench.verify import KINDS, VerifyBenchConfig, run_verify_bench
from ssv2prep.cli import main
from ssv2prep.errors import ConfigError


def count_tars(folder: Path) -> tuple[int, int]:
    """(shards, JPEG members) of every ssv2-*.tar in `folder`, read with stock tarfile."""
    shards = sorted(folder.glob("ssv2-*.tar"))
    jpegs = 0
    for path in shards:
        with tarfile.open(path) as tar:
            jpegs += sum(m.isfile() and m.name.endswith(".jpg") for m in tar)
    return len(shards), jpegs


def test_bench_verify_json_counts_and_ratios(tiny_shards: Path, tmp_path: Path) -> None:
    shards, frames = count_tars(tiny_shards)
    workers = min(2, len(os.sched_getaffinity(0)))
    json_path = tmp_path / "bench-verify.json"
    args = ["--shards", str(tiny_shards), "--workers", str(workers), "--repeats", "2", "--json", str(json_path)]
    result = CliRunner().invoke(main, ["bench", "verify", *args])
    assert result.exit_code == 0, result.output
    data = json.loads(json_path.read_text())
    assert data["benchmark"] == "verify" and data["shards"] == shards == 8 and data["frames"] == frames
    rows = {r["kind"]: r for r in data["rows"]}
    assert list(rows) == list(KINDS) and len(data["runs"]) == 2 * len(KINDS)
    for kind in ("verify-1", "verify-N", "reference-full", "reference-draft"):
        assert (rows[kind]["shards"], rows[kind]["frames"]) == (shards, frames), kind
        assert rows[kind]["frames_per_s"] > 0
    assert rows["verify-1"]["workers"] == 1 and rows["verify-N"]["workers"] == workers
    ratios = data["ratios"]
    for key in ("speedup_vs_1_worker", "ceiling_speedup", "speedup_vs_ideal", "speedup_vs_ceiling"):
        assert math.isfinite(ratios[key]) and ratios[key] > 0, key
    assert ratios["speedup_vs_1_worker"] == pytest.approx(
        rows["verify-N"]["frames_per_s"] / rows["verify-1"]["frames_per_s"], rel=2e-3
    )
    assert ratios["speedup_vs_ceiling"] == pytest.approx(
        ratios["speedup_vs_1_worker"] / ratios["ceiling_speedup"], rel=2e-3
    )
    for kind in KINDS:  # the row is the median of its repeats (of two: their mean)
        seconds = [r["seconds"] for r in data["runs"] if r["kind"] == kind]
        assert rows[kind]["seconds"] == pytest.approx(sum(seconds) / 2, abs=2e-3)
    assert "speed-up vs 1 worker" in result.output and f"| {workers} | {ratios['speedup_vs_1_worker']:.2f} |" in (
        result.output
    )


def test_bench_verify_refuses_bad_options(tiny_shards: Path) -> None:
    with pytest.raises(ConfigError, match="cores"):
        run_verify_bench(VerifyBenchConfig(shards_dir=tiny_shards, workers=4096))
    with pytest.raises(ConfigError, match="--repeats must be >= 1"):
        run_verify_bench(VerifyBenchConfig(shards_dir=tiny_shards, repeats=0))
    result = CliRunner().invoke(main, ["bench", "verify", "--shards", str(tiny_shards), "--frames", "0"])
    assert result.exit_code != 0 and "--frames must be >= 1" in result.output and "Traceback" not in result.output

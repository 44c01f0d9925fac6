"""The demo at its smallest size: every stage through the real code paths, and a report that agrees with them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from ssv2prep.cli import main


@pytest.mark.slow
def test_small_demo_runs_every_stage_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "--out", str(out), "--small"])
    assert result.exit_code == 0, result.output
    # the parts came over HTTP byte for byte, and the shards hold every synthetic video
    for part in sorted((out / "synth/package").glob("20bn-*")):
        assert (out / "download" / part.name).read_bytes() == part.read_bytes()
    index = json.loads((out / "shards/ssv2-validation.json").read_text())
    assert index["num_samples"] == 8 and index["num_classes"] == 4
    records = sorted(p.stem for p in (out / ".pipeline/demo").glob("*.json"))
    assert records == sorted(
        ["synth", "download", "extract", "shard", "verify"]
        + [f"{stage}@{v}" for stage in ("train", "eval", "eval-test") for v in ("tsm", "tsn")]
    )
    # the report states what the eval reports say
    report = (out / "report.md").read_text()
    for variant in ("tsm", "tsn"):
        val = json.loads((out / f"demo/{variant}/eval/report.json").read_text())["settings"][0]
        test = json.loads((out / f"demo/{variant}/eval-test/report.json").read_text())["settings"][0]
        assert val["videos"] == 8 and test["videos"] == 8
        assert f"| {variant} |" in report and f"| {val['top1']:.1f} | {test['top1']:.1f} |" in report
        assert (out / f"demo/{variant}/loss.png").is_file()
    assert (out / "demo/comparison.png").is_file() and "comparison.csv" in {p.name for p in (out / "demo").iterdir()}
    # a second run skips every finished stage
    again = CliRunner().invoke(main, ["demo", "--out", str(out), "--small"])
    assert again.exit_code == 0
    assert again.stderr.count("(done)") >= 10

"""The demo at its smallest size: every stage through the real code paths, and a report that agrees with them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from ssv2prep.cli import main
from ssv2prep.demo import write_report
from ssv2prep.pipeline import load_pipeline
from ssv2prep.resources import shipped_file
from ssv2prep.sweep import VariantResult


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


def _results(tsm_val: float, tsn_val: float) -> list[VariantResult]:
    def evals(val: float) -> list[dict[str, object]]:
        return [{"folder": "eval", "top1": val}, {"folder": "eval-test", "top1": val - 1.0}]

    return [
        VariantResult("tsm", "1/8 bidirectional blockres", evals(tsm_val), 12.0),
        VariantResult("tsn", "none (TSN)", evals(tsn_val), 11.0),
    ]


@pytest.mark.parametrize(("threads", "shown"), [("3", "3 thread(s) per training process"), (None, "1 thread(s)")])
def test_report_names_the_seed_and_threads_a_rerun_needs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threads: str | None, shown: str
) -> None:
    if threads is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)  # 2 cores / parallel 2
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", threads)
    pipeline = load_pipeline(
        shipped_file("pipelines", "demo"), [f"work_dir={json.dumps(str(tmp_path))}", "train.seed=7"]
    )
    text = write_report(pipeline, _results(86.1, 24.3), 300.0).read_text()
    assert "Training seed 7, " + shown in text
    assert "| tsm | 1/8 bidirectional blockres | 86.1 | 85.1 | 12.0 |" in text


def test_report_target_leaves_room_for_seed_and_thread_scatter(tmp_path: Path) -> None:
    # docs/demo-study.md: TSM's validation top-1 scatters over 92.4-99.3% with seed and threads; the check must pass
    # all of those with room to spare and still fail a TSM that is not far above chance.
    pipeline = load_pipeline(shipped_file("pipelines", "demo"), [f"work_dir={json.dumps(str(tmp_path))}"])
    assert "targets met" in write_report(pipeline, _results(86.1, 24.3), 1.0).read_text()
    assert "targets NOT met" in write_report(pipeline, _results(79.0, 24.3), 1.0).read_text()
    assert "targets NOT met" in write_report(pipeline, _results(97.0, 70.0), 1.0).read_text()

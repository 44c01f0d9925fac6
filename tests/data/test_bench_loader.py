"""The loader benchmark's library part: same schedule for every method, same pixels, complete result (no timings)."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from ssv2prep.bench.loader import (
    GPU_REFERENCE_CLIPS_PER_S,
    METHODS,
    _schedules,
    _write_frame_folders,
    format_loader_bench,
    run_loader_bench,
)
from ssv2prep.data.source import resolve_source
from ssv2prep.errors import ConfigError


def test_bench_on_given_shards(tiny_shards: Path, tmp_path: Path) -> None:
    result = run_loader_bench(
        tiny_shards / "ssv2-train.json",
        num_clips=6,
        workers=(1, 2),
        segments=4,
        crop=32,
        scale=40,
        repeats=2,
        work_dir=tmp_path,
    )
    assert result["videos"] == 12 and result["shards"] == 4 and result["frame_size"][1] == 48
    rows = {(r["method"], r["workers"]): r for r in result["rows"]}
    assert set(rows) == {(m, n) for m in METHODS for n in (1, 2)}
    for (_, n), row in rows.items():
        assert row["clips"] == 6 and len(row["runs_clips_per_s"]) == 2
        assert row["clips_per_s"] == max(row["runs_clips_per_s"]) > 0
        assert row["clips_per_s_per_worker"] == pytest.approx(row["clips_per_s"] / n, abs=0.01)
    for q in result["ratios"]:
        ours, folder = rows[("ours", q["workers"])]["clips_per_s"], rows[("folder", q["workers"])]["clips_per_s"]
        assert q["ours_vs_folder"] == pytest.approx(ours / folder, abs=1e-3)
        assert q["ours_vs_gpu_reference"] == pytest.approx(ours / GPU_REFERENCE_CLIPS_PER_S, abs=1e-3)
    # ours (uint8 from shards) and the folder loader (PIL, float) compute the same clip
    assert result["pixel_check_mean_abs_diff"] < 0.5
    # the folders hold the shard frames, 1-based as the official extraction
    with tarfile.open(tiny_shards / "ssv2-train-000000.tar") as tar:
        first = next(m for m in tar.getmembers() if m.name.endswith(".000000.jpg"))
        key = first.name.split(".")[0]
        assert (tmp_path / "frames" / key / "000001.jpg").read_bytes() == tar.extractfile(first).read()
    text = format_loader_bench(result)
    assert text.count("\n| ours: shards") == 2 and text.count("\n| folder (official style)") == 2
    assert "| workers | ours / folder (goal >= 2)" in text and "GPU reference: 116 clips/s (published" in text


def test_every_method_gets_the_same_schedule(tiny_shards: Path, tmp_path: Path) -> None:
    source = resolve_source(str(tiny_shards / "ssv2-train.json"))
    contents = _write_frame_folders(source.urls, tmp_path)
    cfg = {"segments": 8, "crop": 224, "scale": 256, "seed": 0}
    plan = _schedules(contents, n=3, num_clips=10, cfg=cfg)
    assert [len(jobs) for _, jobs in plan] == [4, 3, 3]
    assert [urls for urls, _ in plan] == [(source.urls[0], source.urls[3]), (source.urls[1],), (source.urls[2],)]
    frames = {key: n for url in source.urls for key, n in contents[url]}
    for urls, jobs in plan:
        stored = [key for url in urls for key, _ in contents[url]]
        assert [j.key for j in jobs] == [stored[i % len(stored)] for i in range(len(jobs))]
        for job in jobs:
            avg = frames[job.key] // 8
            assert all(avg * t <= i < avg * (t + 1) for t, i in enumerate(job.indices))
    assert _schedules(contents, n=3, num_clips=10, cfg=cfg) == plan  # seeded: reproducible


def test_bench_synthesizes_when_no_index_is_given() -> None:
    result = run_loader_bench(None, num_clips=2, workers=(1,), num_videos=4, repeats=1)
    assert result["index"] is None and result["videos"] == 4 and result["frame_size"][1] == 256
    assert result["config"]["segments"] == 8 and result["config"]["crop"] == 224
    assert result["pixel_check_mean_abs_diff"] < 0.5


@pytest.mark.parametrize(
    "kw", [{"num_clips": 0}, {"workers": ()}, {"crop": 300}, {"num_clips": 1, "workers": (2,)}, {"repeats": 0}]
)
def test_bad_options_are_config_errors(tiny_shards: Path, kw: dict) -> None:
    with pytest.raises(ConfigError):
        run_loader_bench(tiny_shards / "ssv2-train.json", **{"num_clips": 4, **kw})

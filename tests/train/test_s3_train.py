"""`train` and `eval` straight from an S3 index (moto's real S3 server on 127.0.0.1), with and without the local
shard cache, against the same runs from the local folder; and the class checks that keep a head honest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from ssv2prep import storage
from ssv2prep.cli import main
from ssv2prep.data.cache import entry_path
from ssv2prep.train.report import read_metrics

TRAIN_ARGS = [
    "--backbone",
    "resnet18",
    "--segments",
    "2",
    "--crop-size",
    "32",
    "--scale-size",
    "40",
    "--batch-size",
    "6",  # 12 train videos: 2 steps per epoch
    "--workers",
    "1",
    "--lr",
    "0.01",
    "--no-lr-scaling",
    "--lr-steps",
    "",
    "--log-every",
    "1",
    "--dropout",
    "0.0",
    "--device",
    "cpu",
]


def upload_folder(folder: Path, prefix: str, *, skip: tuple[str, ...] = ()) -> None:
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name not in skip:
            storage.upload(path, storage.join(prefix, path.name))


def run_cli(*args: str) -> None:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output


def records(run: Path) -> tuple[list[tuple[int, float]], list[dict]]:
    """(train (step, loss) pairs, eval records without timings) of a run."""
    rows = read_metrics(run / "metrics.jsonl")
    train = [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]
    evals = [{k: v for k, v in r.items() if k != "seconds"} for r in rows if r["kind"] == "eval"]
    return train, evals


def eval_numbers(folder: Path) -> tuple[list[dict], str]:
    report = json.loads((folder / "report.json").read_text())
    rows = [{k: v for k, v in r.items() if k != "seconds_per_video"} for r in report["settings"]]
    return rows, (folder / "per_class.csv").read_text()


@pytest.fixture(scope="module")
def prefix(s3, tiny_shards: Path) -> str:
    """`s3://<bucket>/ssv2`: the tiny shard folder uploaded as is."""
    url = f"s3://{s3.new_bucket()}/ssv2"
    upload_folder(tiny_shards, url)
    return url


@pytest.fixture(scope="module")
def local_run(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("local") / "run"
    run_cli("-q", "train", "--data", str(tiny_shards), "--out", str(out), "--epochs", "2", *TRAIN_ARGS)
    return out


@pytest.mark.slow  # trains a tiny TSM (~10-30 s on a loaded CPU)
def test_train_from_s3_with_a_cache_matches_the_local_run_and_epoch_2_reads_only_the_cache(
    s3, tiny_shards: Path, local_run: Path, tmp_path: Path
) -> None:
    prefix = f"s3://{s3.new_bucket()}/ssv2"
    upload_folder(tiny_shards, prefix)
    out, cache = tmp_path / "run", tmp_path / "cache"
    sources = ["--train", f"{prefix}/ssv2-train.json", "--val", f"{prefix}/ssv2-validation.json"]
    common = [*sources, "--out", str(out), "--cache-dir", str(cache), "--cache-size", "1G", *TRAIN_ARGS]
    run_cli("-q", "train", *common, "--epochs", "1")
    tars = sorted(p.name for p in tiny_shards.glob("ssv2-*-*.tar") if "test" not in p.name)
    assert len(tars) == 6  # 4 train + 2 validation shards, each kept whole
    for name in tars:
        assert entry_path(cache, f"{prefix}/{name}").read_bytes() == (tiny_shards / name).read_bytes()
    for name in tars:  # epoch 2 (resumed) can only read the cached copies
        storage.remove(f"{prefix}/{name}")
    run_cli("-q", "train", *common, "--epochs", "2")
    train, evals = records(out)
    want_train, want_evals = records(local_run)
    assert len(train) == 4 and [s for s, _ in train] == [0, 1, 2, 3]
    assert train == want_train and evals == want_evals and len(evals) == 2


@pytest.mark.slow  # trains a tiny TSM (~10-30 s on a loaded CPU)
def test_train_and_eval_from_s3_without_cache_match_the_local_ones(
    prefix: str, tiny_shards: Path, local_run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    sources = ["--train", f"{prefix}/ssv2-train.json", "--val", f"{prefix}/ssv2-validation.json"]
    run_cli("-q", "train", *sources, "--out", str(out), "--epochs", "2", *TRAIN_ARGS)
    assert records(out) == records(local_run)
    checkpoint = str(local_run / "best.pt")
    common = ["--checkpoint", checkpoint, "--batch-size", "2", "--workers", "1", "--device", "cpu"]
    run_cli("-q", "eval", *common, "--data", str(tiny_shards / "ssv2-validation.json"), "--out", str(tmp_path / "l"))
    remote = ["--data", f"{prefix}/ssv2-validation.json", "--cache-dir", str(tmp_path / "cache")]
    run_cli("-q", "eval", *common, *remote, "--out", str(tmp_path / "r"))
    local_rows, local_csv = eval_numbers(tmp_path / "l")
    assert local_rows[0]["videos"] == 4
    assert eval_numbers(tmp_path / "r") == (local_rows, local_csv)


class Failed:
    """A CLI run that failed: its exit status and what it wrote to stderr."""

    def __init__(self, *args: str) -> None:
        result = CliRunner().invoke(main, list(args))
        assert isinstance(result.exception, SystemExit), result.exception  # a handled error, not a traceback
        self.returncode, self.stderr = result.exit_code, result.stderr


def _cli_error(*args: str) -> Failed:
    return Failed(*args)


def test_an_index_without_classes_is_an_error_naming_it(s3, tiny_shards: Path, tmp_path: Path) -> None:
    prefix = f"s3://{s3.new_bucket()}/bare"
    upload_folder(tiny_shards, prefix, skip=("classes.json",))
    index = json.loads((tiny_shards / "ssv2-train.json").read_text())
    bare = {k: v for k, v in index.items() if k != "class_names"}
    storage.write_bytes(f"{prefix}/ssv2-train.json", json.dumps(bare).encode())
    result = _cli_error("train", "--train", f"{prefix}/ssv2-train.json", "--out", str(tmp_path / "a"), *TRAIN_ARGS)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"{prefix}/ssv2-train.json: the index does not carry its classes" in result.stderr
    assert not (tmp_path / "a" / "metrics.jsonl").exists()
    # the README's AWS recipe: only the index copied locally, shards streamed by a pipe: command
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "ssv2-train.json").write_text(json.dumps(bare))
    pattern = f"pipe:cat {tiny_shards}/ssv2-train-{{000000..000003}}.tar"
    index_file = str(tmp_path / "local" / "ssv2-train.json")
    args = ["train", "--train", pattern, "--train-index", index_file, "--out", str(tmp_path / "b"), *TRAIN_ARGS]
    result = _cli_error(*args)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"{index_file}: the index does not carry its classes" in result.stderr


def test_a_val_index_of_other_classes_is_an_error_before_the_first_step(tiny_shards: Path, tmp_path: Path) -> None:
    val = tmp_path / "val"
    shutil.copytree(tiny_shards, val)
    names = [*json.loads((tiny_shards / "classes.json").read_text()), "Something extra"]
    index = {k: v for k, v in json.loads((val / "ssv2-validation.json").read_text()).items() if k != "class_names"}
    out = tmp_path / "run"
    args = ["--train", str(tiny_shards / "ssv2-train.json"), "--val", str(val / "ssv2-validation.json")]
    # a count without names: the head's size is still checked
    (val / "classes.json").unlink()
    (val / "ssv2-validation.json").write_text(json.dumps({**index, "num_classes": 5}))
    result = _cli_error("train", *args, "--out", str(out), *TRAIN_ARGS)
    assert result.returncode != 0
    assert f"--val {val / 'ssv2-validation.json'}: 5 classes, but the train index" in result.stderr
    assert "has 4 (the size of the head)" in result.stderr
    assert not (out / "metrics.jsonl").exists() and not (out / "last.pt").exists()
    # names in the index itself
    (val / "ssv2-validation.json").write_text(json.dumps({**index, "num_classes": 5, "class_names": names}))
    result = _cli_error("train", *args, "--out", str(out), *TRAIN_ARGS)
    assert result.returncode != 0 and "--val and --train label different classes" in result.stderr
    assert "4 vs 5 classes" in result.stderr
    swapped = [names[1], names[0], *names[2:4]]
    (val / "ssv2-validation.json").write_text(json.dumps({**index, "num_classes": 4, "class_names": swapped}))
    result = _cli_error("train", *args, "--out", str(out), *TRAIN_ARGS)
    assert result.returncode != 0 and "the same 4 classes in another order (label 0" in result.stderr
    assert not out.exists()


@pytest.mark.slow  # trains a tiny TSM (~10-30 s on a loaded CPU)
def test_eval_refuses_an_index_whose_classes_disagree_with_the_head(
    local_run: Path, tiny_shards: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_shards, data)
    names = [*json.loads((tiny_shards / "classes.json").read_text()), "Something extra"]
    index = json.loads((data / "ssv2-validation.json").read_text())
    (data / "ssv2-validation.json").write_text(json.dumps({**index, "num_classes": 5, "class_names": names}))
    (data / "classes.json").write_text(json.dumps(names))
    result = _cli_error(
        "eval", "--checkpoint", str(local_run / "best.pt"), "--data", str(data / "ssv2-validation.json"),
        "--device", "cpu", "--out", str(tmp_path / "e"),
    )  # fmt: skip
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "ssv2-validation.json: the index has 5 classes but the checkpoint predicts 4" in result.stderr


@pytest.mark.slow  # needs the trained run
def test_predict_reads_class_names_from_an_s3_index(
    prefix: str, s3, local_run: Path, synth_tiny, tiny_shards: Path
) -> None:
    video = str(synth_tiny.videos_dir / "1.webm")
    names = json.loads((tiny_shards / "classes.json").read_text())
    result = CliRunner().invoke(
        main, ["predict", str(local_run / "best.pt"), video, "--classes", f"{prefix}/ssv2-train.json"]
    )
    assert result.exit_code == 0, result.output
    printed = [line.strip().split("  ")[0].split(". ", 1)[1] for line in result.stdout.splitlines() if "%" in line]
    assert len(printed) == 4 and sorted(printed) == sorted(names)
    bare_prefix = f"s3://{s3.new_bucket()}/bare"
    index = json.loads((tiny_shards / "ssv2-train.json").read_text())
    bare = {k: v for k, v in index.items() if k != "class_names"}
    storage.write_bytes(f"{bare_prefix}/ssv2-train.json", json.dumps(bare).encode())
    failed = Failed("predict", str(local_run / "best.pt"), video, "--classes", f"{bare_prefix}/ssv2-train.json")
    assert failed.returncode != 0
    assert f"--classes {bare_prefix}/ssv2-train.json: the index does not carry its classes" in failed.stderr

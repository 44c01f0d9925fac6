"""The model-side commands as a newcomer meets them: -q, eval's report folder, --grid with --predictions,
start-up feedback, lr wording and `train --config` replays (CPU, resnet18, 4 frames of 32 px)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from ssv2prep.cli import main

TINY_TRAIN = [
    "--backbone", "resnet18", "--segments", "4", "--crop-size", "32", "--scale-size", "40", "--batch-size", "4",
    "--workers", "1", "--lr-steps", "", "--log-every", "1", "--dropout", "0.0", "--device", "cpu",
]  # fmt: skip
TINY_EVAL = ["--batch-size", "4", "--workers", "0", "--device", "cpu"]


def invoke(*args: str) -> object:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, (result.output, result.exception)
    return result


@pytest.fixture(scope="module")
def run(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder trained 1 epoch through the command line."""
    out = tmp_path_factory.mktemp("run") / "tsm"
    result = invoke("train", "--data", str(tiny_shards), "--out", str(out), "--epochs", "1", *TINY_TRAIN)
    (out.parent / "train.stderr").write_text(result.stderr)  # off a terminal: the plain log lines
    return out


def test_quiet_prints_nothing_on_stdout_and_still_writes_the_files(
    run: Path, tiny_shards: Path, tmp_path: Path
) -> None:
    ckpt = str(run / "last.pt")
    loud = invoke("eval", "--checkpoint", ckpt, "--data", str(tiny_shards), "--out", str(tmp_path / "a"), *TINY_EVAL)
    assert "top-1" in loud.stdout  # the reference: without -q the result is on stdout
    result = invoke(
        "-q", "eval", "--checkpoint", ckpt, "--data", str(tiny_shards), "--out", str(tmp_path / "q"), *TINY_EVAL
    )
    assert result.stdout == ""
    assert (tmp_path / "q" / "report.json").is_file() and (tmp_path / "q" / "per_class.csv").is_file()
    quiet_top1 = json.loads((tmp_path / "q" / "report.json").read_text())["settings"][0]["top1"]
    assert quiet_top1 == json.loads((tmp_path / "a" / "report.json").read_text())["settings"][0]["top1"]
    assert invoke("-q", "verify", str(tiny_shards)).stdout == ""
    assert "verify: OK" in invoke("verify", str(tiny_shards)).stdout


def test_the_default_eval_folder_keeps_an_eval_of_other_data(run: Path, tiny_shards: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt" / "last.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes((run / "last.pt").read_bytes())
    other = tmp_path / "other-shards"
    shutil.copytree(tiny_shards, other)

    def data_of(folder: str) -> str:
        return json.loads((ckpt.parent / folder / "report.json").read_text())["data"]

    invoke("eval", "--checkpoint", str(ckpt), "--data", str(tiny_shards), *TINY_EVAL)
    assert data_of("eval-validation") == str(tiny_shards / "ssv2-validation.json")
    result = invoke("eval", "--checkpoint", str(ckpt), "--data", str(other), *TINY_EVAL)
    assert data_of("eval-validation") == str(tiny_shards / "ssv2-validation.json")  # kept
    assert data_of("eval-validation-2") == str(other / "ssv2-validation.json")
    assert f"reports in {ckpt.parent / 'eval-validation-2'}" in result.stdout
    # the same eval again replaces its own reports instead of making a third folder
    invoke("eval", "--checkpoint", str(ckpt), "--data", str(tiny_shards), *TINY_EVAL)
    invoke("eval", "--checkpoint", str(ckpt), "--data", str(other), *TINY_EVAL)
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["eval-validation", "eval-validation-2", "last.pt"]
    # an index file named ssv2-<split>.json names the folder after its split
    invoke("eval", "--checkpoint", str(ckpt), "--data", str(tiny_shards / "ssv2-train.json"), *TINY_EVAL)
    assert data_of("eval-train") == str(tiny_shards / "ssv2-train.json")


def test_grid_predictions_are_the_first_settings_and_say_so(run: Path, tiny_shards: Path, tmp_path: Path) -> None:
    ckpt, data = str(run / "last.pt"), str(tiny_shards)
    grid = tmp_path / "grid.csv"
    result = invoke(
        "eval", "--checkpoint", ckpt, "--data", data, "--grid", "crops=3,1;clips=2,1", "--predictions", str(grid),
        "--out", str(tmp_path / "g"), *TINY_EVAL,
    )  # fmt: skip
    assert f"predictions of the first setting, 3 crops x 2 clips, in {grid}" in result.stdout
    single = tmp_path / "single.csv"
    one = ["--crops", "3", "--clips", "2", "--predictions", str(single), "--out", str(tmp_path / "s")]
    result = invoke("eval", "--checkpoint", ckpt, "--data", data, *one, *TINY_EVAL)
    assert f"predictions in {single}" in result.stdout and "first setting" not in result.stdout
    assert grid.read_text() == single.read_text() and len(grid.read_text().splitlines()) == 4
    assert "first setting" in " ".join(invoke("eval", "--help").stdout.split())


def test_every_line_with_an_lr_says_how_it_was_scaled(run: Path, tiny_shards: Path, tmp_path: Path) -> None:
    lines = (run.parent / "train.stderr").read_text().splitlines()
    start = [line for line in lines if "training on cpu x 1" in line]
    assert len(start) == 1 and "base lr 0.000625 (0.01 per 64 clips x 4/64)" in start[0]  # 0.01 x 4 / 64
    steps = [line for line in lines if " step " in line and " lr " in line]
    assert len(steps) == 3 and all("lr 6.250e-04 (0.01 per 64 clips x 4/64)" in line for line in steps), steps
    out = tmp_path / "as-given"
    args = ["--out", str(out), "--epochs", "1", *TINY_TRAIN, "--no-lr-scaling", "--lr", "0.002"]
    result = invoke("train", "--data", str(tiny_shards), *args)
    steps = [line for line in result.stderr.splitlines() if " step " in line and " lr " in line]
    assert len(steps) == 3 and all("lr 2.000e-03 (--lr 0.002 as given, --no-lr-scaling)" in line for line in steps)


def test_train_config_replays_a_run_with_the_flags_given_overriding(run: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    invoke("train", "--config", str(run / "config.json"), "--out", str(other), "--epochs", "2")
    before, after = (json.loads((folder / "config.json").read_text()) for folder in (run, other))
    assert after["out"] == str(other) and after["optim"]["epochs"] == 2
    assert before["optim"]["epochs"] == 1 and after["runtime"]["device"] == "cpu"  # not the --device default
    after["out"], after["optim"]["epochs"] = before["out"], before["optim"]["epochs"]
    assert after == before
    assert [
        r["epoch"] for r in map(json.loads, (other / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "eval"
    ] == [1, 2]


def test_every_train_option_is_mapped_to_its_config_keys() -> None:
    from ssv2prep.cli.train import _NOT_CONFIG, _OPTION_KEYS
    from ssv2prep.data.loader import DataConfig
    from ssv2prep.models.tsm import ModelConfig
    from ssv2prep.train.config import OptimConfig, RuntimeConfig, TrainConfig

    names = {p.name for p in main.commands["train"].params}
    assert set(_OPTION_KEYS) == names - _NOT_CONFIG
    sections = {
        "model": ModelConfig,
        "data": DataConfig,
        "optim": OptimConfig,
        "runtime": RuntimeConfig,
        "": TrainConfig,
    }
    for keys in _OPTION_KEYS.values():
        for dotted in keys:
            section, _, key = dotted.rpartition(".")
            assert key in sections[section].__dataclass_fields__, dotted


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c["optim"].update(lr_typo=0.1), "unknown key 'optim.lr_typo'"),
        (lambda c: c.update(extra=1), "unknown key 'extra'"),
        (lambda c: c["data"].update(batch_size="8"), "data.batch_size = '8' is not of type int"),
        (lambda c: c["model"].update(dropout=True), "model.dropout = True is not of type float"),
        (lambda c: c.update(optim=3), "optim must be an object of OptimConfig keys"),
    ],
)
def test_a_bad_config_file_is_one_line_naming_the_file_and_key(run: Path, tmp_path: Path, change, message) -> None:
    config = json.loads((run / "config.json").read_text())
    change(config)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    result = CliRunner().invoke(main, ["train", "--config", str(path), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    problems = [line for line in result.stderr.strip().splitlines() if " INFO " not in line]
    assert problems == [f"error: {path}: {message}"]
    assert not (tmp_path / "x").exists()


def test_the_quiet_start_says_what_it_is_doing(run: Path) -> None:
    lines = (run.parent / "train.stderr").read_text().splitlines()

    def first(text: str) -> int:
        return next(i for i, line in enumerate(lines) if text in line)

    order = [
        first("INFO setting up: importing torch, reading the options ..."),
        first("INFO setting up: the shard index, the model, the run folder ..."),
        first("INFO training on cpu x 1"),
        first("INFO first batch: starting 1 data worker per process, filling the shuffle buffer (64 clips) ..."),
        first("INFO first step done "),
        first("INFO epoch 1/1 step 1/3 "),
    ]
    assert order == sorted(order), lines
    seconds = float(lines[order[4]].split("INFO first step done ")[1].split(" s after")[0])
    assert 0 < seconds < 300
    assert sum("first step done" in line for line in lines) == 1


def test_stage_progress_reads_how_far_a_train_log_is(run: Path, tmp_path: Path) -> None:
    from ssv2prep.cli.run import stage_progress

    log = tmp_path / "train@a.log"
    assert stage_progress(log) == "starting"  # not written yet
    lines = (run.parent / "train.stderr").read_text().splitlines(keepends=True)
    step = next(i for i, line in enumerate(lines) if " INFO epoch 1/1 step 2/3 " in line)
    log.write_text("".join(lines[: step + 1]))
    assert stage_progress(log) == "epoch 1/1 step 2/3"
    log.write_text("".join(lines))  # ends with the validation line
    assert stage_progress(log) == "epoch 1 validated"
    log.write_text("2026-12-01 10:00:00 INFO evaluating on cpu in fp32\n")
    assert stage_progress(log) == "evaluating on cpu in fp32"


def test_option_defaults_are_the_config_defaults() -> None:
    from ssv2prep.data.cache import parse_size
    from ssv2prep.data.loader import DataConfig
    from ssv2prep.models.tsm import ModelConfig
    from ssv2prep.train.config import OptimConfig, RuntimeConfig
    from ssv2prep.train.evaluation import EvalConfig

    def defaults(command: str) -> dict[str, object]:
        ctx = click.Context(main.commands[command])
        return {p.name: p.get_default(ctx) for p in main.commands[command].params}

    train, evaluate = defaults("train"), defaults("eval")
    model, data, optim, runtime = ModelConfig(), DataConfig(), OptimConfig(), RuntimeConfig()
    for name, field in {"segments": "num_segments", "backbone": "backbone", "shift_div": "shift_div"}.items():
        assert train[name] == getattr(model, field), name
    for name in ("shift_mode", "shift_place", "dropout", "partial_bn"):
        assert train[name] == getattr(model, name), name
    for name in ("batch_size", "crop_size", "scale_size", "dense", "flip", "gpu_decode", "cache_verify"):
        assert train[name] == getattr(data, name), name
    assert parse_size(train["cache_size"]) == data.cache_size_bytes
    for name in ("epochs", "lr", "lr_schedule", "warmup_epochs", "momentum", "clip_grad", "label_smoothing"):
        assert train[name] == getattr(optim, name), name
    assert train["wd"] == optim.weight_decay and train["no_lr_scaling"] is (not optim.scale_lr)
    assert tuple(float(e) for e in train["lr_steps"].split(",")) == optim.lr_steps
    for name in ("eval_every", "log_every", "checkpoint_every", "seed", "device", "amp", "channels_last"):
        assert train[name] == getattr(runtime, name), name
    assert train["dist_timeout"] == runtime.dist_timeout_s and train["use_compile"] is runtime.compile
    cfg = EvalConfig(checkpoint=Path("x.pt"), data="d", out=Path("o"))
    for name in ("index", "segments", "dense", "full_res", "crop_size", "scale_size", "batch_size", "workers"):
        assert evaluate[name] == getattr(cfg, name), name
    assert evaluate["predictions"] == cfg.predictions and evaluate["device"] == cfg.device
    assert ("auto" if evaluate["amp"] else "off") == cfg.amp and evaluate["cache_verify"] == cfg.cache_verify
    assert [(int(evaluate["crops"]), int(evaluate["clips"]))] == list(cfg.settings)

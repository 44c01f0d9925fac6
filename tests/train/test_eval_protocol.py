"""`eval`, `predict` and `export` on generated checkpoints: precision, unlabelled/empty splits, class lists, errors.

The checkpoints are random-init tiny ResNet-18 TSMs (2 frames, 4 classes) saved in our format; nothing is trained
and nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from ssv2prep.cli import main
from ssv2prep.errors import CheckpointError, ConfigError, ShardError
from ssv2prep.models.tsm import ModelConfig, build_tsm
from ssv2prep.train.checkpoint import save_checkpoint
from ssv2prep.train.evaluation import EvalConfig, evaluate_checkpoint, load_for_eval

SIZES = ["--crop-size", "32", "--scale-size", "40"]


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def assert_one_line_error(code: int, stderr: str, *needles: str) -> str:
    assert code != 0
    assert "Traceback" not in stderr
    errors = error_lines(stderr)
    assert len(errors) == 1, stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def make_checkpoint(path: Path, classes: list[str], *, seed: int = 0, **model: object) -> Path:
    """One of our checkpoints holding a random-init TSM whose logits differ clearly between classes."""
    torch.manual_seed(seed)
    cfg = ModelConfig(**{"backbone": "resnet18", "num_segments": 2, "num_classes": len(classes), **model})
    net = build_tsm(cfg).eval()
    with torch.no_grad():
        nn.init.normal_(net.new_fc.weight, 0.0, 0.5)  # the 0.001 init gives near-equal logits: every rank a tie
    save_checkpoint(
        path,
        {
            "model": net.state_dict(),
            "model_config": cfg.to_dict(),
            "classes": list(classes),
            "config": {"data": {"crop_size": 32, "scale_size": 40}},
            "epoch": 3,
            "global_step": 9,
            "best_top1": 25.0,
        },
    )
    return path


@pytest.fixture(scope="module")
def classes(tiny_shards: Path) -> list[str]:
    return json.loads((tiny_shards / "classes.json").read_text())


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory, classes: list[str]) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "last.pt", classes)


def eval_config(ckpt: Path, data: Path, out: Path, **kw: object) -> EvalConfig:
    return EvalConfig(checkpoint=ckpt, data=str(data), out=out, workers=0, **kw)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------------ precision


def test_eval_defaults_to_fp32_and_the_report_records_it(ckpt: Path, tiny_shards: Path, tmp_path: Path) -> None:
    assert EvalConfig(checkpoint=ckpt, data="x", out=tmp_path).amp == "off"
    rows = evaluate_checkpoint(eval_config(ckpt, tiny_shards / "ssv2-validation.json", tmp_path / "e"))
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    assert report["precision"] == "fp32" and rows[0]["precision"] == "fp32"
    # --amp exists on eval and predict, and on the CPU it changes nothing: fp32 is what runs, and what is recorded
    code, stdout, stderr = run(
        "eval", "--checkpoint", str(ckpt), "--data", str(tiny_shards), "--out", str(tmp_path / "a"), "--amp",
        "--device", "cpu", "--workers", "0",
    )  # fmt: skip
    assert code == 0, stderr
    assert json.loads((tmp_path / "a" / "report.json").read_text())["precision"] == "fp32"
    assert "fp32" in stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_eval_on_cuda_runs_fp32_unless_amp(ckpt: Path, tiny_shards: Path, tmp_path: Path) -> None:
    data = tiny_shards / "ssv2-validation.json"
    cfgs = {
        "cpu": eval_config(ckpt, data, tmp_path / "cpu", device="cpu", predictions=tmp_path / "cpu.csv"),
        "cuda": eval_config(ckpt, data, tmp_path / "cuda", device="cuda"),
        "amp": eval_config(ckpt, data, tmp_path / "amp", device="cuda", amp="auto"),
    }
    rows = {name: evaluate_checkpoint(cfg)[0] for name, cfg in cfgs.items()}
    assert rows["cuda"]["precision"] == "fp32" and rows["amp"]["precision"] in ("bf16", "fp16")
    assert rows["cuda"]["top1"] == rows["cpu"]["top1"]


# -------------------------------------------------------------------------------------------- unlabelled / empty


@pytest.fixture(scope="module")
def unlabelled_shards(synth_tiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Test-split shards without answers (the real SSv2 test split: no labels)."""
    from fixtures import make_shards

    labels = tmp_path_factory.mktemp("labels-no-answers")
    for f in synth_tiny.labels_dir.iterdir():
        if f.name != "test-answers.csv":
            shutil.copy(f, labels / f.name)
    return make_shards(synth_tiny.videos_dir, labels, tmp_path_factory.mktemp("shards-unlabelled"), splits=("test",))


def test_eval_on_an_unlabelled_split_says_it_wrote_predictions_only(
    ckpt: Path, unlabelled_shards: Path, tmp_path: Path
) -> None:
    out = tmp_path / "eval-test"
    code, stdout, stderr = run(
        "eval", "--checkpoint", str(ckpt), "--data", str(unlabelled_shards), "--split", "test", "--out", str(out),
        "--device", "cpu", "--workers", "0",
    )  # fmt: skip
    assert code == 0, stderr
    assert "top-1" not in stdout and "0.00%" not in stdout
    predictions = out / "predictions.csv"  # written by default when there is nothing to score against
    assert f"no labels: wrote predictions only ({predictions})" in " ".join(stdout.split())
    lines = predictions.read_text().splitlines()
    assert len(lines) == 4 and all(len(line.split(";")) == 5 for line in lines)  # id + top-4 (K = 4)
    assert json.loads((out / "report.json").read_text())["settings"][0]["labelled"] == 0


@pytest.mark.parametrize("shards", ["none", "one-empty-tar"])
def test_eval_on_a_split_with_no_samples_fails(ckpt: Path, tiny_shards: Path, tmp_path: Path, shards: str) -> None:
    import tarfile

    index = json.loads((tiny_shards / "ssv2-validation.json").read_text())
    shardlist = []
    if shards == "one-empty-tar":
        with tarfile.open(tmp_path / "ssv2-validation-000000.tar", "w"):
            pass
        shardlist = [{"url": "ssv2-validation-000000.tar", "nsamples": 0}]
    empty = tmp_path / "ssv2-validation.json"
    empty.write_text(json.dumps({**index, "shardlist": shardlist, "num_samples": 0}))
    shutil.copy(tiny_shards / "classes.json", tmp_path / "classes.json")
    with pytest.raises(ShardError, match="0 samples"):
        evaluate_checkpoint(eval_config(ckpt, empty, tmp_path / "e"))
    code, _, stderr = run("eval", "--checkpoint", str(ckpt), "--data", str(empty), "--out", str(tmp_path / "e"))
    assert_one_line_error(code, stderr, str(empty), "0 samples")
    assert not (tmp_path / "e").exists()


# ---------------------------------------------------------------------------------------------------- class lists


def test_eval_refuses_data_whose_class_list_differs(ckpt: Path, tiny_shards: Path, tmp_path: Path) -> None:
    data = tmp_path / "shards"
    shutil.copytree(tiny_shards, data)
    names = json.loads((data / "classes.json").read_text())
    permuted = [names[1], names[0], *names[2:]]  # same names, another order
    (data / "classes.json").write_text(json.dumps(permuted))
    index_file = data / "ssv2-validation.json"
    index = json.loads(index_file.read_text())
    for carried in (True, False):  # names in the index (what shard writes), or only in classes.json beside it
        if carried:
            index["class_names"] = permuted
        else:
            index.pop("class_names")
        index_file.write_text(json.dumps(index))
        with pytest.raises(ConfigError) as err:
            evaluate_checkpoint(eval_config(ckpt, index_file, tmp_path / "e"))
        message = str(err.value)
        source = f"{index_file} (its class_names)" if carried else str(data / "classes.json")
        assert str(ckpt) in message and source in message and "order" in message, message
        assert not (tmp_path / "e").exists()


def test_predict_refuses_a_classes_file_that_contradicts_the_checkpoint(
    ckpt: Path, classes: list[str], synth_tiny, tmp_path: Path
) -> None:
    video = synth_tiny.videos_dir / "1.webm"
    wrong = tmp_path / "classes.json"
    wrong.write_text(json.dumps(list(reversed(classes))))
    code, _, stderr = run("predict", str(ckpt), str(video), "--classes", str(wrong))
    assert_one_line_error(code, stderr, str(wrong), str(ckpt))
    same = tmp_path / "same.json"
    same.write_text(json.dumps(classes))
    code, _, stderr = run("predict", str(ckpt), str(video), "--classes", str(same))
    assert code == 0, stderr


# -------------------------------------------------------------------------------------------------------- errors


def _unwritable(tmp_path: Path, kind: str) -> Path:
    if kind == "under-a-file":
        (tmp_path / "file").write_text("x")
        return tmp_path / "file" / "out"
    if kind == "read-only-folder":
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        return ro / "out"
    raise AssertionError(kind)


UNWRITABLE = [
    "under-a-file",
    pytest.param(
        "read-only-folder",
        marks=pytest.mark.skipif(hasattr(__import__("os"), "geteuid") and __import__("os").geteuid() == 0,
                                 reason="root writes into read-only folders"),
    ),
]  # fmt: skip


@pytest.mark.parametrize("kind", UNWRITABLE)
def test_eval_and_export_to_an_unwritable_out_fail_in_one_line(
    ckpt: Path, tiny_shards: Path, tmp_path: Path, kind: str
) -> None:
    out = _unwritable(tmp_path, kind)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code, _, stderr = run(
        "eval", "--checkpoint", str(ckpt), "--data", str(tiny_shards), "--out", str(out), "--workers", "0"
    )
    assert_one_line_error(code, stderr, "--out", str(out))
    code, _, stderr = run("export", str(ckpt), "--out", str(out))
    assert_one_line_error(code, stderr, str(out))
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing left behind


def test_eval_predictions_file_unwritable_leaves_no_reports(ckpt: Path, tiny_shards: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    code, _, stderr = run(
        "eval", "--checkpoint", str(ckpt), "--data", str(tiny_shards), "--out", str(tmp_path / "e"),
        "--predictions", str(tmp_path / "file" / "pred.csv"), "--workers", "0",
    )  # fmt: skip
    assert_one_line_error(code, stderr, "--predictions", str(tmp_path / "file" / "pred.csv"))
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
@pytest.mark.parametrize("name", ["last.pt", "TSM_somethingv2_RGB_resnet18_shift8_blockres_avg_segment2_e3.pth"])
def test_a_corrupt_checkpoint_says_so(ckpt: Path, tiny_shards: Path, tmp_path: Path, damage: str, name: str) -> None:
    data = ckpt.read_bytes()
    broken = tmp_path / name
    broken.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"\x00garbage" * 8}[damage])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_for_eval(broken, None)
    code, _, stderr = run("eval", "--checkpoint", str(broken), "--data", str(tiny_shards), "--out", str(tmp_path / "e"))
    line = assert_one_line_error(code, stderr, str(broken), "corrupt or truncated")
    assert "official" not in line and "name" not in line


def test_predict_reports_unreadable_videos_and_still_prints_the_others(ckpt: Path, synth_tiny, tmp_path: Path) -> None:
    import imageio_ffmpeg

    good = synth_tiny.videos_dir / "1.webm"
    audio = tmp_path / "audio.webm"  # a real webm with an audio stream and no video stream
    subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i", "sine=frequency=440:duration=0.2",
         "-c:a", "libopus", str(audio)],
        check=True,
    )  # fmt: skip
    text = tmp_path / "notes.webm"
    text.write_text("not a video")
    code, stdout, stderr = run("predict", str(ckpt), str(audio), str(good), str(text), "--device", "cpu")
    assert code != 0 and "Traceback" not in stderr
    errors = error_lines(stderr)
    assert len(errors) == 2, stderr
    assert str(audio) in errors[0] and "no video stream" in errors[0]
    assert str(text) in errors[1]
    assert f"{good}:" in stdout and "  1. " in stdout and str(audio) not in stdout


def test_predict_device_option(ckpt: Path, synth_tiny) -> None:
    video = str(synth_tiny.videos_dir / "1.webm")
    code, cpu, stderr = run("predict", str(ckpt), video, "--device", "cpu")
    assert code == 0, stderr
    code, auto, stderr = run("predict", str(ckpt), video)
    assert code == 0, stderr
    if not torch.cuda.is_available():
        assert auto == cpu
        code, _, stderr = run("predict", str(ckpt), video, "--device", "cuda")
        assert_one_line_error(code, stderr, "--device cuda", "not available")
    code, _, stderr = run("predict", str(ckpt), video, "--device", "tpu")
    assert code != 0 and "--device" in stderr


# ------------------------------------------------------------------------------------------------------- logging


def test_loading_a_checkpoint_logs_what_was_loaded(
    ckpt: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from ssv2prep.models.official import export_official

    with caplog.at_level(logging.INFO, logger="ssv2prep"):
        model, _, _ = load_for_eval(ckpt, None)
        official = export_official(model, tmp_path, dataset="mine", epochs=3)
        load_for_eval(official, None)
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "random init" in m], messages
    loaded = [m for m in messages if m.startswith("loaded ")]
    assert len(loaded) == 2 and str(ckpt) in loaded[0] and str(official) in loaded[1], messages
    assert "resnet18" in loaded[0] and "trained 3 epochs" in loaded[0]


# ---------------------------------------------------------------------------------------------- names and folders


def test_export_dataset_and_eval_split_names_stay_in_their_folder(
    ckpt: Path, tiny_shards: Path, tmp_path: Path
) -> None:
    out = tmp_path / "a" / "b" / "out"
    code, _, stderr = run("export", str(ckpt), "--out", str(out), "--dataset", "../../x")
    assert_one_line_error(code, stderr, "--dataset", "'../../x'")
    code, _, stderr = run("eval", "--checkpoint", str(ckpt), "--data", str(tiny_shards), "--split", "../../x")
    assert_one_line_error(code, stderr, "--split")
    assert list(tmp_path.rglob("*")) == [] and not (ckpt.parent.parent / "x").exists()
    code, _, stderr = run("export", str(ckpt), "--out", str(out), "--dataset", "ssv2-mini")
    assert code == 0, stderr
    assert [p.name for p in out.iterdir()] == ["TSM_ssv2-mini_RGB_resnet18_shift8_blockres_avg_segment2_e3.pth"]


def test_export_refuses_a_unidirectional_checkpoint(classes: list[str], tmp_path: Path) -> None:
    uni = make_checkpoint(tmp_path / "uni" / "last.pt", classes, shift_mode="unidirectional")
    code, _, stderr = run("export", str(uni), "--out", str(tmp_path / "out"))
    assert_one_line_error(code, stderr, "no unidirectional shift")
    assert not (tmp_path / "out").exists()


def test_fp32_means_no_tf32_while_scoring(ckpt: Path, tiny_shards: Path, tmp_path: Path) -> None:
    seen: list[tuple[bool, bool]] = []

    def on_batch(_: int) -> None:
        seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))

    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        evaluate_checkpoint(eval_config(ckpt, tiny_shards / "ssv2-validation.json", tmp_path / "e"), on_batch=on_batch)
        assert seen and set(seen) == {(False, False)}
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (True, True)  # restored
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def test_checkpoint_in_the_legacy_torch_format_is_still_ours(ckpt: Path, tmp_path: Path) -> None:
    from ssv2prep.train.checkpoint import is_ours, load_checkpoint
    from ssv2prep.train.evaluation import trained_sizes

    legacy = tmp_path / "legacy.pt"
    torch.save(torch.load(ckpt, weights_only=True), legacy, _use_new_zipfile_serialization=False)
    assert is_ours(legacy) and trained_sizes(legacy) == (32, 40)  # read from the file, not the 224/256 fallback
    data = ckpt.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pt: not a readable checkpoint: corrupt or truncated"):
        load_checkpoint(tmp_path / "cut.pt", mmap=True)


def test_predict_online_streams_good_files_and_names_bad_ones(classes: list[str], synth_tiny, tmp_path: Path) -> None:
    from ssv2prep.prep.decode import decode_rgb

    uni = make_checkpoint(tmp_path / "uni" / "last.pt", classes, shift_mode="unidirectional")
    good = synth_tiny.videos_dir / "2.webm"
    bad = tmp_path / "empty.webm"
    bad.write_bytes(b"")
    code, stdout, stderr = run("predict", str(uni), str(bad), str(good), "--online", "--device", "cpu")
    assert code != 0 and "Traceback" not in stderr
    errors = error_lines(stderr)
    assert len(errors) == 1 and str(bad) in errors[0] and "zero-byte" in errors[0], stderr
    frames = [line for line in stdout.splitlines() if line.strip().startswith("frame ")]
    assert len(frames) == decode_rgb(good).shape[0]
    assert all(line.split(": ", 1)[1].split(" (")[0] in classes for line in frames)
    code, _, stderr = run("predict", str(uni), str(good), "--online", "--amp")
    assert_one_line_error(code, stderr, "--amp", "--online")


def test_predict_with_an_unreadable_classes_file_is_one_line(ckpt: Path, synth_tiny, tmp_path: Path) -> None:
    bad = tmp_path / "classes.json"
    bad.write_text("[not json")
    code, _, stderr = run("predict", str(ckpt), str(synth_tiny.videos_dir / "1.webm"), "--classes", str(bad))
    assert_one_line_error(code, stderr, "--classes", str(bad))


# ---------------------------------------------------------------------------------------------------- memory layout


def test_eval_in_channels_last_scores_the_same_logits(ckpt: Path, tiny_shards: Path, tmp_path: Path) -> None:
    import numpy as np

    from ssv2prep.data.loader import DataConfig, build_eval_loader
    from ssv2prep.data.source import resolve_source
    from ssv2prep.train.dist import DistInfo
    from ssv2prep.train.evaluation import eval_context
    from ssv2prep.train.loop import evaluate

    info = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    data = DataConfig(num_segments=2, crop_size=32, scale_size=40, batch_size=2, num_workers=0)
    loader = build_eval_loader(resolve_source(str(tiny_shards / "ssv2-validation.json")), data, crops=3)
    outs = {}
    for channels_last in (False, True):
        net, ctx = eval_context(load_for_eval(ckpt, None)[0], info, channels_last=channels_last)
        assert ctx.channels_last is channels_last
        assert net.base_model.conv1.weight.is_contiguous(memory_format=torch.channels_last) is channels_last
        outs[channels_last] = evaluate(net, loader, ctx=ctx)
    assert outs[True].keys == outs[False].keys and len(outs[True].keys) == 4
    np.testing.assert_allclose(outs[True].scores, outs[False].scores, rtol=0, atol=1e-5)
    assert eval_context(load_for_eval(ckpt, None)[0], info)[1].channels_last is False  # default: on for CUDA only
    # the option reaches eval, through the API and the CLI
    val = tiny_shards / "ssv2-validation.json"
    rows = [evaluate_checkpoint(eval_config(ckpt, val, tmp_path / f"e{c}", channels_last=c))[0] for c in (False, True)]
    assert rows[0]["top1"] == rows[1]["top1"] and rows[0]["top5"] == rows[1]["top5"]
    code, _, stderr = run(
        "eval", "--checkpoint", str(ckpt), "--data", str(val), "--out", str(tmp_path / "cli"), "--channels-last",
        "--device", "cpu", "--workers", "0", *SIZES,
    )  # fmt: skip
    assert code == 0, stderr

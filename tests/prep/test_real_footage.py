"""Clips made by the ffmpeg binary (as real footage is), not by PyAV: start offsets, RGB VP9, variable frame rates and
a file cut inside its last packet. Every good clip must land whole in the shard and equal the official TSM recipe's
frames (`ffmpeg -i V -vf scale=-1:H -q:v 0 %06d.jpg`): the same count, size and pixels."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import av
import numpy as np
import pytest
from fixtures import folder_bytes, read_json, shard_config
from PIL import Image

from ssv2prep.errors import DecodeError
from ssv2prep.prep.decode import INTERPOLATIONS, Resize, container_truncation, count_video_frames, decode_video
from ssv2prep.prep.decode import ffmpeg_binary as _ffmpeg
from ssv2prep.prep.prepare import shard_dataset
from ssv2prep.prep.shard import WriterSettings

ENCODE = ["-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8", "-b:v", "300k"]
GOOD = ("seek", "offset", "rgb", "vfr")  # clips the official recipe extracts frame for frame


def _ff(*args: str) -> None:
    subprocess.run([_ffmpeg(), "-nostdin", "-loglevel", "error", "-y", *args], check=True)


def _testsrc(size: str, rate: int, seconds: float) -> list[str]:
    return ["-f", "lavfi", "-i", f"testsrc2=size={size}:rate={rate}", "-t", str(seconds)]


def _cut_inside_last_packet(src: Path, dst: Path) -> None:
    """Copy `src` up to the middle of its last video packet: the bytes end early, every other packet is whole."""
    with av.open(str(src)) as container:
        last = [p for p in container.demux(video=0) if p.size][-1]
        cut = last.pos + last.size // 2
    dst.write_bytes(src.read_bytes()[:cut])


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A videos folder of VP9 WebM clips made by the ffmpeg binary, 1-2 s, at most 160 px, named by what they are."""
    root = tmp_path_factory.mktemp("ffmpeg-clips")
    videos = root / "videos"
    videos.mkdir()
    src = root / "src.webm"
    _ff(*_testsrc("160x120", 12, 2), *ENCODE, str(src))
    # A nonzero start: seek on input, then a duration; and a stream shifted by 0.33 s (the container's Duration
    # then includes the offset, which made the old header estimate 22 for 18 frames).
    _ff("-ss", "0.25", "-i", str(src), "-t", "1.25", *ENCODE, str(videos / "seek.webm"))
    _ff("-i", str(src), "-t", "1.5", *ENCODE, "-output_ts_offset", "0.33", str(videos / "offset.webm"))
    # RGB VP9 (profile 1, gbrp), portrait, so --height and --short-side differ.
    _ff(*_testsrc("96x128", 12, 1.5), "-pix_fmt", "gbrp", *ENCODE, "-profile:v", "1", str(videos / "rgb.webm"))
    # Variable frame rate: 12 fps with every timestamp jittered by up to a third of a frame (millisecond clock).
    jitter = "settb=1/1000,setpts='(N+0.35*sin(N*1.7))/12/TB'"
    _ff(*_testsrc("128x96", 12, 1.7), "-vf", jitter, "-fps_mode", "passthrough", "-enc_time_base", "1/1000",
        *ENCODE, str(videos / "vfr.webm"))  # fmt: skip
    # A rate that changes mid-clip (24 fps, then 8): the header's rate is the first one, so its estimate is twice
    # the frames there are. Whole file, decodes to the end: ok, with the disagreement recorded.
    change = "setpts='if(lt(N,10),N/24,10/24+(N-10)/8)/TB'"
    _ff(*_testsrc("128x96", 24, 2), "-vf", change, "-fps_mode", "vfr", *ENCODE, str(videos / "ratechange.webm"))
    _cut_inside_last_packet(src, videos / "cut.webm")
    labels = root / "labels"
    labels.mkdir()
    (labels / "labels.json").write_text(json.dumps({"Filming something": "0"}))
    entries = [{"id": v.stem, "label": "Filming something", "template": "Filming [something]",
                "placeholders": ["footage"]} for v in sorted(videos.glob("*.webm"))]  # fmt: skip
    (labels / "train.json").write_text(json.dumps(entries))
    return root


def _official(video: Path, out: Path, vf: str, tmp: Path) -> list[np.ndarray]:
    """The official recipe's frames (`ffmpeg -i V -vf VF -q:v 0 %06d.jpg`) as RGB arrays, in order."""
    folder = tmp / f"official-{video.stem}-{abs(hash(vf))}"
    folder.mkdir()
    _ff("-i", str(video), "-vf", vf, "-q:v", "0", str(folder / "%06d.jpg"))
    return [np.asarray(Image.open(p).convert("RGB"), np.int16) for p in sorted(folder.glob("*.jpg"))]


def _rgb(jpegs: list[bytes]) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(j)).convert("RGB"), np.int16) for j in jpegs]


def _shard_frames(out: Path) -> dict[str, list[bytes]]:
    """{video id: its JPEG members in member order} over every shard in `out`."""
    frames: dict[str, list[bytes]] = {}
    for shard in sorted(out.glob("ssv2-train-*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".jpg"):
                    frames.setdefault(m.name.split(".")[0], []).append(tar.extractfile(m).read())
    return frames


def _assert_same_frames(ours: list[np.ndarray], official: list[np.ndarray], what: str) -> None:
    assert len(ours) == len(official), f"{what}: {len(ours)} frames, the official recipe writes {len(official)}"
    assert ours[0].shape == official[0].shape, what
    diff = np.abs(np.stack(ours) - np.stack(official))
    assert diff.mean() <= 0.2, f"{what}: mean difference {diff.mean():.3f}/255"


def test_ffmpeg_clips_are_whole_in_the_shard_and_equal_the_official_frames(clips: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    writer = WriterSettings(height=64)  # the official rule, scale=-1:64
    result = shard_dataset(shard_config(clips / "videos", clips / "labels", out, splits=("train",), writer=writer))
    lines = {x["id"]: x for x in map(json.loads, (out / "ssv2-train.manifest.jsonl").read_text().splitlines())}
    assert {k: v["status"] for k, v in lines.items()} == {**dict.fromkeys(GOOD, "ok"), "ratechange": "ok",
                                                          "cut": "failed"}  # fmt: skip
    assert lines["cut"]["reason"] == "truncated"
    frames = _shard_frames(out)
    for name in GOOD:
        official = _official(clips / "videos" / f"{name}.webm", tmp_path, "scale=-1:64", tmp_path)
        _assert_same_frames(_rgb(frames[name]), official, name)
        assert lines[name]["num_frames"] == len(official) and not lines[name]["frame_count_mismatch"]
    # Every decoded frame of the rate-change clip, in order, although its header estimates twice as many.
    direct = decode_video(clips / "videos" / "ratechange.webm", resize=Resize(height=64))
    assert frames["ratechange"] == direct.jpegs
    with av.open(str(clips / "videos" / "ratechange.webm")) as container:
        assert direct.num_frames == sum(1 for _ in container.decode(video=0)) == 23
    change = lines["ratechange"]
    assert change["frame_count_mismatch"] and change["header_frames"] >= 2 * change["num_frames"] - 2
    summary = result.summaries["train"]
    assert (summary.ok, summary.failed, summary.frame_count_mismatch) == (5, 1, 1)
    stats = read_json(out / "ssv2-train.stats.json")
    assert stats["frame_count_mismatch"] == 1 and stats["failure_reasons"] == {"truncated": 1}
    # The default --max-failed-fraction is not tripped by the good clips: only the cut one fails.
    assert summary.failed / (summary.ok + summary.failed) == pytest.approx(1 / 6)


def test_both_decoders_give_identical_shards_on_ffmpeg_clips(clips: Path, tmp_path: Path) -> None:
    """RGB VP9 too: the ffmpeg binary hands over the stream's own pixel format, as PyAV's decoder does."""
    outs = []
    for decoder in ("pyav", "ffmpeg"):
        out = tmp_path / decoder
        writer = WriterSettings(short_side=48, decoder=decoder)
        shard_dataset(shard_config(clips / "videos", clips / "labels", out, splits=("train",), writer=writer))
        outs.append(out)
    assert folder_bytes(outs[0], "ssv2-train-*.tar") == folder_bytes(outs[1], "ssv2-train-*.tar")
    pyav, binary = (decode_video(clips / "videos" / "rgb.webm", decoder=d) for d in ("pyav", "ffmpeg"))
    assert (pyav.width, pyav.height, pyav.num_frames) == (96, 128, 18)
    assert pyav.jpegs == binary.jpegs  # unscaled RGB frames too


def test_truncation_is_read_from_the_container(clips: Path) -> None:
    cut, whole = clips / "videos" / "cut.webm", clips / "src.webm"
    assert container_truncation(whole) is None and container_truncation(clips / "videos" / "offset.webm") is None
    reason = container_truncation(cut)
    assert reason and f"has {cut.stat().st_size} bytes" in reason
    with pytest.raises(DecodeError, match="truncated") as info:
        count_video_frames(cut)  # --format video validates the same way
    assert info.value.reason == "truncated"
    probed, count = count_video_frames(clips / "videos" / "offset.webm")
    assert count == probed.expected_frames == 18  # the start offset no longer inflates the estimate


def test_truncation_of_an_mp4(tmp_path: Path) -> None:
    """MP4 top-level boxes: a file cut inside `mdat` (moov first, as `-movflags +faststart` writes) is truncated."""
    mp4 = tmp_path / "whole.mp4"
    _ff(*_testsrc("64x48", 12, 1), "-c:v", "mpeg4", "-movflags", "+faststart", str(mp4))
    assert container_truncation(mp4) is None and decode_video(mp4).num_frames == 12
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(mp4.read_bytes()[: mp4.stat().st_size - 100])
    assert (
        container_truncation(cut)
        == f"truncated: the file has {cut.stat().st_size} bytes but its container declares {mp4.stat().st_size}"
    )
    with pytest.raises(DecodeError, match="truncated"):
        decode_video(cut, decoder="ffmpeg")


RULES = {
    "height": ("scale=-1:{s}:flags={f}", lambda s, f: Resize(height=s, interpolation=f)),
    "short_side": ("scale='if(lte(iw,ih),{s},-1)':'if(lte(iw,ih),-1,{s})':flags={f}",
                   lambda s, f: Resize(short_side=s, interpolation=f)),
}  # fmt: skip


@pytest.mark.parametrize(("rule", "interpolation"), [("height", "bicubic"), ("short_side", "bicubic"),
                                                     ("short_side", "bilinear")])  # fmt: skip
def test_scaled_frames_equal_the_official_recipe(
    clips: Path, synth_tiny, tmp_path: Path, rule: str, interpolation: str
) -> None:
    """256 px on PyAV-made and ffmpeg-made clips: the official recipe's count, size and pixels (mean <= 0.2/255).
    The default (bicubic) is compared with the recipe as written, without flags."""
    template, resize = RULES[rule]
    vf = template.format(s=256, f=interpolation)
    if interpolation == "bicubic":
        vf = vf.replace(":flags=bicubic", "")
    videos = sorted(synth_tiny.videos_dir.glob("*.webm"))[:2] + [clips / "videos" / f"{n}.webm" for n in GOOD]
    for video in videos:
        ours = decode_video(video, resize=resize(256, interpolation))
        _assert_same_frames(_rgb(ours.jpegs), _official(video, tmp_path, vf, tmp_path), f"{video.name} {rule}")


def test_shard_cli_height_and_interpolation(clips: Path, tmp_path: Path) -> None:
    env_cmd = [sys.executable, "-m", "ssv2prep", "shard", "--videos", str(clips / "videos"),
               "--labels", str(clips / "labels"), "--splits", "train", "--workers", "1"]  # fmt: skip
    both = subprocess.run([*env_cmd, "--out", str(tmp_path / "x"), "--short-side", "64", "--height", "64"],
                          capture_output=True, text=True)  # fmt: skip
    assert both.returncode != 0 and "--short-side and --height are exclusive" in both.stderr
    assert "Traceback" not in both.stderr
    run = subprocess.run([*env_cmd, "--out", str(tmp_path / "o"), "--height", "64", "--interpolation", "bilinear"],
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode != 0  # one of six failed (the cut clip) > the default 1 %
    assert "1 videos decoded fully to a frame count their header disagrees with" in run.stdout
    index = read_json(tmp_path / "o" / "ssv2-train.json")
    settings = index["settings"]
    assert (settings["height"], settings["short_side"], settings["interpolation"]) == (64, None, "bilinear")
    frames = _shard_frames(tmp_path / "o")
    assert Image.open(io.BytesIO(frames["rgb"][0])).size == (48, 64)  # portrait: height fixed, not the short side
    choices = next(p for p in __import__("ssv2prep.cli.data", fromlist=["shard"]).shard.params
                   if p.name == "interpolation").type.choices  # fmt: skip
    assert list(choices) == list(INTERPOLATIONS)

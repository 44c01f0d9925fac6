"""Main-process (GPU) JPEG decoding of a whole batch: one decode call per batch, the pixels PIL decodes.

CUDA is where it matters (one nvjpeg batch instead of one per video); the batch-assembly path is the same on the CPU,
where torchvision's `decode_jpeg` takes a list too, so it is checked here on the CPU.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssv2prep.data import decode as decode_mod
from ssv2prep.data.clip import ClipFinisher, ClipPlanner, ClipRequest
from ssv2prep.data.loader import DataConfig, build_eval_loader
from ssv2prep.data.sampling import SamplingSpec
from ssv2prep.data.source import iter_samples, resolve_source
from ssv2prep.data.stream import PendingBatch, finish_pending

CPU = torch.device("cpu")
T = 4


def _pil(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1)


def _count_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of frames of every `decode_jpeg_list` call from now on (the real decoder still runs)."""
    calls: list[int] = []
    real = decode_mod.decode_jpeg_list

    def counting(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        calls.append(len(data))
        return real(data, device)

    monkeypatch.setattr(decode_mod, "decode_jpeg_list", counting)
    return calls


@pytest.fixture(scope="module")
def requests(tiny_shards: Path) -> list[ClipRequest]:
    """Planned (undecoded) eval requests of the first validation shard's samples."""
    source = resolve_source(str(tiny_shards / "ssv2-validation.json"))
    planner = ClipPlanner(SamplingSpec("test", T))
    rng = np.random.default_rng(0)
    return [planner(sample, rng) for sample in iter_samples(source.urls[0])]


FINISHER = ClipFinisher(False, T, crop_size=32, scale_size=40, crops=3)


def test_a_pending_batch_is_decoded_in_one_call_to_the_pixels_pil_decodes(
    requests: list[ClipRequest], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert len(requests) >= 2 and all(r.jpegs for r in requests)
    calls = _count_calls(monkeypatch)
    batch = finish_pending(PendingBatch(list(requests), skipped=0), FINISHER, CPU)
    assert calls == [sum(len(r.jpegs or ()) for r in requests)]  # one call: every frame of every video
    reference = [
        FINISHER(dataclasses.replace(r, jpegs=None, decoded=torch.stack([_pil(b) for b in r.jpegs or ()])))
        for r in requests
    ]
    assert batch.keys == [r.key for r in requests] and batch.skipped == 0
    assert torch.equal(batch.clips, torch.stack(reference))
    # the frames themselves, before any resize: exactly PIL's
    videos = decode_mod.decode_jpeg_batch([r.jpegs or () for r in requests], CPU)
    for video, r in zip(videos, requests, strict=True):
        assert isinstance(video, torch.Tensor) and video.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(video, torch.stack([_pil(b) for b in r.jpegs or ()]))


def test_a_corrupt_frame_skips_only_its_sample(requests: list[ClipRequest], monkeypatch: pytest.MonkeyPatch) -> None:
    jpegs = requests[1].jpegs or ()
    broken = dataclasses.replace(requests[1], jpegs=(jpegs[0][:40], *jpegs[1:]))
    calls = _count_calls(monkeypatch)
    batch = finish_pending(PendingBatch([requests[0], broken, *requests[2:]], skipped=2), FINISHER, CPU)
    assert batch.skipped == 3 and batch.keys == [r.key for r in requests if r is not requests[1]]
    good = finish_pending(PendingBatch([requests[0], *requests[2:]], skipped=0), FINISHER, CPU)
    assert torch.equal(batch.clips, good.clips)
    # the batch call (all frames) fails; then each video is decoded on its own (per frame on the CPU) to find it
    assert calls[0] == sum(len(r.jpegs or ()) for r in requests) and len(calls) == 2


def test_the_main_process_loader_decodes_once_per_batch(tiny_shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = resolve_source(str(tiny_shards / "ssv2-validation.json"))
    cfg = DataConfig(num_segments=T, crop_size=32, scale_size=40, batch_size=2, num_workers=0)
    calls = _count_calls(monkeypatch)
    batches = list(build_eval_loader(source, cfg, decode_device="cpu"))
    assert len(batches) >= 2 and len(calls) == len(batches)
    assert calls == [T * b.labels.numel() for b in batches]  # every sampled frame of the batch in its one call


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batch_decode_while_the_compute_stream_is_busy_matches_the_cpu(requests: list[ClipRequest]) -> None:
    """Decoded on the side stream while the compute stream still runs queued work and frees memory: the frames are
    the CPU's (up to nvjpeg's rounding), and the compute stream's own results are untouched."""
    dev = torch.device("cuda")
    expected = finish_pending(PendingBatch(list(requests), skipped=0), FINISHER, CPU).clips.float()
    for _ in range(3):
        a = torch.full((2048, 2048), 1.0, device=dev)
        sums = [(a @ a).sum() for _ in range(8)]  # queued work reading `a`, then `a` freed while it still runs
        del a
        got = finish_pending(PendingBatch(list(requests), skipped=0), FINISHER, dev).clips
        assert got.is_cuda and (got.float().cpu() - expected).abs().mean() < 2.0
        assert all(s.item() == 2048.0**3 for s in sums)

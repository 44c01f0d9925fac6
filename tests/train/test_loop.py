"""train_one_epoch: metrics stay on the device between sync points, and what the host reads there is exact."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from ssv2prep.data.loader import DataConfig
from ssv2prep.data.stream import Batch
from ssv2prep.models.tsm import ModelConfig
from ssv2prep.train.config import OptimConfig, RuntimeConfig, TrainConfig
from ssv2prep.train.dist import DistInfo
from ssv2prep.train.loop import NonFiniteLossError, StepContext, train_one_epoch
from ssv2prep.train.report import read_metrics
from ssv2prep.train.run import fit

CPU_INFO = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
B, T, H, W, K = 4, 2, 8, 8, 5
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


class _Tiny(nn.Module):
    """(B, T, 3, H, W) -> (B, K); the logits turn infinite on an all-white clip (the poisoned batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(T * 3 * H * W, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.fc(x.reshape(x.shape[0], -1))
        return logits * torch.where(x.amax() > 2.0, math.inf, 1.0)


def _batches(n: int, *, poison: int | None = None) -> list[Batch]:
    g = torch.Generator().manual_seed(3)
    out = []
    for i in range(n):
        clips = torch.randint(0, 128, (B, T, 3, H, W), generator=g, dtype=torch.uint8)
        if i == poison:
            clips.fill_(255)
        labels = torch.randint(0, K, (B,), generator=g)
        out.append(Batch(clips, labels, [f"v{i}-{j}" for j in range(B)], 0))
    return out


def _reference(model: nn.Module, batches: list[Batch], lr: float) -> list[tuple[float, int]]:
    """(loss, top-1 hits) of every step of plain SGD, computed here, one step at a time."""
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    out = []
    for b in batches:
        x = (b.clips.float() / 255 - MEAN) / STD
        logits = model(x)
        loss = F.cross_entropy(logits, b.labels)
        out.append((loss.item(), int((logits.argmax(1) == b.labels).sum())))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return out


def _train(model, batches, *, log_every, lr=0.05, start_step=0, epoch=0, sync_at=None, on_step=None):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    ctx = StepContext(dist=CPU_INFO, log_every=log_every)
    return train_one_epoch(
        model,
        batches,
        opt,
        scaler,
        nn.CrossEntropyLoss(),
        epoch=epoch,
        start_step=start_step,
        set_lr=lambda _step: lr,
        ctx=ctx,
        on_step=on_step,
        sync_at=sync_at,
    )


def test_metrics_are_read_every_log_every_steps_and_are_the_window_means() -> None:
    torch.manual_seed(0)
    model, batches = _Tiny(), _batches(8)
    ref = _reference(model, batches, lr=0.05)
    seen: list[dict] = []
    summary = _train(model, batches, log_every=3, on_step=seen.append)
    assert [s["step"] for s in seen] == list(range(8))
    # synced: the first step (progress has a loss at once), then global steps 2 and 5 (log points); not 6, 7 (the
    # epoch's end syncs after the loop)
    assert [s["synced"] for s in seen] == [True, False, True, False, False, True, False, False]
    logged = [s for s in seen if s["logged"]]
    assert [s["step"] for s in logged] == [2, 5]
    for record, window in zip(logged, (ref[0:3], ref[3:6]), strict=True):
        assert record["loss"] == pytest.approx(sum(v for v, _ in window) / 3, rel=1e-5)
        assert record["top1"] == pytest.approx(100 * sum(h for _, h in window) / (3 * B))
    # between syncs progress shows what the last sync knew: step 1 the loss of step 0, steps 3-4 the record of 2
    assert seen[1]["loss"] == pytest.approx(ref[0][0], rel=1e-5)
    assert seen[3]["loss"] == seen[4]["loss"] == logged[0]["loss"]
    assert summary["loss"] == pytest.approx(sum(v for v, _ in ref) / 8, rel=1e-5)
    assert summary["top1"] == pytest.approx(100 * sum(h for _, h in ref) / (8 * B))
    assert summary["steps"] == 8


def test_a_non_finite_step_is_named_at_the_next_sync_before_any_checkpoint() -> None:
    torch.manual_seed(0)
    model, batches = _Tiny(), _batches(8, poison=4)
    saved: list[dict[str, torch.Tensor]] = []

    def on_step(stats: dict) -> None:
        if stats["synced"]:  # what run.fit does at a checkpoint step: save the weights of a checked step
            saved.append({k: v.clone() for k, v in model.state_dict().items()})
        steps.append(stats["step"])

    steps: list[int] = []
    with pytest.raises(NonFiniteLossError, match=r"the loss became (nan|inf) at epoch 7, step 104;"):
        _train(model, batches, log_every=100, start_step=100, epoch=7, sync_at=lambda s: s == 106, on_step=on_step)
    assert steps == [100, 101, 102, 103, 104, 105]  # stopped at the sync of step 106, before its on_step
    assert len(saved) == 1 and all(torch.isfinite(v).all() for v in saved[0].values())
    assert not all(torch.isfinite(p).all() for p in model.parameters())  # the bad step did corrupt the weights


def _tiny(shards: Path, out: Path, *, lr: float = 0.01, **runtime: object) -> TrainConfig:
    """2 epochs of 3 steps of a 4-frame resnet18 TSM at 32 px on the tiny shards (as tests/train/test_run.py)."""
    return TrainConfig(
        train=str(shards / "ssv2-train.json"),
        val=str(shards / "ssv2-validation.json"),
        out=out,
        model=ModelConfig(backbone="resnet18", num_segments=4, dropout=0.0),
        data=DataConfig(num_segments=4, crop_size=32, scale_size=40, batch_size=4, num_workers=1),
        optim=OptimConfig(epochs=2, lr=lr, scale_lr=False, lr_steps=()),
        runtime=RuntimeConfig(device="cpu", **runtime),  # type: ignore[arg-type]
    )


def test_train_records_every_log_every_steps_hold_the_means_of_their_steps(tiny_shards: Path, tmp_path: Path) -> None:
    """log_every=2 over 2 epochs of 3 steps: records at global steps 1, 3, 5; a window does not reach back into the
    previous epoch (step 3's record is step 3 alone), and the epoch means are those of every step."""
    fit(_tiny(tiny_shards, tmp_path / "every", log_every=1))
    fit(_tiny(tiny_shards, tmp_path / "two", log_every=2))
    every, two = (read_metrics(tmp_path / name / "metrics.jsonl") for name in ("every", "two"))
    loss = {r["step"]: r["loss"] for r in every if r["kind"] == "train"}
    train = [r for r in two if r["kind"] == "train"]
    assert [(r["epoch"], r["step"]) for r in train] == [(1, 1), (2, 3), (2, 5)]
    expected = [(loss[0] + loss[1]) / 2, loss[3], (loss[4] + loss[5]) / 2]
    assert [r["loss"] for r in train] == pytest.approx(expected, rel=1e-5)
    epochs = [r["loss"] for r in two if r["kind"] == "epoch"]
    assert epochs == pytest.approx([sum(loss[s] for s in range(e * 3, e * 3 + 3)) / 3 for e in (0, 1)], rel=1e-5)
    assert not {"synced", "logged"} & set(train[0])


def test_a_nan_run_names_the_step_and_leaves_no_checkpoint_of_nan_weights(tiny_shards: Path, tmp_path: Path) -> None:
    with pytest.raises(NonFiniteLossError) as every:
        fit(_tiny(tiny_shards, tmp_path / "every", lr=1e30, log_every=1))
    with pytest.raises(NonFiniteLossError) as deferred:
        fit(_tiny(tiny_shards, tmp_path / "deferred", lr=1e30, log_every=50, checkpoint_every=2))
    assert str(deferred.value) == str(every.value)
    last = tmp_path / "deferred" / "last.pt"
    if last.exists():
        weights = torch.load(last, weights_only=True)["model"]
        assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())

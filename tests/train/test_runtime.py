"""The shared runtime policy: layout default, backend flags, precision names."""

from __future__ import annotations

import pytest
import torch

from ssv2prep.errors import ConfigError
from ssv2prep.train import runtime


@pytest.mark.parametrize(
    ("flag", "device", "expected"),
    [(None, "cuda", True), (None, "cpu", False), (True, "cpu", True), (False, "cuda", False)],
)
def test_channels_last_defaults_to_on_for_cuda_only(flag: bool | None, device: str, expected: bool) -> None:
    assert runtime.use_channels_last(flag, torch.device(device)) is expected


def test_training_flags_touch_cudnn_on_cuda_only() -> None:
    before = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        runtime.set_training_flags(torch.device("cpu"))
        assert torch.backends.cudnn.benchmark is False
    finally:
        torch.backends.cudnn.benchmark = before


def test_precision_names_and_device_check() -> None:
    assert [runtime.precision_name(d) for d in (None, torch.bfloat16, torch.float16)] == ["fp32", "bf16", "fp16"]
    assert runtime.amp_dtype("auto", torch.device("cpu")) is None
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="--device cuda"):
            runtime.check_device("cuda")
    runtime.check_device("cpu")

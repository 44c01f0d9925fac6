"""How this process computes: precision (autocast dtype, exact fp32), device checks, memory layout, backend flags
and seeding. Shared by training (`run`), evaluation, prediction and the benchmarks, so the same option means the
same arithmetic everywhere.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch

from ssv2prep.errors import ConfigError

_PRECISION_NAMES: dict[torch.dtype | None, str] = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def choose_amp_dtype(mode: str, device_type: str, *, bf16_native: bool) -> torch.dtype | None:
    """The autocast dtype for `--amp mode` on a device: None on CPU or when off; `auto` is bf16 where the GPU
    computes it natively (Ampere and later), else fp16 with a loss scaler (V100 and T4 only emulate bf16, slowly)."""
    if device_type != "cuda" or mode == "off":
        return None
    if mode == "bf16" or (mode == "auto" and bf16_native):
        return torch.bfloat16
    return torch.float16


def cuda_has_native_bf16() -> bool:
    """Whether the current GPU computes bf16 natively (Ampere and later). `torch.cuda.is_bf16_supported()` alone also
    says yes where it is only emulated."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """`choose_amp_dtype` for this process's device."""
    native = device.type == "cuda" and cuda_has_native_bf16()
    return choose_amp_dtype(mode, device.type, bf16_native=native)


def precision_name(dtype: torch.dtype | None) -> str:
    """`fp32` for no autocast, else `bf16` / `fp16`: how reports record what the model ran in."""
    return _PRECISION_NAMES[dtype]


@contextlib.contextmanager
def exact_fp32(enabled: bool = True) -> Iterator[None]:
    """While the block runs, fp32 convolutions and matmuls run in fp32, not TF32 (which cuDNN uses by default on
    Ampere and newer GPUs, keeping 10 mantissa bits): the official test's arithmetic. A no-op when not `enabled`."""
    if not enabled:
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def check_device(device: str) -> None:
    """Raise ConfigError for `--device cuda` on a machine without CUDA (rather than a torch error later)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: CUDA is not available here (use --device cpu or auto)")


def use_channels_last(flag: bool | None, device: torch.device) -> bool:
    """`--channels-last` resolved: None means on for CUDA (cuDNN's NHWC kernels are the fast ones there; on the CPU
    the layout only costs conversions)."""
    return flag if flag is not None else device.type == "cuda"


def set_training_flags(device: torch.device) -> None:
    """Backend flags for training on `device` (set here, never at import): cuDNN autotuning on CUDA, since training
    clips have one fixed size and the fastest kernels are worth picking once."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of a rank's own draws (dropout): different on every rank and from `seed` itself (model init)."""
    return int(np.random.SeedSequence([seed, rank, 1]).generate_state(1)[0])

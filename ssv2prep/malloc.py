"""Keep freed memory inside the process: the CPU allocator setting the compute commands run with.

PyTorch's CPU tensors come from the C library's `malloc`. glibc serves every allocation above its mmap
threshold (128 KiB to 32 MiB, adjusted on the fly) with a fresh `mmap` and returns it to the kernel on `free`,
and it trims the top of the heap back to the kernel too. A network's activations are exactly such blocks,
allocated and freed on every forward pass, so each pass touches fresh pages and pays a minor page fault (and a
page zeroing by the kernel) per 4 KiB page: millions of faults per batch-8 TSN-ResNet-50 forward pass. Any extra
tensor a layer allocates, such as the temporal shift's output, pays the same again.

`keep_freed_memory` tells glibc to serve every size from its heap and never give memory back (`mallopt`:
`M_MMAP_MAX = 0`, and `M_TRIM_THRESHOLD = -1`, which disables trimming). After a few passes the freed blocks
cover the next pass's requests and it runs without faults. The price is that the process keeps its peak heap
until it exits, which a training or evaluation process does anyway. Other C libraries are left alone.
`ssv2prep bench shift` reports the faults per forward pass and compares both modes in one run.

Modes, chosen on the command line with `ssv2prep --malloc MODE` or the `SSV2PREP_MALLOC` variable:
`kept` (the default, apply the setting) and `system` (leave the C library's defaults).
"""

from __future__ import annotations

import ctypes
import platform
import resource
from collections.abc import Callable

from ssv2prep.errors import ConfigError

KEPT = "kept"
SYSTEM = "system"
MODES = (KEPT, SYSTEM)
ENV_VAR = "SSV2PREP_MALLOC"

# glibc's mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_NEVER = -1  # mallopt(3): "Setting M_TRIM_THRESHOLD to -1 disables trimming completely."

_state = {"mode": SYSTEM}


def _glibc_mallopt() -> Callable[[int, int], int] | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the kernel (see the module docstring).

    Returns:
        True when the setting was applied (glibc on Linux), False when this C library has no such knob.
    """
    mallopt = _glibc_mallopt()
    if mallopt is None:
        return False
    if mallopt(_M_MMAP_MAX, 0) != 1 or mallopt(_M_TRIM_THRESHOLD, _TRIM_NEVER) != 1:
        return False
    _state["mode"] = KEPT
    return True


def configure_malloc(mode: str) -> str:
    """Apply an allocator mode (`"kept"` or `"system"`); return the mode now in effect.

    `"kept"` falls back to `"system"` where the C library is not glibc. `"system"` changes nothing, so it only
    describes the process when no earlier call applied `"kept"` (glibc settings cannot be restored exactly).

    Raises:
        ConfigError: for an unknown mode.
    """
    if mode not in MODES:
        raise ConfigError(f"unknown malloc mode {mode!r}; expected one of {', '.join(MODES)}")
    if mode == KEPT:
        keep_freed_memory()
    return _state["mode"]


def malloc_mode() -> str:
    """The allocator mode this process runs with: `"kept"` once `keep_freed_memory` succeeded, else `"system"`."""
    return _state["mode"]


def minor_page_faults() -> int:
    """Minor page faults of this process so far (all threads), from `getrusage`."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

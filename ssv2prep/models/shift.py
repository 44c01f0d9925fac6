"""The temporal shift: a pure tensor function plus the module that puts it in front of a layer.

Layout contract: every function here takes and returns frame-major `(N*T, C, H, W)` tensors, where row
`n*T + t` is frame `t` of clip `n` (the layout `TSM.forward` produces from `(N, T, 3, H, W)` input).

Channel convention (compatible with the official TSM code for the bidirectional mode):

- `bidirectional`: with `fold = C // fold_div`, channels `[0, fold)` at time t take the value of frame t+1,
  channels `[fold, 2*fold)` take the value of frame t-1, the rest are unchanged. The clip ends are zero-filled
  (frame T-1 gets zeros in the first fold, frame 0 in the second).
- `unidirectional` (past -> present only, streamable): channels `[0, fold)` take the value of frame t-1, frame 0
  gets zeros there; the rest are unchanged. This is the online demo's convention (its first 1/8 of the channels
  carry the cached previous frame), so `OnlineTSM` can stream a model trained offline with this mode.
- `fold_div == 1` is the paper's naive shift of *all* channels: bidirectionally the first `ceil(C/2)` channels
  come from t+1 and the other `floor(C/2)` from t-1; unidirectionally all `C` channels come from t-1.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from ssv2prep.errors import ConfigError

log = logging.getLogger(__name__)

BIDIRECTIONAL = "bidirectional"
UNIDIRECTIONAL = "unidirectional"
SHIFT_ALL = 1  # the fold_div that selects the naive all-channel shift


def _split_bidirectional(channels: int, fold_div: int) -> tuple[int, int]:
    if fold_div == SHIFT_ALL:
        return channels - channels // 2, channels // 2
    return channels // fold_div, channels // fold_div


def _split_unidirectional(channels: int, fold_div: int) -> tuple[int, int]:
    return 0, channels // fold_div


# mode -> (channels, fold_div) -> (number of channels taken from t+1, number taken from t-1).
# The channels from t+1 come first, then those from t-1, then the unshifted rest.
SHIFT_MODES: dict[str, Callable[[int, int], tuple[int, int]]] = {
    BIDIRECTIONAL: _split_bidirectional,
    UNIDIRECTIONAL: _split_unidirectional,
}


def shift_split(channels: int, fold_div: int, mode: str) -> tuple[int, int]:
    """Return `(from_next, from_prev)`: how many leading channels come from t+1, and how many after them from t-1.

    Args:
        channels: C, the number of channels of the shifted tensor.
        fold_div: 1/fold_div of the channels moves each way (`1` = all channels, see the module docstring).
        mode: a key of `SHIFT_MODES`.

    Raises:
        ConfigError: for an unknown mode or a fold_div below 1.
    """
    if mode not in SHIFT_MODES:
        raise ConfigError(f"unknown shift mode {mode!r}; expected one of {sorted(SHIFT_MODES)}")
    if isinstance(fold_div, bool) or not isinstance(fold_div, int) or fold_div < 1:
        raise ConfigError(f"shift fold_div must be an integer >= 1, got {fold_div!r}")
    return SHIFT_MODES[mode](channels, fold_div)


def _clip_view(x: torch.Tensor, num_segments: int) -> torch.Tensor:
    """View `(N*T, C, H, W)` as `(N, T, C, H, W)`, keeping `x`'s memory layout (no copy).

    Splitting one dimension is a legal view for any strides, so a channels-last input stays channels-last (a
    `.contiguous()` here would make every shifted conv of a channels-last model pay two layout copies).
    """
    if x.dim() != 4:
        raise ValueError(f"temporal shift expects a (N*T, C, H, W) tensor, got shape {tuple(x.shape)}")
    if num_segments < 1 or x.shape[0] % num_segments:
        raise ValueError(f"temporal shift: batch dimension {x.shape[0]} is not a multiple of T={num_segments}")
    nt, c, h, w = x.shape
    return x.view(nt // num_segments, num_segments, c, h, w)


# Below this many elements a two-way shift takes the official zero-fill-then-copy sequence (4 kernel launches)
# instead of writing each element once (5 launches): launch and Python overhead outweigh memory traffic there.
# Measured on this project's 2-core CPU with `--malloc kept`, random call order: write-once / official 1.22 at 16k
# elements, 1.02-1.06 at 66k-124k, 0.92-0.97 at 262k, 0.80-0.82 at 2M. A one-way shift writes each element once at
# every size (3 launches either way, and 0.71-0.95 of the official time from 16k elements up).
SMALL_TENSOR_NUMEL = 1 << 18


def _fill_shifted(out: torch.Tensor, x: torch.Tensor, lo: int, hi: int, *, step: int) -> None:
    """Channels [lo, hi) of `out` (N, T, C, H, W) at t take `x` at t+step (step +1 or -1); zero the clip end."""
    if hi <= lo:
        return
    if step > 0:
        out[:, :-1, lo:hi].copy_(x[:, 1:, lo:hi])
        out[:, -1, lo:hi].zero_()
    else:
        out[:, 1:, lo:hi].copy_(x[:, :-1, lo:hi])
        out[:, 0, lo:hi].zero_()


def _zeros_then_copy(x5: torch.Tensor, from_next: int, from_prev: int, *, reverse: bool) -> torch.Tensor:
    """The official way on `(N, T, C, H, W)`: zero-fill a new tensor, then assign the three channel groups.

    `from_next` leading channels come from t+1 and the next `from_prev` from t-1; `reverse` swaps the two
    directions (the adjoint shift, which is the gradient). The output has `x5`'s layout (`zeros_like`).
    """
    out = torch.zeros_like(x5)
    later, earlier = slice(1, None), slice(None, -1)
    src, dst = (earlier, later) if reverse else (later, earlier)
    out[:, dst, :from_next] = x5[:, src, :from_next]
    out[:, src, from_next : from_next + from_prev] = x5[:, dst, from_next : from_next + from_prev]
    out[:, :, from_next + from_prev :] = x5[:, :, from_next + from_prev :]
    return out


def _shift_once(x: torch.Tensor, num_segments: int, from_next: int, from_prev: int, *, reverse: bool) -> torch.Tensor:
    """Channels [0, from_next) from t+1, the next from_prev from t-1, the rest unchanged; `reverse` swaps t+1/t-1.

    The output keeps the memory layout of `x` (channels-last stays channels-last): `empty_like`/`zeros_like`
    preserve the strides of the dense `(N, T, C, H, W)` view, and merging its first two dimensions back is a view.
    """
    x5 = _clip_view(x, num_segments)
    # Under torch.compile one path for every size: a size-dependent branch would add a guard (and a recompile)
    # for every tensor size it sees; the compiler fuses the launches the small path saves anyway.
    if from_next and from_prev and x5.numel() < SMALL_TENSOR_NUMEL and not torch.compiler.is_compiling():
        return _zeros_then_copy(x5, from_next, from_prev, reverse=reverse).view(x.shape)
    out = torch.empty_like(x5)
    _fill_shifted(out, x5, 0, from_next, step=-1 if reverse else 1)
    _fill_shifted(out, x5, from_next, from_next + from_prev, step=1 if reverse else -1)
    out[:, :, from_next + from_prev :].copy_(x5[:, :, from_next + from_prev :])
    return out.view(x.shape)


class _ShiftFunction(torch.autograd.Function):
    """Autograd wrapper: the gradient of a shift is the same shift with both directions reversed.

    Autograd through slice copies (CopySlices) is several times slower than this on CPU, and because the
    backward calls the Function again, double backward works too.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: torch.Tensor, num_segments: int, from_next: int, from_prev: int, reverse: bool
    ) -> torch.Tensor:
        ctx.shift_args = (num_segments, from_next, from_prev, reverse)
        return _shift_once(x, num_segments, from_next, from_prev, reverse=reverse)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        num_segments, from_next, from_prev, reverse = ctx.shift_args
        grad_in = _ShiftFunction.apply(grad_out, num_segments, from_next, from_prev, not reverse)
        return grad_in, None, None, None, None


def temporal_shift(x: torch.Tensor, num_segments: int, fold_div: int, mode: str = BIDIRECTIONAL) -> torch.Tensor:
    """Shift channels along time (see the module docstring for which channels move where).

    Allocates the output once and writes each element once (slice copies plus zeroing only the two boundary
    slices), instead of zero-filling the whole output and then overwriting it (two-way shifts of tensors below
    `SMALL_TENSOR_NUMEL` elements, where fewer kernel launches win, take the official sequence). The backward pass
    is the reverse shift, computed the same way, rather than autograd through slice copies.

    Args:
        x: float tensor `(N*T, C, H, W)`, frame-major inside each clip, in any memory layout.
        num_segments: T, the number of frames per clip.
        fold_div: 1/fold_div of the channels moves each way; `SHIFT_ALL` (1) moves all channels.
        mode: `"bidirectional"` or `"unidirectional"`.

    Returns:
        A new tensor of the same shape, dtype, device and memory layout as `x` (channels-last in, channels-last
        out; a non-dense input gives a contiguous output); differentiable (also twice), the gradient likewise.

    Raises:
        ConfigError: for an unknown mode or a fold_div below 1.
        ValueError: when `x` is not 4-D or its first dimension is not a multiple of `num_segments`.
    """
    from_next, from_prev = shift_split(x.shape[1], fold_div, mode)
    if torch.is_grad_enabled() and x.requires_grad:
        return _ShiftFunction.apply(x, num_segments, from_next, from_prev, False)
    return _shift_once(x, num_segments, from_next, from_prev, reverse=False)


def temporal_shift_zeros_copy(
    x: torch.Tensor, num_segments: int, fold_div: int, mode: str = BIDIRECTIONAL
) -> torch.Tensor:
    """Reference shift written the way the official code does it: zero-fill the output, then copy slices into it.

    Same contract and same values as `temporal_shift`; kept as the baseline for tests and benchmarks.
    """
    from_next, from_prev = shift_split(x.shape[1], fold_div, mode)
    return _zeros_then_copy(_clip_view(x, num_segments), from_next, from_prev, reverse=False).view(x.shape)


ShiftFn = Callable[[torch.Tensor, int, int, str], torch.Tensor]

# Implementations of the shift op, selectable per module (the benchmark compares them in the same network).
SHIFT_IMPLS: dict[str, ShiftFn] = {
    "fast": temporal_shift,
    "zeros_copy": temporal_shift_zeros_copy,
}


class TemporalShift(nn.Module):
    """Shift the input in time, then apply the wrapped module: `net(temporal_shift(x))`.

    The wrapped module is stored as `.net`, so a wrapped conv's weight appears as `conv1.net.weight` in the
    state dict, as in the official checkpoints. The wrapper itself has no parameters or buffers.

    Args:
        net: the module to run on the shifted tensor (a conv for "blockres", a whole block for "block").
        num_segments: T, the number of frames per clip.
        fold_div: 1/fold_div of the channels moves each way; `SHIFT_ALL` (1) moves all channels.
        mode: `"bidirectional"` or `"unidirectional"`.
        impl: a key of `SHIFT_IMPLS` (`"fast"` by default).
    """

    def __init__(
        self, net: nn.Module, num_segments: int, fold_div: int, mode: str = BIDIRECTIONAL, *, impl: str = "fast"
    ) -> None:
        """Validate the options and wrap `net` (see the class docstring)."""
        super().__init__()
        shift_split(1, fold_div, mode)  # validates mode and fold_div
        if impl not in SHIFT_IMPLS:
            raise ConfigError(f"unknown shift implementation {impl!r}; expected one of {sorted(SHIFT_IMPLS)}")
        self.net = net
        self.num_segments = num_segments
        self.fold_div = fold_div
        self.mode = mode
        self.impl = impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x` is `(N*T, C, H, W)`; returns `net` applied to the shifted `x`."""
        return self.net(SHIFT_IMPLS[self.impl](x, self.num_segments, self.fold_div, self.mode))

    def extra_repr(self) -> str:
        return f"num_segments={self.num_segments}, fold_div={self.fold_div}, mode={self.mode}, impl={self.impl}"


def shift_modules(model: nn.Module) -> list[TemporalShift]:
    """All `TemporalShift` modules of `model`, in registration order."""
    return [m for m in model.modules() if isinstance(m, TemporalShift)]

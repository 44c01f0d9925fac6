"""Frame-by-frame (streaming) inference for unidirectional TSM models.

A unidirectional shift only moves features from frame t-1 to frame t, so a clip can be processed one frame
at a time: each shifted layer replaces its first `C // shift_div` input channels with the same channels of
the previous frame, cached from the previous step (zeros before the first frame, as the offline zero padding).
This is the mechanism of the official online demo; the channels that move are the ones `temporal_shift` moves
in "unidirectional" mode, so the online and offline computations are identical:
`mean_t(step logits) == model(clip)` for an eval-mode model.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from ssv2prep.errors import ConfigError
from ssv2prep.models.shift import UNIDIRECTIONAL, TemporalShift, shift_split
from ssv2prep.models.tsm import TSM

log = logging.getLogger(__name__)

Cache = tuple[torch.Tensor, ...]


class _StepState:
    """Per-step exchange between `OnlineTSM.step` and its cached-shift layers (one slot per layer)."""

    def __init__(self, size: int) -> None:
        self.cache_in: list[torch.Tensor | None] = [None] * size
        self.cache_out: list[torch.Tensor | None] = [None] * size


class _CachedShift(nn.Module):
    """Streaming counterpart of a unidirectional `TemporalShift`: previous frame's channels from a cache."""

    def __init__(self, shift: TemporalShift, slot: int, state: _StepState) -> None:
        super().__init__()
        self.net = shift.net
        self.fold_div = shift.fold_div
        self.slot = slot
        self._state = state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x` is `(N, C, H, W)` for one frame; returns `net` of x with its first fold taken from the cache."""
        _, fold = shift_split(x.shape[1], self.fold_div, UNIDIRECTIONAL)
        cached = self._state.cache_in[self.slot]
        if cached is None:  # shape probe (init_cache): behave as the first frame
            cached = x.new_zeros(x.shape[0], fold, *x.shape[2:])
        self._state.cache_out[self.slot] = x[:, :fold].clone()
        return self.net(torch.cat((cached, x[:, fold:]), dim=1))


class OnlineTSM(nn.Module):
    """Run a unidirectional (or shift-free) TSM model one frame at a time.

    The wrapped copy is put in eval mode: streaming is inference, and BatchNorm must use its running statistics
    for the per-frame computation to equal the offline one. The weights are copied at construction; later changes
    to the offline model are not seen.

    Args:
        model: a `TSM` whose `cfg.shift_mode` is "unidirectional" (or with `shift_div == 0`).

    Raises:
        ConfigError: for a bidirectional shifted model, which needs future frames.
    """

    def __init__(self, model: TSM) -> None:
        """Copy `model` and swap its shifts for cached ones (see the class docstring)."""
        super().__init__()
        if model.has_shift and model.cfg.shift_mode != UNIDIRECTIONAL:
            raise ConfigError(
                f"online inference needs a unidirectional shift; this model is {model.cfg.shift_mode} "
                "(build it with shift_mode='unidirectional')"
            )
        self.cfg = model.cfg
        self.base_model = copy.deepcopy(model.base_model)
        self.new_fc = copy.deepcopy(model.new_fc)
        self._num_slots = self._swap_shifts()
        self.eval()

    def _swap_shifts(self) -> int:
        shifts = [(name, m) for name, m in self.base_model.named_modules() if isinstance(m, TemporalShift)]
        self._state = _StepState(len(shifts))
        for slot, (name, shift) in enumerate(shifts):
            parent_name, _, child = name.rpartition(".")
            parent = self.base_model.get_submodule(parent_name)
            setattr(parent, child, _CachedShift(shift, slot, self._state))
        return len(shifts)

    def init_cache(self, batch: int, device: torch.device | str, *, height: int = 224, width: int = 224) -> Cache:
        """Zero caches for `batch` streams of `height x width` frames (the state before the first frame).

        Returns:
            One `(batch, fold, h, w)` tensor per shifted layer, in the model's dtype, on `device`.
        """
        dtype = self.new_fc.weight.dtype
        probe = torch.zeros(1, 3, height, width, dtype=dtype, device=self.new_fc.weight.device)
        self._state.cache_in = [None] * self._num_slots
        with torch.no_grad():
            self.base_model(probe)
        shapes = [t.shape[1:] for t in self._state.cache_out if t is not None]
        return tuple(torch.zeros(batch, *shape, dtype=dtype, device=device) for shape in shapes)

    def step(self, frame_nchw: torch.Tensor, cache: Cache) -> tuple[torch.Tensor, Cache]:
        """Process one frame per stream.

        Args:
            frame_nchw: `(N, 3, H, W)` float frames, normalised like the offline input.
            cache: from `init_cache` (first frame) or the previous `step`.

        Returns:
            `(logits, new_cache)`: `(N, num_classes)` logits of this frame (the offline model's output on a clip
            is the mean of these over its T frames) and the cache for the next frame.

        Raises:
            ValueError: when the cache does not have one tensor per shifted layer.
        """
        if len(cache) != self._num_slots:
            raise ValueError(f"online cache has {len(cache)} tensors, the model has {self._num_slots} shifted layers")
        self._state.cache_in = list(cache)
        logits = self.new_fc(self.base_model(frame_nchw))
        new_cache = tuple(t for t in self._state.cache_out if t is not None)
        self._state.cache_in = [None] * self._num_slots
        self._state.cache_out = [None] * self._num_slots
        return logits, new_cache

    def forward(self, frame_nchw: torch.Tensor, cache: Cache) -> tuple[torch.Tensor, Cache]:
        return self.step(frame_nchw, cache)

"""Learning-rate schedules as pure functions of the optimizer step.

The official TSM code changes the lr once per epoch (step: x0.1 at given epochs; cosine over epochs) and has no
warm-up. We step the lr every iteration: `step` decays exactly at the same epoch boundaries, `cosine` is the same
curve sampled per iteration, and an optional linear warm-up ramps the first iterations.
"""

from __future__ import annotations

import math

from ssv2prep.errors import ConfigError

SCHEDULES = ("step", "cosine")


def lr_factor(
    step: int,
    *,
    steps_per_epoch: int,
    epochs: int,
    schedule: str = "step",
    lr_steps: tuple[float, ...] = (),
    gamma: float = 0.1,
    warmup_epochs: float = 0.0,
    warmup_start: float = 0.1,
) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based).

    Args:
        step: the optimizer step about to be taken.
        steps_per_epoch: optimizer steps in one epoch (> 0).
        epochs: total epochs (cosine reaches 0 at the end).
        schedule: "step" or "cosine".
        lr_steps: epochs at which "step" multiplies by `gamma`.
        gamma: decay factor of "step".
        warmup_epochs: length of a linear warm-up from `warmup_start` to 1 (0 = none).
        warmup_start: the factor at step 0 of the warm-up.
    """
    if steps_per_epoch < 1 or epochs < 1:
        raise ConfigError("lr schedule needs at least one epoch of at least one step")
    epoch = step / steps_per_epoch
    if schedule == "step":
        factor = gamma ** sum(epoch >= s for s in lr_steps)
    elif schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * min(epoch / epochs, 1.0)))
    else:
        raise ConfigError(f"--lr-schedule must be one of {list(SCHEDULES)} (got {schedule!r})")
    warmup_steps = warmup_epochs * steps_per_epoch
    if warmup_steps > 0 and step < warmup_steps:
        factor *= warmup_start + (1.0 - warmup_start) * step / warmup_steps
    return factor


def scaled_lr(lr_per_64: float, total_batch: int, reference_batch: int = 64) -> float:
    """Linear scaling: the official SSv2 recipe gives lr 0.01 for a total batch of 64 clips."""
    return lr_per_64 * total_batch / reference_batch

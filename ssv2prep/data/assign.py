"""Which samples each rank and DataLoader worker reads: the train epoch plan and the eval shard split.

The assignment step of the loader flow (`source` -> `assign` -> `clip` -> `decode` -> `stream` -> `loader`).
Pure functions of shard counts, seed, epoch, world size, workers and batch size, so every rank and worker computes
the same plan without talking to the others, and the plan can be checked at full scale without data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def epoch_shard_order(num_shards: int, *, seed: int, epoch: int) -> list[int]:
    """The shard permutation of one train epoch (the same on every rank)."""
    return [int(i) for i in np.random.default_rng([seed, epoch]).permutation(num_shards)]


@dataclass(frozen=True, slots=True)
class ShardRange:
    """Samples `start <= i < stop` (0-based, in stored order) of shard number `shard` of the source."""

    shard: int
    start: int
    stop: int

    def __len__(self) -> int:
        """How many samples the range holds."""
        return self.stop - self.start


def slot_quotas(num_samples: int, *, world_size: int, num_workers: int, batch_size: int) -> list[int]:
    """Samples each (rank, worker) slot yields in one train epoch, slot `rank * num_workers + worker` at index k.

    Every rank takes `num_samples // (world_size * batch_size)` batches, shared by its workers as the DataLoader
    takes them (`batches_for_worker`); `num_workers` 0 counts as 1 (the main process is the one worker).
    """
    workers = max(1, num_workers)
    steps = num_samples // (world_size * batch_size)
    per_worker = [batches_for_worker(steps, w, workers) * batch_size for w in range(workers)]
    return per_worker * world_size


def plan_train_epoch(
    nsamples: Sequence[int], *, seed: int, epoch: int, world_size: int, num_workers: int, batch_size: int
) -> list[tuple[ShardRange, ...]]:
    """Which samples each (rank, worker) slot reads in one train epoch: a pure function of its arguments.

    The epoch's shards, in the order `epoch_shard_order` gives (the same on every rank), form one sequence of
    `sum(nsamples)` samples; it is cut into consecutive pieces of `slot_quotas` samples, slot 0 first. So every
    sample belongs to at most one slot, and all but the last `sum(nsamples) % (world_size * batch_size)` (fewer
    than one batch per rank, at the end of the sequence, so different ones each epoch) to exactly one. A shard
    cut between two slots is read by both, each skipping the other's samples by their tar headers.

    Returns:
        `world_size * max(1, num_workers)` tuples of ranges in reading order; slot k = `rank * workers + worker`.
    """
    quotas = slot_quotas(sum(nsamples), world_size=world_size, num_workers=num_workers, batch_size=batch_size)
    shards = iter(epoch_shard_order(len(nsamples), seed=seed, epoch=epoch))
    shard, pos, size = -1, 0, 0
    plan: list[tuple[ShardRange, ...]] = []
    for quota in quotas:
        ranges: list[ShardRange] = []
        while quota:
            if pos == size:  # this shard is used up: open the next one (sum(quotas) <= sum(nsamples))
                shard, pos = next(shards), 0
                size = nsamples[shard]
                continue
            take = min(quota, size - pos)
            ranges.append(ShardRange(shard, pos, pos + take))
            pos, quota = pos + take, quota - take
        plan.append(tuple(ranges))
    return plan


def eval_shards(num_shards: int, *, rank: int, world_size: int, worker: int, num_workers: int) -> list[int]:
    """Shard indices of one (rank, worker) in evaluation: by rank, then by worker, in index order."""
    return list(range(num_shards))[rank::world_size][worker::num_workers]


def batches_for_worker(steps: int, worker: int, num_workers: int) -> int:
    """A worker's share of a rank's `steps` batches (DataLoader takes batches from workers in turn)."""
    return steps // num_workers + (1 if worker < steps % num_workers else 0)

"""The train epoch plan and the eval split, checked by counting samples (no data), at SSv2 scale and at the edges."""

from __future__ import annotations

import numpy as np
import pytest

from ssv2prep.data.assign import (
    ShardRange,
    batches_for_worker,
    epoch_shard_order,
    eval_shards,
    plan_train_epoch,
    slot_quotas,
)


def _check_plan(nsamples: list[int], *, world: int, workers: int, batch: int, epochs: int = 2) -> list[float]:
    """Check the epoch plans against the contract, counting samples (no data); return each epoch's unseen share."""
    total, slots = sum(nsamples), world * max(1, workers)
    steps = total // (world * batch)
    plans, unseen = [], []
    for epoch in range(epochs):
        plan = plan_train_epoch(nsamples, seed=11, epoch=epoch, world_size=world, num_workers=workers, batch_size=batch)
        assert plan == plan_train_epoch(
            nsamples, seed=11, epoch=epoch, world_size=world, num_workers=workers, batch_size=batch
        )  # a pure function: every rank and worker computes the same plan
        assert len(plan) == slots
        seen = [np.zeros(n, dtype=np.int64) for n in nsamples]
        for k, ranges in enumerate(plan):
            worker = k % max(1, workers)
            count = sum(r.stop - r.start for r in ranges)
            assert count == batches_for_worker(steps, worker, max(1, workers)) * batch
            for r in ranges:
                assert 0 <= r.start < r.stop <= nsamples[r.shard] and len(r) == r.stop - r.start
                seen[r.shard][r.start : r.stop] += 1
        for rank in range(world):  # equal steps on every rank
            rank_samples = sum(
                len(r) for ranges in plan[rank * slots // world : (rank + 1) * slots // world] for r in ranges
            )
            assert rank_samples == steps * batch
        flat = np.concatenate(seen)
        assert flat.max() <= 1  # no sample twice in an epoch
        assert flat.sum() == world * steps * batch and total - flat.sum() < world * batch  # all but < one batch/rank
        # each cut between slots splits at most one shard: at most one extra range per slot
        assert sum(len(ranges) for ranges in plan) <= len(nsamples) + slots
        plans.append(plan)
        unseen.append((total - flat.sum()) / total)
    if len(nsamples) >= 6:
        assert plans[0] != plans[1]  # re-planned every epoch (a new shard order)
    return unseen


@pytest.mark.parametrize(("world", "workers"), [(8, 8), (16, 8)])
@pytest.mark.parametrize("batch", [8, 64])
def test_epoch_plan_covers_every_ssv2_clip_once(world: int, workers: int, batch: int) -> None:
    # SSv2 train as 338 shards of 500: whole shards dealt to 64 (128) slots left 3.8% (8.8%) unseen per epoch
    unseen = _check_plan([500] * 338, world=world, workers=workers, batch=batch)
    assert all(u < world * batch / (338 * 500) for u in unseen)
    ragged = [int(n) for n in np.random.default_rng(0).integers(1, 700, 338)] + [0, 413]
    _check_plan(ragged, world=world, workers=workers, batch=batch)


@pytest.mark.parametrize(
    ("nsamples", "world", "workers", "batch"),
    [
        ([2] * 6, 2, 2, 2),  # the test shards
        ([5, 4, 3], 2, 4, 1),  # fewer shards than slots
        ([7], 3, 2, 2),  # one shard for every slot
        ([3, 0, 9, 1], 1, 0, 5),  # no workers, an empty shard, a remainder of 3
        ([6, 6], 2, 8, 2),  # fewer steps than workers: some slots read nothing
    ],
)
def test_epoch_plan_small_cases(nsamples: list[int], world: int, workers: int, batch: int) -> None:
    _check_plan(nsamples, world=world, workers=workers, batch=batch)


def test_epoch_plan_cuts_the_epoch_shard_order_in_slot_order() -> None:
    plan = plan_train_epoch([4, 4, 4], seed=0, epoch=0, world_size=1, num_workers=2, batch_size=3)
    order = epoch_shard_order(3, seed=0, epoch=0)
    a, b, c = order
    # 12 samples, 4 batches of 3: worker 0 takes batches 0 and 2 (6 samples), worker 1 batches 1 and 3
    assert plan == [(ShardRange(a, 0, 4), ShardRange(b, 0, 2)), (ShardRange(b, 2, 4), ShardRange(c, 0, 4))]
    assert slot_quotas(12, world_size=1, num_workers=2, batch_size=3) == [6, 6]
    assert slot_quotas(13, world_size=2, num_workers=0, batch_size=3) == [6, 6]


def test_eval_shards_are_disjoint_and_complete() -> None:
    ev = [eval_shards(7, rank=r, world_size=2, worker=w, num_workers=2) for r in range(2) for w in range(2)]
    assert sorted(s for e in ev for s in e) == list(range(7))
    assert [batches_for_worker(7, w, 3) for w in range(3)] == [3, 2, 2]

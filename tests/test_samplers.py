"""ClassPairBatchSampler: CS-KD batches of B anchors followed by B same-class partners."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from pipelines.samplers import ClassPairBatchSampler

# 5 classes of uneven size, one of them a single image (the only case where allow_self=False cannot be honoured).
LABELS = [0] * 7 + [1] * 5 + [2] * 9 + [3] * 1 + [4] * 6  # 28 samples


def _split(batch: list[int]) -> tuple[list[int], list[int]]:
    half = len(batch) // 2
    return batch[:half], batch[half:]


@pytest.mark.parametrize("allow_self", [True, False])
def test_partner_shares_anchor_class(allow_self):
    s = ClassPairBatchSampler(LABELS, batch_size=4, seed=3, allow_self=allow_self)
    for epoch in range(5):
        s.set_epoch(epoch)
        for batch in s:
            anchors, partners = _split(batch)
            assert len(anchors) == len(partners)
            assert [LABELS[a] for a in anchors] == [LABELS[p] for p in partners]
            if not allow_self:
                assert all(a != p or LABELS.count(LABELS[a]) == 1 for a, p in zip(anchors, partners, strict=True))


def test_allow_self_draws_self_sometimes_and_partners_cover_class():
    # With self allowed, over many epochs an anchor meets itself and every member of its class.
    s = ClassPairBatchSampler(LABELS, batch_size=28, seed=0, allow_self=True)
    seen = {i: set() for i in range(len(LABELS))}
    for epoch in range(60):
        anchors, partners = _split(s.batches(epoch)[0])
        for a, p in zip(anchors, partners, strict=True):
            seen[a].add(p)
    assert any(a in ps for a, ps in seen.items() if LABELS.count(LABELS[a]) > 1)
    assert seen[0] == {i for i, y in enumerate(LABELS) if y == 0}


@pytest.mark.parametrize("drop_last", [False, True])
def test_two_ranks_cover_each_anchor_once_per_epoch(drop_last):
    n = len(LABELS)  # 28: divisible by 2 ranks, and by B=7 so drop_last drops nothing either
    ranks = [ClassPairBatchSampler(LABELS, batch_size=7, rank=r, world=2, seed=1, drop_last=drop_last)
             for r in range(2)]
    for epoch in range(3):
        per_rank = [[a for b in s.batches(epoch) for a in _split(b)[0]] for s in ranks]
        assert len(ranks[0]) == len(ranks[1]) == 2
        assert not set(per_rank[0]) & set(per_rank[1])
        assert sorted(per_rank[0] + per_rank[1]) == list(range(n))


def test_uneven_ranks_same_length_and_full_coverage():
    labels = LABELS[:27]  # 27 over 2 ranks: padded by wrap-around like DistributedSampler (one anchor twice)
    ranks = [ClassPairBatchSampler(labels, batch_size=4, rank=r, world=2, seed=1) for r in range(2)]
    anchors = [[a for b in s.batches(0) for a in _split(b)[0]] for s in ranks]
    assert len(anchors[0]) == len(anchors[1]) == 14
    counts = Counter(anchors[0] + anchors[1])
    assert set(counts) == set(range(27)) and sum(counts.values()) == 28


def test_same_seed_same_batches_other_seed_or_epoch_differs():
    a = ClassPairBatchSampler(LABELS, batch_size=4, seed=5)
    b = ClassPairBatchSampler(LABELS, batch_size=4, seed=5)
    assert a.batches(2) == b.batches(2)
    assert a.batches(2) != a.batches(3)
    assert a.batches(2) != ClassPairBatchSampler(LABELS, batch_size=4, seed=6).batches(2)
    a.set_epoch(2)
    assert list(a) == b.batches(2)


def test_len_and_last_batch():
    s = ClassPairBatchSampler(LABELS, batch_size=8)
    assert len(s) == 4 and len(s.batches(0)[-1]) == 2 * (28 - 24)
    s = ClassPairBatchSampler(LABELS, batch_size=8, drop_last=True)
    assert len(s) == 3 and all(len(b) == 16 for b in s.batches(0))


def test_accepts_tensor_labels_and_rejects_bad_arguments():
    assert ClassPairBatchSampler(torch.tensor(LABELS), 4).batches(0) == ClassPairBatchSampler(LABELS, 4).batches(0)
    with pytest.raises(ValueError, match="rank 2"):
        ClassPairBatchSampler(LABELS, 4, rank=2, world=2)
    with pytest.raises(ValueError, match="batch_size"):
        ClassPairBatchSampler(LABELS, 0)
    with pytest.raises(ValueError, match="no labels"):
        ClassPairBatchSampler([], 4)


@pytest.mark.parametrize("world", [1, 2])
def test_class_pair_loader_keeps_the_official_epoch(tmp_path, world):
    # alinlab/cs-kd PairBatchSampler: ceil(N/B) batches, the last one short, every image an anchor once per epoch.
    # 300 digits, B = 64: one rank takes 5 batches (4 x 64 + 44); two ranks 3 each (2 x 64 + 22 per rank).
    from engine.setup_run import data_from_config
    from tests.helpers import tiny_config

    cfg = tiny_config(tmp_path, "objective.name=cskd", "data.sampler=class_pair", "data.limit_train=300",
                      "data.batch_size=64")
    loaders = [data_from_config(cfg, torch.device("cpu"), rank, world).train for rank in range(world)]
    anchors = []
    for loader in loaders:
        assert len(loader) == -(-300 // world // 64)
        loader.set_epoch(1)
        batches = list(loader)
        assert len(batches) == len(loader)
        assert [len(b.labels) for b in batches[:-1]] == [64] * (len(batches) - 1)
        assert len(batches[-1].labels) == 300 // world - 64 * (len(batches) - 1)
        assert all(b.extra["partner"].shape == b.images.shape for b in batches)
        anchors += [a for idx in loader.pairs.batches(1) for a in _split(idx)[0]]
    assert sorted(anchors) == list(range(300))

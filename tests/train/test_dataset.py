"""Cache -> batches: split, shapes, chunk-level shuffling, DataLoader workers."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from pipeline.cache.reader import open_cache
from pipeline.train.dataset import ChunkShuffleSampler, CacheDataset, collate


def test_items_and_batches(tiny):
    c = open_cache(tiny["cache"])
    ds = CacheDataset(tiny["cache"], "train", [2, 4], 2.0)
    held = CacheDataset(tiny["cache"], "heldout", [2, 4], 2.0)
    assert ds.indices == list(c.indices("train")) and held.indices == list(c.indices("heldout"))
    assert len(ds) + len(held) == len(c)
    batch = collate([ds[0], ds[1]])
    T, k = c.seq_len, c.topk
    assert batch["input_ids"].shape == (2, T) and batch["input_ids"].dtype == torch.long
    assert batch["topk_ids"].shape == (2, T, k) and batch["topk_logits"].shape == (2, T, k)
    assert batch["lse"].shape == (2, T) and batch["hidden_2"].shape == (2, T, 32)
    np.testing.assert_array_equal(batch["lse"][1].numpy(), c[ds.indices[1]]["lse"][2.0])
    np.testing.assert_array_equal(batch["hidden_4"][0].numpy(), c[ds.indices[0]]["hidden"][4])


def test_sampler_shuffles_whole_chunks_deterministically(tiny):
    ds = CacheDataset(tiny["cache"], "train", [2], 2.0)
    c = open_cache(tiny["cache"])
    s = ChunkShuffleSampler(ds.groups, seed=5, window=1)
    first = list(s)
    assert sorted(first) == list(range(len(ds)))
    assert first == list(ChunkShuffleSampler(ds.groups, seed=5, window=1))  # same seed and epoch, same order
    s.set_epoch(1)
    assert list(s) != first
    # window=1: rows of one chunk come out together
    chunks = [c.locate(ds.indices[p])[:2] for p in first]
    runs = [chunks[0]] + [b for a, b in zip(chunks, chunks[1:]) if a != b]
    assert len(runs) == len(set(chunks))


def test_workers_give_the_same_batches(tiny):
    ds = CacheDataset(tiny["cache"], "train", [2, 4], 2.0)
    sampler = ChunkShuffleSampler(ds.groups, seed=0, window=2)
    plain = list(DataLoader(ds, batch_size=3, sampler=sampler, collate_fn=collate, num_workers=0))
    worked = list(DataLoader(ds, batch_size=3, sampler=sampler, collate_fn=collate, num_workers=2))
    assert len(plain) == len(worked)
    for a, b in zip(plain, worked):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key])

"""Cache -> training batches (phase two), plus the live-teacher variant used for parity checks.

Batches are dicts of tensors, the same for both sources: input_ids [B, T] long, hidden_<t> [B, T, d_teacher]
fp32 per mapped teacher layer t, length [B] long (padded caches only), and the batch keys of the one kind of
teacher target the loss reads (pipeline/targets.py: e.g. topk_ids [B, T, k] long, topk_logits [B, T, k] fp32
and lse [B, T] fp32 at the loss temperature).

Shuffling keeps reads efficient: the sampler shuffles whole cache chunks (one Arrow record batch + one
Zarr chunk per layer), then rows inside a small window of consecutive chunks, so each chunk is decoded
once per window instead of once per row. No teacher weights are loaded on the cache path.
"""

from __future__ import annotations

import os
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from pipeline import targets
from pipeline.cache.codecs import logits_from_numpy
from pipeline.cache.reader import Cache, open_cache
from pipeline.errors import PipelineError
from pipeline.targets import cached_temperature, hidden_key

__all__ = ["CacheDataset", "ChunkShuffleSampler", "OnlineTeacherCollator", "SequenceDataset", "cached_temperature",
           "collate", "hidden_key"]


# ----------------------------------------------------------------------------- sampler


class ChunkShuffleSampler(Sampler[int]):
    """Yields dataset positions: chunk order shuffled, rows shuffled within windows of `window` chunks.

    groups: dataset positions grouped by the cache chunk that holds them. Deterministic for (seed, epoch),
    so every process of a distributed run draws the same order (accelerate then shards the batches) and a
    resumed run can skip the batches it already consumed.
    """

    def __init__(self, groups: list[list[int]], seed: int = 0, window: int = 2, shuffle: bool = True):
        self.groups = [list(g) for g in groups if len(g)]
        self.seed, self.window, self.shuffle = int(seed), max(1, int(window)), shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return sum(len(g) for g in self.groups)

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            for g in self.groups:
                yield from g
            return
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.groups))
        for w in range(0, len(order), self.window):
            rows = [p for gi in order[w : w + self.window] for p in self.groups[gi]]
            for j in rng.permutation(len(rows)):
                yield rows[j]


def chunk_groups(chunk_of: Sequence[tuple]) -> list[list[int]]:
    """Dataset positions grouped by chunk key, in first-seen order."""
    groups: dict[tuple, list[int]] = {}
    for pos, key in enumerate(chunk_of):
        groups.setdefault(tuple(key), []).append(pos)
    return list(groups.values())


# ----------------------------------------------------------------------------- datasets


class CacheDataset(Dataset):
    """One split of a cache; item = one sequence with the targets the loss needs (numpy arrays).

    The Cache is opened lazily in each process (DataLoader workers get their own file handles).
    """

    def __init__(self, cache_dir: str, split: str, layers: Sequence[int], temperature: float, logits: bool = True,
                 storage_options: dict | None = None, source: str = "topk"):
        self.cache_dir = str(cache_dir)  # a folder or an fsspec URL (opened with storage_options)
        self.storage_options = dict(storage_options or {})
        self.kind = targets.kind(source)  # which teacher targets an item carries
        self.layers = sorted(set(int(x) for x in layers))
        self.exact = self.kind is targets.EXACT and bool(logits)  # the teacher's layer n stands in for the logits
        self.logits = bool(logits) and not self.exact  # False: no top-k ids, logits or lse are read
        cache = self._open()  # the mapped layers only (and layer n for exact targets)
        if self.exact:
            if cache.exact_layer is None:
                cache.teacher_head()  # the one-line error of a cache without exact targets
            self.layers = cache.decoded_layers
        self.indices = list(cache.indices(split))
        # exact targets rebuild the logits: any loss temperature, cached or not
        self.temperature = (cached_temperature(cache.temperatures, temperature) if self.kind.reads_cached_temperature
                            else float(temperature))
        self.proposal_temperature = None
        if self.kind is targets.SAMPLED:
            if not cache.samples:
                raise PipelineError(f"{self.cache_dir} holds no sampled teacher targets (cache.logits "
                                    f"{targets.manifest_logits(cache.manifest)}): set loss.logits_source=topk or rebuild")
            self.proposal_temperature = cached_temperature(cache.temperatures, cache.sampling["proposal_temperature"])
        elif self.logits and not cache.topk:
            raise PipelineError(f"{self.cache_dir} holds no top-k teacher targets (cache.logits sampled): "
                                "set loss.logits_source=sampled or rebuild")
        self.padded = cache.padded
        self.groups = chunk_groups([cache.locate(i)[:2] for i in self.indices])
        self._cache: Cache | None = cache

    def _open(self) -> Cache:
        self._pid = os.getpid()
        return open_cache(self.cache_dir, layers=self.layers, logits=self.logits, storage_options=self.storage_options,
                          exact=self.exact)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"] = None  # file handles and decoded chunks stay in the process that opened them
        return state

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, pos: int) -> dict:
        if self._cache is None or (self._pid != os.getpid() and not self._cache.storage.local):
            # a forked DataLoader worker inherits the parent's open cache: a memory map is fine to share, an
            # fsspec filesystem (its event loop and connections) is not, so a worker opens its own
            self._cache = self._open()
        s = self._cache[self.indices[pos]]
        item = {"input_ids": s["input_ids"]}
        if self.logits:
            item.update(self.kind.item(s, self.temperature, self.proposal_temperature))
        for layer in self.layers:
            item[hidden_key(layer)] = s["hidden"][layer]
        if "length" in s:
            item["length"] = s["length"]
        return item


class SequenceDataset(Dataset):
    """Token rows only (online mode: the teacher runs in the collator)."""

    def __init__(self, input_ids: np.ndarray, lengths: np.ndarray | None, rows: range,
                 shard_sequences: int, chunk_sequences: int):
        self.input_ids, self.lengths, self.indices = input_ids, lengths, list(rows)
        self.padded = lengths is not None
        # the same chunk groups a single-process cache build would have: identical sampling order
        self.groups = chunk_groups(
            [(i // shard_sequences, (i % shard_sequences) // chunk_sequences) for i in self.indices]
        )

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, pos: int) -> dict:
        i = self.indices[pos]
        item = {"input_ids": self.input_ids[i].astype(np.int64), "sequence": i}  # i seeds the teacher's draws
        if self.lengths is not None:
            item["length"] = int(self.lengths[i])
        return item


# ----------------------------------------------------------------------------- collators


LONG_KEYS = ("input_ids", "topk_ids", "sample_ids", "length", "sequence")


def collate(items: list[dict]) -> dict:
    """Stack items into [B, ...] tensors (ids long, floats fp32)."""
    out = {}
    for key in items[0]:
        arr = np.stack([np.asarray(it[key]) for it in items])
        t = torch.from_numpy(arr)
        out[key] = t.long() if key in LONG_KEYS else t.float()
    return out


class OnlineTeacherCollator:
    """Collates token rows, then runs the live teacher (a TeacherCapture) to add the targets of `kind` a cache
    would hold. Runs in the main process (dataloader_num_workers must be 0)."""

    def __init__(self, capture, temperature: float, kind: str = "topk"):
        self.capture = capture
        self.kind = targets.kind(kind)
        self.temperature_index = capture.temperatures.index(cached_temperature(capture.temperatures, temperature))
        # draws (capture.samples > 0) are seeded by the rows' sequence indices exactly as a cache build seeds them
        self.proposal_index = capture.temperatures.index(
            cached_temperature(capture.temperatures, capture.proposal_temperature)) if capture.samples else None

    def _logits(self, stored: np.ndarray) -> np.ndarray:
        return logits_from_numpy(stored, self.capture.logit_dtype)

    def __call__(self, items: list[dict]) -> dict:
        batch = collate(items)
        ids = batch["input_ids"]
        mask = None
        if "length" in batch:
            mask = (torch.arange(ids.shape[1])[None, :] < batch["length"][:, None]).long()
        sequences = batch.pop("sequence").tolist()
        cap = self.capture(ids, mask, sequences=sequences)
        batch.update(self.kind.from_capture(cap, self.temperature_index, self.proposal_index, self._logits))
        for layer, h in cap.hidden.items():
            batch[hidden_key(layer)] = torch.from_numpy(h)
        return batch

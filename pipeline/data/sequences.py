"""Text -> tokens -> fixed-length sequences (packed or padded), with a deterministic held-out split.

Documents are assigned to train or held-out *before* packing (seeded draw per document), so no
document straddles the split. Train sequences come first: rows [0, n_train) are train,
[n_train, n) are held-out.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from pipeline.errors import PipelineError

_TOKENIZE_BATCH = 256


@dataclass
class Sequences:
    input_ids: np.ndarray  # [N, T] int32
    lengths: np.ndarray | None  # [N] int32 valid tokens per row (padded mode); None when packed
    n_train: int

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_heldout(self) -> int:
        return len(self) - self.n_train

    def digest(self) -> str:
        h = hashlib.blake2b(digest_size=16)
        h.update(np.ascontiguousarray(self.input_ids, dtype=np.int64).tobytes())
        if self.lengths is not None:
            h.update(np.ascontiguousarray(self.lengths, dtype=np.int64).tobytes())
        h.update(str(self.n_train).encode())
        return h.hexdigest()


def heldout_count(num_sequences: int, heldout_fraction: float) -> int:
    if heldout_fraction <= 0 or num_sequences < 2:
        return 0
    return min(num_sequences - 1, max(1, round(num_sequences * heldout_fraction)))


def _token_stream(docs: Iterable[str], tokenizer) -> Iterator[list[int]]:
    batch: list[str] = []
    for d in docs:
        batch.append(d)
        if len(batch) == _TOKENIZE_BATCH:
            yield from tokenizer(batch, add_special_tokens=False)["input_ids"]
            batch = []
    if batch:
        yield from tokenizer(batch, add_special_tokens=False)["input_ids"]


class _Packer:
    """Joins documents with EOS and cuts blocks of seq_len, BOS first when the tokenizer has one."""

    def __init__(self, seq_len: int, bos: int | None, eos: int | None):
        self.body = seq_len - (bos is not None)
        self.bos, self.eos = bos, eos
        self.buf: list[int] = []
        self.rows: list[list[int]] = []

    def add(self, ids: list[int], budget: int) -> None:
        self.buf.extend(ids)
        if self.eos is not None:
            self.buf.append(self.eos)
        while len(self.buf) >= self.body and len(self.rows) < budget:
            block, self.buf = self.buf[: self.body], self.buf[self.body :]
            self.rows.append(([self.bos] if self.bos is not None else []) + block)


class _Padder:
    """One document per row: BOS + tokens (+ EOS when it fits), truncated to seq_len, padded."""

    def __init__(self, seq_len: int, bos: int | None, eos: int | None, pad: int):
        self.seq_len, self.bos, self.eos, self.pad = seq_len, bos, eos, pad
        self.rows: list[list[int]] = []
        self.lengths: list[int] = []

    def add(self, ids: list[int], budget: int) -> None:
        if len(self.rows) >= budget:
            return
        row = ([self.bos] if self.bos is not None else []) + ids
        if self.eos is not None:
            row.append(self.eos)
        row = row[: self.seq_len]
        if len(row) < 2:
            return
        self.lengths.append(len(row))
        self.rows.append(row + [self.pad] * (self.seq_len - len(row)))


def build_sequences(
    docs: Iterable[str],
    tokenizer,
    seq_len: int,
    num_sequences: int,
    heldout_fraction: float,
    packing: bool,
    seed: int,
) -> Sequences:
    if seq_len < 2:
        raise PipelineError(f"data.seq_len: {seq_len} must be >= 2")
    n_held = heldout_count(num_sequences, heldout_fraction)
    n_train = num_sequences - n_held
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    make = (lambda: _Packer(seq_len, bos, eos)) if packing else (lambda: _Padder(seq_len, bos, eos, pad))
    train, held = make(), make()
    rng = random.Random(seed)
    n_docs = 0
    for ids in _token_stream(docs, tokenizer):
        n_docs += 1
        to_held = n_held > 0 and rng.random() < max(heldout_fraction, 1e-9)
        if to_held and len(held.rows) < n_held:
            held.add(ids, n_held)
        elif len(train.rows) < n_train:
            train.add(ids, n_train)
        elif len(held.rows) < n_held:
            held.add(ids, n_held)
        if len(train.rows) >= n_train and len(held.rows) >= n_held:
            break
    if n_docs == 0:
        raise PipelineError("the corpus is empty: no non-empty documents in data.sources")
    got = len(train.rows) + len(held.rows)
    if got < num_sequences:
        raise PipelineError(
            f"the corpus yields only {got} sequences of {seq_len} tokens "
            f"({len(train.rows)} train, {len(held.rows)} held-out); lower data.num_sequences to at most {got}"
        )
    rows = train.rows + held.rows
    lengths = None if packing else np.asarray(train.lengths + held.lengths, dtype=np.int32)
    return Sequences(np.asarray(rows, dtype=np.int32), lengths, n_train)


def sequences_from_config(data_cfg, tokenizer) -> Sequences:
    """The `data:` section of a config -> Sequences."""
    from pipeline.sources.corpus import mix_documents

    docs = mix_documents(data_cfg.sources, data_cfg.text_field, data_cfg.seed)
    return build_sequences(
        docs, tokenizer, data_cfg.seq_len, data_cfg.num_sequences, data_cfg.heldout_fraction,
        data_cfg.packing, data_cfg.seed,
    )

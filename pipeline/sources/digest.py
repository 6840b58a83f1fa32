"""Content digests that make up a cache fingerprint: weights, tokenizer, files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from pipeline.blocks import is_sharded, whole


def model_digest(model: torch.nn.Module) -> str:
    """xxh3-128 over parameter/buffer names, dtypes, shapes and bytes (tied weights counted once). xxh3 hashes
    ~10 GB/s per core, so a build spends a few tens of milliseconds per GB of weights here."""
    from pipeline.cache.checksum import Hasher  # the cache's checksum algorithm, named in the digest ("xxh3:...")

    h = Hasher()
    seen: set[int] = set()
    for name, t in model.state_dict(keep_vars=False).items():
        # a tensor-parallel model's weights are DTensors: the digest is the whole tensor's, gathered one at a
        # time (a collective: every rank of the group digests), so a TP build has the fingerprint of one process
        local = t.to_local() if is_sharded(t) else t
        if local.data_ptr() in seen:
            continue
        seen.add(local.data_ptr())
        t = whole(t).detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # the tensor's own memory, no copy
    return h.digest()


def tokenizer_digest(tokenizer) -> str:
    """Vocabulary and special tokens: what decides the ids a text turns into."""
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "cls": type(tokenizer).__name__,
    }
    return hashlib.blake2b(json.dumps(payload, sort_keys=True).encode(), digest_size=16).hexdigest()


def file_digest(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()

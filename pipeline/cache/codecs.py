"""Hidden-state codecs (registry) and the zarr compressor that goes with them.

A codec turns float32 block outputs [n, T, d] into one or more arrays to store and back. Round-trip
bounds (tested):
- fp32: lossless.
- bf16: round-to-nearest-even to bfloat16; |x - x'| <= 2^-8 |x| (relative half-ulp of an 8-bit mantissa).
  Lossless for a bfloat16 teacher.
- fp16: |x - x'| <= 2^-11 |x| for |x| in fp16's normal range (6.1e-5 .. 65504); values beyond 65504 are
  clipped to it (block outputs of the supported models stay far below).
- int8: per-vector absmax: scale s = absmax / 127 rounded *up* to fp16, q = round(x / s);
  |x - x'| <= s / 2 for every element, i.e. about absmax / 254.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from pipeline.registry import Registry

FP16_MAX = float(np.finfo(np.float16).max)

# ----------------------------------------------------------------------------- storage dtypes
# cache.logit_dtype's torch and numpy dtypes: pipeline/dtypes.py


def id_dtype(vocab_size: int) -> np.dtype:
    """Token ids are stored as uint16 up to 65,536 ids, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def count_dtype(samples: int) -> np.dtype:
    """Draw counts (sampled targets, K draws per position) are stored as uint8 up to K = 255, else uint16."""
    return np.dtype(np.uint8) if samples <= 255 else np.dtype(np.uint16)


def host_array(t: torch.Tensor, dtype: np.dtype | None = None) -> np.ndarray:
    """A CPU tensor as the numpy array stored (bfloat16 as its uint16 bit patterns), optionally cast."""
    a = t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()
    return a if dtype is None else a.astype(dtype, copy=False)


def logits_from_numpy(arr: np.ndarray, logit_dtype: str) -> np.ndarray:
    """Stored logits (dtypes.STORED_LOGIT_DTYPES[logit_dtype]) as float32."""
    if logit_dtype == "bf16":
        return torch.from_numpy(np.ascontiguousarray(arr).view(np.int16)).view(torch.bfloat16).float().numpy()
    return arr.astype(np.float32)



@dataclass(frozen=True)
class HiddenCodec:
    name: str
    # float32 [n, T, d] -> {suffix: array}; "" is the main array, others are side arrays (scales)
    encode: Callable[[np.ndarray], dict[str, np.ndarray]]
    # {suffix: array} -> float32 [n, T, d]
    decode: Callable[[dict[str, np.ndarray]], np.ndarray]
    bound: str  # human-readable round-trip bound, shown by `cache info`
    # the same encoding on a torch tensor where it lives (a GPU: only the encoded bytes cross to the host):
    # {suffix: tensor on that device} whose host values (bf16 as its bit patterns) are bit-identical to
    # `encode` of the tensor's float32 values (tested)
    encode_torch: Callable[[torch.Tensor], dict[str, torch.Tensor]] | None = None


HIDDEN_CODECS: Registry[HiddenCodec] = Registry("hidden codec")


def _bf16_encode(x: np.ndarray) -> dict[str, np.ndarray]:
    return {"": host_array(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(torch.bfloat16))}


def _bf16_decode(a: dict[str, np.ndarray]) -> np.ndarray:
    return torch.from_numpy(np.ascontiguousarray(a[""]).view(np.int16)).view(torch.bfloat16).float().numpy()


def _int8_encode(x: np.ndarray) -> dict[str, np.ndarray]:
    x = np.asarray(x, dtype=np.float32)
    # [n, T]: absmax / 127 without an |x| temporary (+ 0 turns a zero vector's -0.0 into the 0.0 |x| gives)
    scale = (np.maximum(x.max(axis=-1), -x.min(axis=-1)) + np.float32(0)) / 127.0
    s16 = scale.astype(np.float16)
    low = s16.astype(np.float32) < scale
    s16[low] = np.nextafter(s16[low], np.float16(np.inf))  # round the scale up so |q| <= 127
    s = s16.astype(np.float32)[..., None]
    zero = s == 0  # all-zero vectors: q = 0 (no 0 / 0)
    q = np.divide(x, np.where(zero, np.float32(1), s))  # the one full-size temporary, rounded and clipped in place
    np.rint(q, out=q)
    np.clip(q, -127, 127, out=q)
    if zero.any():
        q[np.broadcast_to(zero, q.shape)] = 0
    return {"": q.astype(np.int8), "scale": s16}


def _int8_decode(a: dict[str, np.ndarray]) -> np.ndarray:
    return a[""].astype(np.float32) * a["scale"].astype(np.float32)[..., None]


def _int8_encode_torch(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """_int8_encode on the tensor's device: the same fp32 arithmetic, half-to-even rounding and scale
    rounded up to fp16 (next fp16 above = its bit pattern + 1, the scale being >= 0)."""
    x = x.float()
    scale = x.abs().amax(dim=-1) / 127.0  # [n, T]
    s16 = scale.half()
    low = (s16.float() < scale).to(torch.int16)
    s16 = (s16.view(torch.int16) + low).view(torch.float16)
    s = s16.float().unsqueeze(-1)
    q = torch.where(s > 0, x / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(x)).round()
    return {"": q.clamp_(-127, 127).to(torch.int8), "scale": s16}


for _codec in (
    HiddenCodec("fp32", lambda x: {"": np.asarray(x, dtype=np.float32)}, lambda a: a[""].astype(np.float32), "lossless",
                lambda x: {"": x.float()}),
    HiddenCodec("bf16", _bf16_encode, _bf16_decode, "|err| <= 2^-8 |x|", lambda x: {"": x.float().to(torch.bfloat16)}),
    HiddenCodec(
        "fp16",
        lambda x: {"": np.clip(x, -FP16_MAX, FP16_MAX).astype(np.float16)},
        lambda a: a[""].astype(np.float32),
        "|err| <= 2^-11 |x| (normal range)",
        lambda x: {"": x.float().clamp(-FP16_MAX, FP16_MAX).half()},
    ),
    HiddenCodec("int8", _int8_encode, _int8_decode, "|err| <= absmax/254 per vector", _int8_encode_torch),
):
    HIDDEN_CODECS.register(_codec.name)(_codec)


def zarr_compressor(level: int, typesize: int, cname: str = "zstd"):
    """Blosc (zstd by default) over byte-shuffled values: the exponent bytes of nearby floats compress
    together. What the hidden arrays' Zarr metadata names; `blosc_codec` writes the same bytes."""
    from zarr.codecs import BloscCodec

    return BloscCodec(cname=cname, clevel=min(level, 9), shuffle="shuffle" if typesize > 1 else "noshuffle",
                      typesize=typesize, blocksize=0)


@functools.lru_cache(maxsize=None)
def blosc_codec(level: int, typesize: int, cname: str = "zstd"):
    """The numcodecs Blosc that zarr_compressor's codec runs: its `encode` of a chunk's little-endian bytes
    is the chunk file zarr writes (tested). Stateless and thread-safe; it releases the GIL."""
    from numcodecs import Blosc

    return Blosc(cname=cname, clevel=min(level, 9), shuffle=Blosc.SHUFFLE if typesize > 1 else Blosc.NOSHUFFLE,
                 blocksize=0, typesize=typesize)


# ----------------------------------------------------------------------------- top-k side data
# A chunk's top-k (and sampled) columns are each stored as one compressed blob (cache.side_compressor).
# Top-k logits arrive sorted by value (descending). Their float bit patterns are mapped to unsigned keys
# that sort like the values and stored as wrap-around differences of neighbours, small numbers whose high
# bytes are mostly zero, laid out slot by slot (every position's largest logit, then every second...):
# neighbours in the stream then come from the same slot and have like magnitudes. Ids are written as
# their rank in the corpus's token frequency (the frequent tokens the teacher predicts most get small
# numbers whose high byte is mostly zero), position by position. Both are split into byte planes (most
# significant first) before compression; brotli's context modelling codes these bytes tighter than zstd.
# Every layout choice here was measured on real text (README, side-data table). Lossless for any order
# of the k entries.

# cache.side_compressor -> level. brotli 10: brotli 11 is ~3x slower for < 0.1 B/token, 9 ~6x faster for
# +8 B/token. zstd 1: on these planes no higher level is smaller (measured on real text, 8,192 tokens: 144.2
# B/token at level 1, 148.5 at 3, 148.1 at 9, 144.7 at 19) and level 1 is the fastest, ~200x brotli 10
# (docs/scale.md, section 4; README, side-data table)
SIDE_LEVELS = {"brotli": 10, "zstd": 1}

_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32}


def to_planes(a: np.ndarray) -> np.ndarray:
    """[R, n] unsigned ints of width W -> [R, W * n] uint8, byte planes most significant first."""
    w = a.dtype.itemsize
    b = np.ascontiguousarray(a).view(np.uint8).reshape(a.shape[0], -1, w)  # little-endian bytes
    return np.ascontiguousarray(b[:, :, ::-1].transpose(0, 2, 1)).reshape(a.shape[0], -1)


def from_planes(p: np.ndarray, width: int) -> np.ndarray:
    """Inverse of to_planes: [R, W * n] uint8 -> [R, n] unsigned ints."""
    r = p.shape[0]
    b = np.ascontiguousarray(p.reshape(r, width, -1)[:, ::-1, :].transpose(0, 2, 1))
    return b.view(_UINT[width]).reshape(r, -1)


def compress_chunk(planes: np.ndarray, compressor: str) -> bytes:
    """uint8 bytes (any shape) -> one compressed blob (compressor: a SIDE_LEVELS key)."""
    import pyarrow as pa

    codec = pa.Codec(compressor, compression_level=SIDE_LEVELS[compressor])
    return codec.compress(np.ascontiguousarray(planes).reshape(-1), asbytes=True)


def decompress_chunk(blob, nbytes: int, compressor: str) -> np.ndarray:
    """Inverse of compress_chunk: a blob (bytes, a pyarrow buffer or binary scalar) -> [nbytes] uint8."""
    import pyarrow as pa

    buf = blob.as_buffer() if hasattr(blob, "as_buffer") else blob
    return np.frombuffer(pa.Codec(compressor).decompress(buf, decompressed_size=nbytes), dtype=np.uint8)


def _float_keys(bits: np.ndarray) -> np.ndarray:
    """Float bit patterns -> unsigned keys ordered like the float values."""
    top = bits.dtype.type(1 << (8 * bits.dtype.itemsize - 1))
    return np.where(bits & top, ~bits, bits | top)


def _float_bits(keys: np.ndarray) -> np.ndarray:
    top = keys.dtype.type(1 << (8 * keys.dtype.itemsize - 1))
    return np.where(keys & top, keys & ~top, ~keys)


def encode_topk_logits(stored: np.ndarray, slot_major: bool = True) -> np.ndarray:
    """[n, T, k] stored logits of a chunk (float16 | bf16-as-uint16 | float32) -> [n*T*k*W] uint8:
    neighbour differences of order-preserving keys, slot-major ([k, n, T]) or position by position
    ([n, T, k]: the sampled logits, whose empty slots then form runs), as byte planes."""
    width = stored.dtype.itemsize
    keys = _float_keys(np.ascontiguousarray(stored).view(_UINT[width]))
    deltas = keys.copy()
    deltas[..., 1:] = keys[..., :-1] - keys[..., 1:]  # wraps modulo 2^W: lossless whatever the order
    return to_planes((deltas.transpose(2, 0, 1) if slot_major else deltas).reshape(1, -1))[0]


def decode_topk_logits(planes: np.ndarray, dtype: np.dtype, n: int, t: int, k: int,
                       slot_major: bool = True) -> np.ndarray:
    """Inverse of encode_topk_logits -> [n, T, k] stored logits of `dtype`."""
    width = np.dtype(dtype).itemsize
    flat = from_planes(planes.reshape(1, -1), width)
    deltas = np.ascontiguousarray(flat.reshape(k, n, t).transpose(1, 2, 0)) if slot_major else flat.reshape(n, t, k)
    first = deltas[..., :1]
    # key_j = key_0 - sum_{i<=j} delta_i (mod 2^W); cumsum in uint64 then truncate
    acc = np.cumsum(deltas[..., 1:].astype(np.uint64), axis=-1, dtype=np.uint64)
    keys = np.concatenate([first, (first.astype(np.uint64) - acc).astype(deltas.dtype)], axis=-1)
    return _float_bits(keys).view(dtype)


def encode_lse(lse: np.ndarray) -> np.ndarray:
    """[n, T] float32 -> [n, 4T] uint8: each row's byte planes (sign/exponent bytes together), which the
    Arrow file's zstd codes ~10% tighter than the plain floats."""
    return to_planes(np.ascontiguousarray(lse, dtype=np.float32).view(np.uint32))


def decode_lse(planes: np.ndarray) -> np.ndarray:
    return from_planes(np.ascontiguousarray(planes, dtype=np.uint8), 4).view(np.float32)


def frequency_order(input_ids: np.ndarray, vocab_size: int, dtype) -> np.ndarray:
    """order[rank] = token id, the corpus's tokens from most to least frequent (ties by id): the id table
    of a cache, a function of its corpus alone."""
    counts = np.bincount(np.asarray(input_ids, dtype=np.int64).reshape(-1), minlength=vocab_size)[:vocab_size]
    return np.argsort(-counts, kind="stable").astype(dtype)


def pack_order(order: np.ndarray) -> bytes:
    """The id table as stored (once per cache, in the manifest): wrap-around differences of neighbours, zstd.
    The tokens the corpus never uses follow in ascending id order, so their differences are small and cost
    almost nothing; a table is about 2 bytes per distinct corpus token."""
    import pyarrow as pa

    deltas = order.copy()
    deltas[1:] = order[1:] - order[:-1]  # modulo 2^W
    return pa.Codec("zstd", compression_level=19).compress(to_planes(deltas[None])[0], asbytes=True)


def unpack_order(packed: bytes, vocab_size: int, dtype) -> np.ndarray:
    import pyarrow as pa

    dtype = np.dtype(dtype)
    raw = pa.Codec("zstd").decompress(packed, decompressed_size=vocab_size * dtype.itemsize, asbytes=True)
    deltas = from_planes(np.frombuffer(raw, dtype=np.uint8)[None], dtype.itemsize)[0]
    return np.cumsum(deltas, dtype=np.uint64).astype(dtype)  # the modulo 2^W sum, truncated


def rank_table(order: np.ndarray) -> np.ndarray:
    """Inverse permutation of frequency_order: rank_of[id]."""
    rank_of = np.empty_like(order)
    rank_of[order] = np.arange(len(order), dtype=order.dtype)
    return rank_of


def encode_topk_ids(ids: np.ndarray, rank_of: np.ndarray) -> np.ndarray:
    """[n, T, k] uint16 | uint32 ids of a chunk -> their frequency ranks as [n*T*k*W] uint8 planes."""
    return to_planes(rank_of[ids].reshape(1, -1))[0]


def decode_topk_ids(planes: np.ndarray, order: np.ndarray, n: int, t: int, k: int) -> np.ndarray:
    return order[from_planes(planes.reshape(1, -1), order.dtype.itemsize).reshape(n, t, k)]
